"""The GCRA Lua bucket against a real Redis: limits, all-or-nothing, expiry, concurrency."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from redis.crc import key_slot

from filterd.keyspace import outbound_keys
from filterd.outbound.config import LIMIT_NAMES
from filterd.outbound.ratelimit import RateLimiter
from tests.redis_topology import RedisClusterGroup
from tests.servers import make_reachable

pytestmark = pytest.mark.integration

NO_LIMITS = dict.fromkeys(LIMIT_NAMES, 0)


def limiter(url: str, **limits: int) -> RateLimiter:
    return RateLimiter(redis.Redis.from_url(url), {**NO_LIMITS, **limits})


def test_n_pass_then_refused_with_a_retry_hint_and_other_logins_unaffected(redis_url: str) -> None:
    rl = limiter(redis_url, messages_per_hour=3)
    assert [rl.consume("u", "carol@example.org", 1, 1).allowed for _ in range(3)] == [True] * 3
    over = rl.consume("u", "carol@example.org", 1, 1)
    assert not over.allowed
    assert over.limit_name == "messages_per_hour" and over.limit == 3
    # One message every 20 minutes refills the bucket: the next fits in about 20 minutes.
    assert 1150 < over.retry_after <= 1200
    assert over.describe() == "3 messages per hour"
    assert rl.consume("u", "dave@example.org", 1, 1).allowed


def test_a_refused_decision_charges_nothing(redis_url: str) -> None:
    rl = limiter(redis_url, messages_per_hour=10, recipients_per_hour=2)
    assert rl.consume("u", "a@example.org", 1, 1).allowed
    assert rl.consume("u", "a@example.org", 0, 1).allowed
    refused = rl.consume("u", "a@example.org", 1, 1)  # third recipient: over
    assert not refused.allowed and refused.limit_name == "recipients_per_hour"
    used = {u.name: u.used for u in rl.usage("u", "a@example.org")}
    assert used["messages_per_hour"] == 1, used  # the refused message was not charged
    assert used["recipients_per_hour"] == 2


def test_every_key_expires_within_its_window(redis_url: str) -> None:
    rl = limiter(redis_url, messages_per_minute=5, messages_per_hour=50, recipients_per_day=500)
    assert rl.consume("u", "a@example.org", 1, 3).allowed
    client = redis.Redis.from_url(redis_url)
    keys = outbound_keys("u", "a@example.org").buckets
    windows = {"messages_per_minute": 60, "messages_per_hour": 3600, "recipients_per_day": 86400}
    for name, window in windows.items():
        ttl = client.pttl(keys[name])
        # GCRA: the state lives until the bucket would be full again (one charge's share).
        assert 0 < ttl <= window * 1000, (name, ttl)
    # Unlimited windows leave no key at all.
    assert client.exists(keys["messages_per_day"]) == 0
    assert all(client.pttl(k) > 0 for k in client.scan_iter("filterd:v1:rl:*"))


def test_the_bucket_refills(redis_url: str) -> None:
    rl = limiter(redis_url, messages_per_minute=60)  # one message per second
    for _ in range(60):
        assert rl.consume("u", "a@example.org", 1, 1).allowed
    refused = rl.consume("u", "a@example.org", 1, 1)
    assert not refused.allowed and 0 < refused.retry_after <= 1.0
    deadline = time.monotonic() + 5
    while not rl.consume("u", "a@example.org", 1, 1).allowed:
        assert time.monotonic() < deadline, "no refill within 5 s at one message per second"
        time.sleep(0.05)


def test_overrides_per_account(redis_url: str) -> None:
    rl = limiter(redis_url, messages_per_hour=2)
    rl.set_overrides("u", "big@example.org", {"messages_per_hour": 0})  # 0 = unlimited
    rl.set_overrides("u", "small@example.org", {"messages_per_hour": 1})
    assert all(rl.consume("u", "big@example.org", 1, 1).allowed for _ in range(10))
    assert rl.consume("u", "small@example.org", 1, 1).allowed
    assert not rl.consume("u", "small@example.org", 1, 1).allowed
    assert rl.overrides("u", "small@example.org") == {"messages_per_hour": 1}
    with pytest.raises(ValueError, match="unknown limit"):
        rl.set_overrides("u", "small@example.org", {"messages_per_week": 1})
    rl.reset("u", "small@example.org", counters=True)
    assert rl.consume("u", "small@example.org", 1, 1).allowed


def test_threads_never_exceed_the_limit(redis_url: str) -> None:
    rl = limiter(redis_url, messages_per_hour=50)
    barrier = threading.Barrier(8)

    def worker(_: int) -> int:
        barrier.wait()
        return sum(rl.consume("u", "t@example.org", 1, 1).allowed for _ in range(20))

    with ThreadPoolExecutor(8) as pool:
        allowed = sum(pool.map(worker, range(8)))
    assert allowed == 50


def _process_worker(args: tuple[str, int]) -> int:
    url, attempts = args
    rl = limiter(url, recipients_per_minute=37)
    return sum(rl.consume("u", "p@example.org", 0, 1).allowed for _ in range(attempts))


def test_processes_never_exceed_the_limit(redis_url: str) -> None:
    """Several daemons (processes, own connections) on one Redis share one budget."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(3, mp_context=ctx) as pool:
        allowed = sum(pool.map(_process_worker, [(redis_url, 25)] * 3))
    assert allowed == 37


def test_keys_of_one_decision_share_a_hash_tag_and_hold_no_ip() -> None:
    keys = outbound_keys("u", "Weird{Login} x@Example.org")
    names = [keys.override, *keys.buckets.values(), keys.spam_prefix + "2026-12-01"]
    assert len({key_slot(n.encode()) for n in names}) == 1  # one Cluster slot
    for name in names:
        assert name.count("{") == 1 and name.count("}") == 1  # the login cannot break the tag
        assert "weird%7Blogin%7D%20x@example.org" in name
    assert outbound_keys("u", "A@Example.org") == outbound_keys("u", "a@example.org")


def test_limits_cli_set_show_reset(redis_url: str) -> None:
    from filterd.cli import main

    runner = CliRunner()
    base = ["--redis-url", redis_url]
    out = runner.invoke(main, ["limits", "set", *base, "u@example.org", "--messages-per-hour", "7"])
    assert out.exit_code == 0, out.output
    rl = limiter(redis_url, messages_per_hour=100)
    assert rl.consume("u", "u@example.org", 1, 1).allowed
    shown = runner.invoke(main, ["limits", "show", *base, "u@example.org"])
    assert shown.exit_code == 0
    line = next(x for x in shown.output.splitlines() if "messages_per_hour" in x)
    assert "7" in line and "override" in line and "used 1" in line
    assert runner.invoke(main, ["limits", "set", *base, "u@example.org"]).exit_code == 2
    reset = runner.invoke(main, ["limits", "reset", *base, "u@example.org"])
    assert reset.exit_code == 0
    assert rl.overrides("u", "u@example.org") == {}


def test_the_script_runs_on_redis_cluster(tmp_path: Path) -> None:
    """All keys of one decision share a hash tag, so Cluster accepts the script; logins land
    on different slots and still work."""
    from filterd.clients.redis import connect
    from filterd.settings import load_settings

    with RedisClusterGroup(make_reachable(tmp_path)) as cluster:
        client = connect(load_settings(env={}), cluster.url)
        try:
            rl = RateLimiter(client, {**NO_LIMITS, "messages_per_hour": 2})
            for login in ("alice@example.org", "bob@example.net", "carol@example.com"):
                assert rl.consume("u", login, 1, 1).allowed
                assert rl.consume("u", login, 1, 1).allowed
                assert not rl.consume("u", login, 1, 1).allowed
            slots = {
                key_slot(outbound_keys("u", x).override.encode())
                for x in ("alice@example.org", "bob@example.net", "carol@example.com")
            }
            assert len(slots) == 3
        finally:
            client.close()
