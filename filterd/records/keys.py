"""Re-export of the records keys: the keyspace now lives in :mod:`filterd.keyspace`.

Kept so existing imports (``from filterd.records import keys``) keep working;
new code imports ``filterd.keyspace``.
"""

from __future__ import annotations

from filterd.keyspace import (
    ABUSE,
    INDEX,
    LOG,
    PREFIX,
    PSEUDONYM_KEY,
    STATS,
    abuse_key,
    index_key,
    log_key,
    normalise_mailbox,
    parse_stats_field,
    pseudonym_key,
    stats_field,
    stats_key,
    stats_pattern,
    strip_prefix,
)

__all__ = [
    "ABUSE",
    "INDEX",
    "LOG",
    "PREFIX",
    "PSEUDONYM_KEY",
    "STATS",
    "abuse_key",
    "index_key",
    "log_key",
    "normalise_mailbox",
    "parse_stats_field",
    "pseudonym_key",
    "stats_field",
    "stats_key",
    "stats_pattern",
    "strip_prefix",
]
