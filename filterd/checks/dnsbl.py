"""RCPT-time blocklist check: the client IP (DNSBL), the HELO name and the
envelope sender domain (RHSBL).

Reputation is decided per recipient at RCPT time, so that a recipient whose
allowlist exempts the sender still gets the mail while others refuse it: this
check only reports weighted evidence, the policy sums it against its threshold
(postscreen's ``postscreen_dnsbl_sites`` weights + threshold) and drops it for
exempt recipients. All lookups of one transaction happen once, on the first
RCPT; later recipients reuse the findings.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from filterd.checks.base import Services
from filterd.dns.engine import Engine, EngineCheck, Subject, domain_subject, engine_for, ip_subject
from filterd.dns.lists import CodeRule, ListConfig, ResolverSettings, spamhaus_dbl
from filterd.mail.links import registered_domain
from filterd.settings import Settings
from filterd.types import Envelope, Finding

SECTION = "dnsbl"
_UNAVAILABLE_MEMO_SECONDS = 10.0

# Addresses no public list can say anything about: RFC 1918, CGN, loopback,
# link-local, ULA, unspecified, multicast. Documentation ranges (192.0.2.0/24,
# 2001:db8::/32) are deliberately absent so tests can present them via XCLIENT.
_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
    )
)  # fmt: skip

# Spamhaus ZEN / DBL return codes: https://docs.spamhaus.com (SBL 2, CSS 3, XBL 4-7,
# DROP 9, PBL 10-11; DBL 127.0.1.x; 127.255.255.x and 127.0.1.255 are errors).
DEFAULT_LISTS = [
    ListConfig(
        id="ZEN",
        zone="zen.spamhaus.org",
        type="ip",
        rules=[
            CodeRule(name="SBL", match="127.0.0.[2;3;9]", weight=10),
            CodeRule(name="XBL", match="127.0.0.[4..7]", weight=10),
            CodeRule(name="PBL", match="127.0.0.[10;11]", weight=3),
        ],
        errors=["127.255.255.[0..255]"],
    ),
    spamhaus_dbl(["helo", "sender"]),
]


class Config(ResolverSettings):
    budget: float = 3.0
    # No lookups for RFC 1918/loopback/link-local clients: no list knows them.
    skip_private: bool = True
    # Authenticated submitters skip the IP lists (PBL lists their home IPs).
    skip_authenticated: bool = True
    lists: list[ListConfig] = DEFAULT_LISTS
    # Findings of one transaction are reused by its later RCPTs for this long.
    transaction_cache_seconds: float = 120.0


def _is_private(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _PRIVATE_NETS if net.version == ip.version)


def _domain(name: str | None) -> str | None:
    return registered_domain(name) if name else None


class DnsblCheck(EngineCheck):
    config: Config

    name = "dnsbl"
    bypassable = True
    gate = False

    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self.config = config
        self.on_failure: Literal["tempfail", "accept"] = config.on_failure
        self.engine = engine or Engine(config, check="dnsbl", prefix="DNSBL")
        self._memo: OrderedDict[tuple[Any, ...], tuple[float, tuple[Finding, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def subjects(self, envelope: Envelope) -> list[Subject]:
        """What this transaction exposes to the lists, after the skip rules."""
        result: list[Subject] = []
        ip = envelope.client_ip
        if ip and not (self.config.skip_authenticated and envelope.auth_user):
            if self.config.skip_private and _is_private(ip):
                self.engine.count("skipped_private")
            else:
                subject = ip_subject("client", ip)
                if subject is not None:
                    result.append(subject)
        elif ip:
            self.engine.count("skipped_authenticated")
        helo = _domain(envelope.helo)
        if helo:
            result.append(domain_subject("helo", helo))
        sender = _domain(envelope.sender_domain)
        if sender:
            result.append(domain_subject("sender", sender))
        return result

    def check_recipient(self, envelope: Envelope, recipient: str) -> Sequence[Finding]:
        """Evidence about the transaction; the same for every recipient of it."""
        if not self.config.enabled or not self.engine.lists:
            return []
        key = (envelope.client_ip, envelope.helo, envelope.mail_from.lower(),
               bool(envelope.auth_user))  # fmt: skip
        now = time.monotonic()
        with self._lock:
            memo = self._memo.get(key)
            if memo is not None and memo[0] > now:
                self.engine.count("transaction_cache_hits")
                return list(memo[1])
        findings = tuple(self.engine.evaluate(self.subjects(envelope), self.config.budget))
        keep = self.config.transaction_cache_seconds
        if any(f.unchecked for f in findings):
            # Long enough for the other RCPTs of this transaction, short enough
            # that the next transaction asks a recovered list again.
            keep = min(keep, _UNAVAILABLE_MEMO_SECONDS)
        with self._lock:
            self._memo[key] = (now + keep, findings)
            self._memo.move_to_end(key)
            while len(self._memo) > 4096:
                self._memo.popitem(last=False)
        return list(findings)


def build(config: Config, services: Services | None = None) -> DnsblCheck:
    engine = engine_for(config, check="dnsbl", prefix="DNSBL", services=services)
    return DnsblCheck(config, engine)


def selftest(config: Config | ResolverSettings | Settings) -> list[str]:
    """Problems with the configured lists (test entries, error codes); never raises.

    Takes a section's Config, or the whole Settings (then both [dnsbl] and
    [uribl] are checked). Meant to be logged at start-up, not to block it.
    """
    dns_keys: dict[str, Any] = {}
    if isinstance(config, Settings):
        sections = [config.sections[name] for name in ("dnsbl", "uribl") if name in config.sections]
        if "dns" in config.sections:
            dns_keys = config.section("dns").model_dump()
    else:
        sections = [config]
    problems: list[str] = []
    for section in sections:
        if not isinstance(section, ResolverSettings) or not section.enabled:
            continue
        check = "uribl" if section.__class__.__module__.endswith("uribl") else "dnsbl"
        if dns_keys and not section.own_resolver_keys():
            # Ask the way the running checks ask: through the [dns] resolver settings.
            section = section.model_copy(update=dns_keys)
        try:
            engine = Engine(section, check=check, prefix=check.upper())
        except Exception as exc:  # noqa: BLE001 - a self-test must not stop start-up
            problems.append(f"{check}: cannot build resolver: {exc}")
            continue
        try:
            problems.extend(engine.selftest())
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{check}: self-test failed: {exc}")
        finally:
            engine.close()
    return problems
