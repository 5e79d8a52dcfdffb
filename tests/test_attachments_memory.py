"""The attachments check reads messages as a stream: memory stays flat in message size.

A 25 MB message must not cost the daemon 25 MB (or, as it did, 200 MB) of
Python objects: the check walks ``Message.iter_raw()`` chunks. These tests
bound the Python allocations (tracemalloc peak) while a big message streamed
from disk in 64 KiB chunks, as the daemon's spool does, is checked, and prove
that what comes after a big attachment is still inspected. They also pin the
streaming MIME parser to the stdlib parser's reading of a message (so that the
check sees the parts a mail client sees) and to chunking (the same verdict
however the input is cut).
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import quopri
import re
import tracemalloc
import zipfile
from collections.abc import Iterator
from email import errors
from email.message import Message as StdMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterd.checks.attachments import AttachmentsCheck, Config, load_banned
from filterd.mail.walk import (
    SNIFF_BYTES,
    Item,
    Obstacle,
    WalkLimits,
    declared_names,
    name_variants,
    walk,
)
from filterd.types import Envelope, Finding, Message
from tests.test_attachments import BANNED_FILE, encrypted_zip, mail, pdf_bytes, pe_bytes

CHUNK = 64 * 1024
UUE_BEGIN = re.compile(rb"^begin(?:-base64)? [0-7]{3,4} ([^\r\n]+?)\r?$", re.MULTILINE)
PEAK_LIMIT = 8 * 1024 * 1024
BIG = 18 * 1024 * 1024


@pytest.fixture(scope="module")
def check() -> AttachmentsCheck:
    return AttachmentsCheck(Config(), load_banned(BANNED_FILE))


def spooled_message(path: Path) -> Message:
    """A Message whose body streams from ``path`` in 64 KiB chunks, like the daemon's spool."""
    with path.open("rb") as f:
        head = f.read(CHUNK)
    sep = head.index(b"\r\n\r\n") + 4

    def body() -> Iterator[bytes]:
        with path.open("rb") as f:
            f.seek(sep)
            while chunk := f.read(CHUNK):
                yield chunk

    envelope = Envelope(mail_from="a@example.net", recipients=("b@example.org",))
    return Message(envelope, head[:sep], body, path.stat().st_size)


def write_base64(out: object, source: Iterator[bytes]) -> None:
    """Base64 lines of 76 characters, CRLF, from a stream of blocks (multiples of 57 bytes)."""
    assert hasattr(out, "write")
    for block in source:
        out.write(base64.encodebytes(block).replace(b"\n", b"\r\n"))


def random_blocks(total: int, first: bytes = b"") -> Iterator[bytes]:
    step = 57 * 16 * 1024
    yield first
    left = total - len(first)
    while left > 0:
        n = min(step, left)
        yield os.urandom(n)
        left -= n


def big_message(path: Path, attachment: Iterator[bytes], ctype: str, name: str) -> Path:
    """Text, a big base64 attachment, then a small .exe attachment after it."""
    with path.open("wb") as out:
        out.write(
            b"From: alice@example.net\r\nTo: bob@example.org\r\nSubject: big\r\n"
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="==BIG=="\r\n\r\n'
            b"--==BIG==\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
            b"--==BIG==\r\n"
            + f'Content-Type: {ctype}; name="{name}"\r\n'.encode()
            + b"Content-Transfer-Encoding: base64\r\n\r\n"
        )
        write_base64(out, attachment)
        out.write(
            b"--==BIG==\r\n"
            b'Content-Type: application/octet-stream; name="tool.exe"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(b"harmless bytes").replace(b"\n", b"\r\n")
            + b"--==BIG==--\r\n"
        )
    return path


def checked_with_peak(check: AttachmentsCheck, message: Message) -> tuple[list[Finding], int]:
    tracemalloc.start()
    try:
        findings = list(check.check_message(message, False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Never materialised (Message caches both in its __dict__ when used).
    assert "raw" not in vars(message) and "parsed" not in vars(message)
    return findings, peak


def test_big_message_memory_is_bounded_and_its_end_is_inspected(
    check: AttachmentsCheck, tmp_path: Path
) -> None:
    pdf = pdf_bytes()
    path = big_message(
        tmp_path / "big.eml",
        random_blocks(BIG, first=pdf[: len(pdf) // 57 * 57]),
        "application/pdf",
        "report.pdf",
    )
    assert path.stat().st_size > 24 * 1024 * 1024
    findings, peak = checked_with_peak(check, spooled_message(path))
    assert [f.code for f in findings] == ["BANNED_EXTENSION"], findings
    assert findings[0].detail.startswith("part 3 ")  # the .exe after the big PDF
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.1f} MiB"


def test_big_zip_in_a_big_message(check: AttachmentsCheck, tmp_path: Path) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        with zf.open("data.bin", "w", force_zip64=False) as member:
            for block in random_blocks(BIG):
                member.write(block)
        zf.writestr("setup.exe", pe_bytes())

    def archive_blocks() -> Iterator[bytes]:
        with archive.open("rb") as f:
            while block := f.read(57 * 1024):
                yield block

    path = big_message(tmp_path / "zip.eml", archive_blocks(), "application/zip", "data.zip")
    findings, peak = checked_with_peak(check, spooled_message(path))
    by_code = {(f.code, f.detail.split(" (")[0]) for f in findings}
    # Found inside the archive by name and by content, and the .exe part after it.
    assert ("BANNED_EXTENSION", "part 2 > member 2") in by_code, findings
    assert ("BANNED_MAGIC", "part 2 > member 2") in by_code, findings
    assert ("BANNED_EXTENSION", "part 3") in by_code, findings
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.1f} MiB"


def test_big_message_cut_off_still_gives_a_verdict(check: AttachmentsCheck, tmp_path: Path) -> None:
    # No closing boundary, the last part cut mid-line: still walked, no exception.
    path = big_message(tmp_path / "cut.eml", random_blocks(4 * 1024 * 1024), "image/png", "a.png")
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"--==BIG==--") - 7])
    findings, _ = checked_with_peak(check, spooled_message(path))
    assert [f.code for f in findings] == ["BANNED_EXTENSION"]


def test_a_huge_line_without_line_breaks(check: AttachmentsCheck, tmp_path: Path) -> None:
    # 8 MiB of binary content with no line break at all, sent 8bit.
    path = tmp_path / "line.eml"
    with path.open("wb") as out:
        out.write(
            b"Subject: x\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        for _ in range(8):
            out.write(os.urandom(1024 * 1024).replace(b"\r", b"x").replace(b"\n", b"x"))
        out.write(b"\r\n--B\r\nContent-Type: text/plain; name=a.js\r\n\r\nx\r\n--B--\r\n")
    findings, peak = checked_with_peak(check, spooled_message(path))
    assert [f.code for f in findings] == ["BANNED_EXTENSION"]
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.1f} MiB"


# -- what the stream walker sees is what the stdlib parser sees ------------------------------


def walked(raw: bytes, cut: int | None = None) -> list[tuple[object, ...]]:
    """The walk as comparable tuples; ``cut``: feed the input in pieces of that size."""
    chunks = [raw] if cut is None else [raw[i : i + cut] for i in range(0, len(raw), cut)]
    out: list[tuple[object, ...]] = []
    for entry in walk(chunks, WalkLimits()):
        if isinstance(entry, Obstacle):
            out.append(("obstacle", entry.location, entry.kind))
        else:
            out.append((entry.location, entry.names, entry.content_type, entry.head, entry.size))
    return out


def stdlib_leaves(raw: bytes) -> list[tuple[tuple[str, ...], str, bytes | None]]:
    """Leaf parts as the stdlib parser reads them: names, content type, decoded head.

    The head is None (not compared) where the stdlib gives up decoding base64
    of a length no encoder makes and returns the encoded text: the stream
    walker decodes what it can, as mail clients do.
    """
    out: list[tuple[tuple[str, ...], str, bytes | None]] = []

    def visit(part: StdMessage) -> None:
        if part.is_multipart():
            payload = part.get_payload()
            for sub in payload if isinstance(payload, list) else ():
                if isinstance(sub, StdMessage):
                    visit(sub)
            return
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        names = declared_names(part)
        if part.get_content_type().startswith("text/"):
            names += [n for m in UUE_BEGIN.finditer(data) for n in name_variants(m[1].decode())]
        # The parser drops 0-2 line endings at the end of a part, depending on
        # the structure around it; the stream walker drops the one that RFC 2046
        # gives the boundary. Compared without them.
        head: bytes | None = data[:SNIFF_BYTES].rstrip(b"\r\n")
        if any(isinstance(d, errors.InvalidBase64LengthDefect) for d in part.defects):
            head = None
        out.append((tuple(dict.fromkeys(names)), part.get_content_type(), head))

    visit(email.message_from_bytes(raw, policy=email.policy.default))
    return out


def stream_leaves(raw: bytes) -> list[tuple[tuple[str, ...], str, bytes]]:
    return [
        (e.names, e.content_type, e.head.rstrip(b"\r\n"))
        for e in walk([raw], WalkLimits())
        if isinstance(e, Item) and e.depth == 0 and not e.content_type.startswith("message/")
    ]


_BOUNDARY = st.text("abcXYZ012'()+_,-./:=? ", min_size=1, max_size=20).map(str.strip).filter(bool)
_NAMES = st.sampled_from([None, "a.pdf", "b.exe", "c d.js", "=?utf-8?q?x=2Eexe?="])
_CTYPES = st.sampled_from(["text/plain", "application/octet-stream", "image/png", "text/html"])
_CTES = st.sampled_from([None, "7bit", "8bit", "base64", "quoted-printable"])
_PAYLOAD = st.one_of(
    st.binary(max_size=300),
    st.text("ab \t=.-\r\n", max_size=200).map(str.encode),
    st.sampled_from([b"--", b"--x\r\n--", b"begin 644 t.exe\nM\nend\n", b"\r", b"\r\n--"]),
)


@st.composite
def leaf(draw: st.DrawFn, eol: bytes) -> bytes:
    ctype, name, cte = draw(_CTYPES), draw(_NAMES), draw(_CTES)
    payload = draw(_PAYLOAD)
    if cte == "base64":
        body = base64.encodebytes(payload)
    elif cte == "quoted-printable":
        body = quopri.encodestring(payload)
    else:
        # Unencoded content must not contain a boundary line of its own.
        body = payload.replace(b"\r", b"").replace(b"\n--", b"\n")
    head = f"Content-Type: {ctype}" + (f'; name="{name}"' if name else "")
    if cte:
        head += f"\nContent-Transfer-Encoding: {cte}"
    return (head + "\n\n").encode().replace(b"\n", eol) + body.replace(b"\n", eol)


@st.composite
def entity(draw: st.DrawFn, eol: bytes, depth: int = 0) -> bytes:
    kind = draw(st.sampled_from(["leaf", "multipart", "message"] if depth < 3 else ["leaf"]))
    if kind == "leaf":
        return draw(leaf(eol))
    if kind == "message":
        inner = draw(entity(eol, depth + 1))
        return b"Content-Type: message/rfc822" + eol + eol + b"Subject: inner" + eol + inner
    boundary = draw(_BOUNDARY) + str(depth)
    parts = draw(st.lists(entity(eol, depth + 1), max_size=3))
    sep = f"--{boundary}".encode()
    out = f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode() + eol + eol
    out += draw(st.sampled_from([b"", b"preamble" + eol]))
    for part in parts:
        out += sep + draw(st.sampled_from([b"", b"  "])) + eol + part + eol
    if draw(st.booleans()):
        out += sep + b"--" + eol + draw(st.sampled_from([b"", b"epilogue" + eol]))
    return out


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    raw = b"From: a@example.net" + eol + b"MIME-Version: 1.0" + eol + draw(entity(eol))
    if draw(st.booleans()):  # cut anywhere: a truncated message
        raw = raw[: draw(st.integers(min_value=0, max_value=len(raw)))]
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_stream_walk_reads_parts_like_the_stdlib_parser(raw: bytes) -> None:
    assert_same_leaves(raw)


def assert_same_leaves(raw: bytes) -> None:
    stream, stdlib = stream_leaves(raw), stdlib_leaves(raw)
    assert len(stream) == len(stdlib), (stream, stdlib)
    for mine, theirs in zip(stream, stdlib, strict=True):
        if theirs[2] is None:  # the stdlib kept base64 text: it sees no uuencoded names
            assert mine[1] == theirs[1] and set(theirs[0]) <= set(mine[0]), (stream, stdlib)
        else:
            assert mine == theirs, (stream, stdlib)


@settings(max_examples=200, deadline=None)
@given(messages(), st.integers(min_value=1, max_value=9))
def test_chunking_does_not_matter(raw: bytes, cut: int) -> None:
    assert walked(raw, cut) == walked(raw)


@pytest.mark.parametrize(
    "raw",
    [
        mail((pdf_bytes(), "application/pdf", "a.pdf"), (pe_bytes(), "image/png", "b.png")),
        mail((encrypted_zip([("a.exe", b"x")]), "application/zip", "a.zip")),
        mail(body="x\r\n--\r\n-- \r\n\r--\rbegin 644 t.exe\r\nM\r\nend\r\n").replace(
            b"\n", b"\r\n"
        ),
    ],
)
@pytest.mark.parametrize("cut", [1, 2, 3, 5, 64, CHUNK])
def test_chunking_of_known_messages(raw: bytes, cut: int) -> None:
    assert walked(raw, cut) == walked(raw)


def test_uuencoded_name_found_with_crlf_line_ends(check: AttachmentsCheck) -> None:
    # Mail arrives over SMTP with CRLF line ends.
    body = "Here it is:\r\n\r\nbegin 644 tool.exe\r\nM5&AI<R!I<R!N;W0@82!P<F]G<F%M\r\n`\r\nend\r\n"
    raw = mail(body=body.replace("\r\n", "\n")).replace(b"\n", b"\r\n")
    findings = check.check_message(Message.from_bytes(raw), False)
    assert [f.code for f in findings] == ["BANNED_EXTENSION"]


def test_uuencode_transfer_encoding_is_decoded(check: AttachmentsCheck) -> None:
    encoded = b"begin 644 report.pdf\r\n" + b"".join(
        __import__("binascii").b2a_uu(pe_bytes()[i : i + 45]).replace(b"\n", b"\r\n")
        for i in range(0, len(pe_bytes()), 45)
    )
    raw = (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
        + encoded
        + b"`\r\nend\r\n--B--\r\n"
    )
    findings = check.check_message(Message.from_bytes(raw), False)
    assert [f.code for f in findings] == ["BANNED_MAGIC"]


def test_lookalike_boundaries_are_content(check: AttachmentsCheck) -> None:
    # Lines that start like the boundary but are not it stay in the part.
    raw = (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain\r\n\r\n--BX\r\n--B-\r\n--B--x\r\n"
        b"Content-Type: application/octet-stream; name=a.exe\r\n\r\n--B--\r\n"
    )
    items = [e for e in walk([raw]) if isinstance(e, Item)]
    assert [i.location for i in items] == ["part 1"]
    assert items[0].head.startswith(b"--BX\r\n--B-\r\n--B--x\r\nContent-Type")
    assert list(check.check_message(Message.from_bytes(raw), False)) == []


def test_boundary_of_an_enclosing_multipart_ends_the_inner_one() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=OUT\r\n\r\n--OUT\r\n"
        b"Content-Type: multipart/alternative; boundary=IN\r\n\r\n--IN\r\n"
        b"Content-Type: text/plain\r\n\r\nunclosed inner\r\n"
        b"--OUT\r\nContent-Type: application/octet-stream; name=x.exe\r\n\r\nx\r\n--OUT--\r\n"
    )
    assert_same_leaves(raw)
    assert [names for names, _, _ in stream_leaves(raw)] == [(), ("x.exe",)]
