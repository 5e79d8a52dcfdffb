"""Start-up and live health of filterd's dependencies: clamd, Redis, the spam model.

``preflight`` runs once at daemon start (after private services are up, before
the milter listens): it PINGs clamd and Redis and loads the model, so an outage
is found in the log at start, not through deferred mail. ``enforce`` applies
``[daemon] on_dependency_down``: ``"refuse"`` stops the start with one CRITICAL
line naming what is down (systemd restarts it later); ``"degraded"`` starts and
logs each problem at ERROR. Only a dependency whose check fails *closed* is a
reason to refuse: a fail-open one is logged at ERROR either way.

A clamd with no official database (its VERSION reply carries no database
version — e.g. the daemon's private clamd on the project's test signatures) is,
in effect, no antivirus: that is a WARNING at every start.

``live_status`` is what each worker's monitor thread PINGs periodically; its
results become the ``filterd_dependency_up`` gauges that ``/health`` reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from filterd.settings import Settings

if TYPE_CHECKING:
    from filterd.runtime import Runtime

log = logging.getLogger("filterd.health")

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dependency at start-up.

    ``fails_closed``: mail would be deferred (4xx) while this lasts, so
    ``on_dependency_down = "refuse"`` refuses to start for it.
    """

    dependency: str
    severity: Severity
    message: str
    fails_closed: bool = False

    def __str__(self) -> str:
        return f"{self.dependency}: {self.message}"


@dataclass(frozen=True)
class DependencyStatus:
    dependency: str
    up: bool
    detail: str = ""


class StartupRefused(SystemExit):
    """The daemon must not start: a fail-closed dependency is down (exit status 3)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(3)
        self.problems = problems


PING_TIMEOUT = 5.0


def _uses(settings: Settings, check: str) -> bool:
    return check in settings.pipeline.message_checks or check in settings.pipeline.recipient_checks


def _redis_fails_closed(settings: Settings) -> bool:
    allowlist = settings.sections.get("allowlist")
    return _uses(settings, "allowlist") and getattr(allowlist, "on_failure", "") == "tempfail"


def check_clamd(settings: Settings) -> list[Problem]:
    if not _uses(settings, "antivirus"):
        return []
    from filterd.clients.clamd import ClamdClient, ClamdError

    cfg = settings.section("antivirus")
    closed = cfg.on_failure == "tempfail"
    if not cfg.address:
        return [Problem("clamd", "error", "[antivirus] address is empty", closed)]
    try:
        client = ClamdClient(cfg.address, timeout=min(PING_TIMEOUT, cfg.timeout))
    except ValueError as exc:
        return [Problem("clamd", "error", f"[antivirus] address: {exc}", closed)]
    if not client.ping():
        return [Problem("clamd", "error", f"{client.describe()} does not answer PING", closed)]
    try:
        version = client.version()
    except ClamdError as exc:
        return [Problem("clamd", "error", str(exc), closed)]
    if "/" not in version:
        return [
            Problem(
                "clamd",
                "warning",
                f"{client.describe()} ({version}) serves no official signature database "
                "(only local signatures, e.g. the project's test signatures): in effect no "
                "antivirus. Install clamav-freshclam or point [antivirus] address at a real clamd.",
            )
        ]
    return []


def check_redis(settings: Settings) -> list[Problem]:
    url = settings.redis.url
    if not url:
        return []
    import redis

    from filterd.clients.redis import connect

    client = connect(settings, url)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return [
            Problem(
                "redis",
                "error",
                f"{_describe_url(url)} does not answer PING ({type(exc).__name__})",
                _redis_fails_closed(settings),
            )
        ]
    finally:
        client.close()
    return []


def _describe_url(url: str) -> str:
    """The URL without a password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
        return parts._replace(netloc=netloc).geturl()
    return url


def check_model(settings: Settings) -> list[Problem]:
    if not _uses(settings, "classifier"):
        return []
    from filterd.classify.registry import ModelHolder

    cfg = settings.section("classifier")
    holder = ModelHolder(settings.resolve_path(cfg.models_dir), check_interval=3600)
    if holder.current() is None:
        return [
            Problem(
                "model",
                "error",
                f"no classifier model loads from {cfg.models_dir}: {holder.last_error}",
                cfg.on_failure == "tempfail",
            )
        ]
    return []


def preflight(settings: Settings) -> list[Problem]:
    """PING clamd and Redis, load the model; every problem found, none raised."""
    problems: list[Problem] = []
    for probe in (check_clamd, check_redis, check_model):
        try:
            problems.extend(probe(settings))
        except Exception as exc:  # noqa: BLE001 - a probe's own failure is a finding
            name = probe.__name__.removeprefix("check_")
            problems.append(Problem(name, "error", f"check failed: {exc}", True))
    return problems


def enforce(settings: Settings, problems: list[Problem]) -> None:
    """Log the problems; raise StartupRefused when the config says so.

    ``[daemon] on_dependency_down = "refuse"``: a fail-closed dependency that is
    down stops the start (one CRITICAL line naming each); ``"degraded"``: start
    anyway, each problem at ERROR (mail to fail-closed checks gets 4xx).
    """
    mode = getattr(settings.daemon, "on_dependency_down", "refuse")
    for problem in problems:
        if problem.severity == "warning":
            log.warning("start-up check: %s", problem, extra={"dependency": problem.dependency})
    errors = [p for p in problems if p.severity == "error"]
    blocking = [p for p in errors if p.fails_closed]
    if blocking and mode == "refuse":
        log.critical(
            'refusing to start: %s is down (%s); [daemon] on_dependency_down = "refuse"',
            ", ".join(sorted({p.dependency for p in blocking})),
            "; ".join(str(p) for p in blocking),
            extra={"down": sorted({p.dependency for p in blocking})},
        )
        raise StartupRefused(blocking)
    for problem in errors:
        log.error(
            "dependency down at start: %s%s",
            problem,
            " (starting degraded: mail needing it is deferred with 4xx)"
            if problem.fails_closed
            else " (its check fails open)",
            extra={"dependency": problem.dependency},
        )


def live_status(runtime: Runtime) -> list[DependencyStatus]:
    """PING what this runtime uses (called periodically from each worker's monitor)."""
    statuses: list[DependencyStatus] = []
    antivirus = runtime.pipeline.checks.get("antivirus")
    client = getattr(antivirus, "client", None)
    if client is not None:
        statuses.append(DependencyStatus("clamd", bool(client.ping())))
    if runtime.services.redis is not None:
        import redis

        try:
            up = bool(runtime.services.redis.ping())
        except (redis.RedisError, OSError):
            up = False
        statuses.append(DependencyStatus("redis", up))
    classifier = runtime.pipeline.checks.get("classifier")
    holder = getattr(classifier, "holder", None)
    if holder is not None:
        statuses.append(DependencyStatus("model", holder.current() is not None))
    return statuses
