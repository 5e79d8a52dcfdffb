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

from filterd.checks.base import Done, Services, Started
from filterd.dns.engine import (
    Engine,
    EngineCheck,
    Evaluation,
    Subject,
    domain_subject,
    engine_for,
    ip_subject,
)
from filterd.dns.lists import CodeRule, ListConfig, ResolverSettings, spamhaus_dbl
from filterd.dns.resolver import IPV4_RE
from filterd.mail.links import registered_domain
from filterd.settings import Settings
from filterd.types import Envelope, Finding

SECTION = "dnsbl"
_UNAVAILABLE_MEMO_SECONDS = 10.0
# Transactions whose MAIL FROM lookups wait for their first RCPT, at most.
_MAX_PREFETCHED = 4096

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


def memo_valid(memo: tuple[float, tuple[Finding, ...]] | None) -> bool:
    return memo is not None and memo[0] > time.monotonic()


# The IPv4 ones as (network, mask) integers: most clients are IPv4, and this
# test costs ~1 us where ipaddress objects cost ~8 us per transaction.
_PRIVATE_V4 = tuple(
    (int(net.network_address), int(net.netmask)) for net in _PRIVATE_NETS if net.version == 4
)


def _is_private(address: str) -> bool:
    if IPV4_RE.fullmatch(address):
        a, b, c, d = address.split(".")
        value = int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)
        return any(value & mask == net for net, mask in _PRIVATE_V4)
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
        # Lookups sent at MAIL FROM, by id() of the transaction's envelope (kept with it).
        self._prefetched: OrderedDict[int, tuple[Envelope, _Lookups]] = OrderedDict()

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
        started = self.start_recipient(envelope, recipient)
        return started.collect(time.monotonic() + self.config.budget)

    def start_recipient(self, envelope: Envelope, recipient: str) -> Started:
        """Send this transaction's lookups (unless a recent RCPT of it has the findings).

        Run on the connection's thread by the pipeline: sending never blocks and
        ``collect`` waits no longer than the deadline it is given.
        """
        if not self.config.enabled or not self.engine.lists:
            return Done()
        key = (envelope.client_ip, envelope.helo, envelope.mail_from.lower(),
               bool(envelope.auth_user))  # fmt: skip
        with self._lock:
            prefetched = self._prefetched.pop(id(envelope), None)
            memo = self._memo.get(key)
        if prefetched is not None and (prefetched[0] is not envelope or memo_valid(memo)):
            prefetched[1].close()  # a stale entry, or a later RCPT of this transaction
            prefetched = None
        if memo is not None and memo_valid(memo):
            self.engine.count("transaction_cache_hits")
            return Done(list(memo[1]))
        if prefetched is not None:
            self.engine.count("prefetched")
            prefetched[1].restart()  # the budget counts from this RCPT
            return prefetched[1]
        evaluation = self.engine.start(self.subjects(envelope))
        return _Lookups(self, key, evaluation)

    def prefetch(self, envelope: Envelope) -> Started | None:
        """At MAIL FROM: send the transaction's lookups so that its first RCPT finds answers.

        MAIL FROM is a no-reply event (Postfix does not wait for us), so the DNS
        round trip overlaps the client's RCPT command. The first ``start_recipient``
        with this very envelope takes the lookups over; the caller closes the
        returned handle when the transaction ends (a no-op once collected), so a
        transaction whose RCPTs never reach us leaves no socket behind.
        """
        if not self.config.enabled or not self.engine.lists:
            return None
        key = (envelope.client_ip, envelope.helo, envelope.mail_from.lower(),
               bool(envelope.auth_user))  # fmt: skip
        with self._lock:
            if memo_valid(self._memo.get(key)):
                return None
        # Not shared with other threads' identical queries: nobody may wait on
        # lookups that are read only when this client sends its RCPT.
        evaluation = self.engine.start(self.subjects(envelope), share=False)
        lookups = _Lookups(self, key, evaluation, envelope)
        evicted: list[_Lookups] = []
        with self._lock:
            self._prefetched[id(envelope)] = (envelope, lookups)
            while len(self._prefetched) > _MAX_PREFETCHED:  # never closed: bounded anyway
                evicted.append(self._prefetched.popitem(last=False)[1][1])
        for stale in evicted:  # outside the lock: close() takes it
            stale.close()
        return lookups

    def _remember(self, key: tuple[Any, ...], findings: tuple[Finding, ...]) -> None:
        keep = self.config.transaction_cache_seconds
        if keep <= 0:
            return  # a memo that expires as it is stored is never read
        if any(f.unchecked for f in findings):
            # Long enough for the other RCPTs of this transaction, short enough
            # that the next transaction asks a recovered list again.
            keep = min(keep, _UNAVAILABLE_MEMO_SECONDS)
        with self._lock:
            self._memo[key] = (time.monotonic() + keep, findings)
            self._memo.move_to_end(key)
            while len(self._memo) > 4096:
                self._memo.popitem(last=False)


class _Lookups:
    """One transaction's lookups on the wire; collecting them fills the transaction memo."""

    def __init__(
        self,
        check: DnsblCheck,
        key: tuple[Any, ...],
        evaluation: Evaluation,
        envelope: Envelope | None = None,
    ) -> None:
        self.check = check
        self.key = key
        self.evaluation = evaluation
        self.envelope = envelope  # set when prefetched at MAIL FROM
        self.restart()

    def restart(self) -> None:
        self.deadline = time.monotonic() + self.check.config.budget

    def collect(self, deadline: float) -> Sequence[Finding]:
        findings = tuple(self.evaluation.finish(min(deadline, self.deadline)))
        self.check._remember(self.key, findings)
        return list(findings)

    def close(self) -> None:
        self.evaluation.close()
        if self.envelope is not None:
            with self.check._lock:
                entry = self.check._prefetched.get(id(self.envelope))
                if entry is not None and entry[1] is self:
                    del self.check._prefetched[id(self.envelope)]


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
