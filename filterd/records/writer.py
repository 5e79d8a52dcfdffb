"""The only code that writes records and counters to Redis.

Every write goes through the schema: a field that is not declared is refused
(SchemaViolation), values are type-checked, personal fields are pseudonymised
when that is configured, and the key's expiry comes from the kind's retention tag
in the same atomic step: ``SET ... EX``, or the keyspace's WRITE_WITH_EXPIRY script
(SADD/HINCRBY and EXPIRE on one key), so no key is ever visible without a TTL, not
even on a replica promoted in a failover. A Batch collects one message's writes and
sends them in one round trip: one MULTI/EXEC on a single Redis or behind Sentinel;
on Redis Cluster one pipeline that redis-py splits over the primaries owning the
keys (a transaction there must stay in one slot; see filterd.keyspace).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from filterd import keyspace as keys
from filterd.clients.redis import pipeline
from filterd.records.pseudonym import Pseudonymizer
from filterd.records.schema import Kind, Schema, SchemaError, SchemaViolation, validate

# Kinds this writer stores as one JSON string per entry, and how their keys are built.
_ENTRY_KEYS: dict[str, Callable[[str], str]] = {
    "smtp-log": keys.log_key,
    "abuse-evidence": keys.abuse_key,
}
REQUIRED_KINDS = ("smtp-log", "mailbox-index", "daily-counters", "abuse-evidence", "pseudonym-key")
_REQUIRED_FIELDS = {
    "mailbox-index": ("mailbox", "record_id"),
    "daily-counters": ("day", "action", "reason_code", "count"),
}


def new_record_id(now: float | None = None) -> str:
    """Time-ordered and unguessable: milliseconds, then 48 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis:012x}{secrets.token_hex(6)}"


class RecordWriter:
    """Built once per configuration; thread-safe (each Batch has its own pipeline)."""

    def __init__(
        self,
        schema: Schema,
        redis_client: Any,
        *,
        pseudonymizer: Pseudonymizer | None = None,
        subaddress_separators: str = "",
    ) -> None:
        for name in REQUIRED_KINDS:
            if name not in schema.kinds:
                raise SchemaError(f"{schema.source}: kind {name!r} must be declared")
            kind = schema.kinds[name]
            if kind.store != "redis" or kind.owner != "records" or kind.retention.seconds is None:
                raise SchemaError(
                    f"{schema.source}: kind {name!r} must be a redis kind owned by records "
                    "with an expiring retention tag"
                )
        for name, required in _REQUIRED_FIELDS.items():
            missing = [f for f in required if f not in schema.kinds[name].fields]
            if missing:
                raise SchemaError(f"{schema.source}: kind {name!r} lacks field(s) {missing}")
        self.schema = schema
        self.redis = redis_client
        self.pseudonymizer = pseudonymizer
        self.separators = subaddress_separators

    def declared(self, kind: str) -> frozenset[str]:
        """Field names the schema lets this kind store (callers omit the others)."""
        return frozenset(self.schema.kind(kind).fields)

    def index_ttl(self) -> int:
        """Seconds an index entry may live: the mailbox-index kind's retention tag."""
        seconds = self.schema.kind("mailbox-index").retention.seconds
        assert seconds is not None  # checked in __init__
        return seconds

    def trim_index(self, key: str, now: float) -> float | None:
        """Remove index entries older than the tag; the due time of the oldest left."""
        ttl = self.index_ttl()
        pipe = self.redis.pipeline(transaction=True)
        pipe.zremrangebyscore(key, "-inf", f"({now - ttl}")
        pipe.zrange(key, 0, 0, withscores=True)
        _removed, oldest = pipe.execute()
        return float(oldest[0][1]) + ttl if oldest else None

    def batch(self) -> Batch:
        key = self.pseudonymizer.current_key() if self.pseudonymizer is not None else None
        return Batch(self, key)


class Batch:
    """One round trip of single-key atomic writes; validation happens as each is added."""

    def __init__(self, writer: RecordWriter, pseudonym_key: bytes | None) -> None:
        self._writer = writer
        self._key = pseudonym_key
        self._separators = writer.separators
        self._pipe = pipeline(writer.redis, atomic=True)
        self.size = 0

    def _kind(self, name: str) -> Kind:
        kind = self._writer.schema.kind(name)
        if kind.owner != "records" or kind.store != "redis":
            raise SchemaViolation(f"kind {name!r} is not written by the records writer")
        return kind

    @staticmethod
    def _ttl(kind: Kind) -> int:
        assert kind.retention.seconds is not None  # RecordWriter checked at start-up
        return kind.retention.seconds

    def _personal(self, value: str, ftype: str) -> str:
        if self._key is None or value == "":
            return value
        kind = "ip" if ftype == "ip" else "address"
        return Pseudonymizer.token(self._key, value, kind, self._separators)

    def _protect(self, kind: Kind, values: dict[str, Any]) -> dict[str, Any]:
        for name, value in values.items():
            ftype = kind.fields[name].type
            if ftype == "address-list":
                values[name] = [self._personal(v, ftype) for v in value]
            elif ftype in ("address", "ip"):
                values[name] = self._personal(value, ftype)
        return values

    def mailbox_token(self, mailbox: str) -> str:
        """The index form of a mailbox: normalised, or its pseudonym."""
        if self._key is not None:
            return Pseudonymizer.token(self._key, mailbox, "address", self._separators)
        return keys.normalise_mailbox(mailbox, self._separators)

    def entry(self, kind_name: str, fields: Mapping[str, Any], now: float | None = None) -> str:
        """Store one entry of a JSON-entry kind (smtp-log, abuse-evidence); returns its id."""
        kind = self._kind(kind_name)
        build = _ENTRY_KEYS.get(kind_name)
        if build is None:
            raise SchemaViolation(f"kind {kind_name!r} does not hold entries")
        values = self._protect(kind, validate(kind, fields))
        record_id = new_record_id(now)
        self._pipe.set(
            build(record_id), json.dumps(values, separators=(",", ":")), ex=self._ttl(kind)
        )
        self.size += 1
        return record_id

    def index(self, mailbox: str, record_id: str, now: float | None = None) -> str | None:
        """Add an entry id to the mailbox's index (a sorted set scored by entry time).

        Entries older than the tag are trimmed in the same transaction and the key
        expires one tag after this, its newest entry; the observer trims older ones
        when they come due. Returns the key (None for an empty mailbox).
        """
        kind = self._kind("mailbox-index")
        validate(kind, {"mailbox": mailbox, "record_id": record_id})
        if not keys.normalise_mailbox(mailbox):
            return None
        now = time.time() if now is None else now
        ttl = self._ttl(kind)
        name = keys.index_key(self.mailbox_token(mailbox))
        self._pipe.execute_command("EVAL", keys.INDEX_WRITE, 1, name, ttl, now, record_id)
        self.size += 1
        return name

    def count(self, day: str, action: str, reason_code: str, n: int = 1) -> None:
        """Add to an anonymous daily counter (no mailbox, no IP: the types forbid it)."""
        kind = self._kind("daily-counters")
        values = validate(
            kind, {"day": day, "action": action, "reason_code": reason_code, "count": n}
        )
        name = keys.stats_key(values["day"])
        field = keys.stats_field(values["action"], values["reason_code"])
        self._write_with_expiry(name, self._ttl(kind), "HINCRBY", field, n)
        self.size += 1

    def _write_with_expiry(self, name: str, ttl: int, *command: Any) -> None:
        # execute_command, not .eval(): redis-py's cluster pipeline disables .eval()
        # but routes a queued EVAL by its key like any other command.
        self._pipe.execute_command("EVAL", keys.WRITE_WITH_EXPIRY, 1, name, ttl, *command)

    def execute(self) -> None:
        if self.size:
            self._pipe.execute()
        self._pipe.reset()
