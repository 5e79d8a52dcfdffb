"""Pure unit tests: link extraction from text/HTML and registered domains."""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.mail.links import (
    hosts_in_html,
    hosts_in_text,
    link_domains,
    normalize_domain,
    registered_domain,
    registered_domains,
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("www.shop.example.co.uk", "example.co.uk"),
        ("WWW.Example.COM.", "example.com"),
        ("a.b.c.example.org", "example.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("shop.BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("evil\u3002example\uff0ecom", "example.com"),
        ("%65vil.example", "evil.example"),
        ("co.uk", None),
        ("192.0.2.1", None),
        ("localhost", None),
        ("bad..example.com", None),
        ("under_score-ok.example", "under_score-ok.example"),
        ("-bad.example", None),
        ("x" * 64 + ".example", None),
    ],
)
def test_registered_domain(host: str, expected: str | None) -> None:
    assert registered_domain(host) == expected


def test_normalize_keeps_full_host_and_refuses_junk() -> None:
    assert normalize_domain("Mail.Example.NET.") == "mail.example.net"
    assert normalize_domain("[2001:db8::1]") is None
    assert normalize_domain("exa mple.com") is None
    assert normalize_domain("") is None


def test_text_links_with_obfuscations() -> None:
    text = (
        "Visit HtTpS://Mixed.Example.COM./path, or hxxp://defanged[.]example.net/x\n"
        "and www.plain-www.example.org today. Also http://user:pw@real-host.example.info:8080/\n"
        "and http:\\\\backslash.example.biz\\x (see http://paren.example.co.uk).\n"
        "Not links: file.zip, john@mail.example.ch, example.dev without scheme."
    )
    assert registered_domains(hosts_in_text(text)) == [
        "example.com",
        "example.net",
        "example.org",
        "example.info",
        "example.biz",
        "example.co.uk",
    ]


def test_html_links_entities_attributes_and_idn() -> None:
    html = (
        '<html><body><a href="http://evil&#46;example">click</a>'
        '<a HREF="HTTP://Upper.Case-Host.Example.">x</a>'
        '<img src="//cdn.protocol-relative.example/p.png">'
        '<a href="https://www.google.com/url?q=https%3A%2F%2Fredirected.example%2F">r</a>'
        '<form action="https://form&#x2e;example/post"></form>'
        '<a href=" ht\ttps://split&period;example/ ">tab</a>'
        '<meta http-equiv="refresh" content="0; URL=http://refresh.example/">'
        "<p>Text link http://text&#46;example/ and <b>http://bücher.example/</b></p>"
        '<a href="relative/path.html">rel</a><a href="mailto:x@mail.example">m</a>'
        "</body></html>"
    )
    domains = registered_domains(hosts_in_html(html))
    assert domains == [
        "evil.example",
        "case-host.example",
        "protocol-relative.example",
        "google.com",
        "redirected.example",
        "form.example",
        "split.example",
        "refresh.example",
        "text.example",
        "xn--bcher-kva.example",
    ]


def test_message_walk_reads_plain_and_html_but_not_attachments() -> None:
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg.set_content("plain part: https://plain-link.example/\n")
    msg.add_alternative('<a href="https://html-link.example/">x</a>', subtype="html")
    msg.add_attachment(
        b"http://attached.example/", maintype="text", subtype="plain", filename="notes.txt"
    )
    assert link_domains(msg) == ["plain-link.example", "html-link.example"]
    assert link_domains(msg, skip=["plain-link.example"]) == ["html-link.example"]


def test_broken_charset_and_markup_do_not_crash() -> None:
    raw = (
        b"Content-Type: text/html; charset=x-no-such-charset\r\n\r\n"
        b"<a href='http://charset.example/'><<<</div></a"
    )
    import email
    import email.policy

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert link_domains(msg) == ["charset.example"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_extraction_never_raises_and_yields_dns_names(text: str) -> None:
    for domain in registered_domains(list(hosts_in_text(text)) + hosts_in_html(text)):
        assert domain == normalize_domain(domain)
        assert domain.isascii() and "." in domain
