"""A private Postfix instance on loopback for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from filterd.services.launcher import (
    _CHILD_ENV,
    _POLL_S,
    LOOPBACK,
    ServerStartError,
    _chown_to,
    _find_program,
    _pid_alive,
    _read_from,
    _read_line,
    _size,
    _Stoppable,
    _tail,
    _track,
    _untrack,
    free_port,
    make_reachable,
)
from tests.servers.smtp import SmtpSink

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
