"""`filterd scan`: the offline answer to "why was this refused?", through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import eicar_bytes
from tests.helpers_daemon import ROOT, write_config
from tests.servers import ClamdServer

pytestmark = pytest.mark.integration

CLEAN = b"From: <a@example.net>\nSubject: lunch\n\nShall we meet at noon on Thursday?\n"


def run_scan(config: Path, *args: str, stdin: bytes | None = None) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "filterd", "scan", "--config", str(config), *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode in (0, 2), proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


@pytest.fixture
def config(tmp_path: Path, clamd_server: ClamdServer, redis_url: str) -> Path:
    return write_config(
        tmp_path / "f.toml",
        {
            "pipeline": {
                "recipient_checks": ["allowlist"],
                "message_checks": ["allowlist", "antivirus", "attachments", "classifier"],
            },
            "clamav": {"address": clamd_server.address},
            "redis": {"url": redis_url},
            "records": {"enabled": False},
        },
    )


def test_scan_reports_action_reply_score_and_reasons(tmp_path: Path, config: Path) -> None:
    virus = tmp_path / "virus.eml"
    virus.write_bytes(CLEAN.replace(b"noon", b"noon " + eicar_bytes()))
    clean = tmp_path / "clean.eml"
    clean.write_bytes(CLEAN)
    out = run_scan(
        config,
        "--from",
        "a@example.net",
        "--rcpt",
        "u@example.org",
        "--client-ip",
        "192.0.2.1",
        "--helo",
        "mail.example.net",
        str(virus),
        str(clean),
    )
    assert [o["file"] for o in out] == [str(virus), str(clean)]
    refused, accepted = out
    assert refused["action"] == "reject"
    assert refused["smtp_reply"] == "554 5.7.1 virus found: Eicar-Test-Signature"
    assert {"check": "antivirus", "code": "CLAMAV_VIRUS"}.items() <= refused["reasons"][0].items()
    assert accepted["action"] == "accept" and accepted["smtp_reply"] is None
    assert isinstance(accepted["spam_score"], float) and 0 <= accepted["spam_score"] <= 1
    assert any(r["check"] == "classifier" for r in accepted["reasons"])


def test_scan_reads_stdin_and_reports_unreadable_files(tmp_path: Path, config: Path) -> None:
    out = run_scan(config, "-", str(tmp_path / "missing.eml"), stdin=CLEAN)
    assert out[0]["file"] == "-" and out[0]["action"] == "accept"
    assert out[1]["file"].endswith("missing.eml") and "error" in out[1]


def test_scan_without_classifier_reports_null_spam_score(tmp_path: Path, clamd_server) -> None:
    cfg = write_config(
        tmp_path / "g.toml",
        {
            "pipeline": {"recipient_checks": [], "message_checks": ["antivirus"]},
            "clamav": {"address": clamd_server.address},
            "records": {"enabled": False},
        },
    )
    msg = tmp_path / "m.eml"
    msg.write_bytes(CLEAN)
    (out,) = run_scan(cfg, str(msg))
    assert out["spam_score"] is None and out["action"] == "accept"


def test_scan_with_a_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[milter]\nsocket = 'inet:nope'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "filterd", "scan", "--config", str(cfg), "-"],
        cwd=ROOT,
        input=CLEAN,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "[milter] socket" in proc.stderr.decode()
