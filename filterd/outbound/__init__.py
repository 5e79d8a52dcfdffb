"""Outbound mail: submission scanning, per-account rate limits, no trace of the sender's IP.

One object per Runtime (``Outbound``) gives the milter what it needs:

- ``prepare(envelope)``: the direction (``direction.py``); authenticated
  submissions lose their client IP before any check or record sees them;
- ``pipeline``: the outbound pipeline (``pipeline.py``: rate limits at RCPT,
  antivirus / banned types / classifier with outbound thresholds at end of message);
- ``headers_to_remove(message, ip, host)``: headers that reveal the sender (``headers.py``);
- ``observers``: the per-account counter of refused outbound spam.

The Postfix half of IP stripping is ``postfix.py`` (``filterd postfix-config
--submission`` and ``submission_leaks`` for ``filterd check --postfix``).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from filterd.checks.base import Check, Services
from filterd.keyspace import outbound_keys
from filterd.outbound.config import SECTION, Config
from filterd.outbound.direction import OUTBOUND, prepare
from filterd.outbound.headers import headers_to_remove
from filterd.outbound.pipeline import SPAM_CODE, OutboundPipeline
from filterd.outbound.ratelimit import RateLimiter, limiter_for
from filterd.settings import Settings
from filterd.types import Decision, Envelope, Message, RecipientDecision

__all__ = ["SECTION", "Config", "Outbound", "build_outbound"]

log = logging.getLogger("filterd.outbound")

# The per-account spam counter lives as long as this rules/retention.toml tag says.
SPAM_COUNTER_TAG = "outbound-abuse"


class SpamCounter:
    """Counts refused outbound spam per login and UTC day (an observer; never raises)."""

    def __init__(self, client: Any, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl

    def on_recipient(self, envelope: Envelope, decision: RecipientDecision) -> None:
        pass

    def on_message(self, message: Message, decision: Decision) -> None:
        envelope = message.envelope
        if envelope.direction != OUTBOUND or decision.reason_code != SPAM_CODE:
            return
        if not envelope.auth_user:
            return
        day = datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%d")
        key = outbound_keys("u", envelope.auth_user).spam_prefix + day
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, self.ttl)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - counting must never affect mail
            log.warning("outbound spam counter not written: %s", type(exc).__name__)


class Outbound:
    def __init__(
        self,
        config: Config,
        pipeline: OutboundPipeline | None,
        limiter: RateLimiter | None,
        observers: list[Any],
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.limiter = limiter
        self.observers = observers

    def prepare(self, envelope: Envelope) -> Envelope:
        return prepare(envelope, self.config)

    def headers_to_remove(
        self, message: Message, client_ip: str | None, client_name: str | None
    ) -> list[tuple[str, int]]:
        if message.envelope.direction != OUTBOUND or not self.config.strip_client_headers:
            return []
        return headers_to_remove(
            message.header_block, client_ip, client_name, self.config.strip_headers
        )

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()


def build_outbound(settings: Settings, services: Services, checks: dict[str, Check]) -> Outbound:
    """``checks``: the inbound pipeline's built checks, shared where the names agree."""
    config = settings.sections.get(SECTION)
    if not isinstance(config, Config):
        config = Config()
    if not config.enabled:
        return Outbound(config, None, None, [])
    limiter = limiter_for(services.redis, config) if services.redis is not None else None
    if limiter is None:
        log.warning("outbound: no Redis configured; sending limits are not enforced")
    pipeline = OutboundPipeline(settings, config, services, checks, limiter)
    observers: list[Any] = []
    ttl = _spam_counter_ttl(settings)
    if services.redis is not None and ttl is not None:
        observers.append(SpamCounter(services.redis, ttl))
    return Outbound(config, pipeline, limiter, observers)


def _spam_counter_ttl(settings: Settings) -> int | None:
    """Seconds of the "outbound-abuse" tag; None (nothing stored) when it is not declared."""
    from filterd.records.schema import SchemaError, load_schema

    records = settings.sections.get("records")
    path = getattr(records, "schema_file", "") or None
    try:
        schema = load_schema(settings.resolve_path(path) if path else None)
    except SchemaError as exc:
        log.warning("outbound: no per-account spam counter: %s", exc)
        return None
    retention = schema.tags.get(SPAM_COUNTER_TAG)
    if retention is None or retention.seconds is None:
        log.warning("outbound: no per-account spam counter: tag %r has no expiry in %s",
                    SPAM_COUNTER_TAG, schema.source)  # fmt: skip
        return None
    return retention.seconds
