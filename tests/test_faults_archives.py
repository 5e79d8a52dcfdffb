"""Issue 15 item 1: archives the virus scanner cannot fully inspect are never accepted as scanned.

Real clamd (1.4 here): a test virus inside a ZIP64 member is answered "OK" by clamd, and a
member over clamd's MaxFileSize is skipped. Each must be refused (default) or accepted with
``X-Filterd-Unchecked`` and counted, by configuration. The archives are built in the test,
streamed through zipfile: megabytes of zeros deflate to a few KB, nothing large in memory.
"""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from filterd import policy
from filterd.checks.antivirus import AntivirusCheck
from filterd.checks.antivirus import Config as AvConfig
from filterd.checks.attachments import AttachmentsCheck, load_banned
from filterd.checks.attachments import Config as AttConfig
from filterd.clients.clamd import ClamdClient
from filterd.settings import MilterConfig, PolicyConfig
from filterd.types import Action, Decision, Envelope, Finding, Message
from tests.servers import ClamdServer, project_signature_dir

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def eicar() -> bytes:
    return b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!" + b"$H+H*"


def make_zip(zeros: int, zip64: bool) -> bytes:
    """A zip with one member: ``zeros`` zero bytes then the test virus, written in blocks."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("report.txt", "w", force_zip64=zip64) as member,
    ):
        block = bytes(MB)
        for _ in range(zeros // MB):
            member.write(block)
        member.write(bytes(zeros % MB) + eicar())
    return out.getvalue()


def mail(archive: bytes) -> Message:
    b64 = base64.encodebytes(archive).decode()
    raw = (
        "From: <a@example.net>\nTo: <b@example.org>\nSubject: r\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b1"\n\n'
        "--b1\nContent-Type: text/plain\n\nsee attached\n"
        '--b1\nContent-Type: application/zip; name="r.zip"\n'
        f"Content-Transfer-Encoding: base64\n\n{b64}--b1--\n"
    ).encode()
    return Message.from_bytes(raw, Envelope(recipients=("b@example.org",)))


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdServer]:
    # MaxFileSize 1M stands in for production's 100M+: the same rule, a small test.
    workdir = tmp_path_factory.mktemp("clamd-limits")
    with ClamdServer(workdir, project_signature_dir(), max_file_size="1M") as server:
        yield server


def judge(message: Message, *checks: AntivirusCheck | AttachmentsCheck) -> Decision:
    findings: list[Finding] = []
    for check in checks:
        findings.extend(check.check_message(message, False))
    return policy.decide_message(message, findings, PolicyConfig(), MilterConfig())


def antivirus(clamd: ClamdServer) -> AntivirusCheck:
    return AntivirusCheck(AvConfig(address=clamd.address), ClamdClient(clamd.address, timeout=10))


def attachments(**kw: object) -> AttachmentsCheck:
    return AttachmentsCheck(AttConfig(**kw), load_banned(ROOT / "rules" / "banned-types.toml"))


def test_plain_zip_virus_is_found_by_clamd(clamd: ClamdServer) -> None:
    decision = judge(mail(make_zip(0, zip64=False)), antivirus(clamd), attachments())
    assert decision.action is Action.REJECT and decision.reason_code == "CLAMAV_VIRUS"


def test_zip64_member_is_refused_by_default(clamd: ClamdServer) -> None:
    message = mail(make_zip(0, zip64=True))
    # clamd alone passes it: that is the hole.
    assert antivirus(clamd).check_message(message, False) == []
    check = attachments()
    decision = judge(message, antivirus(clamd), check)
    assert decision.action is Action.REJECT, decision
    assert decision.reply is not None and decision.reply.code == 554
    assert "virus scanner cannot look inside" in decision.reply.text
    assert "ZIP64" in decision.reply.text
    assert check.stats() == {"unscannable_rejected": 1}


def test_zip64_member_accepted_only_with_the_unchecked_mark(clamd: ClamdServer) -> None:
    check = attachments(unscannable_action="accept")
    decision = judge(mail(make_zip(0, zip64=True)), antivirus(clamd), check)
    assert decision.action is Action.ACCEPT
    assert ("X-Filterd-Unchecked", "attachments") in decision.add_headers
    assert check.stats() == {"unscannable_accepted": 1}


def test_member_over_clamds_max_file_size_is_never_passed_as_scanned(clamd: ClamdServer) -> None:
    message = mail(make_zip(2 * MB, zip64=False))
    assert message.size < 100_000  # 2 MB of zeros: a few KB on the wire
    # clamd skips the member (MaxFileSize 1M) silently, even with AlertExceedsMax yes.
    assert antivirus(clamd).check_message(message, False) == []
    # The walk reads the member's size and refuses what clamd would not scan.
    check = attachments(max_scannable_member_bytes=MB)
    decision = judge(message, antivirus(clamd), check)
    assert decision.action is Action.REJECT, decision
    assert decision.reply is not None and decision.reply.code == 554
    assert "too large to scan" in decision.reply.text


def test_clamd_limit_alerts_get_a_scan_limit_reply_not_too_big(clamd: ClamdServer) -> None:
    # A 2 MB attachment (not an archive) over MaxFileSize: clamd alerts (AlertExceedsMax yes).
    raw = b"From: <a@example.net>\nSubject: x\n\n" + bytes(2 * MB) + b"\n"
    message = Message.from_bytes(raw, Envelope(recipients=("b@example.org",)))
    decision = judge(message, antivirus(clamd))
    assert decision.action is Action.REJECT, decision
    assert decision.reply is not None and decision.reply.code == 554
    assert "cannot be fully scanned" in decision.reply.text
