"""Turns names to look up into findings: shared by the dnsbl and uribl checks.

The engine maps each subject (client IP, HELO, sender domain, From: domain,
link domains) onto the lists that serve it, looks every query name up once,
concurrently, within a budget, and reads the answers with each list's rules.
It reports evidence only: a weighted SCORE finding per listing, and a
zero-score ``<PREFIX>_UNAVAILABLE`` finding per list that could not answer
(timeout, SERVFAIL, error return code), which the policy ignores: fail open.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from filterd.addresses import parse_nameservers
from filterd.dns.lists import CodeRule, CompiledList, ResolverKeys, ResolverSettings
from filterd.dns.resolver import Answer, DnsblResolver, Lookups, reverse_ip
from filterd.types import Effect, Finding, SmtpReply

log = logging.getLogger(__name__)

# How each identity is named in the SMTP reply (Postfix's wording where it has one).
_REPLY_CLASS = {
    "client": "Service unavailable; Client host",
    "helo": "Service unavailable; Helo command",
    "sender": "Service unavailable; Sender address",
    "from": "Message content rejected; From header domain",
    "body": "Message content rejected; link domain",
}
# Subjects of these targets are reported together: many listed links in one
# message are one piece of evidence per list and rule, not one per link.
_AGGREGATED = frozenset({"body"})
# Longest name DNS carries (253 characters in text form, 255 octets on the wire).
_MAX_QNAME = 253


@dataclass(frozen=True)
class Subject:
    """One identity to check: ``name`` as shown, ``label`` as put before the zone."""

    target: str
    name: str
    label: str
    ipv6: bool = False


def ip_subject(target: str, address: str) -> Subject | None:
    label = reverse_ip(address)
    if label is None:
        return None
    return Subject(target, address, label, ipv6=label.count(".") > 3)


def domain_subject(target: str, domain: str) -> Subject:
    return Subject(target, domain, domain)


def build_resolver(config: ResolverKeys) -> DnsblResolver:
    return DnsblResolver(
        parse_nameservers(config.nameservers),
        query_timeout=config.query_timeout,
        cache_max_entries=config.cache_max_entries,
        cache_max_ttl=config.cache_max_ttl,
        cache_negative_ttl=config.cache_negative_ttl,
        max_parallel=config.max_parallel,
        breaker_failures=config.breaker_failures,
        breaker_seconds=config.breaker_seconds,
        breaker_probe_seconds=config.breaker_probe_seconds,
    )


class Engine:
    """Lists + resolver -> findings, with counters for ``stats()``."""

    def __init__(
        self,
        config: ResolverSettings,
        check: str,
        prefix: str,
        resolver: DnsblResolver | None = None,
    ) -> None:
        self.config = config
        self.check = check
        self.prefix = prefix
        self.lists = [CompiledList(item) for item in config.lists if item.enabled]
        # A shared resolver belongs to the services that built it; only our own is closed here.
        self._owns_resolver = resolver is None
        self.resolver = resolver or build_resolver(config)
        self._counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._owns_resolver:
            self.resolver.close()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    def stats(self) -> dict[str, int]:
        with self._lock:
            data = dict(self._counters)
        data.update({f"resolver_{k}": v for k, v in self.resolver.stats().items()})
        return data

    def serves(self, target: str) -> bool:
        return any(item.serves(target) for item in self.lists)

    def evaluate(self, subjects: Sequence[Subject], budget: float) -> list[Finding]:
        """Look every subject up on every list that serves it; one call, one budget."""
        return self.start(subjects).finish(time.monotonic() + budget)

    def start(self, subjects: Sequence[Subject], share: bool = True) -> Evaluation:
        """Send every lookup now; ``Evaluation.finish`` reads the answers into findings.

        Between the two the calling thread is free (the end-of-message pipeline runs
        the CPU-bound checks there while the answers travel). ``share``: see
        ``DnsblResolver.start_many``.
        """
        plan: dict[tuple[str, str], list[Subject]] = {}
        by_key: dict[tuple[str, str], CompiledList] = {}
        for item in self.lists:
            for subject in subjects:
                if not item.serves(subject.target) or (subject.ipv6 and not item.config.ipv6):
                    continue
                qname = f"{subject.label}.{item.zone}"
                if len(qname) > _MAX_QNAME:
                    self.count("skipped_too_long")
                    continue
                key = (item.id, qname)
                by_key[key] = item
                plan.setdefault(key, []).append(subject)
        if not plan:
            return Evaluation(self, plan, by_key, None)
        lookups = self.resolver.start_many(
            [(by_key[key].zone, key[1]) for key in plan], share=share
        )
        return Evaluation(self, plan, by_key, lookups)

    def _findings(
        self,
        plan: dict[tuple[str, str], list[Subject]],
        by_key: dict[tuple[str, str], CompiledList],
        answers: dict[str, Answer],
    ) -> list[Finding]:
        findings: list[Finding] = []
        grouped: dict[tuple[str, str, str], tuple[CompiledList, CodeRule, list[str], list[Subject]]]
        grouped = {}
        unavailable: dict[str, tuple[CompiledList, list[str]]] = {}
        # Counted here and added under the lock once per call, not once per lookup.
        counts: Counter[str] = Counter()
        for key, subs in plan.items():
            item = by_key[key]
            answer = answers[key[1]]
            counts["lookups"] += 1
            problem = self._read(item, answer, subs, grouped, counts)
            if problem:
                unavailable.setdefault(item.id, (item, []))[1].append(problem)
        if unavailable:
            counts["unavailable"] = len(unavailable)
        with self._lock:
            self._counters.update(counts)
        for item, rule, codes, subs in grouped.values():
            findings.append(self._hit(item, rule, codes, subs))
        for item, problems in unavailable.values():
            reasons = sorted(set(problems))
            # A list in back-off was already reported when it went down.
            quiet = all(reason.endswith("(back-off)") for reason in reasons)
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "%s: list %s unavailable: %s (failing open)",
                self.check,
                item.zone,
                "; ".join(reasons),
            )
            findings.append(
                Finding(
                    check=self.check,
                    code=f"{self.prefix}_UNAVAILABLE",
                    detail=f"{item.zone}: {'; '.join(reasons)}"[:300],
                    score=0.0,
                    effect=Effect.SCORE,
                    bypassable=True,
                    unchecked=True,
                )
            )
        return findings

    def _read(
        self,
        item: CompiledList,
        answer: Answer,
        subs: list[Subject],
        grouped: dict[
            tuple[str, str, str], tuple[CompiledList, CodeRule, list[str], list[Subject]]
        ],
        counts: Counter[str],
    ) -> str:
        """Add hits of one answer to ``grouped``, counters to ``counts``; return a problem or ""."""
        if answer.status == "error":
            if answer.error.endswith("(back-off)"):
                counts["skipped_backoff"] += 1
            elif "timeout" in answer.error or "budget" in answer.error:
                counts["timeouts"] += 1
            else:
                counts["failures"] += 1
            return answer.error
        if answer.status == "nxdomain":
            counts["unlisted"] += 1
            return ""
        match = item.classify(answer.addresses)
        if match.verdict == "error":
            counts["list_errors"] += 1
            return match.error
        if match.unmatched:
            counts["unmatched_codes"] += 1
            log.info(
                "%s: %s answered unknown code(s) %s; ignored",
                self.check,
                item.zone,
                ",".join(match.unmatched),
            )
        if match.verdict == "unlisted":
            counts["unlisted"] += 1
            return ""
        counts["listed"] += 1
        for rule, codes in match.hits:
            for subject in subs:
                group = "*" if subject.target in _AGGREGATED else subject.label
                key = (item.id, rule.name, group)
                entry = grouped.setdefault(key, (item, rule, [], []))
                entry[2].extend(c for c in codes if c not in entry[2])
                if subject not in entry[3]:
                    entry[3].append(subject)
        return ""

    def _hit(
        self, item: CompiledList, rule: CodeRule, codes: list[str], subs: list[Subject]
    ) -> Finding:
        targets = list(dict.fromkeys(s.target for s in subs))
        first = subs[0]
        shown = f"[{first.name}]"
        if len(subs) > 1 and first.target in _AGGREGATED:
            shown += f" and {len(subs) - 1} more"
        reply = None
        if rule.weight > 0:
            phrase = _REPLY_CLASS.get(first.target, "Service unavailable;")
            reply = SmtpReply(554, "5.7.1", f"{phrase} {shown} blocked using {item.zone}")
        what = ", ".join(targets)
        if first.target in _AGGREGATED:
            what = f"{what}: {len(subs)} domain{'s' if len(subs) > 1 else ''}"
        return Finding(
            check=self.check,
            code=f"{self.prefix}_{item.id}_{rule.name}",
            detail=f"{item.zone} {','.join(codes)} ({what})",
            score=rule.weight,
            effect=Effect.SCORE,
            reply=reply,
            bypassable=True,
        )

    def selftest(self, timeout: float | None = None) -> list[str]:
        """RFC 5782 checks per list: the test entry is listed, the invalid entry is not."""
        queries: list[tuple[CompiledList, str, str, bool]] = []
        for item in self.lists:
            entry = item.config.effective_test_entry
            if item.type == "ip":
                positive, negative = reverse_ip(entry), reverse_ip("127.0.0.1")
            else:
                positive, negative = entry.rstrip(".").lower(), "invalid"
            if positive:
                queries.append((item, entry, f"{positive}.{item.zone}", True))
            if negative:
                shown = "127.0.0.1" if item.type == "ip" else "invalid"
                queries.append((item, shown, f"{negative}.{item.zone}", False))
        if not queries:
            return []
        budget = timeout if timeout is not None else self.config.query_timeout + 0.5
        answers = self.resolver.lookup_many([(q[0].zone, q[2]) for q in queries], budget)
        problems: list[str] = []
        for item, entry, qname, must_list in queries:
            answer = answers[qname]
            where = f"{self.check} list {item.id} ({item.zone})"
            if answer.status == "error":
                if must_list:
                    problems.append(f"{where}: test entry {entry} got no answer: {answer.error}")
                continue
            match = item.classify(answer.addresses)
            if match.verdict == "error":
                if must_list:
                    problems.append(
                        f"{where}: answers {match.error} for test entry {entry}: the list "
                        "refuses this resolver (public forwarder, over quota or wrong zone)"
                    )
            elif must_list and match.verdict != "listed":
                problems.append(
                    f"{where}: test entry {entry} is not listed: wrong zone name, or the "
                    "resolver does not reach the list"
                )
            elif not must_list and match.verdict == "listed":
                problems.append(
                    f"{where}: lists {entry}, which no list may list: it would block everything"
                )
        return problems


def engine_for(
    config: ResolverSettings, check: str, prefix: str, services: object | None
) -> Engine:
    """The check's engine on the shared resolver, or on its own for old-style sections.

    ``services`` is a ``filterd.checks.base.Services`` (typed loosely: this layer sits
    below the checks). Without one (tools, tests building a check alone) or when the
    section sets resolver keys itself, the engine gets a resolver from its section.
    """
    shared = getattr(services, "resolver", None)
    own = config.own_resolver_keys()
    if own and shared is not None:
        log.warning(
            "[%s] %s: deprecated here, set them once in [dns]; this check keeps its own resolver",
            check,
            ", ".join(own),
        )
    if own or not isinstance(shared, DnsblResolver):
        return Engine(config, check=check, prefix=prefix)
    return Engine(config, check=check, prefix=prefix, resolver=shared)


class Evaluation:
    """Lookups on the wire for one ``Engine.start``; ``finish`` once, or ``close``."""

    def __init__(
        self,
        engine: Engine,
        plan: dict[tuple[str, str], list[Subject]],
        by_key: dict[tuple[str, str], CompiledList],
        lookups: Lookups | None,
    ) -> None:
        self._engine = engine
        self._plan = plan
        self._by_key = by_key
        self._lookups = lookups

    def finish(self, deadline: float) -> list[Finding]:
        """Findings from the answers that arrive before ``deadline`` (time.monotonic)."""
        if self._lookups is None:
            return []
        lookups, self._lookups = self._lookups, None
        answers = lookups.collect(deadline)
        return self._engine._findings(self._plan, self._by_key, answers)

    def close(self) -> None:
        """Abandon the lookups (the message was decided without them)."""
        if self._lookups is not None:
            self._lookups.close()
            self._lookups = None


class EngineCheck:
    """What the RCPT-time and end-of-message list checks share around their Engine."""

    engine: Engine
    config: ResolverSettings

    def close(self) -> None:
        self.engine.close()

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    def selftest(self) -> list[str]:
        return self.engine.selftest() if self.config.enabled else []
