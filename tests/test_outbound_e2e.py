"""Outbound mail end to end: real Postfix submission listeners (configured with the recipe of
`filterd postfix-config --submission`), two real daemons on one real Redis, clamd, smtp-sink.

Authentication is Postfix's ``XCLIENT LOGIN=... ADDR=192.0.2.77`` from loopback, which makes
smtpd treat the session as SASL-authenticated and pass ``{auth_authen}`` to the milter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from filterd.records.query import audit_keys
from filterd.records.schema import load_schema
from tests.conftest import eicar_bytes
from tests.helpers_daemon import DaemonProcess, write_config
from tests.outbound_servers import SubmissionPostfix
from tests.servers import (
    ClamdServer,
    RedisServer,
    SmtpResult,
    SmtpSink,
    make_reachable,
    project_signature_dir,
    send_mail,
)

pytestmark = pytest.mark.e2e

CLIENT_IP = "192.0.2.77"
INBOUND_IP = "198.51.100.20"
LIMIT = 3  # FILTERD_OUTBOUND_MESSAGES_PER_MINUTE
AUTHENTICATED = {f"{u}@example.org" for u in ("alice", "carol", "dave", "erin", "frank", "mallory")}


def submission_message(tag: str) -> bytes:
    return (
        "From: Alice <alice@example.org>\n"
        "To: <bob@example.net>\n"
        "Subject: Lunch on Thursday\n"
        f"Message-ID: <{tag}@example.org>\n"
        f"X-Originating-IP: [{CLIENT_IP}]\n"
        f"X-Mailer: ExampleWebmail 2.1 (client {CLIENT_IP})\n"
        f"Received: from [{CLIENT_IP}] by webmail.example.org with HTTP;\n"
        "\tTue, 1 Dec 2026 22:00:00 +0000\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n\n"
        "Hi Bob,\n\nare we still on for lunch on Thursday? I could bring the notes from\n"
        "the planning meeting so we can go through them together.\n\nCheers,\nAlice\n"
    ).encode()


SPAM = (
    b'From: "Best Deals" <mallory@example.org>\nTo: <victim@example.net>\n'
    b"Subject: CONGRATULATIONS!!! You WON a FREE iPhone - CLAIM NOW\n"
    b"Message-ID: <spam1@example.org>\nMIME-Version: 1.0\n"
    b"Content-Type: text/html; charset=iso-8859-1\n\n"
    b"<html><body><font color=white>xx</font><p>Dear Winner, you have been selected to "
    b'receive a FREE iPhone! Click <a href="http://free-prize-claim.biz/c?id=123">HERE</a> to '
    b"claim your prize NOW. Limited time offer, 100% FREE, no credit card required. Cheap "
    b"viagra, cialis, replica watches, work from home and earn $5000/week!!! Act now! To "
    b'unsubscribe click <a href="http://free-prize-claim.biz/u">here</a>.</p>'
    b'<img src="http://203.0.113.9/a.gif"></body></html>\n'
)


def submit(postfix: SubmissionPostfix, login: str, data: bytes, rcpts: list[str]) -> SmtpResult:
    return send_mail(
        postfix.submission_port,
        login,
        rcpts,
        data,
        xclient={"LOGIN": login, "ADDR": CLIENT_IP, "NAME": "dsl-77.example.com"},
        helo="alices-laptop",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = make_reachable(tmp_path_factory.mktemp("outbound"))
    with (
        RedisServer(make_reachable(base / "redis")) as redis_server,
        ClamdServer(make_reachable(base / "clamd"), project_signature_dir()) as clamd,
        SmtpSink(make_reachable(base / "sink")) as sink,
    ):
        config = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "state")},
                "redis": {"url": redis_server.url},
                "pipeline": {
                    "recipient_checks": ["allowlist"],
                    "message_checks": ["allowlist", "antivirus", "attachments", "classifier"],
                },
                "clamav": {"address": clamd.address, "timeout": 5.0},
                # The recipe names the service with -o milter_macro_daemon_name=submission.
                "outbound": {"reject_threshold": 0.9, "services": ["submission"]},
                "records": {"enabled": True},
            },
        )
        # The limit comes from the environment, like every other override.
        env = {"FILTERD_OUTBOUND_MESSAGES_PER_MINUTE": str(LIMIT)}
        with (
            DaemonProcess(base / "d1", config, env=env) as d1,
            DaemonProcess(base / "d2", config, env=env) as d2,
            SubmissionPostfix(
                base / "pf1",
                sink.port,
                milter=d1.milter_for_postfix,
                milter_default_action="reject",
            ) as pf1,
            SubmissionPostfix(
                base / "pf2",
                sink.port,
                milter=d2.milter_for_postfix,
                milter_default_action="reject",
            ) as pf2,
        ):
            yield {
                "pf1": pf1,
                "pf2": pf2,
                "sink": sink,
                "redis": redis_server,
                "config": config,
                "daemons": (d1, d2),
            }


def _delivered(sink: SmtpSink, message_id: str) -> bytes:
    """The raw dump file smtp-sink wrote for the message with this Message-ID."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for delivery in sink.deliveries():
            if f"<{message_id}>".encode() in delivery.data:
                return delivery.path.read_bytes()
        time.sleep(0.05)
    raise AssertionError(f"{message_id} never reached the sink")


def test_submission_arrives_without_any_trace_of_the_client_ip(stack: dict[str, Any]) -> None:
    result = submit(
        stack["pf1"], "alice@example.org", submission_message("sub-1"), ["bob@example.net"]
    )
    assert result.accepted, result
    raw = _delivered(stack["sink"], "sub-1@example.org")
    assert CLIENT_IP.encode() not in raw, raw.decode(errors="replace")
    assert b"dsl-77.example.com" not in raw
    # The message itself is intact; only the trace of the sender's device is gone.
    assert b"Subject: Lunch on Thursday" in raw and b"lunch on Thursday?" in raw
    assert b"with ESMTPA" in raw  # Postfix's own Received: line, without the client part
    assert b"X-Spam-Score" not in raw  # no filter headers on our users' outgoing mail


def test_the_same_message_sent_inbound_keeps_its_headers(stack: dict[str, Any]) -> None:
    data = submission_message("in-1").replace(b"To: <bob@example.net>", b"To: <bob@example.org>")
    result = send_mail(
        stack["pf1"].port, "alice@example.net", ["bob@example.org"], data,
        xclient={"ADDR": INBOUND_IP},
    )  # fmt: skip
    assert result.accepted, result
    raw = _delivered(stack["sink"], "in-1@example.org")
    assert f"X-Originating-IP: [{CLIENT_IP}]".encode() in raw
    assert f"(client {CLIENT_IP})".encode() in raw
    assert f"Received: from [{CLIENT_IP}] by webmail.example.org".encode() in raw
    assert f"[{INBOUND_IP}]".encode() in raw  # Postfix's Received: keeps the inbound client
    assert b"X-Spam-Score" in raw


def test_a_named_service_makes_unauthenticated_mail_outbound(stack: dict[str, Any]) -> None:
    """{daemon_name} reaches the milter: mail on the submission service is outbound even
    without SASL (e.g. a webmail host), so its X-Originating-IP goes; Postfix's own
    Received: line stays, because the recipe rewrites only authenticated (ESMTPA) ones."""
    other = "198.51.100.30"
    data = submission_message("svc-1").replace(CLIENT_IP.encode(), other.encode())
    result = send_mail(
        stack["pf2"].submission_port,
        "webmail@example.org",
        ["bob@example.net"],
        data,
        xclient={"ADDR": other},
    )
    assert result.accepted, result
    raw = _delivered(stack["sink"], "svc-1@example.org")
    assert b"X-Originating-IP" not in raw and b"X-Mailer" not in raw
    assert f"[{other}])\n\tby mx.filterd.test (Postfix) with ESMTP id".encode() in raw


def test_eicar_on_submission_is_refused_with_5xx(stack: dict[str, Any]) -> None:
    data = submission_message("virus-1") + eicar_bytes() + b"\n"
    result = submit(stack["pf2"], "erin@example.org", data, ["bob@example.net"])
    assert result.data is not None and result.data.code == 554, result
    assert "5.7.1" in result.data.text and "Eicar" in result.data.text


def test_outbound_spam_is_refused_told_and_counted(stack: dict[str, Any]) -> None:
    result = submit(stack["pf1"], "mallory@example.org", SPAM, ["victim@example.net"])
    assert result.data is not None and result.data.code == 550, result
    assert "5.7.1" in result.data.text and "not sent" in result.data.text
    assert "spam" in result.data.text
    shown = subprocess.run(
        [sys.executable, "-m", "filterd", "limits", "show", "--json", "mallory@example.org",
         "--config", str(stack["config"]), "--redis-url", stack["redis"].url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(shown.stdout)["outbound_spam_30d"] == 1
    client = redis.Redis.from_url(stack["redis"].url, decode_responses=True)
    stats = {
        k: v
        for key in client.scan_iter("filterd:v1:stats:*")
        for k, v in client.hgetall(key).items()
    }
    assert stats.get("reject|OUTBOUND_SPAM") == "1", stats


def test_rate_limit_shared_by_two_daemons_and_per_login(stack: dict[str, Any]) -> None:
    pf1, pf2 = stack["pf1"], stack["pf2"]
    codes = []
    for i in range(LIMIT):
        result = submit((pf1, pf2)[i % 2], "carol@example.org", submission_message(f"rl-{i}"),
                        ["bob@example.net"])  # fmt: skip
        codes.append(result.data.code if result.data else None)
    assert codes == [250] * LIMIT, codes
    for postfix in (pf1, pf2):  # the (N+1)th, whichever daemon sees it
        over = submit(
            postfix, "carol@example.org", submission_message("rl-over"), ["bob@example.net"]
        )
        reply = over.rcpts["bob@example.net"]
        assert reply.code == 450 and reply.text.startswith("4.7.1"), reply
        assert "try again in" in reply.text and f"{LIMIT} messages per minute" in reply.text
        assert over.data is None
    other = submit(pf2, "dave@example.org", submission_message("rl-other"), ["bob@example.net"])
    assert other.accepted, other


def test_redis_holds_no_trace_of_the_client_ip(stack: dict[str, Any]) -> None:
    """Runs last in this module: every submission above came from 192.0.2.77."""
    result = submit(
        stack["pf2"], "frank@example.org", submission_message("last"), ["b@example.net"]
    )
    assert result.accepted, result
    _delivered(stack["sink"], "last@example.org")
    client = redis.Redis.from_url(stack["redis"].url)
    keys = list(client.scan_iter(count=1000))
    assert keys, "the submissions left records and counters"
    logs = 0
    for key in keys:
        assert CLIENT_IP.encode() not in key
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            values = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        else:
            raise AssertionError(f"unexpected key type {kind!r} for {key!r}")
        for value in values:
            assert CLIENT_IP.encode() not in value, (key, value)
        if key.startswith(b"filterd:v1:rec:log:"):
            entry = json.loads(values[0])
            if entry.get("sender") in AUTHENTICATED:  # the submissions above
                logs += 1
                assert "client_ip" not in entry, entry
    assert logs >= 1, "outbound submissions were recorded (without an IP)"
    # Rate-limit buckets exist for the logins, keyed by login, each with an expiry.
    buckets = [k for k in keys if k.startswith(b"filterd:v1:rl:{u:frank@example.org}:b:")]
    assert buckets and all(0 < client.pttl(k) <= 86_400_000 for k in buckets)
    audit = audit_keys(client, load_schema())
    assert not audit.problems, audit.problems
