"""`filterd serve`: a small supervisor over pre-forked milter workers.

One Python process is bound by one GIL, so the daemon forks ``[milter] workers``
processes that share one listening socket. libmilter makes that possible: once
``smfi_opensocket`` has opened the socket in the parent, every child's
``smfi_main`` reuses it (it returns early when its socket is valid), and the
kernel hands each new connection to one of the workers.

The supervisor itself has no threads and no Runtime (no clients, no checks):

- as root it creates the socket (and its directory), gives it mode
  ``[milter] socket_mode`` and group ``socket_group``, writes the pid file, then
  drops to ``[daemon] user`` for good; private Redis/clamd start after the drop, so
  they and their files belong to that user;
- it imports the serving modules and reads the model once before forking, so a
  worker forked later (a replacement) only builds its clients;
- signals arrive through ``sigtimedwait`` (blocked, then waited for), so nothing
  runs in a signal handler: SIGCHLD reaps and replaces a dead worker, SIGHUP is
  passed to every worker (each reloads in place), SIGTERM/SIGINT drain;
- the drain calls ``shutdown(SHUT_RD)`` on the shared listening socket: the kernel
  refuses new connections for all workers at once, while sessions already accepted
  continue; each worker then exits when its last message has its verdict. libmilter's
  own ``smfi_stop()`` is not used: with Debian's worker pool it abandons every
  session that sits between two commands (a message in DATA got Postfix's default
  action after the full drain time).

libmilter unlinks the socket path when ``smfi_main`` ends in a process that is not
root, so libmilter gets a private name and the configured name is a hard link to
the same socket: a worker that exits removes only the private name.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import importlib
import logging
import os
import pwd
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from filterd import health, metrics
from filterd.addresses import SocketAddress, parse_milter_socket
from filterd.settings import (
    DEFAULT_CONFIG,
    ConfigError,
    DaemonConfig,
    MilterConfig,
    Settings,
    load_settings,
    resolve_path,
)

log = logging.getLogger("filterd.supervisor")

MILTER_NAME = "filterd"
#: Worker → supervisor: "my Runtime is built; I serve". A real-time signal, so two
#: workers becoming ready at once are two signals (standard signals merge).
READY_SIGNAL = signal.SIGRTMIN
#: Worker → supervisor: "I no longer poll the listening socket" (during a drain).
RELEASED_SIGNAL = signal.SIGRTMIN + 1
#: A worker that cannot build its Runtime at all (bad configuration, no model).
EXIT_CONFIG = 3
_WAITED = {
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    READY_SIGNAL,
    RELEASED_SIGNAL,
}
# A worker that dies sooner than this after its start is restarted with a growing delay.
_QUICK_DEATH_S = 2.0
_MAX_BACKOFF_S = 10.0
# Threads numpy's BLAS would start on import; a forked child must not inherit a pool.
_SINGLE_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class CoreSettings(Protocol):
    """What the supervisor needs before the whole configuration is loaded."""

    @property
    def source(self) -> Path: ...

    @property
    def milter(self) -> MilterConfig: ...

    @property
    def daemon(self) -> DaemonConfig: ...

    def resolve_path(self, value: str) -> Path: ...


@dataclass(frozen=True)
class EarlySettings:
    source: Path
    milter: MilterConfig
    daemon: DaemonConfig

    def resolve_path(self, value: str) -> Path:
        return resolve_path(value)


def early_settings(config: Path | None) -> CoreSettings:
    """[milter] and [daemon] alone, validated by their own models, for opening the socket.

    The whole configuration imports every check (numpy, scipy, the model code: about a
    second); the socket does not need them. Until it exists, Postfix answers every
    sender 451; once it exists, connections wait in its listen queue. Anything unusual
    here falls back to the full load, whose errors name the key.
    """
    try:
        import tomllib

        source = Path(config or os.environ.get("FILTERD_CONFIG") or DEFAULT_CONFIG)
        data = tomllib.loads(source.read_text(encoding="utf-8"))
        sections: dict[str, Any] = {}
        for name, model in (("milter", MilterConfig), ("daemon", DaemonConfig)):
            values = dict(data.get(name, {}))
            prefix = f"FILTERD_{name.upper()}_"
            for key, raw in os.environ.items():
                if key.startswith(prefix):
                    try:
                        values[key[len(prefix) :].lower()] = tomllib.loads(f"v = {raw}")["v"]
                    except tomllib.TOMLDecodeError:
                        values[key[len(prefix) :].lower()] = raw
            sections[name] = model.model_validate(values)
        return EarlySettings(source, sections["milter"], sections["daemon"])
    except Exception:  # noqa: BLE001 - the full load reports it properly
        return load_settings(config)


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int


def default_pidfile(settings: CoreSettings) -> Path:
    if settings.daemon.pidfile:
        return settings.resolve_path(settings.daemon.pidfile)
    return settings.resolve_path(settings.daemon.state_dir) / "filterd.pid"


def resolve_identity(settings: CoreSettings) -> Identity | None:
    """The user to run as, or None to keep the current one."""
    wanted = settings.daemon.user
    if os.geteuid() != 0:
        if wanted and wanted != pwd.getpwuid(os.geteuid()).pw_name:
            log.warning("not started as root: cannot switch user", extra={"user": wanted})
        return None
    if not wanted:
        try:
            pwd.getpwnam("filterd")
        except KeyError:
            log.warning(
                "running as root: set [daemon] user or create the 'filterd' user "
                "(make install does)"
            )
            return None
        wanted = "filterd"
    try:
        entry = pwd.getpwnam(wanted)
    except KeyError:
        raise ConfigError(f"{settings.source}: [daemon] user: no such user {wanted!r}") from None
    if entry.pw_uid == 0:
        return None
    return Identity(wanted, entry.pw_uid, entry.pw_gid)


def socket_gid(settings: CoreSettings) -> int | None:
    name = settings.milter.socket_group or "postfix"
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if settings.milter.socket_group:
            log.warning("socket group does not exist", extra={"group": name})
        return None


def drop_privileges(identity: Identity | None) -> None:
    if identity is None:
        return
    os.initgroups(identity.name, identity.gid)
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    os.environ["HOME"] = pwd.getpwuid(identity.uid).pw_dir
    log.info("running as unprivileged user", extra={"user": identity.name, "uid": identity.uid})


def _own(path: Path, identity: Identity | None, gid: int | None = None, mode: int = 0o700) -> None:
    """Create ``path`` if needed; as root give it to ``identity`` (private: 0700).

    An existing directory is only taken over when it is clearly the daemon's (see
    ``_is_ours``): a state_dir of "/var/lib" must never be chowned.
    """
    if path.is_dir() and not _is_ours(path, identity):
        return
    path.mkdir(parents=True, exist_ok=True)
    if identity is not None:
        os.chown(path, identity.uid, identity.gid if gid is None else gid)
    elif gid is not None:  # still root: the group alone (Postfix's, for the socket directory)
        with contextlib.suppress(OSError):
            os.chown(path, -1, gid)
    with contextlib.suppress(OSError):
        os.chmod(path, mode)


_OUR_ENTRIES = {"redis", "clamd", "filterd.pid", "filterd.pid.tmp", "metrics"}


def _is_ours(path: Path, identity: Identity | None) -> bool:
    info = path.stat()
    if identity is not None and info.st_uid == identity.uid:
        return True
    if info.st_uid != os.geteuid():
        return False
    try:
        return {p.name for p in path.iterdir()} <= _OUR_ENTRIES
    except OSError:
        return False


def prepare_state_dir(settings: CoreSettings, identity: Identity | None) -> None:
    """Private Redis/clamd files (addresses, IPs in the AOF) are the daemon user's only."""
    state = settings.resolve_path(settings.daemon.state_dir)
    _own(state, identity)
    for sub in ("redis", "clamd"):
        directory = state / sub
        _own(directory, identity)
        if identity is None or directory.stat().st_uid != identity.uid:
            continue
        for root, dirs, files in os.walk(directory):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    os.chown(os.path.join(root, name), identity.uid, identity.gid)


class Listener:
    """libmilter's listening socket, opened once in the supervisor."""

    def __init__(self, settings: CoreSettings, identity: Identity | None) -> None:
        import Milter
        import milter as libmilter

        self.settings = settings
        self.address: SocketAddress = parse_milter_socket(settings.milter.socket)
        self.paths: list[Path] = []
        if self.address.is_unix:
            public = Path(self.address.path)
            if not public.parent.is_dir():
                # Postfix's smtpd must traverse it: group = the socket group.
                _own(public.parent, identity, socket_gid(settings), 0o750)
            _remove_stale_names(public)
            private = public.with_name(f".{public.name}.{os.getpid()}")
            self.conn = f"unix:{private}"
            self.paths = [public, private]
        else:
            self.conn = settings.milter.socket
        # ADDHDRS for X-Spam-*; CHGHDRS for the outbound header stripping.
        Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS)
        libmilter.setconn(self.conn)
        libmilter.settimeout(settings.milter.timeout)
        libmilter.register(MILTER_NAME)
        libmilter.opensocket(True)
        # libmilter's own descriptor (the number every worker's libmilter polls), and our
        # duplicate of it for setsockopt.
        self.fd, self.sock = _find_listener(self.address, self.paths[1] if self.paths else None)
        if self.address.is_unix:
            self._publish(identity)
        else:
            # libmilter never sets TCP_NODELAY; accepted sockets inherit it. Without it,
            # Nagle + delayed ACK held each end-of-message reply ~40 ms (bench/README.md).
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _publish(self, identity: Identity | None) -> None:
        public, private = self.paths
        mode = int(self.settings.milter.socket_mode, 8)
        gid = socket_gid(self.settings)
        uid = identity.uid if identity is not None else -1
        if identity is not None or gid is not None:
            try:
                os.chown(private, uid, -1 if gid is None else gid)
            except OSError as exc:
                log.warning("cannot give the socket its group: %s", exc)
        os.chmod(private, mode)
        with contextlib.suppress(FileNotFoundError):
            public.unlink()
        os.link(private, public)

    def refuse_new(self, shutdown: bool) -> None:
        """Close the listening socket for good, once the workers have let go of it.

        Each worker, on SIGTERM, puts an idle descriptor in place of the listener (see
        ``Worker``), so libmilter's accept loop no longer watches it. Then
        ``shutdown()`` here makes the kernel refuse new connections at once, also those
        in the listen queue. Called on a socket a worker's libmilter still polls,
        ``shutdown()`` would end that accept loop with an error, and libmilter then
        abandons every session in progress (measured over TCP: the held messages got
        Postfix's default action) -- hence ``shutdown=False`` when a worker did not
        confirm: the socket then closes when the last poll on it times out.
        """
        if shutdown:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def close_duplicate(self) -> None:
        """In a forked child: drop the supervisor's duplicate (libmilter keeps ``fd``)."""
        self.sock.close()

    def remove(self) -> None:
        for path in self.paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove the socket: %s", exc, extra={"path": str(path)})


def _remove_stale_names(public: Path) -> None:
    """Private socket names left by a supervisor that was killed (its pid is gone)."""
    for path in public.parent.glob(f".{public.name}.*"):
        pid = path.name.rsplit(".", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                path.unlink()


def _find_listener(address: SocketAddress, unix_path: Path | None) -> tuple[int, socket.socket]:
    """libmilter owns the socket and does not expose it: find it among our fds."""
    for entry in sorted(Path("/proc/self/fd").iterdir(), key=lambda p: p.name):
        try:
            if not os.readlink(entry).startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(entry.name)))
        except (OSError, ValueError):
            continue
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                name = sock.getsockname()
                if unix_path is not None and sock.family == socket.AF_UNIX:
                    if name == str(unix_path):
                        return int(entry.name), sock
                elif sock.family in (socket.AF_INET, socket.AF_INET6) and name[1] == address.port:
                    return int(entry.name), sock
        except OSError:
            pass
        sock.close()
    raise RuntimeError(f"libmilter's listening socket for {address} not found")


def write_pidfile(path: Path, identity: Identity | None) -> None:
    """Written as root, owned by the daemon user, who removes it at exit."""
    if not path.parent.is_dir():
        _own(path.parent, identity, mode=0o755)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    if identity is not None:
        os.chown(tmp, identity.uid, identity.gid)
    tmp.chmod(0o644)
    tmp.replace(path)


def read_pidfile(path: Path) -> int | None:
    """The running supervisor's pid, or None (no file, stale file)."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


_PRELOAD = (
    "filterd.services.private",  # private Redis/clamd, started after the drop
    "filterd.milter",
    "filterd.pipeline",
    "filterd.runtime",
    "filterd.daemon",
)
# The metrics child serves HTTP after the drop (prometheus_client after metrics.prepare).
_PRELOAD_METRICS = ("gzip", "wsgiref.simple_server", "prometheus_client.multiprocess")


def preload(settings: Settings) -> None:
    """Import what every worker needs and warm the model's lazy tables, before fork.

    Forked workers share these pages; a replacement worker then only builds its own
    clients and loads the model arrays (page-cached). No client, no thread is made here.
    Imported while still root: an interpreter installed where the daemon user cannot
    read (a home directory) must have every module loaded before the drop.
    """
    for module in _PRELOAD + (_PRELOAD_METRICS if metrics.enabled(settings) else ()):
        importlib.import_module(module)
    for phase in (settings.pipeline.recipient_checks, settings.pipeline.message_checks):
        for check in phase:
            with contextlib.suppress(Exception):
                __import__(f"filterd.checks.{check}")
    if "classifier" not in settings.pipeline.message_checks:
        return
    try:
        from filterd.classify.model import SpamModel
        from filterd.classify.registry import active_name, models_dir

        config = settings.section("classifier")
        mdir = models_dir(settings.resolve_path(config.models_dir))
        name = active_name(mdir)
        if name:
            model = SpamModel.load(mdir / name)
            model.score(b"Subject: warm-up\r\n\r\nhello http://example.org/\r\n")
    except Exception as exc:  # noqa: BLE001 - the worker reports model problems itself
        log.debug("preload of the model skipped: %s", exc)


@dataclass
class _Child:
    pid: int
    kind: str  # "worker" | "metrics"
    started: float
    ready: bool = False


class Supervisor:
    def __init__(self, config: Path | None, log_filter: bool = False) -> None:
        self.config = config
        self.log_filter = log_filter
        self.stop_requested = False
        self.children: dict[int, _Child] = {}
        # The one worker that runs the checks' self-tests (at start and on reload): every
        # worker builds the same Runtime, so N workers would log each warning N times and
        # send every list's test query N times. Its replacement inherits the role.
        self.reporter: int | None = None
        self.due: list[tuple[float, str]] = []  # (when, kind) of replacements to fork
        self.backoff = 0.0
        self.ever_ready = False
        self.started = time.monotonic()

    # -- entry ------------------------------------------------------------------------------
    def run(self) -> int:
        from filterd.services.private import private_services

        for name in _SINGLE_THREAD_ENV:
            os.environ.setdefault(name, "1")
        # Until the loop waits for signals, a SIGTERM only sets a flag: stopping then still
        # removes the socket and stops the private servers (not blocked: they inherit the mask).
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._early_signal)
        core = early_settings(self.config)
        identity = resolve_identity(core)
        # Files we create (private Redis's AOF and dump.rdb, clamd's temp files): 0600.
        os.umask(0o077)
        prepare_state_dir(core, identity)
        # The socket first: from now on Postfix's connections wait in the listen queue for
        # the first worker instead of being refused (451 for every sender).
        try:
            listener = Listener(core, identity)
        except Exception as exc:  # noqa: BLE001 - OSError, milter.error: name the socket
            raise ConfigError(
                f"{core.source}: [milter] socket {core.milter.socket}: cannot listen: {exc}"
            ) from None
        pidfile = default_pidfile(core)
        try:
            settings = load_settings(self.config)
            if self.log_filter:
                from filterd.records.logfilter import install_from_config

                install_from_config(settings.section("records"))
            # Before the preload: prometheus_client fixes its multiprocess mode on import.
            metrics.prepare(settings)
            if identity is not None and metrics.enabled(settings):
                os.chown(metrics.metrics_dir(settings), identity.uid, identity.gid)
            # Before the drop too: everything the workers import is read while still root.
            preload(settings)
            write_pidfile(pidfile, identity)
            drop_privileges(identity)
            with private_services(settings) as overrides:
                os.environ.update(overrides)
                settings = load_settings(self.config)
                # Dependencies down at start: refuse (exit 3) or start degraded, by
                # [daemon] on_dependency_down, before any worker is forked.
                health.enforce(settings, health.preflight(settings))
                return self._supervise(settings, listener)
        finally:
            listener.remove()
            with contextlib.suppress(OSError):
                pidfile.unlink()

    def _early_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGHUP:  # a reload before the workers exist has nothing to do
            self.stop_requested = True

    # -- the loop ---------------------------------------------------------------------------
    def _supervise(self, settings: Settings, listener: Listener) -> int:
        count = settings.milter.workers or len(os.sched_getaffinity(0))
        signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        if self.stop_requested:
            log.info("stopped before serving")
            return 0
        self.listener = listener
        self.settings = settings
        for _ in range(count):
            self._fork("worker")
        if metrics.enabled(settings):
            self._fork("metrics")
        log.info(
            "milter listening",
            extra={"socket": settings.milter.socket, "workers": count},
        )
        announced = False
        while True:
            timeout = 1.0
            if self.due:
                timeout = max(0.0, min(self.due)[0] - time.monotonic())
            info = signal.sigtimedwait(_WAITED, timeout)
            self._spawn_due()
            if info is None:
                continue
            sig = info.si_signo
            if sig == signal.SIGCHLD:
                failed = self._reap(respawn=True)
                if failed and not self.ever_ready:
                    # A build error is the same for every worker: say so and stop, rather
                    # than fork forever. Later (a replacement after a broken edit) the
                    # workers still serving keep the mail flowing and retries back off.
                    log.error("no worker could start; see the errors above")
                    self.due.clear()
                    self._stop_children(0.0)
                    return 1
            elif sig == READY_SIGNAL:
                child = self.children.get(info.si_pid)
                if child is not None:
                    child.ready = True
                    self.ever_ready = True
                if not announced and all(c.ready for c in self._workers()):
                    announced = True
                    sd_notify(f"READY=1\nMAINPID={os.getpid()}")
                    log.info(
                        "milter ready",
                        extra={
                            "workers": len(self._workers()),
                            "start_ms": round((time.monotonic() - self.started) * 1000),
                        },
                    )
            elif sig == signal.SIGHUP:
                log.info("reload requested: passing SIGHUP to every worker")
                for child in self._workers():
                    self._kill(child.pid, signal.SIGHUP)
            elif sig in (signal.SIGTERM, signal.SIGINT):
                return self._drain(settings.milter.drain_seconds)

    def _workers(self) -> list[_Child]:
        return [c for c in self.children.values() if c.kind == "worker"]

    def _fork(self, kind: str) -> None:
        reports = kind == "worker" and self.reporter not in self.children
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            self._child_main(kind, reports)
        self.children[pid] = _Child(pid, kind, time.monotonic())
        if reports:
            self.reporter = pid

    def _child_main(self, kind: str, reports: bool) -> NoReturn:
        code = 1
        try:
            self.listener.close_duplicate()
            if kind == "worker":
                from filterd.daemon import Worker

                code = Worker(
                    self.config, self.listener.conn, self.listener.fd, selftest=reports
                ).run()
            else:
                # Holding the listener would keep it accepting after a drain.
                with contextlib.suppress(OSError):
                    os.close(self.listener.fd)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _WAITED)
                metrics.serve_http(self.settings)
                code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("%s process failed", kind)
        finally:
            # Never run the parent's atexit hooks (they stop the private servers).
            with contextlib.suppress(Exception):
                logging.shutdown()
            os._exit(code)

    def _reap(self, respawn: bool) -> bool:
        """Collect exited children; replace them when running. True if one failed at start."""
        failed_at_start = False
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            child = self.children.pop(pid)
            metrics.worker_exited(pid)
            code = os.waitstatus_to_exitcode(status)
            if code == EXIT_CONFIG:
                failed_at_start = True
            if not respawn:
                continue
            lived = time.monotonic() - child.started
            if not child.ready and lived < _QUICK_DEATH_S:
                self.backoff = min(_MAX_BACKOFF_S, max(0.25, self.backoff * 2))
            else:
                self.backoff = 0.0
            log.error(
                "%s exited; starting a new one",
                child.kind,
                extra={"worker_pid": pid, "exit": code, "delay_s": self.backoff},
            )
            self.due.append((time.monotonic() + self.backoff, child.kind))
        return failed_at_start

    def _spawn_due(self) -> None:
        now = time.monotonic()
        for item in sorted(self.due):
            if item[0] <= now:
                self.due.remove(item)
                self._fork(item[1])

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    # -- stop -------------------------------------------------------------------------------
    def _drain(self, seconds: float) -> int:
        sd_notify("STOPPING=1")
        log.info("stopping: workers let go of the listener, then drain in-flight messages")
        self.due.clear()
        for child in list(self.children.values()):
            self._kill(child.pid, signal.SIGTERM)
        released = self._wait_released(2.0)
        self.listener.refuse_new(shutdown=released)
        # Logged only once it is true: until every worker has let go, a connection can
        # still be accepted (and served in full), so the line is what an admin -- and
        # the drain tests -- may rely on.
        if released:
            log.info("refusing new connections; draining in-flight messages")
        else:
            log.info("draining; new connections refused once the workers' polls end")
        self._stop_children(seconds, signalled=True)
        log.info("stopped")
        return 0

    def _wait_released(self, seconds: float) -> bool:
        """True once every worker has let go of the listener (RELEASED_SIGNAL)."""
        pending = {c.pid for c in self._workers()}
        deadline = time.monotonic() + seconds
        while pending and time.monotonic() < deadline:
            info = signal.sigtimedwait(
                {RELEASED_SIGNAL, signal.SIGCHLD}, max(0.0, deadline - time.monotonic())
            )
            if info is None:
                break
            if info.si_signo == RELEASED_SIGNAL:
                pending.discard(info.si_pid)
            else:
                pending = {p for p in pending if _alive_child(p)}
        if pending:
            log.warning("workers did not release the socket in time", extra={"n": len(pending)})
        return not pending

    def _stop_children(self, seconds: float, signalled: bool = False) -> None:
        if not signalled:
            for child in list(self.children.values()):
                self._kill(child.pid, signal.SIGTERM)
        # Workers exit as soon as their messages have verdicts; the margin covers their
        # own drain deadline.
        deadline = time.monotonic() + seconds + 5.0
        while self.children and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, min(0.5, max(0.0, deadline - time.monotonic())))
            self._reap(respawn=False)
        for child in list(self.children.values()):
            log.warning("worker did not stop; killing it", extra={"worker_pid": child.pid})
            self._kill(child.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)
            self.children.pop(child.pid, None)


def _alive_child(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return False


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) when every worker serves.

    The protocol is one datagram to $NOTIFY_SOCKET; hand-written because it is six
    lines and a library (python-systemd, sdnotify) would be a dependency for them.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def signal_daemon(settings: Settings, signum: int) -> int:
    """`filterd reload`: the pid from the pid file, then the signal. Returns the pid."""
    pid = read_pidfile(default_pidfile(settings))
    if pid is None:
        raise LookupError(f"no running filterd (pid file {default_pidfile(settings)})")
    try:
        os.kill(pid, signum)
    except PermissionError as exc:
        raise PermissionError(errno.EPERM, f"cannot signal pid {pid}: {exc.strerror}") from None
    return pid


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (readable for any user)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def daemon_status(settings: Settings) -> dict[str, object]:
    """`filterd status`: pid file, then /proc: workers are the children named filterd-worker."""
    pidfile = default_pidfile(settings)
    pid = read_pidfile(pidfile)
    info: dict[str, object] = {
        "running": pid is not None,
        "pid": pid,
        "pidfile": str(pidfile),
        "socket": settings.milter.socket,
    }
    if pid is None:
        return info
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is None or fields[1] != str(pid) or fields[0] == "Z":  # state, ppid
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "filterd-worker":
                workers.append(int(entry.name))
    fields = _proc_stat(pid)
    uptime = None
    if fields is not None:
        ticks = os.sysconf("SC_CLK_TCK")
        boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
        uptime = boot_uptime - int(fields[19]) / ticks  # field 22 (starttime)
    info.update(workers=len(workers), worker_pids=sorted(workers), uptime_seconds=uptime)
    return info


def main(argv: list[str] | None = None) -> int:
    """``python -m filterd.supervisor [--config PATH]``: `filterd serve` without the CLI.

    The systemd unit starts the daemon this way: the `filterd` command imports every
    admin command (and numpy with them) before it could open the socket.
    """
    import argparse

    from filterd.logsetup import setup_logging

    parser = argparse.ArgumentParser(prog="python -m filterd.supervisor")
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        setup_logging(early_settings(args.config).daemon.log_level)
        return Supervisor(args.config, log_filter=True).run()
    except ConfigError as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from filterd.supervisor import main as _main  # the module, not this __main__ copy

    sys.exit(_main())
