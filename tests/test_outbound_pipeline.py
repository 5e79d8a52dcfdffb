"""The outbound pipeline through a real Runtime (the daemon's), with real Redis and rbldnsd:
outbound spam is refused despite allowlists, client-IP blocklists do not apply to
authenticated users, and a Redis outage tempfails at RCPT instead of letting mail through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filterd.runtime import Runtime
from filterd.scan import scan_bytes
from filterd.settings import load_settings
from filterd.types import Envelope
from tests.conftest import RbldnsdFactory
from tests.helpers_daemon import write_config
from tests.servers import RedisServer, make_reachable, zen_dnsbl
from tests.test_outbound_e2e import SPAM as SPAM_MESSAGE

pytestmark = pytest.mark.integration

IP = "192.0.2.77"


def _runtime(tmp_path: Path, redis_url: str, rbl: Any, **outbound: Any) -> Runtime:
    site = tmp_path / "site.txt"
    site.write_text("mallory@example.org\n")  # the sender's own mailbox, allowlisted site-wide
    cfg = write_config(
        tmp_path / "filterd.toml",
        {
            "redis": {"url": redis_url},
            "records": {"enabled": False},
            "pipeline": {
                "recipient_checks": ["allowlist", "dnsbl"],
                "message_checks": ["allowlist", "classifier"],
            },
            "allowlist": {"site_files": [str(site)], "sender_auth": "envelope"},
            "dnsbl": zen_dnsbl(rbl.nameserver),
            "outbound": {"reject_threshold": 0.9, **outbound},
        },
    )
    return Runtime(load_settings(cfg, env={}))


@pytest.fixture
def runtime(tmp_path: Path, redis_url: str, rbldnsd: RbldnsdFactory) -> Iterator[Runtime]:
    rbl = rbldnsd([("zen.test", "ip4set", f":127.0.0.2:listed\n{IP}\n")])
    rt = _runtime(tmp_path, redis_url, rbl)
    yield rt
    rt.retire()


def test_allowlist_exempts_inbound_but_never_outbound_spam(runtime: Runtime) -> None:
    inbound = Envelope(
        client_ip="203.0.113.1", mail_from="mallory@example.org", recipients=("bob@example.org",)
    )
    assert scan_bytes(runtime, SPAM_MESSAGE, inbound)["reason_code"] == "ALLOWLISTED"
    outbound = Envelope(
        client_ip=IP,
        mail_from="mallory@example.org",
        recipients=("bob@example.org",),
        auth_user="mallory@example.org",
    )
    result = scan_bytes(runtime, SPAM_MESSAGE, outbound)
    assert result["action"] == "reject" and result["reason_code"] == "OUTBOUND_SPAM"
    assert result["smtp_reply"].startswith("550 5.7.1 Your message was not sent")


def test_outbound_checks_default_to_the_content_checks_run_inbound(runtime: Runtime) -> None:
    assert runtime.outbound.pipeline is not None
    # Inbound runs allowlist + classifier: outbound shares the classifier, never the allowlist.
    assert list(runtime.outbound.pipeline.checks) == ["classifier"]


def test_client_ip_blocklists_do_not_apply_to_authenticated_users(runtime: Runtime) -> None:
    ham = b"From: <a@example.org>\nSubject: lunch\n\nLunch on Thursday? Bring the notes.\n"
    anonymous = Envelope(client_ip=IP, mail_from="a@example.org", recipients=("b@example.org",))
    refused = scan_bytes(runtime, ham, anonymous)
    assert refused["action"] == "reject" and refused["reason_code"].startswith("DNSBL_ZEN")
    authenticated = Envelope(
        client_ip=IP,
        mail_from="a@example.org",
        recipients=("b@example.org",),
        auth_user="a@example.org",
    )
    assert scan_bytes(runtime, ham, authenticated)["action"] == "accept"


def test_redis_down_tempfails_outbound_at_rcpt(tmp_path: Path, rbldnsd: RbldnsdFactory) -> None:
    rbl = rbldnsd([("zen.test", "ip4set", f":127.0.0.2:listed\n{IP}\n")])
    server = RedisServer(make_reachable(tmp_path / "redis")).start()
    rt = _runtime(tmp_path, server.url, rbl)
    try:
        env = Envelope(
            mail_from="a@example.org", recipients=("b@example.org",), auth_user="a@example.org"
        )
        pipeline = rt.pipeline_for(rt.outbound.prepare(env))
        assert pipeline.judge_recipient(env, "b@example.org", None).reply is None
        server.stop()
        decision = pipeline.judge_recipient(env, "b@example.org", None)
        assert decision.action.value == "tempfail" and decision.reply is not None
        assert (decision.reply.code, decision.reply.enhanced) == (451, "4.7.1")
    finally:
        server.stop()
        rt.retire()


def test_unauthenticated_outbound_service_is_limited_per_ip(
    tmp_path: Path, redis_url: str, rbldnsd: RbldnsdFactory
) -> None:
    rbl = rbldnsd([("zen.test", "ip4set", ":127.0.0.2:listed\n203.0.113.250\n")])
    rt = _runtime(
        tmp_path,
        redis_url,
        rbl,
        services=["webmail"],
        limit_unauthenticated_by_ip=True,
        messages_per_minute=1,
    )
    try:
        env = rt.outbound.prepare(
            Envelope(client_ip="10.9.8.7", daemon_name="webmail", mail_from="w@example.org")
        )
        assert env.direction == "outbound" and env.client_ip == "10.9.8.7"
        pipeline = rt.pipeline_for(env)
        assert pipeline.judge_recipient(env, "b@example.net", None).action.value == "accept"
        second = pipeline.judge_recipient(env, "b@example.net", None)
        assert second.action.value == "tempfail" and second.reply is not None
        assert str(second.reply).startswith("450 4.7.1 Sending limit reached (1 message per minute")
        other = rt.outbound.prepare(Envelope(client_ip="10.9.8.6", daemon_name="webmail"))
        assert pipeline.judge_recipient(other, "b@example.net", None).action.value == "accept"
    finally:
        rt.retire()
