"""Every Redis key filterd reads or writes is built here, and only here.

Version ``v1``: a change of format gets a new prefix, never a silent reuse. The
patterns match the ``key`` of the kinds in ``rules/retention.toml`` (below the
prefix ``filterd:v1:``); a test builds one key with every builder and checks that
it lands in its kind, so the ``filterd records audit`` scan and the code cannot
disagree about where data lives.

=============================  ====  =============================  ===================  =========
key (below ``filterd:v1:``)    type  content                        retention kind       writer
=============================  ====  =============================  ===================  =========
``rec:log:<record-id>``        str   one SMTP log entry (JSON)      smtp-log             records
``rec:idx:<mailbox-token>``    zset  record ids by arrival time     mailbox-index        records
``stats:<YYYY-MM-DD>``         hash  ``action|reason`` -> count     daily-counters       records
``rec:abuse:<record-id>``      str   client IP + reason (JSON)      abuse-evidence       records
``rec:pkey:<epoch>``           str   pseudonym key of a period      pseudonym-key        records
``allow:mbox:<mailbox>``       set   a mailbox's allowlist          allowlist            allowlist
``allow:dom:<domain>``         set   a hosted domain's allowlist    allowlist            allowlist
``allow:rev:<list>``           str   API token revocation counter   allowlist            allowlist
``rl:{u:<login>}:b:<limit>``   str   GCRA state of one window       rate-limit-state     outbound
``rl:{u:<login>}:o``           hash  an admin's per-account limits  rate-limit-override  outbound
``rl:{ip:<addr>}:b|o…``              the same per client IP         ...-ip twins         outbound
``ob:{u:<login>}:spam:<day>``  str   refused outbound spam a day    outbound-spam        outbound
=============================  ====  =============================  ===================  =========

**Redis Cluster.** A command, MULTI/EXEC or Lua script may only touch keys of one
hash slot. The rule here: a key is its own unit unless a ``{hash tag}`` says
otherwise, and only keys that one atomic operation must touch together share a
tag. Today that is one group: the keys of one account's rate limit
(``rl:{u:alice@example.org}:b:messages_per_minute``, ``...:o``, ...), so a single Lua
script can check and update all of them. Everything else is written key by key,
each key atomically with its expiry (``SET ... EX``, or :data:`WRITE_WITH_EXPIRY`
for a set or hash), and the operations that span several keys are built to be
correct without a cross-key transaction:

* a records batch (log entry + index sets + daily counter of each message queued,
  up to 64 messages, plus the index trims that are due): one MULTI/EXEC on a single
  Redis, one pipeline split over the owning primaries on Cluster; a batch cut short
  leaves at worst an index member whose entry is missing, which export and erase
  skip;
* allowlist edits: one script on one key (the per-list limit holds);
* export/erase: reads are pipelines of single-key reads; erase deletes per key and
  is safe to repeat;
* ``stats`` and ``records audit``: SCAN, which redis-py's ``RedisCluster.scan_iter``
  runs on every primary (each with its own cursor) -- checked by the cluster tests;
* pseudonym keys of several periods are read with one GET per key (not MGET).

Hash-tagged parts are escaped (``%`` ``{`` ``}`` percent-encoded): a login
containing a brace could otherwise end the tag early or, as ``{}``, empty it,
which would spread one account's windows over several slots.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

PREFIX = "filterd:v1:"

# Below PREFIX; each matches the `key` pattern of its kind in rules/retention.toml.
LOG = "rec:log:"
INDEX = "rec:idx:"
STATS = "stats:"
ABUSE = "rec:abuse:"
PSEUDONYM_KEY = "rec:pkey:"
ALLOW = "allow:"
ALLOW_MAILBOX = "allow:mbox:"
ALLOW_DOMAIN = "allow:dom:"
ALLOW_REVOCATION = "allow:rev:"
RATELIMIT = "rl:"
OUTBOUND = "ob:"

#: Retention kind (rules/retention.toml) of every builder, for the consistency test.
KINDS: dict[str, str] = {
    "log_key": "smtp-log",
    "index_key": "mailbox-index",
    "stats_key": "daily-counters",
    "abuse_key": "abuse-evidence",
    "pseudonym_key": "pseudonym-key",
    "allow_mailbox_key": "allowlist",
    "allow_domain_key": "allowlist",
    "ratelimit_bucket": "rate-limit-state",
    "ratelimit_override": "rate-limit-override",
    "outbound_spam": "outbound-spam",
}

# The records writer calls both scripts by their SHA1 (EVALSHA: the text is not sent,
# and Redis does not hash it, on every call). A server that lacks the script (restarted,
# SCRIPT FLUSH, a freshly promoted replica, another Cluster node) answers NOSCRIPT
# without running anything; the writer then re-sends exactly those commands as EVAL,
# which also loads the script (filterd.records.writer.RecordWriter.send).
#
# KEYS[1] a mailbox index; ARGV[1] its TTL in seconds; ARGV[2] now (epoch s); ARGV[3] the
# record id. Entries older than the retention tag are dropped on every write, so a mailbox
# that gets mail weekly keeps no timeline beyond its tag; trim, add and expiry are one step.
# ARGV[4] "1": return the score (entry time) of the oldest entry left, so a writer that
# has not scheduled the key's trim yet learns when it is due without a round trip of its
# own; "0": return 1 (the key is scheduled already; saves the read).
INDEX_WRITE = """\
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (tonumber(ARGV[2]) - tonumber(ARGV[1])))
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if ARGV[4] == '1' then
  return redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
end
return 1
"""

# KEYS[1] the key; ARGV[1] its TTL in seconds; ARGV[2] the write command (the records
# writer sends SADD or HINCRBY); ARGV[3..] its arguments. The write and its expiry are
# one atomic step on one key, so no replica, failover or cut connection can leave the
# key without a TTL.
WRITE_WITH_EXPIRY = """\
local r = redis.call(ARGV[2], KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return r
"""


def script_sha(script: str) -> str:
    """The SHA1 Redis files a script under (what EVALSHA and SCRIPT LOAD use)."""
    return hashlib.sha1(script.encode("utf-8"), usedforsecurity=False).hexdigest()


INDEX_WRITE_SHA = script_sha(INDEX_WRITE)
WRITE_WITH_EXPIRY_SHA = script_sha(WRITE_WITH_EXPIRY)
#: Script text by SHA1, for the EVAL fallback after NOSCRIPT.
SCRIPTS: dict[str, str] = {INDEX_WRITE_SHA: INDEX_WRITE, WRITE_WITH_EXPIRY_SHA: WRITE_WITH_EXPIRY}


def hash_tag(token: str) -> str:
    """``{token}`` with braces and ``%`` percent-encoded, so the tag is exactly the token."""
    if not token:
        raise ValueError("a hash tag needs a non-empty token")
    escaped = token.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return "{" + escaped + "}"


# -- records ------------------------------------------------------------------------------


def log_key(record_id: str) -> str:
    return f"{PREFIX}{LOG}{record_id}"


def index_key(mailbox_token: str) -> str:
    """``mailbox_token``: the normalised mailbox, or its pseudonym."""
    return f"{PREFIX}{INDEX}{mailbox_token}"


def stats_key(day: str) -> str:
    return f"{PREFIX}{STATS}{day}"


def abuse_key(record_id: str) -> str:
    return f"{PREFIX}{ABUSE}{record_id}"


def pseudonym_key(epoch: int | str) -> str:
    return f"{PREFIX}{PSEUDONYM_KEY}{epoch}"


def stats_pattern() -> str:
    return f"{PREFIX}{STATS}*"


def strip_prefix(key: str) -> str | None:
    """The part after ``filterd:v1:``, or None for a key outside our keyspace."""
    return key[len(PREFIX) :] if key.startswith(PREFIX) else None


def stats_field(action: str, reason_code: str) -> str:
    return f"{action}|{reason_code}"


def parse_stats_field(name: str) -> tuple[str, str]:
    action, _, reason = name.partition("|")
    return action, reason


def normalise_mailbox(address: str, separators: str = "") -> str:
    """Index form of a mailbox: case-folded, sub-address (``user+tag``) removed.

    ``separators`` are the characters that start a sub-address (Postfix's
    recipient_delimiter), so a request for user@example.org also finds entries
    for user+shop@example.org.
    """
    value = address.strip().strip("<>").lower()
    local, at, domain = value.rpartition("@")
    if not at or not separators:
        return value
    cut = min((i for i in (local.find(c) for c in separators) if i > 0), default=-1)
    return f"{local[:cut]}@{domain}" if cut > 0 else value


# -- allowlists -------------------------------------------------------------------------

#: Retention of the allowlists: user content, no TTL (see filterd.allowlist.store).
ALLOW_RETENTION = "user-content: until the user removes it (no TTL)"

ALLOW_KEYSPACE: dict[str, str] = {
    f"{PREFIX}{ALLOW_MAILBOX}<mailbox>": f"set of canonical entries; retention {ALLOW_RETENTION}",
    f"{PREFIX}{ALLOW_DOMAIN}<domain>": f"set of canonical entries; retention {ALLOW_RETENTION}",
    f"{PREFIX}{ALLOW_REVOCATION}<list key>": f"API token revocation counter; {ALLOW_RETENTION}",
}


def allow_revocation_key(list_key: str) -> str:
    """``list_key`` is ``Target.key`` (``alice@example.org`` or ``@example.org``)."""
    return f"{PREFIX}{ALLOW_REVOCATION}{list_key}"


def allow_mailbox_key(mailbox: str) -> str:
    """``mailbox`` canonical (``allowlist.entries.canonical_mailbox``)."""
    return f"{PREFIX}{ALLOW_MAILBOX}{mailbox}"


def allow_domain_key(domain: str) -> str:
    """``domain`` canonical (``allowlist.entries.canonical_domain``)."""
    return f"{PREFIX}{ALLOW_DOMAIN}{domain}"


# -- outbound: rate limits and refused-spam counters ------------------------------------

SubjectKind = Literal["u", "ip"]
_UNSAFE = re.compile(r"[^A-Za-z0-9@._+=:-]")


@dataclass(frozen=True)
class OutboundKeys:
    override: str  # hash: limit name -> per-account limit (admin setting, no expiry)
    buckets: Mapping[str, str]  # limit name -> GCRA state (expires within its window)
    spam_prefix: str  # + "YYYY-MM-DD": refused outbound spam per day (retention tag)


def outbound_keys(kind: SubjectKind, subject: str) -> OutboundKeys:
    """All keys of one account (``kind="u"``, the SASL login) or one client IP (``"ip"``).

    They share the hash tag ``{kind:subject}``, so the rate-limit Lua script may touch
    them all on Redis Cluster. The subject is case-folded and anything outside a safe
    set (braces, ``%``, spaces, controls) is percent-encoded, so a login cannot break
    the tag. An account's keys hold the login and never an IP; an IP's keys never a
    mailbox (kinds rate-limit-state[-ip], rate-limit-override[-ip], outbound-spam).
    """
    from filterd.outbound.config import LIMIT_NAMES

    value = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()),
                        subject.strip().lower())[:400]  # fmt: skip
    tag = "{" + f"{kind}:{value}" + "}"
    return OutboundKeys(
        override=f"{PREFIX}{RATELIMIT}{tag}:o",
        buckets={name: f"{PREFIX}{RATELIMIT}{tag}:b:{name}" for name in LIMIT_NAMES},
        spam_prefix=f"{PREFIX}{OUTBOUND}{tag}:spam:",
    )
