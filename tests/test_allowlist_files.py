"""The list file format, the shipped site list, its reload, and Authentication-Results parsing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from filterd.allowlist.config import Config
from filterd.allowlist.files import ListFileError, SiteList, format_list, parse_list
from filterd.allowlist.match import authres_verifies, parse_authres

CFG = Config()
ROOT = Path(__file__).resolve().parent.parent


def test_shipped_site_list_parses() -> None:
    site = SiteList([ROOT / "allowlists" / "site.txt"], CFG)
    assert isinstance(site.entries, frozenset)


def test_format_and_parse_round_trip() -> None:
    text = """\ufeff# header
friend@example.org   # a friend
a#b@example.org
*@Example.net\t# tab before comment
192.0.2.0/24

friend@EXAMPLE.org
"""
    entries = parse_list(text, "t.txt", CFG)
    assert [e.text for e in entries] == [
        "friend@example.org",
        "a#b@example.org",
        "*@example.net",
        "192.0.2.0/24",
    ]
    again = parse_list(format_list(entries, "allowlist of x@example.org"), "out", CFG)
    assert sorted(e.text for e in again) == sorted(e.text for e in entries)


def test_errors_name_file_and_line_and_keep_going() -> None:
    text = "ok@example.org\nexample.org\n*@com\nfriend@example.org trailing words\n"
    with pytest.raises(ListFileError) as info:
        parse_list(text, "mine.txt", CFG)
    lines = str(info.value).splitlines()
    assert [line.split(":")[1] for line in lines] == ["2", "3", "4"]
    assert all(line.startswith("mine.txt:") for line in lines)


def test_site_list_reloads_on_change_and_keeps_old_list_on_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "site.txt"
    path.write_text("*@one.example\n")
    now = [0.0]
    site = SiteList([path], CFG, clock=lambda: now[0])
    assert site.entries == {"*@one.example"}
    path.write_text("*@two.example\n")
    os.utime(path, ns=(1, 10**18))
    site.maybe_reload()  # within site_reload_seconds: not looked at yet
    assert site.entries == {"*@one.example"}
    now[0] += 1.5
    site.maybe_reload()
    assert site.entries == {"*@two.example"}
    path.write_text("not an entry\n")
    os.utime(path, ns=(1, 2 * 10**18))
    now[0] += 1.5
    with caplog.at_level(logging.ERROR, logger="filterd.allowlist"):
        site.maybe_reload()
    assert site.entries == {"*@two.example"}
    assert "keeping the previous list" in caplog.text


def test_site_list_missing_file_is_empty_until_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "absent.txt"
    now = [0.0]
    with caplog.at_level(logging.WARNING, logger="filterd.allowlist"):
        site = SiteList([path], CFG, clock=lambda: now[0])
    assert site.entries == frozenset()
    assert "missing" in caplog.text
    path.write_text("*@late.example\n")
    now[0] += 5
    site.maybe_reload()
    assert site.entries == {"*@late.example"}


def test_unreadable_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ListFileError, match="cannot read"):
        SiteList([tmp_path], CFG)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9@example.org\n")
    with pytest.raises(ListFileError, match="not UTF-8"):
        SiteList([path], CFG)


# Authentication-Results (RFC 8601).

AR = (
    "mx.provider.example; spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=bounce@Bank.example;"
    " dkim=pass header.d=mail.bank.example header.s=s1 (good signature);"
    ' dmarc=pass (p=reject) header.from=bank.example; arc=none reason="a; b"'
)


def test_parse_authres() -> None:
    authserv, results = parse_authres(AR)
    assert authserv == "mx.provider.example"
    assert [(r.method, r.result) for r in results][:3] == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
    ]
    assert results[0].props["smtp.mailfrom"] == "bounce@Bank.example"
    assert parse_authres("") == ("", [])
    assert parse_authres("x; none")[1] == []


@pytest.mark.parametrize(
    ("header", "sender_domain", "verified"),
    [
        ("mx.provider.example; spf=pass smtp.mailfrom=bank.example", "bank.example", True),
        ("mx.provider.example; spf=pass smtp.mailfrom=a@bank.example", "bank.example", True),
        # SPF authenticates exactly the MAIL FROM domain.
        ("mx.provider.example; spf=pass smtp.mailfrom=x.bank.example", "bank.example", False),
        ("mx.provider.example; spf=fail smtp.mailfrom=bank.example", "bank.example", False),
        ("mx.provider.example; spf=softfail smtp.mailfrom=bank.example", "bank.example", False),
        # DKIM and DMARC count when aligned at the organizational domain.
        ("mx.provider.example; dkim=pass header.d=mail.bank.example", "bank.example", True),
        ("mx.provider.example; dkim=pass header.i=@bank.example", "news.bank.example", True),
        ("mx.provider.example; dmarc=pass header.from=bank.example", "bank.example", True),
        ("mx.provider.example; dmarc=pass header.from=bank.co.uk", "x.bank.co.uk", True),
        # A pass for another domain proves nothing about the allowlisted sender.
        ("mx.provider.example; dmarc=pass header.from=attacker.example", "bank.example", False),
        ("mx.provider.example; dkim=pass header.d=evil-bank.example", "bank.example", False),
        ("mx.provider.example; dkim=pass header.d=co.uk", "bank.co.uk", False),
        # Untrusted authserv-id (added by the sender, not by us).
        ("evil.example; dmarc=pass header.from=bank.example", "bank.example", False),
        (
            "mx.provider.example (comment; dmarc=pass header.from=bank.example)",
            "bank.example",
            False,
        ),
    ],
)
def test_authres_alignment(header: str, sender_domain: str, verified: bool) -> None:
    assert authres_verifies([header], ["MX.provider.example"], sender_domain) is verified


def test_authres_needs_trusted_ids() -> None:
    header = "mx.provider.example; dmarc=pass header.from=bank.example"
    assert not authres_verifies([header], [], "bank.example")
