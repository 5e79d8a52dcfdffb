"""The milter worker process, and the private services `filterd serve` starts.

The supervisor (filterd/supervisor.py) opens the socket and forks workers; each
worker owns what no single connection should: its Runtime, the swap on SIGHUP
and its part of the drain on SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

import Milter

from filterd import metrics
from filterd import milter as adapter
from filterd.runtime import Runtime
from filterd.settings import Settings, load_settings

log = logging.getLogger("filterd.daemon")

MILTER_NAME = "filterd"
# After the last in-flight verdict left eom(), libmilter still has to write it.
_REPLY_LINGER_S = 0.25
# During a drain, how long a session with no message in progress may still start one.
_SESSION_GRACE_S = 2.0


class Worker:
    """One forked worker: its own Runtime, libmilter serving the inherited socket.

    libmilter blocks and consumes SIGHUP/SIGTERM in the thread that runs it, so
    the milter runs in a thread and the main thread keeps Python's signal
    handlers. SIGHUP rebuilds the Runtime in place (connections keep the one they
    started with).

    SIGTERM (the supervisor has already closed its copies of the listening socket):
    the worker puts one end of an idle socketpair in place of the listener's
    descriptor (dup2), so libmilter's accept loop keeps running -- its sessions go on
    -- but polls a descriptor that never becomes ready. Once every worker has done
    so, the kernel closes the listener and refuses new connections at once. The
    worker exits as soon as its in-flight messages have their verdicts (at most
    ``drain_seconds``). Neither ``smfi_stop()`` nor ``shutdown()`` can do this:
    both make libmilter abandon sessions that sit between two commands.
    """

    def __init__(
        self, config: Path | None, conn: str, listen_fd: int, selftest: bool = True
    ) -> None:
        self.config = config
        self.selftest = selftest  # the supervisor's one reporting worker
        self.conn = conn
        self.listen_fd = listen_fd
        self._idle = socket.socketpair()
        self._stop = threading.Event()
        self._reload = threading.Event()

    def load(self) -> Settings:
        return load_settings(self.config)

    def run(self) -> int:
        from filterd.supervisor import EXIT_CONFIG, READY_SIGNAL

        _set_process_name(b"filterd-worker")
        # A supervisor killed outright (SIGKILL, OOM) must not leave workers serving an
        # unlinked socket: they drain and leave when it dies.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:
            return 1
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        # Ctrl-C reaches the whole process group; the supervisor decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        try:
            settings = self.load()
            runtime = Runtime(settings)
        except Exception as exc:  # noqa: BLE001 - reported; the supervisor decides
            log.error("worker cannot start: %s", exc)
            return EXIT_CONFIG
        if self.selftest:
            _selftest(runtime)
        holder = adapter.RuntimeHolder(runtime)
        adapter.install(holder)
        metrics.watch(holder)
        thread = threading.Thread(target=self._serve, args=(settings,), name="milter", daemon=True)
        thread.start()
        log.info("worker serving")
        with contextlib.suppress(ProcessLookupError):
            os.kill(os.getppid(), READY_SIGNAL)
        while not self._stop.is_set():
            self._reload.wait(0.5)
            if self._reload.is_set():
                self._reload.clear()
                self._do_reload(holder)
            if not thread.is_alive() and not self._stop.is_set():
                # The listener ended (the supervisor shut it, or an error): finish what
                # was accepted, then leave to be replaced.
                log.warning("milter listener ended")
                self._drain(holder, settings.milter.drain_seconds)
                return 1
        return self._drain(holder, holder.current.settings.milter.drain_seconds)

    def _serve(self, settings: Settings) -> None:
        try:
            Milter.runmilter(MILTER_NAME, self.conn, settings.milter.timeout)
        except Exception:
            log.exception("milter stopped with an error")

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload.set()

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        if not self._stop.is_set():
            from filterd.supervisor import RELEASED_SIGNAL

            with contextlib.suppress(OSError):
                os.dup2(self._idle[0].fileno(), self.listen_fd)
                os.kill(os.getppid(), RELEASED_SIGNAL)
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
        if self.selftest:
            _selftest(runtime)
        holder.swap(runtime).retire()
        log.info("configuration reloaded")

    def _drain(self, holder: adapter.RuntimeHolder, seconds: float) -> int:
        log.info("worker draining", extra={"in_flight": holder.in_flight})
        deadline = time.monotonic() + seconds
        idle_since: float | None = None
        while time.monotonic() < deadline:
            if holder.in_flight > 0:
                idle_since = None
            elif holder.sessions == 0:
                break
            else:
                # A session accepted before the socket closed but between messages (or not
                # yet at MAIL): its client usually sends QUIT, or its next MAIL, at once.
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > _SESSION_GRACE_S:
                    break
            time.sleep(0.02)
        if holder.in_flight:
            log.warning("drain timed out", extra={"in_flight": holder.in_flight})
        else:
            time.sleep(_REPLY_LINGER_S)
        holder.current.retire()
        log.info("worker stopped")
        return 0


_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl(option: int, value: int | bytes) -> None:
    with contextlib.suppress(Exception):
        arg = ctypes.c_char_p(value) if isinstance(value, bytes) else ctypes.c_ulong(value)
        ctypes.CDLL(None).prctl(option, arg, 0, 0, 0)


def _set_process_name(name: bytes) -> None:
    """Name the worker in ps/top and /proc/PID/comm (`filterd status` counts them)."""
    _prctl(_PR_SET_NAME, name)


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
