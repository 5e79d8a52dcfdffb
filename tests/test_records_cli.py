"""`filterd records export|erase|audit` and `filterd stats` against a real Redis."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from filterd.records.cli import records, stats
from filterd.records.config import Config
from filterd.records.observer import RecordsObserver, build_observer
from filterd.types import Action, Decision, Envelope, Message, RecipientDecision, SmtpReply

pytestmark = pytest.mark.integration

ALICE, BOB, DAVE = "alice@example.org", "bob@example.org", "dave@example.net"
IP = "192.0.2.10"


def _config(tmp_path: Path, redis_url: str, **records_keys: str) -> Path:
    extra = "".join(f"{k} = {v}\n" for k, v in records_keys.items())
    path = tmp_path / "filterd.toml"
    path.write_text(
        "[pipeline]\nrecipient_checks = []\nmessage_checks = []\n"
        f'[redis]\nurl = "{redis_url}"\n[records]\n{extra}'
    )
    return path


def _traffic(observer: RecordsObserver) -> None:
    def msg(rcpts: tuple[str, ...], mid: str) -> Message:
        raw = f"Subject: zebra plans\r\nMessage-ID: {mid}\r\n\r\nwalrus body\r\n".encode()
        return Message.from_bytes(
            raw, Envelope(client_ip=IP, mail_from=DAVE, recipients=rcpts, queue_id="4ABC123DEF")
        )

    observer.on_message(msg((ALICE, BOB), "<a@x>"), Decision(Action.ACCEPT, None, "OK"))
    observer.on_message(
        msg((BOB,), "<b@x>"),
        Decision(Action.REJECT, SmtpReply(554, "5.7.1", "virus"), "CLAMAV_VIRUS"),
    )
    observer.on_recipient(
        Envelope(client_ip=IP, mail_from=DAVE),
        RecipientDecision(
            ALICE, Action.REJECT, SmtpReply(550, "5.7.1", "listed"), False, (), "DNSBL_ZEN_SBL"
        ),
    )
    observer.on_message(
        msg((BOB,), "<c@x>"),
        Decision(Action.REJECT, SmtpReply(550, "5.7.1", "spam"), "CLASSIFIER_SPAM"),
    )
    assert observer.failures == 0


@pytest.fixture
def loaded(redis_url: str) -> str:
    observer = build_observer(Config(), redis.Redis.from_url(redis_url))
    assert observer is not None
    _traffic(observer)
    return redis_url


def test_export_prints_the_mailboxs_records_as_json(tmp_path: Path, loaded: str) -> None:
    cfg = _config(tmp_path, loaded)
    result = CliRunner().invoke(records, ["export", "--config", str(cfg), ALICE])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mailbox"] == ALICE
    assert sorted(r.get("message_id", r["phase"]) for r in data["records"]) == ["<a@x>", "rcpt"]
    assert data["retention"]["smtp-log"] == "7d"
    assert data["other"]["allowlist"]["entries"] == []
    out = tmp_path / "export.json"
    result = CliRunner().invoke(records, ["export", "--config", str(cfg), "-o", str(out), BOB])
    assert result.exit_code == 0 and len(json.loads(out.read_text())["records"]) == 3


def test_erase_reports_counts_and_deletes(tmp_path: Path, loaded: str) -> None:
    cfg = _config(tmp_path, loaded)
    dry = CliRunner().invoke(records, ["erase", "--config", str(cfg), "--dry-run", BOB])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["deleted"]["records"] == 3
    result = CliRunner().invoke(records, ["erase", "--config", str(cfg), BOB])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["deleted"]["records"] == 3
    again = CliRunner().invoke(records, ["export", "--config", str(cfg), BOB])
    assert json.loads(again.output)["records"] == []
    alice = CliRunner().invoke(records, ["export", "--config", str(cfg), ALICE])
    assert [r["phase"] for r in json.loads(alice.output)["records"]] == ["rcpt"]


def test_audit_passes_then_fails_on_a_stray_key(tmp_path: Path, loaded: str) -> None:
    cfg = _config(tmp_path, loaded)
    result = CliRunner().invoke(records, ["audit", "--config", str(cfg)])
    assert result.exit_code == 0 and result.output.startswith("ok:"), result.output
    redis.Redis.from_url(loaded).set("filterd:v1:debug:dump", "x")
    result = CliRunner().invoke(records, ["audit", "--config", str(cfg)])
    assert result.exit_code == 1 and "belongs to no kind" in result.output


def test_stats_table_json_and_png(tmp_path: Path, loaded: str) -> None:
    cfg = _config(tmp_path, loaded)
    png = tmp_path / "report.png"
    table = CliRunner().invoke(stats, ["--config", str(cfg), "--png", str(png)])
    assert table.exit_code == 0, table.output
    header, row = table.output.splitlines()[:2]
    cols = header.split()
    values = dict(zip(cols, row.split(), strict=True))
    assert values["accepted"] == "2" and values["virus"] == "1"
    assert values["blocklist"] == "1" and values["classifier"] == "1" and values["total"] == "5"
    result = CliRunner().invoke(stats, ["--config", str(cfg), "--json", "--reasons", "--days", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["days"][0]["accepted"] == 2
    text = result.output + table.output
    assert "@" not in text and not re.search(r"\d+\.\d+\.\d+\.\d+", text)
    # A real PNG that matplotlib can read back.
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(str(png)).shape[:2]
    assert width >= 600 and height >= 400


def test_stats_with_nothing_recorded(tmp_path: Path, redis_url: str) -> None:
    cfg = _config(tmp_path, redis_url)
    png = tmp_path / "empty.png"
    result = CliRunner().invoke(stats, ["--config", str(cfg), "--png", str(png)])
    assert result.exit_code == 0 and "no statistics" in result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(records, ["export", "--config", str(cfg), ALICE])
    assert result.exit_code == 1 and "Redis" in result.output


def test_broken_schema_is_a_clear_error(tmp_path: Path, redis_url: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'schema_version = 1\n[tags]\nx = "1d"\n[kinds.k]\nkey = "k:*"\n'
        '[kinds.k.fields]\nf = { type = "code" }\n'
    )
    cfg = _config(tmp_path, redis_url, schema_file=f'"{bad}"')
    result = CliRunner().invoke(stats, ["--config", str(cfg)])
    assert result.exit_code == 1 and "no retention tag" in result.output


def test_commands_are_registered_in_the_main_group() -> None:
    from filterd.cli import main

    assert "records" in main.commands and "stats" in main.commands
    assert {"export", "erase", "audit"} <= set(main.commands["records"].commands)  # type: ignore[attr-defined]
