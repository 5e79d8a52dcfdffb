"""A concurrent DNS lookup client for blocklists, with a bounded TTL cache.

Why not just ``dns.resolver.resolve`` per name: a message needs several lookups
and must not wait for them one after another; a burst of connections from one
host must cost one query (answers and NXDOMAINs are cached by their TTL,
concurrent identical queries share one in-flight request); and a dead list must
not add its timeout to every message, so a per-zone breaker skips a list after
repeated failures for a while. Every failure is an ``Answer`` with status
``error``, never an exception: blocklists fail open.

No thread of its own: the calling thread sends every query of a call
(``start_many``) and later waits for the answers with one ``poll``
(``Lookups.collect``), retrying on the next nameserver as each try times out. A
pool thread per query cost a hand-off each (measured, issue 12: ~0.3 ms of CPU
and a scheduler wake-up per lookup, several per message), and splitting start
from collect lets a caller send its queries, do CPU work, then read the answers
that arrived meanwhile.

One call's queries to one nameserver share one connected UDP socket, opened for
that call (a fresh random source port per call), each try with its own random
id; an answer is taken only when its id, its question (the very bytes we sent)
and, by the connected socket, its server match a try still waiting. A forger
must still guess port, id and which name carries that id, as with a socket per
query, which cost a socket, connect and close per lookup (issue 12 profile).
The common answers (NXDOMAIN, NOERROR with A records) are read by
``_fast_answer``; anything else is parsed by dnspython.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import select
import socket
import struct
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass, replace
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
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


# A dotted-quad IPv4 address exactly as ``ipaddress`` accepts it (no leading zeros).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_RE = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def reverse_ip(address: str) -> str | None:
    """The DNSBL query label for an IP (RFC 5782): reversed octets or nibbles.

    IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``, as some MTAs present
    IPv4 clients) are looked up as IPv4. None for text that is no IP.
    """
    if IPV4_RE.fullmatch(address):  # the usual client: no ipaddress object (~3 us)
        a, b, c, d = address.split(".")
        return f"{d}.{c}.{b}.{a}"
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
        if not self._data:  # caching off or nothing cached: skip the lock (a dict read is atomic)
            return None
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
        if zone not in self._open_until:  # closed: nothing to change, no lock needed
            return False
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
        if ok and zone not in self._count and zone not in self._open_until:
            # A success on a healthy zone changes nothing: skip the lock. (A failure
            # recorded meanwhile by another thread simply orders after this success.)
            return False
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
        # Queries one call keeps on the wire at once; more wait for a free slot.
        self.max_parallel = max(1, max_parallel)
        self._clock = clock
        self.cache = TtlCache(cache_max_entries, clock)
        self._breaker = _Breaker(breaker_failures, breaker_seconds, clock, breaker_probe_seconds)
        # Two tries per query when there is one server; one per server otherwise.
        self._try_timeout = query_timeout / max(2, len(self.nameservers))
        self._attempts = self.nameservers if len(self.nameservers) > 1 else self.nameservers * 2
        # Queries some thread has sent and not yet answered: others wait on their Future.
        self._inflight: dict[str, _Query] = {}
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
        ``error`` answers ("budget exhausted").
        """
        deadline = time.monotonic() + budget
        return self.start_many(queries).collect(deadline)

    def start_many(self, queries: Iterable[tuple[str, str]], share: bool = True) -> Lookups:
        """Send the queries now (cache, breaker and in-flight sharing applied); never blocks.

        The answers are read by ``Lookups.collect``, in this thread or another;
        a ``Lookups`` that is never collected must be ``close``d. ``share``: a
        query another thread has in flight is waited for instead of sent again,
        and ours may be waited for by others; only for a collect that follows
        soon (a burst from one host then costs one query). ``share=False`` for
        lookups sent ahead of a client's next command, which may never come.
        """
        lookups = Lookups(self)
        results = lookups.results
        counts: dict[str, int] = {}
        wanted: list[_Query] = []
        seen: set[str] = set()
        for zone, qname in queries:
            qname = qname.rstrip(".").lower()
            if qname in seen:
                continue
            seen.add(qname)
            cached = self.cache.get(qname)
            if cached is not None:
                counts["cache_hits"] = counts.get("cache_hits", 0) + 1
                results[qname] = cached
                continue
            if self._breaker.is_open(zone):
                counts["breaker_skips"] = counts.get("breaker_skips", 0) + 1
                results[qname] = Answer(qname, "error", error="list unavailable (back-off)")
                continue
            if self._closed:  # a reload retired this resolver
                results[qname] = Answer(qname, "error", error="resolver closed")
                continue
            try:
                wire = wire_name(qname)
            except dns.exception.DNSException as exc:
                # Our input, not the list's fault: no query, no breaker count.
                counts["bad_names"] = counts.get("bad_names", 0) + 1
                results[qname] = Answer(qname, "error", error=_short(exc, "bad name"))
                continue
            wanted.append(_Query(zone, qname, wire, share))
        # One short lock for the whole call: under load every connection's thread comes here.
        with self._lock:
            for query in wanted:
                shared = self._inflight.get(query.qname) if share else None
                if shared is not None:
                    counts["coalesced"] = counts.get("coalesced", 0) + 1
                    if shared.future is None:  # created under the lock that _release takes
                        shared.future = Future()
                    lookups.waiting[query.qname] = shared.future
                    continue
                counts["cache_misses"] = counts.get("cache_misses", 0) + 1
                if share:
                    self._inflight[query.qname] = query
                lookups.add(query)
            self._stats.update(counts)
        lookups.send_queued()
        return lookups

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
        """Later lookups answer "resolver closed"; calls under way finish on their own."""
        self._closed = True

    # -- internals (called by Lookups, in the thread that collects) -------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _finish(self, query: _Query, answer: Answer) -> Answer:
        """A query's final answer: stats, breaker, cache, then anyone waiting on it."""
        if answer.status == "error":
            self._count("timeouts" if answer.error == "timeout" else "failures")
            if self._breaker.record(query.zone, ok=False):
                self._count("breaker_opened")
                log.warning(
                    "dnsbl: %s failing (%s); skipping it for %.0fs",
                    query.zone,
                    answer.error,
                    self._breaker.seconds,
                )
        else:
            self._breaker.record(query.zone, ok=True)
            self.cache.put(answer)
        self._release(query, answer)
        return answer

    def _abandon(self, query: _Query, answer: Answer) -> Answer:
        """Out of budget before any server answered.

        The query cannot go on without a thread to wait for it, so it ends here.
        When a try of it has already failed, that failure counts on the breaker: a
        budget shorter than ``query_timeout`` must not keep a dead list from being
        taken out.
        """
        self._count("budget_exhausted")
        if query.problems and self._breaker.record(query.zone, ok=False):
            self._count("breaker_opened")
            log.warning(
                "dnsbl: %s failing (%s); skipping it for %.0fs",
                query.zone,
                query.problems[-1],
                self._breaker.seconds,
            )
        self._release(query, answer)
        return answer

    def _release(self, query: _Query, answer: Answer) -> None:
        query.detach()
        if not query.shared:
            return  # never in _inflight, so nobody can be waiting on it
        with self._lock:
            if self._inflight.get(query.qname) is query:
                del self._inflight[query.qname]
            future, query.future = query.future, None
        if future is not None and not future.done():
            future.set_result(answer)

    def _answer(self, qname: str, response: dns.message.Message) -> Answer:
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

    def _fast(self, qname: str, data: bytes, query_id: int, question: bytes) -> Answer | None:
        """``_answer`` for the common packets without dnspython; None: ask dnspython."""
        parsed = _fast_answer(data, query_id, question)
        if parsed is None:
            return None
        status, addresses, ttl = parsed
        if ttl is None:
            ttl = self.cache_negative_ttl
        return Answer(qname, status, addresses, ttl=min(ttl, self.cache_max_ttl))


class _Channel:
    """One call's connected UDP socket to one nameserver, and the tries waiting on it.

    Connected, so the kernel drops datagrams from any other address and turns
    "nothing listens there" (ICMP port unreachable) into an immediate error.
    """

    __slots__ = ("fd", "server", "sock", "used", "waiting")

    def __init__(self, server: tuple[str, int]) -> None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(server)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.fd = sock.fileno()
        self.server = server
        # Try id -> the query whose current try carries it.
        self.waiting: dict[int, _Query] = {}
        self.used: set[int] = set()  # every id sent on this socket


class _Query:
    """One query name sent by the calling thread: its tries over the nameservers.

    Each try has ``try_timeout`` and its own id; the query as a whole
    ``query_timeout``. SERVFAIL and REFUSED move on to the next server, as
    resolvers do; a refusal (or an unreachable server) is not asked again.
    """

    __slots__ = (
        "channel",
        "deadline",
        "future",
        "id",
        "next_try",
        "problems",
        "qname",
        "question",
        "refused",
        "server",
        "shared",
        "try_deadline",
        "zone",
    )  # fmt: skip

    def __init__(self, zone: str, qname: str, wire: bytes, shared: bool) -> None:
        self.zone = zone
        self.qname = qname
        # The question section as sent (name, type A, class IN); answers must echo it.
        self.question = wire + b"\x00\x01\x00\x01"
        self.shared = shared
        # Created only when another call waits on this query (under the resolver lock).
        self.future: Future[Answer] | None = None
        self.id = 0
        self.channel: _Channel | None = None
        self.server: tuple[str, int] | None = None
        self.next_try = 0
        self.deadline = 0.0
        self.try_deadline = 0.0
        self.problems: list[str] = []
        self.refused: set[tuple[str, int]] = set()

    @property
    def name(self) -> dns.name.Name:
        return dns.name.from_wire(self.question, 0)[0]

    def detach(self) -> None:
        """Stop waiting on the current try (its late answer will be ignored)."""
        channel = self.channel
        if channel is not None:
            if channel.waiting.get(self.id) is self:
                del channel.waiting[self.id]
            self.channel = None

    def send(self, lookups: Lookups, now: float) -> bool:
        """Send to the next server worth asking; False when none is left (or no time)."""
        self.detach()
        resolver = lookups.resolver
        if not self.deadline:
            self.deadline = now + resolver.query_timeout
        attempts = resolver._attempts
        while self.next_try < len(attempts):
            server = attempts[self.next_try]
            self.next_try += 1
            remaining = self.deadline - now
            if remaining <= 0:
                return False
            if server in self.refused:
                continue  # asking again cannot change a refusal; only timeouts retry
            try:
                channel = lookups.channel(server)
            except OSError as exc:
                self.refused.add(server)
                self.problems.append(_short(exc, type(exc).__name__))
                continue
            query_id = lookups.ids.next()
            while query_id in channel.used:  # never twice on one socket
                query_id = lookups.ids.next()
            channel.used.add(query_id)
            packet = _ID.pack(query_id) + _QUERY_FLAGS_COUNTS + self.question
            try:
                channel.sock.send(packet)
            except OSError as exc:
                # A connected socket reports an ICMP error at its next call: most
                # likely one an earlier try on it caused. Those tries are refused
                # (nothing else would tell them); this one is sent again, and fails
                # only if its own send does.
                lookups.channel_failed(channel, _short(exc, type(exc).__name__))
                try:
                    channel.sock.send(packet)
                except OSError as again:
                    self.refused.add(server)
                    self.problems.append(_short(again, type(again).__name__))
                    continue
            if self.server is None:  # the first try counts the query
                lookups.sent += 1
            self.id = query_id
            channel.waiting[query_id] = self
            self.channel, self.server = channel, server
            self.try_deadline = now + min(remaining, resolver._try_timeout)
            return True
        return False

    def failed(self) -> Answer:
        """The error answer once no server is left to ask."""
        if not self.problems or all(p == "timeout" for p in self.problems):
            return Answer(self.qname, "error", error="timeout")
        return Answer(self.qname, "error", error=next(p for p in self.problems if p != "timeout"))

    def fail_try(self, problem: str, refused: bool) -> None:
        """This try ended without an answer (the caller moves on to the next server)."""
        if refused and self.server is not None:
            self.refused.add(self.server)
        self.problems.append(problem)
        self.detach()

    def take(self, resolver: DnsblResolver, data: bytes) -> Answer | None:
        """The answer in a datagram carrying this try's id, or None.

        None: the packet was ignored (keep waiting; ``channel`` still set) or this
        try failed (``channel`` is None; the caller retries). Raises nothing.
        """
        answer = resolver._fast(self.qname, data, self.id, self.question)
        if answer is not None:
            return answer
        outcome = _dnspython_outcome(data, self.id, self.name)
        if outcome is None:
            return None  # not an answer to this try: keep waiting, as dnspython does
        if outcome == "tcp":
            response = self._tcp()
            if response is None:
                return None
            rcode = response.rcode()
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                self.fail_try(dns.rcode.to_text(rcode), refused=rcode == dns.rcode.REFUSED)
                return None
        elif isinstance(outcome, dns.rcode.Rcode):
            self.fail_try(dns.rcode.to_text(outcome), refused=outcome == dns.rcode.REFUSED)
            return None
        else:
            response = outcome
        return resolver._answer(self.qname, response)

    def _tcp(self) -> dns.message.Message | None:
        """Ask the same server over TCP (the UDP answer was truncated)."""
        assert self.server is not None
        host, port = self.server
        try:
            return dns.query.tcp(
                dns.message.make_query(self.name, dns.rdatatype.A),
                host,
                timeout=max(0.01, self.deadline - time.monotonic()),
                port=port,
            )
        except dns.exception.Timeout:
            self.fail_try("timeout", refused=False)
        except (OSError, dns.exception.DNSException) as exc:
            self.fail_try(_short(exc, type(exc).__name__), refused=True)
        return None


class Lookups:
    """The queries of one ``start_many`` call: answers so far, and those still on the wire."""

    def __init__(self, resolver: DnsblResolver) -> None:
        self.resolver = resolver
        self.results: dict[str, Answer] = {}
        # Sent by another thread first: its Future gives the answer.
        self.waiting: dict[str, Future[Answer]] = {}
        self.ids = _QueryIds()
        self.sent = 0  # queries put on the wire, not yet added to the resolver's stats
        self._queued: deque[_Query] = deque()
        self._active: dict[_Query, None] = {}  # insertion-ordered set
        self._stalled: list[_Query] = []  # tries failed by another's error: to retry
        self._channels: dict[tuple[str, int], _Channel] = {}
        self._by_fd: dict[int, _Channel] = {}
        self._poller: select.poll | None = None

    def add(self, query: _Query) -> None:
        self._queued.append(query)

    def channel(self, server: tuple[str, int]) -> _Channel:
        """This call's socket to ``server``, opened on first use (raises OSError)."""
        channel = self._channels.get(server)
        if channel is None:
            channel = _Channel(server)
            if self._poller is None:
                self._poller = select.poll()
            self._poller.register(channel.fd, select.POLLIN)
            self._channels[server] = channel
            self._by_fd[channel.fd] = channel
        return channel

    def channel_failed(self, channel: _Channel, problem: str) -> None:
        """The server behind ``channel`` is unreachable: fail every try waiting on it."""
        for query in list(channel.waiting.values()):
            query.fail_try(problem, refused=True)
            self._stalled.append(query)

    def send_queued(self) -> None:
        """Retry stalled tries; send queued queries while fewer than ``max_parallel`` are out."""
        resolver = self.resolver
        now = time.monotonic()
        while True:
            while self._stalled:  # a send below may stall others: hence the outer loop
                self._retry(self._stalled.pop())
            if not self._queued or len(self._active) >= resolver.max_parallel:
                break
            query = self._queued.popleft()
            if query.send(self, now):
                self._active[query] = None
            else:
                self.results[query.qname] = resolver._finish(query, query.failed())
        if self.sent:
            resolver._count("queries", self.sent)
            self.sent = 0

    def collect(self, deadline: float) -> dict[str, Answer]:
        """Wait until every query has its answer or ``deadline`` (time.monotonic) passes.

        Returns an Answer for every qname; those not finished in time are
        ``error`` answers ("budget exhausted").
        """
        resolver = self.resolver
        try:
            while self._active:
                now = time.monotonic()
                if now >= deadline:
                    break
                assert self._poller is not None  # a query is on the wire: a socket exists
                wake = min(deadline, min(q.try_deadline for q in self._active))
                for fd, _event in self._poller.poll(max(0, math.ceil((wake - now) * 1000))):
                    self._read(self._by_fd[fd])
                now = time.monotonic()
                for query in [
                    q for q in self._active if q.channel is not None and q.try_deadline <= now
                ]:
                    query.fail_try("timeout", refused=False)
                    self._retry(query)
                self.send_queued()
        finally:
            abandoned = [*self._active, *self._queued]
            self._active, self._queued, self._stalled = {}, deque(), []
            for query in abandoned:
                self.results[query.qname] = resolver._abandon(
                    query, Answer(query.qname, "error", error="budget exhausted")
                )
            self._close_channels()
        if self.waiting:
            wait(self.waiting.values(), timeout=max(0.0, deadline - time.monotonic()))
            for qname, future in self.waiting.items():
                if future.done():
                    self.results[qname] = future.result()
                else:
                    resolver._count("budget_exhausted")
                    self.results[qname] = Answer(qname, "error", error="budget exhausted")
            self.waiting = {}
        return self.results

    def _read(self, channel: _Channel) -> None:
        """Every datagram waiting on ``channel``, each handed to the try whose id it carries."""
        resolver = self.resolver
        while True:  # drain even when no try waits: poll would report the socket again
            try:
                data = channel.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # The server is unreachable (ICMP): every try waiting on it has failed.
                self.channel_failed(channel, _short(exc, type(exc).__name__))
                return
            if len(data) < 2:
                continue
            query = channel.waiting.get(data[0] << 8 | data[1])
            if query is None:
                continue  # no try of ours has this id: not an answer to anything of ours
            answer = query.take(resolver, data)
            if answer is not None:
                self._done(query, resolver._finish(query, answer))
            elif query.channel is None:
                self._retry(query)
            if not self._active:
                return  # the call is answered: no recv just to hear EAGAIN (collect ends)

    def _retry(self, query: _Query) -> None:
        if not query.send(self, time.monotonic()):
            self._done(query, self.resolver._finish(query, query.failed()))

    def _done(self, query: _Query, answer: Answer) -> None:
        del self._active[query]
        self.results[query.qname] = answer

    def _close_channels(self) -> None:
        for channel in self._channels.values():
            channel.waiting.clear()
            channel.sock.close()
        self._channels, self._by_fd, self._poller = {}, {}, None

    def close(self) -> None:
        """Give up on whatever is still on the wire (a collect that will not happen)."""
        abandoned = [*self._active, *self._queued]
        self._active, self._queued, self._stalled, self.waiting = {}, deque(), [], {}
        for query in abandoned:
            self.resolver._abandon(query, Answer(query.qname, "error", error="abandoned"))
        self._close_channels()


class _QueryIds:
    """Unpredictable 16-bit query ids (with the kernel's random source port, what keeps
    off-path forgers from answering for the list), one ``os.urandom`` per call's worth."""

    def __init__(self) -> None:
        self._ids: list[int] = []

    def next(self) -> int:
        if not self._ids:
            self._ids = list(struct.unpack("!32H", os.urandom(64)))
        return self._ids.pop()


_ID = struct.Struct("!H")
# Flags RD, one question, no other records: the rest of a query's header.
_QUERY_FLAGS_COUNTS = struct.pack("!HHHHH", 0x0100, 1, 0, 0, 0)


def wire_name(qname: str) -> bytes:
    """``qname`` (no trailing dot) as an absolute name in wire form (RFC 1035 3.1).

    The common case (ASCII, no escapes) is written here: ``dns.name.from_text``
    plus ``to_wire`` cost ~11 us per query, this ~2.5 us (measured), with
    the same checks (no empty label, labels <= 63, name <= 255 octets). Anything
    else (escapes, non-ASCII IDNA, an invalid name) goes through dnspython, which
    encodes it or raises the ``DNSException`` the caller reports.
    """
    if qname and qname.isascii() and "\\" not in qname and len(qname) <= 253:
        labels = qname.encode("ascii").split(b".")
        if b"" not in labels and max(map(len, labels)) < 64:
            return b"".join([bytes((len(label),)) + label for label in labels]) + b"\x00"
    wire = dns.name.from_text(qname + ".").to_wire()
    assert wire is not None  # None only when writing into a file
    return wire


def _query_wire(query_id: int, name: dns.name.Name) -> bytes:
    """An A/IN query with recursion desired, in wire form (RFC 1035 4.1).

    Written here because dnspython's ``make_query(...).to_wire()`` costs ~80 us
    per query and this ~2 us (measured); dnspython still handles every packet
    ``_fast_answer`` does not recognise.
    """
    wire = name.to_wire()
    assert wire is not None  # None only when writing into a file
    return _ID.pack(query_id) + _QUERY_FLAGS_COUNTS + wire + b"\x00\x01\x00\x01"


_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_A_RR = struct.Struct("!HHHIH4B")  # owner as a pointer, type, class, ttl, rdlength, 4 octets
_POINTER_TO_QUESTION = 0xC00C  # the question's name, which starts right after the header
_SOA = 6
_MAX_POINTER_HOPS = 16  # dnspython's MAX_COMPRESSION_POINTER_CHAIN


def _fast_answer(
    data: bytes, query_id: int, question: bytes
) -> tuple[Status, tuple[str, ...], float | None] | None:
    """(status, addresses, ttl) of the common answers; None for anything else.

    Hand-written because dnspython's ``from_wire`` (+ ``resolve_chaining``)
    costs 70-90 us per answer and this ~2 us (measured on rbldnsd's answers),
    several answers per message, and no library reads a DNS answer without
    building every object of it. This reads only the packets a
    blocklist server sends for an A query, and only those that dnspython would
    read to the same Answer (``tests/test_dns_fastpath.py`` checks both paths
    on real rbldnsd answers and on random and mutated packets):

    - header: our id, QR set, opcode QUERY, TC clear, rcode NOERROR or
      NXDOMAIN, exactly one question, no additional records (no EDNS, no TSIG);
    - the question section is the very bytes we sent;
    - NXDOMAIN: no answer records; NOERROR: only A/IN records whose owner is a
      pointer to the question's name (none: NODATA, read as not listed);
    - authority: nothing, or one SOA/IN record (names checked as dnspython
      checks them), whose min(TTL, MINIMUM) is the negative TTL (RFC 2308).

    ``ttl`` None: a negative answer without SOA (the caller's default TTL).
    Trailing bytes are ignored, as ``from_wire(ignore_trailing=True)`` does.
    """
    end = 12 + len(question)
    if len(data) < end:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    # QR=1, opcode 0, TC=0 (AA, RD, RA, Z, AD, CD may be anything).
    if ident != query_id or flags & 0xFA00 != 0x8000 or qdcount != 1 or arcount:
        return None
    rcode = flags & 0x000F
    if rcode not in (0, 3) or nscount > 1 or data[12:end] != question:
        return None
    if rcode == 3 and ancount:
        return None
    pos = end
    addresses: list[str] = []
    ttl: float = -1.0
    for _ in range(ancount):
        if pos + 16 > len(data):
            return None
        owner, rdtype, rdclass, rr_ttl, rdlength, a, b, c, d = _A_RR.unpack_from(data, pos)
        if owner != _POINTER_TO_QUESTION or rdtype != 1 or rdclass != 1 or rdlength != 4:
            return None
        pos += 16
        if rr_ttl > 0x7FFFFFFF:  # dnspython reads such TTLs as 0 (RFC 2181 8)
            rr_ttl = 0
        ttl = float(rr_ttl) if ttl < 0 else min(ttl, float(rr_ttl))
        addresses.append(f"{a}.{b}.{c}.{d}")
    negative: float | None = None
    if nscount:
        pos = _name_end(data, pos, len(data))
        if pos < 0 or pos + 10 > len(data):
            return None
        rdtype, rdclass, rr_ttl, rdlength = _RR.unpack_from(data, pos)
        pos += 10
        rdata_end = pos + rdlength
        if rdtype != _SOA or rdclass != 1 or rdata_end > len(data):
            return None
        pos = _name_end(data, pos, rdata_end)  # MNAME
        if pos >= 0:
            pos = _name_end(data, pos, rdata_end)  # RNAME
        if pos < 0 or pos + 20 != rdata_end:  # SERIAL REFRESH RETRY EXPIRE MINIMUM
            return None
        (minimum,) = struct.unpack_from("!I", data, pos + 16)
        negative = float(min(0 if rr_ttl > 0x7FFFFFFF else rr_ttl, minimum))
    if addresses:
        return "found", tuple(sorted(set(addresses))), ttl
    return "nxdomain", (), negative


def _name_end(data: bytes, pos: int, limit: int) -> int:
    """Where the (possibly compressed) name at ``pos`` ends, or -1 if dnspython rejects it.

    The rules of ``dns.name.from_wire_parser``: labels of 1-63 octets,
    pointers only backwards and never into the part of the name already read,
    at most 16 pointers, 255 octets in all, nothing read at or past ``limit``
    (the end of the packet, or of the record data being read).
    """
    furthest = -1
    start = pos
    length = 0
    hops = 0
    while True:
        if pos >= limit:
            return -1
        count = data[pos]
        pos += 1
        if count == 0:
            break
        if count < 64:
            pos += count
            if pos > limit:
                return -1
            length += count + 1
        elif count >= 192:
            if pos >= limit:
                return -1
            target = (count & 0x3F) << 8 | data[pos]
            pos += 1
            if target >= start or hops >= _MAX_POINTER_HOPS:
                return -1
            hops += 1
            if furthest < 0:
                furthest = pos
            limit = start  # the target must end before this part of the name begins
            pos = start = target
        else:
            return -1  # label types 01 and 10: obsolete/reserved
    if length + 1 > 255:
        return -1
    return pos if furthest < 0 else furthest


def _dnspython_outcome(
    data: bytes, query_id: int, name: dns.name.Name
) -> dns.message.Message | Literal["tcp"] | dns.rcode.Rcode | None:
    """How dnspython reads a datagram for the try with ``query_id`` asking ``name``.

    A response to read (rcode NOERROR or NXDOMAIN), ``"tcp"`` (truncated: ask
    again over TCP), another rcode (this server failed the try), or None (not an
    answer to this try: ignored, as ``dns.query`` ignores it).
    """
    try:
        response = dns.message.from_wire(data, ignore_trailing=True)
    except dns.message.Truncated:
        return "tcp"  # TC set and the packet cut (it carries our id): ask again over TCP
    except dns.exception.DNSException:
        return None
    if not _answers(response, query_id, name):
        return None
    if response.flags & dns.flags.TC:
        return "tcp"
    rcode = response.rcode()
    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return response
    return rcode


def _answers(response: dns.message.Message, query_id: int, name: dns.name.Name) -> bool:
    """A response to this query (id, QR, the one question): what ``is_response`` checks."""
    if response.id != query_id or not response.flags & dns.flags.QR:
        return False
    if len(response.question) != 1:
        return False
    question = response.question[0]
    return (
        question.name == name
        and question.rdtype == dns.rdatatype.A
        and question.rdclass == dns.rdataclass.IN
    )


def _short(exc: BaseException, fallback: str) -> str:
    """A one-line error that names the failure without dumping the packet."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "SERVFAIL" in text:
        return "SERVFAIL"
    if "REFUSED" in text:
        return "REFUSED"
    return (text[:120] or fallback).rstrip(".")
