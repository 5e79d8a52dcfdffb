"""Every Redis key the records package writes or reads is built here.

The patterns match the `key` of the kinds in rules/retention.toml (a test checks
each builder against its kind), so the "every key is accounted for" scan and the
code cannot disagree about where data lives.
"""

from __future__ import annotations

PREFIX = "filterd:v1:"

LOG = "rec:log:"
INDEX = "rec:idx:"
STATS = "stats:"
ABUSE = "rec:abuse:"
PSEUDONYM_KEY = "rec:pkey:"


def log_key(record_id: str) -> str:
    return f"{PREFIX}{LOG}{record_id}"


def index_key(mailbox_token: str) -> str:
    """``mailbox_token``: the normalised mailbox, or its pseudonym."""
    return f"{PREFIX}{INDEX}{mailbox_token}"


def stats_key(day: str) -> str:
    return f"{PREFIX}{STATS}{day}"


def abuse_key(record_id: str) -> str:
    return f"{PREFIX}{ABUSE}{record_id}"


def pseudonym_key(epoch: int) -> str:
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
