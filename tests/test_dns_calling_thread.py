"""DNS lookups sent and read by the calling thread: start now, collect later, no pool.

Real rbldnsd (and a silent UDP server) on loopback. What the split must keep:
answers that arrive while the caller does other work are there when it collects;
nothing runs in a thread of its own; lookups sent ahead of a client's next
command (MAIL FROM -> RCPT) are never waited for by other connections; and a
transaction that ends without its RCPT leaves no lookup behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from filterd.checks import dnsbl
from filterd.dns.resolver import DnsblResolver, _query_wire
from filterd.pipeline import Pipeline
from filterd.settings import Settings, load_settings
from filterd.transaction import Transaction
from filterd.types import Envelope
from tests.servers import RbldnsdServer, SilentUdpServer
from tests.test_dnsbl import DBL_LIST, ZEN_LIST, ZONES, codes, rcpt_config

pytestmark = pytest.mark.integration

LISTED = "11.2.0.192.zen.test"  # 192.0.2.11: XBL


@pytest.fixture(scope="module")
def rbl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbldnsdServer]:
    with RbldnsdServer(tmp_path_factory.mktemp("rbldnsd"), ZONES) as server:
        yield server


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def test_answers_wait_in_the_socket_until_collected_and_no_thread_is_used(
    rbl: RbldnsdServer,
) -> None:
    resolver = DnsblResolver([("127.0.0.1", rbl.port)], cache_max_ttl=0)
    before = _threads()
    try:
        lookups = resolver.start_many([("zen.test", LISTED), ("dbl.test", "nothing.dbl.test")])
        assert _threads() == before  # sending started no thread
        time.sleep(0.2)  # the caller's other work; the answers arrive meanwhile
        start = time.monotonic()
        answers = lookups.collect(time.monotonic() + 2.0)
        assert time.monotonic() - start < 0.1  # already there: no waiting
        assert answers[LISTED].status == "found" and answers[LISTED].addresses == ("127.0.0.4",)
        assert answers["nothing.dbl.test"].status == "nxdomain"
        assert _threads() == before
        assert resolver.stats()["queries"] == 2
    finally:
        resolver.close()


def test_a_closed_resolver_answers_resolver_closed(rbl: RbldnsdServer) -> None:
    resolver = DnsblResolver([("127.0.0.1", rbl.port)])
    resolver.close()
    assert resolver.lookup("zen.test", LISTED).error == "resolver closed"


def test_lookups_sent_ahead_are_never_waited_for_by_others() -> None:
    # A client that sent MAIL FROM and then stalls must not make every other
    # connection asking the same name wait for (and fail open on) its lookups.
    with SilentUdpServer() as silent:
        resolver = DnsblResolver([("127.0.0.1", silent.port)], query_timeout=5.0)
        try:
            ahead = resolver.start_many([("zen.test", LISTED)], share=False)
            shared = resolver.start_many([("zen.test", LISTED)])
            assert resolver.stats().get("coalesced", 0) == 0
            deadline = time.monotonic() + 5
            while silent.datagrams_received() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert silent.datagrams_received() == 2  # each sent its own query
            # A second caller of a shared query waits on it: that is coalescing.
            waiter = resolver.start_many([("zen.test", LISTED)])
            assert resolver.stats()["coalesced"] == 1
            assert shared.collect(time.monotonic() + 0.2)[LISTED].error == "budget exhausted"
            assert waiter.collect(time.monotonic() + 0.2)[LISTED].status == "error"
            ahead.close()
        finally:
            resolver.close()


def _settings(tmp_path: Path, nameserver: str) -> Settings:
    path = tmp_path / "f.toml"
    path.write_text(
        "[pipeline]\nrecipient_checks = []\nmessage_checks = []\n[dnsbl]\nskip_private = false\n"
    )
    base = load_settings(path, env={})
    pipeline_cfg = base.pipeline.model_copy(
        update={"recipient_checks": ["dnsbl"], "message_checks": []}
    )
    return Settings(source=base.source, sections={**base.sections, "pipeline": pipeline_cfg})


class _Runtime:
    """What Transaction asks of a Runtime, around one pipeline (no Redis, no clamd)."""

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline

        class _Outbound:
            @staticmethod
            def prepare(envelope: Envelope) -> Envelope:
                return envelope

        self.outbound = _Outbound()

    def pipeline_for(self, envelope: Envelope) -> Pipeline:
        return self.pipeline


def test_mail_from_sends_the_lookups_and_the_first_rcpt_collects_them(
    tmp_path: Path, rbl: RbldnsdServer
) -> None:
    check = dnsbl.build(
        rcpt_config(rbl.nameserver, [ZEN_LIST, DBL_LIST], transaction_cache_seconds=0)
    )
    settings = _settings(tmp_path, rbl.nameserver)
    pipeline = Pipeline(settings, {"dnsbl": check})
    runtime = _Runtime(settings, pipeline)
    envelope = Envelope(client_ip="192.0.2.11", helo="mx.example.net", mail_from="s@example.net")
    try:
        before = rbl.query_count()
        tx = Transaction(runtime, envelope, spool=True)  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while rbl.query_count() - before < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # rbldnsd logs the queries it answered
        assert rbl.query_count() - before == 2  # sent at MAIL FROM, before any RCPT
        decision = tx.add_recipient("u@example.org")
        assert codes(decision.findings) == ["DNSBL_ZEN_XBL"]
        assert rbl.query_count() - before == 2  # the RCPT asked nothing more
        assert check.stats()["prefetched"] == 1
        tx.close()
        assert check._prefetched == {}

        # A transaction whose RCPT never reaches us: closing it drops its lookups.
        tx = Transaction(runtime, envelope, spool=True)  # type: ignore[arg-type]
        assert len(check._prefetched) == 1
        tx.close()
        assert check._prefetched == {}
        # Offline judgement (no spooling front end) sends nothing ahead.
        tx = Transaction(runtime, envelope)  # type: ignore[arg-type]
        assert check._prefetched == {}
        tx.close()
    finally:
        pipeline.close()


@pytest.mark.parametrize(
    "qname", ["11.2.0.192.zen.test", "xn--bcher-kva.example.dbl.test", "a" * 63 + ".dbl.test"]
)
def test_hand_written_query_is_the_packet_dnspython_would_send(qname: str) -> None:
    name = dns.name.from_text(qname + ".")
    reference = dns.message.make_query(name, dns.rdatatype.A)
    reference.id = 0xBEEF
    assert _query_wire(0xBEEF, name) == reference.to_wire()


def test_more_queries_than_max_parallel_wait_their_turn(rbl: RbldnsdServer) -> None:
    resolver = DnsblResolver([("127.0.0.1", rbl.port)], max_parallel=1, cache_max_ttl=0)
    try:
        names = [LISTED, "10.2.0.192.zen.test", "nothing.dbl.test"]
        answers = resolver.lookup_many([("zen.test", n) for n in names], 3.0)
        assert [answers[n].status for n in names] == ["found", "found", "nxdomain"]
        assert resolver.stats()["queries"] == 3
    finally:
        resolver.close()


def test_prefetches_never_closed_are_bounded_without_deadlock(
    rbl: RbldnsdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dnsbl, "_MAX_PREFETCHED", 2)
    check = dnsbl.build(rcpt_config(rbl.nameserver, [ZEN_LIST], transaction_cache_seconds=0))
    envelopes = [Envelope(client_ip=f"192.0.2.{n}", mail_from="s@example.net") for n in (1, 2, 3)]
    handles: list[object] = []
    worker = threading.Thread(target=lambda: handles.extend(check.prefetch(e) for e in envelopes))
    worker.start()
    worker.join(5)
    try:
        assert not worker.is_alive(), "prefetch deadlocked evicting the oldest"
        assert [entry[0] for entry in check._prefetched.values()] == envelopes[1:]
        # The evicted one was closed; its envelope's RCPT simply asks again.
        findings = check.check_recipient(envelopes[0], "u@example.org")
        assert findings == []
    finally:
        check.close()


class TrickyDns:
    """A loopback DNS server (UDP and TCP on one port) that misbehaves on purpose.

    ``mode``: ``"tc"`` answers over UDP with the TC bit and no records (the full
    answer only over TCP); ``"forged"`` first sends an answer with the wrong id
    (what an off-path forger would), then the real one; ``"servfail"`` answers
    SERVFAIL. The real answer is always 127.0.0.2.
    """

    def __init__(self, mode: str) -> None:
        import socket

        self.mode = mode
        # The kernel picks a free UDP port; the same TCP port may be taken by another
        # process (a full suite runs many servers): then try another UDP port.
        for _ in range(50):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self.tcp.listen(4)
        self.udp.settimeout(0.1)
        self.tcp.settimeout(0.1)
        self.tcp_queries = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def answer(query: dns.message.Message) -> dns.message.Message:
        import dns.rrset

        response = dns.message.make_response(query)
        response.answer.append(
            dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "127.0.0.2")
        )
        return response

    def _serve_udp(self) -> None:
        import dns.flags
        import dns.rcode

        while not self._stop.is_set():
            try:
                data, client = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            if self.mode == "tc":
                response = dns.message.make_response(query)
                response.flags |= dns.flags.TC
            elif self.mode == "servfail":
                response = dns.message.make_response(query)
                response.set_rcode(dns.rcode.SERVFAIL)
            else:
                response = self.answer(query)
            if self.mode == "forged":
                forged = self.answer(query)
                forged.id = (query.id + 1) % 65536
                forged.answer[0] = dns.rrset.from_text(
                    query.question[0].name, 60, "IN", "A", "127.0.0.99"
                )
                self.udp.sendto(forged.to_wire(), client)
            self.udp.sendto(response.to_wire(), client)

    def _serve_tcp(self) -> None:
        import dns.query

        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                query, _ = dns.query.receive_tcp(conn)
                self.tcp_queries += 1
                dns.query.send_tcp(conn, self.answer(query))

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.udp.close()
        self.tcp.close()


@pytest.mark.parametrize("mode", ["tc", "forged", "servfail"])
def test_truncated_forged_and_failing_answers(mode: str) -> None:
    server = TrickyDns(mode)
    resolver = DnsblResolver([("127.0.0.1", server.port)], query_timeout=1.0, cache_max_ttl=0)
    try:
        answer = resolver.lookup("zen.test", LISTED, budget=2.0)
        if mode == "servfail":
            # Asked twice (one server, two tries), then the list counts as failing.
            assert answer.status == "error" and answer.error == "SERVFAIL"
            assert resolver.stats()["failures"] == 1
        else:
            # TC: asked again over TCP; forged id: ignored, the real answer taken.
            assert answer.status == "found" and answer.addresses == ("127.0.0.2",)
            assert server.tcp_queries == (1 if mode == "tc" else 0)
    finally:
        resolver.close()
        server.close()
