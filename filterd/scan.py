"""Offline judgement of one raw message, exactly as the milter would judge it.

Used by `filterd scan` so that an admin's "why was this refused?" gets the
answer the daemon would have given: recipients first (RCPT phase, with the
same transaction split), then content for the accepted ones.
"""

from __future__ import annotations

from typing import Any

from filterd.runtime import Runtime
from filterd.transaction import Transaction
from filterd.types import Envelope


def scan_bytes(runtime: Runtime, raw: bytes, envelope: Envelope) -> dict[str, Any]:
    tx = Transaction(runtime, envelope)
    for rcpt in envelope.recipients:
        tx.add_recipient(rcpt)
    accepted, refused = tx.accepted, tx.refused
    per_rcpt = [
        {
            "rcpt": d.recipient,
            "action": d.action.value,
            "smtp_reply": _reply(d.reply),
            "code": d.reason_code,
        }
        for d in accepted + refused
    ]
    if not accepted:
        first = refused[0]
        return {
            "action": first.action.value,
            "smtp_reply": _reply(first.reply),
            "reason_code": first.reason_code,
            "spam_score": None,
            "reasons": [f.as_reason() for d in refused for f in d.findings],
            "recipients": per_rcpt,
        }
    verdict = tx.judge(tx.message_from_bytes(raw))
    return {
        "action": verdict.action.value,
        "smtp_reply": _reply(verdict.reply),
        "reason_code": verdict.reason_code,
        "spam_score": verdict.spam_score,
        "reasons": verdict.reasons,
        "headers": [f"{k}: {v}" for k, v in verdict.add_headers],
        "recipients": per_rcpt,
        "timings_ms": {k: round(v * 1000, 2) for k, v in verdict.timings.items()},
    }


def _reply(reply: object) -> str | None:
    return None if reply is None else str(reply)
