"""`filterd scan` gives the daemon's verdict: same private clamd and Redis as a running
`filterd serve` with the default (empty) addresses, per-user allowlists honoured, and
recipients shown with their real outcome."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import eicar_bytes
from tests.helpers_daemon import ROOT, filtered_postfix, write_config
from tests.servers import RbldnsdServer, SmtpSink, make_reachable, send_mail, zen_dnsbl

pytestmark = pytest.mark.e2e

SENDER = "news@example.net"
FRIEND = "bob@example.org"  # allowlists the listed client IP
OTHER = "carol@example.org"
LISTED_IP = "192.0.2.10"
ZONES = [("zen.test", "ip4set", f":127.0.0.2:SBL\n{LISTED_IP}\n")]
MAIL = (
    f"From: <{SENDER}>\nTo: <{FRIEND}>\nSubject: our offer\n"
    "Message-ID: <scan-e2e-1@example.net>\n\nSee you at the meeting on Thursday.\n"
).encode()


def allow(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "filterd", "allow", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = make_reachable(tmp_path_factory.mktemp("e2e-scan"))
    with RbldnsdServer(base / "rbldnsd", ZONES) as rbl, SmtpSink(base / "sink") as sink:
        # Defaults: no [redis] url, no [clamav] address -> the daemon starts private ones.
        cfg = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "state")},
                "records": {"enabled": False},
                "metrics": {"enabled": False},
                "allowlist": {"site_files": []},
                "dnsbl": zen_dnsbl(rbl.nameserver),
                "uribl": {"enabled": False},
            },
        )
        with filtered_postfix(base, cfg, sink.port) as (daemon, postfix):
            added = allow(cfg, "add", FRIEND, LISTED_IP)
            assert added.returncode == 0, added.stderr
            yield {"config": cfg, "postfix": postfix, "sink": sink, "daemon": daemon}


def scan(stack: dict[str, Any], *args: str, stdin: bytes = MAIL) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "filterd", "scan", "--config", str(stack["config"]), *args, "-"],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads(proc.stdout.decode().splitlines()[0])
    return result


def test_scan_matches_the_daemon_for_an_allowlisted_recipient(stack: dict[str, Any]) -> None:
    sent = send_mail(
        stack["postfix"].port, SENDER, [FRIEND, OTHER], MAIL, xclient={"ADDR": LISTED_IP}
    )
    # The daemon: the friend's list exempts the listed client, the other recipient is refused.
    assert sent.rcpts[FRIEND].code == 250 and sent.rcpts[OTHER].code == 554, sent
    assert sent.data is not None and sent.data.code == 250, sent
    delivered = stack["sink"].wait_for_messages(1, timeout=15)[0]
    assert b"X-Spam-Status: No, allowlisted=recipient" in delivered

    out = scan(stack, "--from", SENDER, "--rcpt", FRIEND, "--rcpt", OTHER, "--client-ip", LISTED_IP)
    assert out["action"] == "accept" and out["reason_code"] == "ALLOWLISTED"
    assert "X-Spam-Status: No, allowlisted=recipient" in out["headers"]
    outcome = {r["rcpt"]: (r["action"], r["stage"], r["smtp_reply"]) for r in out["recipients"]}
    assert outcome[FRIEND] == ("accept", "data", None)
    assert outcome[OTHER][:2] == ("reject", "rcpt")
    assert outcome[OTHER][2] is not None and outcome[OTHER][2].startswith("554 5.7.1")
    assert sent.rcpts[OTHER].text in outcome[OTHER][2]

    # The daemon's log: the refused second recipient has Postfix's queue id (the queue
    # file opened with the first valid recipient); the message line has the spam
    # probability and the thresholds served, as scan shows them.
    lines = [json.loads(x) for x in stack["daemon"].log().splitlines() if x.startswith("{")]
    rcpt = next(x for x in lines if x.get("event") == "rcpt" and x["code"] == "DNSBL_ZEN_SBL")
    eom = next(x for x in lines if x.get("event") == "eom" and x["code"] == "ALLOWLISTED")
    assert rcpt["queue_id"] and rcpt["queue_id"] == eom["queue_id"]
    assert eom["spam_probability"] == pytest.approx(out["spam_score"], abs=1e-9)
    assert eom["thresholds"] == out["thresholds"]
    assert 0 < eom["thresholds"]["spam_tag_probability"] <= 1


def test_rejected_message_lists_recipients_as_rejected(stack: dict[str, Any]) -> None:
    virus = MAIL.replace(b"Thursday.", b"Thursday. " + eicar_bytes())
    daemon = send_mail(stack["postfix"].port, SENDER, [FRIEND], virus, xclient={"ADDR": LISTED_IP})
    assert daemon.data is not None and daemon.data.code == 554, daemon
    # Found the daemon's private clamd (no [clamav] address configured).
    out = scan(stack, "--from", SENDER, "--rcpt", FRIEND, "--client-ip", LISTED_IP, stdin=virus)
    assert out["action"] == "reject" and out["reason_code"] == "CLAMAV_VIRUS"
    assert out["smtp_reply"] == f"{daemon.data.code} {daemon.data.text}"
    assert [(r["rcpt"], r["action"], r["code"]) for r in out["recipients"]] == [
        (FRIEND, "reject", "CLAMAV_VIRUS")
    ]


def test_pretty_output_for_people(stack: dict[str, Any]) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "filterd", "scan", "--config", str(stack["config"])),
            *("--pretty", "--from", SENDER, "--rcpt", OTHER, "--client-ip", "192.0.2.99", "-"),
        ],
        cwd=ROOT,
        input=MAIL,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    assert text.startswith("-: ACCEPT")
    assert "spam probability: 0." in text and "reject at" in text
    assert f"{OTHER}: accept after DATA (OK)" in text
