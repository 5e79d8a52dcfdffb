"""The allowlist check: per-recipient exemption at RCPT, sender verification at end of message.

RCPT phase: the sender and client IP are turned into candidate entries once
(``match.Probe``); the site list is a local set, the recipient's domain list
and mailbox list are asked in ONE Redis round trip. A match yields
``ALLOWLIST_MATCH`` with effect EXEMPT, which makes the policy drop bypassable
findings (blocklists, classifier) for that recipient only. Viruses and banned
types are never bypassable, so they are refused whatever the lists say.

End of message (``gate``, strict mode only): address and domain entries trust
the envelope sender, which anyone can forge. The exemption then holds only if
the sender is verified (``verify_by``: SASL auth, a trusted and aligned
Authentication-Results pass, or a From: that matches the same entry). If not,
``ALLOWLIST_UNVERIFIED`` (UNEXEMPT) cancels the exemption and the message is
judged like any other. IP/CIDR matches need no verification.

Default ``strict`` with From: agreement counted: it stops the common bulk
forgery of an envelope sender alone without requiring an upstream DKIM/DMARC
verifier; sites that have one should add its authserv-id to
``trusted_authserv_ids`` and may drop "from_header" from ``verify_by`` (a
forger who sets both the envelope and the From: passes From: agreement).
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from filterd.allowlist.config import SECTION, Config
from filterd.allowlist.files import SiteList
from filterd.allowlist.match import Match, Probe, authres_verifies, best, entry_matches_address
from filterd.allowlist.store import AllowlistStore, recipient_pair
from filterd.checks.base import Done
from filterd.mail.analysis import analysis_of
from filterd.types import Effect, Envelope, Finding, Message

if TYPE_CHECKING:
    from filterd.checks.base import Services, Started

__all__ = ["SECTION", "AllowlistCheck", "Config", "build", "needs_verification"]

log = logging.getLogger("filterd.allowlist")

NAME = "allowlist"
UNVERIFIED = " (unverified)"


def needs_verification(finding: Finding) -> bool:
    """An ALLOWLIST_MATCH whose exemption is provisional until end-of-message verification.

    The milter's transaction split may group recipients by this too, so that a
    recipient exempt by an IP entry never shares a transaction with one whose
    address-entry exemption may be cancelled.
    """
    return finding.code == "ALLOWLIST_MATCH" and finding.provisional


@lru_cache(maxsize=256)
def _probe(mail_from: str, client_ip: str | None) -> Probe:
    return Probe.build(mail_from, client_ip)


def _headers(message: Message) -> tuple[list[str], list[str]]:
    """(From values, Authentication-Results values) as written, from the one header parse."""
    analysis = analysis_of(message)
    return analysis.raw_header_values("From"), analysis.raw_header_values("Authentication-Results")


def _single_from(values: list[str]) -> str | None:
    """The one From: address, or None when absent, repeated or a list (ambiguous)."""
    if len(values) != 1:
        return None
    addresses = [addr for _, addr in email.utils.getaddresses(values) if addr]
    return addresses[0] if len(addresses) == 1 else None


class AllowlistCheck:
    name = NAME
    bypassable = False
    gate = True

    def __init__(self, config: Config, store: AllowlistStore | None, site: SiteList) -> None:
        self.config = config
        self.store = store
        self.site = site
        self.on_failure = config.on_failure

    def matches(self, envelope: Envelope, recipients: Sequence[str]) -> list[list[Match]]:
        """Every matching entry per recipient: site list locally, Redis in one round trip."""
        self.site.maybe_reload()
        probe = _probe(envelope.mail_from, envelope.client_ip)
        site_hits = [Match("site", e) for e in probe.hits_in(self.site.entries)]
        pairs = [recipient_pair(r, self.config) for r in recipients]
        remote = self.store.lookup(pairs, probe) if self.store is not None else [[] for _ in pairs]
        return [site_hits + hits for hits in remote]

    def _pending(self, envelope: Envelope, match: Match) -> bool:
        if self.config.sender_auth != "strict" or not match.kind.forgeable:
            return False
        return not ("auth" in self.config.verify_by and envelope.auth_user)

    def check_recipient(self, envelope: Envelope, recipient: str) -> list[Finding]:
        found = best(self.matches(envelope, [recipient])[0])
        if found is None:
            return []
        pending = self._pending(envelope, found)
        return [
            Finding(
                check=NAME,
                code="ALLOWLIST_MATCH",
                detail=found.detail + (UNVERIFIED if pending else ""),
                effect=Effect.EXEMPT,
                bypassable=False,
                provisional=pending,
            )
        ]

    def _verifies(self, envelope: Envelope, exempt: bool) -> bool:
        """Whether an exemption is left to verify at end of message (rarely)."""
        if not exempt or self.config.sender_auth != "strict" or not envelope.recipients:
            return False
        return not ("auth" in self.config.verify_by and envelope.auth_user)

    def start_message(self, message: Message, exempt: bool) -> Started | None:
        """Nothing to verify is known at once: no thread hand-off for a message that was not
        exempted (nearly all); one that was goes to the pool, because verifying asks Redis."""
        return None if self._verifies(message.envelope, exempt) else Done()

    def check_message(self, message: Message, exempt: bool) -> list[Finding]:
        envelope = message.envelope
        if not self._verifies(envelope, exempt):
            return []
        verify_by = self.config.verify_by
        probe = _probe(envelope.mail_from, envelope.client_ip)
        per_recipient = self.matches(envelope, envelope.recipients)
        froms, authres = _headers(message)
        authenticated = (
            "authres" in verify_by
            and probe.sender_domain is not None
            and authres_verifies(authres, self.config.trusted_authserv_ids, probe.sender_domain)
        )
        header_from = _single_from(froms) if "from_header" in verify_by else None
        failing: list[str] = []
        for matches in per_recipient:
            if any(not m.kind.forgeable for m in matches):
                continue
            if matches and authenticated:
                continue
            if header_from and any(entry_matches_address(m.entry, header_from) for m in matches):
                continue
            strongest = best(matches)
            failing.append(strongest.detail if strongest else "entry removed")
        if not failing:
            return []
        total = len(per_recipient)
        return [
            Finding(
                check=NAME,
                code="ALLOWLIST_UNVERIFIED",
                detail=f"{len(failing)} of {total} recipient(s): sender not verified "
                f"({', '.join(sorted(set(failing)))})",
                effect=Effect.UNEXEMPT,
                bypassable=False,
            )
        ]

    def close(self) -> None:
        """The Redis client belongs to the shared services; nothing of our own to close."""

    def selftest(self) -> list[str]:
        if self.store is None:
            return ["no Redis configured: only the site-wide allowlist applies"]
        return []


def build(config: Config, services: Services) -> AllowlistCheck:
    settings = services.settings
    paths = [settings.resolve_path(p) for p in config.site_files]
    site = SiteList(paths, config)
    if services.redis is None:
        log.warning("allowlist: no Redis configured; only the site-wide list applies")
        return AllowlistCheck(config, None, site)
    return AllowlistCheck(config, AllowlistStore(services.redis, config), site)
