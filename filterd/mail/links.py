"""Find the registered domains of links in text and HTML bodies.

A URI blocklist lists registered domains (``example.co.uk``, not
``www.shop.example.co.uk``), so hosts are cut at the public suffix using the
one shared list of ``filterd.mail.psl`` (never downloaded). Spammers
hide links from naive scanners: mixed-case schemes, ``hxxp``, trailing dots,
HTML entities (``evil&#46;com``), percent-encoded hosts, ``user@host`` tricks,
backslashes, full-width dots and Unicode (IDN) names; each is undone here
before the name goes to DNS as lower-case punycode. Only what a mail client
would make clickable is extracted: URLs with a scheme, ``//host`` in HTML
attributes and ``www.`` names; bare words like ``file.zip`` are not links.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from email.contentmanager import raw_data_manager
from email.message import Message
from html.parser import HTMLParser
from urllib.parse import unquote

from filterd.mail.psl import private_suffix

# Work bounds: a hostile body cannot make extraction slow or unbounded.
MAX_PART_CHARS = 1_000_000
MAX_HOSTS = 2000

_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_DEFANG = re.compile(r"[\[({]\s*(?:\.|dot)\s*[\])}]", re.IGNORECASE)
_SCHEME_URL = re.compile(
    r"(?<![a-z0-9])(?:h(?:tt|xx|\*\*)ps?|ftp)\s*:\s*[/\\]{2}(?P<auth>[^\s/\\?#<>\"'`|^{}]+)",
    re.IGNORECASE,
)
_WWW = re.compile(r"(?<![\w.@/-])(?P<auth>www\d{0,3}\.[^\s/\\?#<>\"'`|^{}]+)", re.IGNORECASE)
# The same three patterns for lower-cased ASCII text, each starting with a literal
# and its look-behind moved after it: the regex engine then skips ahead to that
# literal in C instead of trying every position (measured on 8 KB of ham text:
# 450 -> 30 us). Same matches; tests/test_links_fastpath.py holds them equal.
_AUTH = r"(?P<auth>[^\s/\\?#<>\"'`|^{}]+)"
_SCHEME_H = re.compile(r"h(?<![a-z0-9]h)(?:tt|xx|\*\*)ps?\s*:\s*[/\\]{2}" + _AUTH)
_SCHEME_FTP = re.compile(r"ftp(?<![a-z0-9]ftp)\s*:\s*[/\\]{2}" + _AUTH)
_WWW_LOWER = re.compile(r"www(?<![\w.@/-]www)\d{0,3}\.[^\s/\\?#<>\"'`|^{}]+")
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_URL_ATTRS = frozenset(
    {"href", "src", "action", "formaction", "background", "cite", "data", "poster", "longdesc"}
)
_TRAILING = ".,;:!?)]}>'\"*"


def normalize_domain(text: str) -> str | None:
    """A host as found in mail -> lower-case ASCII (punycode) DNS name, or None.

    None for IP literals, single labels, empty labels and names DNS cannot
    carry, so that junk never becomes a query.
    """
    host = unquote(text.strip()).translate(_DOTS).strip().rstrip(".").lower()
    if not host or len(host) > 1000 or "." not in host:
        return None
    if host[-1].isdigit() or host.startswith("["):
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            return None
    labels: list[str] = []
    for label in host.split("."):
        if not label:
            return None
        if not label.isascii():
            try:
                label = label.encode("idna").decode("ascii")
            except UnicodeError:
                return None
        if not _LABEL.match(label):
            return None
        labels.append(label)
    name = ".".join(labels)
    if len(name) > 253 or labels[-1].isdigit():
        return None
    return name


def registered_domain(host: str) -> str | None:
    """``www.shop.example.co.uk`` -> ``example.co.uk`` (None if host is a suffix)."""
    name = normalize_domain(host)
    if name is None:
        return None
    return private_suffix(name)


def _host_of(authority: str) -> str:
    """``user:pw@Host.Example.:8080`` -> ``Host.Example.``: what a browser connects to."""
    authority = authority.rstrip(_TRAILING)
    host = authority.rpartition("@")[2]
    if host.startswith("["):
        return host  # IPv6 literal: normalize_domain drops it
    return host.partition(":")[0]


def hosts_in_text(text: str) -> Iterator[str]:
    """Hosts of URLs written with a scheme (also ``hxxp``) or starting ``www.``."""
    text = text[:MAX_PART_CHARS]
    # Guards: each pattern needs a character most text lacks; a substring test
    # runs in C at memory speed, a regex scan of the same text costs ~50x more
    # (bench/core_bench.py). The guards only skip scans that cannot match.
    if "[" in text or "(" in text or "{" in text:
        text = _DEFANG.sub(".", text)
    if not text.isascii():
        text = text.translate(_DOTS)
    found: list[tuple[int, str]] = []
    schemes = ":" in text and ("//" in text or "\\" in text)
    if text.isascii():
        found = _ascii_links(text, schemes)
    else:
        patterns = []
        if schemes:
            patterns.append(_SCHEME_URL)
        if "www" in text or "www" in text.lower():
            patterns.append(_WWW)
        for pattern in patterns:
            for match in pattern.finditer(text):
                found.append((match.start(), _host_of(match.group("auth"))))
    found.sort()
    for _, host in found:
        yield host


def _ascii_links(text: str, schemes: bool) -> list[tuple[int, str]]:
    """``_SCHEME_URL`` and ``_WWW`` matches, found in the lower-cased text (same offsets).

    The scheme pattern is split in two (``h..`` and ``ftp``); merged by offset,
    a match that starts inside the previous one is dropped, as one ``finditer``
    over the combined pattern would never have found it. Hosts are cut from the
    original text, so they keep their case as before.
    """
    lower = text.lower()
    found: list[tuple[int, str]] = []
    if schemes:
        matches = sorted(
            (m.start(), m.end(), m.start("auth"), m.end("auth"))
            for pattern in (_SCHEME_H, _SCHEME_FTP)
            for m in pattern.finditer(lower)
        )
        end = -1
        for start, stop, auth_start, auth_end in matches:
            if start < end:
                continue
            end = stop
            found.append((start, _host_of(text[auth_start:auth_end])))
    if "www" in lower:
        found += [
            (m.start(), _host_of(text[m.start() : m.end()])) for m in _WWW_LOWER.finditer(lower)
        ]
    return found


class _LinkParser(HTMLParser):
    """Collects URL-bearing attribute values and visible text, entities decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hosts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in _URL_ATTRS:
                self._url(value)
            elif tag == "meta" and name == "content" and "url=" in value.lower():
                self._url(value[value.lower().index("url=") + 4 :])

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        self.hosts.extend(hosts_in_text(data))

    def _url(self, value: str) -> None:
        # Browsers drop tabs and newlines inside URLs and strip the ends.
        value = re.sub(r"[\t\r\n]", "", value).strip().strip("'\"")
        if value.startswith(("//", "\\\\")):
            self.hosts.append(_host_of(re.split(r"[/\\?#]", value[2:], maxsplit=1)[0]))
        self.hosts.extend(hosts_in_text(value))
        if "%" in value:
            self.hosts.extend(hosts_in_text(unquote(value)))


def hosts_in_html(html: str) -> list[str]:
    parser = _LinkParser()
    try:
        parser.feed(html[:MAX_PART_CHARS])
        parser.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient; never fail a message on markup
        pass
    return parser.hosts


def part_text(part: Message) -> str:
    """A text part's content as str, decoded leniently (unknown charsets, broken encodings).

    The standard content manager's text decoding (declared charset, errors replaced), for
    a part of either policy: the analysis parses with compat32 (see ``Message.parse_head``).
    Decoding records defects (bad base64 padding) on the part; they are put back as they
    were, so reading the one shared parse never changes what the next reader sees.
    """
    defects = list(part.defects)
    try:
        try:
            content = raw_data_manager.get_content(part)
        except Exception:  # noqa: BLE001 - unknown charset or broken encoding
            content = None
        if isinstance(content, str):
            return content
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            return payload[: MAX_PART_CHARS * 4].decode("utf-8", errors="replace")
        return ""
    finally:
        part.defects[:] = defects


def hosts_in_message(message: Message) -> Iterator[str]:
    """Link hosts of every inline text/plain and text/html part, in order."""
    for part in message.walk():
        if part.get_content_maintype() != "text" or part.get_content_disposition() == "attachment":
            continue
        subtype = part.get_content_subtype()
        if subtype == "html":
            yield from hosts_in_html(part_text(part))
        elif subtype == "plain":
            yield from hosts_in_text(part_text(part))


def registered_domains(hosts: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    """Unique registered domains in order of first appearance, minus ``skip``."""
    skipped = {d.lower().rstrip(".") for d in skip}
    seen: dict[str, None] = {}
    for count, host in enumerate(hosts):
        if count >= MAX_HOSTS:
            break
        domain = registered_domain(host)
        if domain and domain not in skipped:
            seen.setdefault(domain, None)
    return list(seen)


def link_domains(message: Message, skip: Iterable[str] = ()) -> list[str]:
    """The registered domains a message's bodies link to."""
    return registered_domains(hosts_in_message(message), skip)
