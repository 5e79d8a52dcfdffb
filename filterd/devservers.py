"""Real servers (Redis, clamd, rbldnsd, smtp-sink, Postfix) run privately on loopback.

Why this exists: filterd's behaviour only means something against the real programs it talks to
(Postfix's milter client, clamd's INSTREAM, a real DNSBL server, Redis). Mocks would encode our
own assumptions about those programs, which is exactly what the tests must check. The same
launchers serve the test-suite, the bench scripts, and ``filterd serve`` (which starts a private
Redis/clamd when none is configured).

Rules every launcher keeps, because several test runs and benches share one machine:

* a private directory (passed in) holds every file the server writes;
* a free loopback port (bind port 0 on 127.0.0.1, read it back) or a unix socket; only
  127.0.0.0/8 is ever contacted, and nothing ever asks the system resolver (it points off-box);
* readiness is a real protocol exchange polled against a deadline, never a blind sleep;
* a server is stopped through its own PID (terminate, wait, kill after a grace period);
  ``stop()`` is idempotent and leftovers are stopped at interpreter exit;
* a failed start raises :class:`ServerStartError` carrying the tail of the server's own log.

Facts measured on Debian 12 (Postfix 3.7.11, ClamAV 1.4.6, Redis 7.0.15, rbldnsd 1.0pre
20210120), as root, on a 2-core machine:

* Start-up to first answer (median of 5, 20 ms poll): Redis 0.02 s, clamd with the tiny project
  DB 0.02 s (a full official database is reported to need tens of seconds and ~1 GB), rbldnsd
  0.07 s (the first probe is lost before the bind), smtp-sink 0.02 s, Postfix 0.4 s
  (``postfix start`` runs its integrity checks); stopping Postfix takes 0.5-1 s.
* Every Postfix program waits while main.cf is younger than ~2 s (re-reading it every 0.3 s):
  a freshly written config made each start take 2.5 s. The config files are backdated.
* clamd appends ``.UNOFFICIAL`` to every signature that is not from a signed official database:
  the project's ``Eicar-Test-Signature`` is reported as ``Eicar-Test-Signature.UNOFFICIAL``.
* rbldnsd answers REFUSED for zones it does not serve *and* for zones whose data failed to load
  ("zone will not be serviced"), so readiness waits for NOERROR/NXDOMAIN from the first zone.
  ``$TTL n`` in a data file sets that dataset's TTL; ``-t n`` sets the default for the others.
  rbldnsd can log every query (``-l +file``, unbuffered); that log is how queries are counted.
* smtp-sink's ``-d`` dump holds the envelope (X-Mail-Args / X-Rcpt-Args headers) ahead of the
  message; the message is stored with LF line ends, dot-unstuffed, plus one trailing empty line.
  The dump file is opened at MAIL and written until ".", so only files smtp-sink no longer
  holds open (checked in /proc) count as delivered.
* Postfix's readiness probe (one connection reading the 220 banner) is seen by a configured
  milter as one connection that ends without a message.
* ``smtpd_peername_lookup = no``: otherwise smtpd would reverse-resolve each client address
  through /etc/resolv.conf, which points off the machine. With it, an XCLIENT session with
  ADDR but no NAME shows as ``unknown[ADDR]`` and sends no DNS packet (checked with strace).
* Postfix commands print their errors only when stderr is a terminal (else they go to syslog,
  absent here, and ``postfix start`` fails with no message at all): they run with a pty.
* With an unreachable milter and ``milter_default_action = tempfail`` the banner is still 220;
  the session gets ``451 4.7.1 Service unavailable`` at MAIL FROM.
* A Postfix master is not our child and PID 1 here does not reap it: after ``postfix stop``
  it stays a zombie, so liveness is read from /proc (state Z = gone).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import pty
import pwd
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver

__all__ = [
    "EICAR_SIGNATURE_NAME",
    "LOOPBACK",
    "TEST_VIRUS_SIGNATURE_NAME",
    "ClamdServer",
    "DnsQuery",
    "PostfixServer",
    "RbldnsdServer",
    "RedisServer",
    "ServerStartError",
    "SilentUdpServer",
    "SinkMessage",
    "SmtpReply",
    "SmtpResult",
    "SmtpSink",
    "free_port",
    "make_reachable",
    "project_signature_dir",
    "send_mail",
    "toml_value",
    "wait_for_tcp",
    "write_config",
]

LOOPBACK = "127.0.0.1"

# Names clamd reports for the project's own database (rules/clamav-sigs/filterd-test.ndb):
# clamd appends ".UNOFFICIAL" to signatures that do not come from a signed official database.
EICAR_SIGNATURE_NAME = "Eicar-Test-Signature.UNOFFICIAL"
TEST_VIRUS_SIGNATURE_NAME = "Filterd.Test.Virus.UNOFFICIAL"

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


def project_signature_dir() -> Path:
    """The project's tiny ClamAV database (EICAR + a harmless test signature).

    It lets clamd start where no official database can be downloaded; clamd refuses to start
    with an empty DatabaseDirectory.
    """
    path = Path(__file__).resolve().parents[1] / "rules" / "clamav-sigs"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found (running from an installed package?)")
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
    def stop(self) -> None:
        raise NotImplementedError


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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

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


# --------------------------------------------------------------------------------------------
# Redis


class RedisServer(_PortOrSocketServer):
    """A private ``redis-server`` on 127.0.0.1 (or a unix socket).

    Non-persistent by default so tests never leave data behind; ``persistent=True`` is for
    ``filterd serve``, whose reputation/Bayes state must survive restarts (AOF in workdir).
    """

    name = "redis"

    def __init__(
        self,
        workdir: Path,
        persistent: bool = False,
        unix_socket: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(workdir, start_timeout)
        self.persistent = persistent
        self.socket_path: Path | None = self.workdir / "redis.sock" if unix_socket else None
        self._port = 0 if unix_socket else free_port()
        self._logfile = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        """URL for ``redis.Redis.from_url``: database 0 of this instance."""
        if self.socket_path is not None:
            return f"unix://{self.socket_path}?db=0"
        return f"redis://{LOOPBACK}:{self._port}/0"

    def _prepare(self) -> None:
        if self.persistent:
            # The AOF and dump.rdb hold addresses and IPs: nobody else may read them,
            # whatever umask redis-server writes them with.
            self.workdir.chmod(0o700)
        if self.socket_path is not None:
            _check_unix_path(self.socket_path)
            self.socket_path.unlink(missing_ok=True)

    def _command(self) -> list[str]:
        cmd = [
            _find_program("redis-server"),
            "--bind", LOOPBACK,
            "--port", str(self._port),
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", str(self._logfile),
        ]  # fmt: skip
        if self.socket_path is not None:
            cmd += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.persistent:
            cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            cmd += ["--save", "", "--appendonly", "no"]
        return cmd

    def _probe(self) -> bool:
        if self.socket_path is not None:
            if not self.socket_path.exists():
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = str(self.socket_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (LOOPBACK, self._port)
        with sock:
            sock.settimeout(1.0)
            sock.connect(target)
            sock.sendall(b"PING\r\n")
            return _read_line(sock).startswith(b"+PONG")


# --------------------------------------------------------------------------------------------
# clamd


class ClamdServer(_PortOrSocketServer):
    """A private clamd with its own config, database directory and temp directory.

    TemporaryDirectory points into workdir so scanned mail never lands in a shared /tmp.
    ``restart()`` keeps the address because tests stop clamd mid-run and expect the
    daemon's configured ClamdSocket to work again once it is back.
    """

    name = "clamd"

    def __init__(
        self,
        workdir: Path,
        database_dir: Path,
        unix_socket: bool = False,
        stream_max_length: str = "50M",
        start_timeout: float = 120.0,
        user: str | None = None,
    ) -> None:
        # start_timeout is generous: a full official database takes tens of seconds to load.
        super().__init__(workdir, start_timeout)
        self.database_dir = Path(database_dir).absolute()
        self.stream_max_length = stream_max_length
        # clamd only honours User when started as root; as root the tests keep root so clamd
        # can read any database/temp directory it is given.
        self.user = user if user is not None else ("root" if _as_root() else None)
        self.socket_path: Path | None = self.workdir / "clamd.sock" if unix_socket else None
        self._port = 0 if unix_socket else free_port()
        self.config_path = self.workdir / "clamd.conf"
        self._logfile = self.workdir / "clamd.log"
        self._tmpdir = self.workdir / "tmp"

    @property
    def address(self) -> str:
        """Address in clamav-milter ``ClamdSocket`` syntax: ``tcp:127.0.0.1:P`` or ``unix:/p``."""
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"tcp:{LOOPBACK}:{self._port}"

    def restart(self) -> Self:
        """Stop, then start again on the same port or socket path."""
        self.stop()
        return self.start()

    def _config_text(self) -> str:
        lines = [
            "Foreground yes",
            f"DatabaseDirectory {self.database_dir}",
            f"LogFile {self._logfile}",
            "LogTime yes",
            "LogFileMaxSize 10M",
            f"TemporaryDirectory {self._tmpdir}",
            f"StreamMaxLength {self.stream_max_length}",
            # Generous limits: mail up to StreamMaxLength is scanned whole, archives included.
            "MaxScanSize 400M",
            "MaxFileSize 200M",
            "MaxRecursion 16",
            "MaxFiles 10000",
            "ScanArchive yes",
            "ScanMail yes",
            "ScanHTML yes",
            "ScanOLE2 yes",
            "ScanPDF yes",
            "ScanPE yes",
            "ScanELF yes",
            "AlertExceedsMax no",
            "SelfCheck 600",
        ]
        if self.user is not None:
            lines.append(f"User {self.user}")
        if self.socket_path is not None:
            lines += [f"LocalSocket {self.socket_path}", "LocalSocketMode 660"]
        else:
            lines += [f"TCPSocket {self._port}", f"TCPAddr {LOOPBACK}"]
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        if not self.database_dir.is_dir():
            raise ServerStartError(f"clamd: database directory {self.database_dir} missing")
        self._tmpdir.mkdir(mode=0o700, exist_ok=True)
        if self.socket_path is not None:
            _check_unix_path(self.socket_path)
            self.socket_path.unlink(missing_ok=True)
        self.config_path.write_text(self._config_text())

    def _command(self) -> list[str]:
        return [_find_program("clamd"), f"--config-file={self.config_path}"]

    def _probe(self) -> bool:
        if self.socket_path is not None:
            if not self.socket_path.exists():
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = str(self.socket_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (LOOPBACK, self._port)
        with sock:
            sock.settimeout(2.0)
            sock.connect(target)
            sock.sendall(b"zPING\0")
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply.rstrip(b"\0") == b"PONG"


# --------------------------------------------------------------------------------------------
# rbldnsd


class DnsQuery(NamedTuple):
    """One query as rbldnsd logged it."""

    name: str
    qtype: str
    rcode: str


# A label no test zone lists, so the readiness query can be told apart in the query log.
_PROBE_LABEL = "filterd-devservers-readiness-probe"


class RbldnsdServer(_ChildServer):
    """A real DNSBL server (rbldnsd) answering on 127.0.0.1 for the given zones.

    ``zones`` are ``(zone name, dataset type, file content)``; repeating a zone name with
    another dataset adds that dataset to the zone. ``ttl`` sets rbldnsd's default TTL (``-t``);
    a ``$TTL n`` line inside a data file overrides it for that dataset. Queries are logged
    unbuffered (``log_queries``) so tests can count them; benches should turn that off.
    """

    name = "rbldnsd"

    def __init__(
        self,
        workdir: Path,
        zones: Sequence[tuple[str, str, str]],
        ttl: int | None = None,
        log_queries: bool = True,
        start_timeout: float = 10.0,
    ) -> None:
        if not zones:
            raise ValueError("rbldnsd needs at least one zone")
        super().__init__(workdir, start_timeout)
        self.zones = [(zone.strip(".").lower(), kind, text) for zone, kind, text in zones]
        self.ttl = ttl
        self.log_queries = log_queries
        self._port = free_port("udp")
        self._zonedir = self.workdir / "zones"
        self._querylog = self.workdir / "queries.log"

    @property
    def port(self) -> int:
        return self._port

    @property
    def nameserver(self) -> str:
        return f"{LOOPBACK}:{self._port}"

    def resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython resolver that asks only this server (never /etc/resolv.conf)."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [LOOPBACK]
        res.port = self._port
        res.lifetime = lifetime
        res.timeout = lifetime
        return res

    def queries(self) -> list[DnsQuery]:
        """Queries received so far, oldest first, without the readiness probe.

        rbldnsd writes a log line per query it answers (REFUSED included; malformed packets
        are not logged), and it writes it before sending the reply, so a client holding an
        answer always finds its query counted.
        """
        if not self.log_queries:
            raise RuntimeError("started with log_queries=False")
        result = []
        try:
            text = self._querylog.read_text(errors="replace")
        except FileNotFoundError:
            return []
        # Format: "<unixtime> <client ip> <qname> <qtype> <qclass>: <RCODE>/<nans>/<size>"
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 6 or _PROBE_LABEL in fields[2]:
                continue
            result.append(DnsQuery(fields[2].lower(), fields[3], fields[5].split("/")[0]))
        return result

    def query_count(self, name: str | None = None) -> int:
        """Number of logged queries, optionally only those for ``name``."""
        qs = self.queries()
        if name is None:
            return len(qs)
        wanted = name.rstrip(".").lower()
        return sum(1 for q in qs if q.name.rstrip(".") == wanted)

    def _prepare(self) -> None:
        make_reachable(self.workdir)
        self._zonedir.mkdir(exist_ok=True)
        self._zonedir.chmod(0o755)
        for index, (zone, kind, text) in enumerate(self.zones):
            path = self._zonedir / f"{index:02d}-{zone}.{kind}"
            path.write_text(text if text.endswith("\n") or not text else text + "\n")
            path.chmod(0o644)
        if self.log_queries:
            # rbldnsd opens the log after dropping to user rbldns; give it the file.
            self._querylog.touch()
            _chown_to(self._querylog, "rbldns")

    def _command(self) -> list[str]:
        cmd = [
            _find_program("rbldnsd"),
            "-n", "-f", "-q",
            "-b", f"{LOOPBACK}/{self._port}",
            "-w", str(self._zonedir),
        ]  # fmt: skip
        if self.ttl is not None:
            cmd += ["-t", str(self.ttl)]
        if self.log_queries:
            cmd += ["-l", f"+{self._querylog}"]
        for index, (zone, kind, _text) in enumerate(self.zones):
            cmd.append(f"{zone}:{kind}:{index:02d}-{zone}.{kind}")
        return cmd

    def _probe(self) -> bool:
        query = dns.message.make_query(f"{_PROBE_LABEL}.{self.zones[0][0]}", "A")
        try:
            reply = dns.query.udp(query, LOOPBACK, port=self._port, timeout=0.05)
        except dns.exception.Timeout:
            return False
        # REFUSED: zone data not (yet) loaded.
        return reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)

    def _fatal_in_log(self, new_log: str) -> str | None:
        for line in new_log.splitlines():
            if "will not be serviced" in line or "unable to open file" in line:
                return line.strip()
        return None

    def _rebind(self) -> bool:
        self._port = free_port("udp")
        return True


class SilentUdpServer(_Stoppable):
    """A UDP port on 127.0.0.1 that receives and never answers: a DNS server that times out.

    A port nobody listens on would answer ICMP port-unreachable, which resolvers treat as an
    immediate failure, not a timeout; this is the timeout case.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._port = 0
        self._received = 0

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("SilentUdpServer not started")
        return self._port

    @property
    def nameserver(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def datagrams_received(self) -> int:
        """Datagrams that arrived so far (reads and discards the socket's queue)."""
        if self._sock is not None:
            while True:
                try:
                    self._sock.recv(65535)
                except (BlockingIOError, InterruptedError):
                    break
                self._received += 1
        return self._received

    def start(self) -> Self:
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((LOOPBACK, 0))
            sock.setblocking(False)
            self._port = int(sock.getsockname()[1])
            self._sock = sock
        return self

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# smtp-sink


@dataclass(frozen=True)
class SinkMessage:
    """One transaction smtp-sink dumped: envelope as received plus the message bytes."""

    path: Path
    client_addr: str
    helo: str | None
    mail_from: str
    recipients: list[str]
    # Header + body as received: LF line ends, dot-unstuffed.
    data: bytes


def _strip_address(args: str) -> str:
    """``<a@b> SIZE=12`` -> ``a@b``: the ESMTP parameters are not part of the address."""
    first = args.split(" ", 1)[0] if not args.startswith("<") else args[: args.find(">") + 1]
    return first.strip().removeprefix("<").removesuffix(">")


def _parse_sink_dump(path: Path, raw: bytes) -> SinkMessage:
    lines = raw.split(b"\n")
    fields: dict[str, list[str]] = {}
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.startswith(b"Received: "):
            # The three-line Received header ends smtp-sink's own headers.
            while index < len(lines) and lines[index][:1] in (b"\t", b" "):
                index += 1
            break
        key, _sep, value = line.decode("utf-8", "replace").partition(": ")
        fields.setdefault(key, []).append(value)
    body = b"\n".join(lines[index:])
    # smtp-sink appends one empty line after the message.
    if body.endswith(b"\n\n"):
        body = body[:-1]
    return SinkMessage(
        path=path,
        client_addr=fields.get("X-Client-Addr", [""])[0],
        helo=fields.get("X-Helo-Args", [None])[0],
        mail_from=_strip_address(fields.get("X-Mail-Args", [""])[0]),
        recipients=[_strip_address(v) for v in fields.get("X-Rcpt-Args", [])],
        data=body,
    )


class SmtpSink(_ChildServer):
    """Postfix's ``smtp-sink`` on 127.0.0.1, dumping every transaction to workdir/dump.

    It is the final hop of the private Postfix: mail that reaches it was accepted and relayed,
    which is what end-to-end tests assert on. It also serves as a fast discard target in benches.
    """

    name = "smtp-sink"

    def __init__(self, workdir: Path, start_timeout: float = 10.0) -> None:
        super().__init__(workdir, start_timeout)
        self._port = free_port()
        self.dump_dir = self.workdir / "dump"

    @property
    def port(self) -> int:
        return self._port

    def deliveries(self) -> list[SinkMessage]:
        """Completed transactions, oldest first."""
        pending = self._open_files()
        entries = []
        for path in self.dump_dir.glob("*"):
            if not path.is_file() or path in pending:
                continue
            try:
                entries.append((path.stat().st_mtime_ns, path.name, path, path.read_bytes()))
            except FileNotFoundError:
                continue  # removed by clear() meanwhile
        entries.sort(key=lambda e: (e[0], e[1]))
        return [_parse_sink_dump(path, raw) for _mtime, _name, path, raw in entries]

    def messages(self) -> list[bytes]:
        """Delivered messages (header + body, LF line ends), oldest first."""
        return [m.data for m in self.deliveries()]

    def delivered_recipients(self) -> list[str]:
        """Envelope recipients of all delivered messages, in delivery order."""
        return [rcpt for m in self.deliveries() for rcpt in m.recipients]

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """Poll until at least ``n`` messages were delivered; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"smtp-sink got {len(found)} message(s), wanted {n}")
            time.sleep(_POLL_S)

    def clear(self) -> None:
        """Forget delivered messages (a sink shared across tests)."""
        pending = self._open_files()
        for path in self.dump_dir.glob("*"):
            if path.is_file() and path not in pending:
                path.unlink(missing_ok=True)

    def _open_files(self) -> set[Path]:
        """Dump files smtp-sink still writes: a transaction in progress."""
        pid = self.pid
        if pid is None:
            return set()
        found = set()
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            return set()
        for fd in fds:
            with contextlib.suppress(OSError):
                target = Path(os.readlink(fd))
                if target.parent == self.dump_dir:
                    found.add(target)
        return found

    def _prepare(self) -> None:
        make_reachable(self.workdir)
        self.dump_dir.mkdir(exist_ok=True)
        # smtp-sink writes dumps after switching to user postfix.
        _chown_to(self.dump_dir, "postfix")

    def _command(self) -> list[str]:
        cmd = [_find_program("smtp-sink")]
        if _as_root():
            cmd += ["-u", "postfix"]  # smtp-sink refuses to run as root without it
        # %Y%m%d%H%M%S. gets a random hex suffix appended by smtp-sink.
        cmd += ["-h", "sink.filterd.test", "-d", f"{self.dump_dir}/%Y%m%d%H%M%S."]
        cmd += [f"{LOOPBACK}:{self._port}", "256"]
        return cmd

    def _probe(self) -> bool:
        with socket.create_connection((LOOPBACK, self._port), timeout=1.0) as sock:
            banner = _read_line(sock)
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return banner.startswith(b"220")

    def _rebind(self) -> bool:
        self._port = free_port()
        return True


# --------------------------------------------------------------------------------------------
# Postfix


_POSTFIX_SERVICES = """\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixServer(_Stoppable):
    """A private Postfix instance (``postfix -c CONFDIR``) on 127.0.0.1, relaying to a sink.

    Everything it needs lives in workdir (conf/, queue/, data/, maillog), so any number of
    instances run side by side, and none touches /etc/postfix or /var/spool/postfix. Its
    master.cf has only the services a relay needs, none chrooted (a chroot would need copies
    of /etc files inside each queue directory).

    Loopback clients may relay anywhere (permit_mynetworks); a client presented with XCLIENT
    is no longer in mynetworks, so it may only send to ``relay_domains`` (example.org,
    example.net, example.com) — which is also how a test sees that XCLIENT took effect.
    """

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        milter: str | None = None,
        milter_default_action: str = "tempfail",
        extra_main_cf: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.confdir = self.workdir / "conf"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.maillog_path = self.workdir / "maillog"
        self._output = self.workdir / "postfix.out"
        self.sink_port = sink_port
        self.start_timeout = start_timeout
        #: The sink this instance relays to, when the creator wants to keep it at hand.
        self.sink: SmtpSink | None = None
        #: Seconds from ``postfix start`` to the first 220 banner of the last start.
        self.start_seconds: float | None = None
        self._port = free_port()
        self._master_pid: int | None = None
        self._started_once = False
        self._lost_bind_race = False
        self._main_cf = self._default_main_cf(milter, milter_default_action)
        self._main_cf.update(extra_main_cf or {})

    # -- configuration ----------------------------------------------------------------------
    def _default_main_cf(self, milter: str | None, default_action: str) -> dict[str, str]:
        sink = f"smtp:[{LOOPBACK}]:{self.sink_port}"
        cfg = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # No syslog here: without maillog_file (and a prefix allowing it) `postfix start`
            # fails silently, its fatal error going to a syslog socket that does not exist.
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.workdir),
            "myhostname": "mx.filterd.test",
            "mydomain": "filterd.test",
            "myorigin": "$myhostname",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "example.org example.net example.com",
            "relay_recipient_maps": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "default_transport": sink,
            "relay_transport": sink,
            # Never ask the system resolver: it points off the machine.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_banner": "$myhostname ESMTP",
            "biff": "no",
            "append_dot_mydomain": "no",
            "message_size_limit": str(50 * 1024 * 1024),
            # Short queue times: a test that stops the sink sees mail retried within seconds.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "maximal_queue_lifetime": "10m",
            "bounce_queue_lifetime": "10m",
            "smtp_connect_timeout": "5s",
            "milter_protocol": "6",
            "milter_default_action": default_action,
            "milter_connect_timeout": "5s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "30s",
        }
        if milter is not None:
            cfg["smtpd_milters"] = milter
        return cfg

    @property
    def main_cf(self) -> dict[str, str]:
        """The main.cf settings this instance runs with (a copy)."""
        return dict(self._main_cf)

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def running(self) -> bool:
        pid = self._master_pid
        return pid is not None and _pid_alive(pid)

    @property
    def master_pid(self) -> int | None:
        return self._master_pid

    def _write_config(self) -> None:
        for path in (self.workdir, self.confdir):
            make_reachable(path)
        self.queue_dir.mkdir(exist_ok=True)
        self.queue_dir.chmod(0o755)
        self.data_dir.mkdir(exist_ok=True)
        _chown_to(self.data_dir, "postfix")
        main = "".join(f"{key} = {value}\n" for key, value in self._main_cf.items())
        (self.confdir / "main.cf").write_text(main)
        smtpd = f"{LOOPBACK}:{self._port} inet n - n - - smtpd\n"
        (self.confdir / "master.cf").write_text(smtpd + _POSTFIX_SERVICES)
        self._age_config()

    def _age_config(self) -> None:
        """Backdate main.cf/master.cf so Postfix does not wait for them to "settle".

        Every Postfix program re-reads a main.cf younger than ~2 s in 0.3 s steps until it is
        old enough (measured: a fresh instance took 2.5 s to start, 0.4 s with this).
        """
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.confdir / name, (past, past))

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c CONFDIR ARGS``, its messages collected in ``stderr``.

        Postfix commands log to stderr only when it is a terminal; otherwise a config error
        goes to syslog, which does not exist here, and ``postfix start`` fails silently. So
        stderr is a pseudo-terminal.
        """
        cmd = [_find_program("postfix"), "-c", str(self.confdir), *args]
        primary, secondary = pty.openpty()
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=secondary,
                env=_CHILD_ENV,
                timeout=timeout,
                check=False,
            )
            os.close(secondary)
            secondary = -1
            messages = b""
            while select.select([primary], [], [], 0)[0]:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: no writer left
                    break
                if not chunk:
                    break
                messages += chunk
        finally:
            if secondary >= 0:
                os.close(secondary)
            os.close(primary)
        return subprocess.CompletedProcess(
            cmd,
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            messages.decode("utf-8", "replace").replace("\r\n", "\n"),
        )

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # -- logs -------------------------------------------------------------------------------
    def maillog(self) -> str:
        """Everything Postfix logged so far."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_maillog(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Poll the maillog until ``pattern`` (a regex) appears; TimeoutError otherwise."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.maillog())
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{pattern!r} not in maillog after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.maillog_path, self._output):
            text = _tail(path, lines)
            if text:
                parts.append(f"--- {path}\n{text}")
        return "\n".join(parts) or "(no log output)"

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Self:
        if self.running:
            return self
        for attempt in range(1, 4):
            try:
                self._start_once()
                return self
            except ServerStartError:
                # master logs "bind 127.0.0.1 port N: Address already in use" when it lost a
                # race for the port; retry on another unless the address was published.
                if attempt == 3 or self._started_once or not self._lost_bind_race:
                    raise
                self._port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._lost_bind_race = False
        maillog_offset = _size(self.maillog_path)
        t0 = time.monotonic()
        proc = self._postfix("start")
        with open(self._output, "a") as out:
            out.write(proc.stdout + proc.stderr)
        new_log = _read_from(self.maillog_path, maillog_offset) + proc.stdout + proc.stderr
        self._lost_bind_race = f"port {self._port}: Address already in use" in new_log
        pid = self._read_master_pid()
        if proc.returncode != 0 or pid is None or not _pid_alive(pid):
            # "postfix start" can fail after master wrote its pid (bind error): clean up.
            self._master_pid = pid
            self.stop()
            raise ServerStartError(
                f"postfix -c {self.confdir} start failed (status {proc.returncode})\n"
                f"{self.log_tail()}"
            )
        self._master_pid = pid
        _track(self)
        deadline = t0 + self.start_timeout
        while True:
            try:
                with socket.create_connection((LOOPBACK, self._port), timeout=2.0) as sock:
                    banner = _read_line(sock)
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
                    if banner.startswith(b"220"):
                        break
            except OSError:
                pass
            if not _pid_alive(pid) or time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"postfix on {LOOPBACK}:{self._port}: no 220 banner within "
                    f"{self.start_timeout:g}s\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)
        self.start_seconds = time.monotonic() - t0
        self._started_once = True

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop this instance's master (and with it its children), by PID if need be.

        ``postfix stop`` first, as it is the orderly way; if it fails (config removed,
        broken main.cf) the master is sent SIGTERM by PID, and SIGKILL after ``grace_s``.
        """
        pid = self._master_pid or self._read_master_pid()
        self._master_pid = None
        _untrack(self)
        if pid is None or not _pid_alive(pid):
            return
        try:
            orderly = self._postfix("stop", timeout=grace_s).returncode == 0
        except (subprocess.TimeoutExpired, OSError, ServerStartError):
            orderly = False
        if not orderly and self._is_our_master(pid):
            # master forwards SIGTERM to its children before it exits.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if _pid_alive(pid) and self._is_our_master(pid):
            # master leads its own session; its group is this instance's processes.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid) and time.monotonic() < deadline + grace_s:
                time.sleep(_POLL_S)

    def _is_our_master(self, pid: int) -> bool:
        """Guard against PID reuse before a SIGKILL."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"master" in cmdline

    def reconfigure(self, **main_cf: str | None) -> None:
        """Change main.cf settings (None removes one) and reload a running instance.

        Returns once the master has logged the reload, so the next connection is served by a
        smtpd with the new settings.
        """
        for key, value in main_cf.items():
            if value is None:
                self._main_cf.pop(key, None)
            else:
                self._main_cf[key] = value
        if not self.running:
            return
        postconf = _find_program("postconf")
        edits = [f"{k}={v}" for k, v in main_cf.items() if v is not None]
        removals = [k for k, v in main_cf.items() if v is None]
        for args in (["-e", *edits] if edits else None, ["-X", *removals] if removals else None):
            if args is None:
                continue
            proc = subprocess.run(
                [postconf, "-c", str(self.confdir), *args],
                capture_output=True, text=True, env=_CHILD_ENV, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"postconf {' '.join(args)} failed: {proc.stderr.strip()}")
        self._age_config()
        reloads = len(re.findall(r"master\[\d+\]: reload", self.maillog()))
        proc = self._postfix("reload")
        if proc.returncode != 0:
            raise RuntimeError(f"postfix reload failed: {proc.stdout}{proc.stderr}")
        deadline = time.monotonic() + 10.0
        while len(re.findall(r"master\[\d+\]: reload", self.maillog())) <= reloads:
            if time.monotonic() > deadline:
                raise TimeoutError(f"postfix did not log its reload\n{self.log_tail()}")
            time.sleep(_POLL_S)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# SMTP client for end-to-end tests


class SmtpReply(NamedTuple):
    code: int
    text: str


@dataclass
class SmtpResult:
    """Every reply of one SMTP session, so a test asserts on codes instead of catching errors.

    ``data`` is the reply to the end of the message (or to DATA itself when it was refused);
    None when DATA was never sent (no recipient accepted, or the session ended earlier).
    """

    banner: SmtpReply
    ehlo: SmtpReply | None = None
    xclient: SmtpReply | None = None
    mail: SmtpReply | None = None
    rcpts: dict[str, SmtpReply] = field(default_factory=dict)
    data: SmtpReply | None = None
    #: The server closed the connection before QUIT (e.g. after a 421).
    disconnected: bool = False

    @property
    def accepted(self) -> bool:
        """The message was taken for delivery (2xx after the final dot)."""
        return self.data is not None and 200 <= self.data.code < 300

    @property
    def accepted_recipients(self) -> list[str]:
        return [rcpt for rcpt, reply in self.rcpts.items() if 200 <= reply.code < 300]

    @property
    def queue_id(self) -> str | None:
        """Postfix's queue id from "250 2.0.0 Ok: queued as ID", if any."""
        if self.data is None:
            return None
        match = re.search(r"queued as (\S+)", self.data.text)
        return match.group(1) if match else None


def _reply(code: int, text: bytes | str) -> SmtpReply:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return SmtpReply(code, text)


def _to_crlf(data: bytes) -> bytes:
    """Bare LF -> CRLF, as any MUA would send; CR without LF is left alone."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def send_mail(
    port: int,
    mail_from: str,
    rcpts: Iterable[str],
    data: bytes,
    xclient: Mapping[str, str] | None = None,
    helo: str = "client.example.net",
    host: str = LOOPBACK,
    timeout: float = 30.0,
) -> SmtpResult:
    """Run one SMTP session and record every reply; 4xx/5xx are returned, never raised.

    ``xclient`` (e.g. ``{"ADDR": "192.0.2.10", "NAME": "mail.example.net"}``) makes Postfix
    treat the session as coming from that client; Postfix answers XCLIENT with a new 220 and
    the session says EHLO again, as a real client would after a new greeting. Bare LF in
    ``data`` is sent as CRLF.
    """
    _require_loopback(host)
    # local_hostname is given so smtplib never calls getfqdn() (a DNS lookup).
    smtp = smtplib.SMTP(local_hostname=helo, timeout=timeout)
    result: SmtpResult | None = None
    try:
        code, msg = smtp.connect(host, port)
        result = SmtpResult(banner=_reply(code, msg))
        if code == 220:
            _converse(smtp, result, mail_from, list(rcpts), data, xclient, helo)
    except smtplib.SMTPServerDisconnected:
        if result is None:
            raise
        result.disconnected = True
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()
    return result


def _converse(
    smtp: smtplib.SMTP,
    result: SmtpResult,
    mail_from: str,
    rcpts: list[str],
    data: bytes,
    xclient: Mapping[str, str] | None,
    helo: str,
) -> None:
    """The session after the banner; returns at the first reply that ends it."""
    code, msg = smtp.ehlo(helo)
    result.ehlo = _reply(code, msg)
    if code != 250:
        return
    if xclient:
        attrs = " ".join(f"{key.upper()}={value}" for key, value in xclient.items())
        code, msg = smtp.docmd("XCLIENT", attrs)
        result.xclient = _reply(code, msg)
        if code != 220:
            return
        # A new greeting means a new session: forget the old EHLO features.
        smtp.ehlo_resp = None
        smtp.esmtp_features = {}
        code, msg = smtp.ehlo(helo)
        result.ehlo = _reply(code, msg)
        if code != 250:
            return
    code, msg = smtp.mail(mail_from)
    result.mail = _reply(code, msg)
    if code >= 300:
        return
    for rcpt in rcpts:
        code, msg = smtp.rcpt(rcpt)
        result.rcpts[rcpt] = _reply(code, msg)
    if not result.accepted_recipients:
        return
    try:
        code, msg = smtp.data(_to_crlf(data))
        result.data = _reply(code, msg)
    except smtplib.SMTPDataError as exc:  # DATA itself refused
        result.data = _reply(exc.smtp_code, exc.smtp_error)


# --------------------------------------------------------------------------------------------
# filterd configuration files for the daemons these servers surround


def toml_value(value: Any) -> str:
    """A TOML value; dicts become inline tables, so lists of tables work too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A filterd config file with these sections; keys not given keep their defaults."""
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path
