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
from typing import Any, Protocol

from filterd.checks.base import Services
from filterd.clients.redis import RedisClient, connect
from filterd.dns.engine import build_resolver
from filterd.dns.resolver import DnsblResolver
from filterd.outbound import build_outbound
from filterd.outbound.pipeline import OutboundPipeline
from filterd.pipeline import Pipeline, build_checks
from filterd.settings import Settings
from filterd.types import Decision, Envelope, Message, RecipientDecision

log = logging.getLogger("filterd.runtime")


class Observer(Protocol):
    """Told about every outcome (records, statistics); must never raise."""

    def on_recipient(self, envelope: Envelope, decision: RecipientDecision) -> None: ...

    def on_message(self, message: Message, decision: Decision) -> None: ...


def _observers(settings: Settings, client: RedisClient | None) -> list[Observer]:
    from filterd.metrics import build_observer as metrics_observer

    found: list[Observer | None] = [metrics_observer(settings)]
    if "records" in settings.sections and client is not None:
        from filterd.records.observer import build_daemon_observer

        found.append(build_daemon_observer(settings.section("records"), client))
    return [o for o in found if o is not None]


def _resolver(settings: Settings) -> DnsblResolver | None:
    """The one DNS resolver ([dns]) when a list check is enabled, else none at all."""
    phases = settings.pipeline.recipient_checks + settings.pipeline.message_checks
    if not {"dnsbl", "uribl"} & set(phases):
        return None
    return build_resolver(settings.section("dns"))


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        url = settings.redis.url
        client = connect(settings, url) if url else None
        self.services = Services(settings=settings, redis=client, resolver=_resolver(settings))
        try:
            checks = build_checks(settings, self.services)
        except BaseException:
            self._close_services()
            raise
        try:
            self.pipeline = Pipeline(settings, checks)
            self.outbound = build_outbound(settings, self.services, checks)
            self.observers: Sequence[Observer] = [
                *_observers(settings, client),
                *self.outbound.observers,
            ]
        except BaseException:
            for check in checks.values():
                check.close()
            self._close_services()
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

    def pipeline_for(self, envelope: Envelope) -> Pipeline | OutboundPipeline:
        """The outbound pipeline for outbound envelopes (see filterd.outbound)."""
        if envelope.direction == "outbound" and self.outbound.pipeline is not None:
            return self.outbound.pipeline
        return self.pipeline

    def _close(self) -> None:
        self.outbound.close()
        self.pipeline.close()
        for observer in self.observers:  # records still queued are written first
            getattr(observer, "close", lambda: None)()
        self._close_services()

    def _close_services(self) -> None:
        if self.services.resolver is not None:
            self.services.resolver.close()
        if self.services.redis is not None:
            self.services.redis.close()

    def served_thresholds(self) -> dict[str, float]:
        """What this runtime serves: [policy] scores and the classifier's probabilities.

        One answer for the daemon's log, `filterd scan` and the metrics; the classifier's
        come from ``classify.thresholds.served`` (card, or a [classifier] override).
        """
        policy = self.settings.policy
        served = {"reject_score": policy.reject_score, "tag_score": policy.tag_score}
        classifier: Any = self.pipeline.checks.get("classifier")
        model = classifier.holder.current() if classifier is not None else None
        if model is not None:
            th = classifier.served(model.thresholds)
            served.update(spam_reject_probability=th.reject, spam_tag_probability=th.tag)
        return served

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
