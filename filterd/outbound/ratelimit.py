"""Per-account sending limits: GCRA token buckets in Redis, one Lua script per decision.

Why a hand-written Lua script: the decision must be atomic across every daemon
and worker sharing one Redis (check all windows, then charge all of them or
none), and it must cost one round trip at RCPT time. No maintained Python
library does multi-window, all-or-nothing GCRA with per-account overrides read
in the same script; rq and rspamd do the same thing in their own Lua.

Each bucket is GCRA (the "theoretical arrival time" form of a token bucket of
capacity ``limit`` refilled at ``limit / window``): one number per key, the
time at which the bucket would be full again. The script reads Redis's own
clock (``TIME``), so daemons on machines whose clocks differ still agree, and
gives every key it writes an expiry no longer than its window: idle accounts
leave nothing behind. All keys of one decision share a hash tag
(``{u:LOGIN}``), so the script also runs on Redis Cluster.

Keys hold the login, never an IP; unauthenticated outbound sources limited per
IP (``limit_unauthenticated_by_ip``) hold only the IP, never a mailbox.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from filterd.keyspace import SubjectKind, outbound_keys
from filterd.outbound.config import LIMIT_NAMES, WINDOWS, Config

# ---------------------------------------------------------------------------------------

# KEYS[1]: the override hash; KEYS[1+i]: bucket i.
# ARGV[1]: n; then for bucket i: limit name (override field), default limit, window ms, cost.
# Returns {allowed, retry_ms, index of the bucket that refused (0 = none), its limit}.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local charge = {}
local wait, which, which_limit = 0, 0, 0
for i = 1, n do
  local base = 1 + (i - 1) * 4
  local limit = tonumber(ARGV[base + 2])
  local override = redis.call('HGET', KEYS[1], ARGV[base + 1])
  if override then limit = tonumber(override) end
  local period = tonumber(ARGV[base + 3])
  local cost = tonumber(ARGV[base + 4])
  if limit and limit > 0 and cost > 0 then
    local interval = period / limit
    local tat = tonumber(redis.call('GET', KEYS[i + 1])) or now
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    local allow_at = new_tat - period
    if allow_at > now then
      if allow_at - now > wait then
        wait = allow_at - now
        which = i
        which_limit = limit
      end
    else
      charge[i] = new_tat
    end
  end
end
if which > 0 then
  return {0, math.ceil(wait), which, which_limit}
end
for i = 1, n do
  if charge[i] then
    redis.call('SET', KEYS[i + 1], string.format('%.3f', charge[i]),
               'PX', math.max(1, math.ceil(charge[i] - now)))
  end
end
return {1, 0, 0, 0}
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0  # seconds until the refused charge would fit
    limit_name: str | None = None  # e.g. "messages_per_hour"
    limit: int = 0

    def describe(self) -> str:
        """The user-facing explanation, e.g. "3 messages per hour"."""
        if self.limit_name is None:
            return ""
        unit, _, window = self.limit_name.partition("_per_")
        return f"{self.limit} {unit if self.limit != 1 else unit[:-1]} per {window}"


@dataclass(frozen=True)
class Usage:
    name: str
    limit: int
    overridden: bool
    used: int  # charges still counted in the window (rounded up)


def _split(name: str) -> tuple[str, int]:
    unit, _, window = name.partition("_per_")
    return unit, WINDOWS[window]


class RateLimiter:
    """Charges and inspects buckets; thread-safe (redis-py pools connections)."""

    def __init__(self, client: Any, defaults: Mapping[str, int]) -> None:
        self.redis = client
        self.defaults = {name: int(defaults.get(name, 0)) for name in LIMIT_NAMES}
        self._script = client.register_script(GCRA_LUA)

    def consume(self, kind: SubjectKind, subject: str, messages: int, recipients: int) -> Verdict:
        """Charge ``messages`` and ``recipients`` to every window, all or nothing."""
        keys = outbound_keys(kind, subject)
        argv: list[Any] = [len(LIMIT_NAMES)]
        for name in LIMIT_NAMES:
            unit, seconds = _split(name)
            cost = messages if unit == "messages" else recipients
            argv += [name, self.defaults[name], seconds * 1000, cost]
        result = self._script(keys=[keys.override, *keys.buckets.values()], args=argv)
        allowed, retry_ms, which, limit = (int(v) for v in result)
        if allowed:
            return Verdict(True)
        return Verdict(False, retry_ms / 1000.0, LIMIT_NAMES[which - 1], limit)

    # -- administration (filterd limits) ----------------------------------------------
    def overrides(self, kind: SubjectKind, subject: str) -> dict[str, int]:
        raw = self.redis.hgetall(outbound_keys(kind, subject).override)
        return {_text(k): int(v) for k, v in raw.items() if _text(k) in LIMIT_NAMES}

    def set_overrides(self, kind: SubjectKind, subject: str, values: Mapping[str, int]) -> None:
        unknown = sorted(set(values) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"unknown limit(s) {unknown}; known: {list(LIMIT_NAMES)}")
        if any(v < 0 for v in values.values()):
            raise ValueError("limits are >= 0 (0 = unlimited)")
        if values:
            self.redis.hset(outbound_keys(kind, subject).override, mapping=dict(values))

    def reset(self, kind: SubjectKind, subject: str, *, counters: bool) -> int:
        keys = outbound_keys(kind, subject)
        names = [keys.override]
        if counters:
            names += list(keys.buckets.values())
        return int(self.redis.delete(*names))

    def usage(self, kind: SubjectKind, subject: str) -> list[Usage]:
        keys = outbound_keys(kind, subject)
        overrides = self.overrides(kind, subject)
        # Redis's clock, as the script uses; asked on its own: redis-py refuses TIME
        # inside a Redis Cluster pipeline (the GETs share one slot, the hash tag).
        seconds, micros = self.redis.time()
        pipe = self.redis.pipeline(transaction=False)
        for key in keys.buckets.values():
            pipe.get(key)
        tats = pipe.execute()
        now = int(seconds) * 1000 + int(micros) // 1000
        out = []
        for name, tat in zip(LIMIT_NAMES, tats, strict=True):
            limit = overrides.get(name, self.defaults[name])
            _unit, window = _split(name)
            used = 0
            if limit > 0 and tat is not None:
                ahead = max(0.0, float(tat) - now)
                used = math.ceil(round(ahead / (window * 1000 / limit), 6))
            out.append(Usage(name, limit, name in overrides, used))
        return out

    def spam_counts(self, kind: SubjectKind, subject: str, days: list[str]) -> dict[str, int]:
        prefix = outbound_keys(kind, subject).spam_prefix
        values = self.redis.mget([prefix + day for day in days]) if days else []
        return {day: int(v) for day, v in zip(days, values, strict=True) if v is not None}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def limiter_for(client: Any, config: Config) -> RateLimiter:
    return RateLimiter(client, config.limits())
