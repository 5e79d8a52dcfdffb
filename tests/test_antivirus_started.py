"""The clamd scan started from the connection's thread and collected later.

A real clamd on a unix socket. ``start_message`` hands a small message to clamd in
one non-blocking write; the pipeline collects the verdict after its CPU-bound
checks. It must give the same verdicts as the streamed scan, keep the deadline
when clamd hangs, say "unavailable" when clamd is gone, and leave what it cannot
do without blocking (TCP, big messages) to the pool.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from filterd.checks.antivirus import INLINE_SCAN_BYTES
from filterd.clients.clamd import ClamdTimeout, ClamdUnavailable
from filterd.pipeline import Pipeline
from tests.servers import ClamdServer, project_signature_dir
from tests.test_antivirus import (
    EICAR,
    codes,
    make_check,
    message,
    plain,
    settings_for,
    with_attachment,
)

pytestmark = pytest.mark.integration


def test_started_scan_gives_the_streamed_verdicts_and_keeps_the_deadline(tmp_path: Path) -> None:
    with ClamdServer(tmp_path / "cs", project_signature_dir(), unix_socket=True) as server:
        check = make_check(server.address, timeout="5")
        started = check.start_message(message(with_attachment(EICAR)), False)
        assert started is not None
        time.sleep(0.05)  # the caller's CPU work; clamd scans meanwhile
        assert codes(started.collect(time.monotonic() + 5)) == ["CLAMAV_VIRUS"]
        clean = check.start_message(message(plain(b"hello")), False)
        assert clean is not None and clean.collect(time.monotonic() + 5) == []
        # An exemption does not skip the scan here either.
        virus = check.start_message(message(plain(EICAR)), True)
        assert virus is not None and codes(virus.collect(time.monotonic() + 5)) == ["CLAMAV_VIRUS"]

        # Too big for one write from the connection's thread: left to the pool.
        big = plain(b"x" * (INLINE_SCAN_BYTES + 1))
        assert check.start_message(message(big), False) is None

        # A frozen clamd: the verdict is given up at the deadline the pipeline passes.
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen = check.start_message(message(plain(b"hello")), False)
            assert frozen is not None
            start = time.monotonic()
            with pytest.raises(ClamdTimeout, match="no verdict within"):
                frozen.collect(time.monotonic() + 0.3)
            assert time.monotonic() - start < 1.5
        finally:
            os.kill(pid, signal.SIGCONT)

        # In the pipeline: started, collected, refused with the virus reply.
        settings = settings_for(server.address)
        pipeline = Pipeline(settings, {"antivirus": check})
        try:
            decision = pipeline.judge_message(message(plain(EICAR)), [])
            assert [f.code for f in decision.findings] == ["CLAMAV_VIRUS"]
            assert decision.reply is not None and decision.reply.code == 554
        finally:
            pipeline.close()
    # clamd gone: unavailable at once, which the pipeline turns into ANTIVIRUS_FAIL (451).
    with pytest.raises(ClamdUnavailable, match="cannot connect"):
        check.start_message(message(plain(b"hello")), False)


def test_tcp_clamd_is_scanned_from_the_pool(tmp_path: Path) -> None:
    check = make_check("tcp:127.0.0.1:3310")
    assert check.start_message(message(plain(b"hello")), False) is None
