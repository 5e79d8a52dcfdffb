"""The resolver's hand-written fast path against dnspython, on real and hostile packets.

``_fast_answer`` reads the common blocklist answers without dnspython; it must
give exactly the Answer dnspython's path gives, or step aside (None). Checked on
real rbldnsd answers (listed, not listed, with and without SOA, NODATA, several
A records) and on random, truncated, mutated and forged packets. The wire names
written without ``dns.name.from_text`` must be its bytes, and refuse what it
refuses. Finally the resolver itself, against a server that sends hostile
packets before each real answer, must end with the real answer.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from filterd.checks.dnsbl import _PRIVATE_NETS, _is_private
from filterd.dns.resolver import (
    Answer,
    DnsblResolver,
    _dnspython_outcome,
    _fast_answer,
    _query_wire,
    reverse_ip,
    wire_name,
)
from tests.servers import LoopbackUdp, RbldnsdServer

SOA = "$SOA 600 ns.test. hostmaster.test. 1 600 600 600 45\n"
ZONES = [
    ("soa.test", "ip4set", SOA + "$TTL 300\n:127.0.0.2:listed\n192.0.2.10\n"),
    ("soa.test", "dnset", SOA + ":127.0.1.2:spam\nevil.example\nboth.example\n"),
    ("soa.test", "dnset", ":127.0.1.3:also\nboth.example\n"),
    ("bare.test", "dnset", ":127.0.1.2:spam\nevil.example\n"),
    ("bare.test", "dnset", "$TTL 5\n:127.0.1.9:short ttl\nzero.example\n"),
]
# (name asked, what dnspython reads from rbldnsd's answer)
NAMES = [
    ("10.2.0.192.soa.test", "found"),  # A record, TTL 300
    ("1.1.1.1.soa.test", "nxdomain"),  # NXDOMAIN + SOA in authority
    ("evil.example.soa.test", "found"),
    ("both.example.soa.test", "found"),  # two A records, two datasets
    ("nothing.soa.test", "nxdomain"),
    ("soa.test", "nxdomain"),  # the apex: NOERROR, no answer (NODATA), SOA
    ("evil.example.bare.test", "found"),
    ("zero.example.bare.test", "found"),  # $TTL 5
    ("nothing.bare.test", "nxdomain"),  # NXDOMAIN without SOA
    ("bare.test", "nxdomain"),  # NODATA without SOA
]
QUERY_ID = 0x4A5B


@pytest.fixture(scope="module")
def rbl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbldnsdServer]:
    with RbldnsdServer(tmp_path_factory.mktemp("rbldnsd"), ZONES, log_queries=False) as server:
        yield server


def _ask(port: int, qname: str, query_id: int = QUERY_ID) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        sock.send(_query_wire(query_id, dns.name.from_text(qname + ".")))
        return sock.recv(65535)


@pytest.fixture(scope="module")
def packets(rbl: RbldnsdServer) -> dict[str, bytes]:
    return {qname: _ask(rbl.port, qname) for qname, _status in NAMES}


def _question(qname: str) -> bytes:
    return wire_name(qname) + b"\x00\x01\x00\x01"


def _resolver(negative_ttl: float = 300.0, max_ttl: float = 3600.0) -> DnsblResolver:
    # Never sends anything: only its answer readers are used.
    return DnsblResolver([("127.0.0.1", 9)], cache_negative_ttl=negative_ttl, cache_max_ttl=max_ttl)


def _by_dnspython(resolver: DnsblResolver, qname: str, data: bytes) -> Answer | None:
    """What the dnspython path makes of the packet: an Answer, or None (not one)."""
    outcome = _dnspython_outcome(data, QUERY_ID, dns.name.from_text(qname + "."))
    if not isinstance(outcome, dns.message.Message):
        return None
    return resolver._answer(qname, outcome)


def _agrees(resolver: DnsblResolver, qname: str, data: bytes) -> Answer | None:
    """The fast answer, after checking dnspython reads the packet to the same Answer."""
    fast = resolver._fast(qname, data, QUERY_ID, _question(qname))
    if fast is not None:
        assert _by_dnspython(resolver, qname, data) == fast
    return fast


@pytest.mark.integration
@pytest.mark.parametrize(("qname", "status"), NAMES)
def test_real_rbldnsd_answers_take_the_fast_path_with_dnspythons_answer(
    packets: dict[str, bytes], qname: str, status: str
) -> None:
    for resolver in (_resolver(), _resolver(negative_ttl=7.0, max_ttl=100.0), _resolver(0, 0)):
        fast = _agrees(resolver, qname, packets[qname])
        assert fast is not None, "a common rbldnsd answer fell back to dnspython"
        assert fast.status == status


@pytest.mark.integration
def test_real_answers_read_as_expected(packets: dict[str, bytes]) -> None:
    resolver = _resolver(negative_ttl=7.0)
    read = {q: resolver._fast(q, packets[q], QUERY_ID, _question(q)) for q, _ in NAMES}
    assert read["10.2.0.192.soa.test"] == Answer(
        "10.2.0.192.soa.test", "found", ("127.0.0.2",), ttl=300.0
    )
    both = read["both.example.soa.test"]
    assert both is not None and both.addresses == ("127.0.1.2", "127.0.1.3")
    assert read["1.1.1.1.soa.test"].ttl == 45.0  # type: ignore[union-attr]  # min(TTL, MINIMUM)
    assert read["soa.test"].ttl == 45.0  # type: ignore[union-attr]
    assert read["nothing.bare.test"].ttl == 7.0  # type: ignore[union-attr]  # no SOA: default
    assert read["zero.example.bare.test"].ttl == 5.0  # type: ignore[union-attr]


@pytest.mark.integration
def test_answers_to_another_id_or_question_are_never_taken(packets: dict[str, bytes]) -> None:
    resolver = _resolver()
    listed = packets["10.2.0.192.soa.test"]
    # Our id on someone else's question: neither path takes it.
    assert (
        resolver._fast("1.1.1.1.soa.test", listed, QUERY_ID, _question("1.1.1.1.soa.test")) is None
    )
    assert _by_dnspython(resolver, "1.1.1.1.soa.test", listed) is None
    # Right question, wrong id.
    assert resolver._fast("10.2.0.192.soa.test", listed, QUERY_ID + 1, _question(
        "10.2.0.192.soa.test")) is None  # fmt: skip
    # A query (QR clear) echoed back is no answer.
    query = bytearray(listed)
    query[2] &= 0x7F
    assert _agrees(resolver, "10.2.0.192.soa.test", bytes(query)) is None
    # Same name in another case: dnspython's business (names compare case-blind).
    upper = listed.replace(b"soa", b"SOA", 1)
    assert resolver._fast("10.2.0.192.soa.test", upper, QUERY_ID, _question(
        "10.2.0.192.soa.test")) is None  # fmt: skip
    assert _by_dnspython(resolver, "10.2.0.192.soa.test", upper) is not None


@pytest.mark.integration
def test_every_header_flag_agrees_with_dnspython(packets: dict[str, bytes]) -> None:
    # QR, opcode, AA, TC, RD (high byte) and RA, Z, AD, CD (low byte) in every
    # combination, with rcodes NOERROR, NXDOMAIN and SERVFAIL.
    resolver = _resolver()
    for qname, _status in NAMES:
        data = packets[qname]
        for high in range(256):
            for low in (0x00, 0x03, 0x02, 0xF0, 0xF3):
                _agrees(resolver, qname, data[:2] + bytes((high, low)) + data[4:])


def _soa_nxdomain(qname: str, authority: bytes, nscount: int = 1) -> bytes:
    header = struct.pack("!HHHHHH", QUERY_ID, 0x8583, 1, 0, nscount, 0)
    return header + _question(qname) + authority


@pytest.mark.parametrize(
    "authority",
    [
        b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x00\x2d\x00\x16"
        + b"\xc0\x0c" * 1
        + b"\x00"
        + b"\x00" * 19,  # rdata one byte short of its names + 20 octets
        b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x00\x2d\x00\x18\xc0\x28\x00"
        + b"\x00" * 20,  # pointer forward
        b"\xc0\x1c\x00\x06\x00\x01\x00\x00\x00\x2d\x00\x16\x00\x00"
        + b"\x00" * 20,  # pointer to itself
        b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x00\x2d\x00\x17\x40\x00\x00"
        + b"\x00" * 20,  # label type 01
        b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x00\x2d\x00\x16\x00\x00" + b"\x00" * 10,  # cut
        b"\xc0\x0c\x00\x06\x00\x03\x00\x00\x00\x2d\x00\x16\x00\x00" + b"\x00" * 20,  # class CH
        b"\xc0\x0c\x00\x02\x00\x01\x00\x00\x00\x2d\x00\x02\xc0\x0c",  # NS, not SOA
        b"\xc0\x0c\x00\x06\x00\x01\xff\xff\xff\xff\x00\x16\x00\x00"
        + b"\x00" * 16
        + b"\x00\x00\x00\x09",  # TTL > 2^31-1: read as 0
        b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x00\x2d\x00\x16\x00\x00"
        + b"\x00" * 16
        + b"\xff\xff\xff\xff",  # MINIMUM 2^32-1
    ],
)
def test_hostile_authority_sections_agree_with_dnspython(authority: bytes) -> None:
    _agrees(_resolver(), "x.soa.test", _soa_nxdomain("x.soa.test", authority))


def test_compression_loops_and_long_pointer_chains_never_hang_or_crash() -> None:
    qname = "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.soa.test"
    question = _question(qname)
    # A pointer to itself, two pointers to each other, and 17 backward hops.
    loops = [
        b"\xc0\x00" + struct.pack("!HHIH", 6, 1, 9, 22),
        b"\xc0\x00" + struct.pack("!HHIH", 6, 1, 9, 22) + b"\xc0\x20\xc0\x1e" + b"\x00" * 20,
    ]
    here = 12 + len(question)
    loops.append(struct.pack("!H", 0xC000 | here) + struct.pack("!HHIH", 6, 1, 9, 22))
    chain = b"".join(struct.pack("!H", 0xC000 | (12 + 2 * i)) for i in range(20))
    loops.append(chain)
    for authority in loops:
        data = _soa_nxdomain(qname, authority)
        assert _fast_answer(data, QUERY_ID, question) is None
        _agrees(_resolver(), qname, data)


def _mutations() -> st.SearchStrategy[tuple[int, bytes]]:
    """(index into NAMES, packet) where the packet is rbldnsd's answer, mutated."""
    return st.tuples(
        st.integers(0, len(NAMES) - 1),
        st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
        st.integers(0, 200),
        st.binary(max_size=8),
    )  # type: ignore[return-value]


@pytest.mark.integration
@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_mutations())
def test_mutated_real_answers_never_crash_and_never_disagree(
    packets: dict[str, bytes], case: tuple[int, list[tuple[int, int]], int, bytes]
) -> None:
    index, flips, cut, tail = case  # type: ignore[misc]
    qname = NAMES[index][0]
    data = bytearray(packets[qname])
    for where, value in flips:
        if where < len(data):
            data[where] = value
    packet = bytes(data[: max(cut, 2)]) + tail if cut < len(data) else bytes(data) + tail
    for resolver in (_resolver(), _resolver(negative_ttl=0, max_ttl=0)):
        _agrees(resolver, qname, packet)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([q for q, _ in NAMES]))
@example(b"", "x.soa.test")
@example(b"\x4a\x5b", "x.soa.test")
def test_random_bytes_never_crash_and_never_disagree(data: bytes, qname: str) -> None:
    # Random bytes behind a real header and question, and on their own.
    header = struct.pack("!HHHHHH", QUERY_ID, 0x8580 | (data[0] & 3 if data else 0), 1,
                         data[1] % 3 if len(data) > 1 else 0,
                         data[2] % 2 if len(data) > 2 else 0, 0)  # fmt: skip
    for packet in (data, header + _question(qname) + data):
        _agrees(_resolver(), qname, packet)


def _boundaries(qname: str) -> list[int]:
    """Offsets of the question's labels in the packet (valid compression targets)."""
    offsets, at = [], 12
    for label in qname.split("."):
        offsets.append(at)
        at += 1 + len(label)
    return offsets


def _name_bytes(qname: str) -> st.SearchStrategy[bytes]:
    """A wire name: mostly well formed (labels, then the root or a pointer into the
    question), sometimes wild (labels up to 70 octets, any pointer, odd bytes)."""
    good_end = st.sampled_from(
        [b"\x00"] + [struct.pack("!H", 0xC000 | at) for at in _boundaries(qname)]
    )
    good = st.builds(
        lambda labels, end: b"".join(bytes((len(x),)) + x for x in labels) + end,
        st.lists(st.binary(min_size=1, max_size=63), max_size=3),
        good_end,
    )
    label = st.integers(0, 70).map(lambda n: bytes((n,)) + b"x" * n)
    pointer = st.integers(0, 120).map(lambda at: struct.pack("!H", 0xC000 | at))
    odd = st.sampled_from([b"\x40", b"\x80", b"\xc0", b"\x3f", b""])
    wild = st.builds(
        lambda parts, tail: b"".join(parts) + tail,
        st.lists(st.one_of(label, label, pointer, odd), max_size=6),
        good_end | pointer | odd,
    )
    return st.one_of(good, good, wild)


_TTLS = st.sampled_from([0, 1, 300, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)


@st.composite
def _crafted(draw: st.DrawFn) -> tuple[str, bytes]:
    """A response to our query built field by field: shaped as the fast path
    expects (each field still varied within what it accepts), or with one chosen
    field off, or with any field off."""
    qname = draw(st.sampled_from([q for q, _ in NAMES]))
    # 0: every field as the fast path expects; 1-8: only that field off; 9: any field off.
    mode = draw(st.integers(0, 9))
    fields = iter(range(1, 1000))

    def pick(good: st.SearchStrategy[object], bad: st.SearchStrategy[object]) -> object:
        field = next(fields)
        if mode == 9:
            return draw(good | bad)
        return draw(bad if field == mode else good)

    nxdomain = draw(st.booleans())
    flags = pick(
        st.sampled_from([0x8583, 0x8183, 0x85F3] if nxdomain else [0x8580, 0x8180, 0x8500]),
        st.integers(0, 0xFFFF),
    )
    answers = []
    for _ in range(draw(st.integers(0, 0 if nxdomain and mode != 9 else 3))):
        owner = pick(st.just(b"\xc0\x0c"), _name_bytes(qname))
        rdtype, rdclass = pick(st.just((1, 1)), st.sampled_from([(5, 1), (6, 1), (1, 3), (28, 1)]))
        rdata = pick(st.binary(min_size=4, max_size=4), st.binary(max_size=8))
        answers.append(
            owner + struct.pack("!HHIH", rdtype, rdclass, draw(_TTLS), len(rdata)) + rdata  # type: ignore[arg-type]
        )
    authority = []
    for _ in range(pick(st.integers(0, 1), st.integers(0, 2))):  # type: ignore[call-overload]
        owner = draw(_name_bytes(qname))
        rdata = (
            draw(_name_bytes(qname))
            + draw(_name_bytes(qname))
            + draw(st.binary(min_size=20, max_size=20))
        )
        rdlength = len(rdata) + pick(st.just(0), st.sampled_from([-1, 1, -20, 5]))  # type: ignore[operator]
        rdtype, rdclass = pick(st.just((6, 1)), st.sampled_from([(2, 1), (1, 1), (6, 3)]))
        authority.append(
            owner + struct.pack("!HHIH", rdtype, rdclass, draw(_TTLS), max(0, rdlength)) + rdata  # type: ignore[arg-type]
        )
    counts = pick(
        st.just((len(answers), len(authority), 0)),
        st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 1)),
    )
    header = struct.pack("!HHHHHH", QUERY_ID, flags, 1, *counts)  # type: ignore[misc]
    tail = draw(st.binary(max_size=6))
    return qname, header + _question(qname) + b"".join(answers) + b"".join(authority) + tail


@settings(max_examples=1000, deadline=None)
@given(_crafted())
def test_crafted_answers_never_crash_and_never_disagree(case: tuple[str, bytes]) -> None:
    qname, packet = case
    for resolver in (_resolver(), _resolver(negative_ttl=0, max_ttl=0)):
        _agrees(resolver, qname, packet)


def test_names_dnspython_rejects_are_rejected() -> None:
    qname = "x.soa.test"
    question = _question(qname)
    at = 12 + len(question)  # where the authority record begins
    soa_tail = struct.pack("!HHIH", 6, 1, 9, 22) + b"\x00\x00" + b"\x00" * 20
    longer = b"".join(bytes((63,)) + b"a" * 63 for _ in range(4))  # 256 octets with the root
    overlap = b"\x01\x00" + struct.pack("!H", 0xC000 | (at - 1))  # target runs into this name
    for owner in (longer + b"\x00", overlap, b"\x01\x00\xc0\x0c"):
        data = _soa_nxdomain(qname, owner + soa_tail)
        fast = _fast_answer(data, QUERY_ID, question)
        _agrees(_resolver(), qname, data)
        if owner == b"\x01\x00\xc0\x0c":
            assert fast is not None  # the control: a valid name is read
        else:
            assert fast is None
    # RDATA longer than its names and 20 octets: dnspython rejects the record.
    data = _soa_nxdomain(qname, b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, 9, 23)
                         + b"\x00\x00" + b"\x00" * 21)  # fmt: skip
    assert _fast_answer(data, QUERY_ID, question) is None
    _agrees(_resolver(), qname, data)


NAME_TEXT = st.text(
    alphabet=st.sampled_from("ab-_.\\09@ *é" + "Z"), min_size=0, max_size=70
) | st.builds(
    ".".join,
    st.lists(st.text(alphabet="abc", min_size=0, max_size=70), min_size=1, max_size=6),
)


@settings(max_examples=1000, deadline=None)
@given(NAME_TEXT)
@example("a" * 63 + ".b")
@example("a" * 64 + ".b")
@example(".".join(["a" * 63] * 3) + "." + "a" * 61)  # 253 characters: 255 octets
@example(".".join(["a" * 63] * 3) + "." + "a" * 62)  # 256 octets
@example("a..b")
@example("")
def test_wire_names_are_dnspythons_and_refuse_what_it_refuses(text: str) -> None:
    try:
        expected: bytes | None = dns.name.from_text(text + ".").to_wire()
    except dns.exception.DNSException:
        expected = None
    try:
        got: bytes | None = wire_name(text)
    except dns.exception.DNSException:
        got = None
    assert got == expected


class HostileDns(LoopbackUdp):
    """UDP on loopback: before each real rbldnsd answer, hostile packets for the same query.

    Each query gets: random bytes, the real answer with a wrong id, the answer to
    another name (listed) carrying this query's id, a listed answer with a wrong
    question, a truncated copy and a copy with a compression loop; then the real
    answer. Seeded: the same packets every run.
    """

    def __init__(self, upstream: int) -> None:
        super().__init__(upstream)
        self.rng = random.Random(12)
        self._thread.start()

    def answer(self, query: dns.message.Message, client: tuple[str, int]) -> None:
        qid = query.id
        real = _ask(self.upstream, str(query.question[0].name).rstrip("."), qid)
        listed = _ask(self.upstream, "10.2.0.192.soa.test", qid)
        wrong_question = dns.message.make_response(query)
        wrong_question.question[0].name = dns.name.from_text("10.2.0.192.soa.test.")
        wrong_question.answer.append(
            dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "127.0.0.2")
        )
        loop = bytearray(real)
        loop[12:14] = b"\xc0\x0c"
        hostile = [
            bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(40))),
            struct.pack("!H", (qid + 1) % 65536) + real[2:],
            listed,
            wrong_question.to_wire(),
            real[: len(real) // 2],
            bytes(loop),
        ]
        for packet in hostile:
            self.sock.sendto(packet, client)
        self.sock.sendto(real, client)


@pytest.mark.integration
def test_resolver_ignores_hostile_packets_and_takes_the_real_answer(rbl: RbldnsdServer) -> None:
    server = HostileDns(rbl.port)
    resolver = DnsblResolver([("127.0.0.1", server.port)], query_timeout=2.0, cache_max_ttl=0)
    try:
        names = ["1.1.1.1.soa.test", "nothing.bare.test", "evil.example.bare.test", "soa.test"]
        answers = resolver.lookup_many([("soa.test", n) for n in names], 3.0)
        assert {n: answers[n].status for n in names} == {
            "1.1.1.1.soa.test": "nxdomain",
            "nothing.bare.test": "nxdomain",
            "evil.example.bare.test": "found",
            "soa.test": "nxdomain",
        }
        assert answers["evil.example.bare.test"].addresses == ("127.0.1.2",)
        stats = resolver.stats()
        assert stats["queries"] == 4 and "failures" not in stats and "timeouts" not in stats
    finally:
        resolver.close()
        server.close()


def _reverse_by_ipaddress(address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


def _private_by_ipaddress(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _PRIVATE_NETS if net.version == ip.version)


ADDRESS_TEXT = (
    st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v)))
    | st.lists(st.integers(0, 300).map(str) | st.sampled_from(["01", "00", "٣", " 1", "1 ", ""]),
               min_size=3, max_size=5).map(".".join)
    | st.sampled_from(["[192.0.2.1]", "IPv6:::ffff:10.0.0.1", "::ffff:192.0.2.1", "2001:db8::1",
                       "192.0.2.1\n", " 10.0.0.1", "172.31.255.255", "172.32.0.0", "100.127.1.1",
                       "100.128.0.0", "255.255.255.255", "0.0.0.0", "1.2.3.4.5"])
)  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(ADDRESS_TEXT)
def test_ipv4_fast_paths_read_addresses_as_ipaddress_does(address: str) -> None:
    assert reverse_ip(address) == _reverse_by_ipaddress(address)
    assert _is_private(address) == _private_by_ipaddress(address)


class ScriptedDns(LoopbackUdp):
    """UDP on loopback that records each query (source port, id, name) and answers
    through rbldnsd; with ``late``, it holds the first query's answer (rewritten
    to say 127.0.0.99) until the retry has come, then sends it before the retry's
    own answer."""

    def __init__(self, upstream: int, late: bool = False) -> None:
        super().__init__(upstream)
        self.late = late
        self.seen: list[tuple[int, int, str]] = []
        self._held: bytes | None = None
        self._thread.start()

    def answer(self, query: dns.message.Message, client: tuple[str, int]) -> None:
        name = str(query.question[0].name).rstrip(".")
        self.seen.append((client[1], query.id, name))
        real = _ask(self.upstream, name, query.id)
        if self.late and len(self.seen) == 1:
            forged = dns.message.make_response(query)
            forged.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", "127.0.0.99"))
            self._held = forged.to_wire()
            return
        if self._held is not None:
            self.sock.sendto(self._held, client)
            self._held = None
        self.sock.sendto(real, client)


@pytest.mark.integration
def test_one_call_uses_one_socket_with_distinct_ids(rbl: RbldnsdServer) -> None:
    server = ScriptedDns(rbl.port)
    resolver = DnsblResolver([("127.0.0.1", server.port)], cache_max_ttl=0)
    try:
        names = [f"n{i}.soa.test" for i in range(20)] + ["evil.example.soa.test"]
        answers = resolver.lookup_many([("soa.test", n) for n in names], 3.0)
        assert answers["evil.example.soa.test"].addresses == ("127.0.1.2",)
        assert all(answers[n].status == "nxdomain" for n in names[:-1])
        assert sorted(name for _port, _id, name in server.seen) == sorted(names)
        assert len({port for port, _id, _name in server.seen}) == 1  # one socket for the call
        assert len({qid for _port, qid, _name in server.seen}) == len(names)  # one id per try
    finally:
        resolver.close()
        server.close()


@pytest.mark.integration
def test_a_late_answer_to_an_earlier_try_is_not_taken_for_the_retry(rbl: RbldnsdServer) -> None:
    # One server, two tries: the first try's answer comes after the retry was sent,
    # on the same socket. Only the retry's id is awaited then, as when each try had
    # its own socket; the held answer (127.0.0.99) must not become a listing.
    server = ScriptedDns(rbl.port, late=True)
    resolver = DnsblResolver([("127.0.0.1", server.port)], query_timeout=0.4, cache_max_ttl=0)
    try:
        answer = resolver.lookup("soa.test", "nothing.soa.test", budget=2.0)
        assert answer.status == "nxdomain"
        assert len(server.seen) == 2 and server.seen[0][1] != server.seen[1][1]
        assert server.seen[0][0] == server.seen[1][0]  # the retry went out on the same socket
    finally:
        resolver.close()
        server.close()


@pytest.mark.integration
def test_a_coalesced_caller_gets_the_senders_answer(rbl: RbldnsdServer) -> None:
    # Caching off: the second call's only way to its answer is the first call's query.
    resolver = DnsblResolver([("127.0.0.1", rbl.port)], cache_max_ttl=0)
    try:
        first = resolver.start_many([("soa.test", "evil.example.soa.test")])
        second = resolver.start_many([("soa.test", "evil.example.soa.test")])
        assert resolver.stats()["coalesced"] == 1 and resolver.stats()["queries"] == 1
        got: dict[str, Answer] = {}
        waiter = threading.Thread(target=lambda: got.update(second.collect(time.monotonic() + 3.0)))
        waiter.start()
        answers = first.collect(time.monotonic() + 3.0)
        waiter.join(5)
        assert answers["evil.example.soa.test"].addresses == ("127.0.1.2",)
        assert got == answers
        assert resolver._inflight == {}
    finally:
        resolver.close()


def _dead_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()  # now nobody listens there: ICMP port unreachable
    return port


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_every_query_to_a_server_nobody_listens_on_fails_at_once(count: int) -> None:
    # The tries share a socket, so one try's ICMP error may surface at another's
    # send; each must still fail as refused, not wait out its try. A try that
    # waited would still be waiting at the budget (tries last 15 s here).
    resolver = DnsblResolver([("127.0.0.1", _dead_port())], query_timeout=30.0)
    try:
        names = [f"n{i}.soa.test" for i in range(count)]
        answers = resolver.lookup_many([("soa.test", n) for n in names], 1.0)
        assert all("refused" in answers[n].error.lower() for n in names), answers
        # Each query sent once and refused once, as with a socket per query.
        assert resolver.stats()["failures"] == count and resolver.stats()["queries"] == count
    finally:
        resolver.close()


@pytest.mark.integration
def test_queries_move_on_to_the_next_server_when_the_first_is_unreachable(
    rbl: RbldnsdServer,
) -> None:
    servers = [("127.0.0.1", _dead_port()), ("127.0.0.1", rbl.port)]
    resolver = DnsblResolver(servers, query_timeout=30.0, cache_max_ttl=0)
    try:
        names = [f"n{i}.soa.test" for i in range(6)] + ["evil.example.soa.test"]
        answers = resolver.lookup_many([("soa.test", n) for n in names], 1.0)
        assert [answers[n].status for n in names] == ["nxdomain"] * 6 + ["found"]
    finally:
        resolver.close()
