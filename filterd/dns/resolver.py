"""A concurrent DNS lookup client for blocklists, with a bounded TTL cache.

Why not just ``dns.resolver.resolve`` per name: a message needs several lookups
and must not wait for them one after another; a burst of connections from one
host must cost one query (answers and NXDOMAINs are cached by their TTL,
concurrent identical queries share one in-flight request); and a dead list must
not add its timeout to every message, so a per-zone breaker skips a list after
repeated failures for a while. Every failure is an ``Answer`` with status
``error``, never an exception: blocklists fail open.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

log = logging.getLogger(__name__)

Status = Literal["found", "nxdomain", "error"]


@dataclass(frozen=True)
class Answer:
    """The A records for one query name, or why there are none.

    ``found``: addresses are the A records; ``nxdomain``: not listed (NXDOMAIN
    or no A record); ``error``: timeout, SERVFAIL, REFUSED, budget exhausted or
    list in back-off; ``error`` says which.
    """

    qname: str
    status: Status
    addresses: tuple[str, ...] = ()
    ttl: float = 0.0
    error: str = ""
    cached: bool = False


def reverse_ip(address: str) -> str | None:
    """The DNSBL query label for an IP (RFC 5782): reversed octets or nibbles.

    IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``, as some MTAs present
    IPv4 clients) are looked up as IPv4. None for text that is no IP.
    """
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


class TtlCache:
    """A bounded LRU of answers, each expiring after its own TTL."""

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, qname: str) -> Answer | None:
        now = self._clock()
        with self._lock:
            item = self._data.get(qname)
            if item is None:
                return None
            expires, answer = item
            if expires <= now:
                del self._data[qname]
                return None
            self._data.move_to_end(qname)
            return replace(answer, ttl=expires - now, cached=True)

    def put(self, answer: Answer) -> None:
        if answer.ttl <= 0:
            return
        with self._lock:
            self._data[answer.qname] = (self._clock() + answer.ttl, answer)
            self._data.move_to_end(answer.qname)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def _negative_ttl(response: dns.message.Message | None, default: float) -> float:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is None:
        return default
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))  # type: ignore[attr-defined]
    return default


class _Breaker:
    """Per-zone consecutive-failure counter that opens for a while, probing as it waits.

    Open means "skip this list" (fail open), which costs protection: every mail
    from a listed source passes while it lasts. So an open breaker lets one
    query through every ``probe_seconds`` (half-open probe); the first answer
    closes it, so an outage of a second or two costs seconds of skipping, not
    ``seconds``. Without an answer it stays open, and after ``seconds`` every
    query goes through again until one more failure re-opens it.
    """

    def __init__(
        self,
        failures: int,
        seconds: float,
        clock: Callable[[], float],
        probe_seconds: float = 2.0,
    ) -> None:
        self.failures = failures
        self.seconds = seconds
        self.probe_seconds = min(probe_seconds, seconds)
        self._clock = clock
        self._count: dict[str, int] = {}
        self._open_until: dict[str, float] = {}
        self._next_probe: dict[str, float] = {}
        self._lock = threading.Lock()

    def is_open(self, zone: str) -> bool:
        """True when ``zone`` must be skipped; False lets this query (or probe) through."""
        with self._lock:
            until = self._open_until.get(zone)
            if until is None:
                return False
            now = self._clock()
            if now >= until:
                # Half-open: let queries through; one more failure re-opens.
                del self._open_until[zone]
                self._next_probe.pop(zone, None)
                self._count[zone] = self.failures - 1
                return False
            if now >= self._next_probe.get(zone, until):
                # One probe per interval; its success closes the breaker.
                self._next_probe[zone] = now + self.probe_seconds
                return False
            return True

    def opened(self, zone: str) -> bool:
        """Whether ``zone`` is out now (for monitoring; unlike ``is_open``, changes nothing)."""
        with self._lock:
            until = self._open_until.get(zone)
            return until is not None and self._clock() < until

    def record(self, zone: str, ok: bool) -> bool:
        """Record an outcome; True when this failure just opened the breaker."""
        with self._lock:
            if ok:
                self._count.pop(zone, None)
                self._open_until.pop(zone, None)
                self._next_probe.pop(zone, None)
                return False
            count = self._count.get(zone, 0) + 1
            self._count[zone] = count
            if count >= self.failures and zone not in self._open_until:
                now = self._clock()
                self._open_until[zone] = now + self.seconds
                self._next_probe[zone] = now + self.probe_seconds
                return True
            return False


class DnsblResolver:
    """Concurrent, cached A-record lookups against configured nameservers.

    Thread-safe; one instance per configuration load, shared by all
    connections. ``clock`` is injectable so tests can expire cache entries
    without sleeping (the network timeouts always use real time).
    """

    def __init__(
        self,
        nameservers: list[tuple[str, int]],
        *,
        query_timeout: float = 1.5,
        cache_max_entries: int = 10000,
        cache_max_ttl: float = 3600.0,
        cache_negative_ttl: float = 300.0,
        max_parallel: int = 32,
        breaker_failures: int = 5,
        breaker_seconds: float = 30.0,
        breaker_probe_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not nameservers:
            raise ValueError("DnsblResolver needs at least one nameserver")
        self.nameservers = list(nameservers)
        self.query_timeout = query_timeout
        self.cache_max_ttl = cache_max_ttl
        self.cache_negative_ttl = cache_negative_ttl
        self._clock = clock
        self.cache = TtlCache(cache_max_entries, clock)
        self._breaker = _Breaker(breaker_failures, breaker_seconds, clock, breaker_probe_seconds)
        # Two tries per query when there is one server; one per server otherwise.
        self._try_timeout = query_timeout / max(2, len(self.nameservers))
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="dnsbl")
        self._inflight: dict[str, Future[Answer]] = {}
        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        self._closed = False

    # -- public API -------------------------------------------------------

    def breaker_open(self, zone: str) -> bool:
        """Whether the circuit breaker has ``zone`` out now (metrics); changes nothing."""
        return self._breaker.opened(zone)

    def lookup_many(self, queries: Iterable[tuple[str, str]], budget: float) -> dict[str, Answer]:
        """Look up ``(zone, qname)`` pairs concurrently within ``budget`` seconds.

        Returns an Answer for every qname; those not finished in time are
        ``error`` answers ("budget exhausted"), their queries keep running
        and still fill the cache.
        """
        deadline = time.monotonic() + budget
        results: dict[str, Answer] = {}
        pending: dict[str, Future[Answer]] = {}
        for zone, qname in queries:
            qname = qname.rstrip(".").lower()
            if qname in results or qname in pending:
                continue
            cached = self.cache.get(qname)
            if cached is not None:
                self._count("cache_hits")
                results[qname] = cached
                continue
            if self._breaker.is_open(zone):
                self._count("breaker_skips")
                results[qname] = Answer(qname, "error", error="list unavailable (back-off)")
                continue
            try:
                pending[qname] = self._submit(zone, qname)
            except RuntimeError:  # pool shut down: this resolver was closed by a reload
                results[qname] = Answer(qname, "error", error="resolver closed")
        if pending:
            wait(pending.values(), timeout=max(0.0, deadline - time.monotonic()))
        for qname, future in pending.items():
            if future.cancelled():
                results[qname] = Answer(qname, "error", error="resolver closed")
            elif future.done():
                results[qname] = future.result()
            else:
                self._count("budget_exhausted")
                results[qname] = Answer(qname, "error", error="budget exhausted")
        return results

    def lookup(self, zone: str, qname: str, budget: float | None = None) -> Answer:
        key = qname.rstrip(".").lower()
        timeout = self.query_timeout + 0.5 if budget is None else budget
        return self.lookup_many([(zone, key)], timeout)[key]

    def stats(self) -> dict[str, int]:
        """Counters since start: queries, cache hits, timeouts, failures..."""
        with self._lock:
            data = dict(self._stats)
        data["cache_entries"] = len(self.cache)
        data["cache_evictions"] = self.cache.evictions
        return data

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- internals --------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _submit(self, zone: str, qname: str) -> Future[Answer]:
        with self._lock:
            future = self._inflight.get(qname)
            if future is not None:
                self._stats["coalesced"] += 1
                return future
            self._stats["cache_misses"] += 1
            future = self._pool.submit(self._query, zone, qname)
            self._inflight[qname] = future
        future.add_done_callback(lambda _f: self._forget(qname))
        return future

    def _forget(self, qname: str) -> None:
        with self._lock:
            self._inflight.pop(qname, None)

    def _query(self, zone: str, qname: str) -> Answer:
        try:
            name = dns.name.from_text(qname + ".")
        except dns.exception.DNSException as exc:
            # Our input, not the list's fault: no query, no breaker count.
            self._count("bad_names")
            return Answer(qname, "error", error=_short(exc, "bad name"))
        self._count("queries")
        try:
            answer = self._resolve(qname, name)
        except Exception as exc:  # noqa: BLE001 - never raise: blocklists fail open
            answer = Answer(qname, "error", error=_short(exc, type(exc).__name__))
        if answer.status == "error":
            self._count("timeouts" if answer.error == "timeout" else "failures")
            if self._breaker.record(zone, ok=False):
                self._count("breaker_opened")
                log.warning(
                    "dnsbl: %s failing (%s); skipping it for %.0fs",
                    zone,
                    answer.error,
                    self._breaker.seconds,
                )
        else:
            self._breaker.record(zone, ok=True)
            self.cache.put(answer)
        return answer

    def _resolve(self, qname: str, name: dns.name.Name) -> Answer:
        try:
            response = self._exchange(name)
        except _QueryFailed as exc:
            return Answer(qname, "error", error=str(exc))
        if response.rcode() == dns.rcode.NXDOMAIN:
            ttl = _negative_ttl(response, self.cache_negative_ttl)
            return Answer(qname, "nxdomain", ttl=min(ttl, self.cache_max_ttl))
        if not isinstance(response, dns.message.QueryMessage):
            return Answer(qname, "error", error="answer is not a query response")
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as exc:
            return Answer(qname, "error", error=_short(exc, "bad answer"))
        if chain.answer is None:
            ttl = _negative_ttl(response, self.cache_negative_ttl)
            return Answer(qname, "nxdomain", ttl=min(ttl, self.cache_max_ttl))
        addresses = tuple(sorted(str(rdata) for rdata in chain.answer))
        return Answer(qname, "found", addresses, ttl=min(chain.minimum_ttl, self.cache_max_ttl))

    def _exchange(self, name: dns.name.Name) -> dns.message.Message:
        """One query, trying each nameserver in turn within ``query_timeout``.

        A connected UDP socket turns "nothing listens there" (ICMP port
        unreachable) into an immediate error instead of a full timeout.
        SERVFAIL and REFUSED move on to the next server, as resolvers do.
        """
        query = dns.message.make_query(name, dns.rdatatype.A)
        deadline = time.monotonic() + self.query_timeout
        servers = self.nameservers if len(self.nameservers) > 1 else self.nameservers * 2
        problems: list[str] = []
        refused: set[tuple[str, int]] = set()
        for host, port in servers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if (host, port) in refused:
                continue  # asking again cannot change a refusal; only timeouts retry
            try:
                response = self._udp(query, host, port, min(remaining, self._try_timeout))
                if response.flags & dns.flags.TC:
                    response = dns.query.tcp(
                        query, host, timeout=max(0.01, deadline - time.monotonic()), port=port
                    )
            except dns.exception.Timeout:
                problems.append("timeout")
                continue
            except (OSError, dns.exception.DNSException) as exc:
                refused.add((host, port))
                problems.append(_short(exc, type(exc).__name__))
                continue
            rcode = response.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            if rcode == dns.rcode.REFUSED:
                refused.add((host, port))
            problems.append(dns.rcode.to_text(rcode))
        if not problems or all(p == "timeout" for p in problems):
            raise _QueryFailed("timeout")
        raise _QueryFailed(next(p for p in problems if p != "timeout"))

    @staticmethod
    def _udp(
        query: dns.message.Message, host: str, port: int, timeout: float
    ) -> dns.message.Message:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((host, port))
            return dns.query.udp(
                query, host, timeout=timeout, port=port, sock=sock, ignore_unexpected=True
            )


class _QueryFailed(Exception):
    """No nameserver gave a usable answer; the text says why (timeout, SERVFAIL...)."""


def _short(exc: BaseException, fallback: str) -> str:
    """A one-line error that names the failure without dumping the packet."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "SERVFAIL" in text:
        return "SERVFAIL"
    if "REFUSED" in text:
        return "REFUSED"
    return (text[:120] or fallback).rstrip(".")
