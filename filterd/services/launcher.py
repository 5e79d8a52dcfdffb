"""Launch a real server as our child, privately on loopback, and stop it by PID.

``filterd serve`` starts a private Redis and clamd when none is configured
(``filterd.services.redis``, ``filterd.services.clamd``), so ``make run`` works on a fresh
machine. The test-only servers (Postfix, rbldnsd, smtp-sink...) live in ``tests/servers``
and build on the base classes here.

Rules every launcher keeps, because several test runs and benches share one machine:

* a private directory (passed in) holds every file the server writes;
* a free loopback port (bind port 0 on 127.0.0.1, read it back) or a unix socket; only
  127.0.0.0/8 is ever contacted, and nothing ever asks the system resolver (it points off-box);
* readiness is a real protocol exchange polled against a deadline, never a blind sleep;
* a server is stopped through its own PID (terminate, wait, kill after a grace period);
  ``stop()`` is idempotent and leftovers are stopped at interpreter exit;
* a failed start raises :class:`ServerStartError` carrying the tail of the server's own log.

Facts measured on Debian 12 (Redis 7.0.15, ClamAV 1.4.6), as root, on a 2-core machine:
start-up to first answer is 0.02 s for Redis and for clamd with the tiny project database
(a full official database is reported to need tens of seconds and ~1 GB); clamd appends
``.UNOFFICIAL`` to every signature that is not from a signed official database.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

LOOPBACK = "127.0.0.1"

# Names clamd reports for the project's own database (rules/clamav-sigs/filterd-test.ndb):
# clamd appends ".UNOFFICIAL" to signatures that do not come from a signed official database.

# Poll interval of readiness loops: short enough that start-up time is dominated by the server,
# long enough not to burn one of the machine's two cores while clamd loads a big database.
_POLL_S = 0.02
# Programs live in sbin, which is not on a non-root PATH.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/lib/postfix/sbin")
# Children get a fixed environment, so a developer's shell cannot change how servers behave.
_CHILD_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C",
    "TZ": "UTC",
}
# sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107


class ServerStartError(RuntimeError):
    """A server did not come up; the message ends with the tail of its own log.

    One exception type lets fixtures and ``filterd serve`` report a broken environment
    (missing package, port race, bad config) without knowing which server failed.
    """


# --------------------------------------------------------------------------------------------
# small helpers


def _require_loopback(host: str) -> str:
    """Refuse anything but a literal loopback address: no DNS, and no traffic off the machine."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"{host!r}: only literal loopback addresses are allowed") from exc
    if not addr.is_loopback:
        raise ValueError(f"{host!r} is not a loopback address; devservers only use 127.0.0.0/8")
    return host


def free_port(kind: Literal["tcp", "udp"] = "tcp") -> int:
    """Return a port the kernel just considered free on 127.0.0.1.

    The port is released before the server binds it, so another process can take it in
    between; launchers therefore retry start-up on a fresh port when the bind fails.
    """
    types = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}
    if kind not in types:
        raise ValueError(f"kind must be 'tcp' or 'udp', not {kind!r}")
    with socket.socket(socket.AF_INET, types[kind]) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_tcp(host: str, port: int, deadline_s: float) -> None:
    """Block until ``host:port`` accepts a TCP connection, at most ``deadline_s`` seconds.

    Raises TimeoutError, so a caller never proceeds against a server that is not there.
    """
    _require_loopback(host)
    deadline = time.monotonic() + deadline_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, remaining))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{host}:{port} not accepting after {deadline_s}s: {exc}"
                ) from exc
        time.sleep(_POLL_S)


def make_reachable(path: Path) -> Path:
    """Let the unprivileged server users (postfix, rbldns) reach a private directory.

    mkdtemp/pytest directories are 0700, and Postfix or rbldnsd, after dropping privileges,
    could not even traverse them. ``path`` becomes 0755; each ancestor only gains the search
    (x) bits it lacks, so nothing becomes listable that was not before. Beware of ancestors
    someone else resets: each pytest session chmods /tmp/pytest-of-USER back to 0700, which
    is why tests/conftest.py moves pytest's basetemp elsewhere.
    """
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    for parent in path.parents:
        with contextlib.suppress(OSError):
            mode = parent.stat().st_mode & 0o7777
            if mode & 0o011 != 0o011:
                parent.chmod(mode | 0o011)
    return path


def _find_program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_EXTRA_PATH))
    if found is None:
        raise ServerStartError(f"{name} not found; install its Debian package")
    return found


def _tail(path: Path, lines: int = 30) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-20000:].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int, limit: int = 200_000) -> str:
    """What was appended to a log since it had ``offset`` bytes."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie.

    Postfix's master is not our child: if PID 1 never reaps it, kill(pid, 0) keeps
    succeeding on the zombie, so /proc is read instead.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _as_root() -> bool:
    return os.geteuid() == 0


def _chown_to(path: Path, user: str) -> None:
    """Hand a file or directory to the user a server drops to (only possible as root)."""
    if not _as_root():
        return
    try:
        pw = pwd.getpwnam(user)
    except KeyError as exc:
        raise ServerStartError(f"system user {user!r} missing; install its Debian package") from exc
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _check_unix_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ServerStartError(f"unix socket path too long for sun_path ({_MAX_UNIX_PATH}): {path}")


def _read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = sock.recv(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


# Servers still running when the interpreter exits (a test run interrupted with Ctrl-C, a bench
# script that raised): stopped at exit so no orphan keeps a port or a queue directory.
_RUNNING: set[_Stoppable] = set()
_RUNNING_LOCK = threading.Lock()


class _Stoppable:
    """A server (or group of servers) with ``start``/``stop``, usable in a ``with`` block."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _track(server: _Stoppable) -> None:
    with _RUNNING_LOCK:
        _RUNNING.add(server)


def _untrack(server: _Stoppable) -> None:
    with _RUNNING_LOCK:
        _RUNNING.discard(server)


@atexit.register
def _stop_leftovers() -> None:
    with _RUNNING_LOCK:
        leftovers = list(_RUNNING)
    for server in leftovers:
        with contextlib.suppress(Exception):
            server.stop()


# --------------------------------------------------------------------------------------------
# servers that run as our own child process


class _ChildServer(_Stoppable):
    """Lifecycle shared by servers that run in the foreground as our child.

    Subclasses say how to prepare files, which command to run and how to ask "are you up?";
    this class owns spawning, the deadline, the log tail in errors and the PID-based stop.
    """

    name = "server"
    #: The daemon's private servers die with the process that started them (a SIGKILLed
    #: supervisor must not leave a Redis on its AOF for the next start to run a second one
    #: on). Off for tests, whose servers may be started from short-lived threads.
    die_with_parent = False

    def __init__(self, workdir: Path, start_timeout: float) -> None:
        self.workdir = Path(workdir).absolute()
        self.start_timeout = start_timeout
        #: Seconds from spawn to the first good answer of the last start; for benches/reports.
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._output = self.workdir / f"{self.name}.out"
        # Log sizes at the last spawn: logs are appended across restarts, and only what this
        # start wrote may decide about it.
        self._log_offsets: dict[Path, int] = {}

    # -- hooks ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Write config/data files before each spawn."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        """One readiness attempt; False (or OSError) means "not yet"."""
        raise NotImplementedError

    def _fatal_in_log(self, new_log: str) -> str | None:
        """A line of ``new_log`` proving start-up cannot succeed, to fail before the deadline."""
        return None

    def _log_files(self) -> list[Path]:
        return [self._output]

    def _rebind(self) -> bool:
        """Take a new port after a bind race; False when the address must not change."""
        return False

    # -- public -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The end of every log this server writes, to explain a failure."""
        parts = []
        for path in self._log_files():
            text = _tail(path, lines)
            if text:
                parts.append(f"--- {path}\n{text}")
        return "\n".join(parts) or "(no log output)"

    def start(self) -> Self:
        if self.running:
            return self
        for attempt in range(1, 4):
            try:
                self._spawn_and_wait()
                return self
            except ServerStartError:
                # A bind race with another process: retry on a fresh port, unless the server
                # has already been published at this address (restart keeps it).
                lost_race = "already in use" in self._log_since_spawn()
                if attempt == 3 or not lost_race or self._started_once or not self._rebind():
                    raise
        raise AssertionError("unreachable")

    def _log_since_spawn(self) -> str:
        return "\n".join(_read_from(p, self._log_offsets.get(p, 0)) for p in self._log_files())

    def stop(self, grace_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        _untrack(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                # The child leads its own session (start_new_session), so its group holds
                # only it and whatever it forked.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._after_stop()

    def _after_stop(self) -> None:
        """Clean-up after the process is gone (e.g. stale sockets)."""

    # -- internals --------------------------------------------------------------------------
    def _spawn_and_wait(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        cmd = self._command()
        self._log_offsets = {path: _size(path) for path in self._log_files()}
        t0 = time.monotonic()
        with open(self._output, "ab") as out:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=_CHILD_ENV,
                    # Own session: a Ctrl-C in the terminal reaches pytest, which then stops
                    # servers in order, instead of killing them under a running test.
                    start_new_session=True,
                    preexec_fn=_die_with_parent if self.die_with_parent else None,
                )
            except OSError as exc:
                raise ServerStartError(f"{self.name}: cannot run {cmd[0]}: {exc}") from exc
        self._proc = proc
        _track(self)
        deadline = t0 + self.start_timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                _untrack(self)
                raise ServerStartError(
                    f"{self.name} exited with status {code} during start-up: {' '.join(cmd)}\n"
                    f"{self.log_tail()}"
                )
            try:
                if self._probe():
                    break
            except OSError:
                pass
            fatal = self._fatal_in_log(self._log_since_spawn())
            if fatal is not None or time.monotonic() > deadline:
                self.stop()
                why = fatal or f"no answer within {self.start_timeout:g}s"
                raise ServerStartError(f"{self.name}: {why}: {' '.join(cmd)}\n{self.log_tail()}")
            time.sleep(_POLL_S)
        self.start_seconds = time.monotonic() - t0
        self._started_once = True


class _PortOrSocketServer(_ChildServer):
    """A server on a loopback TCP port or a unix socket, logging to its own file.

    Subclasses set ``_logfile``, ``_output``, ``_port`` and ``socket_path``.
    """

    _logfile: Path
    _output: Path
    _port: int
    socket_path: Path | None

    @property
    def port(self) -> int | None:
        """TCP port, or None for a unix-socket instance."""
        return self._port or None

    def _log_files(self) -> list[Path]:
        return [self._logfile, self._output]

    def _rebind(self) -> bool:
        if self.socket_path is not None:
            return False
        self._port = free_port()
        return True

    def _after_stop(self) -> None:
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)

    def _ask(self, request: bytes, timeout: float) -> socket.socket | None:
        """Connect to the server's address and send ``request``; None while the socket
        file does not exist yet. The caller reads the reply and closes the socket."""
        if self.socket_path is not None:
            if not self.socket_path.exists():
                return None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = str(self.socket_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (LOOPBACK, self._port)
        try:
            sock.settimeout(timeout)
            sock.connect(target)
            sock.sendall(request)
        except OSError:
            sock.close()
            raise
        return sock


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
