"""The allowlists in Redis: every write is atomic, every read goes to Redis.

Keys are built by :mod:`filterd.keyspace` (version ``v1``; a format change gets a new
prefix, never a silent reuse):

==========================================  ====  ==========================================
key                                         type  content
==========================================  ====  ==========================================
``filterd:v1:allow:mbox:<mailbox>``         set   canonical entries of one mailbox's list
``filterd:v1:allow:dom:<domain>``           set   canonical entries of a hosted domain's list
==========================================  ====  ==========================================

``<mailbox>`` and ``<domain>`` are canonical (``entries.canonical_mailbox`` /
``canonical_domain``). Retention class **user-content**: the lists are data the
user keeps, not logs, so they carry no TTL and live until the user removes
them (or ``erase_mailbox`` runs when the account is closed).

Every operation touches one key (one list), so it is the same on a single Redis,
behind Sentinel and on Redis Cluster: the scripts' KEYS are that one list, and a
lookup's mailbox and domain lists are read in one non-transactional pipeline
(redis-py splits it by primary on Cluster).

Reads go straight to Redis on every lookup (no local cache), so an edit made
through any node is seen by every node on its next lookup. Writes are Lua
scripts, so the per-list limit holds under concurrent edits from several
panels or nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from filterd import keyspace
from filterd.allowlist.entries import Entry, EntryError, Target, canonical_domain, parse_target
from filterd.allowlist.match import Match, Probe
from filterd.clients.redis import pipeline

if TYPE_CHECKING:
    from filterd.allowlist.config import Config
    from filterd.clients.redis import RedisClient

PREFIX = keyspace.PREFIX + keyspace.ALLOW
RETENTION_CLASS = "user-content"
RETENTION = keyspace.ALLOW_RETENTION
KEYSPACE: dict[str, str] = keyspace.ALLOW_KEYSPACE
mailbox_key = keyspace.allow_mailbox_key
domain_key = keyspace.allow_domain_key
revocation_key = keyspace.allow_revocation_key


def target_key(target: Target) -> str:
    return mailbox_key(target.name) if target.scope == "mailbox" else domain_key(target.name)


# KEYS[1] list; ARGV[1] limit; ARGV[2..] distinct canonical entries.
# Returns {ok, count, present_1 .. present_n}: ok=0 means refused (nothing written).
_ADD = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local out = {0, 0}
local new = 0
for i = 2, #ARGV do
  local present = redis.call('SISMEMBER', key, ARGV[i])
  out[#out + 1] = present
  if present == 0 then new = new + 1 end
end
local count = redis.call('SCARD', key)
if count + new > limit then
  out[2] = count
  return out
end
for i = 2, #ARGV do
  redis.call('SADD', key, ARGV[i])
end
out[1] = 1
out[2] = count + new
return out
"""

# KEYS[1] list; ARGV entries. Returns {removed_1 .. removed_n, count}.
_REMOVE = """
local out = {}
for i = 1, #ARGV do
  out[i] = redis.call('SREM', KEYS[1], ARGV[i])
end
out[#out + 1] = redis.call('SCARD', KEYS[1])
return out
"""

# KEYS[1] list; ARGV the complete new content. Returns the new count.
_REPLACE = """
redis.call('DEL', KEYS[1])
for i = 1, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
end
return redis.call('SCARD', KEYS[1])
"""


class LimitError(Exception):
    """The change would take a list beyond ``max_entries_per_mailbox``; nothing was written."""


@dataclass(frozen=True)
class Change:
    """What an add or remove did: ``changed`` entries, ``unchanged`` ones, the new count."""

    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    count: int


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _distinct(entries: Iterable[Entry | str]) -> list[str]:
    return list(dict.fromkeys(str(e) for e in entries))


class AllowlistStore:
    """Mailbox and domain lists in Redis; entries must already be canonical ``Entry`` objects."""

    def __init__(self, client: RedisClient, config: Config) -> None:
        self.redis = client
        self.config = config
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)
        self._replace = client.register_script(_REPLACE)

    @property
    def limit(self) -> int:
        return self.config.max_entries_per_mailbox

    def entries(self, target: Target) -> list[str]:
        members = self.redis.smembers(target_key(target))
        return sorted(_text(m) for m in members)  # type: ignore[union-attr]

    def count(self, target: Target) -> int:
        return int(self.redis.scard(target_key(target)))  # type: ignore[arg-type]

    def add(self, target: Target, entries: Sequence[Entry]) -> Change:
        items = _distinct(entries)
        if not items:
            return Change((), (), self.count(target))
        result = self._add(keys=[target_key(target)], args=[self.limit, *items])
        ok, count, flags = int(result[0]), int(result[1]), [int(f) for f in result[2:]]
        if not ok:
            new = flags.count(0)
            raise LimitError(
                f"{target}: the list has {count} entries; adding {new} more would exceed "
                f"the limit of {self.limit} entries"
            )
        added = tuple(e for e, f in zip(items, flags, strict=True) if not f)
        present = tuple(e for e, f in zip(items, flags, strict=True) if f)
        return Change(added, present, count)

    def remove(self, target: Target, entries: Sequence[Entry | str]) -> Change:
        items = _distinct(entries)
        if not items:
            return Change((), (), self.count(target))
        result = [int(x) for x in self._remove(keys=[target_key(target)], args=items)]
        removed = tuple(e for e, f in zip(items, result, strict=False) if f)
        absent = tuple(e for e, f in zip(items, result, strict=False) if not f)
        return Change(removed, absent, result[-1])

    def replace(self, target: Target, entries: Sequence[Entry]) -> int:
        """Make the list exactly ``entries`` in one atomic step (declarative import)."""
        items = _distinct(entries)
        if len(items) > self.limit:
            raise LimitError(
                f"{target}: {len(items)} entries exceed the limit of {self.limit} entries"
            )
        return int(self._replace(keys=[target_key(target)], args=items))

    def lookup(
        self, pairs: Sequence[tuple[str | None, str | None]], probe: Probe
    ) -> list[list[Match]]:
        """Matches in the domain and mailbox lists for each (mailbox, domain), one round trip."""
        if not probe.members or not pairs:
            return [[] for _ in pairs]
        pipe = self.redis.pipeline(transaction=False)
        plan: list[tuple[int, str]] = []
        for index, (mailbox, domain) in enumerate(pairs):
            if domain is not None and self.config.domain_lists:
                pipe.smismember(domain_key(domain), list(probe.members))
                plan.append((index, "domain"))
            if mailbox is not None:
                pipe.smismember(mailbox_key(mailbox), list(probe.members))
                plan.append((index, "mailbox"))
        results: list[list[Match]] = [[] for _ in pairs]
        if not plan:
            return results
        for (index, scope), flags in zip(plan, pipe.execute(), strict=True):
            results[index].extend(Match(scope, hit) for hit in probe.hits(flags))
        return results

    # Records (export / erase) interface.

    def export_mailbox(self, mailbox: str) -> dict[str, Any]:
        """A mailbox's list for a data-subject export."""
        target = parse_target(mailbox, self.config)
        return {
            "kind": "allowlist",
            "mailbox": target.key,
            "retention": RETENTION_CLASS,
            "entries": self.entries(target),
        }

    def token_generation(self, target: Target) -> int:
        """The list's API token generation: tokens of an older one are revoked."""
        value = self.redis.get(revocation_key(target.key))
        return int(_text(value)) if value is not None else 0

    def revoke_tokens(self, target: Target) -> int:
        """Revoke every API token of this list (only this list); the new generation."""
        return int(self.redis.incr(revocation_key(target.key)))  # type: ignore[arg-type]

    def erase_mailbox(self, mailbox: str) -> int:
        """Delete a mailbox's list; returns how many entries it held."""
        target = parse_target(mailbox, self.config)
        key = target_key(target)
        pipe = pipeline(self.redis, atomic=True)
        pipe.scard(key)
        pipe.delete(key)  # one key per command: the two need not share a cluster slot
        pipe.delete(revocation_key(target.key))
        count, _, _ = pipe.execute()
        return int(count)


def recipient_pair(recipient: str, config: Config) -> tuple[str | None, str | None]:
    """(canonical mailbox, canonical domain) of an RCPT TO; None parts when unreadable."""
    from filterd.allowlist.entries import canonical_mailbox

    try:
        mailbox = canonical_mailbox(recipient, config)
    except EntryError:
        domain_part = recipient.strip().strip("<>").rpartition("@")[2]
        try:
            return None, canonical_domain(domain_part, lenient=True) if domain_part else None
        except EntryError:
            return None, None
    return mailbox, mailbox.rpartition("@")[2]
