"""The daemon's records writes in batches, and by script SHA, against a real Redis.

``BackgroundObserver`` writes what is queued in one round trip (one MULTI/EXEC on a
single Redis); each job still succeeds or fails on its own and is counted as it was
when it was written alone. The scripts go by EVALSHA; a server without them (SCRIPT
FLUSH, a restart) gets the same commands again as EVAL, and nothing is lost or
stored without its TTL. Every figure is read back from Redis itself (INFO
commandstats, TTL, the records readers).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from filterd import keyspace as keys
from filterd.clients.redis import connect
from filterd.records.config import Config
from filterd.records.observer import (
    BackgroundObserver,
    RecordsObserver,
    build_observer,
    utc_day,
)
from filterd.records.query import daily_stats, export_mailbox
from filterd.records.schema import DEFAULT_SCHEMA, load_schema
from filterd.settings import load_settings
from filterd.types import Action, Decision, Envelope, Message
from tests.servers import RedisServer

pytestmark = pytest.mark.integration

DAVE = "dave@example.net"
WEEK = 7 * 86400  # the smtp-log tag of rules/retention.toml (log entries and indexes)


def _message(n: int, recipient: str) -> Message:
    env = Envelope(client_ip="192.0.2.10", mail_from=DAVE, recipients=(recipient,))
    raw = f"From: {DAVE}\r\nMessage-ID: <m{n}@example.net>\r\n\r\nhi\r\n".encode()
    return Message.from_bytes(raw, env)


def _observer(client: Any, **kw: Any) -> BackgroundObserver:
    inner = build_observer(Config(), client)
    assert inner is not None
    return BackgroundObserver(inner, **kw)


def _send(observer: BackgroundObserver, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        observer.on_message(
            _message(n, f"user{n}@example.org"), Decision(Action.ACCEPT, None, "OK")
        )


def _calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _assert_stored_with_ttls(client: redis.Redis, first: int, count: int) -> None:
    """Every message's entry is found through its recipient; every key expires in time."""
    schema = load_schema()
    for n in range(first, first + count):
        (record,) = export_mailbox(client, schema, f"user{n}@example.org")["records"]
        assert record["message_id"] == f"<m{n}@example.net>"
    stored = list(client.scan_iter(match="filterd:v1:*"))
    assert stored
    for key in stored:
        ttl = client.ttl(key)
        limit = 400 * 86400 if key.startswith(keys.stats_key("").encode()) else WEEK
        assert 0 < ttl <= limit, (key, ttl)


def test_a_full_batch_is_one_transaction_and_every_entry_has_its_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.script_load(keys.INDEX_WRITE)
    client.script_load(keys.WRITE_WITH_EXPIRY)
    # A linger far beyond the test: only the full batch can start the write.
    observer = _observer(client, batch_size=20, linger=600.0)
    try:
        client.config_resetstat()
        _send(observer, 20)
        assert _wait(lambda: observer.written == 20), observer.written
        calls = _calls(client)
        assert calls["multi"] == 1 and calls["exec"] == 1
        assert calls["set"] == 20
        assert calls["evalsha"] == 20 * 3  # sender index, recipient index, counter
        assert "eval" not in calls
        assert observer.failures == 0 and observer.dropped == 0
        _assert_stored_with_ttls(client, 0, 20)
        today = datetime.now(UTC).date()
        (day,) = daily_stats(client, load_schema(), since=today, until=today)
        assert day.categories["accepted"] == 20
    finally:
        observer.close()
        client.close()


def test_the_index_script_reads_the_oldest_entry_only_for_unscheduled_keys(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.script_load(keys.INDEX_WRITE)
    client.script_load(keys.WRITE_WITH_EXPIRY)
    observer = _observer(client, batch_size=4, linger=600.0)
    try:
        client.config_resetstat()
        _send(observer, 4)  # dave's index and four new ones: their trims get scheduled
        assert _wait(lambda: observer.written == 4)
        assert _calls(client)["zrange"] == 5
        client.config_resetstat()
        for _ in range(4):  # the same five keys again: scheduled, nothing to read
            observer.on_message(
                _message(0, "user0@example.org"), Decision(Action.ACCEPT, None, "OK")
            )
        assert _wait(lambda: observer.written == 8)
        calls = _calls(client)
        assert calls["evalsha"] == 4 * 3 and "zrange" not in calls
        assert observer.failures == 0
    finally:
        observer.close()
        client.close()


def test_an_index_older_than_the_daemon_is_trimmed_when_its_entry_comes_due(
    redis_url: str, tmp_path: Path
) -> None:
    """The first write to a key learns its oldest entry from the script's reply."""
    text = DEFAULT_SCHEMA.read_text(encoding="utf-8")
    text, n = re.subn(r'(?m)^smtp-log = "[^"]*"', 'smtp-log = "3s"', text)
    assert n == 1
    (tmp_path / "retention.toml").write_text(text, encoding="utf-8")
    client = redis.Redis.from_url(redis_url)
    index = keys.index_key("user0@example.org")
    born = time.time() - 2.0  # written by an earlier daemon; due in about 1 s
    client.zadd(index, {"0000000000aa0123456789ab": born})
    inner = build_observer(Config(schema_file=str(tmp_path / "retention.toml")), client)
    assert inner is not None
    observer = BackgroundObserver(inner, linger=0.02)
    try:
        _send(observer, 1)
        assert observer.flush(timeout=10) and observer.written == 1
        assert client.zcard(index) == 2
        assert _wait(lambda: client.zcard(index) == 1, timeout=10)
        gone = time.time()
        # Trimmed within about a second of its due time (born + 3 s); ours is kept.
        assert gone - (born + 3.0) < 1.5, gone - (born + 3.0)
        assert client.zscore(index, "0000000000aa0123456789ab") is None
    finally:
        observer.close()
        client.close()


def test_due_trims_travel_with_the_writes_and_each_part_counts_alone(redis_url: str) -> None:
    """``write_batch``: jobs and index trims in one MULTI/EXEC; a trim that fails is one
    failure (as a lone ``trim_index`` was), the job beside it is written."""
    client = redis.Redis.from_url(redis_url)
    inner = build_observer(Config(), client)
    assert inner is not None
    old = keys.index_key("old@example.org")
    now = time.time()
    client.zadd(old, {"0000000000aa0123456789ab": now - WEEK - 5, "0000000000bb0123456789ab": now})
    client.set(keys.index_key("broken@example.org"), "not a sorted set", ex=60)
    client.script_load(keys.INDEX_WRITE)
    client.script_load(keys.WRITE_WITH_EXPIRY)
    client.config_resetstat()
    job = RecordsObserver.message_job(
        _message(1, "user1@example.org"), Decision(Action.ACCEPT, None, "OK")
    )
    written, trimmed = inner.write_batch([job], [old, keys.index_key("broken@example.org")])
    calls = _calls(client)
    assert calls["multi"] == 1 and calls["exec"] == 1
    assert inner.written == 1 and inner.failures == 1
    assert {key for key, _due in written} == {
        keys.index_key(DAVE),
        keys.index_key("user1@example.org"),
    }
    # The entry older than its tag is gone; the next trim is due when the other one is.
    assert client.zrange(old, 0, -1) == [b"0000000000bb0123456789ab"]
    assert trimmed == {old: pytest.approx(now + WEEK, abs=0.01)}
    client.close()


def test_flush_writes_a_part_batch_at_once_and_keeps_the_order(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    observer = _observer(client, batch_size=64, linger=600.0)
    try:
        _send(observer, 5)
        assert observer.flush(timeout=10)
        assert observer.written == 5
        # One sender for all: its index lists the entries in the order they were queued.
        ids = [m.decode() for m in client.zrange(keys.index_key(DAVE), 0, -1)]
        logs = [client.get(keys.log_key(i)) for i in ids]
        assert [b"<m%d@example.net>" % n in (log or b"") for n, log in enumerate(logs)] == [
            True
        ] * 5
    finally:
        observer.close()
        client.close()


def test_one_failing_job_is_counted_alone_the_rest_of_its_batch_is_written(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    # user2's index key holds a string: that job's index script fails (WRONGTYPE).
    client.set(keys.index_key("user2@example.org"), "not a sorted set", ex=60)
    observer = _observer(client, batch_size=5, linger=600.0)
    try:
        _send(observer, 5)
        assert _wait(lambda: observer.written + observer.failures == 5)
        assert observer.written == 4 and observer.failures == 1
        schema = load_schema()
        for n in (0, 1, 3, 4):
            assert len(export_mailbox(client, schema, f"user{n}@example.org")["records"]) == 1
    finally:
        observer.close()
        client.close()


def test_a_failed_round_trip_counts_every_job_of_its_batch(own_redis: RedisServer) -> None:
    client = redis.Redis.from_url(own_redis.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    observer = _observer(client, batch_size=10, linger=600.0)
    try:
        _send(observer, 1)
        assert observer.flush(timeout=10) and observer.written == 1
        own_redis.stop()
        _send(observer, 10, start=1)
        assert observer.flush(timeout=60)
        assert observer.written == 1 and observer.failures == 10 and observer.dropped == 0
    finally:
        observer.close()
        client.close()


def test_an_empty_script_cache_loses_nothing_and_every_key_keeps_its_ttl(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    observer = _observer(client, batch_size=5, linger=600.0)
    try:
        client.script_flush()
        client.config_resetstat()
        _send(observer, 5)
        assert _wait(lambda: observer.written + observer.failures == 5)
        assert observer.failures == 0 and observer.written == 5
        calls = _calls(client)
        # Every EVALSHA was answered NOSCRIPT and sent again, once, as EVAL.
        assert calls["evalsha"] == 15 and calls["eval"] == 15
        assert calls["multi"] == 2
        _assert_stored_with_ttls(client, 0, 5)
        # EVAL loaded the scripts: the next batch needs no fallback.
        client.config_resetstat()
        _send(observer, 5, start=5)
        assert _wait(lambda: observer.written == 10)
        calls = _calls(client)
        assert calls["evalsha"] == 15 and "eval" not in calls and calls["multi"] == 1
        _assert_stored_with_ttls(client, 5, 5)
    finally:
        observer.close()
        client.close()


def test_a_restarted_redis_gets_every_write_with_its_ttl(own_redis: RedisServer) -> None:
    """The daemon's own client (filterd.clients.redis.connect) across a restart:
    the new server has no scripts; the writes after it arrive complete."""
    client = connect(load_settings(env={}), own_redis.url)
    observer = _observer(client, batch_size=3, linger=600.0)
    try:
        _send(observer, 3)
        assert _wait(lambda: observer.written == 3)
        own_redis.stop()
        own_redis.start()  # same port, no persistence: empty, no scripts
        probe = redis.Redis.from_url(own_redis.url)
        assert probe.script_exists(keys.INDEX_WRITE_SHA) == [False]
        _send(observer, 3, start=3)
        assert _wait(lambda: observer.written + observer.failures == 6)
        assert observer.failures == 0 and observer.written == 6
        assert probe.script_exists(keys.INDEX_WRITE_SHA, keys.WRITE_WITH_EXPIRY_SHA) == [
            True,
            True,
        ]
        _assert_stored_with_ttls(probe, 3, 3)
        probe.close()
    finally:
        observer.close()
        client.close()


def test_the_script_shas_are_the_servers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.script_load(keys.INDEX_WRITE) == keys.INDEX_WRITE_SHA
        assert client.script_load(keys.WRITE_WITH_EXPIRY) == keys.WRITE_WITH_EXPIRY_SHA
    finally:
        client.close()


def test_the_cached_utc_day_is_the_calendars_in_any_order() -> None:
    midnight = 20000 * 86400  # 2024-10-04 00:00:00 UTC
    stamps = [midnight - 0.001, midnight, midnight + 86399.999, midnight - 86400, 0.0,
              midnight + 86400, midnight + 0.5, 2**33 - 1.0, midnight - 0.001]  # fmt: skip
    for stamp in stamps:
        expected = time.strftime("%Y-%m-%d", time.gmtime(int(stamp)))
        assert utc_day(stamp) == expected, stamp
        assert utc_day(stamp) == expected, stamp  # the cached answer too
    assert utc_day(midnight) == "2024-10-04"
