"""The [outbound] section: what counts as outbound, how it is scanned, how fast it may go.

Limits are per SASL login (and, if enabled, per client IP of unauthenticated
outbound sources); 0 means "no limit" for that window. Every key can be
overridden like any other, e.g. ``FILTERD_OUTBOUND_MESSAGES_PER_HOUR=3``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from filterd.settings import Section

SECTION = "outbound"

# Window names as they appear in key names, limits and `filterd limits`.
WINDOWS: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}
UNITS = ("messages", "recipients")
LIMIT_NAMES = tuple(f"{unit}_per_{window}" for unit in UNITS for window in WINDOWS)
DEFAULT_MESSAGE_CHECKS = ("antivirus", "attachments", "classifier")


class Config(Section):
    enabled: bool = True
    # A SASL-authenticated client ({auth_authen}) sends outbound mail.
    authenticated: bool = True
    # Postfix services whose mail is outbound even without SASL (their
    # `-o milter_macro_daemon_name=NAME`, seen by milters as {daemon_name}).
    services: list[str] = []
    # Content checks for outbound mail; allowlists and client-IP blocklists never apply.
    # None: those of DEFAULT_MESSAGE_CHECKS that [pipeline] message_checks runs inbound
    # (shared instances); a list given here is built even if inbound does not run it.
    message_checks: list[str] | None = None
    # Classifier probability that refuses outbound mail; None = the model card's threshold.
    reject_threshold: float | None = Field(default=None, gt=0, le=1)
    # Per-login limits; 0 = unlimited.
    messages_per_minute: int = Field(default=20, ge=0)
    messages_per_hour: int = Field(default=200, ge=0)
    messages_per_day: int = Field(default=1000, ge=0)
    recipients_per_minute: int = Field(default=100, ge=0)
    recipients_per_hour: int = Field(default=1000, ge=0)
    recipients_per_day: int = Field(default=3000, ge=0)
    # Unauthenticated outbound sources (by service) are limited per client IP with
    # the same numbers when this is true; otherwise they are not limited.
    limit_unauthenticated_by_ip: bool = False
    # Redis down while a limit must be checked: tempfail (451 4.7.1) or accept unlimited.
    on_failure: Literal["tempfail", "accept"] = "tempfail"
    # Remove headers that carry the sender's IP or host (X-Originating-IP and friends).
    strip_client_headers: bool = True
    # Header names always removed from outbound mail (case-insensitive), in addition to
    # any other non-content header that contains the client's IP address.
    strip_headers: list[str] = [
        "X-Originating-IP",
        "X-Sender-IP",
        "X-Client-IP",
        "X-Forwarded-For",
        "X-Real-IP",
        "X-Remote-IP",
        "X-Remote-Addr",
        "X-Source-IP",
        "X-Forward",
        "X-Originating-Host",
        "X-Originating-Client",
        "X-MS-Exchange-Organization-OriginalClientIPAddress",
    ]

    def limits(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in LIMIT_NAMES}
