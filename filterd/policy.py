"""The single place where findings become an SMTP outcome.

Pure functions, no I/O: given findings and the [policy] thresholds they return
a RecipientDecision (RCPT time) or a Decision (end of message). Checks report
evidence only; every reply text lives here. First, evidence becomes effects:

- a body kept only in part ([milter] max_message_bytes) gets [milter]
  oversize_action with a reply from ``OVERSIZE_REPLIES``, judged no further;
- a probability with its thresholds (the classifier) becomes
  ``<CHECK>_SPAM`` (refuse), ``<CHECK>_SUSPECT`` (points) or ``<CHECK>_HAM``.

Then, in the order ``_judge`` applies them:

1. a non-bypassable REJECT (virus, banned type) refuses — no allowlist helps;
2. an allowlist exemption (EXEMPT, not cancelled by UNEXEMPT) drops every
   bypassable finding;
3. a remaining TEMPFAIL (a dependency failed and fails closed) defers: 4xx,
   nothing lost;
4. a remaining bypassable REJECT (classifier spam verdict) refuses;
5. the sum of scores >= reject_score refuses with the reply of the finding that
   contributed most; >= tag_score accepts with X-Spam-Flag;
6. otherwise accept; findings marked ``unchecked`` name their check in
   X-Filterd-Unchecked.

Transactions are split by exemption class: a recipient whose class differs
from the first accepted recipient's is deferred with 452 4.5.3, so that every
recipient gets the content decision its own list implies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Literal

from filterd.settings import MilterConfig, PolicyConfig
from filterd.types import (
    Action,
    Decision,
    Effect,
    Finding,
    Message,
    RecipientDecision,
    SmtpReply,
)

SPLIT_REPLY = SmtpReply(452, "4.5.3", "Too many recipients with differing policies; retry this one")
GENERIC_SPAM_REPLY = SmtpReply(550, "5.7.1", "Message refused as spam")
GENERIC_TEMPFAIL = SmtpReply(
    451, "4.7.1", "Temporary failure in content filtering; try again later"
)
SPAM_REPLY = SmtpReply(550, "5.7.1", "Message refused: it looks like spam to our content filter")
# Outbound mail (filterd.outbound): the reply reaches our own user's mail client.
OUTBOUND_SPAM_REPLY = SmtpReply(
    550,
    "5.7.1",
    "Your message was not sent: our outgoing spam filter classified it as spam. "
    "This counts against your account; contact support if it is a mistake",
)
_SPAM_REPLIES = {"outbound": OUTBOUND_SPAM_REPLY}

# The one oversize table: what was too big ("message": the body was not kept in
# full; "scan": bigger than the virus scanner takes; "limits": a small message with
# content over clamd's own Max* limits, where "too big" would mislead the sender)
# x the configured action.
OversizeScope = Literal["message", "scan", "limits"]
OVERSIZE_REPLIES: dict[tuple[OversizeScope, Action], SmtpReply] = {
    ("message", Action.REJECT): SmtpReply(552, "5.3.4", "Message too big for the content filter"),
    ("message", Action.TEMPFAIL): SmtpReply(
        452, "4.3.1", "Message too big to filter now; try again later"
    ),
    ("scan", Action.REJECT): SmtpReply(552, "5.3.4", "Message too big to be scanned for viruses"),
    ("scan", Action.TEMPFAIL): SmtpReply(
        452, "4.3.1", "Message too big to scan now; try again later"
    ),
    ("limits", Action.REJECT): SmtpReply(
        554, "5.7.1", "Message cannot be fully scanned for viruses (an archive exceeds scan limits)"
    ),
    ("limits", Action.TEMPFAIL): SmtpReply(
        452, "4.3.1", "Message cannot be fully scanned now; try again later"
    ),
}
_OVERSIZE_ACTIONS = {
    "reject": (Action.REJECT, Effect.REJECT),
    "tempfail": (Action.TEMPFAIL, Effect.TEMPFAIL),
    "accept": (Action.ACCEPT, Effect.SCORE),
    "accept_with_header": (Action.ACCEPT, Effect.SCORE),
}


def oversize(scope: OversizeScope, action: str) -> tuple[Effect, SmtpReply | None]:
    """Effect and reply for something too big to judge, from the one table."""
    outcome, effect = _OVERSIZE_ACTIONS[action]
    return effect, OVERSIZE_REPLIES.get((scope, outcome))


def failure_reply(check: str) -> SmtpReply:
    """The reply for a check that failed closed (its dependency is down)."""
    return SmtpReply(451, "4.7.1", f"Temporary failure ({check}); try again later")


def _evidence_to_effect(finding: Finding) -> Finding:
    """A probability with thresholds becomes a verdict; failures get their reply."""
    p, cut = finding.spam_probability, finding.thresholds
    if p is not None and cut is not None:
        prefix = finding.check.upper()
        if p >= cut.reject:
            return replace(
                finding,
                code=f"{prefix}_SPAM",
                effect=Effect.REJECT,
                reply=_SPAM_REPLIES.get(finding.check, SPAM_REPLY),
                score=0.0,
            )
        if p >= cut.tag:
            return replace(
                finding, code=f"{prefix}_SUSPECT", effect=Effect.SCORE, score=cut.tag_points
            )
        return replace(finding, code=f"{prefix}_HAM", effect=Effect.SCORE, score=0.0)
    if finding.unchecked and finding.effect is Effect.TEMPFAIL and finding.reply is None:
        return replace(finding, reply=failure_reply(finding.check))
    return finding


def resolve(findings: Iterable[Finding]) -> list[Finding]:
    """Findings with their evidence turned into effects (what ``_judge`` reads)."""
    return [_evidence_to_effect(f) for f in findings]


def is_exempt(findings: Iterable[Finding]) -> bool:
    effects = {f.effect for f in findings}
    return Effect.EXEMPT in effects and Effect.UNEXEMPT not in effects


def policy_class(findings: Sequence[Finding]) -> str:
    """Which transaction a recipient may share: exempt, provisionally exempt
    (may be cancelled at end of message) or filtered."""
    exemptions = [f for f in findings if f.effect is Effect.EXEMPT]
    if not exemptions or not is_exempt(findings):
        return "filtered"
    return "exempt" if any(not f.provisional for f in exemptions) else "provisional"


def _first(
    findings: Sequence[Finding], effect: Effect, bypassable: bool | None = None
) -> Finding | None:
    for f in findings:
        if f.effect is effect and (bypassable is None or f.bypassable is bypassable):
            return f
    return None


def _score(findings: Sequence[Finding]) -> float:
    return sum(f.score for f in findings if f.effect is Effect.SCORE)


def _judge(
    findings: Sequence[Finding], cfg: PolicyConfig
) -> tuple[Action, SmtpReply | None, str, float]:
    """Rules 1-6 of the module docstring, in that order; returns (action, reply, code, score)."""
    hard = _first(findings, Effect.REJECT, bypassable=False)
    if hard is not None:
        return Action.REJECT, hard.reply or GENERIC_SPAM_REPLY, hard.code, 0.0
    exempt = is_exempt(findings)
    live = [f for f in findings if not (exempt and f.bypassable)]
    temp = _first(live, Effect.TEMPFAIL)
    if temp is not None:
        return Action.TEMPFAIL, temp.reply or GENERIC_TEMPFAIL, temp.code, 0.0
    soft = _first(live, Effect.REJECT)
    if soft is not None:
        return Action.REJECT, soft.reply or GENERIC_SPAM_REPLY, soft.code, _score(live)
    score = _score(live)
    if score >= cfg.reject_score:
        top = max((f for f in live if f.effect is Effect.SCORE), key=lambda f: f.score)
        with_reply = [f for f in live if f.reply is not None and f.effect is Effect.SCORE]
        reply = max(with_reply, key=lambda f: f.score).reply if with_reply else GENERIC_SPAM_REPLY
        return Action.REJECT, reply, top.code, score
    return Action.ACCEPT, None, "OK", score


def decide_recipient(
    recipient: str,
    findings: Sequence[Finding],
    cfg: PolicyConfig,
    accepted_class: str | None,
) -> RecipientDecision:
    """Decide one RCPT TO. ``accepted_class`` is the policy class of the first
    recipient already accepted in this transaction (None if there is none)."""
    findings = resolve(findings)
    klass = policy_class(findings)
    action, reply, code, _ = _judge(findings, cfg)
    if action is Action.ACCEPT and accepted_class is not None and accepted_class != klass:
        action, reply, code = Action.TEMPFAIL, SPLIT_REPLY, "SPLIT_RECIPIENTS"
    return RecipientDecision(recipient, action, reply, klass, tuple(findings), code)


# Allowlist scope (the first word of an ALLOWLIST_MATCH detail) -> the header's word.
_ALLOWLIST_SCOPES = {"mailbox": "recipient", "domain": "domain", "site": "site"}


def _allowlist_scope(findings: Sequence[Finding]) -> str:
    """Why an exempt message was exempt, for ``X-Spam-Status: No, allowlisted=...``."""
    for f in findings:
        if f.effect is Effect.EXEMPT:
            return _ALLOWLIST_SCOPES.get(f.detail.split(" ", 1)[0], "yes")
    return "yes"


def decide_message(
    message: Message,
    findings: Sequence[Finding],
    cfg: PolicyConfig,
    milter_cfg: MilterConfig,
) -> Decision:
    """Decide at end of message from RCPT-phase and content findings together."""
    findings = resolve(findings)
    probability = next(
        (f.spam_probability for f in findings if f.spam_probability is not None), None
    )
    if message.oversize and milter_cfg.oversize_action != "accept":
        action = Action(milter_cfg.oversize_action)
        too_big = OVERSIZE_REPLIES[("message", action)]
        return Decision(action, too_big, "OVERSIZE", tuple(findings), (), probability)
    action, reply, code, score = _judge(findings, cfg)
    headers: list[tuple[str, str]] = []
    if action is Action.ACCEPT:
        if is_exempt(findings):
            code = "ALLOWLISTED"
            headers.append(("X-Spam-Status", f"No, allowlisted={_allowlist_scope(findings)}"))
        elif score >= cfg.tag_score:
            code = max(
                (f for f in findings if f.effect is Effect.SCORE), key=lambda f: f.score
            ).code
            headers.append(("X-Spam-Flag", "YES"))
        if cfg.add_score_header:
            headers.append(("X-Spam-Score", f"{score:.1f}"))
        failed = sorted({f.check for f in findings if f.unchecked})
        if failed:
            headers.append(("X-Filterd-Unchecked", ", ".join(failed)))
    return Decision(action, reply, code, tuple(findings), tuple(headers), probability)
