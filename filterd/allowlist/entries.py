"""Entries and mailboxes: parsing, validation and the one canonical form.

Every entry is stored and compared in its canonical text so that matching is a
set-membership test (see ``match.py``), never a scan with patterns:

- ``local@domain``   an exact sender address (local part compared case-insensitively);
- ``*@domain``       every sender of that domain (not its subdomains);
- ``*@*.domain``     every sender of a *strict* subdomain (``a.b.domain``, not ``domain``);
- ``192.0.2.7`` / ``192.0.2.0/24`` / ``2001:db8::/48``  SMTP client addresses.

Domains are canonical in ASCII: lower case, IDN labels as punycode
(``münchen.de`` -> ``xn--mnchen-3ya.de``), punycode labels re-normalised, so a
unicode entry matches a punycode sender and the other way round. Mapping is
NFKC + lower case, which keeps ``ß`` (IDNA 2008 / UTS 46 non-transitional, as
browsers and mail clients do today); the full IDNA 2008 validity tables are
not applied.

Wildcards exist only in the two domain forms above; quoted local parts and
address literals (``user@[192.0.2.1]``) are refused, as is ``*`` inside a
local part. Domain entries for a public suffix (``*@com``, ``*@*.co.uk``) are
refused: they would allow unrelated owners.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

    from filterd.allowlist.config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 5322 atext (without "*", which is reserved for the wildcard) plus ".".
_LOCAL_ASCII = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'+-/=?^_`{|}~."
)
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


class EntryError(ValueError):
    """An entry, mailbox or domain that cannot be used; the text says why and how to fix it."""


class Kind(StrEnum):
    ADDRESS = "address"
    DOMAIN = "domain"
    SUBDOMAIN = "subdomain"
    IP = "ip"
    CIDR = "cidr"

    @property
    def label(self) -> str:
        return f"{self.value}-entry"

    @property
    def forgeable(self) -> bool:
        """Address-based kinds trust the envelope sender; IP kinds cannot be forged at our hop."""
        return self in (Kind.ADDRESS, Kind.DOMAIN, Kind.SUBDOMAIN)


@dataclass(frozen=True)
class Entry:
    """One canonical entry."""

    text: str
    kind: Kind

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Target:
    """Whose list: a mailbox (``alice@example.org``) or a hosted domain (``@example.org``)."""

    scope: str  # "mailbox" or "domain"
    name: str  # canonical mailbox, or canonical domain

    @property
    def key(self) -> str:
        """The text the API token is computed over and lists are named by."""
        return self.name if self.scope == "mailbox" else f"@{self.name}"

    def __str__(self) -> str:
        return self.key


def kind_of(canonical: str) -> Kind:
    """The kind of an already canonical entry (as stored)."""
    if canonical.startswith("*@*."):
        return Kind.SUBDOMAIN
    if canonical.startswith("*@"):
        return Kind.DOMAIN
    if "@" in canonical:
        return Kind.ADDRESS
    return Kind.CIDR if "/" in canonical else Kind.IP


def _psl() -> PublicSuffixList:
    from filterd.mail.psl import psl  # the one instance of the process

    return psl()


def is_public_suffix(domain: str) -> bool:
    return bool(_psl().is_public(domain))


def organizational_domain(domain: str) -> str:
    """The registrable domain (``mail.example.co.uk`` -> ``example.co.uk``), for alignment."""
    return _psl().privatesuffix(domain) or domain


def _clean(text: object, limit: int, what: str) -> str:
    """Type, length, control and whitespace checks shared by every input."""
    if not isinstance(text, str):
        raise EntryError(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > limit * 4 + 16:
        raise EntryError(f"{what} is {len(text)} characters long; the limit is {limit}")
    text = text.strip()
    if not text:
        raise EntryError(f"{what} is empty")
    if len(text) > limit:
        raise EntryError(f"{what} is {len(text)} characters long; the limit is {limit}")
    for pos, char in enumerate(text, 1):
        category = unicodedata.category(char)
        if category in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise EntryError(
                f"{what} {_show(text)} contains a control or invisible character "
                f"(U+{ord(char):04X}) at position {pos}"
            )
        if char.isspace():
            raise EntryError(
                f"{what} {_show(text)} contains whitespace at position {pos}; give one entry "
                "per argument or line"
            )
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
        if not text:
            raise EntryError(f"{what} is empty")
    return text


def _show(text: str) -> str:
    """Quote user input for an error message, safely and briefly."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    return repr(shown)


def _label(label: str, domain: str, lenient: bool) -> str:
    if not label:
        raise EntryError(f"domain {_show(domain)} has an empty label (two dots, or a leading dot)")
    if label.isascii():
        label = label.lower()
        if label.startswith("xn--"):
            try:
                decoded = label[4:].encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                raise EntryError(
                    f"domain {_show(domain)}: {label!r} is not valid punycode"
                ) from None
            if decoded.isascii():
                raise EntryError(f"domain {_show(domain)}: {label!r} is not a valid IDN label")
            return _unicode_label(decoded, domain)
        allowed = _LDH | {"_"} if lenient else _LDH
        bad = next((c for c in label if c not in allowed), None)
        if bad is not None:
            raise EntryError(f"domain {_show(domain)} contains {bad!r}, not allowed in a host name")
        if label.startswith("-") or label.endswith("-"):
            raise EntryError(f"domain {_show(domain)}: a label cannot start or end with '-'")
        if len(label) > 63:
            raise EntryError(f"domain {_show(domain)}: a label is longer than 63 characters")
        return label
    return _unicode_label(label, domain)


def _unicode_label(label: str, domain: str) -> str:
    label = unicodedata.normalize("NFKC", label).lower()
    if label.isascii():
        return _label(label, domain, lenient=False)
    for char in label:
        if char != "-" and unicodedata.category(char)[0] not in ("L", "M", "N"):
            raise EntryError(f"domain {_show(domain)} contains {char!r}, not allowed in a domain")
    if label.startswith("-") or label.endswith("-"):
        raise EntryError(f"domain {_show(domain)}: a label cannot start or end with '-'")
    try:
        encoded = "xn--" + label.encode("punycode").decode("ascii")
    except UnicodeError:
        raise EntryError(f"domain {_show(domain)} cannot be encoded as punycode") from None
    if len(encoded) > 63:
        raise EntryError(
            f"domain {_show(domain)}: a label is longer than 63 characters in punycode"
        )
    return encoded


def canonical_domain(text: str, lenient: bool = False) -> str:
    """ASCII canonical form of a domain name; ``lenient`` accepts ``_`` (for senders)."""
    domain = text.translate(_DOTS)
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain:
        raise EntryError("missing domain after '@'")
    if domain.startswith("["):
        raise EntryError(
            f"address literals like {_show(text)} are not supported; allow the client IP instead"
        )
    if "*" in domain:
        raise EntryError(
            f"wildcard '*' in domain {_show(text)}: write *@domain or *@*.domain "
            "('*.' only as the first label, with '*' as the local part)"
        )
    labels = [_label(label, text, lenient) for label in domain.split(".")]
    result = ".".join(labels)
    if len(result) > 253:
        raise EntryError(f"domain {_show(text)} is longer than 253 characters")
    if all(label.isdigit() for label in labels):
        raise EntryError(f"{_show(text)} looks like an IP address, not a domain")
    return result


def _fold(text: str) -> str:
    # lower(), not casefold(): casefold turns a legitimate "ß" into "ss".
    return unicodedata.normalize("NFKC", text.lower()).lower()


def _folds_to_ascii(char: str) -> bool:
    """True for a non-ASCII character that NFKC or lower-casing turns (partly) into ASCII.

    The Kelvin sign K (U+212A) lower-cases to ``k``, long s to ``s``, fullwidth
    letters NFKC to ASCII: left in, they would fold a different address onto
    another user's list (``\u212aen@`` onto ``ken@``). Such characters have no
    legitimate use in a mailbox name, so they are refused, not folded.
    """
    forms = _fold(char) + unicodedata.normalize("NFKC", char) + unicodedata.normalize("NFC", char)
    return any(c.isascii() for c in forms)


def _confusable_local(local: str) -> bool:
    return any(not c.isascii() and _folds_to_ascii(c) for c in local)


def _local(local: str, full: str, what: str) -> str:
    if not local:
        raise EntryError(
            f"{what} {_show(full)} has no local part before '@' (a whole domain is *@domain)"
        )
    if "*" in local:
        raise EntryError(
            f"wildcard '*' inside the local part of {_show(full)}: only *@domain or "
            "*@*.domain are allowed"
        )
    for char in local:  # before NFC, which already turns the Kelvin sign into "K"
        if not char.isascii() and _folds_to_ascii(char):
            raise EntryError(
                f"{what} {_show(full)}: {char!r} (U+{ord(char):04X}) would be read as "
                f"{_fold(char)!r}; write the address in plain ASCII"
            )
    local = unicodedata.normalize("NFC", local)
    for char in local:
        if char.isascii() and char not in _LOCAL_ASCII:
            hint = " (quoted local parts are not supported)" if char in '"\\ ' else ""
            raise EntryError(f"{what} {_show(full)}: {char!r} is not allowed in a local part{hint}")
    if len(local.encode("utf-8")) > 64:
        raise EntryError(f"{what} {_show(full)}: the local part is longer than 64 octets")
    return local


def _split_address(text: str, what: str) -> tuple[str, str]:
    local, _, domain = text.rpartition("@")
    if "@" in local:
        raise EntryError(f"{what} {_show(text)} has more than one '@'")
    if not domain:
        raise EntryError(f"{what} {_show(text)} has no domain after '@'")
    return local, domain


def _network(text: str, config: Config) -> Entry:
    if "%" in text:
        raise EntryError(f"IP address {_show(text)}: zone identifiers (%...) are not allowed")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            wide = ipaddress.ip_network(text, strict=False)
            raise EntryError(
                f"{_show(text)} has host bits set; the range is {wide} (or give the single address)"
            ) from None
        raise EntryError(f"bad IP address or CIDR range {_show(text)}: {exc}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_V4):
        v4 = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        network = ipaddress.IPv4Network(f"{v4}/{network.prefixlen - 96}")
    minimum = config.min_ipv4_prefix if network.version == 4 else config.min_ipv6_prefix
    if network.prefixlen < minimum:
        raise EntryError(
            f"{_show(text)}: a /{network.prefixlen} range is too wide "
            f"(IPv{network.version} ranges must be /{minimum} or narrower)"
        )
    if network.prefixlen == network.max_prefixlen:
        return Entry(str(network.network_address), Kind.IP)
    return Entry(str(network), Kind.CIDR)


def parse_entry(text: object, config: Config) -> Entry:
    """Validate one entry and return its canonical form; raises EntryError."""
    text = _clean(text, config.max_entry_length, "entry")
    if "@" not in text:
        if "/" in text or ":" in text or all(c.isdigit() or c == "." for c in text):
            return _network(text, config)
        if "." in text and "*" not in text:
            raise EntryError(
                f"{_show(text)} is neither an address nor an IP address; a whole domain is "
                f"written *@{text} (or *@*.{text} for its subdomains)"
            )
        if "*" in text:
            raise EntryError(f"wildcard in {_show(text)}: write *@domain or *@*.domain for domains")
        raise EntryError(f"{_show(text)} is neither an address (local@domain) nor an IP/CIDR")
    local, domain = _split_address(text, "entry")
    if local == "*":
        if domain == "*":
            raise EntryError("*@* would allow every sender; it is not allowed")
        sub = domain.startswith("*.")
        base = canonical_domain(domain[2:] if sub else domain)
        if is_public_suffix(base):
            raise EntryError(
                f"{base} is a public suffix: {'*@*.' if sub else '*@'}{base} would allow "
                "senders of unrelated owners"
            )
        return Entry(f"*@*.{base}", Kind.SUBDOMAIN) if sub else Entry(f"*@{base}", Kind.DOMAIN)
    local = _local(local, text, "address").lower()
    return Entry(f"{local}@{canonical_domain(domain)}", Kind.ADDRESS)


def canonical_mailbox(text: object, config: Config) -> str:
    """A recipient as the provider names the mailbox: sub-address folded, case per config."""
    text = _clean(text, config.max_entry_length, "mailbox")
    local, domain = _split_address(text, "mailbox")
    if local == "*" or "*" in domain:
        raise EntryError(f"mailbox {_show(text)} cannot contain wildcards")
    local = _local(local, text, "mailbox")
    separators = config.subaddress_separators
    if separators:
        cut = min((i for i, c in enumerate(local) if c in separators), default=-1)
        if cut > 0:
            local = local[:cut]
    if config.lowercase_local_part:
        local = local.lower()
    return f"{local}@{canonical_domain(domain)}"


def parse_target(text: object, config: Config) -> Target:
    """``alice@example.org`` names a mailbox's list, ``@example.org`` a hosted domain's list."""
    if isinstance(text, str) and text.strip().startswith("@"):
        name = _clean(text, config.max_entry_length, "domain")[1:]
        if "@" in name:
            raise EntryError(f"domain list {_show(text)} has more than one '@'")
        return Target("domain", canonical_domain(name))
    return Target("mailbox", canonical_mailbox(text, config))


def sender_address(text: str) -> tuple[str, str] | None:
    """Lenient canonical (address, domain) of an envelope or header sender, for matching.

    Senders are what other servers send, so this never raises: anything that
    cannot be read as an address gives None (only IP entries can then match).
    The sub-address is *not* folded: an address entry means that exact sender.
    """
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, domain = text.rpartition("@")
    if not at or not local or len(text) > 512:
        return None
    if _confusable_local(local):
        return None  # would fold onto another address's entries
    try:
        canonical = canonical_domain(domain, lenient=True)
    except EntryError:
        return None
    return f"{unicodedata.normalize('NFC', local).lower()}@{canonical}", canonical


def client_ip(text: str | None) -> IPAddress | None:
    """The SMTP client address as milters see it (``IPv6:`` prefix, brackets) or None."""
    if not text:
        return None
    text = text.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
