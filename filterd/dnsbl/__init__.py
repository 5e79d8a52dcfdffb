"""DNS blocklists: list definitions (lists), lookups (resolver), link extraction
(links) and the shared evaluation (engine) behind the dnsbl and uribl checks."""
