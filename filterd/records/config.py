"""The [records] section of rules/filterd.toml.

Retention periods are not here: they live in the schema file, next to the fields
they govern, so there is one place to read the privacy promise.
"""

from __future__ import annotations

from pathlib import Path

from filterd.settings import Section, resolve_path

SECTION = "records"


class Config(Section):
    # false: nothing is recorded (no log entries, no statistics).
    enabled: bool = True
    # The retention schema; relative paths are relative to the project root.
    schema_file: str = "rules/retention.toml"
    # Replace addresses and IPs by keyed hashes; the key rotates with the log retention.
    pseudonymise: bool = False
    # Optional file whose bytes are mixed into the pseudonym keys (keep it outside Redis).
    pseudonym_secret_file: str = ""
    # Characters starting a sub-address (Postfix recipient_delimiter): a request for
    # user@example.org then also covers user+tag@example.org. "" = exact addresses.
    subaddress_separators: str = "+"
    # Keep client IP + reason of refused messages for the abuse-evidence retention (no mailbox).
    abuse_evidence: bool = False
    # Entries waiting to be written off the SMTP path; when full, an entry is dropped,
    # counted and logged (mail is never delayed by records).
    queue_size: int = 10000

    def resolve(self, value: str) -> Path:
        """Relative paths resolve as everywhere else in filterd (the project root)."""
        return resolve_path(value)
