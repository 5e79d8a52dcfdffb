"""Keyed hashing of addresses and IPs, with a key that rotates with the log retention.

Time is cut into periods as long as the smtp-log retention. Each period gets a random
key, created in Redis by whichever process needs it first (SET NX, so all daemons
agree) and set to expire when the last record hashed with it expires: end of the
period plus one log retention. Once a key has gone, its pseudonyms cannot be linked
to anyone, not even by the operator. An optional secret file (the "pepper") is mixed
in, so a copy of Redis alone is not enough to test guesses against the pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from filterd import keyspace as keys
from filterd.records.schema import Schema, SchemaError

PSEUDONYM_PREFIX = "p:"


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def normalise(value: str, kind: str, separators: str = "") -> str:
    if kind == "ip":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value.strip().lower()
    return keys.normalise_mailbox(value, separators)


def is_pseudonym(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PSEUDONYM_PREFIX) and len(value) == 34


class Pseudonymizer:
    """Thread-safe; one instance per Redis client. Redis errors propagate."""

    def __init__(
        self,
        redis_client: Any,
        schema: Schema,
        *,
        pepper: bytes = b"",
        clock: Callable[[], float] = time.time,
    ) -> None:
        log_seconds = schema.kind("smtp-log").retention.seconds
        key_seconds = schema.kind("pseudonym-key").retention.seconds
        assert log_seconds is not None and key_seconds is not None  # schema guarantees
        if key_seconds < 2 * log_seconds:
            raise SchemaError(
                f"{schema.source}: pseudonym-key retention ({key_seconds}s) must be at least "
                f"twice the smtp-log retention ({log_seconds}s), or records would outlive "
                "the key that finds them"
            )
        self.redis = redis_client
        self.period = log_seconds
        self.log_seconds = log_seconds
        self.pepper = pepper
        self.clock = clock
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def epoch(self, now: float | None = None) -> int:
        return int((self.clock() if now is None else now) // self.period)

    def _expires_at(self, epoch: int) -> int:
        return (epoch + 1) * self.period + self.log_seconds

    def _derive(self, secret: Any) -> bytes:
        raw = bytes.fromhex(_text(secret))
        return hmac.new(self.pepper, raw, hashlib.sha256).digest() if self.pepper else raw

    def current_key(self) -> bytes:
        """The key of the current period, created in Redis if nobody has yet.

        The expiry is sent relative (EX, not EXAT) so that a clock difference
        between this host and Redis can never stretch it beyond its tag.
        """
        now = self.clock()
        epoch = self.epoch(now)
        with self._lock:
            cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        name = keys.pseudonym_key(epoch)
        pipe = self.redis.pipeline(transaction=True)
        ttl = max(1, int(self._expires_at(epoch) - now))
        pipe.set(name, secrets.token_hex(32), nx=True, ex=ttl)
        pipe.get(name)
        _, secret = pipe.execute()
        if secret is None:  # only if the clock is a whole period off Redis's
            raise RuntimeError(f"pseudonym key for period {epoch} expired on creation")
        key = self._derive(secret)
        with self._lock:
            oldest = epoch - 1
            for old in [e for e in self._cache if e < oldest]:
                del self._cache[old]
            self._cache[epoch] = key
        return key

    def live_keys(self) -> list[bytes]:
        """Keys of every period whose records may still exist (never creates one)."""
        now = self.clock()
        first = self.epoch(now - self.period - self.log_seconds)
        epochs = list(range(first, self.epoch(now) + 1))
        # One GET per key in one pipeline, not MGET: on Cluster the keys of several
        # periods live in different slots.
        pipe = self.redis.pipeline(transaction=False)
        for e in epochs:
            pipe.get(keys.pseudonym_key(e))
        values = pipe.execute()
        return [self._derive(v) for v in values if v is not None]

    @staticmethod
    def token(key: bytes, value: str, kind: str, separators: str = "") -> str:
        """``kind``: "address" or "ip" (kept apart so the two can never collide).

        Addresses are hashed in their index form (sub-address removed), so the
        pseudonym of user+tag@x is that of user@x and one request finds both.
        """
        text = normalise(value, kind, separators)
        message = f"{kind}:{text}".encode("utf-8", "surrogateescape")
        return PSEUDONYM_PREFIX + hmac.new(key, message, hashlib.sha256).hexdigest()[:32]

    def tokens_for(self, value: str, kind: str, separators: str = "") -> list[str]:
        return [self.token(k, value, kind, separators) for k in self.live_keys()]
