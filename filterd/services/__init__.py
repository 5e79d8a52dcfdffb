"""Servers the product itself starts: the private Redis and clamd of ``filterd serve``.

``launcher`` holds the child-process base (private directory, loopback port or unix socket,
polled readiness, PID-based stop); ``redis`` and ``clamd`` are the two servers built on it.
"""
