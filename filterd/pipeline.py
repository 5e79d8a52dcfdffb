"""Runs the enabled checks of a phase under a time budget and collects findings.

The pipeline decides nothing: it orders the work (allowlist before the checks
it can make unnecessary, gates before concurrent checks), turns a check's
exception or timeout into a ``<NAME>_FAIL`` finding, records per-check timings,
and hands all findings to ``filterd.policy``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import cast

from filterd import deadline as _deadline
from filterd import policy
from filterd.checks import REGISTRY
from filterd.checks.base import (
    Check,
    MessageCheck,
    RecipientCheck,
    Services,
    StartableMessageCheck,
    StartableRecipientCheck,
    Started,
)
from filterd.errors import CheckBuildError as CheckBuildError  # re-exported: its old home
from filterd.mail import analysis
from filterd.settings import Settings
from filterd.types import Decision, Effect, Envelope, Finding, Message, RecipientDecision

log = logging.getLogger("filterd.pipeline")


def _failure(check: Check, reason: str) -> Finding:
    """Evidence that a check could not do its work; the policy words the reply."""
    fails_closed = check.on_failure == "tempfail"
    return Finding(
        check=check.name,
        code=f"{check.name.upper()}_FAIL",
        detail=reason[:300],
        effect=Effect.TEMPFAIL if fails_closed else Effect.SCORE,
        bypassable=check.bypassable,
        unchecked=True,
    )


def build_checks(settings: Settings, services: Services) -> dict[str, Check]:
    """One instance per enabled check module, shared by both phases."""
    names = list(
        dict.fromkeys(settings.pipeline.recipient_checks + settings.pipeline.message_checks)
    )
    built: dict[str, Check] = {}
    try:
        for name in names:
            module = REGISTRY[name]
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
        self._head_bytes = max(
            [analysis.DEFAULT_HEAD_LIMIT]
            if not any(hasattr(c, "head_bytes") for c in self.message_checks)
            else [int(getattr(c, "head_bytes", 0)) for c in self.message_checks]
        )
        self._inline_cpu = settings.pipeline.inline_cpu_checks
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
        checks: Sequence[Check],
        work: RecipientWork | MessageWork,
        deadline: float,
        timings: dict[str, float],
    ) -> list[Finding]:
        """Run checks bounded by ``deadline``; findings come back in configured order.

        Three ways a check runs, chosen so that the connection's thread does the
        work whenever a thread hand-off would cost more than it saves:

        1. checks that can *start* their I/O without blocking (``start_message`` /
           ``start_recipient``: DNS lists send their queries, clamd gets a small
           message in one write) start it here and return a ``Started``;
        2. the CPU-bound ones (``cpu_bound``: the attachment walk, the classifier)
           then run here one after another, while that I/O travels: on one GIL,
           CPU work in parallel threads only adds hand-offs;
        3. the started ones are collected here (their waits end at ``deadline``);
           checks that wait in ways that could outlast it (a Redis round trip, a
           clamd stream too big for one write) go to the pool first and are
           waited for last, under the deadline.

        Nothing that can block in I/O past the deadline runs on this thread: a hung
        Redis would otherwise hold the reply past Postfix's milter timeout. Inline
        checks stop at the budget cooperatively (``filterd.deadline``). A
        non-bypassable refusal ends the wait (nothing can overturn it), and checks
        still running are told to stop, so no CPU is spent on a message after its reply.
        """
        if not checks:
            return []
        budget = _deadline.Budget(deadline)
        results: dict[str, list[Finding]] = {}

        def record(check: Check, outcome: tuple[Sequence[Finding], float] | Exception) -> bool:
            """Keep a check's findings; True when they refuse for good."""
            if isinstance(outcome, Exception):
                log.warning("check %s failed: %s", check.name, outcome)
                results[check.name] = [_failure(check, f"{type(outcome).__name__}: {outcome}")]
            else:
                timings[check.name] = timings.get(check.name, 0.0) + outcome[1]
                results[check.name] = list(outcome[0])
            return any(f.effect is Effect.REJECT and not f.bypassable for f in results[check.name])

        inline = self._inline_cpu
        startable = [c for c in checks if inline and _starter(c, work) is not None]
        cpu = [
            c for c in checks if inline and getattr(c, "cpu_bound", False) and c not in startable
        ]
        pooled = [c for c in checks if c not in startable and c not in cpu]
        futures: dict[Future[tuple[Sequence[Finding], float]], Check] = {
            self._pool.submit(_deadline.run, budget, partial(_timed, check, work)): check
            for check in pooled
        }
        started: list[tuple[Check, Started, float]] = []
        refused = False
        for check in startable:
            begin = time.monotonic()
            try:
                handle = _deadline.run(budget, partial(_start, check, work))
            except Exception as exc:  # noqa: BLE001 - a check's failure is evidence
                refused = record(check, exc) or refused
                continue
            if handle is None:  # cannot start without blocking: the pool waits for it
                future = self._pool.submit(_deadline.run, budget, partial(_timed, check, work))
                futures[future] = check
            else:
                started.append((check, handle, begin))
        for check in cpu:
            if refused:
                break
            try:
                refused = record(check, _deadline.run(budget, partial(_timed, check, work)))
            except Exception as exc:  # noqa: BLE001
                refused = record(check, exc)
        while started and not refused:
            check, handle, begin = started.pop(0)
            try:
                found = _deadline.run(budget, partial(handle.collect, deadline))
                outcome: tuple[Sequence[Finding], float] | Exception = (
                    found,
                    time.monotonic() - begin,
                )
            except TimeoutError:
                log.warning("check %s timed out", check.name)
                results[check.name] = [_failure(check, "timed out")]
                continue
            except Exception as exc:  # noqa: BLE001
                outcome = exc
            refused = record(check, outcome)
        for _check, handle, _begin in started:  # cut short by a refusal
            handle.close()
        try:
            if not refused and len(futures) == 1:
                # One check in the pool (a RCPT check): wait on it alone, without the
                # waiter objects as_completed builds (~5% of a RCPT's CPU, profiled).
                future, check = next(iter(futures.items()))
                try:
                    outcome = future.result(timeout=max(0.0, deadline - time.monotonic()))
                except Exception as exc:  # noqa: BLE001
                    if not future.done():  # out of time (not a TimeoutError of the check's)
                        raise FutureTimeout from None
                    outcome = exc
                del futures[future]
                refused = record(check, outcome)
            elif not refused:
                for future in as_completed(futures, timeout=max(0.0, deadline - time.monotonic())):
                    check = futures.pop(future)
                    try:
                        outcome = future.result()
                    except Exception as exc:  # noqa: BLE001
                        outcome = exc
                    if record(check, outcome):
                        refused = True
                        break
        except FutureTimeout:
            pass
        for future, check in futures.items():
            future.cancel()
            if not refused:  # really out of time, not cut short by a refusal
                log.warning("check %s timed out", check.name)
                results[check.name] = [_failure(check, "timed out")]
        budget.abandoned.set()  # whatever still runs stops at its next step
        return [f for check in checks for f in results.get(check.name, [])]

    def prefetch(self, envelope: Envelope) -> list[Started]:
        """At MAIL FROM: let RCPT checks send what they can already ask (``prefetch``).

        The returned handles belong to the transaction, which closes them when it
        ends. A failure here costs nothing but the head start: RCPT asks again.
        """
        handles: list[Started] = []
        for check in self.recipient_checks:
            prefetch = getattr(check, "prefetch", None)
            if prefetch is None:
                continue
            try:
                handle = prefetch(envelope)
            except Exception:
                log.warning("check %s: prefetch failed", check.name, exc_info=True)
                continue
            if handle is not None:
                handles.append(handle)
        return handles

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
            work = RecipientWork(envelope, recipient)
            findings.extend(self._run([check], work, deadline, timings))
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
        # One analysis per message, parsed as far as the most demanding check reads.
        analysis.attach(message, self._head_bytes)
        exempt = policy.is_exempt(findings)
        for check in (c for c in self.message_checks if c.gate):
            findings.extend(self._run([check], MessageWork(message, exempt), deadline, timings))
            exempt = policy.is_exempt(findings)
        rest = [c for c in self.message_checks if not c.gate and not (exempt and c.bypassable)]
        findings.extend(self._run(rest, MessageWork(message, exempt), deadline, timings))
        decision = policy.decide_message(
            message, findings, self.settings.policy, self.settings.milter
        )
        timings["total"] = time.monotonic() - start
        decision.timings.update(timings)
        return decision


@dataclass(frozen=True)
class RecipientWork:
    """What a RCPT-phase check is asked about."""

    envelope: Envelope
    recipient: str


@dataclass(frozen=True)
class MessageWork:
    """What an end-of-message check is asked about."""

    message: Message
    exempt: bool


def _call(check: Check, work: RecipientWork | MessageWork) -> Sequence[Finding]:
    """The one place a check's phase method is called (the pipeline validated the phase).

    ``cast``, not ``isinstance``: a runtime-checkable Protocol's isinstance inspects every
    member (tens of microseconds per call), and ``Pipeline.__init__`` checked it once.
    """
    if isinstance(work, MessageWork):
        return cast(MessageCheck, check).check_message(work.message, work.exempt)
    return cast(RecipientCheck, check).check_recipient(work.envelope, work.recipient)


def _starter(check: Check, work: RecipientWork | MessageWork) -> object | None:
    """The check's start method for this phase, if it has one."""
    name = "start_message" if isinstance(work, MessageWork) else "start_recipient"
    return getattr(check, name, None)


def _start(check: Check, work: RecipientWork | MessageWork) -> Started | None:
    if isinstance(work, MessageWork):
        return cast(StartableMessageCheck, check).start_message(work.message, work.exempt)
    return cast(StartableRecipientCheck, check).start_recipient(work.envelope, work.recipient)


def _timed(check: Check, work: RecipientWork | MessageWork) -> tuple[Sequence[Finding], float]:
    start = time.monotonic()
    result = _call(check, work)
    return result, time.monotonic() - start


def _dedupe(findings: Sequence[Finding]) -> list[Finding]:
    """RCPT checks repeat transaction-level findings (same client IP) per recipient."""
    return list(dict.fromkeys(findings))
