"""Issue 15 items 6 and 7 against a real Redis: index retention and records off the SMTP path.

Item 6: a mailbox index must not keep entries older than their retention tag (the tag is
set to 3 s here). Item 7: the daemon's observer never makes a reply wait for Redis, and an
entry it cannot write (Redis hung, queue full) is counted and logged, never lost silently.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest
import redis

from filterd import keyspace as keys
from filterd.records.config import Config
from filterd.records.observer import BackgroundObserver, build_daemon_observer
from filterd.records.schema import DEFAULT_SCHEMA
from filterd.types import Action, Decision, Envelope, Message, RecipientDecision, SmtpReply
from tests.servers import RedisServer

pytestmark = pytest.mark.integration

ALICE = "alice@example.org"
LISTED = SmtpReply(554, "5.7.1", "listed")


def _schema(tmp_path: Path, seconds: int) -> Path:
    text = DEFAULT_SCHEMA.read_text(encoding="utf-8")
    text, n = re.subn(r'(?m)^smtp-log = "[^"]*"', f'smtp-log = "{seconds}s"', text)
    assert n == 1
    path = tmp_path / "retention.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _message(n: int) -> Message:
    env = Envelope(client_ip="192.0.2.10", mail_from="dave@example.net", recipients=(ALICE,))
    raw = f"From: dave@example.net\r\nMessage-ID: <m{n}@example.net>\r\n\r\nhi\r\n".encode()
    return Message.from_bytes(raw, env)


def _observer(tmp_path: Path, client: redis.Redis, seconds: int, **kw: int) -> BackgroundObserver:
    config = Config(schema_file=str(_schema(tmp_path, seconds)), **kw)
    observer = build_daemon_observer(config, client)
    assert observer is not None
    return observer


def _ages(client: redis.Redis) -> list[float]:
    """Age in seconds of every entry of ALICE's index, read from Redis itself."""
    key = keys.index_key(ALICE)
    assert client.type(key) in (b"zset", b"none")
    return [time.time() - score for _m, score in client.zrange(key, 0, -1, withscores=True)]


def test_index_drops_entries_older_than_their_tag(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    observer = _observer(tmp_path, client, seconds=3)
    try:
        observer.on_message(_message(1), Decision(Action.ACCEPT, None, "OK"))
        assert observer.flush()
        time.sleep(2.0)  # the second entry arrives while the first one is still young
        observer.on_message(_message(2), Decision(Action.ACCEPT, None, "OK"))
        assert observer.flush()
        assert len(_ages(client)) == 2
        deadline = time.monotonic() + 8
        worst = 0.0
        while time.monotonic() < deadline:
            ages = _ages(client)
            worst = max([worst, *ages])
            time.sleep(0.2)
        # No entry was ever seen more than its tag (3 s) plus the trimming interval old.
        assert worst < 3 + 1.5, f"an index entry {worst:.1f}s old outlived its 3s tag"
        assert _ages(client) == []
        assert observer.failures == 0
    finally:
        observer.close()
        client.close()


def test_hung_redis_never_delays_the_callbacks_and_every_loss_is_counted(
    tmp_path: Path, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(own_redis.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    observer = _observer(tmp_path, client, seconds=60, queue_size=5)
    pid = own_redis.pid
    assert pid is not None
    try:
        observer.on_message(_message(0), Decision(Action.ACCEPT, None, "OK"))
        assert observer.flush() and observer.written == 1
        os.kill(pid, signal.SIGSTOP)
        try:
            slowest = 0.0
            with caplog.at_level(logging.WARNING, logger="filterd.records"):
                for n in range(20):
                    start = time.monotonic()
                    observer.on_recipient(
                        Envelope(client_ip="192.0.2.10", mail_from="x@example.net"),
                        RecipientDecision(ALICE, Action.REJECT, LISTED, False, (), "DNSBL_X"),
                    )
                    observer.on_message(_message(n), Decision(Action.ACCEPT, None, "OK"))
                    slowest = max(slowest, time.monotonic() - start)
            # The SMTP path never waited for the hung Redis: a blocking write would have
            # cost the 1 s socket timeout; the bound leaves room for a loaded CI box.
            assert slowest < 0.5, f"a callback took {slowest:.3f}s with Redis hung"
            assert observer.dropped > 0
            assert any("records queue full" in r.getMessage() for r in caplog.records)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert observer.flush(timeout=30)
        # 41 entries: each was written, or failed, or was dropped, and each loss is counted.
        assert observer.written + observer.failures + observer.dropped == 41
        assert observer.failures + observer.dropped > 0
    finally:
        observer.close()
        client.close()
