"""Reading a message: the attachment walk, links and their registered domains."""
