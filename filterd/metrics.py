"""Prometheus metrics for filterd, correct across pre-forked worker processes.

The official ``prometheus-client`` in multiprocess mode: every worker writes its
samples to memory-mapped files in a private directory (``PROMETHEUS_MULTIPROC_DIR``,
0700), and the HTTP child that serves ``/metrics`` merges them. That directory
must be set before ``prometheus_client`` is imported anywhere, so this module
imports it lazily and the supervisor calls :func:`prepare` before it forks.

The supervisor's contract (it calls exactly these):

- :func:`prepare` — before any fork: create/empty the private directory, set the env;
- :func:`worker_exited` — a worker died: drop its live gauges (``mark_process_dead``);
- :func:`enabled` — whether ``[metrics]`` is on;
- :func:`serve_http` — blocking, in its own child process: ``/metrics`` and ``/health``.

Workers are fed without touching the hot path: :class:`MetricsObserver` is a
Runtime observer (``on_recipient``/``on_message``; decisions carry timings and
findings), and a per-process monitor thread samples what no decision carries
(dependency PINGs, circuit breakers, the model in service, in-flight sessions).

Privacy: label values come only from closed sets (actions, reason codes matching
``[A-Z0-9_]``, configured check/list names, dependency names, the model's name),
never from message data, so no address, IP, subject or mailbox can reach the text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from filterd.settings import Section, Settings

if TYPE_CHECKING:
    from filterd.milter import RuntimeHolder
    from filterd.runtime import Runtime
    from filterd.types import Decision, Envelope, Finding, Message, RecipientDecision

log = logging.getLogger("filterd.metrics")

SECTION = "metrics"
ENV = "PROMETHEUS_MULTIPROC_DIR"
_SUPERVISOR_PID: int | None = None


class Config(Section):
    enabled: bool = True
    # host:port or [v6]:port for /metrics and /health; loopback by default.
    listen: str = "127.0.0.1:9467"
    # Private (0700) directory for the workers' sample files; "" = <state_dir>/metrics.
    dir: str = ""
    # How often each worker PINGs clamd and Redis and samples breakers and the model.
    health_interval_seconds: float = Field(default=5.0, gt=0, le=300)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value


def parse_listen(value: str) -> tuple[str, int]:
    """``127.0.0.1:9467`` / ``[::1]:9467`` -> (host, port); ValueError otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT or [V6]:PORT, got {value!r}")
    return host, int(port)


def _config(settings: Settings) -> Config:
    section = settings.sections.get(SECTION)
    return section if isinstance(section, Config) else Config()


def enabled(settings: Settings) -> bool:
    return _config(settings).enabled


def metrics_dir(settings: Settings) -> Path:
    cfg = _config(settings)
    if cfg.dir:
        return settings.resolve_path(cfg.dir)
    return settings.resolve_path(settings.daemon.state_dir) / "metrics"


def prepare(settings: Settings) -> None:
    """Before any fork: a fresh private sample directory, announced in the environment.

    Old sample files are removed: counters of a previous run would otherwise be
    added to this one's. Call this before ``prometheus_client`` is first imported.
    """
    global _SUPERVISOR_PID
    if not enabled(settings):
        return
    directory = metrics_dir(settings)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    for old in directory.glob("*.db"):
        old.unlink(missing_ok=True)
    os.environ[ENV] = str(directory)
    # The process that prepares is the supervisor: it serves no mail, so it neither
    # counts as a worker nor starts a monitor thread (threads and fork do not mix).
    _SUPERVISOR_PID = os.getpid()


def worker_exited(pid: int) -> None:
    """A worker is gone: its live gauges (in-flight, workers, up) no longer count."""
    if not os.environ.get(ENV):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------------------------
# The metrics themselves (built lazily, after prepare() set the directory)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PROB_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.34, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0)
_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
DEPENDENCIES = ("clamd", "redis", "model")


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.messages = Counter(
            "filterd_messages",
            "Messages judged at end of message, by action and reason code.",
            ["action", "reason"],
        )
        self.recipients_refused = Counter(
            "filterd_recipients_refused",
            "Recipients refused or deferred at RCPT time, by action and reason code.",
            ["action", "reason"],
        )
        self.check_seconds = Histogram(
            "filterd_check_seconds",
            "Wall time of one check per message (phase message) or recipient (phase rcpt).",
            ["phase", "check"],
            buckets=_LATENCY_BUCKETS,
        )
        self.message_seconds = Histogram(
            "filterd_message_seconds",
            "Wall time of the whole end-of-message judgement.",
            buckets=_LATENCY_BUCKETS,
        )
        self.spam_probability = Histogram(
            "filterd_spam_probability",
            "The classifier's spam probability of judged messages.",
            buckets=_PROB_BUCKETS,
        )
        self.dns_list_errors = Counter(
            "filterd_dns_list_errors",
            "DNS list lookups that failed (list unavailable, failing open).",
            ["check", "zone"],
        )
        self.breaker_open = Gauge(
            "filterd_dns_list_breaker_open",
            "1 while a DNS list's circuit breaker is open (list skipped, failing open).",
            ["check", "zone"],
            multiprocess_mode="livemax",
        )
        self.dependency_up = Gauge(
            "filterd_dependency_up",
            "1 when every worker reaches the dependency (periodic PING; model: loaded).",
            ["dependency"],
            multiprocess_mode="livemin",
        )
        self.model_info = Gauge(
            "filterd_model_info",
            "The classifier model in service (value 1).",
            ["model"],
            multiprocess_mode="livemax",
        )
        self.threshold = Gauge(
            "filterd_classifier_threshold",
            "Spam probability thresholds served (reject, tag).",
            ["kind"],
            multiprocess_mode="livemax",
        )
        self.policy_score = Gauge(
            "filterd_policy_score_threshold",
            "[policy] score thresholds served (reject, tag).",
            ["kind"],
            multiprocess_mode="livemax",
        )
        self.in_flight = Gauge(
            "filterd_sessions_in_flight",
            "SMTP transactions in progress across workers.",
            multiprocess_mode="livesum",
        )
        self.workers = Gauge(
            "filterd_workers",
            "Worker processes serving the milter socket.",
            multiprocess_mode="livesum",
        )


_METRICS: _Metrics | None = None
_METRICS_LOCK = threading.Lock()


def _metrics() -> _Metrics:
    global _METRICS
    with _METRICS_LOCK:
        if _METRICS is None:
            _METRICS = _Metrics()
        return _METRICS


def _code(value: str) -> str:
    return value if _CODE.match(value) else "OTHER"


def _name(value: str | None) -> str:
    return value if value and _NAME.match(value) else "other"


def _zones(settings: Settings) -> set[str]:
    zones: set[str] = set()
    for section in ("dnsbl", "uribl"):
        cfg = settings.sections.get(section)
        for item in getattr(cfg, "lists", None) or []:
            zone = getattr(item, "zone", None)
            if isinstance(zone, str):
                zones.add(zone)
    return zones


class MetricsObserver:
    """Counts outcomes and observes timings; never raises into the milter."""

    def __init__(self, settings: Settings) -> None:
        self.m = _metrics()
        self.zones = _zones(settings)
        self.m.policy_score.labels("reject").set(settings.policy.reject_score)
        self.m.policy_score.labels("tag").set(settings.policy.tag_score)
        Monitor.ensure(settings)

    def _dns_errors(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            if f.code.endswith("_UNAVAILABLE"):
                zone = f.detail.split(":", 1)[0]
                self.m.dns_list_errors.labels(
                    _name(f.check), zone if zone in self.zones else "other"
                ).inc()

    def on_recipient(self, envelope: Envelope, decision: RecipientDecision) -> None:
        self.m.recipients_refused.labels(decision.action.value, _code(decision.reason_code)).inc()
        for check, seconds in decision.timings.items():
            self.m.check_seconds.labels("rcpt", _name(check)).observe(seconds)
        self._dns_errors(decision.findings)

    def on_message(self, message: Message, decision: Decision) -> None:
        m = self.m
        m.messages.labels(decision.action.value, _code(decision.reason_code)).inc()
        for check, seconds in decision.timings.items():
            if check == "total":
                m.message_seconds.observe(seconds)
            else:
                m.check_seconds.labels("message", _name(check)).observe(seconds)
        if decision.spam_score is not None:
            m.spam_probability.observe(decision.spam_score)
        self._dns_errors(decision.findings)


def build_observer(settings: Settings) -> MetricsObserver | None:
    """An observer when this process belongs to a daemon that ran :func:`prepare`.

    Admin commands (``filterd scan``) build a Runtime too; they get no metrics.
    """
    if not enabled(settings) or os.environ.get(ENV) != str(metrics_dir(settings)):
        return None
    if os.getpid() == _SUPERVISOR_PID:
        return None
    return MetricsObserver(settings)


# --------------------------------------------------------------------------------------------
# Per-worker monitor: what no decision carries


class _Watched:
    """The RuntimeHolder this worker serves from (set by the daemon through :func:`watch`)."""

    holder: RuntimeHolder | None = None


def watch(holder: RuntimeHolder) -> None:
    """Sample this worker's Runtime and in-flight count from ``holder``."""
    _Watched.holder = holder


def _runtime() -> Runtime | None:
    holder = _Watched.holder
    return None if holder is None else holder.current


def _in_flight() -> int:
    holder = _Watched.holder
    return 0 if holder is None else holder.in_flight


def _breakers(runtime: Runtime) -> Iterator[tuple[str, str, bool]]:
    """(check, zone, open) for every DNS list; reads the breaker without changing it."""
    for name, check in runtime.pipeline.checks.items():
        engine = getattr(check, "engine", None)
        resolver = getattr(engine, "resolver", None)
        if engine is None or resolver is None:
            continue
        for item in engine.lists:
            yield name, item.zone, resolver.breaker_open(item.zone)


class Monitor:
    """One daemon thread per worker process: dependency PINGs and sampled gauges."""

    _started_pid: int | None = None
    _model: str | None = None
    _lock = threading.Lock()

    @classmethod
    def ensure(cls, settings: Settings) -> None:
        with cls._lock:
            if cls._started_pid == os.getpid():
                return
            cls._started_pid = os.getpid()
        interval = _config(settings).health_interval_seconds
        thread = threading.Thread(
            target=cls._loop, args=(interval,), name="filterd-monitor", daemon=True
        )
        thread.start()

    @classmethod
    def _loop(cls, interval: float) -> None:
        m = _metrics()
        m.workers.set(1)
        while True:
            try:
                cls.sample(m)
            except Exception:
                log.exception("metrics monitor sample failed")
            time.sleep(interval)

    @staticmethod
    def sample(m: _Metrics) -> None:
        from filterd import health

        m.in_flight.set(_in_flight())
        runtime = _runtime()
        if runtime is None:
            return
        for status in health.live_status(runtime):
            m.dependency_up.labels(status.dependency).set(1 if status.up else 0)
        for check, zone, is_open in _breakers(runtime):
            m.breaker_open.labels(check, zone).set(1 if is_open else 0)
        classifier: Any = runtime.pipeline.checks.get("classifier")
        holder = getattr(classifier, "holder", None)
        model = holder.current() if holder is not None else None
        if classifier is not None and model is not None:
            name = _name(model.name)
            if Monitor._model not in (None, name):
                # A promoted model: the old one is no longer in service in this worker.
                m.model_info.labels(Monitor._model).set(0)
            Monitor._model = name
            m.model_info.labels(name).set(1)
            served = runtime.served_thresholds()
            m.threshold.labels("reject").set(served["spam_reject_probability"])
            m.threshold.labels("tag").set(served["spam_tag_probability"])


# --------------------------------------------------------------------------------------------
# The HTTP child: /metrics and /health


def _registry() -> Any:
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def health_report(registry: Any) -> tuple[bool, dict[str, Any]]:
    """(healthy, JSON body) from the workers' samples: what is down, how many workers."""
    deps: dict[str, bool] = {}
    workers = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "filterd_dependency_up":
                dep = sample.labels.get("dependency", "?")
                deps[dep] = deps.get(dep, True) and sample.value >= 1
            elif sample.name == "filterd_workers":
                workers += sample.value
    down = sorted(d for d, up in deps.items() if not up)
    problems = [f"{d} down" for d in down]
    if workers < 1:
        problems.append("no worker running")
    elif not deps:
        problems.append("no health sample yet")
    body = {
        "status": "ok" if not problems else "unhealthy",
        "down": down,
        "dependencies": {d: ("up" if up else "down") for d, up in sorted(deps.items())},
        "workers": int(workers),
        "problems": problems,
    }
    return not problems, body


def _app(registry: Any) -> Callable[..., Iterable[bytes]]:
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/health":
            healthy, body = health_report(registry)
            data = (json.dumps(body) + "\n").encode()
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [data]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics or /health\n"]

    return app


def serve_http(settings: Settings) -> None:
    """Blocking: serve /metrics and /health on ``[metrics] listen`` until the parent dies.

    Runs in its own child process (the supervisor's, or the single-process
    daemon's), so a slow scrape never competes with a worker's GIL.
    """
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not worth a log line each."""

    host, port = parse_listen(_config(settings).listen)
    server_class = ThreadingWSGIServer
    if ":" in host:

        class V6(ThreadingWSGIServer):  # type: ignore[misc]
            address_family = socket.AF_INET6

        server_class = V6
    parent = os.getppid()
    try:
        httpd = make_server(host, port, _app(_registry()), server_class, handler_class=Quiet)
    except OSError as exc:
        # Metrics never stop mail: say so once, clearly, and leave the daemon serving.
        log.error("metrics: cannot listen on %s:%d: %s ([metrics] listen)", host, port, exc)
        return
    log.info("metrics listening", extra={"listen": f"{host}:{port}"})
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    try:
        while os.getppid() == parent and thread.is_alive():
            time.sleep(0.5)
    finally:
        httpd.shutdown()
        httpd.server_close()
