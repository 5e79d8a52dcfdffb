"""Records end to end: real Postfix -> real daemon -> real Redis, then Redis is audited.

Traffic covers every way an entry is made: an accepted message with two
recipients, a virus and a banned attachment refused at end of DATA, and a
recipient refused at RCPT time by a DNSBL (a real rbldnsd). Then everything in
Redis is read back directly: each key is declared and expires within its tag,
no subject or body line is stored anywhere, statistics name no one, export and
erase act on exactly one mailbox, and the log entries really expire.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from filterd import keyspace as keys
from filterd.records.query import audit_keys, daily_stats, erase_mailbox, export_mailbox
from filterd.records.schema import DEFAULT_SCHEMA, load_schema
from tests.helpers_daemon import DaemonProcess, write_config
from tests.servers import ClamdServer, make_reachable, send_mail

pytestmark = pytest.mark.e2e

SENDER = "sender@example.net"
SPAMMER = "spammer@bad.example"
TO, TO2 = "bob@example.org", "carol@example.org"
GOOD_IP, LISTED_IP = "192.0.2.10", "192.0.2.66"
SUBJECT = "Zebra migration schedule for the Q7 audit"
BODY = (
    "The walrus sings at midnight near pier nine.",
    "Invoice total 4242 tangerines, due Friday.",
)
LOG_SECONDS = 6


def plain(mid: str, sender: str = SENDER, extra_body: str = "") -> bytes:
    body = "\n".join(BODY) + "\n" + extra_body
    return (
        f"From: <{sender}>\nTo: <{TO}>\nSubject: {SUBJECT}\nMessage-ID: {mid}\n"
        f"MIME-Version: 1.0\nContent-Type: text/plain\n\n{body}"
    ).encode()


def with_exe(mid: str) -> bytes:
    payload = base64.encodebytes(b"MZ\x90\x00" + b"\x00" * 200).decode()
    return (
        f"From: <{SENDER}>\nTo: <{TO}>\nSubject: {SUBJECT}\nMessage-ID: {mid}\n"
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b1"\n\n'
        f"--b1\nContent-Type: text/plain\n\n{BODY[0]}\n"
        '--b1\nContent-Type: application/octet-stream; name="zebra-plans.exe"\n'
        'Content-Disposition: attachment; filename="zebra-plans.exe"\n'
        f"Content-Transfer-Encoding: base64\n\n{payload}--b1--\n"
    ).encode()


ZONE = "$SOA 600 ns.test. hostmaster.test. 1 600 600 600 45\n:127.0.0.2:listed\n" + LISTED_IP


def _dnsbl_section(nameserver: str) -> str:
    return (
        "[dnsbl]\n"
        f'nameservers = "{nameserver}"\n'
        "skip_private = false\n"
        'lists = [{ id = "ZEN", zone = "zen.test", type = "ip", '
        'rules = [{ name = "SBL", match = "127.0.0.2", weight = 10 }] }]\n'
    )


@pytest.fixture
def stack(
    tmp_path: Path,
    redis_url: str,
    clamd_server: ClamdServer,
    rbldnsd: Any,
    postfix_factory: Any,
) -> Iterator[dict[str, Any]]:
    base = make_reachable(tmp_path)
    schema = base / "retention.toml"
    text = DEFAULT_SCHEMA.read_text(encoding="utf-8")
    text = text.replace('smtp-log = "7d"', f'smtp-log = "{LOG_SECONDS}s"')
    text = text.replace('pseudonym-key = "14d"', f'pseudonym-key = "{2 * LOG_SECONDS}s"')
    text = text.replace('abuse-evidence = "30d"', f'abuse-evidence = "{LOG_SECONDS}s"')
    schema.write_text(text)
    rbl = rbldnsd([("zen.test", "ip4set", ZONE)])
    cfg = write_config(
        base / "filterd.toml",
        {
            "daemon": {"state_dir": str(base / "state"), "log_level": "info"},
            "pipeline": {
                "recipient_checks": ["dnsbl"],
                "message_checks": ["antivirus", "attachments"],
            },
            "clamav": {"address": clamd_server.address, "timeout": 5.0},
            "redis": {"url": redis_url},
            "records": {"enabled": True, "schema_file": str(schema), "abuse_evidence": True},
        },
    )
    cfg.write_text(cfg.read_text() + _dnsbl_section(rbl.nameserver))
    daemon = DaemonProcess(base / "daemon", cfg).start()
    try:
        postfix = postfix_factory(milter=daemon.milter_for_postfix, default_action="reject")
        yield {"postfix": postfix, "daemon": daemon, "schema": load_schema(schema)}
    finally:
        daemon.stop()


def _stored(client: redis.Redis) -> bytes:
    parts = []
    for key in client.scan_iter(count=1000):
        parts.append(key)
        kind = client.type(key).decode()
        if kind == "string":
            parts.append(client.get(key) or b"")
        elif kind == "hash":
            parts.extend(x for pair in client.hgetall(key).items() for x in pair)
        elif kind == "set":
            parts.extend(client.smembers(key))
        elif kind == "list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == "zset":
            parts.extend(client.zrange(key, 0, -1))
        else:
            raise AssertionError(f"unexpected type {kind} for {key!r}")
    return b"\n".join(parts).lower()


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_records_through_postfix_keep_the_promise(
    stack: dict[str, Any], redis_url: str, eicar: bytes
) -> None:
    port, schema, daemon = stack["postfix"].port, stack["schema"], stack["daemon"]
    client = redis.Redis.from_url(redis_url)
    good = {"ADDR": GOOD_IP, "NAME": "mail.example.net"}
    ok = send_mail(port, SENDER, [TO, TO2], plain("<ok-1@example.net>"), xclient=good)
    assert ok.accepted, ok
    virus = send_mail(
        port,
        SENDER,
        [TO],
        plain("<v-1@example.net>", extra_body=eicar.decode()),
        xclient=good,
    )
    assert virus.data is not None and virus.data.code == 554, virus
    banned = send_mail(port, SENDER, [TO2], with_exe("<b-1@example.net>"), xclient=good)
    assert banned.data is not None and banned.data.code == 554, banned
    listed = send_mail(
        port,
        SPAMMER,
        [TO2],
        plain("<s-1@bad.example>", SPAMMER),
        xclient={"ADDR": LISTED_IP, "NAME": "bad.example"},
    )
    assert listed.rcpts[TO2].code >= 500 and listed.data is None, listed

    _wait(lambda: len(list(client.scan_iter(match=keys.log_key("*")))) >= 4, 10, "4 entries")

    # Every key in Redis is declared and expires within its tag.
    audit = audit_keys(client, schema)
    assert audit.ok, audit.problems
    assert audit.keys_by_kind["smtp-log"] == 4
    assert audit.keys_by_kind["abuse-evidence"] == 3

    # Nothing of the content: no subject, no body line, no attachment name.
    stored = _stored(client)
    for secret in (SUBJECT, *BODY, "zebra-plans", "walrus", "EICAR-STANDARD"):
        assert secret.lower().encode() not in stored, secret
    log = daemon.log()
    for secret in (SUBJECT, *BODY, "zebra-plans"):
        assert secret not in log, secret
    # The stderr schema allows no address and no IP by default.
    assert "milter listening" in log
    for personal in (SENDER, SPAMMER, TO, TO2, GOOD_IP, LISTED_IP):
        assert personal not in log, personal

    # Statistics: right counts, no address, no IP.
    (day,) = daily_stats(client, schema)
    assert day.categories["accepted"] == 2
    assert day.categories["virus"] == 1
    assert day.categories["banned-type"] == 1
    assert day.categories["blocklist"] == 1
    for key in client.scan_iter(match=keys.stats_pattern()):
        text = json.dumps({k.decode(): v.decode() for k, v in client.hgetall(key).items()})
        assert "@" not in text and not re.search(r"\d+\.\d+\.\d+\.\d+", text), text

    # Export: exactly carol's entries, with the data Postfix and the milter saw.
    carol = export_mailbox(client, schema, TO2)["records"]
    assert sorted(r.get("message_id", r["phase"]) for r in carol) == [
        "<b-1@example.net>",
        "<ok-1@example.net>",
        "rcpt",
    ]
    by_phase = {r["phase"]: r for r in carol if r["phase"] == "rcpt"}
    rcpt = by_phase["rcpt"]
    assert rcpt["reason_code"].startswith("DNSBL_") and rcpt["client_ip"] == LISTED_IP
    accepted = next(r for r in carol if r.get("message_id") == "<ok-1@example.net>")
    assert accepted["action"] == "accept" and accepted["client_ip"] == GOOD_IP
    assert accepted["recipients"] == [TO2] and accepted["other_recipients"] == 1
    assert accepted["size"] > 0 and accepted.get("queue_id") == ok.queue_id

    # Erase carol: her entries go, bob's virus entry stays.
    assert erase_mailbox(client, schema, TO2)["records"] == 3
    assert export_mailbox(client, schema, TO2)["records"] == []
    bob = export_mailbox(client, schema, TO)["records"]
    assert [r["message_id"] for r in bob] == ["<v-1@example.net>"]
    assert audit_keys(client, schema).ok

    # Expiry: the log entries and indexes go by themselves; anonymous counters stay.
    _wait(
        lambda: not list(client.scan_iter(match=f"{keys.PREFIX}rec:*")),
        3 * LOG_SECONDS,
        "log entries to expire",
    )
    assert export_mailbox(client, schema, TO)["records"] == []
    assert daily_stats(client, schema)[0].categories["accepted"] == 2
