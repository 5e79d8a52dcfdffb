"""Runs the enabled checks of a phase under a time budget and collects findings.

The pipeline decides nothing: it orders the work (allowlist before the checks
it can make unnecessary, gates before concurrent checks), turns a check's
exception or timeout into a ``<NAME>_FAIL`` finding, records per-check timings,
and hands all findings to ``filterd.policy``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any

from filterd import deadline as _deadline
from filterd import policy
from filterd.checks.base import Check, MessageCheck, RecipientCheck, Services
from filterd.settings import Settings
from filterd.types import Decision, Effect, Envelope, Finding, Message, RecipientDecision, SmtpReply

log = logging.getLogger("filterd.pipeline")


class CheckBuildError(Exception):
    """A configured check could not be created (bad config, missing model...)."""


def _failure(check: Check, reason: str) -> Finding:
    fails_closed = check.on_failure == "tempfail"
    return Finding(
        check=check.name,
        code=f"{check.name.upper()}_FAIL",
        detail=reason[:300],
        effect=Effect.TEMPFAIL if fails_closed else Effect.SCORE,
        reply=SmtpReply(451, "4.7.1", f"Temporary failure ({check.name}); try again later"),
        bypassable=check.bypassable,
    )


def build_checks(settings: Settings, services: Services) -> dict[str, Check]:
    """One instance per enabled check module, shared by both phases."""
    names = list(
        dict.fromkeys(settings.pipeline.recipient_checks + settings.pipeline.message_checks)
    )
    built: dict[str, Check] = {}
    try:
        for name in names:
            module = importlib.import_module(f"filterd.checks.{name}")
            config = settings.section(module.SECTION)
            try:
                built[name] = module.build(config, services)
            except Exception as exc:
                raise CheckBuildError(f"check {name!r} ([{module.SECTION}]): {exc}") from exc
    except BaseException:
        for check in built.values():
            check.close()
        raise
    return built


class Pipeline:
    """The ordered checks of both phases, plus the thread pool they share."""

    def __init__(self, settings: Settings, checks: dict[str, Check]) -> None:
        self.settings = settings
        self.checks = checks
        self.recipient_checks: list[RecipientCheck] = []
        self.message_checks: list[MessageCheck] = []
        for name in settings.pipeline.recipient_checks:
            check = checks[name]
            if not isinstance(check, RecipientCheck):
                raise CheckBuildError(f"check {name!r} has no recipient phase")
            self.recipient_checks.append(check)
        for name in settings.pipeline.message_checks:
            check = checks[name]
            if not isinstance(check, MessageCheck):
                raise CheckBuildError(f"check {name!r} has no message phase")
            self.message_checks.append(check)
        self._pool = ThreadPoolExecutor(settings.pipeline.workers, thread_name_prefix="check")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for check in self.checks.values():
            try:
                check.close()
            except Exception:
                log.exception("closing check %s failed", check.name)

    def _run(
        self,
        calls: Sequence[tuple[Check, Callable[[], Sequence[Finding]]]],
        deadline: float,
        timings: dict[str, float],
    ) -> list[Finding]:
        """Run calls concurrently in the pool, every one bounded by ``deadline``.

        None runs inline: a check blocked in I/O (a hung Redis) would otherwise
        hold the reply past the budget and past Postfix's milter timeout. A
        non-bypassable refusal ends the wait (nothing can overturn it), and checks
        still running are told to stop (``filterd.deadline``), so no CPU is spent
        on a message after its reply. Findings keep the configured check order.
        """
        if not calls:
            return []
        budget = _deadline.Budget(deadline)
        futures: dict[Future[tuple[Sequence[Finding], float]], int] = {
            self._pool.submit(_deadline.run, budget, partial(_timed, fn)): index
            for index, (_check, fn) in enumerate(calls)
        }
        results: dict[int, list[Finding]] = {}
        try:
            for future in as_completed(futures, timeout=max(0.0, deadline - time.monotonic())):
                index = futures.pop(future)
                check = calls[index][0]
                try:
                    result, spent = future.result()
                    timings[check.name] = timings.get(check.name, 0.0) + spent
                    results[index] = list(result)
                except Exception as exc:  # noqa: BLE001 - a check's failure is evidence
                    log.warning("check %s failed: %s", check.name, exc)
                    results[index] = [_failure(check, f"{type(exc).__name__}: {exc}")]
                if any(f.effect is Effect.REJECT and not f.bypassable for f in results[index]):
                    break
        except FutureTimeout:
            pass
        refused = any(
            f.effect is Effect.REJECT and not f.bypassable for r in results.values() for f in r
        )
        for future, index in futures.items():
            future.cancel()
            if not refused:  # really out of time, not cut short by a refusal
                check = calls[index][0]
                log.warning("check %s timed out", check.name)
                results[index] = [_failure(check, "timed out")]
        budget.abandoned.set()  # whatever still runs stops at its next step
        return [f for index in sorted(results) for f in results[index]]

    def recipient_findings(
        self, envelope: Envelope, recipient: str, timings: dict[str, float] | None = None
    ) -> list[Finding]:
        deadline = time.monotonic() + self.settings.pipeline.rcpt_budget_seconds
        timings = {} if timings is None else timings
        findings: list[Finding] = []
        # Sequential in configured order: an allowlist match early saves the
        # blocklist lookups that it would make irrelevant -- unless the match is
        # provisional, when their findings count if it is cancelled at end of message.
        for check in self.recipient_checks:
            if check.bypassable and policy.policy_class(findings) == "exempt":
                continue
            findings.extend(
                self._run([(check, _bind_rcpt(check, envelope, recipient))], deadline, timings)
            )
        return findings

    def judge_recipient(
        self, envelope: Envelope, recipient: str, accepted_class: str | None
    ) -> RecipientDecision:
        timings: dict[str, float] = {}
        findings = self.recipient_findings(envelope, recipient, timings)
        decision = policy.decide_recipient(
            recipient, findings, self.settings.policy, accepted_class
        )
        decision.timings.update(timings)
        return decision

    def judge_message(self, message: Message, rcpt_findings: Sequence[Finding]) -> Decision:
        """Content decision; ``rcpt_findings`` are those of the accepted recipients."""
        start = time.monotonic()
        deadline = start + self.settings.pipeline.message_budget_seconds
        timings: dict[str, float] = {}
        findings = _dedupe(rcpt_findings)
        exempt = policy.is_exempt(findings)
        for check in (c for c in self.message_checks if c.gate):
            findings.extend(
                self._run([(check, _bind_msg(check, message, exempt))], deadline, timings)
            )
            exempt = policy.is_exempt(findings)
        rest = [
            (c, _bind_msg(c, message, exempt))
            for c in self.message_checks
            if not c.gate and not (exempt and c.bypassable)
        ]
        findings.extend(self._run(rest, deadline, timings))
        decision = policy.decide_message(
            message, findings, self.settings.policy, self.settings.milter
        )
        timings["total"] = time.monotonic() - start
        decision.timings.update(timings)
        return decision


def _timed(fn: Callable[[], Sequence[Finding]]) -> tuple[Sequence[Finding], float]:
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def _bind_rcpt(check: RecipientCheck, envelope: Envelope, recipient: str) -> Callable[[], Any]:
    return lambda: check.check_recipient(envelope, recipient)


def _bind_msg(check: MessageCheck, message: Message, exempt: bool) -> Callable[[], Any]:
    return lambda: check.check_message(message, exempt)


def _dedupe(findings: Sequence[Finding]) -> list[Finding]:
    """RCPT checks repeat transaction-level findings (same client IP) per recipient."""
    return list(dict.fromkeys(findings))
