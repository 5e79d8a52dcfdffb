"""filterd on one Redis, on Redis Cluster and behind Redis Sentinel, with real servers.

* URL parsing and the keyspace rules (hash tags, every builder in its retention kind).
* The SAME assertions over a single Redis and a three-master Redis Cluster
  (``topology`` fixture, parametrized): allowlist edits, lookups, export and erase;
  records with their expiry, export, erase, stats and audit; the CLI tools; a Lua
  script over one account's rate-limit windows. Rate limits proper come from the
  outbound helper and join this parametrized set at merge.
* Sentinel end to end: two filterd daemons behind two Postfix instances share the
  allowlists; the master is SIGKILLed under traffic from both nodes; every message
  ends delivered or with a 4xx/5xx reply, none is wrongly accepted, and both nodes
  accept mail again soon after the promotion, with the lists intact.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from filterd import keyspace
from filterd.allowlist.cli import allow
from filterd.allowlist.config import Config as AllowConfig
from filterd.allowlist.entries import parse_entry, parse_target
from filterd.allowlist.match import Probe
from filterd.allowlist.store import AllowlistStore, LimitError
from filterd.clients.redis import (
    RedisClient,
    RedisUrlError,
    connect,
    describe_topology,
    is_cluster,
    parse_url,
    pipeline,
    redacted_url,
)
from filterd.records.cli import records, stats
from filterd.records.observer import RecordsObserver
from filterd.records.pseudonym import Pseudonymizer
from filterd.records.query import audit_keys, daily_stats, erase_mailbox, export_mailbox
from filterd.records.schema import DEFAULT_SCHEMA, load_schema
from filterd.records.writer import RecordWriter
from filterd.settings import ConfigError, Settings, load_settings
from filterd.types import Action, Decision, Envelope, Message, RecipientDecision, SmtpReply
from tests.redis_topology import RedisClusterGroup
from tests.servers import RedisServer, dbl_uribl, make_reachable

pytestmark = pytest.mark.integration

ALICE, BOB, DAVE = "alice@example.org", "bob@example.org", "dave@example.net"
IP = "192.0.2.10"
MANY = tuple(f"user{i:02d}@example.org" for i in range(12))


def settings() -> Settings:
    return load_settings(env={})


# --------------------------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize(
    ("url", "mode", "nodes", "master", "db"),
    [
        ("redis://127.0.0.1:6379/2", "single", (), None, 0),
        ("unix:///run/redis.sock?db=0", "single", (), None, 0),
        (
            "redis+sentinel://127.0.0.1:26379,127.0.0.2:26380,[::1]:26381/mymaster/3",
            "sentinel",
            (("127.0.0.1", 26379), ("127.0.0.2", 26380), ("::1", 26381)),
            "mymaster",
            3,
        ),
        ("redis+sentinel://s1,s2/m", "sentinel", (("s1", 26379), ("s2", 26379)), "m", 0),
        (
            "redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001",
            "cluster",
            (("127.0.0.1", 7000), ("127.0.0.1", 7001)),
            None,
            0,
        ),
    ],
)
def test_urls_are_read(
    url: str, mode: str, nodes: tuple[tuple[str, int], ...], master: str | None, db: int
) -> None:
    endpoint = parse_url(url)
    assert (endpoint.mode, endpoint.nodes, endpoint.master, endpoint.db) == (
        mode,
        nodes,
        master,
        db,
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("127.0.0.1:6379", "not a URL"),
        ("memcached://127.0.0.1", "unknown scheme"),
        ("redis+sentinel://127.0.0.1:26379", "MASTER"),
        ("redis+sentinel://127.0.0.1:26379/m/x", "database must be a number"),
        ("redis+sentinel://127.0.0.1:99999/m", "bad port"),
        ("redis+cluster://127.0.0.1:7000/0", "no path"),
        ("redis+cluster://127.0.0.1:7000,,127.0.0.1:7001", "empty host"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(RedisUrlError, match=says):
        parse_url(url)


def test_passwords_never_appear_in_messages() -> None:
    assert (
        redacted_url("redis+sentinel://:s3cret@h1:26379,h2:26379/m/0")
        == "redis+sentinel://:***@h1:26379,h2:26379/m/0"
    )
    assert redacted_url("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"
    assert redacted_url("redis://h:6379/0") == "redis://h:6379/0"
    with pytest.raises(RedisUrlError) as caught:
        parse_url("redis+sentinel://:s3cret@h1:99999/m")
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)


def test_a_bad_url_is_refused_at_configuration_load() -> None:
    with pytest.raises(ConfigError, match=r"\[redis\] url: .*unknown scheme"):
        load_settings(env={"FILTERD_REDIS_URL": "memcached://127.0.0.1:1"})


def test_an_unreachable_cluster_is_a_connection_error_and_a_clear_cli_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.servers import free_port

    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with pytest.raises(redis.ConnectionError, match="cannot be connected"):
        connect(settings(), url)
    monkeypatch.setenv("FILTERD_PIPELINE_RECIPIENT_CHECKS", "[]")
    monkeypatch.setenv("FILTERD_PIPELINE_MESSAGE_CHECKS", "[]")
    result = CliRunner().invoke(allow, ["--redis-url", url, "list", ALICE])
    assert result.exit_code == 1 and "error: redis+cluster://" in result.output, result.output
    result = CliRunner().invoke(stats, ["--redis-url", url])
    assert result.exit_code == 1 and "redis+cluster://" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --------------------------------------------------------------------------------------------
# keyspace


def _rl(account: str) -> keyspace.OutboundKeys:
    return keyspace.outbound_keys("u", account)


def test_every_key_builder_lands_in_its_retention_kind() -> None:
    schema = load_schema()
    samples: dict[str, str] = {
        "log_key": keyspace.log_key("0123456789ab"),
        "index_key": keyspace.index_key("alice@example.org"),
        "stats_key": keyspace.stats_key("2026-11-22"),
        "abuse_key": keyspace.abuse_key("0123456789ab"),
        "pseudonym_key": keyspace.pseudonym_key(12345),
        "allow_mailbox_key": keyspace.allow_mailbox_key("alice@example.org"),
        "allow_domain_key": keyspace.allow_domain_key("example.org"),
        "ratelimit_bucket": _rl("alice@example.org").buckets["messages_per_hour"],
        "ratelimit_override": _rl("alice@example.org").override,
        "outbound_spam": _rl("alice@example.org").spam_prefix + "2026-11-22",
    }
    assert set(samples) == set(keyspace.KINDS)
    for builder, key in samples.items():
        suffix = keyspace.strip_prefix(key)
        assert suffix is not None, key
        kind = schema.kind_for_key(suffix)
        assert kind is not None and kind.name == keyspace.KINDS[builder], (builder, key)


@pytest.mark.parametrize(
    "account", ["alice@example.org", "a}b@example.org", "}{@x", "{}", "%7B", "192.0.2.10"]
)
def test_one_accounts_windows_share_a_slot_whatever_the_login(account: str) -> None:
    keys = _rl(account)
    slots = {key_slot(k.encode()) for k in [*keys.buckets.values(), keys.override]}
    assert len(slots) == 1
    # The tag is the whole (escaped) account: another account's tag is different.
    assert _rl(account).override != _rl(account + "x").override


def test_escaping_keeps_accounts_apart() -> None:
    assert keyspace.hash_tag("a{b") != keyspace.hash_tag("a%7Bb")
    assert _rl("a{b").override != _rl("a%7Bb").override
    with pytest.raises(ValueError):
        keyspace.hash_tag("")


def test_old_names_still_import() -> None:
    from filterd.allowlist import store

    assert store.mailbox_key("a@b") == keyspace.allow_mailbox_key("a@b")
    assert store.KEYSPACE is keyspace.ALLOW_KEYSPACE


# --------------------------------------------------------------------------------------------
# the same assertions on one Redis and on a Redis Cluster


@dataclass
class Topology:
    name: str
    url: str
    shards: int
    flush: Any

    def client(self) -> RedisClient:
        return connect(settings(), self.url)


@pytest.fixture(scope="module")
def single_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(make_reachable(tmp_path_factory.mktemp("single"))) as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterGroup]:
    with RedisClusterGroup(make_reachable(tmp_path_factory.mktemp("cluster"))) as group:
        yield group


@pytest.fixture(params=["single", "cluster"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """An emptied Redis of each kind; tests use only what filterd's factory builds."""
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("single_redis")

        def flush() -> None:
            client = redis.Redis.from_url(server.url)
            client.flushall()
            client.close()

        topo = Topology("single", server.url, 1, flush)
    else:
        group: RedisClusterGroup = request.getfixturevalue("redis_cluster")
        topo = Topology("cluster", group.url, 3, group.flush)
    topo.flush()
    yield topo
    topo.flush()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _owner(client: RedisClient, key: str) -> str:
    """Which primary holds ``key`` ("single" for one Redis)."""
    if not is_cluster(client):
        return "single"
    node = client.get_node_from_key(key)  # type: ignore[union-attr]
    return f"{node.host}:{node.port}"


def test_the_topology_is_described(topology: Topology) -> None:
    client = topology.client()
    info = describe_topology(client)
    assert info["mode"] == topology.name and info["shards"] == topology.shards
    if topology.name == "cluster":
        assert len(info["masters"]) == 3 and info["state"] == "ok"
    else:
        assert info["master"].endswith(str(parse_port(topology.url)))


def test_filterd_check_reports_the_topology(topology: Topology, tmp_path: Path) -> None:
    from filterd.check import check
    from tests.helpers_daemon import write_config

    cfg = write_config(tmp_path / "filterd.toml", {"redis": {"url": topology.url}})
    result = CliRunner().invoke(check, ["--config", str(cfg)])
    line = next(x for x in result.output.splitlines() if x.startswith("ok: redis "))
    if topology.name == "cluster":
        assert "cluster, 3 shards" in line and "cluster_state ok" in line, line
    else:
        assert f"single server 127.0.0.1:{parse_port(topology.url)} (master)" in line, line


def test_rate_limits_are_the_same_on_every_topology(topology: Topology) -> None:
    """The outbound sending limits (one Lua script per decision) on one Redis and on Cluster."""
    from filterd.outbound.config import LIMIT_NAMES
    from filterd.outbound.ratelimit import RateLimiter

    client = topology.client()
    limits = {**dict.fromkeys(LIMIT_NAMES, 0), "messages_per_hour": 3, "recipients_per_hour": 4}
    rl = RateLimiter(client, limits)
    carol, dave = "carol@example.org", "dave@example.org"
    assert [rl.consume("u", carol, 1, 1).allowed for _ in range(3)] == [True] * 3
    over = rl.consume("u", carol, 1, 1)
    assert not over.allowed and over.limit_name == "messages_per_hour" and over.limit == 3
    assert rl.consume("u", dave, 1, 1).allowed  # another login is not charged
    # A refused decision charges nothing; recipients are their own budget.
    assert rl.consume("u", dave, 0, 3).allowed
    refused = rl.consume("u", dave, 1, 1)
    assert not refused.allowed and refused.limit_name == "recipients_per_hour"
    used = {u.name: u.used for u in rl.usage("u", dave)}
    assert used["messages_per_hour"] == 1 and used["recipients_per_hour"] == 4, used
    # Per-account overrides are read by the same script.
    rl.set_overrides("u", "erin@example.org", {"messages_per_hour": 1})
    assert rl.consume("u", "erin@example.org", 1, 1).allowed
    assert rl.consume("u", "erin@example.org", 1, 1).limit == 1
    # Every key expires by itself (the override is an admin setting, kept until reset).
    keys = keyspace.outbound_keys("u", carol)
    ttls = [client.pttl(k) for k in keys.buckets.values() if client.exists(k)]
    assert ttls and all(0 < t <= 3600 * 1000 for t in ttls), ttls
    assert client.pttl(keyspace.outbound_keys("u", "erin@example.org").override) == -1
    assert rl.reset("u", carol, counters=True) >= 1
    assert rl.consume("u", carol, 1, 1).allowed


def parse_port(url: str) -> int:
    return int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]


def test_allowlists_edit_lookup_export_erase(topology: Topology) -> None:
    client = topology.client()
    config = AllowConfig(max_entries_per_mailbox=5)
    store = AllowlistStore(client, config)
    mailboxes = [
        f"{n}@example.org"
        for n in ["alice", "bob", "carol", "erin", "frank", "grace", "heidi", "ivan"]
    ]
    for i, mailbox in enumerate(mailboxes):
        entries = [parse_entry(e, config) for e in (DAVE, f"*@friend{i}.example", "192.0.2.0/24")]
        change = store.add(parse_target(mailbox, config), entries)
        assert change.count == 3 and len(change.changed) == 3
    store.add(parse_target("@example.org", config), [parse_entry("*@partner.example", config)])
    # The lists spread over the shards, and one lookup reads them all.
    owners = {_owner(client, keyspace.allow_mailbox_key(m)) for m in mailboxes}
    assert len(owners) == topology.shards
    pairs = [(m, "example.org") for m in mailboxes] + [("nobody@example.org", "example.org")]
    found = store.lookup(pairs, Probe.build(DAVE, "198.51.100.1"))
    assert [[m.scope for m in hits] for hits in found] == [["mailbox"]] * 8 + [[]]
    found = store.lookup(pairs, Probe.build("x@partner.example", "192.0.2.77"))
    assert [sorted(m.scope for m in hits) for hits in found] == [["domain", "mailbox"]] * 8 + [
        ["domain"]
    ]
    # The per-list limit holds: nothing is written when it would be exceeded.
    target = parse_target(mailboxes[0], config)
    with pytest.raises(LimitError):
        store.add(target, [parse_entry(f"x{i}@y.example", config) for i in range(3)])
    assert store.count(target) == 3
    removed = store.remove(target, [parse_entry(DAVE, config), parse_entry("n@o.example", config)])
    assert removed.changed == (DAVE,) and removed.count == 2
    assert store.replace(target, [parse_entry("only@one.example", config)]) == 1
    assert store.export_mailbox(mailboxes[0])["entries"] == ["only@one.example"]
    assert store.erase_mailbox(mailboxes[1]) == 3
    assert store.entries(parse_target(mailboxes[1], config)) == []
    assert store.count(parse_target(mailboxes[2], config)) == 3


def _msg(sender: str, rcpts: tuple[str, ...], mid: str) -> Message:
    raw = f"Subject: zebra plans\r\nMessage-ID: {mid}\r\n\r\nwalrus body\r\n".encode()
    return Message.from_bytes(
        raw, Envelope(client_ip=IP, mail_from=sender, recipients=rcpts, queue_id="4ABC123DEF")
    )


def _traffic(observer: RecordsObserver) -> None:
    """Five decisions: the same as tests/test_records_cli.py, plus one to twelve mailboxes."""
    observer.on_message(_msg(DAVE, (ALICE, BOB), "<a@x>"), Decision(Action.ACCEPT, None, "OK"))
    observer.on_message(
        _msg(DAVE, (BOB,), "<b@x>"),
        Decision(Action.REJECT, SmtpReply(554, "5.7.1", "virus"), "CLAMAV_VIRUS"),
    )
    observer.on_recipient(
        Envelope(client_ip=IP, mail_from=DAVE),
        RecipientDecision(
            ALICE, Action.REJECT, SmtpReply(550, "5.7.1", "listed"), False, (), "DNSBL_ZEN_SBL"
        ),
    )
    observer.on_message(
        _msg(DAVE, (BOB,), "<c@x>"),
        Decision(Action.REJECT, SmtpReply(550, "5.7.1", "spam"), "CLASSIFIER_SPAM"),
    )
    observer.on_message(_msg(DAVE, MANY, "<many@x>"), Decision(Action.ACCEPT, None, "OK"))
    assert observer.failures == 0 and observer.written == 5


def _schema_file(tmp_path: Path, smtp_log: str) -> Path:
    text = DEFAULT_SCHEMA.read_text(encoding="utf-8")
    text, n = re.subn(r'(?m)^smtp-log = "[^"]*"', f'smtp-log = "{smtp_log}"', text)
    assert n == 1
    path = tmp_path / "retention.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("pseudonymise", [False, True], ids=["clear", "pseudonymised"])
def test_records_export_erase_stats_audit(topology: Topology, pseudonymise: bool) -> None:
    client = topology.client()
    schema = load_schema()
    pseudo = Pseudonymizer(client, schema) if pseudonymise else None
    observer = RecordsObserver(RecordWriter(schema, client, pseudonymizer=pseudo))
    _traffic(observer)

    audit = audit_keys(client, schema)
    assert audit.ok, audit.problems
    index_count = 2 + len(MANY) + 1  # alice, bob, the twelve, dave
    expected_kinds = {"smtp-log": 5, "mailbox-index": index_count, "daily-counters": 1}
    if pseudonymise:
        expected_kinds["pseudonym-key"] = 1
    assert audit.keys_by_kind == expected_kinds
    index_keys = [_text(k) for k in client.scan_iter(match=keyspace.index_key("*"))]
    assert len(index_keys) == index_count
    assert len({_owner(client, k) for k in index_keys}) == topology.shards

    export = export_mailbox(client, schema, ALICE, pseudonymizer=pseudo)
    assert sorted(r.get("message_id") or r["phase"] for r in export["records"]) == [
        "<a@x>",
        "rcpt",
    ]
    senders = {r["sender"] for r in export["records"]}
    if pseudonymise:  # another party's address stays as stored: a pseudonym
        assert len(senders) == 1 and senders.pop().startswith("p:")
    else:
        assert senders == {DAVE}
    bob = export_mailbox(client, schema, BOB, pseudonymizer=pseudo)
    assert len(bob["records"]) == 3
    many = export_mailbox(client, schema, MANY[5], pseudonymizer=pseudo)
    assert [r["other_recipients"] for r in many["records"]] == [len(MANY) - 1]

    counts = erase_mailbox(client, schema, MANY[5], pseudonymizer=pseudo)
    assert counts == {"records": 1, "index_entries": 1, "other_index_entries": len(MANY)}
    assert export_mailbox(client, schema, MANY[6], pseudonymizer=pseudo)["records"] == []
    assert len(export_mailbox(client, schema, DAVE, pseudonymizer=pseudo)["records"]) == 4
    again = erase_mailbox(client, schema, MANY[5], pseudonymizer=pseudo)
    assert again["records"] == 0

    today = datetime.now(UTC).date()
    days = daily_stats(client, schema, since=today, until=today)
    assert len(days) == 1
    assert {k: v for k, v in days[0].categories.items() if v} == {
        "accepted": 2 + len(MANY),
        "virus": 1,
        "blocklist": 1,
        "classifier": 1,
    }
    assert audit_keys(client, schema).ok


def test_records_expire_by_themselves(topology: Topology, tmp_path: Path) -> None:
    client = topology.client()
    schema = load_schema(_schema_file(tmp_path, "2s"))
    observer = RecordsObserver(RecordWriter(schema, client))
    observer.on_message(_msg(DAVE, MANY, "<exp@x>"), Decision(Action.ACCEPT, None, "OK"))
    assert observer.failures == 0
    keys = [_text(k) for k in client.scan_iter(match="filterd:v1:rec:*")]
    assert len(keys) == 1 + len(MANY) + 1
    for key in keys:
        assert 0 < client.ttl(key) <= 2, key
    stats_ttl = client.ttl(keyspace.stats_key(datetime.now(UTC).strftime("%Y-%m-%d")))
    assert 399 * 86400 < stats_ttl <= 400 * 86400
    deadline = time.monotonic() + 10
    while list(client.scan_iter(match="filterd:v1:rec:*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(client.scan_iter(match="filterd:v1:rec:*")) == []
    assert export_mailbox(client, schema, MANY[0])["records"] == []


def test_stats_scan_visits_every_shard(topology: Topology) -> None:
    """Forty days of counters land on every primary; `daily_stats` finds each day."""
    client = topology.client()
    schema = load_schema()
    writer = RecordWriter(schema, client)
    first = date(2026, 1, 1)
    days = [(first + timedelta(days=i)).isoformat() for i in range(40)]
    batch = writer.batch()
    for i, day in enumerate(days):
        batch.count(day, "accept", "OK", i + 1)
    batch.execute()
    assert len({_owner(client, keyspace.stats_key(d)) for d in days}) == topology.shards
    found = daily_stats(client, schema, since=first, until=first + timedelta(days=39))
    assert [d.day for d in found] == days
    assert [d.categories["accepted"] for d in found] == list(range(1, 41))


def test_cli_tools_take_the_url(topology: Topology, tmp_path: Path) -> None:
    client = topology.client()
    observer = RecordsObserver(RecordWriter(load_schema(), client))
    _traffic(observer)
    cfg = tmp_path / "filterd.toml"
    cfg.write_text(
        "[pipeline]\nrecipient_checks = []\nmessage_checks = []\n"
        f'[redis]\nurl = "{topology.url}"\n[records]\n'
    )
    runner = CliRunner()
    added = runner.invoke(allow, ["--config", str(cfg), "add", ALICE, DAVE, "*@friend.example"])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(allow, ["--config", str(cfg), "list", ALICE])
    assert listed.output.splitlines() == ["*@friend.example", DAVE]
    exported = runner.invoke(records, ["export", "--config", str(cfg), ALICE])
    assert exported.exit_code == 0, exported.output
    data = json.loads(exported.output)
    assert len(data["records"]) == 2 and len(data["other"]["allowlist"]["entries"]) == 2
    result = runner.invoke(stats, ["--config", str(cfg), "--json", "--days", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["days"][0]["accepted"] == 2 + len(MANY)
    erased = runner.invoke(records, ["erase", "--config", str(cfg), ALICE])
    assert erased.exit_code == 0, erased.output
    assert runner.invoke(allow, ["--config", str(cfg), "list", ALICE]).output == ""
    audited = runner.invoke(records, ["audit", "--config", str(cfg)])
    assert audited.exit_code == 0 and audited.output.startswith("ok:"), audited.output


# A stand-in for the outbound helper's bucket script: one call reads and bumps every
# window of one account. It proves the keyspace's promise, not the rate-limit logic.
_BUMP_ALL_WINDOWS = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], 60)
end
return out
"""


def test_one_script_touches_all_windows_of_one_account(topology: Topology) -> None:
    client = topology.client()
    windows = ["messages_per_minute", "messages_per_hour", "messages_per_day"]
    for account in ("alice@example.org", "bob@example.org", "odd}{login@example.org"):
        keys = [_rl(account).buckets[w] for w in windows]
        assert client.eval(_BUMP_ALL_WINDOWS, len(keys), *keys) == [1, 1, 1]
        assert client.eval(_BUMP_ALL_WINDOWS, len(keys), *keys) == [2, 2, 2]
    if topology.name == "cluster":
        # The same script over two accounts is refused by the cluster: the test above
        # passes because of the hash tag, not by chance.
        mixed = [_rl(a).buckets["messages_per_minute"] for a in ("alice@example.org", "x@y.z")]
        assert key_slot(mixed[0].encode()) != key_slot(mixed[1].encode())
        with pytest.raises((redis.RedisError, RedisClusterException), match=r"(?i)slot"):
            client.eval(_BUMP_ALL_WINDOWS, 2, *mixed)


def test_a_multi_key_transaction_is_only_used_where_the_topology_allows(
    topology: Topology,
) -> None:
    client = topology.client()
    keys = [keyspace.log_key(f"{i:012x}") for i in range(10)]
    pipe = pipeline(client, atomic=True)
    for key in keys:
        pipe.set(key, "{}", ex=60)
    assert pipe.execute() == [True] * 10
    if topology.name == "cluster":
        raw = client.pipeline(transaction=True)
        for key in keys:
            raw.set(key, "{}", ex=60)
        with pytest.raises((redis.RedisError, RedisClusterException), match=r"(?i)slot"):
            raw.execute()


# --------------------------------------------------------------------------------------------
# Sentinel: two nodes, one master, one replica, three sentinels; the master is SIGKILLed

SENDER = "friend@example.net"
LISTED, UNLISTED = "alice@example.org", "bob@example.org"
API_SECRET = "sentinel-test-secret-0123456789"
SPAM_BODY = "Best offer: http://www.evil.example/buy\n"
CLEAN_BODY = "See you at lunch.\n"
DBL_ZONES = [("dbl.test", "dnset", ":127.0.1.2:DBL\nevil.example\ndbltest.com\n")]
# What each kind of message is: (recipient, body). Only "spam-unlisted" must never arrive.
KINDS = {
    "clean": (UNLISTED, CLEAN_BODY),
    "spam-listed": (LISTED, SPAM_BODY),
    "spam-unlisted": (UNLISTED, SPAM_BODY),
}


def _mail(tag: str, body: str) -> bytes:
    return (
        f"From: Friend <{SENDER}>\nTo: <undisclosed@example.org>\nSubject: hello\n"
        f"Message-ID: <sentinel-{tag}@example.net>\n\n{body}"
    ).encode()


@dataclass
class Sent:
    node: str
    tag: str
    kind: str
    started: float
    seconds: float
    code: int  # the final reply: 250 after the dot, else the first refusal
    text: str


def _send(node: str, postfix: Any, tag: str, rcpt: str, body: str, kind: str = "") -> Sent:
    """One SMTP session with one recipient; its final reply, whatever it is."""
    from tests.servers import send_mail

    t0 = time.monotonic()
    result = send_mail(postfix.port, SENDER, [rcpt], _mail(tag, body), timeout=60)
    seconds = time.monotonic() - t0
    reply = result.mail
    if reply is not None and reply.code < 300:
        reply = result.rcpts.get(rcpt)
        if reply is not None and reply.code < 300:
            reply = result.data
    if reply is None:
        raise AssertionError(f"{tag}: the session ended without a final reply: {result}")
    return Sent(node, tag, kind, t0, seconds, reply.code, reply.text)


def _delivered_tags(sink: Any) -> set[str]:
    tags = set()
    for m in sink.deliveries():
        found = re.search(rb"Message-ID: <sentinel-([^@>]+)@", m.data)
        if found:
            tags.add(found.group(1).decode())
    return tags


def _wait_delivered(sink: Any, tags: set[str], timeout: float = 30.0) -> set[str]:
    """The tags still missing at the sink after waiting for them."""
    deadline = time.monotonic() + timeout
    while True:
        missing = tags - _delivered_tags(sink)
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


@pytest.fixture(scope="module")
def sentinel_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Sentinel group + rbldnsd + sink; nodes A and B (daemon + Postfix); A's HTTP API.

    The API runs as its own process (`filterd allow api`), like a customer panel's
    backend on node A; both daemons and the API read [redis] url = redis+sentinel://.
    """
    import os
    import subprocess
    import sys
    import urllib.request

    from tests.helpers_daemon import ROOT, DaemonProcess, write_config
    from tests.redis_topology import SentinelGroup
    from tests.servers import PostfixServer, RbldnsdServer, SmtpSink, free_port

    base = make_reachable(tmp_path_factory.mktemp("sentinel-e2e"))
    site = base / "site.txt"
    site.write_text("# empty\n")
    with (
        SentinelGroup(base / "redis", down_after_ms=1000) as group,
        RbldnsdServer(base / "rbldnsd", DBL_ZONES) as rbl,
        SmtpSink(base / "sink") as sink,
    ):
        cfg = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "state"), "log_level": "info"},
                "redis": {"url": group.url, "socket_timeout": 1.0},
                "pipeline": {
                    "recipient_checks": ["allowlist"],
                    "message_checks": ["allowlist", "uribl"],
                },
                "allowlist": {"site_files": [str(site)]},
                "uribl": dbl_uribl(rbl.nameserver),
            },
        )
        api_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FILTERD_")}
        env["FILTERD_ALLOWLIST_API_SECRET"] = API_SECRET
        api_log = (base / "api.log").open("wb")
        api = subprocess.Popen(
            [sys.executable, "-m", "filterd", "allow", "api", "--config", str(cfg),
             "--listen", f"127.0.0.1:{api_port}"],
            cwd=ROOT, env=env, stdout=api_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/health", timeout=1)
                    break
                except OSError:
                    assert api.poll() is None, (base / "api.log").read_text()
                    assert time.monotonic() < deadline, "the allowlist API did not answer"
                    time.sleep(0.05)
            with (
                DaemonProcess(base / "nodeA", cfg) as daemon_a,
                DaemonProcess(base / "nodeB", cfg) as daemon_b,
                PostfixServer(
                    base / "postfixA", sink.port, milter=daemon_a.milter_for_postfix,
                    milter_default_action="reject",
                ) as postfix_a,
                PostfixServer(
                    base / "postfixB", sink.port, milter=daemon_b.milter_for_postfix,
                    milter_default_action="reject",
                ) as postfix_b,
            ):  # fmt: skip
                yield {
                    "group": group,
                    "sink": sink,
                    "api": f"http://127.0.0.1:{api_port}",
                    "A": postfix_a,
                    "B": postfix_b,
                }
        finally:
            api.terminate()
            api.wait(10)
            api_log.close()


def _api(nodes: dict[str, Any], method: str, mailbox: str, entries: list[str] | None = None) -> Any:
    """One request to node A's allowlist API with the mailbox's own token."""
    import urllib.request

    from filterd.allowlist.api import make_token

    path = f"/v1/allowlists/{mailbox}" + ("/entries" if entries is not None else "")
    data = json.dumps({"entries": entries}).encode() if entries is not None else None
    request = urllib.request.Request(
        nodes["api"] + path,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {make_token(API_SECRET.encode(), mailbox)}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.e2e
def test_an_edit_through_node_a_api_is_honoured_by_node_b(sentinel_nodes: dict[str, Any]) -> None:
    info = describe_topology(connect(settings(), sentinel_nodes["group"].url))
    assert info["mode"] == "sentinel" and info["replicas"] == 1 and len(info["sentinels"]) == 3
    # `filterd check` names the master the sentinels point at now.
    from filterd.check import check_redis_topology

    url = sentinel_nodes["group"].url
    [line] = check_redis_topology(load_settings(env={"FILTERD_REDIS_URL": url}))
    assert line.level == "ok" and f"master {info['master']}" in line.text, line
    assert "1 replicas, 3 sentinels" in line.text, line
    erin = "erin@example.org"
    before = _send("B", sentinel_nodes["B"], "edit-1", erin, SPAM_BODY)
    assert before.code == 554 and "dbl.test" in before.text, before
    assert _api(sentinel_nodes, "POST", erin, [SENDER])["count"] == 1
    after = _send("B", sentinel_nodes["B"], "edit-2", erin, SPAM_BODY)
    assert after.code == 250, after
    assert _wait_delivered(sentinel_nodes["sink"], {"edit-2"}) == set()


@pytest.mark.e2e
def test_master_killed_under_traffic_nothing_lost_and_both_nodes_recover(
    sentinel_nodes: dict[str, Any],
) -> None:
    import itertools
    import threading

    group = sentinel_nodes["group"]
    sink = sentinel_nodes["sink"]
    assert _api(sentinel_nodes, "POST", LISTED, [SENDER])["count"] >= 1
    results: list[Sent] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()
    promoted_at: list[float] = []
    recovered: dict[str, float] = {}

    def traffic(node: str) -> None:
        kinds = itertools.cycle(KINDS)
        try:
            for i in itertools.count():
                if stop.is_set():
                    return
                kind = next(kinds)
                rcpt, body = KINDS[kind]
                sent = _send(node, sentinel_nodes[node], f"{node}-{i}", rcpt, body, kind)
                with lock:
                    results.append(sent)
                    if (
                        promoted_at
                        and sent.kind == "spam-listed"
                        and sent.code == 250
                        and sent.started >= promoted_at[0]
                        and node not in recovered
                    ):
                        recovered[node] = sent.started + sent.seconds - promoted_at[0]
                # Paced like a busy MX (about 20 sessions/s per node), not a CPU burner:
                # a refused session takes milliseconds.
                stop.wait(0.05)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=traffic, args=(n,), daemon=True) for n in "AB"]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while sum(r.code == 250 for r in results) < 6:  # both nodes in steady state
            assert time.monotonic() < deadline and not errors, (errors, results)
            time.sleep(0.05)
        killed_at = time.monotonic()
        group.kill_master()
        group.wait_promoted(timeout=30)
        with lock:
            promoted_at.append(time.monotonic())
        deadline = promoted_at[0] + 30
        while len(recovered) < 2 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        # A little more traffic on the new master, then stop.
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle and not errors:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    assert not errors, errors
    assert set(recovered) == {"A", "B"}, f"a node did not accept mail again: {recovered}"

    # Every message ended delivered or with a 4xx/5xx reply: count them.
    accepted = {r.tag for r in results if r.code == 250}
    tempfailed = [r for r in results if 400 <= r.code < 500]
    refused = [r for r in results if r.code >= 500]
    assert len(accepted) + len(tempfailed) + len(refused) == len(results)
    lost = _wait_delivered(sink, accepted)
    assert lost == set(), f"accepted but never delivered: {sorted(lost)}"
    # Never a wrong accept: spam for the recipient without a list never got through ...
    wrong = [r for r in results if r.kind == "spam-unlisted" and r.code == 250]
    assert wrong == []
    # ... and the only refusals are the blocklist's, the only deferrals filterd's fail-closed.
    assert all(r.kind == "spam-unlisted" and "dbl.test" in r.text for r in refused), refused
    assert all(r.code == 451 and "4.7.1" in r.text for r in tempfailed), tempfailed
    during = [r for r in tempfailed if killed_at <= r.started <= promoted_at[0]]
    assert during, "no message met the failover: the test proved nothing"
    assert max(r.seconds for r in results) < 10, "a session took longer than the RCPT budget"

    # After the promotion the lists are intact on both nodes, and edits work again.
    for node in "AB":
        assert _send(node, sentinel_nodes[node], f"{node}-after", LISTED, SPAM_BODY).code == 250
        late = _send(node, sentinel_nodes[node], f"{node}-after-x", UNLISTED, SPAM_BODY)
        assert late.code == 554, late
    assert _api(sentinel_nodes, "GET", LISTED)["entries"] == [SENDER]
    assert _api(sentinel_nodes, "POST", "carol@example.org", [SENDER])["count"] == 1
    assert _send("B", sentinel_nodes["B"], "carol", "carol@example.org", SPAM_BODY).code == 250
    assert _wait_delivered(sink, {"A-after", "B-after", "carol"}) == set()

    figures = {
        "messages": len(results),
        "accepted": len(accepted),
        "tempfailed_451": len(tempfailed),
        "refused_5xx": len(refused),
        "lost": len(lost),
        "promotion_seconds": round(group.promotion_seconds or 0, 2),
        "recovery_after_promotion_seconds": {n: round(s, 2) for n, s in recovered.items()},
        "longest_session_seconds": round(max(r.seconds for r in results), 2),
    }
    print("sentinel failover figures:", json.dumps(figures))


def _calls(url: str) -> dict[str, int]:
    """Commands each server has run, summed over every primary (INFO commandstats)."""
    ports = [int(p) for p in re.findall(r":(\d+)", url)]
    total: dict[str, int] = {}
    for port in ports:
        server = redis.Redis("127.0.0.1", port)
        for name, value in server.info("commandstats").items():
            command = name.removeprefix("cmdstat_")
            total[command] = total.get(command, 0) + int(value["calls"])
        server.close()
    return total


def test_a_records_write_sends_only_its_own_commands(topology: Topology) -> None:
    """One message's records: one SET, one EVALSHA per index set and counter, nothing else.

    On Cluster this guards the policy resolver in filterd.clients.redis: without it
    redis-py asks ``COMMAND GETKEYS`` before every EVAL of a pipeline.
    """
    client = topology.client()
    observer = RecordsObserver(RecordWriter(load_schema(), client))
    observer.on_message(
        _msg(DAVE, ("warm@example.org",), "<w@x>"), Decision(Action.ACCEPT, None, "OK")
    )
    for port in re.findall(r":(\d+)", topology.url):
        node = redis.Redis("127.0.0.1", int(port))
        node.script_load(keyspace.INDEX_WRITE)
        node.script_load(keyspace.WRITE_WITH_EXPIRY)
        node.close()
    before = _calls(topology.url)
    observer.on_message(_msg(DAVE, MANY, "<one@x>"), Decision(Action.ACCEPT, None, "OK"))
    after = _calls(topology.url)
    assert observer.failures == 0
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    for own in ("info", "hello", "client|setinfo"):  # _calls's own connection
        delta.pop(own, None)
    # One script per mailbox index (trim, add, expire) and one for the day's counter, all
    # by SHA (loaded on every primary above).
    indexes = len(MANY) + 1
    expected = {"set": 1, "evalsha": len(MANY) + 2, "hincrby": 1}
    expected.update(zremrangebyscore=indexes, zadd=indexes, expire=indexes + 1)
    if topology.name == "single":
        expected.update({"multi": 1, "exec": 1})
    assert delta == expected


def test_records_survive_an_empty_script_cache(topology: Topology) -> None:
    """After SCRIPT FLUSH on every primary (a restart, a failover, a new node), the
    NOSCRIPT answers are sent again as EVAL: every write arrives, with its TTL."""
    client = topology.client()
    schema = load_schema()
    observer = RecordsObserver(RecordWriter(schema, client))
    ports = [int(p) for p in re.findall(r":(\d+)", topology.url)]
    for port in ports:
        node = redis.Redis("127.0.0.1", port)
        node.script_flush()
        node.close()
    before = _calls(topology.url)
    observer.on_message(_msg(DAVE, MANY, "<flushed@x>"), Decision(Action.ACCEPT, None, "OK"))
    after = _calls(topology.url)
    assert observer.failures == 0 and observer.written == 1
    scripts = len(MANY) + 2
    assert after["evalsha"] - before.get("evalsha", 0) == scripts
    assert after["eval"] - before.get("eval", 0) == scripts
    for mailbox in (DAVE, *MANY):
        (record,) = export_mailbox(client, schema, mailbox)["records"]
        assert record["message_id"] == "<flushed@x>"
    stored = [_text(k) for k in client.scan_iter(match="filterd:v1:*")]
    assert len(stored) == 1 + len(MANY) + 1 + 1  # entry, indexes, counter
    for key in stored:
        assert client.ttl(key) > 0, key


def _connected_clients(port: int) -> int:
    probe = redis.Redis("127.0.0.1", port)
    try:
        return int(probe.info("clients")["connected_clients"]) - 1  # minus the probe
    finally:
        probe.close()


@pytest.mark.e2e
def test_closing_a_sentinel_client_closes_its_sentinel_connections(
    sentinel_nodes: dict[str, Any],
) -> None:
    """A SIGHUP reload replaces the client: the old one must not keep sentinel sockets."""
    group = sentinel_nodes["group"]
    ports = [s.port for s in group.sentinels]
    before = sum(_connected_clients(p) for p in ports)
    client = connect(settings(), group.url)
    client.ping()
    during = sum(_connected_clients(p) for p in ports)
    client.close()
    deadline = time.monotonic() + 5
    while sum(_connected_clients(p) for p in ports) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert during > before
    assert sum(_connected_clients(p) for p in ports) == before


def test_a_master_without_its_replica_refuses_edits_and_the_api_says_retry(
    single_redis: RedisServer,
) -> None:
    """docs/deployment.md recommends min-replicas-to-write: an edit no replica has is
    refused (the panel retries) rather than acknowledged and lost in a failover."""
    import http.client
    import threading

    from filterd.allowlist.api import AllowlistApi, make_server, make_token

    secret = b"0123456789abcdef-test-secret"
    admin = redis.Redis.from_url(single_redis.url)
    admin.flushall()
    config = AllowConfig()
    server = make_server(
        AllowlistApi(AllowlistStore(connect(settings(), single_redis.url), config), config, secret),
        "127.0.0.1:0",
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def post() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        conn.request(
            "POST",
            "/v1/allowlists/alice%40example.org/entries",
            body=json.dumps({"entries": [SENDER]}).encode(),
            headers={
                "Authorization": f"Bearer {make_token(secret, ALICE)}",
                "Content-Type": "application/json",
            },
        )
        status = conn.getresponse().status
        conn.close()
        return status

    try:
        admin.config_set("min-replicas-to-write", 1)  # this Redis has no replica
        assert post() == 503
        assert list(admin.scan_iter()) == []
        admin.config_set("min-replicas-to-write", 0)
        assert post() == 200
        assert admin.smembers(keyspace.allow_mailbox_key(ALICE)) == {SENDER.encode()}
    finally:
        admin.config_set("min-replicas-to-write", 0)
        admin.flushall()
        admin.close()
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
def test_the_daemon_on_a_cluster_filters_honours_lists_and_records(
    redis_cluster: RedisClusterGroup, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`filterd serve` with redis+cluster://: the allowlist decides, records land on the shards."""
    from tests.helpers_daemon import DaemonProcess, write_config
    from tests.servers import PostfixServer, RbldnsdServer, SmtpSink

    redis_cluster.flush()
    base = make_reachable(tmp_path_factory.mktemp("cluster-e2e"))
    client = connect(settings(), redis_cluster.url)
    store = AllowlistStore(client, AllowConfig())
    store.add(parse_target(LISTED, store.config), [parse_entry(SENDER, store.config)])
    with (
        RbldnsdServer(base / "rbldnsd", DBL_ZONES) as rbl,
        SmtpSink(base / "sink") as sink,
    ):
        cfg = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "state")},
                "redis": {"url": redis_cluster.url, "socket_timeout": 1.0},
                "pipeline": {
                    "recipient_checks": ["allowlist"],
                    "message_checks": ["allowlist", "uribl"],
                },
                "allowlist": {"site_files": []},
                "uribl": dbl_uribl(rbl.nameserver),
            },
        )
        with (
            DaemonProcess(base / "daemon", cfg) as daemon,
            PostfixServer(
                base / "postfix", sink.port, milter=daemon.milter_for_postfix,
                milter_default_action="reject",
            ) as postfix,
        ):  # fmt: skip
            listed = _send("c", postfix, "cluster-listed", LISTED, SPAM_BODY)
            unlisted = _send("c", postfix, "cluster-unlisted", UNLISTED, SPAM_BODY)
            clean = _send("c", postfix, "cluster-clean", UNLISTED, CLEAN_BODY)
            assert (listed.code, unlisted.code, clean.code) == (250, 554, 250), (
                listed,
                unlisted,
                clean,
            )
            assert _wait_delivered(sink, {"cluster-listed", "cluster-clean"}) == set()
    schema = load_schema()
    assert len(export_mailbox(client, schema, UNLISTED)["records"]) == 2
    audit = audit_keys(client, schema)
    assert audit.ok and audit.keys_by_kind["smtp-log"] == 3, audit
    today = datetime.now(UTC).date()
    (day,) = daily_stats(client, schema, since=today, until=today)
    assert day.categories["accepted"] == 2 and day.categories["blocklist"] == 1
