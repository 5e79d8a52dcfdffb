"""Records against a real Redis: TTLs, no content, export/erase, expiry, pseudonyms.

The observer is driven the way the daemon drives it, with Envelope/Message/
Decision objects; everything stored is then read back from Redis itself (SCAN
over all keys, every data type), not through the code under test.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from filterd import keyspace as keys
from filterd.allowlist.config import Config as AllowConfig
from filterd.allowlist.entries import parse_target
from filterd.allowlist.store import AllowlistStore
from filterd.records.config import Config
from filterd.records.observer import RecordsObserver, build_observer
from filterd.records.pseudonym import Pseudonymizer
from filterd.records.query import audit_keys, daily_stats, erase_mailbox, export_mailbox
from filterd.records.schema import DEFAULT_SCHEMA, Schema, SchemaError, SchemaViolation, load_schema
from filterd.records.writer import RecordWriter
from filterd.types import (
    Action,
    Decision,
    Envelope,
    Message,
    RecipientDecision,
    SmtpReply,
)

pytestmark = pytest.mark.integration

SUBJECT = "Quarterly zebra migration plan QZ7"
BODY_LINES = ("The walrus sings at midnight near pier 9.", "Invoice total: 4242.17 tangerines")
CLIENT_IP = "192.0.2.10"
OTHER_IP = "198.51.100.7"
ALICE, BOB, CAROL, DAVE = (
    "alice@example.org",
    "bob@example.org",
    "carol@example.org",
    "dave@example.net",
)
VIRUS = SmtpReply(554, "5.7.1", "virus found: Eicar-Test-Signature")
LISTED = SmtpReply(550, "5.7.1", "client listed at zen")
TEMP = SmtpReply(451, "4.7.1", "try again later")


def schema_file(tmp_path: Path, **tags: str) -> Path:
    """The shipped schema with some tags changed (e.g. smtp_log="2s")."""
    text = DEFAULT_SCHEMA.read_text(encoding="utf-8")
    for tag, value in tags.items():
        name = tag.replace("_", "-")
        text, n = re.subn(rf'(?m)^{re.escape(name)} = "[^"]*"', f'{name} = "{value}"', text)
        assert n == 1, name
    path = tmp_path / "retention.toml"
    path.write_text(text, encoding="utf-8")
    return path


def raw_message(message_id: str) -> bytes:
    body = "\r\n".join(BODY_LINES)
    return (
        f"From: Sender <{DAVE}>\r\nTo: {ALICE}\r\nSubject: {SUBJECT}\r\n"
        f"Message-ID: {message_id}\r\nX-Note: secret-header-value-HX1\r\n\r\n{body}\r\n"
    ).encode()


def message(
    sender: str,
    recipients: tuple[str, ...],
    *,
    mid: str = "<m1@example.net>",
    ip: str = CLIENT_IP,
    queue_id: str = "4ABC123DEF",
) -> Message:
    env = Envelope(
        client_ip=ip,
        client_name="mail.example.net",
        helo="mail.example.net",
        mail_from=sender,
        recipients=recipients,
        queue_id=queue_id,
    )
    return Message.from_bytes(raw_message(mid), env)


def all_stored(client: redis.Redis) -> list[tuple[bytes, list[bytes]]]:
    """Every key with every value it holds, whatever its type."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: list[Any]
        if kind == "string":
            values = [client.get(key)]
        elif kind == "hash":
            values = [x for pair in client.hgetall(key).items() for x in pair]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [
                x for _, fields in client.xrange(key) for pair in fields.items() for x in pair
            ]
        else:
            raise AssertionError(f"unexpected type {kind} for {key!r}")
        out.append((key, [v if isinstance(v, bytes) else str(v).encode() for v in values]))
    return out


def blob(client: redis.Redis) -> bytes:
    return b"\n".join(k + b"\n" + b"\n".join(vs) for k, vs in all_stored(client)).lower()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def make_observer(client: redis.Redis, path: Path | None = None, **config: Any) -> RecordsObserver:
    cfg = Config(schema_file=str(path or DEFAULT_SCHEMA), **config)
    observer = build_observer(cfg, client)
    assert observer is not None
    return observer


def traffic(observer: RecordsObserver) -> dict[str, list[str]]:
    """A small day of mail; returns which mailboxes each entry names, in order.

    Entries are timestamped to the millisecond and exported in time order; a pause between
    them keeps that order the order written (a fast Redis writes two within a millisecond).
    """
    observer.on_message(
        message(DAVE, (ALICE, BOB), mid="<ok1@example.net>"), Decision(Action.ACCEPT, None, "OK")
    )
    time.sleep(0.002)
    observer.on_message(
        message(DAVE, ("Alice+news@Example.org",), mid="<v1@example.net>"),
        Decision(Action.REJECT, VIRUS, "CLAMAV_VIRUS"),
    )
    time.sleep(0.002)
    observer.on_recipient(
        Envelope(client_ip=OTHER_IP, mail_from="spam@bad.example", queue_id=None),
        RecipientDecision(CAROL, Action.REJECT, LISTED, False, (), "DNSBL_ZEN_SBL"),
    )
    time.sleep(0.002)
    observer.on_recipient(
        Envelope(client_ip=CLIENT_IP, mail_from=DAVE),
        RecipientDecision(BOB, Action.ACCEPT, None, False, (), "OK"),
    )
    time.sleep(0.002)
    observer.on_message(
        message(BOB, (CAROL,), mid="<t1@example.org>"),
        Decision(Action.TEMPFAIL, TEMP, "CLAMAV_FAIL"),
    )
    assert observer.failures == 0
    return {
        ALICE: ["<ok1@example.net>", "<v1@example.net>"],
        BOB: ["<ok1@example.net>", "<t1@example.org>"],
        CAROL: ["rcpt", "<t1@example.org>"],
    }


def assert_audit_ok(client: redis.Redis, schema: Schema) -> dict[str, int]:
    result = audit_keys(client, schema)
    assert result.ok, result.problems
    return result.keys_by_kind


def test_every_key_is_declared_and_expires_within_its_tag(client: redis.Redis) -> None:
    schema = load_schema()
    observer = make_observer(client, abuse_evidence=True)
    traffic(observer)
    # Another owner's data (user content without TTL) is in the same Redis.
    allow_cfg = AllowConfig()
    from filterd.allowlist.entries import parse_entry

    AllowlistStore(client, allow_cfg).add(
        parse_target(ALICE, allow_cfg), [parse_entry("friend@example.net", allow_cfg)]
    )
    by_kind = assert_audit_ok(client, schema)
    assert by_kind["smtp-log"] == 4
    assert by_kind["mailbox-index"] == 5  # alice, bob, carol, dave, spam@bad.example
    assert by_kind["daily-counters"] == 1
    assert by_kind["abuse-evidence"] == 2  # two refusals with a client IP
    assert by_kind["allowlist"] == 1
    for key in client.scan_iter():
        kind = schema.kind_for_key(keys.strip_prefix(key.decode()) or "")
        assert kind is not None
        ttl = client.ttl(key)
        limit = kind.retention.seconds
        assert (ttl == -1) if limit is None else (0 < ttl <= limit), (key, ttl)


def test_audit_reports_stray_and_immortal_keys(client: redis.Redis) -> None:
    schema = load_schema()
    client.set("filterd:v1:unknown:thing", "x", ex=10)
    client.set(keys.log_key("00aa11bb22cc"), "{}")  # a log entry without TTL
    client.set(keys.stats_key("2026-01-01"), "{}", ex=10**9)
    problems = "\n".join(audit_keys(client, schema).problems)
    assert "belongs to no kind" in problems
    assert "has no TTL" in problems
    assert "exceeds daily-counters" in problems


def test_no_subject_body_or_header_is_stored(client: redis.Redis) -> None:
    observer = make_observer(client, abuse_evidence=True)
    traffic(observer)
    assert SUBJECT.encode() in message(DAVE, (ALICE,)).raw  # the test messages had them
    stored = blob(client)
    assert stored, "nothing was stored"
    for secret in (
        SUBJECT,
        *BODY_LINES,
        "secret-header-value-HX1",
        "walrus",
        "zebra",
        "Eicar-Test-Signature",
        "client listed",
    ):
        assert secret.lower().encode() not in stored, secret


def test_statistics_hold_no_address_and_no_ip(client: redis.Redis) -> None:
    schema = load_schema()
    traffic(make_observer(client))
    stats_keys = list(client.scan_iter(match=keys.stats_pattern()))
    assert stats_keys
    for key in stats_keys:
        assert client.ttl(key) <= schema.kind("daily-counters").retention.seconds
        for name, value in client.hgetall(key).items():
            text = (key + b" " + name + b" " + value).decode()
            assert "@" not in text
            assert not re.search(r"\d+\.\d+\.\d+\.\d+|[0-9a-f]*:[0-9a-f]*:", text), text
    (day,) = daily_stats(client, schema)
    assert day.categories["accepted"] == 2  # unit: recipients
    assert day.categories["virus"] == 1
    assert day.categories["blocklist"] == 1
    assert day.categories["tempfailed"] == 1
    assert day.categories["classifier"] == 0
    assert day.reasons == {
        "accept|OK": 2,
        "reject|CLAMAV_VIRUS": 1,
        "reject|DNSBL_ZEN_SBL": 1,
        "tempfail|CLAMAV_FAIL": 1,
    }
    assert "@" not in json.dumps([day.categories, day.reasons])


def _mids(export: dict[str, Any]) -> list[str]:
    return [r.get("message_id", r["phase"]) for r in export["records"]]


def test_export_returns_exactly_one_mailboxs_records(client: redis.Redis) -> None:
    schema = load_schema()
    expected = traffic(make_observer(client))
    for mailbox, mids in expected.items():
        export = export_mailbox(client, schema, mailbox, subaddress_separators="+")
        assert sorted(_mids(export)) == sorted(mids), mailbox
        json.dumps(export)  # JSON-ready
    alice = export_mailbox(client, schema, "ALICE@example.org", subaddress_separators="+")
    first = alice["records"][0]
    assert first["recipients"] == [ALICE] and first["other_recipients"] == 1  # bob not named
    assert first["client_ip"] == CLIENT_IP and first["sender"] == DAVE
    assert 0 < first["expires_in_seconds"] <= 7 * 86400
    # The sender sees whom they sent to.
    dave = export_mailbox(client, schema, DAVE, subaddress_separators="+")
    assert [r["recipients"] for r in dave["records"]] == [[ALICE, BOB], ["Alice+news@Example.org"]]
    # Without sub-address folding, alice+news is a different mailbox.
    assert _mids(export_mailbox(client, schema, ALICE)) == ["<ok1@example.net>"]
    assert export_mailbox(client, schema, "nobody@example.org")["records"] == []


def test_erase_removes_one_mailbox_and_leaves_others_intact(client: redis.Redis) -> None:
    schema = load_schema()
    traffic(make_observer(client))
    before_carol = export_mailbox(client, schema, CAROL, subaddress_separators="+")
    before_keys = {k for k, _ in all_stored(client)}
    counts = erase_mailbox(client, schema, ALICE, subaddress_separators="+")
    assert counts["records"] == 2
    assert export_mailbox(client, schema, ALICE, subaddress_separators="+")["records"] == []
    assert ALICE.encode() not in blob(client) and b"alice+news" not in blob(client)
    # Bob shared one message with alice: that entry went; his other one stays.
    assert _mids(export_mailbox(client, schema, BOB, subaddress_separators="+")) == [
        "<t1@example.org>"
    ]
    after_carol = export_mailbox(client, schema, CAROL, subaddress_separators="+")
    assert after_carol["records"] == before_carol["records"]
    # No index set still points at a deleted entry.
    for key in client.scan_iter(match=keys.index_key("*")):
        for member in client.zrange(key, 0, -1):
            assert client.exists(keys.log_key(member.decode())), key
    # Counters are anonymous and untouched.
    assert daily_stats(client, schema)[0].categories["accepted"] == 2
    gone = before_keys - {k for k, _ in all_stored(client)}
    assert len([k for k in gone if b":rec:log:" in k]) == 2
    assert_audit_ok(client, schema)


def test_erase_dry_run_deletes_nothing(client: redis.Redis) -> None:
    schema = load_schema()
    traffic(make_observer(client))
    before = all_stored(client)
    assert erase_mailbox(client, schema, BOB, dry_run=True)["records"] == 2
    assert sorted(all_stored(client)) == sorted(before)


def test_expiry_actually_removes_records(client: redis.Redis, tmp_path: Path) -> None:
    path = schema_file(tmp_path, smtp_log="2s", pseudonym_key="4s", stats="3s")
    schema = load_schema(path)
    observer = make_observer(client, path)
    traffic(observer)
    assert 0 < client.ttl(next(client.scan_iter(match=keys.log_key("*")))) <= 2
    assert export_mailbox(client, schema, BOB)["records"]
    deadline = time.monotonic() + 15
    while client.dbsize() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.dbsize() == 0, [k for k, _ in all_stored(client)]
    assert export_mailbox(client, schema, BOB)["records"] == []


def test_pseudonymised_mode_stores_no_address_or_ip(client: redis.Redis, tmp_path: Path) -> None:
    schema = load_schema()
    pepper = tmp_path / "pepper"
    pepper.write_text("0123456789abcdef-pepper\n")
    observer = make_observer(
        client, pseudonymise=True, abuse_evidence=True, pseudonym_secret_file=str(pepper)
    )
    expected = traffic(observer)
    stored = blob(client)
    for clear in (ALICE, BOB, CAROL, DAVE, "alice+news", "spam@bad.example", CLIENT_IP, OTHER_IP):
        assert clear.lower().encode() not in stored, clear
    by_kind = assert_audit_ok(client, schema)
    assert by_kind["pseudonym-key"] == 1
    pseudonymizer = Pseudonymizer(client, schema, pepper=b"0123456789abcdef-pepper")
    for mailbox, mids in expected.items():
        export = export_mailbox(
            client, schema, mailbox, pseudonymizer=pseudonymizer, subaddress_separators="+"
        )
        assert sorted(_mids(export)) == sorted(mids), mailbox
    alice = export_mailbox(
        client, schema, ALICE, pseudonymizer=pseudonymizer, subaddress_separators="+"
    )["records"]
    assert alice[0]["recipients"] == [ALICE] and alice[0]["client_ip"].startswith("p:")
    # Without the pepper the pseudonyms do not match: a copy of Redis is not enough.
    wrong = Pseudonymizer(client, schema)
    assert export_mailbox(client, schema, ALICE, pseudonymizer=wrong)["records"] == []
    counts = erase_mailbox(
        client, schema, ALICE, pseudonymizer=pseudonymizer, subaddress_separators="+"
    )
    assert counts["records"] == 2
    assert _mids(
        export_mailbox(
            client, schema, CAROL, pseudonymizer=pseudonymizer, subaddress_separators="+"
        )
    ) == ["rcpt", "<t1@example.org>"]


def test_pseudonym_key_rotates_and_expires(client: redis.Redis, tmp_path: Path) -> None:
    path = schema_file(tmp_path, smtp_log="2s", pseudonym_key="4s")
    schema = load_schema(path)
    now = [(time.time() // 2) * 2]  # the start of a period
    pseudonymizer = Pseudonymizer(client, schema, clock=lambda: now[0])
    first = pseudonymizer.current_key()
    assert pseudonymizer.current_key() == first  # same period, same key
    now[0] += 2
    second = pseudonymizer.current_key()
    assert second != first
    assert Pseudonymizer.token(first, ALICE, "address") != Pseudonymizer.token(
        second, ALICE, "address"
    )
    for key in client.scan_iter(match=keys.pseudonym_key("*")):
        assert -1 != client.ttl(key) <= 4
    # A second process agrees on the key (SET NX), so pseudonyms match across daemons.
    other = Pseudonymizer(client, schema, clock=lambda: now[0])
    assert other.current_key() == second


def test_pseudonym_key_must_outlive_the_records(tmp_path: Path, client: redis.Redis) -> None:
    path = schema_file(tmp_path, pseudonym_key="7d")
    with pytest.raises(SchemaError, match="at least twice"):
        make_observer(client, path, pseudonymise=True)


def test_writer_refuses_an_undeclared_field_and_writes_nothing(client: redis.Redis) -> None:
    writer = RecordWriter(load_schema(), client)
    batch = writer.batch()
    with pytest.raises(SchemaViolation, match="'subject' is not declared"):
        batch.entry("smtp-log", {"timestamp": time.time(), "subject": SUBJECT})
    with pytest.raises(SchemaViolation, match="not written by the records writer"):
        batch.entry("allowlist", {"entry": "x"})
    batch.execute()
    assert client.dbsize() == 0


def test_untagged_schema_is_refused_at_start_up(client: redis.Redis, tmp_path: Path) -> None:
    text = DEFAULT_SCHEMA.read_text(encoding="utf-8").replace(
        "[kinds.smtp-log.fields]\n", '[kinds.smtp-log.fields]\nhelo = { type = "name" }\n'
    )
    path = tmp_path / "retention.toml"
    path.write_text(text)
    with pytest.raises(SchemaError, match="no retention tag"):
        make_observer(client, path)


def test_disabled_records_build_no_observer(client: redis.Redis) -> None:
    assert build_observer(Config(enabled=False), client) is None


def test_writes_are_transactions_one_per_message(client: redis.Redis) -> None:
    observer = make_observer(client)
    client.config_resetstat()
    traffic(observer)
    stats = client.info("commandstats")
    assert stats["cmdstat_multi"]["calls"] == 4  # four entries written, four transactions
    assert stats["cmdstat_exec"]["calls"] == 4
    assert stats["cmdstat_set"]["calls"] == 4
    assert "cmdstat_setex" not in stats and "cmdstat_persist" not in stats


def test_observer_never_raises_when_redis_is_down() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.5, socket_connect_timeout=0.5)
    observer = make_observer(dead)
    observer.on_message(message(DAVE, (ALICE,)), Decision(Action.ACCEPT, None, "OK"))
    observer.on_recipient(
        Envelope(mail_from=DAVE),
        RecipientDecision(BOB, Action.REJECT, LISTED, False, (), "DNSBL_X"),
    )
    assert observer.failures == 2 and observer.written == 0


def test_odd_smtp_values_are_cleaned_not_fatal(client: redis.Redis) -> None:
    observer = make_observer(client)
    odd = Message.from_bytes(
        b"Message-ID: <has space@x> \r\nSubject: s\r\n\r\nb\r\n",
        Envelope(
            client_ip="IPv6:2001:db8::5",
            mail_from='"john doe"@example.org',
            recipients=("<eve@example.org>",),
            queue_id="not a queue id!",
        ),
    )
    observer.on_message(odd, Decision(Action.REJECT, SmtpReply(550, "5.7.1", "no"), "weird code"))
    assert observer.failures == 0 and observer.written == 1
    (record,) = export_mailbox(client, load_schema(), "eve@example.org")["records"]
    assert record["client_ip"] == "2001:db8::5"
    assert record["sender"] == '"john%20doe"@example.org'
    assert record["reason_code"] == "WEIRD_CODE"
    assert "queue_id" not in record and "message_id" not in record


def test_concurrent_callbacks_lose_nothing(client: redis.Redis) -> None:
    from concurrent.futures import ThreadPoolExecutor

    observer = make_observer(client, pseudonymise=True)

    def send(i: int) -> None:
        observer.on_message(
            message(DAVE, (f"user{i % 5}@example.org",), mid=f"<c{i}@example.net>"),
            Decision(Action.ACCEPT, None, "OK"),
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(send, range(200)))
    assert observer.failures == 0 and observer.written == 200
    schema = load_schema()
    assert daily_stats(client, schema)[0].categories["accepted"] == 200
    assert len(list(client.scan_iter(match=keys.pseudonym_key("*")))) == 1
    pseudonymizer = Pseudonymizer(client, schema)
    export = export_mailbox(client, schema, "user3@example.org", pseudonymizer=pseudonymizer)
    assert len(export["records"]) == 40


def test_readers_work_with_a_decoding_client(redis_url: str) -> None:
    text_client = redis.Redis.from_url(redis_url, decode_responses=True)
    observer = make_observer(text_client, pseudonymise=True)
    expected = traffic(observer)
    schema = load_schema()
    pseudonymizer = Pseudonymizer(text_client, schema)
    export = export_mailbox(
        text_client, schema, BOB, pseudonymizer=pseudonymizer, subaddress_separators="+"
    )
    assert sorted(_mids(export)) == sorted(expected[BOB])
    assert daily_stats(text_client, schema)[0].categories["accepted"] == 2
    assert audit_keys(text_client, schema).ok
    assert erase_mailbox(text_client, schema, BOB, pseudonymizer=pseudonymizer)["records"] == 2
