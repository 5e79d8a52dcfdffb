"""Offline judgement of one raw message, exactly as the milter would judge it.

Used by `filterd scan` so that an admin's "why was this refused?" gets the
answer the daemon would have given: recipients first (RCPT phase, with the
same transaction split), then content for the accepted ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from filterd.runtime import Runtime
from filterd.types import Action, Envelope, Message, RecipientDecision


def scan_bytes(runtime: Runtime, raw: bytes, envelope: Envelope) -> dict[str, Any]:
    envelope = runtime.outbound.prepare(envelope)
    pipeline = runtime.pipeline_for(envelope)
    accepted: list[RecipientDecision] = []
    refused: list[RecipientDecision] = []
    for rcpt in envelope.recipients:
        first_class = accepted[0].policy_class if accepted else None
        decision = pipeline.judge_recipient(envelope, rcpt, first_class)
        (accepted if decision.action is Action.ACCEPT else refused).append(decision)
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
    message = Message.from_bytes(
        raw, replace(envelope, recipients=tuple(d.recipient for d in accepted))
    )
    verdict = pipeline.judge_message(message, [f for d in accepted for f in d.findings])
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
