"""FilterdMilter driven in-process by pymilter's TestCtx, with real clamd and rbldnsd.

TestCtx replaces libmilter's context: the callbacks run exactly as libmilter
calls them (negotiated protocol steps included), without Postfix, so the
adapter's transaction handling is tested on its own.
"""

from __future__ import annotations

import email
import socket
from collections.abc import Iterator
from pathlib import Path

import Milter
import pytest
from Milter import testctx

from filterd import milter as adapter
from filterd.runtime import Runtime
from filterd.settings import load_settings
from tests.conftest import RbldnsdFactory, eicar_bytes
from tests.servers import ClamdServer, write_config

pytestmark = pytest.mark.integration

ZEN = "$SOA 600 ns.test. hostmaster.test. 1 600 600 600 45\n:127.0.0.2:listed\n192.0.2.10\n"


@pytest.fixture
def holder(
    tmp_path: Path, clamd_server: ClamdServer, rbldnsd: RbldnsdFactory
) -> Iterator[adapter.RuntimeHolder]:
    rbl = rbldnsd([("zen.test", "ip4set", ZEN)])
    zen = {
        "id": "ZEN", "zone": "zen.test", "type": "ip",
        "rules": [{"name": "SBL", "match": "127.0.0.2", "weight": 10}],
    }  # fmt: skip
    path = write_config(
        tmp_path / "filterd.toml",
        {
            "pipeline": {
                "recipient_checks": ["dnsbl"],
                "message_checks": ["antivirus", "attachments"],
            },
            "dns": {"nameservers": rbl.nameserver},
            "dnsbl": {"lists": [zen], "skip_private": False},
            "antivirus": {"address": clamd_server.address, "timeout": 10.0},
            "records": {"enabled": False},
        },
    )
    runtime = Runtime(load_settings(path, env={}))
    holder = adapter.RuntimeHolder(runtime)
    saved = Milter.factory
    adapter.install(holder)
    try:
        yield holder
    finally:
        Milter.factory = saved
        runtime.retire()


def connect(ip: str = "192.0.2.1") -> testctx.TestCtx:
    """Negotiate, CONNECT and HELO as libmilter does.

    TestCtx's own ``_connect`` treats a no-reply callback's NOREPLY as a refusal and
    closes; libmilter does not, so the two steps are driven here.
    """
    ctx = testctx.TestCtx()
    assert ctx._negotiate() in (Milter.CONTINUE, Milter.ALL_OPTS)
    ctx._stage = Milter.M_CONNECT
    rc = Milter.connect_callback(ctx, "client.example", socket.AF_INET, (ip, 40000))
    ctx._stage = Milter.M_HELO
    rc2 = ctx.getpriv().hello("mx.example.net")
    ctx._stage = None
    assert {rc, rc2} <= {Milter.CONTINUE, Milter.NOREPLY}
    return ctx


def feed(ctx: testctx.TestCtx, raw: bytes, sender: str, *rcpts: str) -> list[int]:
    """MAIL, each RCPT, DATA, headers, body, end of message: the codes libmilter would get."""
    ctx._reply = None
    ctx._msg = email.message_from_bytes(raw)
    codes = [ctx._envfrom(f"<{sender}>")]
    codes += [ctx._envrcpt(f"<{r}>") for r in rcpts]
    if not any(c == Milter.CONTINUE for c in codes[1:]):
        return codes
    codes.append(ctx._data())
    for name, value in ctx._msg.items():
        codes.append(ctx._header(name, value))
    codes.append(ctx._eoh())
    body = raw.split(b"\r\n\r\n", 1)[1]
    for start in range(0, len(body), 8192):  # as libmilter: every chunk, NOREPLY or not
        codes.append(ctx.getpriv().body(body[start : start + 8192]))
    codes.append(ctx._eom())
    return codes


CLEAN = b"From: a@example.net\r\nTo: u@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def with_attachment(name: str, data: bytes) -> bytes:
    import base64

    return (
        b"From: a@example.net\r\nTo: u@example.org\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=xx\r\n\r\n"
        b"--xx\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--xx\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(data) + b"--xx--\r\n"
    )


def test_clean_message_is_accepted_with_score_header(holder: adapter.RuntimeHolder) -> None:
    ctx = connect()
    codes = feed(ctx, CLEAN, "a@example.net", "u@example.org")
    assert codes[-1] == Milter.ACCEPT and ctx._reply is None
    assert ctx._msg["X-Spam-Score"] == "0.0"
    assert holder.in_flight == 0
    ctx._close()


def test_virus_and_banned_attachment_are_refused_on_one_connection(
    holder: adapter.RuntimeHolder,
) -> None:
    ctx = connect()
    codes = feed(ctx, with_attachment("note.txt", eicar_bytes()), "a@example.net", "u@example.org")
    assert codes[-1] == Milter.REJECT
    assert ctx._reply[:2] == ("554", "5.7.1") and "virus found" in ctx._reply[2]
    # The next transaction on the same connection starts clean.
    codes = feed(
        ctx, with_attachment("setup.exe", b"MZ" + b"\0" * 200), "b@example.net", "u@example.org"
    )
    assert codes[-1] == Milter.REJECT and ctx._reply[:2] == ("554", "5.7.1")
    codes = feed(ctx, CLEAN, "c@example.net", "u@example.org")
    assert codes[-1] == Milter.ACCEPT
    assert holder.in_flight == 0
    ctx._close()


def test_listed_client_is_refused_at_rcpt(holder: adapter.RuntimeHolder) -> None:
    ctx = connect(ip="192.0.2.10")
    codes = feed(ctx, CLEAN, "a@example.net", "u@example.org", "v@example.org")
    assert codes[1:] == [Milter.REJECT, Milter.REJECT]
    assert ctx._reply[:2] == ("554", "5.7.1") and "zen.test" in ctx._reply[2]
    ctx._close()
    assert holder.in_flight == 0


def test_abort_mid_message_ends_the_transaction(holder: adapter.RuntimeHolder) -> None:
    ctx = connect()
    assert ctx._envfrom("<a@example.net>") == Milter.NOREPLY
    assert ctx._envrcpt("<u@example.org>") == Milter.CONTINUE
    assert holder.in_flight == 1
    ctx._abort()
    assert holder.in_flight == 0
