"""Issue 15 item 7 end to end: a hung Redis (SIGSTOP) never holds a reply past the budget.

Real Postfix -> real daemon -> real Redis. Postfix's own milter timeout answers with
``milter_default_action = accept`` here, so if it ever fired instead of filterd, a
message would be accepted unfiltered and the test would see a 250, not filterd's 451.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers_daemon import filtered_postfix, write_config
from tests.servers import RedisServer, SmtpSink, make_reachable, send_mail

pytestmark = pytest.mark.e2e

RCPT_BUDGET = 3.0
MSG = b"From: <a@example.net>\nTo: <bob@example.org>\nSubject: x\n\nhello\n"


def test_hung_redis_gets_451_within_the_budget_and_before_postfix_gives_up(
    tmp_path: Path,
) -> None:
    base = make_reachable(tmp_path)
    with RedisServer(base / "redis") as redis_server, SmtpSink(base / "sink") as sink:
        cfg = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "st"), "log_level": "info"},
                "redis": {"url": redis_server.url, "socket_timeout": 2.0},
                "pipeline": {
                    "recipient_checks": ["allowlist"],
                    "message_checks": ["allowlist"],
                    "rcpt_budget_seconds": RCPT_BUDGET,
                    "message_budget_seconds": 5.0,
                },
                "allowlist": {"site_files": []},
                "records": {"enabled": True},
            },
        )
        with filtered_postfix(base, cfg, sink.port, default_action="accept") as (_d, postfix):
            ok = send_mail(postfix.port, "a@example.net", ["bob@example.org"], MSG)
            assert ok.accepted, ok
            pid = redis_server.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:

                def session(n: int) -> tuple[float, object]:
                    start = time.monotonic()
                    result = send_mail(postfix.port, "a@example.net", [f"user{n}@example.org"], MSG)
                    return time.monotonic() - start, result

                with ThreadPoolExecutor(6) as pool:
                    outcomes = list(pool.map(session, range(6)))
            finally:
                os.kill(pid, signal.SIGCONT)
            for elapsed, result in outcomes:
                rcpt = next(iter(result.rcpts.values()))  # type: ignore[attr-defined]
                assert rcpt.code == 451 and "allowlist" in rcpt.text, result
                assert elapsed < RCPT_BUDGET + 1.0, f"reply after {elapsed:.1f}s: {result}"
            # Redis is back: mail flows again.
            deadline = time.monotonic() + 15
            while True:
                again = send_mail(postfix.port, "a@example.net", ["bob@example.org"], MSG)
                if again.accepted or time.monotonic() > deadline:
                    break
            assert again.accepted, again
