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

from filterd.services import addresses
from filterd.settings import Settings, load_settings


def private_overrides(settings: Settings) -> dict[str, str]:
    """FILTERD_* overrides pointing at the running daemon's private services, if any."""
    redis_sock = addresses.redis_socket(settings)
    clamd_sock = addresses.clamd_socket(settings)
    antivirus: Any = settings.sections.get("antivirus")
    return addresses.overrides(
        redis_url=(
            addresses.redis_unix_url(redis_sock)
            if not settings.redis.url and redis_sock.exists()
            else None
        ),
        antivirus_address=(
            addresses.clamd_unix_address(clamd_sock)
            if antivirus is not None and not antivirus.address and clamd_sock.exists()
            else None
        ),
    )


def load_like_daemon(config_path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings as the running daemon sees them (its private services filled in)."""
    base = dict(os.environ if env is None else env)
    settings = load_settings(config_path, base)
    overrides = private_overrides(settings)
    return load_settings(settings.source, {**base, **overrides}) if overrides else settings
