"""Clients of the servers filterd talks to: clamd (``clamd``) and Redis (``redis``)."""
