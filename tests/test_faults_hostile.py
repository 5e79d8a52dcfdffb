"""Issue 15 items 3 and 4 end to end: hostile structure and huge headers get a fast, defined
verdict, no CPU is spent on a message after its reply, and memory stays bounded.

Real Postfix -> real daemon -> real clamd. CPU and memory are read from the daemon's
/proc entry (utime+stime of all its threads; VmHWM, the peak resident size).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers_daemon import DaemonProcess, filtered_postfix, write_config
from tests.servers import (
    ClamdServer,
    PostfixServer,
    SmtpResult,
    SmtpSink,
    make_reachable,
    project_signature_dir,
    send_mail,
)

pytestmark = pytest.mark.e2e

TICK = os.sysconf("SC_CLK_TCK")
FROM, TO = "a@example.net", "b@example.org"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def many_parts(n: int) -> bytes:
    parts = "".join(f"--b\nContent-Type: text/plain\n\nx{i}\n" for i in range(n))
    return (
        f"From: <{FROM}>\nTo: <{TO}>\nSubject: parts\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/mixed; boundary="b"\n\n{parts}--b--\n'
    ).encode()


def huge_headers(total: int) -> bytes:
    line = "X-Pad: " + "a" * 50_000 + "\n"  # under Postfix's header_size_limit (100 KB)
    return (f"From: <{FROM}>\nTo: <{TO}>\nSubject: h\n" + line * (total // len(line))).encode()


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdServer]:
    base = make_reachable(tmp_path_factory.mktemp("hostile-clamd"))
    with ClamdServer(base / "clamd", project_signature_dir()) as server:
        yield server


@contextlib.contextmanager
def stack(
    base: Path,
    clamd: ClamdServer,
    checks: tuple[str, ...] = ("antivirus", "attachments"),
    **attachments: object,
) -> Iterator[tuple[DaemonProcess, PostfixServer]]:
    """The daemon (antivirus + attachments, 4 s message budget) behind a real Postfix."""
    cfg = write_config(
        base / "filterd.toml",
        {
            "daemon": {"state_dir": str(base / "st"), "log_level": "info"},
            "pipeline": {
                "recipient_checks": [],
                "message_checks": list(checks),
                "message_budget_seconds": 4.0,
            },
            "milter": {"oversize_action": "reject"},
            "clamav": {"address": clamd.address, "timeout": 30.0},
            "attachments": dict(attachments),
            "records": {"enabled": False},
        },
    )
    with SmtpSink(base / "sink") as sink, filtered_postfix(base, cfg, sink.port) as pair:
        yield pair


def after_reply_cpu(
    daemon: DaemonProcess, port: int, message: bytes
) -> tuple[float, SmtpResult, float]:
    """Seconds to the reply, the SMTP result, and the daemon's CPU-s in the 5 s after it."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    start = time.monotonic()
    result = send_mail(port, FROM, [TO], message, timeout=120)
    elapsed = time.monotonic() - start
    before = cpu_seconds(pid)
    time.sleep(5.0)  # measuring: what does the daemon do after it replied?
    return elapsed, result, cpu_seconds(pid) - before


def test_100k_mime_parts_get_a_fast_554_and_no_cpu_after_the_reply(
    tmp_path: Path, clamd: ClamdServer
) -> None:
    base = make_reachable(tmp_path)
    with stack(base, clamd) as (daemon, postfix):
        elapsed, result, cpu_after = after_reply_cpu(daemon, postfix.port, many_parts(100_000))
        print(f"10^5 parts: reply after {elapsed:.2f}s, {cpu_after:.2f} CPU-s after it")
        assert result.data is not None and result.data.code == 554, result
        assert "5.6.0" in result.data.text
        assert elapsed < 8.0, f"verdict after {elapsed:.1f}s"
        assert cpu_after < 1.0, f"{cpu_after:.1f} CPU-s burnt after the reply"


def test_checks_stop_at_the_budget_when_no_limit_catches_the_message(
    tmp_path: Path, clamd: ClamdServer
) -> None:
    # Limits set out of reach: only the 4 s budget stops the walk. The walk alone: clamd's own
    # limits (MaxFiles 10000, alerted) may answer 554 within the budget, and a refusal rightly
    # wins over the walk's timeout.
    base = make_reachable(tmp_path)
    limits = {"max_mime_parts": 10_000_000, "max_mime_nesting": 100}
    with stack(base, clamd, ("attachments",), **limits) as (daemon, postfix):
        elapsed, result, cpu_after = after_reply_cpu(daemon, postfix.port, many_parts(100_000))
        print(f"budget only: reply after {elapsed:.2f}s, {cpu_after:.2f} CPU-s after it")
        assert result.data is not None and result.data.code == 451, result
        assert elapsed < 4.0 + 3.0, f"reply after {elapsed:.1f}s"
        assert cpu_after < 1.0, f"{cpu_after:.1f} CPU-s burnt after the reply"


def test_huge_headers_in_concurrent_messages_keep_memory_bounded(
    tmp_path: Path, clamd: ClamdServer
) -> None:
    base = make_reachable(tmp_path)
    with stack(base, clamd) as (daemon, postfix):
        assert daemon.proc is not None
        pid = daemon.proc.pid
        ok = send_mail(postfix.port, FROM, [TO], b"Subject: warm-up\n\nhello\n")
        assert ok.accepted, ok
        baseline = peak_rss_mb(pid)
        message = huge_headers(8 * 1024 * 1024)
        barrier = threading.Barrier(4)
        port = postfix.port

        def one(_n: int) -> SmtpResult:
            barrier.wait()
            return send_mail(port, FROM, [TO], message, timeout=120)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        for result in results:
            # Defined verdict: treated as oversize (here oversize_action = reject).
            assert result.data is not None and result.data.code == 552, result
        growth = peak_rss_mb(pid) - baseline
        print(f"4 x 8 MB of headers: peak RSS {baseline:.0f} -> {baseline + growth:.0f} MB")
        assert growth < 24, f"peak RSS grew {growth:.0f} MB for 4 x 8 MB of headers"
