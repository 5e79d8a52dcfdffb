"""The fast link scan for ASCII text finds exactly what the case-insensitive patterns find.

``hosts_in_text`` scans ASCII text lower-cased with literal-first patterns (an
order of magnitude faster); these tests hold it equal to the reference: one
``finditer`` of ``_SCHEME_URL`` and one of ``_WWW`` over the original text, merged
by offset, on generated text dense in the characters the patterns care about.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.mail import links

PIECES = [
    "http", "HTTP", "hTtPs", "hxxp", "HXXPS", "h**p", "ftp", "FTP", "xhttp", "0ftp",
    "://", ":/", ": //", " :\\\\", "//", "\\\\", ":", "www.", "WWW1.", "www123.", "wwww.",
    ".", "-", "@", "/", "a.example", "Evil.Example", "b.co", " ", "\n", "\t", "?", "#",
    "user:pw@", ":8080", "<", ">", "'", '"', "x", "9",
]  # fmt: skip


def reference(text: str) -> list[str]:
    """The scan as it was: both case-insensitive patterns over the original text."""
    found = []
    if ":" in text and ("//" in text or "\\" in text):
        found += [
            (m.start(), links._host_of(m.group("auth"))) for m in links._SCHEME_URL.finditer(text)
        ]
    if "www" in text.lower():
        found += [(m.start(), links._host_of(m.group("auth"))) for m in links._WWW.finditer(text)]
    return [host for _, host in sorted(found)]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_fast_ascii_scan_equals_the_case_insensitive_patterns(text: str) -> None:
    assert list(links.hosts_in_text(text)) == reference(text)


def test_known_links_keep_their_case_and_order() -> None:
    text = "Go to HTTP://Shop.Example.COM/x, then www.Other.example and hxxps ://evil.example ftp://f.example"
    assert list(links.hosts_in_text(text)) == [
        "Shop.Example.COM", "www.Other.example", "evil.example", "f.example",
    ]  # fmt: skip
    assert list(links.hosts_in_text(text)) == reference(text)
