"""A concurrent DNS lookup client for blocklists, with a bounded TTL cache.

Why not just ``dns.resolver.resolve`` per name: a message needs several lookups
and must not wait for them one after another; a burst of connections from one
host must cost one query (answers and NXDOMAINs are cached by their TTL,
concurrent identical queries share one in-flight request); and a dead list must
not add its timeout to every message, so a per-zone breaker skips a list after
repeated failures for a while. Every failure is an ``Answer`` with status
``error``, never an exception: blocklists fail open.

No thread of its own: the calling thread sends every query of a call on its own
non-blocking UDP socket (``start_many``) and later waits for the answers with one
``poll`` (``Lookups.collect``), retrying on the next nameserver as each try times
out. A pool thread per query cost a hand-off each (measured, issue 12: ~0.3 ms
of CPU and a scheduler wake-up per lookup, several per message), and splitting
start from collect lets a caller send its queries, do CPU work, then read the
answers that arrived meanwhile. dnspython builds and parses the packets (a
pycares/aiodns event loop would need a thread or an asyncio loop of its own
again, for the same few packets).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from collections import Counter, OrderedDict
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
        # Sockets one call keeps open at once; more queries wait for a free one.
        self.max_parallel = max(1, max_parallel)
        self._clock = clock
        self.cache = TtlCache(cache_max_entries, clock)
        self._breaker = _Breaker(breaker_failures, breaker_seconds, clock, breaker_probe_seconds)
        # Two tries per query when there is one server; one per server otherwise.
        self._try_timeout = query_timeout / max(2, len(self.nameservers))
        self._attempts = self.nameservers if len(self.nameservers) > 1 else self.nameservers * 2
        # Queries some thread has sent and not yet answered: others wait on their Future.
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
        ids = _QueryIds()
        for zone, qname in queries:
            qname = qname.rstrip(".").lower()
            if lookups.has(qname):
                continue
            cached = self.cache.get(qname)
            if cached is not None:
                self._count("cache_hits")
                lookups.results[qname] = cached
                continue
            if self._breaker.is_open(zone):
                self._count("breaker_skips")
                lookups.results[qname] = Answer(qname, "error", error="list unavailable (back-off)")
                continue
            if self._closed:  # a reload retired this resolver
                lookups.results[qname] = Answer(qname, "error", error="resolver closed")
                continue
            try:
                name = dns.name.from_text(qname + ".")
            except dns.exception.DNSException as exc:
                # Our input, not the list's fault: no query, no breaker count.
                self._count("bad_names")
                lookups.results[qname] = Answer(qname, "error", error=_short(exc, "bad name"))
                continue
            with self._lock:
                shared = self._inflight.get(qname) if share else None
                if shared is not None:
                    self._stats["coalesced"] += 1
                    lookups.waiting[qname] = shared
                    continue
                self._stats["cache_misses"] += 1
                query = _Query(zone, qname, name, ids.next())
                if share:
                    self._inflight[qname] = query.future
            lookups.add(query)
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
        query.close()
        with self._lock:
            if self._inflight.get(query.qname) is query.future:
                del self._inflight[query.qname]
        if not query.future.done():
            query.future.set_result(answer)

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


class _Query:
    """One query name sent by the calling thread: its tries over the nameservers.

    Each try has ``try_timeout``; the query as a whole ``query_timeout``. A
    connected UDP socket turns "nothing listens there" (ICMP port unreachable)
    into an immediate error instead of a full timeout. SERVFAIL and REFUSED move
    on to the next server, as resolvers do; a refusal is not asked again.
    """

    __slots__ = (
        "deadline",
        "future",
        "id",
        "name",
        "next_try",
        "problems",
        "qname",
        "refused",
        "server",
        "sock",
        "try_deadline",
        "wire",
        "zone",
    )  # fmt: skip

    def __init__(self, zone: str, qname: str, name: dns.name.Name, query_id: int) -> None:
        self.zone = zone
        self.qname = qname
        self.name = name
        self.id = query_id
        self.wire = _query_wire(self.id, name)
        self.future: Future[Answer] = Future()
        self.sock: socket.socket | None = None
        self.server: tuple[str, int] | None = None
        self.next_try = 0
        self.deadline = 0.0
        self.try_deadline = 0.0
        self.problems: list[str] = []
        self.refused: set[tuple[str, int]] = set()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, resolver: DnsblResolver, now: float) -> bool:
        """Send to the next server worth asking; False when none is left (or no time)."""
        self.close()
        if not self.deadline:
            self.deadline = now + resolver.query_timeout
        attempts = resolver._attempts
        while self.next_try < len(attempts):
            host, port = attempts[self.next_try]
            self.next_try += 1
            remaining = self.deadline - now
            if remaining <= 0:
                return False
            if (host, port) in self.refused:
                continue  # asking again cannot change a refusal; only timeouts retry
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect((host, port))
                sock.send(self.wire)
            except OSError as exc:
                sock.close()
                self.refused.add((host, port))
                self.problems.append(_short(exc, type(exc).__name__))
                continue
            if self.server is None:  # the first try counts the query
                resolver._count("queries")
            self.sock, self.server = sock, (host, port)
            self.try_deadline = now + min(remaining, resolver._try_timeout)
            return True
        return False

    def _answers_us(self, response: dns.message.Message) -> bool:
        """A response to this query (id, QR, the one question): what ``is_response`` checks."""
        if response.id != self.id or not response.flags & dns.flags.QR:
            return False
        if len(response.question) != 1:
            return False
        question = response.question[0]
        return (
            question.name == self.name
            and question.rdtype == dns.rdatatype.A
            and question.rdclass == dns.rdataclass.IN
        )

    def failed(self) -> Answer:
        """The error answer once no server is left to ask."""
        if not self.problems or all(p == "timeout" for p in self.problems):
            return Answer(self.qname, "error", error="timeout")
        return Answer(self.qname, "error", error=next(p for p in self.problems if p != "timeout"))

    def readable(self, resolver: DnsblResolver) -> dns.message.Message | None:
        """Read what arrived: a usable response, or None (try moved on, or packet ignored).

        Raises nothing: a failed try is recorded in ``problems`` and the socket closed,
        which the caller sees as ``sock is None``.
        """
        assert self.sock is not None and self.server is not None
        server = self.server
        try:
            data = self.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self.refused.add(server)
            self.problems.append(_short(exc, type(exc).__name__))
            self.close()
            return None
        try:
            response = dns.message.from_wire(data, ignore_trailing=True)
        except dns.message.Truncated:
            response = None  # TC set and the packet cut: asked again over TCP below
        except dns.exception.DNSException:
            return None  # not an answer to anything of ours: keep waiting, as dnspython does
        if response is not None and not self._answers_us(response):
            return None
        if response is None or response.flags & dns.flags.TC:
            try:
                response = dns.query.tcp(
                    dns.message.make_query(self.name, dns.rdatatype.A),
                    server[0],
                    timeout=max(0.01, self.deadline - time.monotonic()),
                    port=server[1],
                )
            except dns.exception.Timeout:
                self.problems.append("timeout")
                self.close()
                return None
            except (OSError, dns.exception.DNSException) as exc:
                self.refused.add(server)
                self.problems.append(_short(exc, type(exc).__name__))
                self.close()
                return None
        rcode = response.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return response
        if rcode == dns.rcode.REFUSED:
            self.refused.add(server)
        self.problems.append(dns.rcode.to_text(rcode))
        self.close()
        return None


class Lookups:
    """The queries of one ``start_many`` call: answers so far, and those still on the wire."""

    def __init__(self, resolver: DnsblResolver) -> None:
        self.resolver = resolver
        self.results: dict[str, Answer] = {}
        # Sent by another thread first: its Future gives the answer.
        self.waiting: dict[str, Future[Answer]] = {}
        self._queued: list[_Query] = []
        self._active: list[_Query] = []

    def has(self, qname: str) -> bool:
        return (
            qname in self.results
            or qname in self.waiting
            or any(q.qname == qname for q in self._queued)
            or any(q.qname == qname for q in self._active)
        )

    def add(self, query: _Query) -> None:
        self._queued.append(query)

    def send_queued(self) -> None:
        """Put queued queries on the wire while fewer than ``max_parallel`` are."""
        resolver = self.resolver
        now = time.monotonic()
        while self._queued and len(self._active) < resolver.max_parallel:
            query = self._queued.pop(0)
            if query.send(resolver, now):
                self._active.append(query)
            else:
                self.results[query.qname] = resolver._finish(query, query.failed())

    def collect(self, deadline: float) -> dict[str, Answer]:
        """Wait until every query has its answer or ``deadline`` (time.monotonic) passes.

        Returns an Answer for every qname; those not finished in time are
        ``error`` answers ("budget exhausted").
        """
        resolver = self.resolver
        poller = select.poll()
        registered: dict[int, _Query] = {}
        try:
            while self._active:
                now = time.monotonic()
                if now >= deadline:
                    break
                fds = {q.sock.fileno(): q for q in self._active if q.sock is not None}
                for fd in registered.keys() - fds.keys():
                    poller.unregister(fd)
                for fd in fds.keys() - registered.keys():
                    poller.register(fd, select.POLLIN)
                registered = fds
                wake = min([deadline, *(q.try_deadline for q in self._active)])
                events = poller.poll(max(0, math.ceil((wake - now) * 1000)))
                for fd, _event in events:
                    query = registered[fd]
                    if query.sock is None or query not in self._active:
                        continue
                    response = query.readable(resolver)
                    if response is not None:
                        self._done(
                            query, resolver._finish(query, resolver._answer(query.qname, response))
                        )
                    elif query.sock is None:
                        self._retry(query)
                now = time.monotonic()
                for query in list(self._active):
                    if query.sock is not None and query.try_deadline <= now:
                        query.problems.append("timeout")
                        self._retry(query)
                self.send_queued()
        finally:
            for fd in registered:
                poller.unregister(fd)
        for query in self._active + self._queued:
            self.results[query.qname] = resolver._abandon(
                query, Answer(query.qname, "error", error="budget exhausted")
            )
        self._active, self._queued = [], []
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

    def _retry(self, query: _Query) -> None:
        if not query.send(self.resolver, time.monotonic()):
            self._done(query, self.resolver._finish(query, query.failed()))

    def _done(self, query: _Query, answer: Answer) -> None:
        self._active.remove(query)
        self.results[query.qname] = answer

    def close(self) -> None:
        """Give up on whatever is still on the wire (a collect that will not happen)."""
        for query in self._active + self._queued:
            self.resolver._abandon(query, Answer(query.qname, "error", error="abandoned"))
        self._active, self._queued, self.waiting = [], [], {}


class _QueryIds:
    """Unpredictable 16-bit query ids (with the kernel's random source port, what keeps
    off-path forgers from answering for the list), one ``os.urandom`` per call's worth."""

    def __init__(self) -> None:
        self._ids: list[int] = []

    def next(self) -> int:
        if not self._ids:
            self._ids = list(struct.unpack("!32H", os.urandom(64)))
        return self._ids.pop()


def _query_wire(query_id: int, name: dns.name.Name) -> bytes:
    """An A/IN query with recursion desired, in wire form (RFC 1035 4.1).

    Written here because dnspython's ``make_query(...).to_wire()`` costs ~80 us
    per query and this ~4 us (measured), several times per message; dnspython
    still validates the name (``dns.name.from_text``) and parses every response.
    """
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    qname = name.to_wire()
    assert qname is not None  # None only when writing into a file
    return header + qname + b"\x00\x01\x00\x01"


def _short(exc: BaseException, fallback: str) -> str:
    """A one-line error that names the failure without dumping the packet."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "SERVFAIL" in text:
        return "SERVFAIL"
    if "REFUSED" in text:
        return "REFUSED"
    return (text[:120] or fallback).rstrip(".")
