"""Everything built from one configuration load: clients, checks, observers.

A Runtime is immutable once built. SIGHUP builds a new one and swaps it in;
connections keep the Runtime they started with, so a reload never changes the
rules in the middle of a message. A Runtime that fails to build is reported
and the old one stays in service.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

import redis

from filterd.checks.base import Services
from filterd.pipeline import Pipeline, build_checks
from filterd.redisclient import connect
from filterd.settings import Settings
from filterd.types import Decision, Envelope, Message, RecipientDecision

log = logging.getLogger("filterd.runtime")


class Observer(Protocol):
    """Told about every outcome (records, statistics); must never raise."""

    def on_recipient(self, envelope: Envelope, decision: RecipientDecision) -> None: ...

    def on_message(self, message: Message, decision: Decision) -> None: ...


def _observers(settings: Settings, client: redis.Redis | None) -> list[Observer]:
    if "records" not in settings.sections or client is None:
        return []
    from filterd.records.observer import build_daemon_observer

    observer = build_daemon_observer(settings.section("records"), client)
    return [] if observer is None else [observer]


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        url = settings.redis.url
        client = connect(settings, url) if url else None
        self.services = Services(settings=settings, redis=client)
        checks = build_checks(settings, self.services)
        try:
            self.pipeline = Pipeline(settings, checks)
            self.observers: Sequence[Observer] = _observers(settings, client)
        except BaseException:
            for check in checks.values():
                check.close()
            raise
        self._users = 0
        self._lock = threading.Lock()
        self._retired = False

    def acquire(self) -> Runtime:
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close_now = self._retired and self._users == 0
        if close_now:
            self._close()

    def retire(self) -> None:
        """Close once the last connection using this runtime has finished."""
        with self._lock:
            self._retired = True
            close_now = self._users == 0
        if close_now:
            self._close()

    def _close(self) -> None:
        self.pipeline.close()
        for observer in self.observers:  # records still queued are written first
            getattr(observer, "close", lambda: None)()
        if self.services.redis is not None:
            self.services.redis.close()

    def notify_recipient(self, envelope: Envelope, decision: RecipientDecision) -> None:
        for observer in self.observers:
            try:
                observer.on_recipient(envelope, decision)
            except Exception:
                log.exception("observer failed")

    def notify_message(self, message: Message, decision: Decision) -> None:
        for observer in self.observers:
            try:
                observer.on_message(message, decision)
            except Exception:
                log.exception("observer failed")
