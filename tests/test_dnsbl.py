"""DNSBL/RHSBL/URIBL against a real rbldnsd on a loopback port.

Queries are counted from rbldnsd's own query log, so "costs no query" means
no packet reached the server. A small UDP proxy written here forwards to
rbldnsd but drops the queries of chosen zones: one dead list next to live ones.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dns.message
import pytest

from filterd import policy
from filterd.checks import dnsbl, uribl
from filterd.dns.engine import Engine
from filterd.dns.resolver import DnsblResolver, reverse_ip
from filterd.settings import PolicyConfig
from filterd.types import Action, Effect, Envelope, Finding, Message
from tests.servers import LoopbackUdp, RbldnsdServer, SilentUdpServer

pytestmark = pytest.mark.integration

SOA = "$SOA 600 ns.test. hostmaster.test. 1 600 600 600 45\n"
ZEN = (
    SOA + "$TTL 300\n"
    ":127.0.0.2:SBL listed\n192.0.2.10\n127.0.0.2\n"
    ":127.0.0.4:XBL listed\n192.0.2.11\n"
    ":127.0.0.10:PBL listed\n192.0.2.12\n"
    ":127.255.255.254:query through a public resolver\n192.0.2.99\n"
    ":127.0.0.200:unknown code\n192.0.2.77\n"
)
ZEN6 = ":127.0.0.2:v6 listed\n2001:db8::10\n2001:db8:bad::/48\n"
FIVE_A = ":127.0.0.2:five a\n192.0.2.20\n192.0.2.21\n"
FIVE_B = ":127.0.0.2:five b\n192.0.2.20\n"
DBL = (
    SOA + "$TTL 300\n"
    ":127.0.1.2:DBL spam\nevil.example\nxn--bcher-kva.example\nspam-sender.example\n"
    "bad-helo.example\ndbltest.com\nlinked.example\n"
    ":127.0.1.102:DBL abused legit\nabused.example\n"
    ":127.0.1.255:IP queries prohibited\nip-query.example\n"
)
ZONES = [
    ("zen.test", "ip4set", ZEN),
    ("zen.test", "ip6trie", ZEN6),
    ("five-a.test", "ip4set", FIVE_A),
    ("five-b.test", "ip4set", FIVE_B),
    ("dbl.test", "dnset", DBL),
]

ZEN_LIST: dict[str, Any] = {
    "id": "ZEN",
    "zone": "zen.test",
    "type": "ip",
    "rules": [
        {"name": "SBL", "match": "127.0.0.[2;3;9]", "weight": 10},
        {"name": "XBL", "match": "127.0.0.[4..7]", "weight": 10},
        {"name": "PBL", "match": "127.0.0.[10;11]", "weight": 3},
    ],
    "errors": ["127.255.255.[0..255]"],
}
DBL_LIST: dict[str, Any] = {
    "id": "DBL",
    "zone": "dbl.test",
    "type": "domain",
    "rules": [
        {"name": "SPAM", "match": "127.0.1.[2..99]", "weight": 10},
        {"name": "ABUSED", "match": "127.0.1.[102..199]", "weight": 3},
    ],
    "errors": ["127.0.1.255", "127.255.255.[0..255]"],
    "test_entry": "dbltest.com",
}
FIVE_LISTS: list[dict[str, Any]] = [
    {"id": name, "zone": f"{name.lower().replace('_', '-')}.test", "type": "ip",
     "rules": [{"name": "HIT", "match": "127.0.0.2", "weight": 5}]}
    for name in ("FIVE_A", "FIVE_B")
]  # fmt: skip
POLICY = PolicyConfig(reject_score=10, tag_score=5)


@pytest.fixture(scope="module")
def rbl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbldnsdServer]:
    with RbldnsdServer(tmp_path_factory.mktemp("rbldnsd"), ZONES) as server:
        yield server


def rcpt_config(nameserver: str, lists: list[dict[str, Any]], **kw: Any) -> dnsbl.Config:
    return dnsbl.Config.model_validate(
        {"nameservers": nameserver, "lists": lists, "skip_private": False, **kw}
    )


def uri_config(nameserver: str, **kw: Any) -> uribl.Config:
    return uribl.Config.model_validate({"nameservers": nameserver, "lists": [DBL_LIST], **kw})


def codes(findings: Any) -> list[str]:
    return sorted(f.code for f in findings)


def env(ip: str = "198.51.100.1", **kw: Any) -> Envelope:
    return Envelope(client_ip=ip, **kw)


class ZoneDroppingProxy(LoopbackUdp):
    """UDP forwarder to rbldnsd that silently drops queries under ``dead`` zones."""

    def __init__(self, upstream_port: int, dead: set[str]) -> None:
        super().__init__(upstream_port)
        self.dead = dead
        self.dropped = 0
        self._pool = ThreadPoolExecutor(8)
        self._thread.start()

    def handle(self, data: bytes, client: tuple[str, int]) -> None:
        qname = str(dns.message.from_wire(data).question[0].name).rstrip(".")
        if any(qname.endswith("." + zone) for zone in self.dead):
            self.dropped += 1
            return
        self._pool.submit(self._forward, data, client)

    def _forward(self, data: bytes, client: tuple[str, int]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(2)
            up.sendto(data, ("127.0.0.1", self.upstream))
            reply = up.recv(4096)
        self.sock.sendto(reply, client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._pool.shutdown(wait=True)  # forwards in flight answer before the socket closes
        self.sock.close()


# -- listed / unlisted, IPv4 and IPv6 -----------------------------------------


def test_listed_ipv4_client_gives_weighted_finding_with_postfix_reply(
    rbl: RbldnsdServer,
) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [ZEN_LIST]))
    try:
        [finding] = check.check_recipient(env("192.0.2.10"), "a@example.org")
        assert finding.code == "DNSBL_ZEN_SBL"
        assert finding.check == "dnsbl" and finding.bypassable
        assert finding.effect is Effect.SCORE and finding.score == 10
        assert finding.detail == "zen.test 127.0.0.2 (client)"
        assert str(finding.reply) == (
            "554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.test"
        )
        xbl = check.check_recipient(env("192.0.2.11"), "a@example.org")
        assert codes(xbl) == ["DNSBL_ZEN_XBL"]
        assert check.check_recipient(env("192.0.2.13"), "a@example.org") == []
        assert check.stats()["listed"] == 2 and check.stats()["unlisted"] == 1
    finally:
        check.close()


@pytest.mark.parametrize(
    ("ip", "listed"),
    [("2001:db8::10", True), ("2001:db8:bad::99", True), ("2001:db8::11", False),
     ("::ffff:192.0.2.10", True)],
)  # fmt: skip
def test_ipv6_clients_use_reversed_nibbles(rbl: RbldnsdServer, ip: str, listed: bool) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [ZEN_LIST]))
    try:
        findings = check.check_recipient(env(ip), "a@example.org")
        assert codes(findings) == (["DNSBL_ZEN_SBL"] if listed else [])
        label = reverse_ip(ip)
        assert label is not None
        assert rbl.query_count(f"{label}.zen.test") >= 1
    finally:
        check.close()


def test_list_without_ipv6_is_not_asked_about_ipv6(rbl: RbldnsdServer) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [{**ZEN_LIST, "ipv6": False}]))
    try:
        before = rbl.query_count()
        assert check.check_recipient(env("2001:db8::10"), "a@example.org") == []
        assert rbl.query_count() == before
    finally:
        check.close()


# -- weights and the threshold (through filterd.policy) -----------------------


def test_two_weight_5_lists_refuse_together_one_only_tags(rbl: RbldnsdServer) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, FIVE_LISTS))
    try:
        both = check.check_recipient(env("192.0.2.20"), "a@example.org")
        assert codes(both) == ["DNSBL_FIVE_A_HIT", "DNSBL_FIVE_B_HIT"]
        assert sum(f.score for f in both) == 10
        decision = policy.decide_recipient("a@example.org", both, POLICY, None)
        assert decision.action is Action.REJECT
        assert decision.reply is not None and decision.reply.code == 554
        assert "blocked using five-" in decision.reply.text

        one = check.check_recipient(env("192.0.2.21"), "a@example.org")
        assert codes(one) == ["DNSBL_FIVE_A_HIT"]
        assert policy.decide_recipient("a@example.org", one, POLICY, None).action is Action.ACCEPT
    finally:
        check.close()


def test_pbl_weight_feeds_the_score_without_refusing(rbl: RbldnsdServer) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [ZEN_LIST]))
    try:
        findings = check.check_recipient(env("192.0.2.12"), "a@example.org")
        assert codes(findings) == ["DNSBL_ZEN_PBL"] and findings[0].score == 3
        decision = policy.decide_recipient("a@example.org", findings, POLICY, None)
        assert decision.action is Action.ACCEPT
    finally:
        check.close()


# -- error codes, unknown codes -----------------------------------------------


def test_error_return_code_is_not_a_listing_but_counted_and_logged(
    rbl: RbldnsdServer, caplog: pytest.LogCaptureFixture
) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [ZEN_LIST]))
    try:
        findings = check.check_recipient(env("192.0.2.99"), "a@example.org")
        assert codes(findings) == ["DNSBL_UNAVAILABLE"]
        assert findings[0].score == 0
        assert "zen.test" in findings[0].detail and "127.255.255.254" in findings[0].detail
        assert check.stats()["list_errors"] == 1
        assert "127.255.255.254" in caplog.text
        decision = policy.decide_recipient("a@example.org", findings, POLICY, None)
        assert decision.action is Action.ACCEPT

        unknown = check.check_recipient(env("192.0.2.77"), "a@example.org")
        assert unknown == [] and check.stats()["unmatched_codes"] == 1
    finally:
        check.close()


# -- HELO and envelope sender (RHSBL) -----------------------------------------


def test_helo_and_sender_domains_are_checked_by_registered_domain(rbl: RbldnsdServer) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [DBL_LIST]))
    try:
        findings = check.check_recipient(
            env(helo="MX1.Bad-Helo.Example.", mail_from="x@mail.spam-sender.example"),
            "a@example.org",
        )
        assert codes(findings) == ["DNSBL_DBL_SPAM", "DNSBL_DBL_SPAM"]
        replies = sorted(str(f.reply) for f in findings)
        assert replies == [
            "554 5.7.1 Service unavailable; Helo command [bad-helo.example] blocked using dbl.test",
            "554 5.7.1 Service unavailable; Sender address [spam-sender.example] blocked "
            "using dbl.test",
        ]
        same = check.check_recipient(
            env(helo="evil.example", mail_from="x@evil.example"), "a@example.org"
        )
        assert [f.detail for f in same] == ["dbl.test 127.0.1.2 (helo, sender)"]
        assert rbl.query_count("evil.example.dbl.test") == 1
        abused = check.check_recipient(env(mail_from="x@abused.example"), "a@example.org")
        assert codes(abused) == ["DNSBL_DBL_ABUSED"] and abused[0].score == 3
        # A literal or bare HELO and the null sender are not looked up at all.
        before = rbl.query_count()
        assert check.check_recipient(env(helo="[192.0.2.1]", mail_from=""), "a@x.org") == []
        assert check.check_recipient(env(helo="localhost"), "a@x.org") == []
        assert rbl.query_count() == before
    finally:
        check.close()


def test_dbl_error_code_for_ip_queries_is_not_a_listing(rbl: RbldnsdServer) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [DBL_LIST]))
    try:
        findings = check.check_recipient(env(mail_from="x@ip-query.example"), "a@example.org")
        assert codes(findings) == ["DNSBL_UNAVAILABLE"] and findings[0].score == 0
    finally:
        check.close()


# -- skip rules -----------------------------------------------------------------


def test_private_and_authenticated_clients_skip_ip_lists(rbl: RbldnsdServer) -> None:
    config = rcpt_config(rbl.nameserver, [ZEN_LIST], skip_private=True)
    check = dnsbl.build(config)
    try:
        before = rbl.query_count()
        for ip in ("10.1.2.3", "127.0.0.2", "192.168.1.1", "fe80::1", "::1", "fd00::1"):
            assert check.check_recipient(env(ip), "a@example.org") == []
        assert check.check_recipient(env("192.0.2.10", auth_user="alice"), "a@x.org") == []
        assert rbl.query_count() == before
        # Documentation ranges are not "private": tests present them via XCLIENT.
        assert codes(check.check_recipient(env("192.0.2.10"), "a@x.org")) == ["DNSBL_ZEN_SBL"]
    finally:
        check.close()
    check = dnsbl.build(rcpt_config(rbl.nameserver, [ZEN_LIST], skip_authenticated=False))
    try:
        found = check.check_recipient(env("192.0.2.10", auth_user="alice"), "a@x.org")
        assert codes(found) == ["DNSBL_ZEN_SBL"]
    finally:
        check.close()


# -- per recipient: exemption, and RCPT #2 costs nothing ----------------------


def test_per_recipient_decision_and_second_rcpt_costs_no_query(rbl: RbldnsdServer) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [ZEN_LIST, DBL_LIST]))
    try:
        envelope = env("192.0.2.11", helo="mx.example.net", mail_from="s@example.net")
        before = rbl.query_count()
        first = check.check_recipient(envelope, "plain@example.org")
        asked = rbl.query_count() - before
        assert asked == 2  # the client IP, and example.net once for both HELO and sender
        second = check.check_recipient(envelope, "friend@example.org")
        assert rbl.query_count() - before == asked
        assert first == second and codes(first) == ["DNSBL_ZEN_XBL"]
        assert check.stats()["transaction_cache_hits"] == 1

        exempt = Finding("allowlist", "ALLOWLIST_SENDER", effect=Effect.EXEMPT, bypassable=False)
        refused = policy.decide_recipient("plain@example.org", list(first), POLICY, None)
        allowed = policy.decide_recipient("friend@example.org", [exempt, *second], POLICY, None)
        assert refused.action is Action.REJECT
        assert refused.reply is not None and "zen.test" in refused.reply.text
        assert allowed.action is Action.ACCEPT
    finally:
        check.close()


# -- caching by TTL, negative caching, coalescing -----------------------------


def test_answers_and_nxdomain_are_cached_by_their_ttl(rbl: RbldnsdServer) -> None:
    now = [1000.0]
    resolver = DnsblResolver([("127.0.0.1", rbl.port)], clock=lambda: now[0])
    try:
        listed, unlisted = "10.2.0.192.zen.test", "55.2.0.192.zen.test"
        before_l, before_u = rbl.query_count(listed), rbl.query_count(unlisted)
        first = resolver.lookup("zen.test", listed)
        assert first.status == "found" and first.ttl == 300 and not first.cached
        negative = resolver.lookup("zen.test", unlisted)
        # NXDOMAIN TTL = min(SOA TTL 600, SOA MINIMUM 45).
        assert negative.status == "nxdomain" and negative.ttl == 45
        now[0] += 44
        assert resolver.lookup("zen.test", listed).cached
        assert resolver.lookup("zen.test", unlisted).cached
        assert rbl.query_count(listed) - before_l == 1
        assert rbl.query_count(unlisted) - before_u == 1
        now[0] += 2  # negative entry expired, positive one not
        assert not resolver.lookup("zen.test", unlisted).cached
        assert resolver.lookup("zen.test", listed).cached
        assert rbl.query_count(unlisted) - before_u == 2
        now[0] += 300
        assert not resolver.lookup("zen.test", listed).cached
        assert rbl.query_count(listed) - before_l == 2
        assert resolver.stats()["cache_hits"] == 3
    finally:
        resolver.close()


def test_cache_is_bounded(rbl: RbldnsdServer) -> None:
    resolver = DnsblResolver([("127.0.0.1", rbl.port)], cache_max_entries=3)
    try:
        names = [f"{i}.2.0.192.zen.test" for i in range(100, 106)]
        resolver.lookup_many([("zen.test", n) for n in names], 3.0)
        assert len(resolver.cache) == 3
        assert resolver.stats()["cache_evictions"] == 3
    finally:
        resolver.close()


def test_burst_from_one_ip_costs_one_query(rbl: RbldnsdServer) -> None:
    check = dnsbl.build(rcpt_config(rbl.nameserver, [ZEN_LIST]))
    qname = "11.2.0.192.zen.test"
    before = rbl.query_count(qname)
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(
                pool.map(
                    lambda i: check.check_recipient(
                        env("192.0.2.11", mail_from=f"u{i}@example.net"), "a@example.org"
                    ),
                    range(32),
                )
            )
        assert all(codes(r) == ["DNSBL_ZEN_XBL"] for r in results)
        assert rbl.query_count(qname) - before == 1
    finally:
        check.close()


# -- timeouts, dead lists, the budget, the breaker ----------------------------


def test_silent_nameserver_fails_open_within_budget() -> None:
    with SilentUdpServer() as silent:
        config = rcpt_config(silent.nameserver, [ZEN_LIST, DBL_LIST], query_timeout=0.4, budget=0.8)
        check = dnsbl.build(config)
        try:
            start = time.monotonic()
            findings = check.check_recipient(
                env("192.0.2.10", helo="evil.example", mail_from="x@evil.example"), "a@x.org"
            )
            elapsed = time.monotonic() - start
            assert elapsed < config.budget + 0.5
            assert codes(findings) == ["DNSBL_UNAVAILABLE", "DNSBL_UNAVAILABLE"]
            assert all(f.score == 0 and "timeout" in f.detail for f in findings)
            assert policy.decide_recipient("a@x.org", findings, POLICY, None).action is (
                Action.ACCEPT
            )
            stats = check.stats()
            assert stats["unavailable"] == 2 and stats["resolver_timeouts"] == 2
            assert silent.datagrams_received() >= 2
        finally:
            check.close()


def test_budget_shorter_than_query_timeout_returns_at_the_budget() -> None:
    with SilentUdpServer() as silent:
        config = rcpt_config(silent.nameserver, [ZEN_LIST], query_timeout=5.0, budget=0.3)
        check = dnsbl.build(config)
        try:
            start = time.monotonic()
            findings = check.check_recipient(env("192.0.2.10"), "a@x.org")
            assert time.monotonic() - start < config.budget + 0.5
            assert codes(findings) == ["DNSBL_UNAVAILABLE"]
            assert "budget exhausted" in findings[0].detail
            assert check.stats()["resolver_budget_exhausted"] == 1
        finally:
            check.close()


def test_one_dead_list_does_not_hide_the_others(rbl: RbldnsdServer) -> None:
    proxy = ZoneDroppingProxy(rbl.port, dead={"five-b.test"})
    config = rcpt_config(proxy.nameserver, FIVE_LISTS, query_timeout=0.4, budget=1.0)
    check = dnsbl.build(config)
    try:
        start = time.monotonic()
        findings = check.check_recipient(env("192.0.2.20"), "a@example.org")
        assert time.monotonic() - start < config.budget + 0.5
        assert codes(findings) == ["DNSBL_FIVE_A_HIT", "DNSBL_UNAVAILABLE"]
        unavailable = next(f for f in findings if f.code == "DNSBL_UNAVAILABLE")
        assert unavailable.detail.startswith("five-b.test:")
        assert proxy.dropped >= 1
        # 5 points alone stay below the reject threshold: the dead list costs no refusal.
        assert policy.decide_recipient("a@x.org", findings, POLICY, None).action is (Action.ACCEPT)
    finally:
        check.close()
        proxy.close()


def test_breaker_skips_a_failing_list_for_a_while() -> None:
    with SilentUdpServer() as silent:
        config = rcpt_config(
            silent.nameserver, [ZEN_LIST], query_timeout=0.2, budget=0.5,
            breaker_failures=2, breaker_seconds=60,
        )  # fmt: skip
        check = dnsbl.build(config)
        try:
            for ip in ("192.0.2.30", "192.0.2.31"):
                assert codes(check.check_recipient(env(ip), "a@x.org")) == ["DNSBL_UNAVAILABLE"]
            sent = silent.datagrams_received()
            skipped = check.check_recipient(env("192.0.2.32"), "a@x.org")
            assert codes(skipped) == ["DNSBL_UNAVAILABLE"]
            assert "back-off" in skipped[0].detail
            assert silent.datagrams_received() == sent
            assert check.stats()["resolver_breaker_opened"] == 1
        finally:
            check.close()


def test_nothing_listening_fails_fast_as_unavailable() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # now nobody listens there: ICMP port unreachable
    check = dnsbl.build(rcpt_config(f"127.0.0.1:{port}", [ZEN_LIST], query_timeout=5, budget=5))
    try:
        findings = check.check_recipient(env("192.0.2.10"), "a@x.org")
        assert codes(findings) == ["DNSBL_UNAVAILABLE"]
        assert "refused" in findings[0].detail.lower()
    finally:
        check.close()


def test_second_nameserver_answers_when_the_first_is_silent(rbl: RbldnsdServer) -> None:
    with SilentUdpServer() as silent:
        config = rcpt_config(
            f"{silent.nameserver},{rbl.nameserver}", [ZEN_LIST], query_timeout=1.0, budget=2.0
        )
        check = dnsbl.build(config)
        try:
            findings = check.check_recipient(env("192.0.2.10"), "a@x.org")
            assert codes(findings) == ["DNSBL_ZEN_SBL"]
        finally:
            check.close()


# -- start-up self-test ------------------------------------------------------------


def test_selftest_passes_for_working_lists(rbl: RbldnsdServer) -> None:
    assert dnsbl.selftest(rcpt_config(rbl.nameserver, [ZEN_LIST, DBL_LIST])) == []
    assert uribl.selftest(uri_config(rbl.nameserver)) == []


def test_selftest_reports_missing_test_entry_error_codes_and_dead_servers(
    rbl: RbldnsdServer,
) -> None:
    missing = dnsbl.selftest(rcpt_config(rbl.nameserver, FIVE_LISTS[:1]))
    assert len(missing) == 1 and "test entry 127.0.0.2 is not listed" in missing[0]
    # A zone rbldnsd does not serve answers REFUSED.
    unserved = dnsbl.selftest(rcpt_config(rbl.nameserver, [{**ZEN_LIST, "zone": "nope.test"}]))
    assert len(unserved) == 1 and "REFUSED" in unserved[0]
    erroring = dnsbl.selftest(
        rcpt_config(rbl.nameserver, [{**ZEN_LIST, "test_entry": "192.0.2.99"}])
    )
    assert len(erroring) == 1 and "127.255.255.254" in erroring[0]
    everything = dnsbl.selftest(
        rcpt_config(
            rbl.nameserver, [{**ZEN_LIST, "zone": "five-a.test", "test_entry": "192.0.2.20"}]
        )
    )
    assert everything == []
    with SilentUdpServer() as silent:
        start = time.monotonic()
        dead = dnsbl.selftest(rcpt_config(silent.nameserver, [ZEN_LIST], query_timeout=0.3))
        assert time.monotonic() - start < 0.3 + 0.5 + 0.5
        assert len(dead) == 1 and "no answer" in dead[0]


def test_selftest_flags_a_list_that_lists_everything(tmp_path: Path) -> None:
    everything = ":127.0.0.2:everything\n0.0.0.0-255.255.255.255\n"
    with RbldnsdServer(tmp_path, [("all.test", "ip4set", everything)]) as server:
        problems = dnsbl.selftest(
            rcpt_config(server.nameserver, [{**ZEN_LIST, "zone": "all.test"}])
        )
    assert len(problems) == 1 and "lists 127.0.0.1" in problems[0]


# -- URIBL at end of message ----------------------------------------------------

HTML_MESSAGE = (
    "From: Shop <offers@news.example.org>\r\n"
    "To: a@example.org\r\n"
    "Subject: offer\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    "--b\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    "Plain text link: hxxp://WWW.LINKED.Example./offer\r\n"
    "--b\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\n"
    '<a href="HtTp://Shop.EVIL&#46;example./x">buy</a>\r\n'
    '<a href="http://b\u00fccher.example/">idn</a>\r\n'
    '<a href="https://clean.example/">fine</a>\r\n'
    "--b--\r\n"
)


def _message(text: str) -> Message:
    return Message.from_bytes(text.encode("utf-8"))


def test_uribl_finds_obfuscated_links_in_html_and_plain_text(rbl: RbldnsdServer) -> None:
    check = uribl.build(uri_config(rbl.nameserver))
    try:
        findings = check.check_message(_message(HTML_MESSAGE), exempt=False)
        assert codes(findings) == ["URIBL_DBL_SPAM"]
        [finding] = findings
        assert finding.detail == "dbl.test 127.0.1.2 (body: 3 domains)"
        assert finding.score == 10 and finding.bypassable
        assert finding.reply is not None
        assert finding.reply.text == (
            "Message content rejected; link domain [linked.example] and 2 more "
            "blocked using dbl.test"
        )
        for name in ("linked.example", "evil.example", "xn--bcher-kva.example", "clean.example"):
            assert rbl.query_count(f"{name}.dbl.test") >= 1
        assert rbl.query_count("news.example.org.dbl.test") == 0  # registered domain only
        assert rbl.query_count("example.org.dbl.test") >= 1  # From: header domain
    finally:
        check.close()


def test_uribl_checks_the_from_header_domain(rbl: RbldnsdServer) -> None:
    check = uribl.build(uri_config(rbl.nameserver))
    try:
        text = "From: x@mail.spam-sender.example\r\nTo: a@example.org\r\n\r\nhello\r\n"
        findings = check.check_message(_message(text), exempt=False)
        assert codes(findings) == ["URIBL_DBL_SPAM"]
        assert "From header domain [spam-sender.example]" in str(findings[0].reply)
        assert check.check_message(_message(text), exempt=True) == []
        off = uribl.build(uri_config(rbl.nameserver, check_from=False))
        try:
            assert off.check_message(_message(text), exempt=False) == []
        finally:
            off.close()
    finally:
        check.close()


def test_uribl_lookups_are_bounded_and_skip_list_applies(rbl: RbldnsdServer) -> None:
    links = "".join(f"http://pad{i}.bound.example{i}/\n" for i in range(40))
    text = f"From: a@example.org\r\n\r\n{links}http://evil.example/\r\n"
    check = uribl.build(uri_config(rbl.nameserver, max_uri_lookups=5, check_from=False))
    try:
        before = rbl.query_count()
        assert check.check_message(_message(text), exempt=False) == []
        assert rbl.query_count() - before == 5
        assert check.stats()["uri_lookups_capped"] == 1
    finally:
        check.close()
    padded = "From: a@example.org\r\n\r\nhttp://clean.example/ http://evil.example/\r\n"
    check = uribl.build(
        uri_config(rbl.nameserver, max_uri_lookups=1, skip_domains="clean.example,example.org")
    )
    try:
        assert codes(check.check_message(_message(padded), exempt=False)) == ["URIBL_DBL_SPAM"]
    finally:
        check.close()


def test_uribl_fails_open_when_the_list_is_silent() -> None:
    with SilentUdpServer() as silent:
        config = uri_config(silent.nameserver, query_timeout=0.3, budget=0.6)
        check = uribl.build(config)
        try:
            start = time.monotonic()
            findings = check.check_message(_message(HTML_MESSAGE), exempt=False)
            assert time.monotonic() - start < config.budget + 0.5
            assert codes(findings) == ["URIBL_UNAVAILABLE"] and findings[0].score == 0
        finally:
            check.close()


def test_engine_shares_one_query_between_identities(rbl: RbldnsdServer) -> None:
    config = uri_config(rbl.nameserver)
    engine = Engine(config, check="uribl", prefix="URIBL")
    try:
        text = "From: x@evil.example\r\n\r\nhttp://www.evil.example/\r\n"
        before = rbl.query_count("evil.example.dbl.test")
        findings = uribl.UriblCheck(config, engine).check_message(_message(text), exempt=False)
        assert sorted(f.detail for f in findings) == [
            "dbl.test 127.0.1.2 (body: 1 domain)",
            "dbl.test 127.0.1.2 (from)",
        ]
        assert rbl.query_count("evil.example.dbl.test") - before == 1
    finally:
        engine.close()


# -- through settings, the pipeline and the policy ----------------------------------


def test_pipeline_refuses_listed_client_at_rcpt_and_listed_link_at_eom(
    rbl: RbldnsdServer, tmp_path: Path
) -> None:
    from filterd.checks.base import Services
    from filterd.pipeline import Pipeline, build_checks
    from filterd.settings import load_settings

    path = tmp_path / "filterd.toml"
    path.write_text(
        '[pipeline]\nrecipient_checks = ["dnsbl"]\nmessage_checks = ["uribl"]\n'
        "[dnsbl]\nskip_private = false\n"
        '[[dnsbl.lists]]\nid = "ZEN"\nzone = "zen.test"\n'
        'rules = [{name = "SBL", match = "127.0.0.[2..3]", weight = 10},'
        ' {name = "PBL", match = "127.0.0.[10;11]", weight = 3}]\n'
        '[[uribl.lists]]\nid = "DBL"\nzone = "dbl.test"\ntype = "domain"\n'
        'rules = [{name = "SPAM", match = "127.0.1.[2..99]", weight = 10}]\n'
    )
    environ = {
        "FILTERD_DNSBL_NAMESERVERS": rbl.nameserver,
        "FILTERD_URIBL_NAMESERVERS": rbl.nameserver,
    }
    settings = load_settings(path, env=environ)
    pipeline = Pipeline(settings, build_checks(settings, Services(settings=settings)))
    try:
        listed = pipeline.judge_recipient(env("192.0.2.10"), "a@example.org", None)
        assert listed.action is Action.REJECT
        assert str(listed.reply) == (
            "554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.test"
        )
        pbl_env = env("192.0.2.12", mail_from="s@example.net")
        pbl = pipeline.judge_recipient(pbl_env, "a@example.org", None)
        assert pbl.action is Action.ACCEPT
        # The RCPT-time PBL points count again at end of message: 3 + 10 from the link.
        body = "From: s@example.net\r\nTo: a@example.org\r\n\r\nsee http://evil.example/\r\n"
        message = Message.from_bytes(body.encode(), pbl_env)
        decision = pipeline.judge_message(message, pbl.findings)
        assert decision.action is Action.REJECT
        assert decision.reason_code == "URIBL_DBL_SPAM"
        assert sum(f.score for f in decision.findings) == 13
        clean = Message.from_bytes(b"From: s@example.net\r\n\r\nhello\r\n", pbl_env)
        tagged = pipeline.judge_message(clean, pbl.findings)
        assert tagged.action is Action.ACCEPT and ("X-Spam-Flag", "YES") not in tagged.add_headers
    finally:
        pipeline.close()


def test_names_too_long_for_dns_are_skipped_and_never_trip_the_breaker(
    rbl: RbldnsdServer,
) -> None:
    from filterd.dns.engine import domain_subject

    engine = Engine(uri_config(rbl.nameserver, breaker_failures=1), check="uribl", prefix="URIBL")
    try:
        long_domain = ".".join(["a" * 60] * 4) + ".example"  # 251: valid, too long under dbl.test
        subjects = [domain_subject("body", long_domain), domain_subject("body", "evil.example")]
        for _ in range(2):  # a breaker tripped by the first call would hide the second hit
            assert codes(engine.evaluate(subjects, 2.0)) == ["URIBL_DBL_SPAM"]
        assert engine.stats()["skipped_too_long"] == 2
    finally:
        engine.close()
    resolver = DnsblResolver([("127.0.0.1", rbl.port)], breaker_failures=1)
    try:
        bad = resolver.lookup("dbl.test", f"{long_domain}.{long_domain}.dbl.test")
        assert bad.status == "error" and resolver.stats()["bad_names"] == 1
        assert resolver.lookup("dbl.test", "evil.example.dbl.test").status == "found"
    finally:
        resolver.close()
