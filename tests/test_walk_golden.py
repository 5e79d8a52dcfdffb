"""Golden test: the MIME walk's output on a fixed set of generated messages.

``filterd.mail.walk`` has four jobs (MIME parsing, name decoding, uuencode, zip
unpacking); this pins what it yields, item by item, so that splitting or
speeding it up cannot change a verdict unnoticed. The messages are generated
here (deterministically: fixed zip timestamps, no randomness); the expected
output lives in tests/golden/walk.json. After an intended change, regenerate
with ``FILTERD_UPDATE_GOLDEN=1 pytest tests/test_walk_golden.py`` and review the diff.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import quopri
import zipfile
from pathlib import Path
from typing import Any

import pytest

from filterd.mail.walk import Item, Obstacle, WalkLimits, walk

GOLDEN = Path(__file__).parent / "golden" / "walk.json"
CRLF = b"\r\n"


def _zip(members: dict[str, bytes], encrypted: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in encrypted:
                info.flag_bits |= 0x1  # marked encrypted: what a scanner sees
            zf.writestr(info, data)
    return buf.getvalue()


def _part(headers: list[str], body: bytes) -> bytes:
    return CRLF.join(h.encode() for h in headers) + CRLF + CRLF + body + CRLF


def _multipart(subtype: str, boundary: str, parts: list[bytes], head: list[str] = ()) -> bytes:
    out = CRLF.join(h.encode() for h in head)
    if out:
        out += CRLF
    out += f'Content-Type: multipart/{subtype}; boundary="{boundary}"'.encode() + CRLF + CRLF
    for p in parts:
        out += f"--{boundary}".encode() + CRLF + p
    return out + f"--{boundary}--".encode() + CRLF


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def _attachment(name_header: str, ctype: str, data: bytes) -> bytes:
    return _part(
        [f"Content-Type: {ctype}", f"Content-Disposition: attachment; {name_header}",
         "Content-Transfer-Encoding: base64"],
        _b64(data),
    )  # fmt: skip


PE = b"MZ" + b"\0" * 58 + (64).to_bytes(4, "little") + b"PE\0\0" + b"\0" * 200
PDF = b"%PDF-1.4\n" + b"x" * 300


def messages() -> dict[str, bytes]:
    top = ["From: a@example.net", "To: u@example.org", "Subject: t", "MIME-Version: 1.0"]
    nested_zip = _zip({"inner.zip": _zip({"deep/payload.exe": PE, "readme.txt": b"hi"})})
    uu = (
        b"begin 644 tool.scr" + CRLF
        + b"".join(
            bytes([32 + len(chunk)]) + bytes(32 + b if b else 96 for b in _uu(chunk)) + CRLF
            for chunk in (PE[i : i + 45] for i in range(0, 90, 45))
        )
        + b"`" + CRLF + b"end" + CRLF
    )  # fmt: skip
    return {
        "plain": CRLF.join(h.encode() for h in top) + CRLF + CRLF + b"hello" + CRLF,
        "pdf_and_exe": _multipart(
            "mixed", "b1",
            [_part(["Content-Type: text/plain"], b"see attached"),
             _attachment('filename="report.pdf"', "application/pdf", PDF),
             _attachment('filename="invoice.pdf.exe"', "application/octet-stream", PE)],
            top,
        ),
        "rfc2231_and_encoded_word": _multipart(
            "mixed", "b2",
            [_attachment("filename*=UTF-8''r%C3%A9sum%C3%A9%E2%80%AE.exe", "application/x-msdownload", PE),  # noqa: E501
             _attachment('filename="=?utf-8?b?' + base64.b64encode("naïve.js".encode()).decode() + '?="',  # noqa: E501
                         "text/javascript", b"alert(1)")],
            top,
        ),
        "nested_zip": _multipart(
            "mixed", "b3", [_attachment('filename="files.zip"', "application/zip", nested_zip)], top
        ),
        "encrypted_zip": _multipart(
            "mixed", "b4",
            [_attachment('filename="secret.zip"', "application/zip",
                         _zip({"a.txt": b"x", "b.js": b"y"}, encrypted=("b.js",)))],
            top,
        ),
        "alternative_in_related": _multipart(
            "related", "b5",
            [_multipart("alternative", "b6",
                        [_part(["Content-Type: text/plain"], b"plain"),
                         _part(["Content-Type: text/html", "Content-Transfer-Encoding: quoted-printable"],  # noqa: E501
                               quopri.encodestring(b"<p>caf\xc3\xa9</p>"))]),
             _part(["Content-Type: image/png", "Content-ID: <x>", "Content-Transfer-Encoding: base64"],  # noqa: E501
                   _b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 50))],
            top,
        ),
        "uuencoded_in_text": CRLF.join(h.encode() for h in top) + CRLF + CRLF + b"see" + CRLF + uu,
        "message_rfc822": _multipart(
            "mixed", "b7",
            [_part(["Content-Type: message/rfc822"],
                   _multipart("mixed", "b8",
                              [_attachment('filename="fwd.bat"', "application/octet-stream", b"@echo off")],  # noqa: E501
                              ["Subject: fwd"]))],
            top,
        ),
        "truncated_multipart": _multipart(
            "mixed", "b9", [_attachment('filename="cut.docm"', "application/octet-stream", PDF)], top  # noqa: E501
        )[:-40],
    }  # fmt: skip


def _uu(chunk: bytes) -> list[int]:
    chunk = chunk + b"\0" * (-len(chunk) % 3)
    out: list[int] = []
    for i in range(0, len(chunk), 3):
        n = int.from_bytes(chunk[i : i + 3], "big")
        out += [(n >> s) & 0x3F for s in (18, 12, 6, 0)]
    return out


def describe(entry: Item | Obstacle) -> dict[str, Any]:
    if isinstance(entry, Obstacle):
        return {"obstacle": entry.kind, "location": entry.location, "depth": entry.depth}
    return {
        "location": entry.location,
        "depth": entry.depth,
        "names": list(entry.names),
        "content_type": entry.content_type,
        "complete": entry.complete,
        "size": entry.size,
        "members": list(entry.members),
        "encrypted": entry.encrypted,
        "head_sha256": hashlib.sha256(entry.head).hexdigest()[:16],
        "tail_sha256": hashlib.sha256(entry.tail).hexdigest()[:16],
    }


def run_all() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for name, raw in messages().items():
        chunks = [raw[i : i + 97] for i in range(0, len(raw), 97)]  # odd chunking on purpose
        out[name] = [describe(e) for e in walk(iter(chunks), WalkLimits(max_depth=3))]
    return out


def test_walk_output_matches_golden() -> None:
    got = run_all()
    if os.environ.get("FILTERD_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert set(got) == set(expected)
    for name in expected:
        assert got[name] == expected[name], name


def test_chunking_does_not_change_the_walk() -> None:
    for raw in messages().values():
        whole = [describe(e) for e in walk(iter([raw]), WalkLimits())]
        bytewise = [
            describe(e) for e in walk((raw[i : i + 1] for i in range(len(raw))), WalkLimits())
        ]
        assert whole == bytewise


@pytest.mark.parametrize("name", ["pdf_and_exe", "nested_zip", "uuencoded_in_text"])
def test_golden_is_not_vacuous(name: str) -> None:
    expected = json.loads(GOLDEN.read_text())[name]
    assert any(e.get("names") for e in expected), "the golden file must name attachments"
