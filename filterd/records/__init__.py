"""Records: what filterd keeps about mail, for how long, and who may see it.

rules/retention.toml declares every kind of record, its fields and their retention;
``writer`` is the only code that stores records (refusing undeclared fields, setting
the expiry in the same write); ``observer`` is what the daemon calls after each
decision; ``query`` answers data-subject requests and reads the anonymous statistics.
"""
