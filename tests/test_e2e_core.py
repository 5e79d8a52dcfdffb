"""End to end: a real Postfix on loopback, the real daemon attached, smtp-sink behind.

Checks wired here are the content checks that need nothing but clamd
(antivirus, banned attachments); the other issues' e2e tests follow this file.
"""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers_daemon import DaemonProcess, filtered_postfix, write_config
from tests.servers import ClamdServer, PostfixServer, SmtpSink, make_reachable, send_mail

pytestmark = pytest.mark.e2e

FROM = "alice@example.net"
TO = "bob@example.org"


def eicar() -> bytes:
    # Built from pieces so that this file itself is not a test virus.
    return b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!" + b"$H+H*"


def plain(subject: str = "hello", body: str = "Just a note about lunch tomorrow.\n") -> bytes:
    return (
        f"From: Alice <{FROM}>\nTo: <{TO}>\nSubject: {subject}\n"
        "Message-ID: <e2e-1@example.net>\nMIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=utf-8\n\n{body}"
    ).encode()


def with_attachment(
    filename: str, payload: bytes, ctype: str = "application/octet-stream"
) -> bytes:
    b64 = base64.encodebytes(payload).decode()
    return (
        f"From: <{FROM}>\nTo: <{TO}>\nSubject: file\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b1"\n\n'
        "--b1\nContent-Type: text/plain\n\nsee attached\n"
        f'--b1\nContent-Type: {ctype}; name="{filename}"\n'
        f'Content-Disposition: attachment; filename="{filename}"\n'
        f"Content-Transfer-Encoding: base64\n\n{b64}--b1--\n"
    ).encode()


def daemon_config(path: Path, clamd: ClamdServer, checks: list[str], state: Path) -> Path:
    return write_config(
        path,
        {
            "daemon": {"state_dir": str(state), "log_level": "info"},
            "pipeline": {"recipient_checks": [], "message_checks": checks},
            "clamav": {"address": clamd.address, "timeout": 5.0},
            "records": {"enabled": False},
        },
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = make_reachable(tmp_path_factory.mktemp("e2e-core"))
    from tests.servers import project_signature_dir

    with (
        ClamdServer(base / "clamd", project_signature_dir()) as clamd,
        SmtpSink(base / "sink") as sink,
    ):
        cfg = daemon_config(base / "filterd.toml", clamd, ["antivirus", "attachments"], base / "st")
        with filtered_postfix(base, cfg, sink.port) as (daemon, postfix):
            yield {
                "postfix": postfix,
                "sink": sink,
                "daemon": daemon,
                "clamd": clamd,
                "base": base,
            }


def test_clean_message_is_accepted_and_reaches_the_sink(stack: dict) -> None:
    postfix, sink = stack["postfix"], stack["sink"]
    sink.clear()
    result = send_mail(postfix.port, FROM, [TO], plain())
    assert result.accepted, result
    delivered = sink.wait_for_messages(1, timeout=15)[0]
    assert b"Just a note about lunch" in delivered
    # The header proves the milter judged it (milter_default_action is reject).
    assert b"X-Spam-Score: 0.0" in delivered


def test_virus_gets_5xx_at_smtp_time(stack: dict) -> None:
    result = send_mail(stack["postfix"].port, FROM, [TO], plain(body=eicar().decode() + "\n"))
    assert result.data is not None and result.data.code == 554
    assert "5.7.1" in result.data.text and "Eicar-Test-Signature" in result.data.text
    assert "UNOFFICIAL" not in result.data.text


def test_banned_attachment_gets_5xx_naming_the_type_not_the_file(stack: dict) -> None:
    msg = with_attachment("quarterly-numbers.pdf.exe", b"MZ\x90\x00" + b"\x00" * 200)
    result = send_mail(stack["postfix"].port, FROM, [TO], msg)
    assert result.data is not None and result.data.code == 554, result
    assert "quarterly-numbers" not in result.data.text
    assert ".exe" in result.data.text or "executable" in result.data.text.lower()


MALFORMED = {
    "broken-mime": (
        b"From: <a@example.net>\nSubject: x\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="never-closed"\n\n'
        b"--never-closed\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
        b"@@@not base64@@@\n--never-clo"
    ),
    "8bit-garbage-headers": b"From: \xff\xfe\xfa <a@example.net>\nSubject: \x80\x81\xc3(\n"
    b"X-Weird: \xe2\x28\xa1\n\nbody \xff\n",
    "nul-bytes": b"From: <a@example.net>\nSubject: nul\x00here\n\nbody\x00with\x00nuls\n",
    "no-headers": b"\njust a body\n",
    "bogus-charset": (
        b"From: <a@example.net>\nContent-Type: text/plain; charset=x-no-such\n\n\xe9t\xe9\n"
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_message_gets_a_defined_verdict(stack: dict, name: str) -> None:
    result = send_mail(stack["postfix"].port, FROM, [TO], MALFORMED[name])
    assert result.data is not None
    # Defined: accepted, or refused with a policy code -- never a tempfail from a crash.
    assert result.data.code == 250 or 550 <= result.data.code <= 554, result.data
    daemon = stack["daemon"]
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "internal error" not in daemon.log()
    assert send_mail(stack["postfix"].port, FROM, [TO], plain()).accepted


def test_sighup_reloads_rules_without_dropping_mail(stack: dict) -> None:
    """Messages keep flowing during reloads; the new rules apply afterwards."""
    postfix, daemon, base = stack["postfix"], stack["daemon"], stack["base"]
    exe = with_attachment("setup.exe", b"MZ" + b"\x00" * 100)
    results: list[int] = []
    odd: list[object] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            r = send_mail(postfix.port, FROM, [TO], plain())
            results.append(r.data.code if r.data else 0)
            if not r.accepted:
                odd.append(r)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        daemon_config(daemon.config, stack["clamd"], ["antivirus"], base / "st")
        for _ in range(3):
            daemon.signal(signal.SIGHUP)
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while send_mail(postfix.port, FROM, [TO], exe).data.code != 250:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "reload did not take effect"
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
        daemon_config(daemon.config, stack["clamd"], ["antivirus", "attachments"], base / "st")
        daemon.signal(signal.SIGHUP)
    assert results and set(results) == {250}, odd
    deadline = time.monotonic() + 10
    while send_mail(postfix.port, FROM, [TO], exe).data.code != 554:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "second reload did not take effect"
        time.sleep(0.2)


def test_reload_with_broken_config_keeps_old_rules(stack: dict, tmp_path: Path) -> None:
    daemon = stack["daemon"]
    original = daemon.config.read_text()
    try:
        daemon.config.write_text(original + "\n[policy]\nreject_score = 'oops'\n")
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in daemon.log():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        result = send_mail(stack["postfix"].port, FROM, [TO], plain(body=eicar().decode()))
        assert result.data is not None and result.data.code == 554
    finally:
        daemon.config.write_text(original)


@pytest.mark.parametrize("default_action,expect", [("tempfail", 451), ("accept", 250)])
def test_daemon_down_postfix_follows_default_action(
    tmp_path: Path, default_action: str, expect: int
) -> None:
    base = make_reachable(tmp_path)
    missing = f"unix:{base}/no-such-milter.sock"
    with (
        SmtpSink(base / "sink") as sink,
        PostfixServer(
            base / "pf", sink.port, milter=missing, milter_default_action=default_action
        ) as postfix,
    ):
        result = send_mail(postfix.port, FROM, [TO], plain())
        code = result.data.code if result.data else result.mail.code  # type: ignore[union-attr]
        assert code == expect, result


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path, stack: dict) -> None:
    base = make_reachable(tmp_path)
    cfg = daemon_config(base / "f.toml", stack["clamd"], ["antivirus"], base / "st")
    daemon = DaemonProcess(base / "d", cfg).start()
    assert daemon.stop() == 0
    assert '"msg": "stopped"' in daemon.log()


@pytest.mark.parametrize("action,expect", [("reject", "552 5.3.4"), ("tempfail", "452 4.3.1")])
def test_message_over_the_spool_limit_gets_the_configured_verdict(
    tmp_path: Path, stack: dict, action: str, expect: str
) -> None:
    base = make_reachable(tmp_path)
    cfg = write_config(
        base / "f.toml",
        {
            "daemon": {"state_dir": str(base / "st")},
            "pipeline": {"recipient_checks": [], "message_checks": ["antivirus"]},
            "clamav": {"address": stack["clamd"].address},
            "milter": {"max_message_bytes": 20000, "oversize_action": action},
            "records": {"enabled": False},
        },
    )
    with (
        DaemonProcess(base / "d", cfg) as daemon,
        SmtpSink(base / "sink") as sink,
        PostfixServer(
            base / "pf", sink.port, milter=daemon.milter_for_postfix, milter_default_action="accept"
        ) as postfix,
    ):
        big = plain(body="y" * 70 + "\n") + (b"y" * 70 + b"\n") * 1000  # ~71 KB
        result = send_mail(postfix.port, FROM, [TO], big)
        assert result.data is not None
        assert f"{result.data.code} {result.data.text}".startswith(expect), result.data
        assert send_mail(postfix.port, FROM, [TO], plain()).accepted


def test_tcp_socket_works_through_postfix(tmp_path: Path, stack: dict) -> None:
    """The inet socket is the other documented choice; same verdicts as unix."""
    from tests.servers import free_port

    base = make_reachable(tmp_path)
    cfg = daemon_config(base / "f.toml", stack["clamd"], ["antivirus"], base / "st")
    with (
        DaemonProcess(base / "d", cfg, tcp_port=free_port()) as daemon,
        SmtpSink(base / "sink") as sink,
        PostfixServer(
            base / "pf", sink.port, milter=daemon.milter_for_postfix, milter_default_action="reject"
        ) as postfix,
    ):
        assert send_mail(postfix.port, FROM, [TO], plain()).accepted
        virus = send_mail(postfix.port, FROM, [TO], plain(body=eicar().decode()))
        assert virus.data is not None and virus.data.code == 554
