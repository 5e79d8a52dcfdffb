"""The time budget of the check a thread is running, for loops that must stop when it ends.

The pipeline runs each check in a pool thread under a deadline; when the deadline
passes (or another check has already refused the message) it stops waiting and
replies. Python cannot kill a thread, so a check that keeps walking a hostile
message (10^5 MIME parts) would burn CPU after the reply, on every retry. Long
loops therefore ask ``expired()`` / call ``check()`` once per step; the pipeline
sets the budget around each check with ``run``. Outside a pipeline run (CLI
scans, tests) there is no budget and nothing expires.

Hand-written because it is a few lines over ``contextvars``; no library offers
cooperative cancellation for plain threads.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The running check's budget is over (or its run was abandoned): stop working."""


@dataclass
class Budget:
    """One pipeline phase: its deadline (time.monotonic) and an abandon flag."""

    deadline: float
    abandoned: threading.Event = field(default_factory=threading.Event)

    def expired(self) -> bool:
        return self.abandoned.is_set() or time.monotonic() >= self.deadline


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "filterd_budget", default=None
)


def run(budget: Budget, fn: Callable[[], T]) -> T:
    """Call ``fn`` with ``budget`` as the current thread's budget."""
    token = _current.set(budget)
    try:
        return fn()
    finally:
        _current.reset(token)


def expired() -> bool:
    budget = _current.get()
    return budget is not None and budget.expired()


def check() -> None:
    """Raise DeadlineExceeded when the current budget is over."""
    if expired():
        raise DeadlineExceeded("check budget exhausted")
