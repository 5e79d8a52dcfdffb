"""What the daemon calls after every decision: one log entry, index and counters.

Records are best-effort: they must never delay, fail or tempfail mail. So both
callbacks catch everything, count the failure and log it (at most once a minute),
and each does exactly one Redis round trip (one MULTI/EXEC pipeline). Values from
the SMTP dialogue are cleaned before they reach the writer (an odd queue id or a
Message-ID with spaces is dropped, not allowed to lose the whole entry), and only
fields the schema declares are passed: removing a field from rules/retention.toml
is how an operator stops storing it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from filterd.mail.analysis import analysis_of
from filterd.records.config import Config
from filterd.records.pseudonym import Pseudonymizer
from filterd.records.schema import load_schema
from filterd.records.writer import RecordWriter
from filterd.types import Action, Decision, Envelope, Message, RecipientDecision, SmtpReply

log = logging.getLogger("filterd.records")

_QUEUE_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_CODE_BAD = re.compile(r"[^A-Z0-9_]")
_ADDR_BAD = re.compile(r"[\x00-\x20\x7f<>%]")
_MID = re.compile(r"^<?[\x21-\x7e]{1,254}>?$")
FAILURE_LOG_INTERVAL = 60.0


def clean_code(code: str | None) -> str:
    code = _CODE_BAD.sub("_", (code or "").upper())[:64]
    return code if code[:1].isalpha() else "UNKNOWN"


def clean_address(address: str | None) -> str:
    """Envelope address as stored: no whitespace, brackets or controls (percent-encoded)."""
    value = (address or "").strip().strip("<>")
    return _ADDR_BAD.sub(lambda m: f"%{ord(m.group()):02X}", value)[:320]


def clean_ip(value: str | None) -> str | None:
    if not value:
        return None
    text = value.strip().strip("[]")
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def clean_queue_id(value: str | None) -> str | None:
    return value if value and _QUEUE_ID.match(value) else None


def reply_code(reply: SmtpReply | None) -> str | None:
    if reply is None:
        return None
    code = f"{reply.code} {reply.enhanced}".strip()
    return code if re.match(r"^[245][0-9]{2} [245]\.[0-9]{1,3}\.[0-9]{1,3}$", code) else None


def message_id(message: Message) -> str | None:
    """The Message-ID, read from the header block only (never parses the body)."""
    cached = vars(message).get("message_id")
    if cached is None:
        # From the message's one header parse (filterd.mail.analysis), as written.
        values = analysis_of(message).raw_header_values("Message-ID")
        cached = values[0].strip() if values else None
    return cached if cached and _MID.match(cached) else None


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class RecordsObserver:
    """Thread-safe; ``written`` and ``failures`` count callbacks since start-up."""

    def __init__(
        self,
        writer: RecordWriter,
        *,
        abuse_evidence: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.abuse_evidence = abuse_evidence
        self.clock = clock
        self._log_fields = writer.declared("smtp-log")
        self._abuse_fields = writer.declared("abuse-evidence")
        self._lock = threading.Lock()
        self.written = 0
        self.failures = 0
        self._unlogged_failures = 0
        self._last_failure_log = float("-inf")

    def on_recipient(self, envelope: Envelope, decision: RecipientDecision) -> None:
        """A recipient refused or deferred at RCPT time (accepted ones are skipped)."""
        try:
            if decision.action is Action.ACCEPT:
                return
            self._record(
                envelope,
                phase="rcpt",
                action=decision.action,
                code=decision.reason_code,
                reply=decision.reply,
                recipients=(decision.recipient,),
            )
        except Exception as exc:  # noqa: BLE001 - records must never affect mail
            self._failed(exc)

    def on_message(self, message: Message, decision: Decision) -> None:
        """End of message: ``message.envelope.recipients`` are the accepted ones."""
        try:
            self._record(
                message.envelope,
                phase="data",
                action=decision.action,
                code=decision.reason_code,
                reply=decision.reply,
                recipients=message.envelope.recipients,
                size=message.size,
                message_id=message_id(message),
            )
        except Exception as exc:  # noqa: BLE001 - records must never affect mail
            self._failed(exc)

    def _record(
        self,
        envelope: Envelope,
        *,
        phase: str,
        action: Action,
        code: str | None,
        reply: SmtpReply | None,
        recipients: Iterable[str],
        size: int | None = None,
        message_id: str | None = None,
    ) -> None:
        now = self.clock()
        reason = clean_code(code)
        sender = clean_address(envelope.mail_from)
        rcpts = [clean_address(r) for r in recipients]
        client_ip = clean_ip(envelope.client_ip)
        entry: dict[str, Any] = {
            "timestamp": now,
            "phase": phase,
            "queue_id": clean_queue_id(envelope.queue_id),
            "action": action.value,
            "reason_code": reason,
            "reply_code": reply_code(reply),
            "size": size,
            "sender": sender,
            "recipients": rcpts,
            "message_id": message_id,
            "client_ip": client_ip,
        }
        batch = self.writer.batch()
        record_id = batch.entry(
            "smtp-log", {k: v for k, v in entry.items() if k in self._log_fields}, now
        )
        mailboxes: list[str] = []
        if "sender" in self._log_fields and sender:
            mailboxes.append(sender)
        if "recipients" in self._log_fields:
            mailboxes.extend(rcpts)
        tokens_done: set[str] = set()
        for mailbox in mailboxes:
            token = batch.mailbox_token(mailbox)
            if token and token not in tokens_done:
                tokens_done.add(token)
                batch.index(mailbox, record_id)
        batch.count(utc_day(now), action.value, reason, max(1, len(rcpts)))
        if self.abuse_evidence and action is Action.REJECT and client_ip:
            abuse = {"timestamp": now, "client_ip": client_ip, "reason_code": reason}
            batch.entry(
                "abuse-evidence", {k: v for k, v in abuse.items() if k in self._abuse_fields}, now
            )
        batch.execute()
        with self._lock:
            self.written += 1

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            self._unlogged_failures += 1
            if now - self._last_failure_log < FAILURE_LOG_INTERVAL:
                return
            count, self._unlogged_failures = self._unlogged_failures, 0
            self._last_failure_log = now
            total = self.failures
        log.warning(
            "records not written (mail is unaffected): %s: %s",
            type(exc).__name__,
            exc,
            extra={"event": "records_failed", "failed": count, "failed_total": total},
        )


def build_observer(config: Config, redis_client: Any) -> RecordsObserver | None:
    """The daemon's observer, or None when records are disabled.

    Raises SchemaError at start-up if the schema is unusable (an untagged field, an
    unknown tag): unlike a failed write, that must stop the daemon.
    """
    if not config.enabled:
        return None
    schema = load_schema(config.resolve(config.schema_file))
    pseudonymizer = None
    if config.pseudonymise:
        pepper = b""
        if config.pseudonym_secret_file:
            pepper = config.resolve(config.pseudonym_secret_file).read_bytes().strip()
        pseudonymizer = Pseudonymizer(redis_client, schema, pepper=pepper)
    writer = RecordWriter(
        schema,
        redis_client,
        pseudonymizer=pseudonymizer,
        subaddress_separators=config.subaddress_separators,
    )
    return RecordsObserver(writer, abuse_evidence=config.abuse_evidence)
