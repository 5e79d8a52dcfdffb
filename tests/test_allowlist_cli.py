"""`filterd allow ...` against a real redis-server, through click's runner."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from filterd.allowlist.api import check_token
from filterd.allowlist.cli import allow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run(redis_url: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    # Only the sections this command needs must validate; other owners' checks may be absent.
    monkeypatch.setenv("FILTERD_PIPELINE_RECIPIENT_CHECKS", "[]")
    monkeypatch.setenv("FILTERD_PIPELINE_MESSAGE_CHECKS", "[]")
    runner = CliRunner()

    def invoke(*args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
        return runner.invoke(allow, ["--redis-url", redis_url, *args], input=stdin)

    return invoke


def test_add_list_remove(run) -> None:  # type: ignore[no-untyped-def]
    result = run("add", "Alice+x@Example.org", "Friend@Bank.example", "*@münchen.de")
    assert result.exit_code == 0, result.output
    assert "alice@example.org: added 2, already present 0; 2 of 1000 entries" in result.output
    result = run("list", "alice@example.org")
    assert result.output.splitlines() == ["*@xn--mnchen-3ya.de", "friend@bank.example"]
    result = run("remove", "alice@example.org", "FRIEND@bank.example", "x@y.example")
    assert result.exit_code == 0
    assert "removed 1" in result.output and "not present: x@y.example" in result.output


def test_malformed_entries_change_nothing(run) -> None:  # type: ignore[no-untyped-def]
    result = run("add", "alice@example.org", "ok@x.example", "example.org", "10.0.0.0/8")
    assert result.exit_code == 2
    assert "*@example.org" in result.output and "too wide" in result.output
    assert "2 invalid entries; nothing changed" in result.output
    assert run("list", "alice@example.org").output == ""
    result = run("add", "not-a-mailbox", "ok@x.example")
    assert result.exit_code == 2 and "error:" in result.output


def test_limit_is_a_clear_error(run, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FILTERD_ALLOWLIST_MAX_ENTRIES_PER_MAILBOX", "2")
    result = run("add", "bob@example.org", "a@x.example", "b@x.example", "c@x.example")
    assert result.exit_code == 1
    assert "exceed the limit of 2 entries; nothing changed" in result.output


def test_export_import_round_trip(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run("add", "@example.org", "*@partner.example", "192.0.2.0/24")
    out = tmp_path / "list.txt"
    assert run("export", "@example.org", "-o", str(out)).exit_code == 0
    text = out.read_text()
    assert text.startswith("# allowlist of @example.org\n")
    result = run("import", "carol@example.org", str(out))
    assert result.exit_code == 0, result.output
    assert run("list", "carol@example.org").output.split() == ["*@partner.example", "192.0.2.0/24"]
    result = run("import", "--replace", "carol@example.org", "-", stdin="new@x.example\n")
    assert result.exit_code == 0
    assert run("list", "carol@example.org").output.split() == ["new@x.example"]
    bad = tmp_path / "bad.txt"
    bad.write_text("ok@x.example\n*@*.com\n")
    result = run("import", "carol@example.org", str(bad))
    assert result.exit_code == 2 and f"{bad}:2:" in result.output
    assert run("list", "carol@example.org").output.split() == ["new@x.example"]


def test_check_site_file(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("check", str(ROOT / "allowlists" / "site.txt"))
    assert result.exit_code == 0 and "OK" in result.output
    bad = tmp_path / "site.txt"
    bad.write_text("friend@\n")
    assert run("check", str(bad)).exit_code == 2


def test_token_matches_the_api(run, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    assert run("token", "alice@example.org").exit_code == 1
    monkeypatch.setenv("FILTERD_ALLOWLIST_API_SECRET", "s3cret-s3cret-s3cret")
    result = run("token", "Alice+x@example.org")
    secret = b"s3cret-s3cret-s3cret"
    token = result.output.strip()
    assert check_token(secret, "alice@example.org", token, generation=0) is None
    assert abs(int(token.split(".")[0]) - time.time() - 30 * 86400) < 5  # api_token_days
    # One list's tokens revoked: the old token is refused, a new one works, others untouched.
    bob = run("token", "bob@example.org").output.strip()
    revoked = run("revoke-tokens", "alice@example.org")
    assert revoked.exit_code == 0 and "generation 1" in revoked.output
    assert check_token(secret, "alice@example.org", token, generation=1) == "revoked"
    fresh = run("token", "--days", "1", "alice@example.org").output.strip()
    assert check_token(secret, "alice@example.org", fresh, generation=1) is None
    assert abs(int(fresh.split(".")[0]) - time.time() - 86400) < 5
    assert check_token(secret, "bob@example.org", bob, generation=0) is None


def test_redis_down_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILTERD_PIPELINE_RECIPIENT_CHECKS", "[]")
    monkeypatch.setenv("FILTERD_PIPELINE_MESSAGE_CHECKS", "[]")
    result = CliRunner().invoke(
        allow, ["--redis-url", "redis://127.0.0.1:1/0", "list", "alice@example.org"]
    )
    assert result.exit_code == 1 and "unavailable" in result.output
