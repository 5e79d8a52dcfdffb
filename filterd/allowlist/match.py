"""Matching: a sender and client become a short list of candidate entries.

Instead of testing each of up to 1000 entries against the sender, we list the
few canonical entries that *could* match it -- the exact address, ``*@domain``,
``*@*.parent`` for each parent domain, the client IP and every CIDR block that
contains it -- and ask each list (a set) which of them it holds. That is one
SMISMEMBER per list, with at most ~170 members for an IPv6 client, whatever
the size of the list. All prefix lengths are probed, so entries stay matchable
when the configured minimum prefix changes later.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from filterd.allowlist.entries import (
    IPAddress,
    Kind,
    client_ip,
    kind_of,
    organizational_domain,
    sender_address,
)
from filterd.mail.authres import AuthResult, parse_authres

SCOPES = ("site", "domain", "mailbox")


def address_candidates(address: str | None, domain: str | None) -> list[str]:
    """Entries that match a canonical sender address (from ``sender_address``)."""
    if address is None or domain is None:
        return []
    result = [address, f"*@{domain}"]
    labels = domain.split(".")
    result.extend(f"*@*.{'.'.join(labels[i:])}" for i in range(1, len(labels)))
    return result


def _ntop(family: int, bits: int, value: int) -> str:
    """Canonical text of an address given as an int, fast (inet_ntop), as ipaddress writes it."""
    text = socket.inet_ntop(family, value.to_bytes(bits // 8, "big"))
    if family == socket.AF_INET6 and "." in text:  # inet_ntop's embedded-IPv4 forms differ
        return str(ipaddress.IPv6Address(value))
    return text


def ip_candidates(address: IPAddress | None) -> list[str]:
    """The address, then every network containing it, longest prefix first."""
    if address is None:
        return []
    bits = address.max_prefixlen
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    value = int(address)
    full = (1 << bits) - 1
    result = [str(address)]
    for prefix in range(bits - 1, -1, -1):
        network = value & (full ^ ((1 << (bits - prefix)) - 1))
        result.append(f"{_ntop(family, bits, network)}/{prefix}")
    return result


@dataclass(frozen=True)
class Probe:
    """The candidate entries for one transaction's sender and client, built once."""

    sender: str | None
    sender_domain: str | None
    client: IPAddress | None
    members: tuple[str, ...]

    @classmethod
    def build(cls, mail_from: str, client: str | None) -> Probe:
        parsed = sender_address(mail_from) if mail_from else None
        address, domain = parsed if parsed else (None, None)
        ip = client_ip(client)
        members = tuple(address_candidates(address, domain) + ip_candidates(ip))
        return cls(address, domain, ip, members)

    def hits(self, flags: Iterable[object]) -> list[str]:
        """The members an SMISMEMBER answer (one flag per member) says are present."""
        return [m for m, flag in zip(self.members, flags, strict=True) if int(flag)]  # type: ignore[call-overload]

    def hits_in(self, entries: frozenset[str]) -> list[str]:
        return [m for m in self.members if m in entries]


@dataclass(frozen=True)
class Match:
    """One entry of one list that matched."""

    scope: str  # "site", "domain" or "mailbox"
    entry: str

    @property
    def kind(self) -> Kind:
        return kind_of(self.entry)

    @property
    def detail(self) -> str:
        """Shown to admins: where and what kind, never the entry itself."""
        return f"{self.scope} {self.kind.label}"


def best(matches: Iterable[Match]) -> Match | None:
    """The strongest match: unforgeable (IP) kinds first, then site, domain, mailbox order."""
    ordered = sorted(matches, key=lambda m: (m.kind.forgeable, SCOPES.index(m.scope)))
    return ordered[0] if ordered else None


def entry_matches_address(entry: str, address: str) -> bool:
    """Does ``entry`` match this (header) address? Used for From: agreement."""
    parsed = sender_address(address)
    if parsed is None:
        return False
    return entry in address_candidates(*parsed)


# Sender verification for the strict mode (used at end of message); the header
# parser is the one in filterd.mail.authres.


def _identity_domain(value: str | None) -> str | None:
    if not value:
        return None
    from filterd.allowlist.entries import EntryError, canonical_domain

    domain = value.rpartition("@")[2]
    try:
        return canonical_domain(domain, lenient=True)
    except EntryError:
        return None


def authres_verifies(values: Iterable[str], trusted: Iterable[str], sender_domain: str) -> bool:
    """Does a trusted Authentication-Results header authenticate the sender's domain?

    Pass results only count when aligned with the envelope sender domain the
    entry matched: SPF for exactly that domain, DKIM or DMARC for the same
    organizational domain. A DMARC pass for some *other* From domain proves
    nothing about the allowlisted sender, so it does not count.
    """
    trusted_ids = {t.lower() for t in trusted}
    if not trusted_ids:
        return False
    org = organizational_domain(sender_domain)
    for value in values:
        authserv, results = parse_authres(value)
        if authserv not in trusted_ids:
            continue
        for res in results:
            if res.result != "pass":
                continue
            if res.method == "spf":
                domain = _identity_domain(res.props.get("smtp.mailfrom"))
                if domain == sender_domain:
                    return True
            elif res.method in ("dkim", "dmarc"):
                prop = "header.d" if res.method == "dkim" else "header.from"
                domain = _identity_domain(res.props.get(prop))
                if res.method == "dkim" and domain is None:
                    domain = _identity_domain(res.props.get("header.i"))
                if domain is not None and organizational_domain(domain) == org:
                    return True
    return False


__all__ = [
    "AuthResult",
    "Match",
    "Probe",
    "address_candidates",
    "authres_verifies",
    "best",
    "entry_matches_address",
    "ip_candidates",
    "parse_authres",
]
