"""One analysis per message: parse once, decode each text part once, extract links once.

Every end-of-message check used to read the message its own way (uribl parsed
the top of the message, the classifier parsed it again, the allowlist and the
records observer re-parsed the header block with compat32). A ``MessageAnalysis``
is built lazily, once per message, and every check reads the same objects:

- ``headers``: the one parse of the header block (``Message.headers``), and
  ``raw_header_values`` for the source values; those come from the head parse
  below when it already holds the whole header block, so a message whose head is
  parsed never has its header block parsed a second time;
- ``head_message``: the top ``head_limit`` bytes parsed once, with the compat32
  policy the classifier's features are defined on, so the classifier scores this
  parse instead of its own whenever it covers what the classifier reads
  (``whole_head``); the rest of a large message is never materialised, so
  memory stays flat in message size; attachments are walked by streaming,
  ``filterd.mail.walk``;
- ``text_parts``: inline text/plain and text/html parts of that head, decoded once;
- ``link_hosts`` and ``link_domains``: hosts of links in those parts, cut at the
  one public-suffix list (``filterd.mail.psl``);
- ``from_domains``: registered domains of the From: addresses;
- ``walk``: the streaming attachment walk over the whole message.

Checks run in threads: each attribute is computed under its own lock, so two
checks asking at once share one computation instead of doing it twice.
"""

from __future__ import annotations

import email.message
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses
from typing import TypeVar

from filterd.mail.links import MAX_HOSTS, hosts_in_html, hosts_in_text, part_text, registered_domain
from filterd.mail.walk import Item, Obstacle, WalkLimits, walk
from filterd.types import Message

T = TypeVar("T")

# The top of a message the analysis parses: what uribl's max_bytes defaulted to.
DEFAULT_HEAD_LIMIT = 1024 * 1024
_ATTR = "_filterd_analysis"
_ATTACH_LOCK = threading.Lock()


@dataclass(frozen=True)
class TextPart:
    """One inline text part of the message head, decoded once."""

    subtype: str  # "plain" or "html"
    text: str


class MessageAnalysis:
    """Everything derived from one message that more than one reader needs."""

    def __init__(self, message: Message, head_limit: int = DEFAULT_HEAD_LIMIT) -> None:
        self.message = message
        self.head_limit = head_limit
        self._values: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _once(self, name: str, build: Callable[[], T]) -> T:
        if name in self._values:
            return self._values[name]  # type: ignore[return-value]
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._values:
                self._values[name] = build()
        return self._values[name]  # type: ignore[return-value]

    # -- headers -----------------------------------------------------------------

    @property
    def headers(self) -> EmailMessage:
        """The header block, parsed once (shared with ``Message.header``)."""
        return self._once("headers", lambda: self.message.headers)

    def raw_header_values(self, name: str) -> list[str]:
        """Every value of a header as the sender wrote it, unfolded, from the one parse.

        The same strings a compat32 parse gives, without a second parse.
        """
        wanted = name.lower()
        return [v for k, v in self.header_items if k.lower() == wanted]

    @property
    def header_items(self) -> list[tuple[str, str]]:
        """The header block's (name, value) pairs as written, in order."""
        return self._once("header_items", self._header_items)

    def _header_items(self) -> list[tuple[str, str]]:
        # When the head is already parsed and holds the whole header block, its pairs are
        # the ones a header-only parse would give (the same feed parser splits the block;
        # compat32 and the default policy store a source value alike), so the header
        # block is not parsed a second time (~0.1 ms a message). Readers that come first
        # (the head may never be parsed) use the header-only parse.
        head = self._values.get("head")
        try:
            if isinstance(head, tuple) and head[1] >= len(self.message.header_block):
                items = head[0].raw_items()
            else:
                items = self.headers.raw_items()
            return [(str(k), str(v)) for k, v in items]
        except Exception:  # noqa: BLE001 - malformed headers are simply absent
            return []

    @property
    def from_domains(self) -> list[str]:
        """Registered domains of the From: header's addresses (usually one)."""
        return self._once("from_domains", self._from_domains)

    def _from_domains(self) -> list[str]:
        # The first From: as written, read by getaddresses: the header registry's
        # structured parse of the same value cost ~0.25 ms per message for nothing
        # (an address is never an encoded word; display names are not looked at).
        values = self.raw_header_values("From")[:1]
        if not values or not values[0].strip():
            return []
        domains: list[str] = []
        for _, address in getaddresses(values):
            if "@" in address:
                domain = registered_domain(address.rsplit("@", 1)[1])
                if domain and domain not in domains:
                    domains.append(domain)
        return domains

    # -- the head of the message -------------------------------------------------

    @property
    def head_message(self) -> email.message.Message:
        """The top ``head_limit`` bytes, parsed once (a cut MIME tree parses with defects)."""
        return self._head()[0]

    def whole_head(self, limit: int) -> tuple[email.message.Message, int] | None:
        """The parse and the message's size (CRLF counted as one byte) when the parse holds
        the WHOLE message and that is at most ``limit`` bytes; else None (the reader parses
        its own cut, as it would without an analysis)."""
        message, raw_len, lf_size, whole = self._head()
        if not whole or raw_len > limit or self.message.oversize:
            return None
        return message, lf_size

    def _head(self) -> tuple[email.message.Message, int, int, bool]:
        return self._once("head", self._parse_head)

    def _parse_head(self) -> tuple[email.message.Message, int, int, bool]:
        parsed, raw = self.message.parse_head(self.head_limit)
        return parsed, len(raw), len(raw) - raw.count(b"\r\n"), len(raw) < self.head_limit

    @property
    def text_parts(self) -> list[TextPart]:
        """Inline text/plain and text/html parts of the head, in order, each decoded once."""
        return self._once("text_parts", self._text_parts)

    def _text_parts(self) -> list[TextPart]:
        parts: list[TextPart] = []
        for part in self.head_message.walk():
            if part.get_content_maintype() != "text":
                continue
            if part.get_content_disposition() == "attachment":
                continue
            subtype = part.get_content_subtype()
            if subtype in ("plain", "html"):
                parts.append(TextPart(subtype, part_text(part)))
        return parts

    @property
    def link_hosts(self) -> list[str]:
        """Hosts of links in the text parts, in order of appearance (bounded)."""
        return self._once("link_hosts", self._link_hosts)

    def _link_hosts(self) -> list[str]:
        hosts: list[str] = []
        for part in self.text_parts:
            found = hosts_in_html(part.text) if part.subtype == "html" else hosts_in_text(part.text)
            for host in found:
                hosts.append(host)
                if len(hosts) >= MAX_HOSTS:
                    return hosts
        return hosts

    @property
    def registered_link_domains(self) -> list[str]:
        """Unique registered domains of the links, in order of first appearance."""
        return self._once("link_domains", self._registered)

    def _registered(self) -> list[str]:
        seen: dict[str, None] = {}
        for host in self.link_hosts:
            domain = registered_domain(host)
            if domain:
                seen.setdefault(domain, None)
        return list(seen)

    def link_domains(self, skip: Iterable[str] = ()) -> list[str]:
        skipped = {d.lower().rstrip(".") for d in skip}
        return [d for d in self.registered_link_domains if d not in skipped]

    # -- attachments -----------------------------------------------------------------

    def walk(self, limits: WalkLimits | None = None) -> Iterator[Item | Obstacle]:
        """Every leaf part and archive member of the WHOLE message, streamed from the spool.

        Not memoised on purpose: decoded parts live in capped temp files while the
        walk runs, so memory does not grow with the message (``filterd.mail.walk``).
        """
        return walk(self.message.iter_raw(), limits)


def attach(message: Message, head_limit: int = DEFAULT_HEAD_LIMIT) -> MessageAnalysis:
    """Give ``message`` its analysis (the pipeline does this once, before the checks run)."""
    with _ATTACH_LOCK:
        existing = vars(message).get(_ATTR)
        if isinstance(existing, MessageAnalysis):
            return existing
        analysis = MessageAnalysis(message, head_limit)
        setattr(message, _ATTR, analysis)
        return analysis


def analysis_of(message: Message) -> MessageAnalysis:
    """The message's analysis; built with the default head limit if the pipeline did not."""
    existing = vars(message).get(_ATTR)
    return existing if isinstance(existing, MessageAnalysis) else attach(message)
