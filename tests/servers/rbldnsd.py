"""A real DNSBL server (rbldnsd) and a UDP port that never answers, on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Self

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver

from filterd.services.launcher import (
    LOOPBACK,
    _ChildServer,
    _chown_to,
    _find_program,
    _Stoppable,
    free_port,
    make_reachable,
)


class DnsQuery(NamedTuple):
    """One query as rbldnsd logged it."""

    name: str
    qtype: str
    rcode: str


# A label no test zone lists, so the readiness query can be told apart in the query log.
_PROBE_LABEL = "filterd-devservers-readiness-probe"


class RbldnsdServer(_ChildServer):
    """A real DNSBL server (rbldnsd) answering on 127.0.0.1 for the given zones.

    ``zones`` are ``(zone name, dataset type, file content)``; repeating a zone name with
    another dataset adds that dataset to the zone. ``ttl`` sets rbldnsd's default TTL (``-t``);
    a ``$TTL n`` line inside a data file overrides it for that dataset. Queries are logged
    unbuffered (``log_queries``) so tests can count them; benches should turn that off.
    """

    name = "rbldnsd"

    def __init__(
        self,
        workdir: Path,
        zones: Sequence[tuple[str, str, str]],
        ttl: int | None = None,
        log_queries: bool = True,
        start_timeout: float = 10.0,
    ) -> None:
        if not zones:
            raise ValueError("rbldnsd needs at least one zone")
        super().__init__(workdir, start_timeout)
        self.zones = [(zone.strip(".").lower(), kind, text) for zone, kind, text in zones]
        self.ttl = ttl
        self.log_queries = log_queries
        self._port = free_port("udp")
        self._zonedir = self.workdir / "zones"
        self._querylog = self.workdir / "queries.log"

    @property
    def port(self) -> int:
        return self._port

    @property
    def nameserver(self) -> str:
        return f"{LOOPBACK}:{self._port}"

    def resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython resolver that asks only this server (never /etc/resolv.conf)."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [LOOPBACK]
        res.port = self._port
        res.lifetime = lifetime
        res.timeout = lifetime
        return res

    def queries(self) -> list[DnsQuery]:
        """Queries received so far, oldest first, without the readiness probe.

        rbldnsd writes a log line per query it answers (REFUSED included; malformed packets
        are not logged), and it writes it before sending the reply, so a client holding an
        answer always finds its query counted.
        """
        if not self.log_queries:
            raise RuntimeError("started with log_queries=False")
        result = []
        try:
            text = self._querylog.read_text(errors="replace")
        except FileNotFoundError:
            return []
        # Format: "<unixtime> <client ip> <qname> <qtype> <qclass>: <RCODE>/<nans>/<size>"
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 6 or _PROBE_LABEL in fields[2]:
                continue
            result.append(DnsQuery(fields[2].lower(), fields[3], fields[5].split("/")[0]))
        return result

    def query_count(self, name: str | None = None) -> int:
        """Number of logged queries, optionally only those for ``name``."""
        qs = self.queries()
        if name is None:
            return len(qs)
        wanted = name.rstrip(".").lower()
        return sum(1 for q in qs if q.name.rstrip(".") == wanted)

    def _prepare(self) -> None:
        make_reachable(self.workdir)
        self._zonedir.mkdir(exist_ok=True)
        self._zonedir.chmod(0o755)
        for index, (zone, kind, text) in enumerate(self.zones):
            path = self._zonedir / f"{index:02d}-{zone}.{kind}"
            path.write_text(text if text.endswith("\n") or not text else text + "\n")
            path.chmod(0o644)
        if self.log_queries:
            # rbldnsd opens the log after dropping to user rbldns; give it the file.
            self._querylog.touch()
            _chown_to(self._querylog, "rbldns")

    def _command(self) -> list[str]:
        cmd = [
            _find_program("rbldnsd"),
            "-n", "-f", "-q",
            "-b", f"{LOOPBACK}/{self._port}",
            "-w", str(self._zonedir),
        ]  # fmt: skip
        if self.ttl is not None:
            cmd += ["-t", str(self.ttl)]
        if self.log_queries:
            cmd += ["-l", f"+{self._querylog}"]
        for index, (zone, kind, _text) in enumerate(self.zones):
            cmd.append(f"{zone}:{kind}:{index:02d}-{zone}.{kind}")
        return cmd

    def _probe(self) -> bool:
        query = dns.message.make_query(f"{_PROBE_LABEL}.{self.zones[0][0]}", "A")
        try:
            reply = dns.query.udp(query, LOOPBACK, port=self._port, timeout=0.05)
        except dns.exception.Timeout:
            return False
        # REFUSED: zone data not (yet) loaded.
        return reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)

    def _fatal_in_log(self, new_log: str) -> str | None:
        for line in new_log.splitlines():
            if "will not be serviced" in line or "unable to open file" in line:
                return line.strip()
        return None

    def _rebind(self) -> bool:
        self._port = free_port("udp")
        return True


class SilentUdpServer(_Stoppable):
    """A UDP port on 127.0.0.1 that receives and never answers: a DNS server that times out.

    A port nobody listens on would answer ICMP port-unreachable, which resolvers treat as an
    immediate failure, not a timeout; this is the timeout case.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._port = 0
        self._received = 0

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("SilentUdpServer not started")
        return self._port

    @property
    def nameserver(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def datagrams_received(self) -> int:
        """Datagrams that arrived so far (reads and discards the socket's queue)."""
        if self._sock is not None:
            while True:
                try:
                    self._sock.recv(65535)
                except (BlockingIOError, InterruptedError):
                    break
                self._received += 1
        return self._received

    def start(self) -> Self:
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((LOOPBACK, 0))
            sock.setblocking(False)
            self._port = int(sock.getsockname()[1])
            self._sock = sock
        return self

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class LoopbackUdp:
    """A scriptable DNS server on 127.0.0.1 for tests: its thread hands each datagram to
    ``handle`` (by default: parsed, to ``answer``). ``upstream`` is the port of a real
    server (rbldnsd) a subclass may ask or forward to. Subclasses start ``_thread``."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.nameserver = f"{LOOPBACK}:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.handle(data, client)

    def handle(self, data: bytes, client: tuple[str, int]) -> None:
        self.answer(dns.message.from_wire(data), client)

    def answer(self, query: dns.message.Message, client: tuple[str, int]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
