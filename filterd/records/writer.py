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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.exceptions import NoScriptError

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


#: One Redis command as sent by ``pipe.execute_command(*command)``.
Command = tuple[Any, ...]

_JSON = json.JSONEncoder(separators=(",", ":"))  # built once, not per entry as json.dumps would


def new_record_id(now: float | None = None) -> str:
    """Time-ordered and unguessable: milliseconds, then 48 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis:012x}{secrets.token_hex(6)}"


class RecordWriter:
    """Built once per configuration; thread-safe (each Batch and each send has its own
    command list and pipeline). Everything constant per configuration (kinds, TTLs,
    declared fields) is looked up here once, not per message."""

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
        self.index_kind = schema.kinds["mailbox-index"]
        self.counter_kind = schema.kinds["daily-counters"]
        self._counter_ttl = _ttl(self.counter_kind)
        self._counters: dict[tuple[str, str, str], tuple[str, str]] = {}

    def declared(self, kind: str) -> frozenset[str]:
        """Field names the schema lets this kind store (callers omit the others)."""
        return frozenset(self.schema.kind(kind).fields)

    def index_ttl(self) -> int:
        """Seconds an index entry may live: the mailbox-index kind's retention tag."""
        return _ttl(self.index_kind)

    def trim_commands(self, key: str, now: float) -> list[Command]:
        """Remove index entries older than the tag, then read the oldest left.

        ``oldest_due`` reads the replies. In a batch of their own they are one
        MULTI/EXEC, as ``trim_index``; the observer also sends them with a batch of
        writes, to save the round trip.
        """
        return [
            ("ZREMRANGEBYSCORE", key, "-inf", f"({now - self.index_ttl()}"),
            ("ZRANGE", key, 0, 0, "WITHSCORES"),
        ]

    def oldest_due(self, replies: Sequence[Any]) -> float | None:
        """From the replies to ``trim_commands``: when the oldest entry left comes due."""
        oldest = replies[-1]
        if not oldest:
            return None
        first = oldest[0]
        # RESP2: [member, score]; RESP3 or a parsed reply: [[member, score]].
        score = first[1] if isinstance(first, list | tuple) else oldest[1]
        return float(score) + self.index_ttl()

    def trim_index(self, key: str, now: float) -> float | None:
        """Remove index entries older than the tag; the due time of the oldest left."""
        (error,), (replies,) = self.send_with_replies([self.trim_commands(key, now)])
        if error is not None:
            raise error
        return self.oldest_due(replies)

    def batch(self) -> Batch:
        key = self.pseudonymizer.current_key() if self.pseudonymizer is not None else None
        return Batch(self, key)

    def counter_field(self, day: str, action: str, reason_code: str) -> tuple[str, str]:
        """The counter key and field of (day, action, reason), validated once per triple.

        The validation is the schema's, run the first time a triple is seen (a day has
        a few dozen); the cache is emptied when it grows past 1024 triples.
        """
        triple = (day, action, reason_code)
        found = self._counters.get(triple)
        if found is None:
            values = validate(
                self.counter_kind,
                {"day": day, "action": action, "reason_code": reason_code, "count": 0},
            )
            found = (
                keys.stats_key(values["day"]),
                keys.stats_field(values["action"], values["reason_code"]),
            )
            if len(self._counters) >= 1024:
                self._counters.clear()
            self._counters[triple] = found
        return found

    def send(self, batches: Sequence[Sequence[Command]]) -> list[BaseException | None]:
        """Send every batch's commands in one round trip; each batch's first error.

        None for a batch whose commands all ran. A failure of the round trip itself
        (connection lost, timeout) raises: nothing can be said of any batch.
        """
        return self.send_with_replies(batches)[0]

    def send_with_replies(
        self, batches: Sequence[Sequence[Command]]
    ) -> tuple[list[BaseException | None], list[list[Any]]]:
        """``send``, also returning each batch's replies (errors in place).

        Commands answered NOSCRIPT did not run; they are re-sent with the script
        text, in one more round trip (see the module docstring).
        """
        flat = [command for batch in batches for command in batch]
        results: list[Any] = []
        if flat:
            try:
                results = self._execute(flat)
            except NoScriptError:
                # Only if a server refused the transaction at queue time (EXECABORT):
                # then nothing ran, and every command is sent again with its text.
                results = self._execute([_with_text(c) for c in flat])
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                try:
                    again = self._execute([_with_text(flat[i]) for i in missing])
                except Exception as exc:  # noqa: BLE001 - only these commands failed
                    again = [exc] * len(missing)
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        errors: list[BaseException | None] = []
        replies: list[list[Any]] = []
        start = 0
        for batch in batches:
            mine = results[start : start + len(batch)]
            start += len(batch)
            errors.append(next((r for r in mine if isinstance(r, Exception)), None))
            replies.append(mine)
        return errors, replies

    def _execute(self, commands: list[Command]) -> list[Any]:
        pipe = pipeline(self.redis, atomic=True)
        try:
            for command in commands:
                pipe.execute_command(*command)
            result: list[Any] = pipe.execute(raise_on_error=False)
            return result
        finally:
            pipe.reset()


def _ttl(kind: Kind) -> int:
    assert kind.retention.seconds is not None  # RecordWriter checked at start-up
    return kind.retention.seconds


def _with_text(command: Command) -> Command:
    """An EVALSHA of one of our scripts as EVAL with its text; anything else unchanged."""
    if command[0] == "EVALSHA" and command[1] in keys.SCRIPTS:
        return ("EVAL", keys.SCRIPTS[command[1]], *command[2:])
    return command


class Batch:
    """One message's single-key atomic writes; validation happens as each is added.

    Nothing is sent until ``execute`` (or the observer hands ``commands`` to
    ``RecordWriter.send`` together with other batches).
    """

    def __init__(self, writer: RecordWriter, pseudonym_key: bytes | None) -> None:
        self._writer = writer
        self._key = pseudonym_key
        self._separators = writer.separators
        self.commands: list[Command] = []

    @property
    def size(self) -> int:
        return len(self.commands)

    def _kind(self, name: str) -> Kind:
        kind = self._writer.schema.kind(name)
        if kind.owner != "records" or kind.store != "redis":
            raise SchemaViolation(f"kind {name!r} is not written by the records writer")
        return kind

    def _personal(self, value: str, ftype: str) -> str:
        if self._key is None or value == "":
            return value
        kind = "ip" if ftype == "ip" else "address"
        return Pseudonymizer.token(self._key, value, kind, self._separators)

    def _protect(self, kind: Kind, values: dict[str, Any]) -> dict[str, Any]:
        if self._key is None:
            return values  # nothing to replace: stored as validated
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
        self.commands.append(("SET", build(record_id), _JSON.encode(values), "EX", _ttl(kind)))
        return record_id

    def index(
        self,
        mailbox: str,
        record_id: str,
        now: float | None = None,
        *,
        token: str | None = None,
        oldest: bool = False,
    ) -> str | None:
        """Add an entry id to the mailbox's index (a sorted set scored by entry time).

        Entries older than the tag are trimmed in the same script and the key
        expires one tag after this, its newest entry; the observer trims older ones
        when they come due. Returns the key (None for an empty mailbox).
        ``token``: the mailbox's ``mailbox_token`` when the caller already has it;
        ``oldest``: the script's reply is the oldest entry's score (else 1).
        """
        kind = self._writer.index_kind
        validate(kind, {"mailbox": mailbox, "record_id": record_id})
        if not keys.normalise_mailbox(mailbox):
            return None
        now = time.time() if now is None else now
        name = keys.index_key(self.mailbox_token(mailbox) if token is None else token)
        self.commands.append(
            ("EVALSHA", keys.INDEX_WRITE_SHA, 1, name, _ttl(kind), now, record_id, int(oldest))
        )
        return name

    def count(self, day: str, action: str, reason_code: str, n: int = 1) -> None:
        """Add to an anonymous daily counter (no mailbox, no IP: the types forbid it)."""
        name, field = self._writer.counter_field(day, action, reason_code)
        n = validate(self._writer.counter_kind, {"count": n})["count"]
        self._write_with_expiry(name, self._writer._counter_ttl, "HINCRBY", field, n)

    def _write_with_expiry(self, name: str, ttl: int, *command: Any) -> None:
        # execute_command, not .evalsha(): redis-py's cluster pipeline disables the
        # script methods but routes a queued EVALSHA by its key like any other command.
        self.commands.append(("EVALSHA", keys.WRITE_WITH_EXPIRY_SHA, 1, name, ttl, *command))

    def execute(self) -> None:
        """Send this batch alone (one round trip); raises its first error."""
        if self.commands:
            (error,) = self._writer.send([self.commands])
            if error is not None:
                raise error
        self.commands = []
