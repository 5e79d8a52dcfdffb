"""/metrics and /health of the real daemon after real traffic through a real Postfix.

Servers: clamd, Redis, rbldnsd, Postfix and smtp-sink on loopback; the daemon as
an operator runs it. The privacy assertions use the exact addresses and IPs sent.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import eicar_bytes
from tests.helpers_daemon import filtered_postfix, write_config
from tests.servers import (
    ClamdServer,
    RbldnsdServer,
    RedisServer,
    SmtpSink,
    free_port,
    make_reachable,
    project_signature_dir,
    send_mail,
    zen_dnsbl,
)

pytestmark = pytest.mark.e2e

SENDER = "carol.sender@example.net"
RCPT = "dave.rcpt@example.org"
LISTED_IP = "192.0.2.10"
CLEAN_IP = "192.0.2.77"
HELO = "mail.sender-host.example.net"
ZONES = [("zen.test", "ip4set", f":127.0.0.2:SBL\n{LISTED_IP}\n")]

# Two pre-forked workers: every figure must be right summed across processes.
WORKERS = 2


def _mail(body: str) -> bytes:
    return (
        f"From: Carol <{SENDER}>\nTo: <{RCPT}>\nSubject: quarterly figures meeting\n"
        f"Message-ID: <metrics-1@example.net>\n\n{body}"
    ).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = make_reachable(tmp_path_factory.mktemp("e2e-metrics"))
    port = free_port()
    with (
        ClamdServer(base / "clamd", project_signature_dir()) as clamd,
        RbldnsdServer(base / "rbldnsd", ZONES) as rbl,
        RedisServer(base / "redis") as redis_server,
        SmtpSink(base / "sink") as sink,
    ):
        cfg = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "state"), "on_dependency_down": "degraded"},
                "redis": {"url": redis_server.url},
                "milter": {"workers": WORKERS},
                "antivirus": {"address": clamd.address, "timeout": 5.0},
                "pipeline": {
                    "recipient_checks": ["allowlist", "dnsbl"],
                    "message_checks": ["allowlist", "antivirus", "attachments", "classifier"],
                },
                "allowlist": {"site_files": []},
                "dnsbl": zen_dnsbl(
                    rbl.nameserver,
                    # not served by rbldnsd: every lookup is a list error
                    {
                        "id": "BROKEN",
                        "zone": "unserved.test",
                        "rules": [{"name": "HIT", "match": "127.0.0.2", "weight": 10}],
                    },
                ),
                "metrics": {"listen": f"127.0.0.1:{port}", "health_interval_seconds": 0.3},
            },
        )
        with filtered_postfix(base, cfg, sink.port) as (daemon, postfix):
            yield {
                "postfix": postfix,
                "daemon": daemon,
                "clamd": clamd,
                "url": f"http://127.0.0.1:{port}",
            }


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _value(text: str, name: str, **labels: str) -> float | None:
    for sname, slabels, value in _samples(text):
        if sname == name and labels.items() <= slabels.items():
            return value
    return None


def _wait_metrics(url: str, ready: Any, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            status, text = _get(url + "/metrics")
        except OSError:
            status = 0
        if status == 200 and ready(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"metrics never ready:\n{text[-4000:]}")


def test_metrics_after_real_traffic_and_no_personal_data(stack: dict[str, Any]) -> None:
    port = stack["postfix"].port
    clean = send_mail(
        port,
        SENDER,
        [RCPT],
        _mail("Shall we meet on Thursday at noon?\n"),
        xclient={"ADDR": CLEAN_IP, "NAME": HELO},
        helo=HELO,
    )
    assert clean.accepted, clean
    virus = send_mail(
        port, SENDER, [RCPT], _mail(eicar_bytes().decode() + "\n"), xclient={"ADDR": CLEAN_IP}
    )
    assert virus.data is not None and virus.data.code == 554, virus
    listed = send_mail(port, SENDER, [RCPT], _mail("hello\n"), xclient={"ADDR": LISTED_IP})
    assert listed.rcpts[RCPT].code == 554, listed

    def ready(text: str) -> bool:
        return (
            _value(text, "filterd_messages_total", reason="CLAMAV_VIRUS") == 1
            and _value(text, "filterd_recipients_refused_total", action="reject") == 1
            and _value(text, "filterd_model_info") == 1
            # Sampled every health interval: wait for a sample after the last session.
            and _value(text, "filterd_sessions_in_flight") == 0
        )

    text = _wait_metrics(stack["url"], ready)
    assert _value(text, "filterd_messages_total", action="accept") == 1
    assert _value(text, "filterd_messages_total", action="reject", reason="CLAMAV_VIRUS") == 1
    refused = [s for s in _samples(text) if s[0] == "filterd_recipients_refused_total" and s[2] > 0]
    assert [(s[1]["action"], s[1]["reason"]) for s in refused] == [("reject", "DNSBL_ZEN_SBL")]
    assert _value(text, "filterd_check_seconds_count", phase="message", check="antivirus") == 2
    assert _value(text, "filterd_check_seconds_count", phase="message", check="classifier") == 2
    assert _value(text, "filterd_check_seconds_count", phase="rcpt", check="dnsbl") == 1
    assert _value(text, "filterd_message_seconds_count") == 2
    assert _value(text, "filterd_spam_probability_count") == 2
    assert _value(text, "filterd_dependency_up", dependency="clamd") == 1
    assert _value(text, "filterd_dependency_up", dependency="redis") == 1
    assert _value(text, "filterd_dependency_up", dependency="model") == 1
    assert (_value(text, "filterd_dns_list_errors_total", zone="unserved.test") or 0) >= 1
    assert _value(text, "filterd_dns_list_breaker_open", zone="zen.test") == 0
    reject = _value(text, "filterd_classifier_threshold", kind="reject")
    tag = _value(text, "filterd_classifier_threshold", kind="tag")
    assert reject is not None and tag is not None and 0 < tag <= reject <= 1
    assert _value(text, "filterd_policy_score_threshold", kind="reject") == 10
    assert _value(text, "filterd_workers") == WORKERS  # summed over the worker processes
    assert _value(text, "filterd_sessions_in_flight") == 0

    # Privacy: nothing that was sent appears anywhere in the text.
    for secret in (SENDER, RCPT, LISTED_IP, CLEAN_IP, HELO, "example.net", "example.org"):
        assert secret not in text
    assert "@" not in text
    assert not re.search(r"\b(?:\d{1,3}\.){3}\d{1,3}\b", text)


def test_health_names_what_is_down(stack: dict[str, Any]) -> None:
    status, body = _get(stack["url"] + "/health")
    assert status == 200, body
    report = json.loads(body)
    assert report["status"] == "ok" and report["down"] == [] and report["workers"] == WORKERS
    assert report["dependencies"]["clamd"] == "up"

    stack["clamd"].stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, body = _get(stack["url"] + "/health")
        if status == 503:
            break
        time.sleep(0.1)
    assert status == 503, body
    report = json.loads(body)
    assert report["down"] == ["clamd"]
    assert report["dependencies"]["redis"] == "up"
    assert "clamd down" in report["problems"]
    text = _wait_metrics(
        stack["url"], lambda t: _value(t, "filterd_dependency_up", dependency="clamd") == 0
    )
    assert _value(text, "filterd_dependency_up", dependency="redis") == 1


def test_in_flight_counts_an_open_transaction(stack: dict[str, Any]) -> None:
    import smtplib

    smtp = smtplib.SMTP("127.0.0.1", stack["postfix"].port, local_hostname="c.example.net")
    try:
        smtp.ehlo()
        assert smtp.mail(SENDER)[0] == 250
        assert smtp.rcpt(RCPT)[0] == 250  # the milter has seen MAIL FROM: one transaction open
        _wait_metrics(stack["url"], lambda t: _value(t, "filterd_sessions_in_flight") == 1)
    finally:
        smtp.quit()
    _wait_metrics(stack["url"], lambda t: _value(t, "filterd_sessions_in_flight") == 0)
