"""Offline judgement of one raw message, exactly as the milter would judge it.

Used by `filterd scan` so that an admin's "why was this refused?" gets the
answer the daemon would have given: recipients first (RCPT phase, with the
same transaction split), then content for the accepted ones.
"""

from __future__ import annotations

from typing import Any

from filterd.runtime import Runtime
from filterd.transaction import Transaction
from filterd.types import Envelope, SmtpReply


def scan_bytes(runtime: Runtime, raw: bytes, envelope: Envelope) -> dict[str, Any]:
    tx = Transaction(runtime, envelope)
    for rcpt in envelope.recipients:
        tx.add_recipient(rcpt)
    accepted, refused = tx.accepted, tx.refused
    # Recipients refused at RCPT keep that outcome; the others get the message's.
    at_rcpt = [
        _recipient(d.recipient, d.action.value, d.reply, d.reason_code, "rcpt") for d in refused
    ]
    if not accepted:
        first = refused[0]
        return {
            "action": first.action.value,
            "smtp_reply": _reply(first.reply),
            "reason_code": first.reason_code,
            "spam_score": None,
            "reasons": [f.as_reason() for d in refused for f in d.findings],
            "recipients": at_rcpt,
            "thresholds": runtime.served_thresholds(),
        }
    verdict = tx.judge(tx.message_from_bytes(raw))
    at_data = [
        _recipient(d.recipient, verdict.action.value, verdict.reply, verdict.reason_code, "data")
        for d in accepted
    ]
    return {
        "action": verdict.action.value,
        "smtp_reply": _reply(verdict.reply),
        "reason_code": verdict.reason_code,
        "spam_score": verdict.spam_score,
        "reasons": verdict.reasons,
        "headers": [f"{k}: {v}" for k, v in verdict.add_headers],
        "recipients": at_data + at_rcpt,
        "thresholds": runtime.served_thresholds(),
        "timings_ms": {k: round(v * 1000, 2) for k, v in verdict.timings.items()},
    }


def _recipient(
    rcpt: str, action: str, reply: SmtpReply | None, code: str, stage: str
) -> dict[str, Any]:
    """One recipient's real outcome; ``stage``: refused at RCPT or judged at end of DATA."""
    return {
        "rcpt": rcpt,
        "action": action,
        "smtp_reply": _reply(reply),
        "code": code,
        "stage": stage,
    }


def _reply(reply: object) -> str | None:
    return None if reply is None else str(reply)


def pretty(result: dict[str, Any]) -> str:
    """The scan result for people: verdict first, then why."""
    lines = [f"{result.get('file', '-')}: {str(result.get('action', '?')).upper()}"]
    if "error" in result:
        return f"{lines[0]} error: {result['error']}"
    if result.get("smtp_reply"):
        lines[0] += f"  {result['smtp_reply']}"
    lines.append(f"  reason: {result.get('reason_code')}")
    served = result.get("thresholds", {})
    if result.get("spam_score") is not None:
        bounds = ""
        if "spam_tag_probability" in served:
            bounds = (
                f" (tag at {served['spam_tag_probability']:.4g},"
                f" reject at {served['spam_reject_probability']:.4g})"
            )
        lines.append(f"  spam probability: {result['spam_score']:.4f}{bounds}")
    lines.append("  recipients:")
    for r in result.get("recipients", []):
        when = "at RCPT" if r["stage"] == "rcpt" else "after DATA"
        reply = f"  {r['smtp_reply']}" if r.get("smtp_reply") else ""
        lines.append(f"    {r['rcpt']}: {r['action']} {when} ({r['code']}){reply}")
    if result.get("reasons"):
        lines.append("  findings:")
        for f in result["reasons"]:
            detail = f"  {f['detail']}" if f.get("detail") else ""
            lines.append(f"    {f['check']}: {f['code']}{detail}")
    for header in result.get("headers", []):
        lines.append(f"  header: {header}")
    return "\n".join(lines)
