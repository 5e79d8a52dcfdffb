"""`filterd serve`: process lifecycle around the milter.

Owns what no single connection should: private services when none are
configured, the Runtime swap on SIGHUP, and the drain on SIGTERM. libmilter
blocks and consumes SIGHUP/SIGTERM in the thread that runs it, so the milter
runs in a worker thread and the main thread keeps Python's signal handlers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import Milter
import milter as libmilter

from filterd import health, metrics
from filterd import milter as adapter
from filterd.addresses import parse_milter_socket
from filterd.runtime import Runtime
from filterd.services.private import private_services
from filterd.settings import Settings, load_settings

log = logging.getLogger("filterd.daemon")


class Daemon:
    def __init__(self, config: Path | None, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = dict(os.environ if env is None else env)
        self._stop = threading.Event()
        self._reload = threading.Event()

    def load(self) -> Settings:
        return load_settings(self.config, self.env)

    def run(self) -> int:
        first = self.load()
        with private_services(first) as overrides:
            self.env.update(overrides)
            settings = self.load()
            # --- service helper (issue 14): start-up health check, then metrics. The lead
            # replaces start_single_process with the supervisor's metrics.prepare/serve_http.
            health.enforce(settings, health.preflight(settings))
            metrics.start_single_process(settings)
            runtime = Runtime(settings)
            _selftest(runtime)
            holder = adapter.RuntimeHolder(runtime)
            adapter.install(holder)
            metrics.watch(holder)
            signal.signal(signal.SIGHUP, self._on_hup)
            signal.signal(signal.SIGTERM, self._on_term)
            signal.signal(signal.SIGINT, self._on_term)
            thread = threading.Thread(
                target=self._serve, args=(settings,), name="milter", daemon=True
            )
            thread.start()
            while not self._stop.is_set():
                self._reload.wait(0.5)
                if self._reload.is_set():
                    self._reload.clear()
                    self._do_reload(holder)
                if not thread.is_alive():
                    log.error("milter thread ended unexpectedly")
                    return 1
            return self._drain(holder, settings.milter.drain_seconds)

    def _serve(self, settings: Settings) -> None:
        address = parse_milter_socket(settings.milter.socket)
        if address.is_unix:
            Path(address.path).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.path)
            mode = int(settings.milter.socket_mode, 8)
            threading.Thread(target=_chmod_socket, args=(address.path, mode), daemon=True).start()
        else:
            threading.Thread(target=_set_nodelay, args=(address.port,), daemon=True).start()
        Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS)  # CHGHDRS: outbound header stripping
        log.info("milter listening", extra={"socket": settings.milter.socket})
        try:
            Milter.runmilter("filterd", settings.milter.socket, settings.milter.timeout)
        except Exception:
            log.exception("milter stopped with an error")
        log.info("milter listener stopped")

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload.set()

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()
        self._reload.set()

    def _do_reload(self, holder: adapter.RuntimeHolder) -> None:
        if self._stop.is_set():
            return
        try:
            runtime = Runtime(self.load())
        except Exception as exc:  # noqa: BLE001 - keep serving with the old rules
            log.error("reload failed; keeping the running configuration: %s", exc)
            return
        _selftest(runtime)
        holder.swap(runtime).retire()
        log.info("configuration reloaded")

    def _drain(self, holder: adapter.RuntimeHolder, seconds: float) -> int:
        log.info("stopping: draining in-flight messages", extra={"in_flight": holder.in_flight})
        libmilter.stop()
        deadline = time.monotonic() + seconds
        while holder.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if holder.in_flight:
            log.warning("drain timed out", extra={"in_flight": holder.in_flight})
        holder.current.retire()
        log.info("stopped")
        return 0


def _chmod_socket(path: str, mode: int) -> None:
    """libmilter creates the socket with the process umask; Postfix needs write access."""
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    with contextlib.suppress(OSError):
        os.chmod(path, mode)


def _set_nodelay(port: int) -> None:
    """TCP_NODELAY on libmilter's listening socket (accepted sockets inherit it).

    libmilter never sets it, and writes an end-of-message reply in pieces (each
    added header, then the verdict): with Nagle on, Postfix's delayed ACK holds
    the rest back ~40 ms per message. libmilter owns the socket, so find it by port.
    """
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in Path("/proc/self/fd").iterdir():
            try:
                if not os.readlink(entry).startswith("socket:"):
                    continue
                sock = socket.socket(fileno=os.dup(int(entry.name)))
            except (OSError, ValueError):
                continue
            with sock:
                try:
                    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    if (
                        sock.family in (socket.AF_INET, socket.AF_INET6)
                        and listening
                        and (sock.getsockname()[1] == port)
                    ):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        return
                except OSError:
                    continue
        time.sleep(0.01)
    log.warning("could not set TCP_NODELAY on the milter socket", extra={"port": port})


def _selftest(runtime: Runtime) -> None:
    """Checks may offer ``selftest() -> list[str]``; problems are logged, not fatal."""
    for check in runtime.pipeline.checks.values():
        test = getattr(check, "selftest", None)
        if test is None:
            continue
        try:
            problems = test()
        except Exception as exc:  # noqa: BLE001
            problems = [f"selftest failed: {exc}"]
        for problem in problems:
            log.warning("check self-test: %s", problem, extra={"check": check.name})
