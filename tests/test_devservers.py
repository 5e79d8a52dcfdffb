"""The dev servers really run, answer, and stop: everything else's tests stand on them."""

from __future__ import annotations

import io
import ipaddress
import os
import signal
import socket
import struct
import time
import zipfile
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest
import redis

from filterd.services.clamd import MEMORY_DIR, _remove_own_dir, memory_root
from tests.conftest import HARMLESS_TEST_VIRUS, PostfixFactory, RbldnsdFactory
from tests.servers import (
    EICAR_SIGNATURE_NAME,
    TEST_VIRUS_SIGNATURE_NAME,
    ClamdServer,
    PostfixServer,
    RedisServer,
    ServerStartError,
    SilentUdpServer,
    SmtpSink,
    free_port,
    make_reachable,
    project_signature_dir,
    send_mail,
    wait_for_tcp,
)

pytestmark = pytest.mark.integration


def instream(address: str, data: bytes) -> str:
    """clamd's INSTREAM, written out here so the test does not trust any client code."""
    kind, _sep, rest = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = rest
    else:
        host, _sep, port = rest.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    with sock:
        sock.settimeout(10)
        sock.connect(target)
        sock.sendall(b"zINSTREAM\0" + struct.pack(">I", len(data)) + data + struct.pack(">I", 0))
        reply = b""
        while not reply.endswith(b"\0"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.rstrip(b"\0").decode()


def mail(subject: str, body: str = "hello\n") -> bytes:
    return (
        f"From: alice@example.net\nTo: bob@example.org\nSubject: {subject}\n"
        f"Message-ID: <{subject}@example.net>\n\n{body}"
    ).encode()


# --- helpers ----------------------------------------------------------------------------------


def test_free_port_and_wait_for_tcp() -> None:
    port = free_port()
    with pytest.raises(TimeoutError):
        wait_for_tcp("127.0.0.1", port, 0.2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        wait_for_tcp("127.0.0.1", listener.getsockname()[1], 2.0)
    assert 0 < free_port("udp") < 65536


def test_only_loopback_is_ever_contacted() -> None:
    with pytest.raises(ValueError, match="loopback"):
        wait_for_tcp("192.0.2.1", 25, 0.1)
    with pytest.raises(ValueError, match="loopback"):
        send_mail(25, "a@example.net", ["b@example.org"], b"x", host="192.0.2.1")
    with pytest.raises(ValueError):
        wait_for_tcp("localhost.example", 25, 0.1)


# --- Redis ------------------------------------------------------------------------------------


def test_redis_ping_set_get(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        client.set("filterd:test", "1")
        assert client.get("filterd:test") == b"1"
    finally:
        client.close()


def test_redis_url_is_flushed_per_test(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.get("filterd:test") is None
    finally:
        client.close()


def test_persistent_redis_on_unix_socket_keeps_data_across_restart(tmp_path: Path) -> None:
    server = RedisServer(make_reachable(tmp_path / "r"), persistent=True, unix_socket=True)
    assert server.url == f"unix://{tmp_path / 'r' / 'redis.sock'}?db=0"
    with server:
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        client.close()
    assert not server.running
    with server:
        client = redis.Redis.from_url(server.url)
        assert client.get("kept") == b"yes"
        client.close()
    server.stop()  # idempotent


# --- clamd ------------------------------------------------------------------------------------


def test_clamd_finds_eicar_and_the_project_signature(
    clamd_server: ClamdServer, eicar: bytes
) -> None:
    assert clamd_server.address == f"tcp:127.0.0.1:{clamd_server.port}"
    assert instream(clamd_server.address, eicar) == f"stream: {EICAR_SIGNATURE_NAME} FOUND"
    assert EICAR_SIGNATURE_NAME == "Eicar-Test-Signature.UNOFFICIAL"
    harmless = b"some text " + HARMLESS_TEST_VIRUS + b" more text"
    assert instream(clamd_server.address, harmless) == f"stream: {TEST_VIRUS_SIGNATURE_NAME} FOUND"
    assert instream(clamd_server.address, b"Subject: hi\r\n\r\nclean\r\n") == "stream: OK"


def test_clamd_scans_inside_archives(clamd_server: ClamdServer, eicar: bytes) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", b"x" * 1000 + eicar)
    assert instream(clamd_server.address, buf.getvalue()) == f"stream: {EICAR_SIGNATURE_NAME} FOUND"


def test_clamd_restart_keeps_its_address(tmp_path: Path, eicar: bytes) -> None:
    with ClamdServer(make_reachable(tmp_path / "c"), project_signature_dir()) as server:
        address = server.address
        assert server.start_seconds is not None and server.start_seconds < 10
        server.stop()
        assert not server.running
        with pytest.raises(OSError):
            instream(address, b"clean")
        server.restart()
        assert server.address == address
        assert instream(address, eicar).endswith("FOUND")


def test_clamd_on_unix_socket(tmp_path: Path) -> None:
    with ClamdServer(
        make_reachable(tmp_path / "c"), project_signature_dir(), unix_socket=True
    ) as s:
        assert s.address == f"unix:{tmp_path / 'c' / 'clamd.sock'}"
        assert instream(s.address, b"clean") == "stream: OK"
    assert not (tmp_path / "c" / "clamd.sock").exists()


def test_clamd_spools_scanned_mail_in_memory_privately_and_leaves_nothing(
    tmp_path: Path, eicar: bytes
) -> None:
    if memory_root("50M") is None:
        pytest.skip(f"{MEMORY_DIR} lacks the room (a small container /dev/shm)")
    workdir = make_reachable(tmp_path / "c")
    with ClamdServer(workdir, project_signature_dir(), unix_socket=True) as server:
        spool = server.temp_dir
        assert spool.parent == MEMORY_DIR
        info = spool.lstat()
        assert info.st_mode & 0o777 == 0o700 and info.st_uid == os.getuid()
        assert f"TemporaryDirectory {spool}" in server.config_path.read_text()
        assert instream(server.address, b"x" * 200_000 + eicar).endswith("FOUND")
        assert instream(server.address, b"clean") == "stream: OK"
        # A clamd killed mid-scan leaves mail behind; the next start removes it.
        (spool / "left-by-a-killed-clamd").write_bytes(b"mail")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.running and time.monotonic() < deadline:
            time.sleep(0.05)
        server.start()
        assert not spool.exists() and server.temp_dir.is_dir() and server.temp_dir != spool
        again = server.temp_dir
    assert not again.exists() and not (workdir / "spool-dir").exists()


def test_memory_root_needs_room(tmp_path: Path) -> None:
    assert memory_root("50M", tmp_path) == tmp_path
    # Not room for eight streams of the largest size: the temp directory stays in workdir.
    assert memory_root("999999999M", tmp_path) is None
    assert memory_root("50M", tmp_path / "missing") is None


def test_a_planted_symlink_or_foreign_directory_is_never_removed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    link = tmp_path / "filterd-clamd-planted"
    link.symlink_to(target)
    _remove_own_dir(link)
    assert (target / "keep").exists() and link.is_symlink()
    own = tmp_path / "filterd-clamd-own"
    own.mkdir()
    (own / "left").write_text("mail")
    _remove_own_dir(own)
    assert not own.exists()


def test_clamd_start_failure_carries_its_log(tmp_path: Path) -> None:
    empty = make_reachable(tmp_path / "empty-db")
    server = ClamdServer(make_reachable(tmp_path / "c"), empty)
    with pytest.raises(ServerStartError, match=r"(?s)clamd exited.*clamd\.log"):
        server.start()
    assert not server.running
    assert not server.temp_dir.exists() or server.temp_dir.parent == server.workdir
    server.stop()


# --- rbldnsd ----------------------------------------------------------------------------------

SOA = "$SOA 0 ns.test. hostmaster.test. 1 600 600 600 60\n"
ZONES = [
    ("zen.test", "ip4set", "$TTL 5\n:127.0.0.2:Listed: $\n192.0.2.10\n198.51.100.0/24\n"),
    ("zen.test", "ip6trie", ":127.0.0.3:IPv6 listed\n2001:db8:bad::/48\n"),
    ("dbl.test", "dnset", SOA + ":127.0.1.2:Domain listed\nspam.example\n.evil.example\n"),
]


def v6_name(address: str, zone: str) -> str:
    nibbles = ipaddress.ip_address(address).exploded.replace(":", "")
    return ".".join(reversed(nibbles)) + "." + zone


def test_rbldnsd_answers_listed_and_unlisted(rbldnsd: RbldnsdFactory) -> None:
    rbl = rbldnsd(ZONES, ttl=30)
    assert rbl.nameserver == f"127.0.0.1:{rbl.port}"
    res = rbl.resolver()

    answer = res.resolve("10.2.0.192.zen.test", "A")
    assert [r.to_text() for r in answer] == ["127.0.0.2"]
    assert answer.rrset is not None and answer.rrset.ttl == 5  # $TTL in the data file
    txt = res.resolve("10.2.0.192.zen.test", "TXT")
    assert [r.to_text() for r in txt] == ['"Listed: 192.0.2.10"']
    assert [r.to_text() for r in res.resolve("7.100.51.198.zen.test", "A")] == ["127.0.0.2"]

    v6 = res.resolve(v6_name("2001:db8:bad::25", "zen.test"), "A")
    assert [r.to_text() for r in v6] == ["127.0.0.3"]

    dom = res.resolve("spam.example.dbl.test", "A")
    assert [r.to_text() for r in dom] == ["127.0.1.2"]
    assert dom.rrset is not None and dom.rrset.ttl == 30  # -t default
    assert [r.to_text() for r in res.resolve("a.b.evil.example.dbl.test", "A")] == ["127.0.1.2"]

    for unlisted in (
        "11.2.0.192.zen.test",
        v6_name("2001:db8:900d::1", "zen.test"),
        "ham.example.dbl.test",
        "x.spam.example.dbl.test",  # spam.example lists only itself
    ):
        with pytest.raises(dns.resolver.NXDOMAIN):
            res.resolve(unlisted, "A")

    # A zone it does not serve: REFUSED at once (no timeout).
    reply = dns.query.udp(dns.message.make_query("x.other.test", "A"), "127.0.0.1", port=rbl.port)
    assert reply.rcode() == dns.rcode.REFUSED

    assert rbl.query_count("10.2.0.192.zen.test") == 2  # A and TXT; the probe is not counted
    assert rbl.query_count() == 11  # 6 answered, 4 NXDOMAIN, 1 REFUSED
    assert rbl.queries()[0].rcode == "NOERROR"


def test_rbldnsd_bad_zone_fails_fast(rbldnsd: RbldnsdFactory) -> None:
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="unknown dataset type"):
        rbldnsd([("bl.test", "nosuchtype", "192.0.2.1\n")])
    assert time.monotonic() - started < 5


def test_silent_udp_server_times_out() -> None:
    with SilentUdpServer() as silent:
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = ["127.0.0.1"]
        res.port = silent.port
        res.lifetime = 0.3
        started = time.monotonic()
        with pytest.raises(dns.resolver.LifetimeTimeout):
            res.resolve("2.0.0.127.zen.test", "A")
        assert 0.25 < time.monotonic() - started < 2
        assert silent.datagrams_received() >= 1
    with pytest.raises(RuntimeError):
        _ = silent.port


# --- smtp-sink and Postfix --------------------------------------------------------------------


def test_smtp_sink_dumps_envelope_and_message(smtp_sink: SmtpSink) -> None:
    result = send_mail(
        smtp_sink.port, "alice@example.net", ["bob@example.org", "carol@example.com"],
        mail("sink", body="line one\n.leading dot\n"),
    )  # fmt: skip
    assert result.accepted, result
    [delivery] = smtp_sink.deliveries()
    assert delivery.mail_from == "alice@example.net"
    assert delivery.recipients == ["bob@example.org", "carol@example.com"]
    assert delivery.helo == "client.example.net"
    assert delivery.data.endswith(b"\n\nline one\n.leading dot\n")
    assert smtp_sink.delivered_recipients() == ["bob@example.org", "carol@example.com"]
    smtp_sink.clear()
    assert smtp_sink.messages() == []


def test_postfix_relays_to_its_sink(postfix_factory: PostfixFactory) -> None:
    postfix = postfix_factory()
    assert postfix.sink is not None
    result = send_mail(
        postfix.port, "alice@example.net", ["bob@example.org", "dave@elsewhere.test"],
        mail("relay"),
    )  # fmt: skip
    assert result.banner.code == 220
    assert result.accepted_recipients == ["bob@example.org", "dave@elsewhere.test"]
    assert result.accepted and result.queue_id, result
    [message] = postfix.sink.wait_for_messages(1, timeout=10)
    assert b"Message-ID: <relay@example.net>" in message
    assert f"id {result.queue_id}".encode() in message  # Postfix's Received header
    assert sorted(postfix.sink.delivered_recipients()) == ["bob@example.org", "dave@elsewhere.test"]
    postfix.wait_for_maillog(rf"{result.queue_id}: to=<bob@example.org>.*status=sent")


def test_two_postfix_instances_run_side_by_side(postfix_factory: PostfixFactory) -> None:
    first, second = postfix_factory(), postfix_factory()
    assert first.port != second.port and first.master_pid != second.master_pid
    assert first.queue_dir != second.queue_dir
    assert send_mail(first.port, "a@example.net", ["b@example.org"], mail("one")).accepted
    assert send_mail(second.port, "a@example.net", ["b@example.org"], mail("two")).accepted
    assert first.sink is not None and second.sink is not None
    [one] = first.sink.wait_for_messages(1)
    [two] = second.sink.wait_for_messages(1)
    assert b"<one@" in one and b"<two@" in two
    first.stop()
    assert not first.running and second.running
    first.stop()  # idempotent
    assert send_mail(second.port, "a@example.net", ["b@example.org"], mail("three")).accepted
    assert len(second.sink.wait_for_messages(2)) == 2


def test_xclient_presents_another_client(postfix_factory: PostfixFactory) -> None:
    postfix = postfix_factory()
    result = send_mail(
        postfix.port, "spammer@example.net", ["bob@example.org", "dave@elsewhere.test"],
        mail("xclient"), xclient={"ADDR": "192.0.2.10", "NAME": "mail.example.net"},
    )  # fmt: skip
    assert result.xclient is not None and result.xclient.code == 220, result
    # Outside mynetworks now: only relay_domains are accepted.
    assert result.rcpts["bob@example.org"].code == 250
    assert result.rcpts["dave@elsewhere.test"].code == 554
    assert result.accepted, result
    postfix.wait_for_maillog(r"client=mail\.example\.net\[192\.0\.2\.10\]")
    assert postfix.sink is not None
    [message] = postfix.sink.wait_for_messages(1)
    assert b"(mail.example.net [192.0.2.10])" in message


def test_unreachable_milter_tempfails_until_reconfigured(postfix_factory: PostfixFactory) -> None:
    postfix = postfix_factory(milter=f"inet:127.0.0.1:{free_port()}", default_action="tempfail")
    assert postfix.main_cf["milter_protocol"] == "6"
    refused = send_mail(postfix.port, "a@example.net", ["b@example.org"], mail("m1"))
    assert refused.banner.code == 220
    assert refused.mail is not None and refused.mail.code == 451, refused
    assert not refused.accepted
    postfix.reconfigure(milter_default_action="accept")
    assert send_mail(postfix.port, "a@example.net", ["b@example.org"], mail("m2")).accepted
    postfix.reconfigure(smtpd_milters=None)
    assert "smtpd_milters" not in postfix.main_cf
    assert send_mail(postfix.port, "a@example.net", ["b@example.org"], mail("m3")).accepted


def test_postfix_stop_really_stops_the_master(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    server = PostfixServer(make_reachable(tmp_path / "pf"), smtp_sink.port)
    with server:
        pid = server.master_pid
        assert pid is not None and server.running
        port = server.port
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    server.stop()
    assert not (server.queue_dir / "pid" / "master.pid").exists() or not server.running


def test_postfix_start_failure_carries_its_log(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    server = PostfixServer(
        make_reachable(tmp_path / "pf"), smtp_sink.port, extra_main_cf={"mail_owner": "nobody-x"}
    )
    with pytest.raises(ServerStartError, match="mail_owner: unknown user name value: nobody-x"):
        server.start()
    assert not server.running
