"""Blocklist definitions and return-code matching, as data from rules/.

A list is a DNS zone plus rules that say which answers count and how much, in
the notation of Postfix postscreen's ``postscreen_dnsbl_sites``
(``127.0.0.[4..7]``, ``127.0.0.[10;11]``). Answers that signal a problem with
the list itself (Spamhaus ``127.255.255.x``: public resolver, over quota) are
matched *before* listings and make the whole answer an error: counting them as
listings would refuse all mail.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import field_validator, model_validator

from filterd.addresses import AddressError, parse_nameservers
from filterd.errors import InvalidValue
from filterd.settings import Section

ListType = Literal["ip", "domain"]
Target = Literal["client", "helo", "sender", "from", "body"]
IP_TARGETS: frozenset[str] = frozenset({"client"})
DOMAIN_TARGETS: frozenset[str] = frozenset({"helo", "sender", "from", "body"})

_ID_RE = re.compile(r"^[A-Z0-9][A-Z0-9_]{0,31}$")
_OCTET = r"(\d+|\[[^\]]*\])"
_PATTERN_RE = re.compile(rf"^{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}$")
_ZONE_RE = re.compile(r"^(?=.{1,200}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9-]{1,63}$")


class PatternError(InvalidValue):
    """A return-code pattern that does not follow postscreen's notation."""


def _octet_values(text: str, pattern: str) -> frozenset[int]:
    """``7``, ``[4..7]``, ``[10;11]``, ``[2;4..6]`` -> the set of octet values."""

    def number(item: str) -> int:
        if not item.isdigit() or int(item) > 255:
            raise PatternError(f"return code {pattern!r}: {item!r} is not an octet (0-255)")
        return int(item)

    if not (text.startswith("[") and text.endswith("]")):
        return frozenset({number(text)})
    values: set[int] = set()
    for item in text[1:-1].split(";"):
        low, dots, high = item.strip().partition("..")
        if dots:
            lo, hi = number(low.strip()), number(high.strip())
            if lo > hi:
                raise PatternError(f"return code {pattern!r}: empty range {item!r}")
            values.update(range(lo, hi + 1))
        else:
            values.add(number(item.strip()))
    return frozenset(values)


@dataclass(frozen=True)
class CodePattern:
    """A compiled ``a.b.c.d`` pattern where each octet is a value set."""

    text: str
    octets: tuple[frozenset[int], ...]

    @classmethod
    def parse(cls, text: str) -> CodePattern:
        text = text.strip()
        match = _PATTERN_RE.match(text)
        if not match:
            raise PatternError(f"return code {text!r}: expected four octets like 127.0.0.[2..3]")
        return cls(text, tuple(_octet_values(p, text) for p in match.groups()))

    def matches(self, address: str) -> bool:
        parts = address.split(".")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            return False
        return all(int(p) in allowed for p, allowed in zip(parts, self.octets, strict=True))


def _check_pattern(value: str) -> str:
    try:
        CodePattern.parse(value)
    except PatternError as exc:
        raise ValueError(str(exc)) from None
    return value


def split_list(value: Any) -> Any:
    """Env overrides arrive as plain strings: accept ``"a,b"`` for a list field."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class CodeRule(Section):
    """One postscreen-style entry: answers matching ``match`` add ``weight``.

    ``name`` becomes part of the finding code: list ``ZEN`` + rule ``SBL`` ->
    ``DNSBL_ZEN_SBL``.
    """

    name: str
    match: str
    weight: float

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError(f"rule name {value!r}: use A-Z, 0-9 and _ (e.g. SBL)")
        return value

    @field_validator("match")
    @classmethod
    def _match(cls, value: str) -> str:
        return _check_pattern(value)


class ListConfig(Section):
    """One DNS blocklist zone and what its answers mean."""

    id: str
    zone: str
    type: ListType = "ip"
    # Which identities are looked up here; empty = every target of this
    # list's type that the section handles.
    targets: list[Target] = []
    rules: list[CodeRule]
    # Answers that mean "the list cannot answer you" rather than "listed".
    errors: list[str] = ["127.255.255.[0..255]"]
    # RFC 5782 test entry that must be listed; checked at start-up.
    test_entry: str = ""
    ipv6: bool = True
    enabled: bool = True

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError(f"list id {value!r}: use A-Z, 0-9 and _ (e.g. ZEN)")
        return value

    @field_validator("zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        zone = value.strip().rstrip(".").lower()
        if not _ZONE_RE.match(zone):
            raise ValueError(f"zone {value!r} is not a DNS name")
        return zone

    @field_validator("targets", "errors", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("errors")
    @classmethod
    def _errors(cls, value: list[str]) -> list[str]:
        return [_check_pattern(v) for v in value]

    @model_validator(mode="after")
    def _consistent(self) -> ListConfig:
        allowed = IP_TARGETS if self.type == "ip" else DOMAIN_TARGETS
        wrong = [t for t in self.targets if t not in allowed]
        if wrong:
            raise ValueError(
                f"list {self.id}: targets {wrong} do not fit type {self.type!r} "
                f"(allowed: {sorted(allowed)})"
            )
        if not self.rules:
            raise ValueError(f"list {self.id}: needs at least one rule")
        if self.test_entry and self.type == "ip":
            try:
                ipaddress.ip_address(self.test_entry)
            except ValueError:
                raise ValueError(
                    f"list {self.id}: test_entry {self.test_entry!r} is not an IP address"
                ) from None
        return self

    @property
    def effective_test_entry(self) -> str:
        """RFC 5782: IP lists list 127.0.0.2, domain lists list ``test``."""
        return self.test_entry or ("127.0.0.2" if self.type == "ip" else "test")


# The keys of the one resolver ([dns]); [dnsbl] and [uribl] still accept them for
# configurations written before [dns] existed (see filterd.dns.config).
RESOLVER_KEYS = (
    "nameservers",
    "query_timeout",
    "cache_max_entries",
    "cache_max_ttl",
    "cache_negative_ttl",
    "breaker_failures",
    "breaker_seconds",
    "max_parallel",
)


class ResolverKeys(Section):
    """How the DNS resolver behind both list checks asks, caches and backs off."""

    # A local recursive resolver: HOST[:PORT], comma-separated. Never a public
    # forwarder (Spamhaus answers those with 127.255.255.254).
    nameservers: str = "127.0.0.1"
    query_timeout: float = 1.5
    cache_max_entries: int = 10000
    cache_max_ttl: float = 3600.0
    # Negative answers without an SOA record are cached this long.
    cache_negative_ttl: float = 300.0
    # After this many consecutive failures a list is skipped (fail open)
    # for breaker_seconds instead of costing a timeout on every message.
    breaker_failures: int = 5
    breaker_seconds: float = 30.0
    # While open, one query per this many seconds probes the list; an answer closes it.
    breaker_probe_seconds: float = 2.0
    # Queries one lookup call keeps on the wire at once (one UDP socket each); more wait.
    max_parallel: int = 32

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: str) -> str:
        try:
            if not parse_nameservers(value):
                raise ValueError("nameservers: at least one address is needed")
        except AddressError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("nameservers", mode="before")
    @classmethod
    def _join(cls, value: Any) -> Any:
        return ",".join(value) if isinstance(value, list) else value

    @field_validator("query_timeout", "breaker_seconds", "breaker_probe_seconds")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("cache_max_entries", "max_parallel", "breaker_failures")
    @classmethod
    def _positive_int(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    def own_resolver_keys(self) -> list[str]:
        """Resolver keys this section sets itself (not inherited from [dns])."""
        return [key for key in RESOLVER_KEYS if key in self.model_fields_set]


class ResolverSettings(ResolverKeys):
    """Keys shared by the [dnsbl] and [uribl] sections."""

    enabled: bool = True
    budget: float = 3.0
    on_failure: Literal["tempfail", "accept"] = "accept"
    lists: list[ListConfig] = []

    @field_validator("budget")
    @classmethod
    def _positive_budget(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @model_validator(mode="after")
    def _unique_ids(self) -> ResolverSettings:
        ids = [item.id for item in self.lists]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"list ids must be unique, repeated: {dupes}")
        return self


Verdict = Literal["listed", "unlisted", "error"]


@dataclass(frozen=True)
class Match:
    """How one list's answer reads: which rules hit (with their codes), or why it is an error."""

    verdict: Verdict
    hits: tuple[tuple[CodeRule, tuple[str, ...]], ...] = ()
    # Addresses inside 127/8 that matched neither a rule nor an error pattern.
    unmatched: tuple[str, ...] = ()
    error_codes: tuple[str, ...] = ()
    error: str = ""


class CompiledList:
    """A ListConfig with its patterns parsed once."""

    def __init__(self, config: ListConfig) -> None:
        self.config = config
        self.id = config.id
        self.zone = config.zone
        self.type = config.type
        self._errors = [CodePattern.parse(p) for p in config.errors]
        self._rules = [(rule, CodePattern.parse(rule.match)) for rule in config.rules]

    def serves(self, target: str) -> bool:
        allowed = IP_TARGETS if self.type == "ip" else DOMAIN_TARGETS
        return target in allowed and (not self.config.targets or target in self.config.targets)

    def classify(self, addresses: tuple[str, ...]) -> Match:
        """Read an A-record answer; error codes win over any listing in it."""
        if not addresses:
            return Match("unlisted")
        errors = tuple(a for a in addresses if any(p.matches(a) for p in self._errors))
        if errors:
            return Match("error", error_codes=errors, error=f"error code {errors[0]}")
        foreign = tuple(a for a in addresses if not a.startswith("127."))
        if foreign:
            # An answer outside 127/8 is a hijacking resolver or a broken list.
            return Match("error", error_codes=foreign, error=f"answer outside 127/8 {foreign[0]}")
        hits = []
        for rule, pattern in self._rules:
            codes = tuple(a for a in addresses if pattern.matches(a))
            if codes:
                hits.append((rule, codes))
        matched = {a for _, codes in hits for a in codes}
        unmatched = tuple(a for a in addresses if a not in matched)
        return Match("listed" if hits else "unlisted", tuple(hits), unmatched)


# Spamhaus DBL as documented (return codes 127.0.1.x): shared by the RHSBL check
# at RCPT time and the URI check at end of message, which only differ in targets.
SPAMHAUS_DBL_RULES = [
    CodeRule(name="SPAM", match="127.0.1.[2..99]", weight=10),
    CodeRule(name="ABUSED", match="127.0.1.[102..199]", weight=3),
]
SPAMHAUS_DBL_ERRORS = ["127.0.1.255", "127.255.255.[0..255]"]


def spamhaus_dbl(targets: list[Target]) -> ListConfig:
    return ListConfig(
        id="DBL",
        zone="dbl.spamhaus.org",
        type="domain",
        targets=targets,
        rules=SPAMHAUS_DBL_RULES,
        errors=SPAMHAUS_DBL_ERRORS,
        test_entry="dbltest.com",
    )
