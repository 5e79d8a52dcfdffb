"""Banned attachment types: every evasion is caught, harmless documents pass.

All test files are built here, byte by byte, as minimal *valid* files of their
kind (a PNG with correct CRCs, a DOCX that is a proper OOXML zip, a real
ZipCrypto-encrypted zip that the stdlib can decrypt), so the check is tested
against what mail clients really send.
"""

from __future__ import annotations

import base64
import binascii
import io
import quopri
import struct
import zipfile
import zlib
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.checks import attachments
from filterd.checks.attachments import AttachmentsCheck, Config, load_banned
from filterd.checks.base import Services
from filterd.mail.walk import Item, Obstacle, WalkLimits, walk
from filterd.settings import ConfigError, load_settings
from filterd.types import Effect, Envelope, Finding, Message
from tests.helpers_daemon import filtered_postfix

ROOT = Path(__file__).resolve().parent.parent
BANNED_FILE = ROOT / "rules" / "banned-types.toml"
CRLF = b"\r\n"
# The shipped config, with only this check in the pipeline (others may not exist yet).
ONLY_THIS_CHECK = {
    "FILTERD_PIPELINE_RECIPIENT_CHECKS": "[]",
    "FILTERD_PIPELINE_MESSAGE_CHECKS": '["attachments"]',
}

# -- minimal valid files -----------------------------------------------------------------------


def pe_bytes() -> bytes:
    """A DOS stub whose e_lfanew points at a PE signature and a COFF header."""
    dos = bytearray(b"MZ" + b"\x90\x00" + b"\x00" * 0x3C)
    struct.pack_into("<I", dos, 0x3C, 0x80)
    dos += b"\x00" * (0x80 - len(dos))
    coff = struct.pack("<HHIIIHH", 0x14C, 1, 0, 0, 0, 0xE0, 0x0102)
    return bytes(dos) + b"PE\x00\x00" + coff + b"\x00" * 256


def elf_bytes() -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + struct.pack("<HHI", 2, 0x3E, 1) + b"\x00" * 40


def pdf_bytes() -> bytes:
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def png_bytes() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ics_bytes() -> bytes:
    return CRLF.join(
        [
            b"BEGIN:VCALENDAR",
            b"VERSION:2.0",
            b"PRODID:-//filterd//test//EN",
            b"BEGIN:VEVENT",
            b"UID:1@example.org",
            b"DTSTAMP:20240101T090000Z",
            b"DTSTART:20240102T090000Z",
            b"SUMMARY:Meeting",
            b"END:VEVENT",
            b"END:VCALENDAR",
            b"",
        ]
    )


def zip_bytes(members: Sequence[tuple[str, bytes]], prefix: bytes = b"") -> bytes:
    buf = io.BytesIO()
    buf.write(prefix)
    with zipfile.ZipFile(buf, "a" if prefix else "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def docx_bytes(macro: bool = False) -> bytes:
    ct = (
        b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        b'<Default Extension="rels" '
        b'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        b'<Default Extension="xml" ContentType="application/xml"/>'
        b'<Override PartName="/word/document.xml" ContentType="application/'
        b'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
    )
    rels = (
        b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        b'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        b'<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
        b'relationships/officeDocument" Target="word/document.xml"/></Relationships>'
    )
    doc = (
        b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        b"<w:body><w:p><w:r><w:t>Hello</w:t></w:r></w:p></w:body></w:document>"
    )
    members = [("[Content_Types].xml", ct), ("_rels/.rels", rels), ("word/document.xml", doc)]
    if macro:
        members.append(
            ("word/vbaProject.bin", ole_bytes(b"_VBA_PROJECT".decode().encode("utf-16-le")))
        )
    return zip_bytes(members)


def ole_bytes(payload: bytes = b"", clsid: bytes = b"\x00" * 16) -> bytes:
    """An OLE2 header (512-byte sectors) and one directory sector holding the root entry."""
    header = bytearray(512)
    header[0:8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    struct.pack_into("<HHH", header, 0x18, 0x3E, 3, 0xFFFE)
    struct.pack_into("<H", header, 0x1E, 9)
    struct.pack_into("<H", header, 0x20, 6)
    struct.pack_into("<I", header, 0x30, 0)
    directory = bytearray(512)
    name = "Root Entry".encode("utf-16-le")
    directory[0 : len(name)] = name
    struct.pack_into("<HB", directory, 0x40, len(name) + 2, 5)
    directory[0x50:0x60] = clsid
    directory[128 : 128 + len(payload)] = payload
    return bytes(header + directory)


MSI_CLSID = bytes.fromhex("84100c0000000000c000000000000046")
LNK_HEADER = bytes.fromhex("4c0000000114020000000000c000000000000046") + b"\x00" * 56


def iso_bytes() -> bytes:
    data = bytearray(0x8800)
    data[0x8000:0x8006] = b"\x01CD001"
    return bytes(data)


# -- ZipCrypto (traditional PKWARE encryption), to build a *real* encrypted zip ----------------


class _ZipCrypto:
    def __init__(self, password: bytes) -> None:
        self.keys = [0x12345678, 0x23456789, 0x34567890]
        for byte in password:
            self._update(byte)

    @staticmethod
    def _crc(crc: int, byte: int) -> int:
        return binascii.crc32(bytes([byte]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def _update(self, byte: int) -> None:
        k0, k1, k2 = self.keys
        k0 = self._crc(k0, byte)
        k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = self._crc(k2, (k1 >> 24) & 0xFF)
        self.keys = [k0, k1, k2]

    def encrypt(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            temp = (self.keys[2] | 2) & 0xFFFF
            out.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
            self._update(byte)
        return bytes(out)


def encrypted_zip(members: Sequence[tuple[str, bytes]], password: bytes = b"secret") -> bytes:
    """Stored (uncompressed) members, each encrypted with ZipCrypto."""
    out = bytearray()
    central = bytearray()
    for name, data in members:
        crc = zlib.crc32(data) & 0xFFFFFFFF
        header12 = bytes(range(11)) + bytes([crc >> 24])
        body = _ZipCrypto(password).encrypt(header12 + data)
        fname = name.encode()
        local = struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 1, 0, 0, 0, crc, len(body), len(data), len(fname), 0
        )
        offset = len(out)
        out += local + fname + body
        central += (
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                20,
                20,
                1,
                0,
                0,
                0,
                crc,
                len(body),
                len(data),
                len(fname),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + fname
        )
    eocd = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0
    )
    return bytes(out + central + eocd)


# -- messages ----------------------------------------------------------------------------------


def mail(
    *attachments_: tuple[bytes, str, str | None],
    body: str = "Please find the file attached.\n",
) -> bytes:
    """A multipart message; each attachment is (data, content type, filename)."""
    msg = EmailMessage()
    msg["From"] = "alice@example.net"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "Documents"
    msg.set_content(body)
    for data, ctype, filename in attachments_:
        maintype, subtype = ctype.split("/", 1)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def raw_mail(part_headers: str, payload: bytes) -> bytes:
    """A multipart message with one hand-written attachment part (base64 body)."""
    encoded = base64.encodebytes(payload).decode()
    return (
        "From: alice@example.net\r\nTo: bob@example.org\r\nSubject: x\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="BOUND"\r\n\r\n'
        "--BOUND\r\nContent-Type: text/plain\r\n\r\nSee attachment.\r\n"
        f"--BOUND\r\n{part_headers}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{encoded}\r\n--BOUND--\r\n"
    ).encode()


@pytest.fixture(scope="module")
def banned() -> attachments.BannedTypes:
    return load_banned(BANNED_FILE)


@pytest.fixture
def check(banned: attachments.BannedTypes) -> AttachmentsCheck:
    return AttachmentsCheck(Config(), banned)


def run(
    check: AttachmentsCheck, raw: bytes, recipients: tuple[str, ...] = ("bob@example.org",)
) -> list[Finding]:
    return list(
        check.check_message(Message.from_bytes(raw, Envelope(recipients=recipients)), False)
    )


def codes(findings: Sequence[Finding]) -> list[str]:
    return [f.code for f in findings]


def first_reply(findings: Sequence[Finding]) -> str:
    refusing = [f for f in findings if f.effect is Effect.REJECT]
    assert refusing, f"expected a refusal, got {findings}"
    return str(refusing[0].reply)


def assert_no_name_leak(findings: Sequence[Finding], *names: str) -> None:
    for f in findings:
        for name in names:
            assert name.lower() not in str(f.reply).lower(), f.reply
            assert name.lower() not in f.detail.lower(), f.detail


# -- harmless mail passes ----------------------------------------------------------------------


def test_fixture_files_are_valid() -> None:
    # The harmless files really are what they claim (so a pass means something).
    assert zipfile.ZipFile(io.BytesIO(docx_bytes())).testzip() is None
    assert png_bytes().startswith(b"\x89PNG") and zlib.decompress(
        png_bytes()[png_bytes().index(b"IDAT") + 4 : -16]
    )
    assert pdf_bytes().startswith(b"%PDF-") and pdf_bytes().rstrip().endswith(b"%%EOF")
    # The encrypted zip decrypts with the stdlib and its password, and not without it.
    zf = zipfile.ZipFile(io.BytesIO(encrypted_zip([("a.txt", b"hello")])))
    assert zf.read("a.txt", pwd=b"secret") == b"hello"
    with pytest.raises(RuntimeError):
        zf.read("a.txt")


@pytest.mark.parametrize(
    ("data", "ctype", "filename"),
    [
        (pdf_bytes(), "application/pdf", "report.pdf"),
        (png_bytes(), "image/png", "photo.png"),
        (ics_bytes(), "text/calendar", "invite.ics"),
        (
            docx_bytes(),
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "letter.docx",
        ),
        (zip_bytes([("notes.txt", b"hi"), ("photo.png", png_bytes())]), "application/zip", "a.zip"),
        (b"MZ is how the name starts, but this is text.\n" * 3, "text/plain", "mz.txt"),
    ],
)
def test_harmless_attachments_pass(
    check: AttachmentsCheck, data: bytes, ctype: str, filename: str
) -> None:
    assert run(check, mail((data, ctype, filename))) == []


def test_plain_and_html_mail_pass(check: AttachmentsCheck) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.net", "b@example.org", "Hello"
    msg.set_content("plain text")
    msg.add_alternative("<p>html <script>x()</script></p>", subtype="html")
    assert run(check, msg.as_bytes()) == []


# -- by declared name --------------------------------------------------------------------------


def test_plain_exe_refused_naming_the_type_not_the_file(check: AttachmentsCheck) -> None:
    findings = run(check, mail((b"just bytes", "application/octet-stream", "salary-list.exe")))
    assert codes(findings) == ["BANNED_EXTENSION"]
    assert first_reply(findings) == "554 5.7.1 banned attachment type: .exe (Windows executable)"
    assert findings[0].bypassable is False
    assert_no_name_leak(findings, "salary-list")


@pytest.mark.parametrize(
    "part_headers",
    [
        # RFC 2231 percent-encoded, with a charset
        "Content-Type: application/octet-stream\r\n"
        "Content-Disposition: attachment; filename*=UTF-8''rechnung%2Eexe",
        # RFC 2231 continuations, the extension split over segments
        "Content-Type: application/octet-stream\r\n"
        "Content-Disposition: attachment; filename*0*=UTF-8''rech%C3%BCnung.e; filename*1=xe",
        # RFC 2047 encoded word in Content-Type name only
        'Content-Type: application/octet-stream; name="=?UTF-8?B?cmVjaG51bmcuZXhl?="',
        # encoded word (Q) in the filename, harmless name in Content-Type
        'Content-Type: application/octet-stream; name="rechnung.pdf"\r\n'
        'Content-Disposition: attachment; filename="=?utf-8?q?rechnung=2Eexe?="',
        # double extension
        "Content-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="rechnung.pdf.exe"',
        # trailing dot and spaces (Windows drops them)
        "Content-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="rechnung.exe. . "',
        # right-to-left override makes it display as "rechnungexe.pdf"
        "Content-Type: application/pdf\r\n"
        "Content-Disposition: attachment; filename*=UTF-8''rechnung%E2%80%AEfdp.exe",
        # full-width dot and upper case
        "Content-Type: application/pdf\r\n"
        "Content-Disposition: attachment; filename*=UTF-8''rechnung%EF%BC%8EEXE",
        # the same parameter twice: clients differ in which one they use
        'Content-Type: application/pdf; name="rechnung.pdf"; name="rechnung.exe"',
        "Content-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="rechnung.pdf"; filename="rechnung.exe"',
        # plain and RFC 2231 forms mixed (the stdlib's legacy parser chokes on this)
        "Content-Type: application/pdf\r\nContent-Disposition: attachment; "
        "filename=\"rechnung.pdf\"; filename*=UTF-8''x.pdf; filename*0*=UTF-8''rechnung.e; "
        "filename*1=xe",
        # a path in the name
        "Content-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="C:\\\\tmp\\\\rechnung.exe"',
    ],
)
def test_name_evasions_are_caught(check: AttachmentsCheck, part_headers: str) -> None:
    findings = run(check, raw_mail(part_headers, b"not really a program"))
    assert "BANNED_EXTENSION" in codes(findings), findings
    assert first_reply(findings) == "554 5.7.1 banned attachment type: .exe (Windows executable)"
    assert_no_name_leak(findings, "rechnung")


@pytest.mark.parametrize(
    ("ext", "description"),
    [
        ("scr", "Windows screen saver program"),
        ("js", "JavaScript script"),
        ("vbs", "VBScript script"),
        ("hta", "HTML application"),
        ("lnk", "Windows shortcut"),
        ("ps1", "PowerShell script"),
        ("iso", "disk image"),
        ("docm", "macro-enabled Office document"),
        ("xlsm", "macro-enabled Office document"),
    ],
)
def test_default_list_names_each_type(check: AttachmentsCheck, ext: str, description: str) -> None:
    findings = run(check, mail((b"x", "application/octet-stream", f"file.{ext}")))
    assert first_reply(findings) == f"554 5.7.1 banned attachment type: .{ext} ({description})"


def test_default_list_covers_the_issue() -> None:
    banned = load_banned(BANNED_FILE)
    required = (
        "exe scr pif com bat cmd js jse vbs vbe wsf hta lnk jar ps1 msi iso img docm xlsm pptm"
    )
    assert set(required.split()) <= set(banned.extensions)
    assert set(attachments.SNIFFERS) == set(banned.magic)


def test_uuencoded_program_in_text_body(check: AttachmentsCheck) -> None:
    body = "Here it is:\n\nbegin 644 tool.exe\nM5&AI<R!I<R!N;W0@82!P<F]G<F%M\n`\nend\n"
    findings = run(check, mail(body=body))
    assert codes(findings) == ["BANNED_EXTENSION"]


def forwarded(inner: bytes, cte: str | None) -> bytes:
    """The message attached as message/rfc822, as sent (cte None) or transfer-encoded."""
    head = "From: a@example.net\r\nTo: b@example.org\r\nSubject: Fwd\r\nMIME-Version: 1.0\r\n"
    head += 'Content-Type: multipart/mixed; boundary="OUT"\r\n\r\n--OUT\r\n'
    head += "Content-Type: text/plain\r\n\r\nforwarding\r\n--OUT\r\n"
    head += "Content-Type: message/rfc822\r\n"
    if cte == "base64":
        body = base64.encodebytes(inner)
    elif cte == "quoted-printable":
        body = quopri.encodestring(inner)
    else:
        body = inner
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n"
    return head.encode() + b"\r\n" + body + b"\r\n--OUT--\r\n"


@pytest.mark.parametrize("cte", [None, "base64", "quoted-printable"])
def test_forwarded_message_with_program_inside(check: AttachmentsCheck, cte: str | None) -> None:
    inner = mail((b"x", "application/octet-stream", "tool.bat"))
    findings = run(check, forwarded(inner, cte))
    assert first_reply(findings) == "554 5.7.1 banned attachment type: .bat (Windows batch script)"
    assert run(check, forwarded(mail((pdf_bytes(), "application/pdf", "a.pdf")), cte)) == []


def test_deep_mime_nesting_is_bounded(check: AttachmentsCheck) -> None:
    raw = b"Subject: deep\r\n"
    for level in range(200):
        raw += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
    raw += b"Content-Type: text/plain\r\n\r\nhi\r\n"
    findings = run(check, raw)
    assert codes(findings) == ["MESSAGE_STRUCTURE"]  # 554 5.6.0 (issue 15 item 3)


# -- by declared content type ------------------------------------------------------------------


def test_banned_content_type_with_harmless_name(check: AttachmentsCheck) -> None:
    headers = 'Content-Type: Application/X-MSDownload; name="report.pdf"'
    findings = run(check, raw_mail(headers, b"plain bytes, no program"))
    assert codes(findings) == ["BANNED_CONTENT_TYPE"]
    assert first_reply(findings) == (
        "554 5.7.1 banned attachment type: application/x-msdownload (Windows executable)"
    )


def test_macro_enabled_office_content_type(check: AttachmentsCheck) -> None:
    ctype = "application/vnd.ms-excel.sheet.macroEnabled.12"
    findings = run(check, raw_mail(f'Content-Type: {ctype}; name="q3.xlsx"', b"x"))
    assert "BANNED_CONTENT_TYPE" in codes(findings)


# -- by content --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "description"),
    [
        (pe_bytes(), "Windows executable"),
        (elf_bytes(), "executable program"),
        (LNK_HEADER, "Windows shortcut"),
        (iso_bytes(), "disk image"),
        (ole_bytes(clsid=MSI_CLSID), "Windows installer package"),
        (ole_bytes("_VBA_PROJECT".encode("utf-16-le")), "macro-enabled Office document"),
        (docx_bytes(macro=True), "macro-enabled Office document"),
        (
            zip_bytes(
                [
                    ("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\n"),
                    ("A.class", b"\xca\xfe\xba\xbe\x00\x00\x00\x34"),
                ]
            ),
            "Java archive",
        ),
    ],
)
def test_magic_mismatch_is_caught(check: AttachmentsCheck, data: bytes, description: str) -> None:
    findings = run(check, mail((data, "application/pdf", "report.pdf")))
    assert "BANNED_MAGIC" in codes(findings), findings
    assert f"banned attachment type: {description} (detected by content)" in first_reply(findings)
    assert_no_name_leak(findings, "report")


def test_program_sent_as_text_plain_is_caught(check: AttachmentsCheck) -> None:
    findings = run(check, raw_mail("Content-Type: text/plain", pe_bytes()))
    assert codes(findings) == ["BANNED_MAGIC"]


def test_harmless_ole_document_passes(check: AttachmentsCheck) -> None:
    # A legacy .doc without macros is an OLE file too: not an installer, no macros.
    assert run(check, mail((ole_bytes(), "application/msword", "old.doc"))) == []


# -- inside archives ---------------------------------------------------------------------------


def test_zipped_program_by_name(check: AttachmentsCheck) -> None:
    archive = zip_bytes([("readme.txt", b"hi"), ("setup.exe", b"x")])
    findings = run(check, mail((archive, "application/zip", "docs.zip")))
    assert first_reply(findings) == (
        "554 5.7.1 banned attachment type: .exe (Windows executable) inside an archive"
    )
    assert_no_name_leak(findings, "setup", "docs")


def test_zipped_program_by_content(check: AttachmentsCheck) -> None:
    archive = zip_bytes([("report.pdf", pe_bytes())])
    findings = run(check, mail((archive, "application/zip", "docs.zip")))
    assert codes(findings) == ["BANNED_MAGIC"]
    assert "inside an archive" in first_reply(findings)


def test_nested_zip_is_caught(check: AttachmentsCheck) -> None:
    inner = zip_bytes([("invoice.js", b"WScript.Echo(1)")])
    middle = zip_bytes([("more.zip", inner)])
    outer = zip_bytes([("docs.zip", middle)])
    findings = run(check, mail((outer, "application/zip", "docs.zip")))
    assert first_reply(findings) == (
        "554 5.7.1 banned attachment type: .js (JavaScript script) inside an archive"
    )


def test_zip_hidden_behind_an_image_is_opened(check: AttachmentsCheck) -> None:
    polyglot = zip_bytes([("run.vbs", b"x")], prefix=png_bytes())
    findings = run(check, mail((polyglot, "image/png", "cat.png")))
    assert codes(findings) == ["BANNED_EXTENSION"]


def test_nesting_deeper_than_limit_is_uninspectable(banned: attachments.BannedTypes) -> None:
    data = zip_bytes([("a.txt", b"harmless")])
    for level in range(3):
        data = zip_bytes([(f"level{level}.zip", data)])
    raw = mail((data, "application/zip", "deep.zip"))  # four zips deep
    deep = AttachmentsCheck(Config(max_zip_depth=3), banned)
    findings = run(deep, raw)
    assert codes(findings) == ["ARCHIVE_UNINSPECTABLE"]
    assert first_reply(findings) == (
        "554 5.7.1 archive not accepted: it cannot be checked (archives nested too deep)"
    )
    # One more level allowed: the content is harmless and passes.
    assert run(AttachmentsCheck(Config(max_zip_depth=4), banned), raw) == []
    # Configured to accept: a zero-score finding for the admin, no refusal.
    lenient = run(AttachmentsCheck(Config(uninspectable_action="accept"), banned), raw)
    assert [(f.code, f.effect, f.score) for f in lenient] == [
        ("ARCHIVE_UNINSPECTABLE", Effect.SCORE, 0.0)
    ]


def test_too_many_members(banned: attachments.BannedTypes) -> None:
    archive = zip_bytes([(f"f{i}.txt", b"x") for i in range(60)])
    raw = mail((archive, "application/zip", "many.zip"))
    findings = run(AttachmentsCheck(Config(max_zip_members=50), banned), raw)
    assert codes(findings) == ["ARCHIVE_UNINSPECTABLE"]
    assert run(AttachmentsCheck(Config(max_zip_members=60), banned), raw) == []


def test_zip_bomb_is_bounded(banned: attachments.BannedTypes) -> None:
    # 200 MiB of zeros compress to ~200 KiB; only a 40 KiB head of it is unpacked.
    big = io.BytesIO()
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.bin", "w") as out:
        block = b"\0" * (1 << 20)
        for _ in range(200):
            out.write(block)
    bomb = big.getvalue()
    assert len(bomb) < 1 << 20
    # By default a 200 MiB member is refused: clamd would skip it (issue 15 item 1).
    default = run(AttachmentsCheck(Config(), banned), mail((bomb, "application/zip", "z.zip")))
    assert codes(default) == ["ARCHIVE_UNINSPECTABLE"]
    check = AttachmentsCheck(
        Config(max_unpack_bytes=8 * 1024 * 1024, max_scannable_member_bytes=1 << 30), banned
    )
    assert run(check, mail((bomb, "application/zip", "zeros.zip"))) == []
    assert run(check, mail((zip_bytes([("inner.zip", bomb)]), "application/zip", "o.zip"))) == []
    # A nested archive must be unpacked whole to be opened: one of 20 MiB (stored,
    # so its outer zip compresses it to almost nothing) is past the 8 MiB budget.
    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("zeros.bin", b"\0" * (20 << 20))
    nested = zip_bytes([("inner.zip", stored.getvalue())])
    assert len(nested) < 1 << 20
    findings = run(check, mail((nested, "application/zip", "outer.zip")))
    assert first_reply(findings) == (
        "554 5.7.1 archive not accepted: it cannot be checked (archive too large to unpack)"
    )
    roomy = AttachmentsCheck(Config(max_unpack_bytes=32 * 1024 * 1024), banned)
    assert run(roomy, mail((nested, "application/zip", "outer.zip"))) == []


def test_damaged_zip(check: AttachmentsCheck) -> None:
    damaged = zip_bytes([("a.txt", b"hello" * 100)])[:60]
    findings = run(check, mail((damaged, "application/zip", "broken.zip")))
    assert first_reply(findings) == (
        "554 5.7.1 archive not accepted: it cannot be checked (damaged archive)"
    )


def test_encrypted_zip(banned: attachments.BannedTypes) -> None:
    archive = encrypted_zip([("invoice.pdf", pe_bytes())])
    raw = mail((archive, "application/zip", "invoice.zip"))
    findings = run(AttachmentsCheck(Config(), banned), raw)
    assert codes(findings) == ["ENCRYPTED_ARCHIVE"]
    assert first_reply(findings) == (
        "554 5.7.1 encrypted archive not accepted: its content cannot be checked"
    )
    lenient = run(AttachmentsCheck(Config(encrypted_archive_action="accept"), banned), raw)
    assert [(f.code, f.effect) for f in lenient] == [("ENCRYPTED_ARCHIVE", Effect.SCORE)]


def test_encrypted_zip_with_banned_name_names_the_type(banned: attachments.BannedTypes) -> None:
    raw = mail((encrypted_zip([("invoice.exe", b"x")]), "application/zip", "invoice.zip"))
    check = AttachmentsCheck(Config(encrypted_archive_action="accept"), banned)
    findings = run(check, raw)
    assert first_reply(findings).startswith("554 5.7.1 banned attachment type: .exe")
    findings = run(AttachmentsCheck(Config(), banned), raw)
    assert codes(findings) == ["BANNED_EXTENSION", "ENCRYPTED_ARCHIVE"]


# -- per-domain exceptions ---------------------------------------------------------------------


def test_domain_exceptions_need_every_recipient(tmp_path: Path) -> None:
    text = BANNED_FILE.read_text() + (
        '\n[domains."dev.example.org"]\nallow_extensions = [".JS"]\n'
        'encrypted_archive_action = "accept"\n'
    )
    path = tmp_path / "banned.toml"
    path.write_text(text)
    check = AttachmentsCheck(Config(), load_banned(path))
    js = mail((b"x", "application/octet-stream", "build.js"))
    assert run(check, js, ("ann@dev.example.org", "bo@DEV.example.org")) == []
    assert codes(run(check, js, ("ann@dev.example.org", "carl@example.com"))) == [
        "BANNED_EXTENSION"
    ]
    exe = mail((b"x", "application/octet-stream", "build.exe"))
    assert codes(run(check, exe, ("ann@dev.example.org",))) == ["BANNED_EXTENSION"]
    enc = mail((encrypted_zip([("a.txt", b"x")]), "application/zip", "a.zip"))
    assert [f.effect for f in run(check, enc, ("ann@dev.example.org",))] == [Effect.SCORE]
    assert [f.effect for f in run(check, enc, ("x@example.com",))] == [Effect.REJECT]


# -- configuration -----------------------------------------------------------------------------


def test_bad_banned_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "banned.toml"
    path.write_text('[magic]\npe = "Windows executable"\nrar = "RAR"\n')
    with pytest.raises(ConfigError, match="unknown sniffer"):
        load_banned(path)
    path.write_text("[extensions\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_banned(path)
    with pytest.raises(ConfigError, match="not found"):
        load_banned(tmp_path / "missing.toml")


def test_build_from_the_shipped_settings() -> None:
    settings = load_settings(ROOT / "rules" / "filterd.toml", env=ONLY_THIS_CHECK)
    config = settings.section("attachments")
    assert isinstance(config, Config)
    assert config.encrypted_archive_action == "reject" and config.max_zip_depth == 3
    check = attachments.build(config, Services(settings=settings))
    assert (check.name, check.bypassable, check.gate, check.on_failure) == (
        "attachments",
        False,
        False,
        "tempfail",
    )
    assert run(check, mail((b"x", "application/octet-stream", "a.exe")))


def test_env_override_of_actions() -> None:
    env = {**ONLY_THIS_CHECK, "FILTERD_ATTACHMENTS_ENCRYPTED_ARCHIVE_ACTION": "accept"}
    settings = load_settings(ROOT / "rules" / "filterd.toml", env=env)
    assert settings.section("attachments").encrypted_archive_action == "accept"
    with pytest.raises(ConfigError, match="encrypted_archive_action"):
        load_settings(
            ROOT / "rules" / "filterd.toml",
            env={**ONLY_THIS_CHECK, "FILTERD_ATTACHMENTS_ENCRYPTED_ARCHIVE_ACTION": "quarantine"},
        )


# -- the walker on its own, and robustness -----------------------------------------------------


def test_walker_reports_positions_not_names() -> None:
    raw = mail((zip_bytes([("secret-plan.txt", b"x")]), "application/zip", "plan.zip"))
    entries = list(walk(Message.from_bytes(raw).iter_raw(), WalkLimits()))
    items = [e for e in entries if isinstance(e, Item)]
    assert [i.location for i in items] == ["part 1", "part 2", "part 2 > member 1"]
    assert items[2].names == ("secret-plan.txt",) and items[2].depth == 1
    assert not any(isinstance(e, Obstacle) for e in entries)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    check = AttachmentsCheck(Config(), load_banned(BANNED_FILE))
    for raw in (
        data,
        mail((data, "application/zip", "x.zip")),
        b"Content-Type: multipart/mixed; boundary=a\n\n--a\n" + data,
    ):
        result = check.check_message(Message.from_bytes(raw), False)
        assert all(f.check == "attachments" for f in result)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=400), st.integers(min_value=0, max_value=399))
def test_corrupted_zips_never_crash(junk: bytes, cut: int) -> None:
    archive = bytearray(zip_bytes([("a.txt", b"hello" * 50), ("b.exe", b"x")]))
    pos = cut % len(archive)
    archive[pos : pos + len(junk)] = junk
    check = AttachmentsCheck(Config(), load_banned(BANNED_FILE))
    findings = check.check_message(
        Message.from_bytes(mail((bytes(archive), "application/zip", "z.zip"))), False
    )
    # No crash, and every refusal carries a reply that names no file.
    for f in findings:
        assert f.effect is Effect.SCORE or (f.reply is not None and "b.exe" not in f.reply.text)


# -- end to end: Postfix -> the real daemon ------------------------------------------------


@pytest.mark.e2e
def test_e2e_banned_types_refused_at_smtp_time(tmp_path: Path) -> None:
    from tests.helpers_daemon import write_config
    from tests.servers import SmtpSink, make_reachable, send_mail

    base = make_reachable(tmp_path)
    sender, rcpt = "alice@example.net", "bob@example.org"
    cases = {
        raw_mail(
            "Content-Type: application/octet-stream\r\n"
            "Content-Disposition: attachment; filename*=UTF-8''rechnung%2Eexe",
            b"x",
        ): "5.7.1 banned attachment type: .exe (Windows executable)",
        mail((pe_bytes(), "application/pdf", "report.pdf")): (
            "5.7.1 banned attachment type: Windows executable (detected by content)"
        ),
        mail((encrypted_zip([("a.pdf", b"x")]), "application/zip", "a.zip")): (
            "5.7.1 encrypted archive not accepted: its content cannot be checked"
        ),
    }
    with SmtpSink(base / "sink") as sink:
        config = write_config(
            base / "filterd.toml",
            {
                "daemon": {"state_dir": str(base / "state")},
                "pipeline": {"recipient_checks": [], "message_checks": ["attachments"]},
                "records": {"enabled": False},
            },
        )
        with filtered_postfix(base, config, sink.port) as (_daemon, postfix):
            for raw, reply in cases.items():
                result = send_mail(postfix.port, sender, [rcpt], raw)
                assert result.data == (554, reply), result
            harmless = mail((docx_bytes(), "application/octet-stream", "letter.docx"))
            assert send_mail(postfix.port, sender, [rcpt], harmless).accepted
            assert len(sink.wait_for_messages(1, timeout=15)) == 1
