"""`filterd records erase --dry-run` counts what erase deletes; `filterd records find`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from filterd.allowlist.cli import allow
from filterd.records.cli import records
from filterd.records.config import Config
from filterd.records.observer import build_observer
from tests.test_records_cli import ALICE, BOB, _config, _traffic

pytestmark = pytest.mark.integration


@pytest.fixture
def loaded(redis_url: str) -> str:
    observer = build_observer(Config(), redis.Redis.from_url(redis_url))
    assert observer is not None
    _traffic(observer)
    return redis_url


def test_dry_run_counts_what_erase_deletes(tmp_path: Path, loaded: str) -> None:
    cfg = _config(tmp_path, loaded)
    entries = ["*@friends.example", "boss@work.example", "192.0.2.0/24", "198.51.100.7", "*@x.test"]
    added = CliRunner().invoke(allow, ["--config", str(cfg), "add", ALICE, *entries])
    assert added.exit_code == 0, added.output
    client = redis.Redis.from_url(loaded)
    keys_before = sorted(client.keys("*"))

    dry = CliRunner().invoke(records, ["erase", "--config", str(cfg), "--dry-run", ALICE])
    assert dry.exit_code == 0, dry.output
    would = json.loads(dry.output)["deleted"]
    assert sorted(client.keys("*")) == keys_before  # a dry run deletes nothing
    assert would["allowlist"] == 5 and would["records"] == 2

    real = CliRunner().invoke(records, ["erase", "--config", str(cfg), ALICE])
    assert real.exit_code == 0, real.output
    assert json.loads(real.output)["deleted"] == would


def test_find_by_queue_id_and_message_id(tmp_path: Path, loaded: str) -> None:
    cfg = _config(tmp_path, loaded)
    by_mid = CliRunner().invoke(records, ["find", "--config", str(cfg), "<b@x>"])
    assert by_mid.exit_code == 0, by_mid.output
    entries = [json.loads(line) for line in by_mid.output.splitlines()]
    assert len(entries) == 1
    assert entries[0]["reason_code"] == "CLAMAV_VIRUS" and entries[0]["recipients"] == [BOB]
    assert 0 < entries[0]["expires_in"] <= 7 * 86400
    assert "subject" not in entries[0]

    by_queue = CliRunner().invoke(records, ["find", "--config", str(cfg), "4ABC123DEF"])
    assert by_queue.exit_code == 0
    assert len(by_queue.output.splitlines()) == 3  # the three DATA-phase entries

    missing = CliRunner().invoke(records, ["find", "--config", str(cfg), "NOSUCHQ"])
    assert missing.exit_code == 1


def test_log_filter_keeps_wildcard_help_text_and_masks_addresses() -> None:
    from filterd.records.logfilter import Redactor

    redactor = Redactor()
    help_text = "wildcard '*' in domain 'a*b.example': write *@domain or *@*.domain instead"
    assert redactor.text(help_text) == help_text
    assert redactor.text("site entry *@friends.example added") == (
        "site entry *@friends.example added"
    )
    assert redactor.text("from alice@example.org and a*@example.org") == (
        "from [address] and [address]"
    )


def test_stats_chart_stable_colours_plain_labels_zero_days(tmp_path: Path) -> None:
    from matplotlib.colors import to_hex

    from filterd.records.chart import render, write_png
    from filterd.records.query import DayStats

    days = [
        DayStats("2026-11-01", {"accepted": 40, "virus": 2, "classifier": 5}),
        DayStats("2026-11-04", {"accepted": 30, "split": 1, "blocklist": 4}),
    ]
    cats = ["accepted", "split", "virus", "banned-type", "blocklist", "classifier"]
    fig = render(days, cats)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "accepted: 70",
        "retried separately (split): 1",
        "virus: 2",
        "blocklist: 4",
        "spam: 5",
    ]
    assert "2026-11-01 to 2026-11-04, 4 days, 82 recipients in total" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "2026-11-01",
        "2026-11-02",
        "2026-11-03",
        "2026-11-04",
    ]
    colours = {c.get_label(): to_hex(c.patches[0].get_facecolor()) for c in ax.containers}
    # A chart with other categories present gives "virus" the same colour.
    other = render([DayStats("2026-12-01", {"virus": 1})], cats).axes[0]
    assert to_hex(other.containers[0].patches[0].get_facecolor()) == colours["virus: 2"]
    out = tmp_path / "chart.png"
    write_png(days, cats, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
