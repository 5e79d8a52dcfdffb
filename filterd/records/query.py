"""Readers: data-subject export and erase, and the anonymous daily statistics.

Export and erase find a mailbox's entries through its index sets (never KEYS):
the clear index and, when pseudonym keys exist, the index under the mailbox's
pseudonym for every key still inside the retention window. Each entry found is
checked to really name the mailbox, so an export holds exactly that mailbox's
entries. Other owners' data about a mailbox (allowlists) is included through
their ``export_mailbox`` / ``erase_mailbox`` interface.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol

from filterd import keyspace as keys
from filterd.clients.redis import pipeline
from filterd.records.pseudonym import Pseudonymizer, is_pseudonym
from filterd.records.schema import Schema

log = logging.getLogger("filterd.records")


class MailboxSource(Protocol):
    """Another owner's data about a mailbox (e.g. the allowlist store)."""

    def export_mailbox(self, mailbox: str) -> dict[str, Any]: ...

    def erase_mailbox(self, mailbox: str) -> int: ...


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Found:
    record_id: str
    fields: dict[str, Any]
    ttl: int


def _tokens(
    mailbox: str, pseudonymizer: Pseudonymizer | None, separators: str
) -> tuple[str, set[str]]:
    clear = keys.normalise_mailbox(mailbox, separators)
    tokens = {clear}
    if pseudonymizer is not None:
        tokens.update(pseudonymizer.tokens_for(mailbox, "address", separators))
    return clear, tokens


def _mailboxes_of(fields: dict[str, Any], separators: str) -> list[str]:
    found = [fields["sender"]] if fields.get("sender") else []
    found.extend(fields.get("recipients") or [])
    return [v if is_pseudonym(v) else keys.normalise_mailbox(v, separators) for v in found if v]


def _find(
    redis_client: Any, tokens: set[str], separators: str
) -> tuple[dict[str, set[str]], list[_Found]]:
    """Index members per token, and the live entries that really name one of the tokens."""
    ordered = sorted(tokens)
    pipe = redis_client.pipeline(transaction=False)
    for token in ordered:
        pipe.zrange(keys.index_key(token), 0, -1)
    members = {t: {_text(m) for m in ms} for t, ms in zip(ordered, pipe.execute(), strict=True)}
    ids = sorted(set().union(*members.values())) if members else []
    if not ids:
        return members, []
    pipe = redis_client.pipeline(transaction=False)
    for record_id in ids:
        pipe.get(keys.log_key(record_id))
        pipe.ttl(keys.log_key(record_id))
    results = pipe.execute()
    found = []
    for i, record_id in enumerate(ids):
        raw, ttl = results[2 * i], results[2 * i + 1]
        if raw is None:
            continue
        try:
            fields = json.loads(raw)
        except ValueError:
            log.warning("unreadable smtp-log entry", extra={"event": "records_unreadable"})
            continue
        if tokens.intersection(_mailboxes_of(fields, separators)):
            found.append(_Found(record_id, fields, int(ttl)))
    return members, found


def export_mailbox(
    redis_client: Any,
    schema: Schema,
    mailbox: str,
    *,
    pseudonymizer: Pseudonymizer | None = None,
    sources: Mapping[str, MailboxSource] | None = None,
    subaddress_separators: str = "",
) -> dict[str, Any]:
    """Everything held that names ``mailbox``, as a JSON-ready dict.

    Pseudonyms of the mailbox itself are shown as the mailbox (the requester knows
    it); other parties' addresses and IPs stay as they are stored.
    """
    separators = subaddress_separators
    clear, tokens = _tokens(mailbox, pseudonymizer, separators)
    _, found = _find(redis_client, tokens, separators)
    log_kind = schema.kind("smtp-log")
    entries = []
    for item in sorted(found, key=lambda f: (f.fields.get("timestamp", 0), f.record_id)):
        entries.append(_export_entry(item, mailbox, clear, tokens, log_kind.name, separators))
    other: dict[str, Any] = {}
    for name, source in (sources or {}).items():
        try:
            other[name] = source.export_mailbox(mailbox)
        except Exception as exc:  # noqa: BLE001 - shown in the export, not hidden
            other[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "mailbox": mailbox,
        "generated_at": datetime.now(UTC).isoformat(),
        "retention": {
            name: _retention_text(kind.retention.seconds)
            for name, kind in schema.kinds.items()
            if kind.store == "redis"
        },
        "records": entries,
        "other": other,
    }


def _export_entry(
    item: _Found, mailbox: str, clear: str, tokens: set[str], kind: str, separators: str
) -> dict[str, Any]:
    """One entry as the requester sees it.

    The requester's own pseudonyms read as their mailbox. When they are only a
    recipient, the other recipients of the transaction are counted, not named:
    they may have been Bcc'd, and the requester has no right to learn who.
    """
    fields = dict(item.fields)

    def mine(value: Any) -> bool:
        if is_pseudonym(value):
            return value in tokens
        return isinstance(value, str) and keys.normalise_mailbox(value, separators) == clear

    sender = fields.get("sender")
    if mine(sender):
        fields["sender"] = sender if not is_pseudonym(sender) else mailbox
    rcpts = fields.get("recipients") or []
    if rcpts:
        shown = [(r if not is_pseudonym(r) else mailbox) if mine(r) else r for r in rcpts]
        if not mine(sender):
            own = [r for r, orig in zip(shown, rcpts, strict=True) if mine(orig)]
            fields["other_recipients"] = len(rcpts) - len(own)
            shown = own
        fields["recipients"] = shown
    ts = fields.get("timestamp")
    return {
        "kind": kind,
        "id": item.record_id,
        "time": datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None,
        "expires_in_seconds": item.ttl,
        **fields,
    }


def _retention_text(seconds: int | None) -> str:
    if seconds is None:
        return "until removed"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def erase_mailbox(
    redis_client: Any,
    schema: Schema,
    mailbox: str,
    *,
    pseudonymizer: Pseudonymizer | None = None,
    sources: Mapping[str, MailboxSource] | None = None,
    subaddress_separators: str = "",
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete every entry naming ``mailbox``; returns counts of what went.

    A log entry that also names other mailboxes is deleted as a whole (it is the
    requester's record too) and removed from those mailboxes' index sets, so their
    other entries stay intact. Anonymous counters are not touched: they name no one.
    """
    separators = subaddress_separators
    _, tokens = _tokens(mailbox, pseudonymizer, separators)
    members, found = _find(redis_client, tokens, separators)
    counts = {"records": len(found), "index_entries": sum(len(m) for m in members.values())}
    other_index: dict[str, set[str]] = {}
    for item in found:
        for token in _mailboxes_of(item.fields, separators):
            if token not in tokens:
                other_index.setdefault(token, set()).add(item.record_id)
    counts["other_index_entries"] = sum(len(ids) for ids in other_index.values())
    if not dry_run:
        # One transaction on a single Redis; on Cluster per key (safe to repeat).
        pipe = pipeline(redis_client, atomic=True)
        for item in found:
            pipe.delete(keys.log_key(item.record_id))
        for token, ids in list(members.items()) + list(other_index.items()):
            if ids:
                pipe.zrem(keys.index_key(token), *sorted(ids))
        pipe.execute()
    for name, source in (sources or {}).items():
        counts[name] = 0 if dry_run else source.erase_mailbox(mailbox)
    return counts


@dataclass
class DayStats:
    day: str
    categories: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.categories.values())


def daily_stats(
    redis_client: Any, schema: Schema, *, since: date | None = None, until: date | None = None
) -> list[DayStats]:
    """Counters per UTC day, by category (the schema's table) and by action|reason."""
    names = sorted(_text(k) for k in redis_client.scan_iter(match=keys.stats_pattern(), count=1000))
    days = []
    for name in names:
        day = name[len(keys.stats_key("")) :]
        try:
            when = date.fromisoformat(day)
        except ValueError:
            continue
        if (since and when < since) or (until and when > until):
            continue
        days.append((day, name))
    pipe = redis_client.pipeline(transaction=False)
    for _, name in days:
        pipe.hgetall(name)
    out = []
    for (day, _), raw in zip(days, pipe.execute() if days else [], strict=True):
        stats = DayStats(day, {c: 0 for c in schema.category_names})
        for fname, value in raw.items():
            action, reason = keys.parse_stats_field(_text(fname))
            n = int(value)
            category = schema.category(action, reason)
            stats.categories[category] = stats.categories.get(category, 0) + n
            label = f"{action}|{reason}"
            stats.reasons[label] = stats.reasons.get(label, 0) + n
        out.append(stats)
    return out


def columns(schema: Schema, days: Iterable[DayStats]) -> list[str]:
    """Category columns in table order, plus any extra seen (e.g. "other")."""
    cols = list(schema.category_names)
    for d in days:
        cols.extend(c for c in d.categories if c not in cols)
    return cols


@dataclass
class Audit:
    """Result of checking every key in Redis against the schema."""

    keys_by_kind: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_keys(redis_client: Any, schema: Schema, *, batch: int = 500) -> Audit:
    """Every key must belong to a declared kind and expire no later than its tag allows.

    Walks the whole database with SCAN (not only filterd:v1:), so a key written by
    any code path, or by hand, is accounted for.
    """
    audit = Audit()
    names: list[str] = []

    def check(chunk: list[str]) -> None:
        pipe = redis_client.pipeline(transaction=False)
        for name in chunk:
            pipe.ttl(name)
        for name, ttl in zip(chunk, pipe.execute(), strict=True):
            suffix = keys.strip_prefix(name)
            kind = schema.kind_for_key(suffix) if suffix is not None else None
            if kind is None:
                audit.problems.append(f"{name!r}: belongs to no kind in {schema.source.name}")
                continue
            audit.keys_by_kind[kind.name] = audit.keys_by_kind.get(kind.name, 0) + 1
            limit = kind.retention.seconds
            if ttl == -2:  # expired between SCAN and TTL
                continue
            if limit is None:
                if ttl != -1:
                    audit.problems.append(
                        f"{name!r}: kind {kind.name} is until-removed "
                        f"but the key has a TTL of {ttl}s"
                    )
            elif ttl == -1:
                audit.problems.append(
                    f"{name!r}: kind {kind.name} must expire within {limit}s but the key has no TTL"
                )
            elif ttl > limit:
                audit.problems.append(
                    f"{name!r}: TTL {ttl}s exceeds {kind.name}'s retention of {limit}s"
                )

    for raw in redis_client.scan_iter(count=batch):
        names.append(_text(raw))
        if len(names) >= batch:
            check(names)
            names = []
    if names:
        check(names)
    return audit
