"""Realistic test messages for the performance bench.

Why: a milter's cost depends on what it is fed. Header count sets the number
of milter events, size sets the body chunks and the clamd stream, MIME
structure sets the parse and the attachment walk, and the words set the
classifier's work. So the bench sends real ham from ``../shared/corpus/``
when it is there (raw, with its own ~20-40 headers), and otherwise generated
mail of the same shape. Attachments are generated: PDF-, PNG- and ZIP-shaped
payloads that are neither banned types nor test viruses, so every message is
meant to be accepted and the numbers measure the full path.

All output uses LF line ends (smtp-source and smtplib both send CRLF).
Generation is deterministic for a given seed.
"""

from __future__ import annotations

import base64
import io
import random
import zipfile
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
FROM = "alice@example.net"
TO = "bob@example.org"

_WORDS = (
    "the",
    "meeting",
    "report",
    "project",
    "draft",
    "budget",
    "review",
    "team",
    "schedule",
    "notes",
    "week",
    "quarter",
    "we",
    "please",
    "find",
    "attached",
    "thanks",
    "regards",
    "update",
    "plan",
    "next",
    "steps",
    "agenda",
    "minutes",
    "version",
    "release",
    "build",
    "test",
    "results",
    "server",
    "network",
    "customer",
    "order",
    "invoice",
    "shipment",
    "delivery",
    "question",
    "answer",
    "idea",
    "proposal",
    "document",
    "summary",
    "figures",
    "table",
    "chart",
    "slide",
    "deadline",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "morning",
    "afternoon",
    "call",
    "office",
    "lunch",
    "travel",
    "about",
    "with",
    "from",
    "into",
    "over",
    "under",
    "after",
    "before",
    "while",
    "because",
    "although",
    "however",
    "also",
)

_LINK_HOSTS = (
    "www.python.org", "lists.debian.org", "docs.example.com", "intranet.example.org",
    "github.com", "en.wikipedia.org", "www.postfix.org", "news.example.net",
)  # fmt: skip


@dataclass(frozen=True)
class BenchMessage:
    """One message to send: its bytes and a label for reports."""

    kind: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def _strip_mbox(raw: bytes) -> bytes:
    """Corpus files may start with an mbox ``From `` line, which is not a header."""
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    return raw.replace(b"\r\n", b"\n")


def corpus_ham(root: Path = CORPUS, limit: int = 2500) -> list[bytes]:
    """Raw ham messages from the shared corpus (empty when it is absent)."""
    found: list[bytes] = []
    for folder in ("spamassassin/easy_ham", "spamassassin/easy_ham_2", "modern/ham"):
        directory = root / folder
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if len(found) >= limit:
                return found
            if path.is_file() and not path.name.startswith(("cmds", ".")):
                found.append(_strip_mbox(path.read_bytes()))
    return found


def _sentences(rng: random.Random, nbytes: int) -> str:
    out: list[str] = []
    size = 0
    while size < nbytes:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        line = " ".join(words).capitalize() + "."
        if rng.random() < 0.08:
            line += f" See https://{rng.choice(_LINK_HOSTS)}/page/{rng.randint(1, 999)}"
        out.append(line)
        size += len(line) + 1
    # Wrap at ~72 columns like a mail client.
    text, col = [], 0
    for word in " ".join(out).split(" "):
        if col + len(word) > 72:
            text.append("\n")
            col = 0
        elif col:
            text.append(" ")
            col += 1
        text.append(word)
        col += len(word)
    return "".join(text) + "\n"


def _body_text(rng: random.Random, ham: list[bytes], nbytes: int) -> str:
    """Plain text of about ``nbytes``: bodies of corpus ham when available."""
    if not ham:
        return _sentences(rng, nbytes)
    parts: list[str] = []
    size = 0
    while size < nbytes:
        raw = rng.choice(ham)
        sep = raw.find(b"\n\n")
        body = raw[sep + 2 :] if sep >= 0 else raw
        text = body.decode("utf-8", "replace")[: nbytes - size + 200]
        parts.append(text)
        size += len(text)
    return "".join(parts)[:nbytes].rsplit("\n", 1)[0] + "\n"


def _headers(rng: random.Random, subject: str, n: int) -> str:
    date = formatdate(1763800000 + n * 61, localtime=False)
    received = "".join(
        f"Received: from relay{i}.example.net (relay{i}.example.net [192.0.2.{10 + i}])\n"
        f"\tby mx{i}.example.net (Postfix) with ESMTPS id {rng.getrandbits(40):010X}\n"
        f"\tfor <{TO}>; {date}\n"
        for i in range(2)
    )
    return (
        received + f"From: Alice Example <{FROM}>\nTo: Bob Example <{TO}>\n"
        f"Subject: {subject}\nDate: {date}\n"
        f"Message-ID: <bench-{n}-{rng.getrandbits(48):012x}@example.net>\n"
        "MIME-Version: 1.0\nUser-Agent: bench/1.0\nX-Mailer: filterd-bench\n"
    )


def _b64(data: bytes) -> str:
    return base64.encodebytes(data).decode()


def _pdf(rng: random.Random, nbytes: int) -> bytes:
    head = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\nstream\n"
    return head + rng.randbytes(max(0, nbytes - len(head) - 20)) + b"\nendstream\n%%EOF\n"


def _png(rng: random.Random, nbytes: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rng.randbytes(max(0, nbytes - 16))


def _zip(rng: random.Random, nbytes: int, text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("notes.txt", text)
        zf.writestr("data.csv", "\n".join(f"{i},{rng.random():.6f}" for i in range(200)))
        # Incompressible payload so the zip has the size we aim for.
        zf.writestr("scan.pdf", _pdf(rng, nbytes))
    return buf.getvalue()


def _with_attachment(
    rng: random.Random, n: int, text: str, filename: str, ctype: str, payload: bytes
) -> bytes:
    boundary = f"=_bench_{rng.getrandbits(64):016x}"
    msg = (
        _headers(rng, f"{filename} for the review", n)
        + f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n'
        f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\n"
        f'{text}\n--{boundary}\nContent-Type: {ctype}; name="{filename}"\n'
        f'Content-Disposition: attachment; filename="{filename}"\n'
        f"Content-Transfer-Encoding: base64\n\n{_b64(payload)}--{boundary}--\n"
    )
    return msg.encode("utf-8", "replace")


def plain_message(rng: random.Random, n: int, nbytes: int, ham: list[bytes]) -> bytes:
    text = _body_text(rng, ham, max(200, nbytes - 700))
    head = _headers(rng, "Re: notes from the meeting", n)
    msg = head + "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    return (msg + text).encode("utf-8", "replace")


def attachment_message(
    rng: random.Random, n: int, nbytes: int, ham: list[bytes], kind: str
) -> bytes:
    """A short text part plus one attachment; ``nbytes`` is the encoded size."""
    text = _body_text(rng, ham, 1500)
    raw_size = max(512, int((nbytes - 3000) * 57 / 77))  # base64: 57 bytes per 77-byte line
    if kind == "pdf":
        return _with_attachment(rng, n, text, "report.pdf", "application/pdf", _pdf(rng, raw_size))
    if kind == "png":
        return _with_attachment(rng, n, text, "photo.png", "image/png", _png(rng, raw_size))
    if kind == "zip":
        payload = _zip(rng, raw_size, text)
        return _with_attachment(rng, n, text, "documents.zip", "application/zip", payload)
    raise ValueError(f"unknown attachment kind {kind!r}")


def ham_10k(ham: list[bytes] | None = None, seed: int = 1) -> BenchMessage:
    """The reference message of the targets: ~10 KB of real ham, as received.

    The corpus message nearest to 10,240 bytes is used whole (its own headers
    included); without the corpus, a generated text message of that size.
    """
    ham = corpus_ham() if ham is None else ham
    if ham:
        best = min(ham, key=lambda m: abs(len(m) - 10240))
        if abs(len(best) - 10240) < 1500:
            return BenchMessage("ham-10k-corpus", best)
    rng = random.Random(seed)
    return BenchMessage("ham-10k-generated", plain_message(rng, 0, 10240, ham))


# (kind, share, low bytes, high bytes): ~100 KB mean, like provider inbound mail where most
# messages are small text and a few carry large attachments.
MIX = (
    ("text", 0.45, 2_000, 12_000),
    ("text", 0.20, 12_000, 40_000),
    ("pdf", 0.15, 40_000, 150_000),
    ("png", 0.12, 150_000, 400_000),
    ("zip", 0.08, 400_000, 1_000_000),
)


def mixed(count: int, seed: int = 7, ham: list[bytes] | None = None) -> list[BenchMessage]:
    """``count`` messages from 2 KB to 1 MB in the MIX proportions, shuffled."""
    ham = corpus_ham() if ham is None else ham
    rng = random.Random(seed)
    out: list[BenchMessage] = []
    plan = [(k, lo, hi) for k, share, lo, hi in MIX for _ in range(max(1, round(share * count)))]
    for n, (kind, lo, hi) in enumerate(plan[:count]):
        size = rng.randint(lo, hi)
        if kind == "text":
            data = plain_message(rng, n, size, ham)
            fitting = [m for m in ham if lo <= len(m) <= hi]
            if fitting and rng.random() < 0.5:
                data = rng.choice(fitting)  # real ham as received, when one fits
            out.append(BenchMessage(f"text-{'small' if hi <= 12_000 else 'medium'}", data))
        else:
            out.append(BenchMessage(kind, attachment_message(rng, n, size, ham, kind)))
    rng.shuffle(out)
    return out


def large(nbytes: int = 25_000_000, seed: int = 3) -> BenchMessage:
    """One message of ``nbytes`` (a big PDF attachment): the memory test."""
    rng = random.Random(seed)
    return BenchMessage("large", attachment_message(rng, 0, nbytes, [], "pdf"))
