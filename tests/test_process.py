"""The process model through a real Postfix: pre-forked workers, drain, replacement, reload.

Every test runs the real daemon (`python -m filterd serve`) with clamd behind it and a
private Postfix in front (milter_default_action = reject, so a 250 proves a worker judged
the message and a 5xx that is not ours shows up as Postfix's own text).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filterd.devservers import (
    ClamdServer,
    PostfixServer,
    SmtpSink,
    make_reachable,
    send_mail,
)
from tests.helpers_daemon import DaemonProcess, write_config

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

    def __init__(self, port: int, body: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.expect(220)
        for line, code in (
            (b"EHLO client.example.net", 250),
            (f"MAIL FROM:<{FROM}>".encode(), 250),
            (f"RCPT TO:<{TO}>".encode(), 250),
            (b"DATA", 354),
        ):
            self.sock.sendall(line + b"\r\n")
            self.expect(code)
        lines = body.replace(b"\r\n", b"\n").split(b"\n")
        half = len(lines) // 2
        self.rest = b"\r\n".join(lines[half:]) + b"\r\n.\r\n"
        self.sock.sendall(b"\r\n".join(lines[:half]) + b"\r\n")

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
        self.sock.sendall(self.rest)
        result = self.reply()
        self.sock.sendall(b"QUIT\r\n")
        self.sock.close()
        return result


@pytest.mark.parametrize("kind", ["clean", "virus"])
def test_sigterm_mid_data_gets_the_real_verdict_and_exits_fast(stack, kind: str) -> None:
    base, daemon, postfix, sink = stack
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


def test_new_connections_are_refused_during_the_drain(stack) -> None:
    base, daemon, postfix, sink = stack
    held = HeldMessage(postfix.port, plain())
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "refusing new connections" in daemon.log(), 5, "the drain to start")
    late = send_mail(postfix.port, FROM, [TO], plain())
    # Postfix could not reach a milter: its default action (reject) at once, not a hang.
    replies = [late.banner, late.ehlo, late.mail, *late.rcpts.values(), late.data]
    refused = [r for r in replies if r is not None and r.code >= 400]
    assert refused and not late.accepted, late
    assert held.finish()[0] == 250


def test_sigkill_of_a_worker_under_traffic_loses_nothing(stack) -> None:
    base, daemon, postfix, sink = stack
    before = worker_pids(daemon)
    assert len(before) == 2
    codes: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            r = send_mail(postfix.port, FROM, [TO], plain())
            codes.append(r.data.code if r.data else (r.mail.code if r.mail else 0))

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
        assert before[0] not in replaced and before[1] in replaced
        n = len(codes)
        wait_for(lambda: len(codes) >= n + 10, 30, "traffic after the replacement")
    finally:
        stop.set()
        for t in threads:
            t.join()
    # The killed worker's message (if it held one) got Postfix's default action; every
    # message was answered, and every accepted one reached the sink.
    assert set(codes) <= {250, 550, 554, 451}, codes
    assert codes.count(250) >= len(codes) - 3, codes
    accepted = codes.count(250)
    wait_for(lambda: len(sink.messages()) >= accepted, 20, "deliveries")
    assert len(sink.messages()) == accepted
    assert send_mail(postfix.port, FROM, [TO], plain()).accepted
    assert daemon.socket_path.exists()


def test_sighup_reaches_every_worker_under_traffic(stack, clamd_server: ClamdServer) -> None:
    base, daemon, postfix, sink = stack
    exe_mail = (
        f"From: <{FROM}>\nTo: <{TO}>\nSubject: f\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nhi\n'
        '--b\nContent-Type: application/octet-stream; name="a.exe"\n'
        'Content-Disposition: attachment; filename="a.exe"\nContent-Transfer-Encoding: base64\n\n'
        "TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n--b--\n"
    ).encode()
    # Attachments on: refused. Then a config without the attachment check is reloaded.
    assert send_mail(postfix.port, FROM, [TO], exe_mail).data.code == 554  # type: ignore[union-attr]
    config(base, clamd_server, pipeline={"message_checks": ["antivirus"]})
    daemon.signal(signal.SIGHUP)
    pids = worker_pids(daemon)
    wait_for(
        lambda: all(f'"pid": {p}' in line for p in pids for line in [_reloads(daemon, p)]),
        15,
        "every worker to reload",
    )
    # Each worker answers with the new rules: many sessions, spread over both workers.
    seen: set[int] = set()
    for _ in range(12):
        r = send_mail(postfix.port, FROM, [TO], exe_mail)
        assert r.data is not None and r.data.code == 250, r
    seen = {p for p in pids if f'"pid": {p}' in daemon.log()}
    assert seen == set(pids)
    assert worker_pids(daemon) == pids  # reloaded in place, not restarted


def _reloads(daemon: DaemonProcess, pid: int) -> str:
    return "\n".join(
        line
        for line in daemon.log().splitlines()
        if "configuration reloaded" in line and f'"pid": {pid}' in line
    )
