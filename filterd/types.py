"""Value types shared by every stage: collect -> judge -> apply.

Everything here is immutable and free of I/O so that checks, the policy and the
milter adapter can pass these objects between threads without locking, and so
that unit tests can build them by hand.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from enum import StrEnum
from functools import cached_property


class Action(StrEnum):
    """What happens to a message (or one recipient) in the SMTP dialogue."""

    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class Effect(StrEnum):
    """What a finding asks for; the policy alone turns these into an Action.

    SCORE adds to the spam score; REJECT and TEMPFAIL force an outcome;
    EXEMPT (allowlists) removes bypassable findings for a recipient;
    UNEXEMPT (strict allowlist verification at end of message) cancels an
    exemption granted at RCPT time.
    """

    SCORE = "score"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    EXEMPT = "exempt"
    UNEXEMPT = "unexempt"


@dataclass(frozen=True)
class SmtpReply:
    """An SMTP reply with an RFC 3463 enhanced status code."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True)
class Thresholds:
    """Where a probability turns into an outcome, carried as evidence for the policy.

    At or above ``reject`` the message is refused; at or above ``tag`` the finding
    adds ``tag_points`` to the score. The check measures; the policy decides.
    """

    reject: float
    tag: float
    tag_points: float


@dataclass(frozen=True)
class Finding:
    """One named observation made by a check.

    ``detail`` is for the admin (scan output, logs) and must never contain
    message content or a user's attachment names. ``reply`` is the check's
    proposed SMTP reply when its effect forces an outcome; the policy decides
    whether it is used. ``bypassable`` findings are dropped for recipients
    whose allowlist exempts the sender (blocklists, classifier); viruses and
    banned types are not bypassable. ``unchecked``: the check could not look
    (failed open, list unavailable, too big to scan and accepted): the policy
    names it in X-Filterd-Unchecked. ``spam_probability`` with ``thresholds`` is
    a probability the policy turns into a verdict.
    """

    check: str
    code: str
    detail: str = ""
    score: float = 0.0
    effect: Effect = Effect.SCORE
    reply: SmtpReply | None = None
    bypassable: bool = True
    spam_probability: float | None = None
    thresholds: Thresholds | None = None
    unchecked: bool = False
    # EXEMPT only: the exemption holds only if verified at end of message (strict
    # allowlist mode), so the checks it would skip must still run.
    provisional: bool = False

    def as_reason(self) -> dict[str, str]:
        return {"check": self.check, "code": self.code, "detail": self.detail}


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope as collected from milter callbacks.

    ``mail_from`` is "" for the null sender (bounces). Addresses are kept as
    the client sent them, without angle brackets.
    """

    client_ip: str | None = None
    client_name: str | None = None
    helo: str | None = None
    mail_from: str = ""
    recipients: tuple[str, ...] = ()
    auth_user: str | None = None
    queue_id: str | None = None
    # Postfix's {daemon_name} (milter_macro_daemon_name of the service), and the
    # direction filterd.outbound.direction derived: "inbound" or "outbound".
    daemon_name: str | None = None
    direction: str = "inbound"

    @property
    def sender_domain(self) -> str | None:
        if "@" not in self.mail_from:
            return None
        return self.mail_from.rsplit("@", 1)[1].rstrip(".").lower() or None


BodyReader = Callable[[], Iterator[bytes]]


class Message:
    """A complete message: envelope, header block and a spooled body.

    The body is not held in memory: ``iter_raw`` streams it from the spool so
    that clamd can be fed in chunks. ``parsed`` and ``raw`` materialise the
    message and are only used by checks that need the whole text (bounded by
    the spool's size limit). ``oversize`` means the body exceeded the
    configured limit and was not kept in full: checks must not pretend they
    saw it.
    """

    def __init__(
        self,
        envelope: Envelope,
        header_block: bytes,
        body_reader: BodyReader,
        size: int,
        oversize: bool = False,
    ) -> None:
        self.envelope = envelope
        self.header_block = header_block
        self._body_reader = body_reader
        self.size = size
        self.oversize = oversize

    @classmethod
    def from_bytes(cls, raw: bytes, envelope: Envelope | None = None) -> Message:
        """Build a message from raw RFC 822 bytes (offline scan, tests)."""
        sep = _header_end(raw)
        header_block, body = raw[:sep], raw[sep:]
        return cls(envelope or Envelope(), header_block, lambda: iter((body,)), len(raw))

    def iter_raw(self) -> Iterator[bytes]:
        yield self.header_block
        yield from self._body_reader()

    def head(self, limit: int) -> bytes:
        """The first ``limit`` bytes, read from the spool without materialising the rest.

        Checks that only need the top of a message (the classifier) use this so
        that a 25 MB attachment does not become 25 MB of Python objects.
        """
        parts: list[bytes] = []
        remaining = limit
        for chunk in self.iter_raw():
            parts.append(chunk[:remaining])
            remaining -= len(parts[-1])
            if remaining <= 0:
                break
        return b"".join(parts)

    @cached_property
    def raw(self) -> bytes:
        return b"".join(self.iter_raw())

    @cached_property
    def parsed(self) -> EmailMessage:
        """The whole message parsed; materialises it, so checks prefer ``parse_head``."""
        return _parse(self.raw)

    def parse_head(self, limit: int) -> tuple[email.message.Message, bytes]:
        """The first ``limit`` bytes parsed, with those bytes (a cut tree parses with defects).

        compat32, the policy the classifier's features are defined on, so that one parse
        serves every reader of the message (``filterd.mail.analysis``); never raises.
        """
        head = self.head(limit)
        try:
            return email.message_from_bytes(head, policy=email.policy.compat32), head
        except Exception:  # noqa: BLE001 - the parser records defects; this is a last resort
            return email.message.Message(), head

    @cached_property
    def headers(self) -> EmailMessage:
        """The header block alone, parsed: header lookups never touch the body."""
        msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
            self.header_block
        )
        assert isinstance(msg, EmailMessage)
        return msg

    def header(self, name: str) -> str | None:
        """First value of a header, decoded leniently; None when absent."""
        try:
            value = self.headers.get(name)
        except Exception:  # noqa: BLE001 - malformed header: treat as absent
            return None
        return None if value is None else str(value)


def _parse(raw: bytes) -> EmailMessage:
    """The stdlib parser never raises on bad input; it records defects."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _header_end(raw: bytes) -> int:
    """Offset where the body starts (just after the blank line)."""
    candidates = [i + n for i, n in ((raw.find(b"\r\n\r\n"), 4), (raw.find(b"\n\n"), 2)) if i >= 0]
    return min(candidates) if candidates else len(raw)


@dataclass(frozen=True)
class RecipientDecision:
    """The outcome for one RCPT TO, decided at RCPT time."""

    recipient: str
    action: Action
    reply: SmtpReply | None
    # "filtered", "exempt" or "provisional": recipients of one transaction share it.
    policy_class: str
    findings: tuple[Finding, ...] = ()
    reason_code: str = "OK"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def exempt(self) -> bool:
        return self.policy_class != "filtered"


@dataclass(frozen=True)
class Decision:
    """The outcome for a whole message at end-of-message.

    ``reason_code`` is the single code that explains the outcome (``OK`` when
    accepted with nothing notable); records and statistics use it.
    """

    action: Action
    reply: SmtpReply | None
    reason_code: str
    findings: tuple[Finding, ...] = ()
    add_headers: tuple[tuple[str, str], ...] = ()
    spam_score: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def reasons(self) -> list[dict[str, str]]:
        return [f.as_reason() for f in self.findings]
