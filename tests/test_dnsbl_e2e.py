"""End to end: Postfix + the real daemon + rbldnsd. Clients are presented with
XCLIENT ADDR=..., so a loopback test connection looks like a listed host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from filterd.allowlist.config import Config as AllowConfig
from filterd.allowlist.entries import parse_entry, parse_target
from filterd.allowlist.store import AllowlistStore
from tests.helpers_daemon import filtered_postfix, write_config
from tests.servers import (
    RbldnsdServer,
    RedisServer,
    SmtpSink,
    make_reachable,
    send_mail,
)

pytestmark = pytest.mark.e2e

SENDER = "alice@example.net"
ZONES = [
    ("zen.test", "ip4set", ":127.0.0.2:SBL\n192.0.2.10\n127.0.0.2\n:127.0.0.10:PBL\n192.0.2.12\n"),
    ("dbl.test", "dnset", ":127.0.1.2:DBL\nevil.example\ndbltest.com\n"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = make_reachable(tmp_path_factory.mktemp("e2e-dnsbl"))
    with (
        RbldnsdServer(base / "rbldnsd", ZONES) as rbl,
        RedisServer(base / "redis") as redis_server,
        SmtpSink(base / "sink") as sink,
    ):
        cfg = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "state"), "log_level": "info"},
                "redis": {"url": redis_server.url},
                "records": {"enabled": False},
                "pipeline": {
                    "recipient_checks": ["allowlist", "dnsbl"],
                    "message_checks": ["uribl"],
                },
                "allowlist": {"site_files": []},
                "dnsbl": {
                    "nameservers": rbl.nameserver,
                    "skip_private": False,
                    "lists": [
                        {
                            "id": "ZEN",
                            "zone": "zen.test",
                            "rules": [
                                {"name": "SBL", "match": "127.0.0.[2..3]", "weight": 10},
                                {"name": "PBL", "match": "127.0.0.[10;11]", "weight": 3},
                            ],
                        },
                        # Not served by rbldnsd (REFUSED): reported at start-up, and
                        # every lookup fails open without changing the other outcomes.
                        {
                            "id": "BROKEN",
                            "zone": "unserved.test",
                            "rules": [{"name": "HIT", "match": "127.0.0.2", "weight": 10}],
                        },
                    ],
                },
                "uribl": {
                    "nameservers": rbl.nameserver,
                    "lists": [
                        {
                            "id": "DBL",
                            "zone": "dbl.test",
                            "type": "domain",
                            "test_entry": "dbltest.com",
                            "rules": [{"name": "SPAM", "match": "127.0.1.[2..99]", "weight": 10}],
                        }
                    ],
                },
            },
        )
        with filtered_postfix(base, cfg, sink.port) as (daemon, postfix):
            yield {"postfix": postfix, "sink": sink, "daemon": daemon, "redis": redis_server}


def _mail(body: str = "Lunch tomorrow?\n", tag: str = "x") -> bytes:
    return (
        f"From: <{SENDER}>\nTo: <bob@example.org>\nSubject: hi\n"
        f"Message-ID: <dnsbl-e2e-{tag}@example.net>\n\n{body}"
    ).encode()


def _delivered(sink: SmtpSink, tag: str, timeout: float = 15.0) -> bytes:
    """The delivered message with this tag (the sink is shared by the module's tests)."""
    deadline = time.monotonic() + timeout
    marker = f"<dnsbl-e2e-{tag}@example.net>".encode()
    while time.monotonic() < deadline:
        for data in sink.messages():
            if marker in data:
                return data
        time.sleep(0.05)
    raise TimeoutError(f"message {tag} not delivered")


def _client(ip: str) -> dict[str, str]:
    return {"ADDR": ip, "NAME": "mail.example.net"}


def test_listed_client_is_refused_at_rcpt_time_naming_the_list(stack: dict[str, Any]) -> None:
    result = send_mail(
        stack["postfix"].port, SENDER, ["bob@example.org"], _mail(), xclient=_client("192.0.2.10")
    )
    reply = result.rcpts["bob@example.org"]
    assert reply.code == 554, result
    assert "5.7.1" in reply.text
    assert "Client host [192.0.2.10] blocked using zen.test" in reply.text
    assert result.data is None


def test_unlisted_client_is_accepted(stack: dict[str, Any]) -> None:
    result = send_mail(
        stack["postfix"].port,
        SENDER,
        ["bob@example.org"],
        _mail(tag="unlisted"),
        xclient=_client("192.0.2.13"),
    )
    assert result.accepted, result
    assert b"X-Spam-Score: 0.0" in _delivered(stack["sink"], "unlisted")


def test_low_weight_listing_only_adds_to_the_score(stack: dict[str, Any]) -> None:
    result = send_mail(
        stack["postfix"].port,
        SENDER,
        ["bob@example.org"],
        _mail(tag="pbl"),
        xclient=_client("192.0.2.12"),
    )
    assert result.accepted, result
    assert b"X-Spam-Score: 3.0" in _delivered(stack["sink"], "pbl")


def test_recipient_who_allowlists_the_client_still_gets_the_mail(stack: dict[str, Any]) -> None:
    config = AllowConfig()
    client = redis.Redis.from_url(stack["redis"].url)
    store = AllowlistStore(client, config)
    target = parse_target("bob@example.org", config)
    store.add(target, [parse_entry("192.0.2.10", config)])
    try:
        result = send_mail(
            stack["postfix"].port,
            SENDER,
            ["carol@example.org", "bob@example.org"],
            _mail(tag="split"),
            xclient=_client("192.0.2.10"),
        )
        assert result.rcpts["carol@example.org"].code == 554, result
        assert result.rcpts["bob@example.org"].code == 250, result
        assert result.accepted, result
        _delivered(stack["sink"], "split")
        [delivery] = [m for m in stack["sink"].deliveries() if b"<dnsbl-e2e-split@" in m.data]
        assert delivery.recipients == ["bob@example.org"]
    finally:
        store.remove(target, ["192.0.2.10"])
        client.close()


def test_listed_link_domain_is_refused_at_end_of_message(stack: dict[str, Any]) -> None:
    body = "Great offer: hxxp://WWW.Evil.Example./buy now\n"
    result = send_mail(
        stack["postfix"].port,
        SENDER,
        ["bob@example.org"],
        _mail(body),
        xclient=_client("192.0.2.13"),
    )
    assert result.data is not None and result.data.code == 554, result
    assert "blocked using dbl.test" in result.data.text


def test_start_up_self_test_found_the_test_entries(stack: dict[str, Any]) -> None:
    lines = [line for line in stack["daemon"].log().splitlines() if "self-test" in line]
    assert not [line for line in lines if "zen.test" in line or "dbl.test" in line], lines
    assert [line for line in lines if "unserved.test" in line and "REFUSED" in line], lines
