"""The virus check against a real clamd with the project's own signature database.

clamd is started privately on a free loopback port (and on a unix socket) by
``filterd.services.clamd.ClamdServer``; outage tests stop, freeze (SIGSTOP) and
restart their own instance so the shared one stays up. The EICAR string is
assembled from pieces so this file itself does not look infected to scanners.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import pytest
from pydantic import ValidationError

from filterd.checks import antivirus
from filterd.checks.antivirus import AntivirusCheck, Config
from filterd.checks.base import Services
from filterd.clients.clamd import (
    ClamdClient,
    ClamdProtocolError,
    ClamdTimeout,
    ClamdUnavailable,
    ScanResult,
    _verdict,
)
from filterd.pipeline import Pipeline, build_checks
from filterd.settings import ConfigError, Settings, load_settings
from filterd.types import Action, Effect, Envelope, Finding, Message
from tests.helpers_daemon import filtered_postfix
from tests.servers import ClamdServer, free_port, project_signature_dir

ROOT = Path(__file__).resolve().parent.parent
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
TEST_VIRUS = b"FILTERD-HARMLESS-" + b"TEST-VIRUS-7f3a9c"
VIRUS_REPLY = "554 5.7.1 virus found: Eicar-Test-Signature"
ENVELOPE = Envelope(client_ip="192.0.2.1", mail_from="a@example.net", recipients=("b@example.org",))


def only_antivirus(address: str = "", **keys: str) -> dict[str, str]:
    """Env overrides: the shipped config with the pipeline reduced to this check."""
    env = {
        "FILTERD_PIPELINE_RECIPIENT_CHECKS": "[]",
        "FILTERD_PIPELINE_MESSAGE_CHECKS": '["antivirus"]',
        "FILTERD_CLAMAV_ADDRESS": address,
    }
    env.update({f"FILTERD_CLAMAV_{k.upper()}": v for k, v in keys.items()})
    return env


def settings_for(address: str = "", **keys: str) -> Settings:
    return load_settings(ROOT / "rules" / "filterd.toml", env=only_antivirus(address, **keys))


def make_check(address: str, **keys: str) -> AntivirusCheck:
    settings = settings_for(address, **keys)
    return antivirus.build(settings.section("clamav"), Services(settings=settings))


def dead_address() -> str:
    """A loopback port nothing listens on: any connection attempt is refused."""
    return f"tcp:127.0.0.1:{free_port()}"


# -- messages ------------------------------------------------------------------------


def plain(body: bytes) -> bytes:
    return b"From: a@example.net\r\nTo: b@example.org\r\nSubject: test\r\n\r\n" + body + b"\r\n"


def with_attachment(data: bytes, ctype: str = "application/octet-stream") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.net", "b@example.org", "file"
    msg.set_content("see attachment")
    maintype, subtype = ctype.split("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename="data.bin")
    return msg.as_bytes()


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def message(raw: bytes) -> Message:
    return Message.from_bytes(raw, ENVELOPE)


def chunked_message(raw: bytes, chunk: int) -> Message:
    """A message whose body arrives in many small chunks, as from the milter spool."""
    split = raw.index(b"\r\n\r\n") + 4
    header, body = raw[:split], raw[split:]

    def reader() -> Iterator[bytes]:
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    return Message(ENVELOPE, header, reader, len(raw))


def codes(findings: object) -> list[str]:
    assert isinstance(findings, list | tuple)
    return [f.code for f in findings]


# -- servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdServer]:
    with ClamdServer(tmp_path_factory.mktemp("clamd"), project_signature_dir()) as server:
        yield server


@pytest.fixture
def own_clamd(tmp_path: Path) -> Iterator[ClamdServer]:
    """A clamd this test may stop, freeze and restart."""
    with ClamdServer(tmp_path / "clamd", project_signature_dir()) as server:
        yield server


# -- unit: configuration and verdict parsing (no server) ----------------------------------------


def test_shipped_defaults() -> None:
    config = settings_for().section("clamav")
    assert isinstance(config, Config)
    assert (config.address, config.on_failure, config.oversize_action) == ("", "tempfail", "reject")
    assert config.max_scan_bytes == 25 * 1024 * 1024 and config.strip_unofficial_suffix


def test_empty_address_is_a_clear_build_error() -> None:
    settings = settings_for()
    with pytest.raises(ConfigError, match=r"\[clamav\] address is empty"):
        antivirus.build(settings.section("clamav"), Services(settings=settings))


@pytest.mark.parametrize("bad", ["127.0.0.1:3310", "tcp:127.0.0.1", "unix:relative", "tcp:h:99999"])
def test_bad_address_is_rejected_at_load(bad: str) -> None:
    with pytest.raises(ValidationError):
        Config(address=bad)
    with pytest.raises(ConfigError, match=r"\[clamav\] address"):
        settings_for(bad)


def test_check_is_not_bypassable() -> None:
    check = make_check(dead_address())
    assert (check.name, check.bypassable, check.gate, check.on_failure) == (
        "antivirus",
        False,
        False,
        "tempfail",
    )


@pytest.mark.parametrize(
    ("reply", "signature", "too_large"),
    [
        ("stream: OK", None, False),
        ("stream: Eicar-Test-Signature FOUND", "Eicar-Test-Signature", False),
        (
            "stream: Win.Trojan.Agent-1234.UNOFFICIAL FOUND",
            "Win.Trojan.Agent-1234.UNOFFICIAL",
            False,
        ),
        ("stream: <script>evil</script> FOUND", "Unknown.Signature", False),
        ("INSTREAM size limit exceeded. ERROR", None, True),
        ("stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND", None, True),
    ],
)
def test_verdict_parsing(reply: str, signature: str | None, too_large: bool) -> None:
    result = _verdict(reply, 10, 0.0)
    assert (result.signature, result.too_large) == (signature, too_large)


@pytest.mark.parametrize("reply", ["stream: Can't allocate memory ERROR", "UNKNOWN COMMAND", ""])
def test_non_verdicts_raise(reply: str) -> None:
    with pytest.raises(ClamdProtocolError):
        _verdict(reply, 10, 0.0)


def test_unofficial_suffix_shown_or_stripped() -> None:
    found = ScanResult("Eicar-Test-Signature.UNOFFICIAL", 10, 0.0)
    [finding] = make_check(dead_address()).findings(found)
    assert (finding.code, finding.effect, finding.bypassable) == (
        "CLAMAV_VIRUS",
        Effect.REJECT,
        False,
    )
    assert str(finding.reply) == VIRUS_REPLY
    [raw_name] = make_check(dead_address(), strip_unofficial_suffix="false").findings(found)
    assert str(raw_name.reply) == VIRUS_REPLY + ".UNOFFICIAL"


@pytest.mark.parametrize(
    ("action", "effect", "reply"),
    [
        ("reject", Effect.REJECT, "552 5.3.4 Message too big to be scanned for viruses"),
        ("tempfail", Effect.TEMPFAIL, "452 4.3.1 Message too big to scan now; try again later"),
        ("accept_with_header", Effect.SCORE, "None"),
    ],
)
def test_too_big_to_scan_gets_the_configured_verdict_without_contacting_clamd(
    action: str, effect: Effect, reply: str
) -> None:
    # Nothing listens at the address: had the check tried to scan, it would raise.
    check = make_check(dead_address(), max_scan_bytes="1000", oversize_action=f'"{action}"')
    big = message(plain(b"x" * 2000))
    [finding] = check.check_message(big, False)
    assert (finding.code, finding.effect, str(finding.reply)) == ("CLAMAV_OVERSIZE", effect, reply)
    assert finding.bypassable is False and finding.score == 0
    truncated = Message(ENVELOPE, b"Subject: x\r\n\r\n", lambda: iter((b"x",)), 20, oversize=True)
    assert codes(check.check_message(truncated, False)) == ["CLAMAV_OVERSIZE"]


def test_unreachable_clamd_raises_naming_the_address() -> None:
    address = dead_address()
    check = make_check(address)
    with pytest.raises(ClamdUnavailable, match=address):
        check.check_message(message(plain(b"hello")), False)
    missing = ClamdClient("unix:/nonexistent/clamd.sock", timeout=1)
    with pytest.raises(ClamdUnavailable, match="cannot connect"):
        missing.scan_bytes(b"x")
    assert missing.ping() is False


# -- integration: a real clamd ---------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "raw",
    [
        plain(EICAR),
        with_attachment(EICAR),
        with_attachment(zipped("readme.txt", EICAR), "application/zip"),
        with_attachment(zipped("inner.zip", zipped("readme.txt", EICAR)), "application/zip"),
    ],
    ids=["plain-body", "base64-attachment", "in-zip", "in-nested-zip"],
)
def test_eicar_is_refused(clamd: ClamdServer, raw: bytes) -> None:
    check = make_check(clamd.address)
    [finding] = check.check_message(message(raw), False)
    assert finding.code == "CLAMAV_VIRUS" and str(finding.reply) == VIRUS_REPLY
    assert finding.detail == "clamd signature Eicar-Test-Signature.UNOFFICIAL"


@pytest.mark.integration
def test_project_test_signature_is_refused(clamd: ClamdServer) -> None:
    [finding] = make_check(clamd.address).check_message(message(plain(TEST_VIRUS)), False)
    assert str(finding.reply) == "554 5.7.1 virus found: Filterd.Test.Virus"


@pytest.mark.integration
@pytest.mark.parametrize(
    "raw",
    [
        plain(b"Hello, lunch at noon?"),
        with_attachment(zipped("notes.txt", b"harmless notes" * 100), "application/zip"),
        # EICAR's pieces, apart: not the signature
        plain(EICAR[:30] + b" and later " + EICAR[30:]),
        plain(os.urandom(700_000).hex().encode()),
    ],
    ids=["text", "zip", "split-eicar", "1mb-text"],
)
def test_clean_messages_pass(clamd: ClamdServer, raw: bytes) -> None:
    assert make_check(clamd.address).check_message(message(raw), False) == []


@pytest.mark.integration
def test_streamed_in_small_chunks_across_boundaries(clamd: ClamdServer) -> None:
    # The signature straddles chunk borders and sits at the end of a 1 MB body.
    raw = plain(b"A" * 1_000_000 + EICAR)
    check = make_check(clamd.address)
    for chunk in (7, 4096, 70_000):
        assert codes(check.check_message(chunked_message(raw, chunk), False)) == ["CLAMAV_VIRUS"]
    assert check.check_message(chunked_message(plain(b"A" * 1_000_000), 4096), False) == []


@pytest.mark.integration
def test_exemption_does_not_skip_the_scan(clamd: ClamdServer) -> None:
    check = make_check(clamd.address)
    assert codes(check.check_message(message(plain(EICAR)), True)) == ["CLAMAV_VIRUS"]
    # And through the real pipeline and policy: an allowlisted sender's virus is refused.
    settings = settings_for(clamd.address)
    pipeline = Pipeline(settings, build_checks(settings, Services(settings=settings)))
    try:
        exempt = Finding("allowlist", "ALLOWLIST_USER", effect=Effect.EXEMPT)
        decision = pipeline.judge_message(message(plain(EICAR)), [exempt])
        assert (decision.action, str(decision.reply)) == (Action.REJECT, VIRUS_REPLY)
        assert decision.reason_code == "CLAMAV_VIRUS"
    finally:
        pipeline.close()


@pytest.mark.integration
def test_message_bigger_than_it_claims_stops_at_max_scan_bytes(clamd: ClamdServer) -> None:
    # The size is checked up front, and again while streaming.
    check = make_check(clamd.address, max_scan_bytes="100000")
    body = b"B" * 300_000 + EICAR
    lying = Message(ENVELOPE, b"Subject: x\r\n\r\n", lambda: iter((body,)), size=50)
    [finding] = check.check_message(lying, False)
    assert finding.code == "CLAMAV_OVERSIZE" and "max_scan_bytes" in finding.detail


@pytest.mark.integration
def test_clamd_stream_limit_below_max_scan_bytes(tmp_path: Path) -> None:
    with ClamdServer(tmp_path / "c", project_signature_dir(), stream_max_length="1M") as small:
        check = make_check(small.address)
        for size in (3_000_000, 20_000_000):
            [finding] = check.check_message(message(plain(b"C" * size + EICAR)), False)
            assert (finding.code, finding.effect) == ("CLAMAV_OVERSIZE", Effect.REJECT)
            assert "StreamMaxLength" in finding.detail
        # Below the limit it scans as usual.
        assert codes(check.check_message(message(plain(EICAR)), False)) == ["CLAMAV_VIRUS"]


@pytest.mark.integration
def test_unix_socket(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("cu")
    with ClamdServer(workdir, project_signature_dir(), unix_socket=True) as server:
        assert server.address.startswith("unix:/")
        check = make_check(server.address)
        assert codes(check.check_message(message(with_attachment(EICAR)), False)) == [
            "CLAMAV_VIRUS"
        ]
        assert check.check_message(message(plain(b"hello")), False) == []
        assert check.client.ping() is True


@pytest.mark.integration
def test_ping_and_version_through_pyclamd(clamd: ClamdServer) -> None:
    client = ClamdClient(clamd.address, timeout=5)
    assert client.ping() is True
    assert client.version().startswith("ClamAV ")


@pytest.mark.integration
def test_concurrent_scans_share_one_check(clamd: ClamdServer) -> None:
    check = make_check(clamd.address)
    raws = [plain(EICAR) if i % 2 else plain(b"clean %d" % i) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: codes(check.check_message(message(r), False)), raws))
    assert results == [["CLAMAV_VIRUS"] if i % 2 else [] for i in range(24)]


@pytest.mark.integration
def test_outage_tempfails_then_recovers_without_restarting_filterd(own_clamd: ClamdServer) -> None:
    settings = settings_for(own_clamd.address)
    pipeline = Pipeline(settings, build_checks(settings, Services(settings=settings)))
    check = pipeline.checks["antivirus"]
    assert isinstance(check, AntivirusCheck)
    try:
        assert pipeline.judge_message(message(plain(b"hello")), []).action is Action.ACCEPT
        own_clamd.stop()
        with pytest.raises(ClamdUnavailable):
            check.check_message(message(plain(b"hello")), False)
        for raw in (plain(b"hello"), plain(EICAR)):
            decision = pipeline.judge_message(message(raw), [])
            assert decision.action is Action.TEMPFAIL
            assert str(decision.reply).startswith("451 4.7.1")
            assert decision.reason_code == "ANTIVIRUS_FAIL"
        own_clamd.start()
        # Same pipeline, same check object: no reconnect step, no filterd restart.
        assert pipeline.checks["antivirus"] is check
        decision = pipeline.judge_message(message(plain(EICAR)), [])
        assert (decision.action, str(decision.reply)) == (Action.REJECT, VIRUS_REPLY)
        assert pipeline.judge_message(message(plain(b"hello")), []).action is Action.ACCEPT
    finally:
        pipeline.close()


@pytest.mark.integration
def test_outage_fail_open_marks_the_message(own_clamd: ClamdServer) -> None:
    settings = settings_for(own_clamd.address, on_failure='"accept"')
    pipeline = Pipeline(settings, build_checks(settings, Services(settings=settings)))
    try:
        own_clamd.stop()
        decision = pipeline.judge_message(message(plain(b"hello")), [])
        assert decision.action is Action.ACCEPT
        assert ("X-Filterd-Unchecked", "antivirus") in decision.add_headers
    finally:
        pipeline.close()


@pytest.mark.integration
def test_frozen_clamd_times_out_then_recovers(own_clamd: ClamdServer) -> None:
    check = make_check(own_clamd.address, timeout="0.5")
    pid = own_clamd.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # accepts connections (kernel backlog), never answers
    try:
        with pytest.raises(ClamdTimeout, match=r"no verdict within 0\.5 s"):
            check.check_message(message(plain(b"hello")), False)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert codes(check.check_message(message(plain(EICAR)), False)) == ["CLAMAV_VIRUS"]


@pytest.mark.integration
def test_clamd_closing_without_answer_is_unavailable() -> None:
    # A listener that accepts and closes at once: a broken clamd, not a verdict.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        client = ClamdClient(f"tcp:127.0.0.1:{port}", timeout=2)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(lambda: listener.accept()[0].close())
            with pytest.raises((ClamdUnavailable, ClamdTimeout)):
                client.scan_bytes(b"hello")
            future.result(timeout=5)


@pytest.mark.integration
def test_full_unix_listen_queue_waits_instead_of_failing(tmp_path: Path) -> None:
    # A burst fills clamd's listen queue; a unix-socket connect then gets EAGAIN
    # at once. The client must wait for room until its deadline, not tempfail.
    with ClamdServer(tmp_path / "cq", project_signature_dir(), unix_socket=True) as server:
        path = server.address.removeprefix("unix:")
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        fillers: list[socket.socket] = []
        try:
            while len(fillers) < 5000:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.connect(path)
                except BlockingIOError:
                    sock.close()
                    break
                fillers.append(sock)
            assert len(fillers) < 5000, "listen queue never filled"
            check = make_check(server.address, timeout="10")
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(check.check_message, message(plain(EICAR)), False)
                time.sleep(0.3)  # let the scan meet the full queue first
                for sock in fillers:
                    sock.close()  # they stay queued until clamd accepts them
                os.kill(pid, signal.SIGCONT)
                assert codes(future.result(timeout=20)) == ["CLAMAV_VIRUS"]
        finally:
            os.kill(pid, signal.SIGCONT)
            for sock in fillers:
                sock.close()


# -- end to end: Postfix -> the real daemon -> clamd ---------------------------------------------


@pytest.mark.e2e
def test_e2e_virus_refused_at_smtp_time_tempfail_while_clamd_is_down(tmp_path: Path) -> None:
    from tests.helpers_daemon import write_config
    from tests.servers import SmtpSink, make_reachable, send_mail

    base = make_reachable(tmp_path)
    nested = with_attachment(zipped("inner.zip", zipped("readme.txt", EICAR)), "application/zip")
    sender, rcpt = "alice@example.net", "bob@example.org"
    with (
        ClamdServer(base / "clamd", project_signature_dir()) as clamd,
        SmtpSink(base / "sink") as sink,
    ):
        config = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "state")},
                "pipeline": {"recipient_checks": [], "message_checks": ["antivirus"]},
                "clamav": {"address": clamd.address, "timeout": 3.0},
                "records": {"enabled": False},
            },
        )
        with filtered_postfix(base, config, sink.port) as (_daemon, postfix):
            result = send_mail(postfix.port, sender, [rcpt], nested)
            assert result.data == (554, "5.7.1 virus found: Eicar-Test-Signature"), result
            assert send_mail(postfix.port, sender, [rcpt], plain(b"hello")).accepted

            clamd.stop()
            for raw in (plain(b"hello"), nested):
                result = send_mail(postfix.port, sender, [rcpt], raw)
                assert result.data is not None and result.data.code == 451, result
                assert result.data.text.startswith("4.7.1")

            clamd.start()  # same address; the daemon is not touched
            result = send_mail(postfix.port, sender, [rcpt], nested)
            assert result.data == (554, "5.7.1 virus found: Eicar-Test-Signature"), result
            assert send_mail(postfix.port, sender, [rcpt], plain(b"hello")).accepted
            delivered = sink.wait_for_messages(2, timeout=15)
            assert not any(b"EICAR" in m for m in delivered)
