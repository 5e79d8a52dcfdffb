"""Entry and mailbox validation, canonical forms, and candidate matching (no servers)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.allowlist.config import Config
from filterd.allowlist.entries import (
    EntryError,
    Kind,
    canonical_mailbox,
    client_ip,
    parse_entry,
    parse_target,
)
from filterd.allowlist.match import Match, Probe, best, entry_matches_address, ip_candidates

CFG = Config()


def matches(entry: str, mail_from: str = "", ip: str | None = None) -> bool:
    """Does a list holding exactly ``entry`` match this sender / client?"""
    canonical = parse_entry(entry, CFG).text
    return bool(Probe.build(mail_from, ip).hits_in(frozenset({canonical})))


@pytest.mark.parametrize(
    ("text", "canonical", "kind"),
    [
        ("Friend@Example.ORG", "friend@example.org", Kind.ADDRESS),
        ("<friend@example.org>", "friend@example.org", Kind.ADDRESS),
        ("  a.b+c@example.org ", "a.b+c@example.org", Kind.ADDRESS),
        ("*@Example.org.", "*@example.org", Kind.DOMAIN),
        ("*@*.Example.org", "*@*.example.org", Kind.SUBDOMAIN),
        ("*@münchen.de", "*@xn--mnchen-3ya.de", Kind.DOMAIN),
        ("*@XN--MNCHEN-3YA.de", "*@xn--mnchen-3ya.de", Kind.DOMAIN),
        ("Jürgen@Bücher.example", "jürgen@xn--bcher-kva.example", Kind.ADDRESS),
        ("*@faß.de", "*@xn--fa-hia.de", Kind.DOMAIN),
        ("192.0.2.7", "192.0.2.7", Kind.IP),
        ("192.0.2.7/32", "192.0.2.7", Kind.IP),
        ("192.0.2.0/24", "192.0.2.0/24", Kind.CIDR),
        ("2001:DB8:0:0::/48", "2001:db8::/48", Kind.CIDR),
        ("::ffff:192.0.2.0/120", "192.0.2.0/24", Kind.CIDR),
    ],
)
def test_canonical_forms(text: str, canonical: str, kind: Kind) -> None:
    entry = parse_entry(text, CFG)
    assert (entry.text, entry.kind) == (canonical, kind)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("example.org", "*@example.org"),
        ("@example.org", "no local part"),
        ("friend@", "no domain"),
        ("a@b@example.org", "more than one '@'"),
        ("fr*end@example.org", "wildcard"),
        ("*friend@example.org", "wildcard"),
        ("friend@*.example.org", "wildcard"),
        ("*@ex*mple.org", "wildcard"),
        ("*@example.*", "wildcard"),
        ("*@*", "every sender"),
        ("*.example.org", "wildcard"),
        ("*@com", "public suffix"),
        ("*@*.com", "public suffix"),
        ("*@*.co.uk", "public suffix"),
        ("*@co.uk", "public suffix"),
        ("friend@exa mple.org", "whitespace"),
        ("friend@example.org\n*@evil.example", "control"),
        ("friend\x00@example.org", "control"),
        ("friend@exam\u200bple.org", "invisible"),
        ('"john"@example.org', "quoted local parts are not supported"),
        ("friend@[192.0.2.1]", "address literals"),
        ("friend@exa_mple.org", "not allowed in a host name"),
        ("friend@-example.org", "start or end with '-'"),
        ("friend@example..org", "empty label"),
        ("friend@xn--zz.org", "punycode"),
        ("friend@1.2.3.4", "IP address"),
        ("192.0.2.5/24", "host bits set; the range is 192.0.2.0/24"),
        ("192.0.2.0/33", "bad IP address or CIDR"),
        ("192.0.2.256", "bad IP address or CIDR"),
        ("10.0.0.0/8", "too wide"),
        ("0.0.0.0/0", "too wide"),
        ("2001::/16", "too wide"),
        ("fe80::1%eth0", "zone"),
        ("x" * 300 + "@example.org", "limit is 254"),
        ("a" * 65 + "@example.org", "64 octets"),
        ("friend@" + "a" * 64 + ".org", "63 characters"),
    ],
)
def test_malformed_entries_have_clear_errors(text: str, message: str) -> None:
    with pytest.raises(EntryError, match=None) as info:
        parse_entry(text, CFG)
    assert message in str(info.value), str(info.value)


def test_non_string_entry_is_refused() -> None:
    with pytest.raises(EntryError, match="must be a string"):
        parse_entry(42, CFG)


def test_minimum_prefix_is_configurable() -> None:
    wide = Config(min_ipv4_prefix=8)
    assert parse_entry("10.0.0.0/8", wide).text == "10.0.0.0/8"


@pytest.mark.parametrize(
    ("text", "mailbox"),
    [
        ("Alice@Example.ORG", "alice@example.org"),
        ("alice+news@example.org", "alice@example.org"),
        ("<alice+a+b@example.org>", "alice@example.org"),
        ("+alice@example.org", "+alice@example.org"),
        ("alice@bücher.example", "alice@xn--bcher-kva.example"),
    ],
)
def test_canonical_mailbox(text: str, mailbox: str) -> None:
    assert canonical_mailbox(text, CFG) == mailbox


def test_mailbox_canonical_form_is_configurable() -> None:
    keep = Config(subaddress_separators="", lowercase_local_part=False)
    assert canonical_mailbox("Alice+News@Example.org", keep) == "Alice+News@example.org"
    dash = Config(subaddress_separators="+-")
    assert canonical_mailbox("alice-list@example.org", dash) == "alice@example.org"


@pytest.mark.parametrize("text", ["*@example.org", "alice@*.example.org", "no-at-sign", ""])
def test_bad_mailboxes(text: str) -> None:
    with pytest.raises(EntryError):
        canonical_mailbox(text, CFG)


def test_targets() -> None:
    assert parse_target("@Example.ORG", CFG).key == "@example.org"
    assert parse_target("Bob+x@example.org", CFG).key == "bob@example.org"
    with pytest.raises(EntryError):
        parse_target("@a@example.org", CFG)


# Matching: each kind matches, and does not over-match.


def test_address_entry() -> None:
    assert matches("friend@example.org", "friend@example.org")
    assert matches("friend@example.org", "FRIEND@Example.Org")
    assert not matches("friend@example.org", "friend+x@example.org")
    assert not matches("friend@example.org", "friend@sub.example.org")
    assert not matches("friend@example.org", "other@example.org")
    assert not matches("friend@example.org", "friend@example.org.evil.test")


def test_domain_entry_does_not_match_lookalikes_or_subdomains() -> None:
    assert matches("*@example.org", "anyone@example.org")
    assert matches("*@example.org", "anyone@EXAMPLE.ORG.")
    assert not matches("*@example.org", "x@evil-example.org")
    assert not matches("*@example.org", "x@evilexample.org")
    assert not matches("*@example.org", "x@example.org.evil.test")
    assert not matches("*@example.org", "x@a.example.org")


def test_subdomain_entry_matches_strict_subdomains_only() -> None:
    assert matches("*@*.example.org", "x@a.example.org")
    assert matches("*@*.example.org", "x@a.b.example.org")
    assert not matches("*@*.example.org", "x@example.org")
    assert not matches("*@*.example.org", "x@evil-example.org")
    assert not matches("*@*.example.org", "x@a.evil-example.org")


def test_idn_unicode_entry_matches_punycode_sender_and_back() -> None:
    assert matches("*@münchen.de", "info@xn--mnchen-3ya.de")
    assert matches("*@xn--mnchen-3ya.de", "info@münchen.de")
    assert matches("*@MÜNCHEN.de", "info@münchen.de")
    assert matches("*@*.münchen.de", "info@rathaus.XN--MNCHEN-3YA.DE")
    assert matches("jürgen@bücher.example", "JÜRGEN@xn--bcher-kva.example")
    assert not matches("*@münchen.de", "info@munchen.de")
    # IDNA 2008 (non-transitional): ß is not folded to ss.
    assert not matches("*@faß.de", "x@fass.de")


def test_ip_and_cidr_entries() -> None:
    assert matches("192.0.2.7", ip="192.0.2.7")
    assert not matches("192.0.2.7", ip="192.0.2.8")
    assert matches("192.0.2.0/24", ip="192.0.2.200")
    assert not matches("192.0.2.0/24", ip="192.0.3.1")
    assert matches("192.0.2.0/24", ip="::ffff:192.0.2.9")
    assert matches("192.0.2.0/24", ip="[192.0.2.9]")
    assert matches("2001:db8::/32", ip="IPv6:2001:db8:ffff::1")
    assert not matches("2001:db8::/32", ip="2001:db9::1")
    assert not matches("192.0.2.0/24", mail_from="x@192.0.2.1")
    assert not matches("192.0.2.0/24", ip="unknown")


def test_null_sender_matches_only_ip_entries() -> None:
    assert not matches("*@example.org", "", "192.0.2.1")
    assert matches("192.0.2.0/24", "", "192.0.2.1")


def test_client_ip_parsing() -> None:
    assert str(client_ip("IPv6:2001:DB8::1")) == "2001:db8::1"
    assert client_ip(None) is None
    assert client_ip("garbage") is None


def test_best_prefers_unforgeable_then_site_domain_mailbox() -> None:
    found = [Match("mailbox", "friend@example.org"), Match("site", "*@example.org")]
    assert best(found) == Match("site", "*@example.org")
    found.append(Match("mailbox", "192.0.2.0/24"))
    chosen = best(found)
    assert chosen is not None and chosen.detail == "mailbox cidr-entry"
    assert best([]) is None


def test_from_header_agreement() -> None:
    assert entry_matches_address("*@*.example.org", "News@Mail.Example.org")
    assert not entry_matches_address("*@*.example.org", "news@example.org")
    assert not entry_matches_address("friend@example.org", "not an address")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_an_entry_or_entry_error(text: str) -> None:
    try:
        entry = parse_entry(text, CFG)
    except EntryError as exc:
        assert str(exc)
        return
    # A canonical entry is a fixed point and has no whitespace or control characters.
    assert parse_entry(entry.text, CFG) == entry
    assert entry.text.isprintable() and not any(c.isspace() for c in entry.text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.one_of(st.none(), st.text(max_size=60)))
def test_any_sender_gives_a_probe(mail_from: str, ip: str | None) -> None:
    probe = Probe.build(mail_from, ip)
    assert len(probe.members) <= 64 + 129


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_ip_candidates_are_the_canonical_networks(address: ipaddress.IPv4Address) -> None:
    expected = [str(address)] + [
        str(ipaddress.ip_network((address, p), strict=False))
        for p in range(address.max_prefixlen - 1, -1, -1)
    ]
    assert ip_candidates(address) == expected
