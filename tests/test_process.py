"""The process model through a real Postfix: pre-forked workers, drain, replacement, reload.

Every test runs the real daemon (`python -m filterd serve`) with clamd behind it and a
private Postfix in front (milter_default_action = reject, so a 250 proves a worker judged
the message and a 5xx that is not ours shows up as Postfix's own text).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers_daemon import DaemonProcess, write_config
from tests.servers import (
    ClamdServer,
    PostfixServer,
    SmtpSink,
    make_reachable,
    send_mail,
)

pytestmark = pytest.mark.e2e

FROM = "alice@example.net"
TO = "bob@example.org"
VIRUS_BODY = b"FILTERD-HARMLESS-" + b"TEST-VIRUS-7f3a9c"


def plain(body: str = "Just a note about lunch tomorrow.\n") -> bytes:
    return (
        f"From: <{FROM}>\nTo: <{TO}>\nSubject: hello\nMessage-ID: <p-1@example.net>\n"
        f"MIME-Version: 1.0\nContent-Type: text/plain\n\n{body}"
    ).encode()


def config(base: Path, clamd: ClamdServer, **extra: dict[str, object]) -> Path:
    sections: dict[str, dict[str, object]] = {
        "daemon": {"state_dir": str(base / "st")},
        "pipeline": {"recipient_checks": [], "message_checks": ["antivirus", "attachments"]},
        "clamav": {"address": clamd.address, "timeout": 5.0},
        "milter": {"workers": 2, "drain_seconds": 30},
        "records": {"enabled": False},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return write_config(base / "filterd.toml", sections)


def worker_pids(daemon: DaemonProcess) -> list[int]:
    """Children of the supervisor named filterd-worker (what `filterd status` counts)."""
    assert daemon.proc is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == daemon.proc.pid and comm == "filterd-worker" and state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def stack(
    tmp_path: Path, clamd_server: ClamdServer
) -> Iterator[tuple[Path, DaemonProcess, PostfixServer, SmtpSink]]:
    base = make_reachable(tmp_path)
    cfg = config(base, clamd_server)
    with (
        DaemonProcess(base / "d", cfg) as daemon,
        SmtpSink(base / "sink") as sink,
        PostfixServer(
            base / "pf", sink.port, milter=daemon.milter_for_postfix, milter_default_action="reject"
        ) as postfix,
    ):
        yield base, daemon, postfix, sink


class HeldMessage:
    """An SMTP session over a raw socket, stopped between DATA and the final dot."""

    def __init__(self, port: int, body: bytes, after_ehlo: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.expect(220)
        self.body = body
        self.send(b"EHLO client.example.net", 250)
        self.started = not after_ehlo
        if self.started:
            self.start_message()

    def send(self, line: bytes, code: int) -> None:
        self.sock.sendall(line + b"\r\n")
        self.expect(code)

    def start_message(self) -> None:
        self.send(f"MAIL FROM:<{FROM}>".encode(), 250)
        self.send(f"RCPT TO:<{TO}>".encode(), 250)
        self.send(b"DATA", 354)
        lines = self.body.replace(b"\r\n", b"\n").split(b"\n")
        half = len(lines) // 2
        self.rest = b"\r\n".join(lines[half:]) + b"\r\n.\r\n"
        self.sock.sendall(b"\r\n".join(lines[:half]) + b"\r\n")
        self.started = True

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) SMTP reply."""
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[i + 1 :])
                    return int(line[:3]), line[4:].decode(errors="replace")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed; got {self.buf!r}")
            self.buf += chunk

    def expect(self, code: int) -> None:
        got = self.reply()
        assert got[0] == code, got

    def finish(self) -> tuple[int, str]:
        if not self.started:
            self.start_message()
        self.sock.sendall(self.rest)
        result = self.reply()
        self.sock.sendall(b"QUIT\r\n")
        self.sock.close()
        return result


@pytest.mark.parametrize("kind", ["clean", "virus"])
def test_sigterm_mid_data_gets_the_real_verdict_and_exits_fast(stack, kind: str) -> None:
    _base, daemon, postfix, sink = stack
    body = plain() if kind == "clean" else plain(body=VIRUS_BODY.decode() + "\n")
    # Every worker has a message between DATA and its final dot.
    held = [HeldMessage(postfix.port, body) for _ in range(3)]
    wait_for(lambda: daemon.log().count('"msg": "worker serving"') >= 2, 10, "workers")
    assert daemon.proc is not None
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "refusing new connections" in daemon.log(), 5, "the drain to start")
    time.sleep(0.5)  # the held sessions sit in DATA while the daemon drains
    results = [h.finish() for h in held]
    for code, text in results:
        if kind == "clean":
            assert code == 250, (code, text)
        else:
            assert code == 554 and "Filterd.Test.Virus" in text, (code, text)
    daemon.proc.wait(timeout=10)
    elapsed = time.monotonic() - t0
    assert daemon.proc.returncode == 0
    assert elapsed < 5, f"daemon took {elapsed:.1f}s to exit after its messages were done"
    assert not daemon.socket_path.exists(), "socket left behind"
    assert not [p for p in daemon.socket_path.parent.iterdir() if p.name.startswith(".milter")]
    if kind == "clean":
        assert len(sink.wait_for_messages(3, timeout=15)) == 3


def test_sigterm_while_a_session_waits_before_mail(stack) -> None:
    """A session accepted before the drain but not yet at MAIL still gets its verdict."""
    _base, daemon, postfix, sink = stack
    early = HeldMessage(postfix.port, plain(), after_ehlo=True)
    held = HeldMessage(postfix.port, plain())
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "refusing new connections" in daemon.log(), 5, "the drain to start")
    time.sleep(0.3)
    assert early.finish()[0] == 250
    assert held.finish()[0] == 250
    assert daemon.proc is not None
    daemon.proc.wait(timeout=5)
    assert len(sink.wait_for_messages(2, timeout=15)) == 2


def test_sigterm_mid_data_over_tcp(tmp_path: Path, clamd_server: ClamdServer) -> None:
    """The drain on the inet socket: the held message gets its 250, the daemon exits."""
    from tests.servers import free_port

    base = make_reachable(tmp_path)
    with (
        DaemonProcess(base / "d", config(base, clamd_server), tcp_port=free_port()) as daemon,
        SmtpSink(base / "sink") as sink,
        PostfixServer(
            base / "pf", sink.port, milter=daemon.milter_for_postfix, milter_default_action="reject"
        ) as postfix,
    ):
        held = [HeldMessage(postfix.port, plain()) for _ in range(2)]
        daemon.signal(signal.SIGTERM)
        wait_for(lambda: "refusing new connections" in daemon.log(), 5, "the drain to start")
        t0 = time.monotonic()
        late = send_mail(postfix.port, FROM, [TO], plain())
        # Refused at once (Postfix's default action), not served and not left waiting.
        assert not late.accepted and time.monotonic() - t0 < 2
        assert [h.finish()[0] for h in held] == [250, 250]
        assert daemon.proc is not None
        daemon.proc.wait(timeout=5)
        assert daemon.proc.returncode == 0


def test_new_connections_are_refused_during_the_drain(stack) -> None:
    _base, daemon, postfix, _sink = stack
    held = HeldMessage(postfix.port, plain())
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "refusing new connections" in daemon.log(), 5, "the drain to start")
    t0 = time.monotonic()
    late = send_mail(postfix.port, FROM, [TO], plain())
    assert time.monotonic() - t0 < 2
    # Postfix could not reach a milter: its default action (reject) at once, not a hang.
    replies = [late.banner, late.ehlo, late.mail, *late.rcpts.values(), late.data]
    refused = [r for r in replies if r is not None and r.code >= 400]
    assert refused and not late.accepted, late
    assert held.finish()[0] == 250


# Postfix's milter_default_action = reject: 554 when the milter fails at connect, else 550.
DEFAULT_ACTION = (550, 554)


def test_sigkill_of_a_worker_under_traffic_loses_nothing(stack) -> None:
    _base, daemon, postfix, _sink = stack
    before = worker_pids(daemon)
    assert len(before) == 2
    codes: list[int] = []
    queued: list[str] = []
    odd: list[object] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            r = send_mail(postfix.port, FROM, [TO], plain())
            replies = [r.banner, r.mail, *r.rcpts.values(), r.data]
            failed = [x.code for x in replies if x is not None and x.code >= 400]
            codes.append(failed[0] if failed else (r.data.code if r.data else 0))
            if r.accepted:
                queued.append(r.queue_id or f"no queue id in {r.data}")
            elif codes[-1] not in DEFAULT_ACTION:
                odd.append(r)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(codes) >= 5, 20, "traffic")
        os.kill(before[0], signal.SIGKILL)
        wait_for(
            lambda: len(worker_pids(daemon)) == 2 and before[0] not in worker_pids(daemon),
            10,
            "a replacement worker",
        )
        replaced = worker_pids(daemon)
        assert before[1] in replaced
        n = len(codes)
        wait_for(lambda: len(codes) >= n + 10, 30, "traffic after the replacement")
    finally:
        stop.set()
        for t in threads:
            t.join()
    # Every message was answered: a 250 (judged by a worker: milter_default_action is
    # reject) or, for the sessions the killed worker held, Postfix's default action
    # wherever the session was: 554 in the banner when the worker died at the milter
    # connect, 550 at RCPT or at the end of the message.
    defaulted = sum(codes.count(c) for c in DEFAULT_ACTION)
    assert len(codes) == len(queued) + defaulted, sorted(set(codes)) + odd
    assert defaulted <= 3, codes
    # Nothing accepted was lost: Postfix delivered every queue id it answered 250 for.
    wait_for(
        lambda: all(f"{q}: to=<{TO}>" in postfix.maillog() for q in queued),
        30,
        "every accepted message to be delivered",
    )
    sent = [line for line in postfix.maillog().splitlines() if "status=sent" in line]
    assert {q for q in queued} <= {line.split()[5].rstrip(":") for line in sent}
    assert send_mail(postfix.port, FROM, [TO], plain()).accepted
    assert daemon.socket_path.exists()


EXE_MAIL = (
    f"From: <{FROM}>\nTo: <{TO}>\nSubject: f\nMIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nhi\n'
    '--b\nContent-Type: application/octet-stream; name="a.exe"\n'
    'Content-Disposition: attachment; filename="a.exe"\nContent-Transfer-Encoding: base64\n\n'
    "TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n--b--\n"
).encode()


def _lines(daemon: DaemonProcess, text: str, since: int = 0) -> list[str]:
    return [line for line in daemon.log()[since:].splitlines() if text in line]


def _pid_of(line: str) -> int:
    return int(line.split('"pid": ', 1)[1].split(",", 1)[0].split("}", 1)[0])


def test_one_worker_reports_the_self_tests_and_its_replacement_takes_over(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    """N workers build the same checks: their self-test warnings are logged once, not N
    times, and a killed reporting worker's replacement reports in its place."""
    from tests.servers import free_port, zen_dnsbl

    base = make_reachable(tmp_path)
    dead_dns = f"127.0.0.1:{free_port('udp')}"  # nothing listens: every test query fails
    cfg = config(
        base, clamd_server, pipeline={"recipient_checks": ["dnsbl"]}, dnsbl=zen_dnsbl(dead_dns)
    )
    with DaemonProcess(base / "d", cfg) as daemon:
        wait_for(lambda: len(_lines(daemon, "worker serving")) == 2, 10, "two workers")
        reported = {_pid_of(x) for x in _lines(daemon, "check self-test: dnsbl list ZEN")}
        assert len(reported) == 1 and reported <= set(worker_pids(daemon)), reported
        (reporter,) = reported
        mark = len(daemon.log())
        os.kill(reporter, signal.SIGKILL)
        wait_for(
            lambda: bool(_lines(daemon, "check self-test: dnsbl list ZEN", mark)),
            10,
            "the replacement's self-test",
        )
        wait_for(lambda: len(worker_pids(daemon)) == 2, 10, "a replacement worker")
        again = {_pid_of(x) for x in _lines(daemon, "check self-test: dnsbl list ZEN", mark)}
        assert len(again) == 1 and reporter not in again and again <= set(worker_pids(daemon))


def test_sighup_reaches_every_worker_under_traffic(stack, clamd_server: ClamdServer) -> None:
    base, daemon, postfix, _sink = stack
    pids = worker_pids(daemon)
    assert len(pids) == 2
    codes: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            r = send_mail(postfix.port, FROM, [TO], plain())
            codes.append(r.data.code if r.data else 0)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        # Attachments on: refused. Then a configuration without that check is reloaded.
        assert send_mail(postfix.port, FROM, [TO], EXE_MAIL).data.code == 554  # type: ignore[union-attr]
        config(base, clamd_server, pipeline={"message_checks": ["antivirus"]})
        mark = len(daemon.log())
        daemon.signal(signal.SIGHUP)
        wait_for(
            lambda: (
                {_pid_of(x) for x in _lines(daemon, "configuration reloaded", mark)} == set(pids)
            ),
            15,
            "every worker to reload",
        )
    finally:
        stop.set()
        thread.join()
    assert codes and set(codes) == {250}, codes  # nothing deferred by the reload
    # Each worker answers with the new rules: sessions land on both workers, all pass.
    mark = len(daemon.log())
    for _ in range(16):
        r = send_mail(postfix.port, FROM, [TO], EXE_MAIL)
        assert r.data is not None and r.data.code == 250, r
    judged_by = {_pid_of(x) for x in _lines(daemon, "message judged", mark)}
    assert judged_by == set(pids), judged_by
    assert worker_pids(daemon) == pids  # reloaded in place, not restarted


def test_model_promote_reaches_every_worker(tmp_path: Path) -> None:
    import random

    from filterd.classify import registry
    from tests.test_classify import _msg
    from tests.test_e2e_classifier import shipped_and_tiny

    base = make_reachable(tmp_path)
    models = shipped_and_tiny(base)
    cfg = write_config(
        base / "filterd.toml",
        {
            "pipeline": {"recipient_checks": [], "message_checks": ["classifier"]},
            "classifier": {
                "models_dir": str(models),
                "reload_check_seconds": 0.2,
                "reject_threshold": 0.5,
                "tag_threshold": 0.4,
            },
            "milter": {"workers": 2},
            "records": {"enabled": False},
            "daemon": {"state_dir": str(base / "state")},
        },
    )
    spam = _msg(1001, True, random.Random(7))
    with (
        SmtpSink(base / "sink") as sink,
        DaemonProcess(base / "d", cfg) as daemon,
        PostfixServer(
            base / "pf", sink.port, milter=daemon.milter_for_postfix, milter_default_action="reject"
        ) as postfix,
    ):
        pids = worker_pids(daemon)
        # The supervisor preloaded the model (numpy, scoring) and still has one thread.
        assert daemon.proc is not None
        assert "Threads:\t1\n" in Path(f"/proc/{daemon.proc.pid}/status").read_text()
        registry.promote(models, "tiny")
        # Each worker watches ACTIVE itself (per message, at most every 0.2 s).
        deadline = time.monotonic() + 20
        loaded: set[int] = set()
        while loaded != set(pids):
            assert time.monotonic() < deadline, f"promotion reached only {loaded} of {pids}"
            send_mail(postfix.port, "a@example.net", ["b@example.org"], spam)
            loaded = {_pid_of(x) for x in _lines(daemon, "'tiny' loaded")}
            time.sleep(0.1)
        mark = len(daemon.log())
        for _ in range(12):
            r = send_mail(postfix.port, "a@example.net", ["b@example.org"], spam)
            assert r.data is not None and r.data.code == 550, r
        judged_by = {_pid_of(x) for x in _lines(daemon, "message judged", mark)}
        assert judged_by == set(pids), judged_by


NOBODY = "nobody"


def unprivileged_interpreter() -> tuple[list[str], dict[str, str]]:
    """A Python the unprivileged user can run, with this virtualenv's packages.

    This interpreter if its standard library is readable by that user; else (a pyenv
    under /root, 0700) the system's /usr/bin/python3 with the virtualenv on PYTHONPATH,
    which is how a Debian install runs anyway.
    """
    import sysconfig

    probe = ["setpriv", "--reuid", NOBODY, "--regid", "nogroup", "--clear-groups"]
    check = "import pty, email.mime.text, numpy, Milter"
    site = sysconfig.get_paths()["purelib"]
    if subprocess.run([*probe, sys.executable, "-c", check], capture_output=True).returncode == 0:
        return [sys.executable], {}
    env = {"PYTHONPATH": site}
    system = "/usr/bin/python3"
    done = subprocess.run(
        [*probe, "env", f"PYTHONPATH={site}", system, "-c", check], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"no interpreter the user {NOBODY} can run: {done.stderr[-300:]!r}")
    return [system], env


class AsUser(DaemonProcess):
    """The daemon started with a given interpreter, optionally under setpriv."""

    def __init__(self, *args: object, python: list[str], prefix: list[str], **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.python = python
        self.prefix = prefix

    def command(self) -> list[str]:
        return [*self.prefix, *self.python, "-m", "filterd", "serve", "--config", str(self.config)]


def test_started_as_root_it_serves_as_the_unprivileged_user(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    import grp
    import pwd
    import stat

    if os.geteuid() != 0:
        pytest.skip("needs root")
    base = make_reachable(tmp_path)
    run = base / "run"  # does not exist yet: the daemon creates it for its user
    pidfile = run / "filterd.pid"
    cfg = config(base, clamd_server, daemon={"user": NOBODY, "pidfile": str(pidfile)})
    nobody = pwd.getpwnam(NOBODY)
    python, env = unprivileged_interpreter()
    env["FILTERD_MILTER_SOCKET"] = f"unix:{run}/m.sock"
    daemon = AsUser(base / "d", cfg, env=env, python=python, prefix=[])
    daemon.socket_path = run / "m.sock"
    with (
        daemon,
        SmtpSink(base / "sink") as sink,
        PostfixServer(
            base / "pf", sink.port, milter=f"unix:{run}/m.sock", milter_default_action="reject"
        ) as postfix,
    ):
        assert daemon.proc is not None
        assert int(pidfile.read_text()) == daemon.proc.pid
        pids = worker_pids(daemon)
        assert len(pids) == 2
        for pid in [daemon.proc.pid, *pids]:
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1:]
            gids = next(x for x in status.splitlines() if x.startswith("Gid:")).split()[1:]
            assert set(uids) == {str(nobody.pw_uid)}, (pid, uids)
            assert set(gids) == {str(nobody.pw_gid)}, (pid, gids)
        # The private Redis runs as that user too, with its files private.
        st = base / "st"
        assert st.stat().st_uid == nobody.pw_uid
        for path in [st / "redis", *(st / "redis").rglob("*")]:
            info = path.lstat()
            assert info.st_uid == nobody.pw_uid, path
            if not stat.S_ISSOCK(info.st_mode):
                assert info.st_mode & 0o077 == 0, (path, oct(info.st_mode))
        # Socket: 0660, Postfix's group; Postfix reaches it (a 250 through a worker).
        info = (run / "m.sock").stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == grp.getgrnam("postfix").gr_gid
        r = send_mail(postfix.port, FROM, [TO], plain())
        assert r.accepted, r
        virus = send_mail(postfix.port, FROM, [TO], plain(body=VIRUS_BODY.decode() + "\n"))
        assert virus.data is not None and virus.data.code == 554
    assert not pidfile.exists(), "pid file left behind"
    assert not (run / "m.sock").exists(), "socket left behind"
    assert not [p for p in run.iterdir() if "sock" in p.name], list(run.iterdir())


def test_socket_survives_a_worker_exit_when_not_root(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    """libmilter unlinks its socket path when a non-root process stops serving."""
    import pwd

    base = make_reachable(tmp_path)
    nobody = pwd.getpwnam(NOBODY)
    home = base / "own"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    # Not root at all: the socket cannot get Postfix's group, so it is left open to all.
    cfg = config(
        base,
        clamd_server,
        daemon={"state_dir": str(home / "st")},
        milter={"socket_mode": "0666"},
    )

    python, env = unprivileged_interpreter()
    setpriv = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    daemon = AsUser(home / "d", cfg, env=env, python=python, prefix=setpriv)
    (home / "d").mkdir()
    os.chown(home / "d", nobody.pw_uid, nobody.pw_gid)
    with (
        daemon,
        SmtpSink(base / "sink") as sink,
        PostfixServer(
            base / "pf", sink.port, milter=daemon.milter_for_postfix, milter_default_action="reject"
        ) as postfix,
    ):
        assert send_mail(postfix.port, FROM, [TO], plain()).accepted
        first = worker_pids(daemon)
        os.kill(first[0], signal.SIGTERM)  # a worker that stops on its own
        wait_for(
            lambda: len(worker_pids(daemon)) == 2 and first[0] not in worker_pids(daemon),
            10,
            "a replacement worker",
        )
        assert daemon.socket_path.exists()
        for _ in range(6):
            assert send_mail(postfix.port, FROM, [TO], plain()).accepted
    assert not daemon.socket_path.exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILTERD_")}
    return subprocess.run(
        [sys.executable, "-m", "filterd", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_status_reload_and_pidfile_through_the_cli(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    import grp
    import json

    base = make_reachable(tmp_path)
    cfg = config(base, clamd_server)
    pidfile = base / "st" / "filterd.pid"  # the default: state_dir/filterd.pid
    with DaemonProcess(base / "d", cfg) as daemon:
        assert daemon.proc is not None
        assert int(pidfile.read_text()) == daemon.proc.pid
        done = _cli("status", "--json", "--config", str(cfg))
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["running"] and info["pid"] == daemon.proc.pid
        assert info["workers"] == 2 and info["worker_pids"] == worker_pids(daemon)
        assert 0 <= info["uptime_seconds"] < 120
        # Started as root without a filterd user: still no file of the private Redis
        # (addresses, IPs) is readable by others, and the socket is Postfix's group only.
        redis_dir = base / "st" / "redis"
        wait_for(lambda: any(redis_dir.rglob("*.aof")), 10, "the AOF")
        for path in [redis_dir, *redis_dir.rglob("*")]:
            assert path.lstat().st_mode & 0o077 == 0 or path.is_socket(), path
        sock = daemon.socket_path.stat()
        assert sock.st_mode & 0o777 == 0o660
        assert sock.st_gid == grp.getgrnam("postfix").gr_gid
        # The supervisor forks: it must have no thread of its own (numpy's BLAS pool included).
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
        assert "Threads:\t1\n" in status
        text = _cli("status", "--config", str(cfg)).stdout
        assert f"pid {daemon.proc.pid}, 2 workers alive" in text

        mark = len(daemon.log())
        done = _cli("reload", "--config", str(cfg))
        assert done.returncode == 0 and str(daemon.proc.pid) in done.stdout, done.stderr
        wait_for(
            lambda: (
                {_pid_of(x) for x in _lines(daemon, "configuration reloaded", mark)}
                == set(worker_pids(daemon))
            ),
            15,
            "both workers to reload",
        )
    assert not pidfile.exists()
    done = _cli("status", "--config", str(cfg))
    assert done.returncode == 3 and "not running" in done.stdout
    assert _cli("reload", "--config", str(cfg)).returncode != 0


def test_systemd_is_told_when_every_worker_serves(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    base = make_reachable(tmp_path)
    cfg = config(base, clamd_server)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(base / "notify.sock"))
    notify.settimeout(20)

    class AsSystemdStartsIt(DaemonProcess):
        def command(self) -> list[str]:  # packaging/filterd.service's ExecStart
            return [sys.executable, "-m", "filterd.supervisor", "--config", str(self.config)]

    with notify:
        env = {"NOTIFY_SOCKET": str(base / "notify.sock")}
        with AsSystemdStartsIt(base / "d", cfg, env=env) as daemon:
            assert send_mail_through(daemon, base).accepted
            assert notify.recv(256).decode().startswith("READY=1")
            # READY only after both workers built their Runtime.
            assert len(_lines_of(base / "d" / "filterd.log", "worker serving")) == 2
        assert notify.recv(256).decode() == "STOPPING=1"


def send_mail_through(daemon: DaemonProcess, base: Path) -> object:
    with (
        SmtpSink(base / "sink") as sink,
        PostfixServer(
            base / "pf", sink.port, milter=daemon.milter_for_postfix, milter_default_action="reject"
        ) as postfix,
    ):
        return send_mail(postfix.port, FROM, [TO], plain())


def test_version() -> None:
    from filterd import __version__

    done = _cli("--version")
    assert done.returncode == 0 and __version__ in done.stdout


def _lines_of(path: Path, text: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if text in line]


def _private_redis(base: Path) -> list[int]:
    """PIDs of redis-servers serving a socket under ``base`` (the daemon's private one)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if "redis-server" in cmd and str(base) in cmd:
            found.append(int(proc.name))
    return found


def test_workers_leave_when_the_supervisor_is_killed(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    base = make_reachable(tmp_path)
    daemon = DaemonProcess(base / "d", config(base, clamd_server)).start()
    try:
        pids = worker_pids(daemon)
        assert len(pids) == 2
        assert daemon.proc is not None
        daemon.proc.kill()
        daemon.proc.wait()
        # No orphan keeps serving an unlinked socket (PR_SET_PDEATHSIG): they drain and go.
        wait_for(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], 10, "workers")
        # Nor does its private Redis stay on the AOF for the next start to run a second one on.
        wait_for(lambda: not _private_redis(base), 10, "the private redis to stop")
        stale = list(daemon.socket_path.parent.glob(".milter.sock.*"))
        assert stale  # the killed supervisor's private name
        # The next start takes the socket over and removes what the killed one left.
        daemon.start()
        assert not [p for p in stale if p.exists()]
        assert daemon.socket_path.exists()
    finally:
        daemon.stop()


def test_a_worker_that_cannot_start_stops_serve_with_the_reason(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    base = make_reachable(tmp_path)
    cfg = config(base, clamd_server, attachments={"banned_file": str(base / "missing.toml")})
    daemon = DaemonProcess(base / "d", cfg)
    with pytest.raises(RuntimeError, match="exited at start"):
        daemon.start(timeout=30)
    assert "worker cannot start" in daemon.log() and "missing.toml" in daemon.log()
    assert "no worker could start" in daemon.log()
    assert not daemon.socket_path.exists()


def test_a_socket_in_use_stops_serve_with_the_socket_named(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    base = make_reachable(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config(base, clamd_server, milter={"socket": f"inet:{port}@127.0.0.1"})
        done = _cli("serve", "--config", str(cfg))
    assert done.returncode != 0
    assert f"inet:{port}@127.0.0.1: cannot listen" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
