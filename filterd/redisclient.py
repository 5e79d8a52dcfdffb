"""How every part of filterd reaches Redis: the daemon, and the admin CLIs.

One place decides the client options and where the daemon's private Redis
lives, so `filterd allow ...` and `filterd records ...` find the same data the
running daemon uses.
"""

from __future__ import annotations

from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from filterd.settings import Settings


class RedisNotConfigured(Exception):
    """No Redis URL is configured and no daemon-private Redis is running."""


def private_state_dir(settings: Settings) -> Path:
    """Where `filterd serve` keeps its private Redis when no URL is configured."""
    return settings.resolve_path(settings.daemon.state_dir) / "redis"


def private_socket(settings: Settings) -> Path:
    # RedisServer(unix_socket=True) listens on <workdir>/redis.sock.
    return private_state_dir(settings) / "redis.sock"


def private_clamd_socket(settings: Settings) -> Path:
    """The clamd socket `filterd serve` starts when no [clamav] address is configured
    (ClamdServer(unix_socket=True) listens on <state_dir>/clamd/clamd.sock)."""
    return settings.resolve_path(settings.daemon.state_dir) / "clamd" / "clamd.sock"


def connect(settings: Settings, url: str) -> redis.Redis:
    timeout = settings.redis.socket_timeout
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        # One quick retry: redis-py's default backoff spends ~4 s on a dead
        # server, half the RCPT budget, before a check can tempfail.
        retry=Retry(NoBackoff(), 1),
    )


def connect_for_tools(settings: Settings, url: str | None = None) -> redis.Redis:
    """The Redis an admin command should use: --redis-url, [redis] url, or the
    running daemon's private instance."""
    url = url or settings.redis.url
    if not url:
        sock = private_socket(settings)
        if not sock.exists():
            raise RedisNotConfigured(
                "no Redis configured: set [redis] url (FILTERD_REDIS_URL) or --redis-url, "
                f"or run `filterd serve` with its private Redis ({sock} does not exist)"
            )
        url = f"unix://{sock}?db=0"
    return connect(settings, url)
