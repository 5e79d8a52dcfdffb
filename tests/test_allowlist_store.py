"""The allowlist store and check against a real redis-server (helper's ``redis_url``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from filterd.allowlist.config import Config
from filterd.allowlist.entries import Entry, parse_entry, parse_target
from filterd.allowlist.files import SiteList
from filterd.allowlist.store import PREFIX, AllowlistStore, LimitError
from filterd.checks.allowlist import AllowlistCheck, needs_verification
from filterd.checks.base import Done
from filterd.types import Effect, Envelope, Finding, Message

pytestmark = pytest.mark.integration


class CountingConnection(redis.Connection):
    """A real connection that counts how many times it writes to Redis (round trips)."""

    writes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        super().send_packed_command(command, check_health)


def entries(*texts: str, config: Config | None = None) -> list[Entry]:
    return [parse_entry(t, config or Config()) for t in texts]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def make_check(
    redis_url: str, tmp_path: Path, config: Config | None = None, site: str = ""
) -> AllowlistCheck:
    """One "node": its own Redis client, its own site list, no shared state."""
    config = config or Config()
    path = tmp_path / f"site-{id(config)}-{len(site)}.txt"
    path.write_text(site)
    store = AllowlistStore(redis.Redis.from_url(redis_url), config)
    return AllowlistCheck(config, store, SiteList([path], config))


def rcpt(check: AllowlistCheck, recipient: str, **envelope: Any) -> list[Finding]:
    return check.check_recipient(Envelope(**envelope), recipient)


def eom(
    check: AllowlistCheck, headers: bytes, exempt: bool = True, **envelope: Any
) -> list[Finding]:
    message = Message.from_bytes(headers + b"\r\nbody\r\n", Envelope(**envelope))
    return check.check_message(message, exempt)


# Store.


def test_add_list_remove_and_canonical_keys(client: redis.Redis) -> None:
    config = Config()
    store = AllowlistStore(client, config)
    alice = parse_target("Alice+shop@Example.org", config)
    change = store.add(alice, entries("Friend@Bank.example", "*@münchen.de", "192.0.2.0/24"))
    assert change.changed == ("friend@bank.example", "*@xn--mnchen-3ya.de", "192.0.2.0/24")
    again = store.add(alice, entries("FRIEND@bank.example", "*@*.bank.example"))
    assert again.changed == ("*@*.bank.example",) and again.unchanged == ("friend@bank.example",)
    assert again.count == 4
    assert store.entries(parse_target("alice@example.org", config)) == sorted(
        ["friend@bank.example", "*@xn--mnchen-3ya.de", "192.0.2.0/24", "*@*.bank.example"]
    )
    removed = store.remove(alice, entries("friend@bank.example", "nobody@bank.example"))
    assert removed.changed == ("friend@bank.example",)
    assert removed.unchanged == ("nobody@bank.example",)
    keys = sorted(k.decode() for k in client.scan_iter("*"))
    assert keys == [f"{PREFIX}mbox:alice@example.org"]
    # User content: no expiry (retention "until the user removes it").
    assert client.ttl(keys[0]) == -1


def test_limit_refuses_the_whole_change(client: redis.Redis) -> None:
    config = Config(max_entries_per_mailbox=3)
    store = AllowlistStore(client, config)
    bob = parse_target("bob@example.org", config)
    store.add(bob, entries("a@x.example", "b@x.example"))
    with pytest.raises(LimitError, match="limit of 3 entries"):
        store.add(bob, entries("c@x.example", "d@x.example"))
    assert store.count(bob) == 2
    # Entries already present do not count against the limit.
    assert store.add(bob, entries("a@x.example", "c@x.example")).count == 3
    with pytest.raises(LimitError):
        store.replace(bob, entries("a@y.example", "b@y.example", "c@y.example", "d@y.example"))
    assert store.count(bob) == 3


def test_limit_holds_under_concurrent_adds(redis_url: str) -> None:
    config = Config(max_entries_per_mailbox=50)
    target = parse_target("carol@example.org", config)
    errors: list[Exception] = []

    def worker(n: int) -> None:
        store = AllowlistStore(redis.Redis.from_url(redis_url), config)
        for i in range(20):
            try:
                store.add(target, entries(f"u{n}-{i}@x.example"))
            except LimitError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = AllowlistStore(redis.Redis.from_url(redis_url), config)
    assert store.count(target) == 50
    assert len(errors) == 50


def test_replace_export_erase(client: redis.Redis) -> None:
    config = Config()
    store = AllowlistStore(client, config)
    dave = parse_target("dave@example.org", config)
    store.add(dave, entries("old@x.example"))
    assert store.replace(dave, entries("new@x.example", "192.0.2.1")) == 2
    exported = store.export_mailbox("Dave+tag@EXAMPLE.org")
    assert exported == {
        "kind": "allowlist",
        "mailbox": "dave@example.org",
        "retention": "user-content",
        "entries": ["192.0.2.1", "new@x.example"],
    }
    assert store.erase_mailbox("dave@example.org") == 2
    assert store.entries(dave) == []
    assert store.erase_mailbox("dave@example.org") == 0


# Check: scopes, per-recipient decisions, one round trip.


def test_each_scope_matches_only_its_recipients(redis_url: str, tmp_path: Path) -> None:
    config = Config()
    check = make_check(redis_url, tmp_path, site="*@site.example\n")
    store = check.store
    assert store is not None
    store.add(parse_target("@hosted.example", config), entries("*@partner.example"))
    store.add(parse_target("alice@hosted.example", config), entries("friend@bank.example"))

    def detail(recipient: str, mail_from: str) -> str | None:
        found = rcpt(check, recipient, mail_from=mail_from, client_ip="198.51.100.7")
        assert all(f.effect is Effect.EXEMPT and not f.bypassable for f in found)
        return found[0].detail if found else None

    assert detail("anyone@other.example", "x@site.example") == "site domain-entry (unverified)"
    assert detail("bob@hosted.example", "x@partner.example") == "domain domain-entry (unverified)"
    assert detail("bob@other.example", "x@partner.example") is None
    assert detail("alice+list@HOSTED.example", "friend@bank.example") == (
        "mailbox address-entry (unverified)"
    )
    assert detail("bob@hosted.example", "friend@bank.example") is None
    assert detail("alice@hosted.example", "enemy@bank.example") is None


def test_domain_lists_can_be_switched_off(redis_url: str, tmp_path: Path) -> None:
    config = Config(domain_lists=False)
    check = make_check(redis_url, tmp_path, config)
    assert check.store is not None
    check.store.add(parse_target("@hosted.example", config), entries("*@partner.example"))
    assert rcpt(check, "bob@hosted.example", mail_from="x@partner.example") == []


def test_lookup_is_one_round_trip(redis_url: str, tmp_path: Path) -> None:
    config = Config()
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    store = AllowlistStore(redis.Redis(connection_pool=pool), config)
    path = tmp_path / "site.txt"
    path.write_text("")
    check = AllowlistCheck(config, store, SiteList([path], config))
    store.add(
        parse_target("alice@example.org", config),
        entries(*(f"u{i}@x.example" for i in range(1000)), config=config)[:999]
        + entries("2001:db8::/32"),
    )
    CountingConnection.writes = 0
    found = rcpt(check, "alice@example.org", mail_from="z@y.example", client_ip="2001:db8::1")
    assert found and found[0].detail == "mailbox cidr-entry"
    assert CountingConnection.writes == 1
    CountingConnection.writes = 0
    assert rcpt(check, "alice@example.org", mail_from="z@y.example", client_ip="192.0.2.1") == []
    assert CountingConnection.writes == 1


def test_edit_is_seen_by_a_second_node_at_once(redis_url: str, tmp_path: Path) -> None:
    """Two checks with separate Redis clients stand for two milter nodes."""
    config = Config()
    node_a = make_check(redis_url, tmp_path, site="")
    node_b = make_check(redis_url, tmp_path, config=Config(), site="#\n")
    envelope = {"mail_from": "friend@bank.example", "client_ip": "198.51.100.7"}
    assert rcpt(node_b, "alice@example.org", **envelope) == []  # B has looked before
    assert node_a.store is not None
    node_a.store.add(parse_target("alice@example.org", config), entries("friend@bank.example"))
    # No local cache: B's very next lookup sees the edit (well within a second).
    assert rcpt(node_b, "alice@example.org", **envelope)
    node_a.store.remove(parse_target("alice@example.org", config), entries("friend@bank.example"))
    assert rcpt(node_b, "alice@example.org", **envelope) == []


def test_redis_down_raises_so_the_pipeline_tempfails(tmp_path: Path) -> None:
    config = Config()
    assert config.on_failure == "tempfail"
    client = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    path = tmp_path / "site.txt"
    path.write_text("")
    check = AllowlistCheck(config, AllowlistStore(client, config), SiteList([path], config))
    with pytest.raises(redis.ConnectionError):
        rcpt(check, "alice@example.org", mail_from="friend@bank.example")


# Strict mode: verification at end of message.

FORGED = b"From: Friend <friend@bank.example>\r\n"
OTHER_FROM = b"From: Someone <someone@elsewhere.example>\r\n"


@pytest.fixture
def strict(redis_url: str, tmp_path: Path) -> AllowlistCheck:
    config = Config(trusted_authserv_ids=["mx.provider.example"])
    check = make_check(redis_url, tmp_path, config)
    assert check.store is not None
    check.store.add(
        parse_target("alice@example.org", config),
        entries("friend@bank.example", "*@*.news.example", "203.0.113.0/24"),
    )
    return check


def unexempt(found: list[Finding]) -> bool:
    return [f.code for f in found] == ["ALLOWLIST_UNVERIFIED"] and found[
        0
    ].effect is Effect.UNEXEMPT


ENV = {
    "mail_from": "friend@bank.example",
    "client_ip": "198.51.100.7",
    "recipients": ("alice@example.org",),
}


def test_strict_forged_envelope_sender_is_unexempted(strict: AllowlistCheck) -> None:
    found = rcpt(strict, "alice@example.org", **ENV)
    assert needs_verification(found[0])
    assert unexempt(eom(strict, OTHER_FROM, **ENV))
    assert unexempt(eom(strict, b"Subject: no from\r\n", **ENV))
    # Two From: headers, or a list of From: addresses, are ambiguous: not verified.
    assert unexempt(eom(strict, FORGED + OTHER_FROM, **ENV))
    assert unexempt(eom(strict, b"From: friend@bank.example, x@elsewhere.example\r\n", **ENV))
    # A display name that looks like the address does not count.
    assert unexempt(eom(strict, b'From: "friend@bank.example" <x@elsewhere.example>\r\n', **ENV))


def test_strict_from_header_agreement_verifies(strict: AllowlistCheck) -> None:
    assert eom(strict, FORGED, **ENV) == []
    assert eom(strict, b"From: FRIEND@Bank.Example\r\n", **ENV) == []
    sub = {**ENV, "mail_from": "bounce@mail.news.example"}
    assert eom(strict, b"From: News <letter@www.news.example>\r\n", **sub) == []
    assert unexempt(eom(strict, b"From: letter@news.example\r\n", **sub))


def test_strict_without_from_header_method(redis_url: str, tmp_path: Path) -> None:
    config = Config(verify_by=["auth", "authres"])
    check = make_check(redis_url, tmp_path, config)
    assert check.store is not None
    check.store.add(parse_target("alice@example.org", config), entries("friend@bank.example"))
    assert unexempt(eom(check, FORGED, **ENV))


def test_strict_trusted_authentication_results_verify(strict: AllowlistCheck) -> None:
    spf = b"Authentication-Results: mx.provider.example; spf=pass smtp.mailfrom=bank.example\r\n"
    assert eom(strict, OTHER_FROM + spf, **ENV) == []
    dkim = b"Authentication-Results: mx.provider.example; dkim=pass header.d=bank.example\r\n"
    assert eom(strict, OTHER_FROM + dkim, **ENV) == []
    untrusted = b"Authentication-Results: evil.example; spf=pass smtp.mailfrom=bank.example\r\n"
    assert unexempt(eom(strict, OTHER_FROM + untrusted, **ENV))
    other = (
        b"Authentication-Results: mx.provider.example; dmarc=pass header.from=elsewhere.example\r\n"
    )
    assert unexempt(eom(strict, OTHER_FROM + other, **ENV))
    fail = b"Authentication-Results: mx.provider.example; spf=fail smtp.mailfrom=bank.example\r\n"
    assert unexempt(eom(strict, OTHER_FROM + fail, **ENV))


def test_strict_sasl_authenticated_client_is_verified(strict: AllowlistCheck) -> None:
    env = {**ENV, "auth_user": "friend"}
    found = rcpt(strict, "alice@example.org", **env)
    assert found and not needs_verification(found[0])
    assert eom(strict, OTHER_FROM, **env) == []


def test_ip_entries_need_no_verification(strict: AllowlistCheck) -> None:
    env = {**ENV, "client_ip": "203.0.113.9"}
    found = rcpt(strict, "alice@example.org", **env)
    assert found[0].detail == "mailbox cidr-entry" and not needs_verification(found[0])
    assert eom(strict, OTHER_FROM, **env) == []


def test_strict_check_is_silent_when_not_exempt(strict: AllowlistCheck) -> None:
    assert eom(strict, OTHER_FROM, exempt=False, **ENV) == []


def test_strict_unexempts_when_any_recipient_is_unverified(strict: AllowlistCheck) -> None:
    config = strict.config
    assert strict.store is not None
    strict.store.add(parse_target("bob@example.org", config), entries("198.51.100.0/24"))
    env = {**ENV, "recipients": ("alice@example.org", "bob@example.org")}
    found = eom(strict, OTHER_FROM, **env)
    assert unexempt(found) and found[0].detail.startswith("1 of 2 recipient(s)")
    # An entry removed between RCPT and end of message no longer exempts.
    strict.store.remove(parse_target("alice@example.org", config), entries("friend@bank.example"))
    assert unexempt(eom(strict, FORGED, **ENV))


def test_only_an_exemption_to_verify_leaves_the_connection_thread(
    strict: AllowlistCheck, redis_url: str, tmp_path: Path
) -> None:
    """At end of message the pipeline hands a check to its pool only when it must wait (here:
    Redis, to verify an exemption); with nothing to verify the answer is known at once."""

    def start(check: AllowlistCheck, exempt: bool, **envelope: Any) -> object:
        message = Message.from_bytes(OTHER_FROM + b"\r\nbody\r\n", Envelope(**envelope))
        return check.start_message(message, exempt)

    assert start(strict, True, **ENV) is None  # strict and exempt: verified from the pool
    for nothing_to_ask in (
        start(strict, False, **ENV),  # not exempt
        start(strict, True, **{**ENV, "auth_user": "friend"}),  # SASL verifies
        start(strict, True, **{**ENV, "recipients": ()}),
        start(make_check(redis_url, tmp_path, Config(sender_auth="envelope")), True, **ENV),
    ):
        assert isinstance(nothing_to_ask, Done) and nothing_to_ask.collect(0.0) == []


def test_envelope_mode_trusts_the_envelope(redis_url: str, tmp_path: Path) -> None:
    config = Config(sender_auth="envelope")
    check = make_check(redis_url, tmp_path, config)
    assert check.store is not None
    check.store.add(parse_target("alice@example.org", config), entries("friend@bank.example"))
    found = rcpt(check, "alice@example.org", **ENV)
    assert found and not needs_verification(found[0])
    assert eom(check, OTHER_FROM, **ENV) == []


def test_build_from_settings(redis_url: str, tmp_path: Path) -> None:
    from filterd.checks import allowlist as module
    from filterd.checks.base import Services
    from filterd.settings import load_settings, section_models

    site = tmp_path / "site.txt"
    site.write_text("*@site.example\n")
    settings = load_settings(
        env={
            "FILTERD_PIPELINE_RECIPIENT_CHECKS": '["allowlist"]',
            "FILTERD_PIPELINE_MESSAGE_CHECKS": '["allowlist"]',
            "FILTERD_REDIS_URL": redis_url,
            "FILTERD_ALLOWLIST_SITE_FILES": str(site),
        }
    )
    assert section_models()["allowlist"] is Config is module.Config
    check = module.build(
        settings.section("allowlist"), Services(settings, redis.Redis.from_url(redis_url))
    )
    assert (check.name, check.gate, check.bypassable, check.on_failure) == (
        "allowlist",
        True,
        False,
        "tempfail",
    )
    assert rcpt(check, "anyone@example.org", mail_from="x@site.example")
    check.close()
