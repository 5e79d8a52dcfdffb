"""The private Redis and clamd `filterd serve` starts when none is configured."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from filterd.services import addresses
from filterd.services.clamd import ClamdServer
from filterd.services.redis import RedisServer
from filterd.settings import Settings

log = logging.getLogger("filterd.daemon")

SYSTEM_CLAMAV_DB = Path("/var/lib/clamav")


def _has_signatures(directory: Path) -> bool:
    return directory.is_dir() and any(p.suffix in (".cvd", ".cld") for p in directory.iterdir())


@contextlib.contextmanager
def private_services(settings: Settings) -> Iterator[dict[str, str]]:
    """Start Redis/clamd for the daemon when no address is configured.

    Yields the FILTERD_* overrides that point the settings at them. Redis keeps
    its data (append-only file) under state_dir so allowlists survive restarts;
    clamd uses the system's freshclam database when there is one, else the
    project's own signatures.
    """
    overrides: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if not settings.redis.url:
            workdir = addresses.state_dir(settings, "redis")
            workdir.mkdir(parents=True, exist_ok=True)
            redis_server = RedisServer(workdir, persistent=True, unix_socket=True)
            redis_server.die_with_parent = True
            stack.enter_context(redis_server)
            overrides.update(addresses.overrides(redis_url=redis_server.url))
            log.info("started private redis", extra={"url": redis_server.url})
        needs_clamd = "antivirus" in settings.pipeline.message_checks
        if needs_clamd and not settings.section("antivirus").address:
            db = (
                SYSTEM_CLAMAV_DB
                if _has_signatures(SYSTEM_CLAMAV_DB)
                else settings.resolve_path("rules/clamav-sigs")
            )
            workdir = addresses.state_dir(settings, "clamd")
            workdir.mkdir(parents=True, exist_ok=True)
            clamd = ClamdServer(workdir, db, unix_socket=True)
            clamd.die_with_parent = True
            stack.enter_context(clamd)
            overrides.update(addresses.overrides(antivirus_address=clamd.address))
            log.info("started private clamd", extra={"address": clamd.address, "db": str(db)})
        yield overrides
