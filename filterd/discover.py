"""Find the services a running `filterd serve` uses, for admin commands.

With no ``[redis] url`` / ``[antivirus] address`` configured, `filterd serve`
starts private ones under ``[daemon] state_dir``. Admin commands (`scan`,
`check`) must use the same ones, found the same way `allow` and `stats` find
the daemon's Redis, or their verdicts differ from the daemon's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filterd.services.clamd import private_clamd_socket
from filterd.services.redis import private_socket
from filterd.settings import Settings, load_settings


def private_overrides(settings: Settings) -> dict[str, str]:
    """FILTERD_* overrides pointing at the running daemon's private services, if any."""
    env: dict[str, str] = {}
    if not settings.redis.url and private_socket(settings).exists():
        env["FILTERD_REDIS_URL"] = f"unix://{private_socket(settings)}?db=0"
    clamav: Any = settings.sections.get("antivirus")
    if clamav is not None and not clamav.address and private_clamd_socket(settings).exists():
        env["FILTERD_ANTIVIRUS_ADDRESS"] = f"unix:{private_clamd_socket(settings)}"
    return env


def load_like_daemon(config_path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings as the running daemon sees them (its private services filled in)."""
    base = dict(os.environ if env is None else env)
    settings = load_settings(config_path, base)
    overrides = private_overrides(settings)
    return load_settings(settings.source, {**base, **overrides}) if overrides else settings
