"""The ``[allowlist]`` section: one Config for the lists, the check, the CLI and the API.

The check module ``filterd.checks.allowlist`` re-exports this class, so the
settings loader registers exactly one model for the section whichever module
it finds first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr, field_validator

from filterd.settings import Section

SECTION = "allowlist"

VerifyMethod = Literal["auth", "authres", "from_header"]


def _split_list(value: object) -> object:
    """Env overrides arrive as plain strings: accept ``a, b`` for a list field."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Config(Section):
    # "strict": an address/domain entry holds at end of message only when the
    # sender is verified by one of `verify_by`; "envelope": the envelope sender
    # alone decides (forgeable). IP/CIDR entries never need verification.
    sender_auth: Literal["envelope", "strict"] = "strict"
    # What counts as verification in strict mode: "auth" = SASL-authenticated
    # client, "authres" = a pass in an Authentication-Results header from a
    # trusted authserv-id, aligned with the sender domain, "from_header" = the
    # From: address matches the same entry.
    verify_by: list[VerifyMethod] = ["auth", "authres", "from_header"]
    # authserv-ids whose Authentication-Results headers are believed (the MTA
    # must strip incoming headers that claim these ids).
    trusted_authserv_ids: list[str] = []
    # Characters that start a sub-address in recipient local parts (Postfix
    # recipient_delimiter); "" keeps "+tag" as part of the mailbox.
    subaddress_separators: str = "+"
    # Local parts of recipient mailboxes are compared case-insensitively.
    lowercase_local_part: bool = True
    # Per-hosted-domain lists (key "@domain") apply to every mailbox of the domain.
    domain_lists: bool = True
    max_entries_per_mailbox: int = 1000
    max_entry_length: int = 254
    # Shortest CIDR prefixes accepted in entries (wider ranges are refused as typos).
    min_ipv4_prefix: int = 16
    min_ipv6_prefix: int = 32
    # Site-wide lists (plain text, see allowlists/site.txt), relative to the project root.
    site_files: list[str] = ["allowlists/site.txt"]
    # How often the check looks at the site files' modification time.
    site_reload_seconds: float = 1.0
    # Redis unreachable: "tempfail" (451, the sender retries) or "accept" (no exemption).
    on_failure: Literal["tempfail", "accept"] = "tempfail"
    # HTTP JSON API for the customer panel (`filterd allow api`).
    api_listen: str = "127.0.0.1:8895"
    # HMAC secret for per-mailbox tokens; set FILTERD_ALLOWLIST_API_SECRET or api_secret_file.
    api_secret: SecretStr = SecretStr("")
    api_secret_file: str = ""
    api_max_body_bytes: int = 65536
    api_timeout_seconds: float = 10.0
    # Lifetime of a token made by `filterd allow token` / make_token (the panel may choose
    # shorter); expired tokens get 401 token_expired.
    api_token_days: float = 30.0
    # Failed token checks allowed per client address and per list within the window;
    # beyond it that client / list gets 429 until the window has passed.
    api_max_failed_attempts: int = 10
    api_failed_window_seconds: float = 300.0

    @field_validator("verify_by", "trusted_authserv_ids", "site_files", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("api_secret", mode="before")
    @classmethod
    def _secret(cls, value: object) -> object:
        if value is not None and not isinstance(value, (str, SecretStr)):
            raise ValueError("must be a string (quote it in TOML or in the environment)")
        return value

    @field_validator("max_entries_per_mailbox", "max_entry_length", "api_max_body_bytes")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("min_ipv4_prefix")
    @classmethod
    def _v4(cls, value: int) -> int:
        if not 0 <= value <= 32:
            raise ValueError("must be 0-32")
        return value

    @field_validator("min_ipv6_prefix")
    @classmethod
    def _v6(cls, value: int) -> int:
        if not 0 <= value <= 128:
            raise ValueError("must be 0-128")
        return value

    @field_validator("subaddress_separators")
    @classmethod
    def _separators(cls, value: str) -> str:
        if "@" in value or any(c.isspace() or c.isalnum() for c in value):
            raise ValueError("separators must be punctuation other than '@'")
        return value
