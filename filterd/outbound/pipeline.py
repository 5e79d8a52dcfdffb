"""How outbound mail is judged: same checks and policy as inbound, outbound rules.

- RCPT time: only the per-account rate limits (``450 4.7.1`` with a retry hint).
  Allowlists never apply to outbound mail (a hijacked account must not be
  exempted by a recipient's list of it), and neither do client-IP blocklists.
- End of message: ``[outbound] message_checks`` (default: antivirus, banned
  attachments and classifier where the inbound pipeline runs them) through an
  ordinary ``filterd.pipeline.Pipeline``, so viruses and banned types get
  exactly the inbound ``554 5.7.1``; the classifier's
  probability is judged against ``[outbound] reject_threshold`` and spam is
  refused with a reply that tells the sender what happened.

Checks are shared with the inbound pipeline when it has them (one clamd client,
one model in memory); any it lacks are built here and closed here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

from filterd import policy
from filterd.checks import REGISTRY
from filterd.checks.base import Check, MessageCheck, Services
from filterd.keyspace import SubjectKind
from filterd.outbound.config import DEFAULT_MESSAGE_CHECKS, Config
from filterd.outbound.ratelimit import RateLimiter
from filterd.pipeline import CheckBuildError, Pipeline
from filterd.settings import Settings
from filterd.types import (
    Decision,
    Effect,
    Envelope,
    Finding,
    Message,
    RecipientDecision,
    SmtpReply,
    Thresholds,
)

log = logging.getLogger("filterd.outbound")

SPAM_CODE = "OUTBOUND_SPAM"
RATE_CODE = "OUTBOUND_RATE_LIMIT"
CHECK = "outbound"  # the name outbound classifier evidence carries (codes OUTBOUND_*)
LIMIT_FAIL_REPLY = SmtpReply(451, "4.7.1", "Temporary failure checking sending limits; try later")


def _retry_text(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} seconds"
    if seconds < 5400:
        return f"{round(seconds / 60)} minutes"
    return f"{round(seconds / 3600)} hours"


class _Borrowed:
    """An inbound check lent to the outbound pipeline: closing it is the owner's job."""

    def __init__(self, check: MessageCheck) -> None:
        self._check = check
        self.name = check.name
        self.bypassable = False  # nothing exempts outbound mail
        self.on_failure = check.on_failure
        self.gate = False

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        return self._check.check_message(message, False)

    def selftest(self) -> list[str]:
        return []  # the owner's self-test covers the check

    def close(self) -> None:
        pass


class OutboundClassifier(_Borrowed):
    """The classifier's probability against the outbound threshold.

    With ``reject_threshold`` unset, the model card's reject threshold applies
    (the inbound check's CLASSIFIER_SPAM verdict). Below it the message is not
    tagged: outbound mail carries no spam headers to its recipients.
    """

    def __init__(self, check: MessageCheck, threshold: float | None) -> None:
        super().__init__(check)
        self.threshold = threshold

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        """The classifier's evidence with outbound thresholds; filterd.policy decides.

        Re-labelled ``outbound`` so the policy words the refusal for our own user
        (``OUTBOUND_SPAM``) and never tags: outbound mail is refused or passed.
        """
        out: list[Finding] = []
        for finding in self._check.check_message(message, False):
            cut = finding.thresholds
            if finding.spam_probability is None or cut is None:
                out.append(finding)  # failures and anything else pass through unchanged
                continue
            reject = self.threshold if self.threshold is not None else cut.reject
            out.append(
                replace(
                    finding,
                    check=CHECK,
                    bypassable=False,
                    thresholds=Thresholds(reject=reject, tag=math.inf, tag_points=0.0),
                )
            )
        return out


class OutboundPipeline:
    """Same interface as ``filterd.pipeline.Pipeline`` for the milter and `filterd scan`."""

    def __init__(
        self,
        settings: Settings,
        config: Config,
        services: Services,
        inbound_checks: dict[str, Check],
        limiter: RateLimiter | None,
    ) -> None:
        self.config = config
        self.limiter = limiter
        self._own: list[Check] = []
        checks: dict[str, Check] = {}
        if config.message_checks is None:
            inbound = settings.pipeline.message_checks
            names = [n for n in DEFAULT_MESSAGE_CHECKS if n in inbound]
        else:
            names = list(config.message_checks)
        try:
            for name in names:
                check = inbound_checks.get(name)
                if check is None:
                    check = self._build(settings, services, name)
                    self._own.append(check)
                if not isinstance(check, MessageCheck):
                    raise CheckBuildError(f"[outbound] check {name!r} has no message phase")
                checks[name] = (
                    OutboundClassifier(check, config.reject_threshold)
                    if name == "classifier"
                    else _Borrowed(check)
                )
            sections = dict(settings.sections)
            sections["pipeline"] = settings.pipeline.model_copy(
                update={"recipient_checks": [], "message_checks": names}
            )
            # No X-Spam-Score / X-Spam-Flag on mail our own users send.
            sections["policy"] = settings.policy.model_copy(update={"add_score_header": False})
            self.settings = Settings(source=settings.source, sections=sections)
            self.inner = Pipeline(self.settings, dict(checks))
        except BaseException:
            self._close_own()
            raise
        self.checks = checks

    @staticmethod
    def _build(settings: Settings, services: Services, name: str) -> Check:
        module = REGISTRY.get(name)
        if module is None:
            raise CheckBuildError(f"[outbound] check {name!r} is not a known check")
        try:
            check: Check = module.build(settings.section(module.SECTION), services)
        except Exception as exc:
            raise CheckBuildError(f"[outbound] check {name!r}: {exc}") from exc
        return check

    def _close_own(self) -> None:
        for check in self._own:
            try:
                check.close()
            except Exception:
                log.exception("closing outbound check %s failed", check.name)

    def close(self) -> None:
        self.inner.close()
        self._close_own()

    # -- RCPT -------------------------------------------------------------------------
    def _subject(self, envelope: Envelope) -> tuple[SubjectKind, str] | None:
        if envelope.auth_user:
            return "u", envelope.auth_user
        if self.config.limit_unauthenticated_by_ip and envelope.client_ip:
            return "ip", envelope.client_ip
        return None

    def limit_findings(self, envelope: Envelope, first_recipient: bool) -> list[Finding]:
        subject = self._subject(envelope)
        if subject is None or self.limiter is None:
            return []
        try:
            verdict = self.limiter.consume(*subject, messages=int(first_recipient), recipients=1)
        except Exception as exc:  # noqa: BLE001 - a dependency failure is evidence
            log.warning("rate limit check failed: %s", exc)
            tempfail = self.config.on_failure == "tempfail"
            return [
                Finding("ratelimit", "RATELIMIT_FAIL", f"{type(exc).__name__}"[:300],
                        effect=Effect.TEMPFAIL if tempfail else Effect.SCORE,
                        reply=LIMIT_FAIL_REPLY, bypassable=False)
            ]  # fmt: skip
        if verdict.allowed:
            return []
        text = (
            f"Sending limit reached ({verdict.describe()} for this account); "
            f"try again in {_retry_text(verdict.retry_after)}"
        )
        return [
            Finding("ratelimit", RATE_CODE, verdict.limit_name or "", effect=Effect.TEMPFAIL,
                    reply=SmtpReply(450, "4.7.1", text), bypassable=False)
        ]  # fmt: skip

    def judge_recipient(
        self, envelope: Envelope, recipient: str, accepted_class: str | None
    ) -> RecipientDecision:
        # The message itself is charged with the first recipient accepted.
        findings = self.limit_findings(envelope, first_recipient=accepted_class is None)
        return policy.decide_recipient(recipient, findings, self.settings.policy, accepted_class)

    # -- end of message -----------------------------------------------------------------
    def judge_message(self, message: Message, rcpt_findings: Sequence[Finding]) -> Decision:
        return self.inner.judge_message(message, rcpt_findings)
