"""Where `filterd serve` keeps its private Redis and clamd, and how to address them.

The daemon starts them; the admin commands (`scan`, `check`, `allow`, `stats`) must
find the very same ones. One module spells the paths, URLs and override variables,
so the two sides cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from filterd.settings import Settings

REDIS_SOCKET = "redis.sock"
CLAMD_SOCKET = "clamd.sock"
REDIS_ENV = "FILTERD_REDIS_URL"
ANTIVIRUS_ENV = "FILTERD_ANTIVIRUS_ADDRESS"


def state_dir(settings: Settings, service: Literal["redis", "clamd"]) -> Path:
    """The private service's working directory under ``[daemon] state_dir``."""
    return settings.resolve_path(settings.daemon.state_dir) / service


def redis_socket(settings: Settings) -> Path:
    return state_dir(settings, "redis") / REDIS_SOCKET


def clamd_socket(settings: Settings) -> Path:
    return state_dir(settings, "clamd") / CLAMD_SOCKET


def redis_unix_url(path: Path) -> str:
    """Database 0 of a Redis on a unix socket, as ``redis.Redis.from_url`` reads it."""
    return f"unix://{path}?db=0"


def clamd_unix_address(path: Path) -> str:
    """A clamd on a unix socket, in ``[antivirus] address`` syntax."""
    return f"unix:{path}"


def overrides(redis_url: str | None = None, antivirus_address: str | None = None) -> dict[str, str]:
    """The FILTERD_* variables that point the settings at the given services."""
    env: dict[str, str] = {}
    if redis_url:
        env[REDIS_ENV] = redis_url
    if antivirus_address:
        env[ANTIVIRUS_ENV] = antivirus_address
    return env
