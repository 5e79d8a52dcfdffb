"""DNS lists: list definitions (lists), lookups (resolver) and the shared evaluation
(engine) behind the dnsbl and uribl checks."""
