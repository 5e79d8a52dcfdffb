"""Walks a message's attachments as a stream: MIME leaf parts, then zip members, nested.

The walker only reports what is there; the attachments check judges it. For
every MIME leaf part and every zip member it yields an ``Item`` with the names
the sender declared (Content-Disposition ``filename`` and Content-Type
``name``, RFC 2231 and encoded words decoded by the stdlib parser, normalised
the way Windows reads them), the declared content type, and the leading bytes
for content sniffing. Anything that stops it from looking further is yielded
as an ``Obstacle`` (archive nested too deep, too many members, too much to
unpack, damaged, encrypted) so that a verdict can be configured for it.

Memory stays flat in message size: the message is read as a stream of chunks
(``Message.iter_raw``), never joined. Multipart boundaries are tracked line by
line with the stdlib parser's rules (a line that matches the boundary of any
enclosing multipart ends a part; the outermost match wins), only the few
headers that matter (Content-Type, -Disposition, -Transfer-Encoding) of each
part are kept and handed to the stdlib header parser, and each leaf's body is
decoded incrementally into a spooled temporary file (1 MiB in memory, then
disk, capped at ``max_bytes``). Zip files are opened on that file (``zipfile``
seeks; only its central directory is held); a nested zip member is spooled the
same way. An attached message (``message/*``, even transfer-encoded) is decoded
on the fly and walked as a stream of its own.

Zip bombs: nothing is extracted but nested archives, member contents are read
up to ``SNIFF_BYTES`` each, and a nested archive is unpacked only while the
walk's ``max_bytes`` budget lasts. The member count is checked from the
end-of-central-directory record before ``zipfile`` parses the directory.

Locations (``part 3 > member 2``) are positions, never file names: they go
to logs.
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import re
import struct
import tempfile
import unicodedata
import zipfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.utils import collapse_rfc2231_value
from typing import IO, Literal
from urllib.parse import unquote

from filterd import deadline

# Enough for every magic the check knows (ISO 9660 at 0x8001..0x9006).
SNIFF_BYTES = 40 * 1024
# The end of a complete item: a zip's end record lies in its last 64 KiB + 22 bytes.
TAIL_BYTES = 65535 + 22
# Multipart and attached-message nesting that is followed (the parser allows more).
MAX_MIME_NESTING = 30
# Decoded content kept in memory per open spool before it goes to disk.
SPOOL_MEMORY = 1024 * 1024
# Longest line looked at whole (header lines, boundary candidates); longer ones are cut.
MAX_LINE = 256 * 1024
# Bytes of the relevant headers kept per part.
MAX_HEADER_BYTES = 256 * 1024
# "zip64"/"scan-size": content clamd will not look into (it does not unpack zip64
# members; it skips members over its MaxFileSize), whatever this walk sees.
ObstacleKind = Literal[
    "depth", "members", "bytes", "damaged", "encrypted", "zip64", "scan-size", "structure"
]

_CHUNK = 64 * 1024
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EXTRA = 0x0001
_ZIP_LOCAL = b"PK\x03\x04"
_UUE_BEGIN = re.compile(rb"^begin(?:-base64)? [0-7]{3,4} ([^\r\n]+?)\r?$", re.MULTILINE)
_UUE_LINE = 4096
# Windows ignores trailing dots and spaces in file names.
_TRAILING = " .\t\r\n"
_EOL = re.compile(rb"\r\n|\r|\n")
# The stdlib feed parser's test for a header line (email.feedparser.headerRE).
_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_KEPT_HEADERS = frozenset({b"content-type", b"content-disposition", b"content-transfer-encoding"})
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_B64_DROP = bytes(c for c in range(256) if c not in _B64_ALPHABET)
_UU_ENCODINGS = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
_HEADER_PARSER = email.parser.BytesParser(policy=email.policy.default)


@dataclass(frozen=True)
class WalkLimits:
    max_depth: int = 3  # archive levels opened: a zip attached to the mail is level 1
    max_members: int = 1000  # zip members over the whole message
    max_bytes: int = 64 * 1024 * 1024  # decompressed bytes for nested archives; per MIME part
    spool_dir: str | None = None  # where decoded parts over SPOOL_MEMORY go (None: system temp)
    # Zip members declared bigger than this are reported as "scan-size" (keep it at
    # clamd's MaxFileSize: clamd skips bigger members). None: not checked.
    max_scan_member_bytes: int | None = None
    # MIME entities (parts, attached messages) walked; beyond it a "structure"
    # obstacle ends the walk (10^5 parts cost ~18 CPU-s to walk).
    max_parts: int = 1000
    # Multipart / attached-message nesting; deeper is a "structure" obstacle too.
    max_nesting: int = MAX_MIME_NESTING


@dataclass(frozen=True)
class Item:
    """One attachment or archive member.

    ``head`` is the first ``SNIFF_BYTES`` of the decoded content. ``complete``
    items (MIME parts, nested zips) also have ``tail`` (the last
    ``TAIL_BYTES``), ``size`` and ``content``, a seekable file with all of it:
    it is open only until the walk moves on, so judge an item when it is
    yielded (``read_at`` and ``contains`` fall back to ``head`` after that).
    ``members`` lists the member names when the item is itself a zip.
    """

    location: str
    depth: int
    names: tuple[str, ...]
    content_type: str
    head: bytes
    complete: bool
    size: int = 0
    tail: bytes = b""
    members: tuple[str, ...] = ()
    encrypted: bool = False
    content: IO[bytes] | None = field(default=None, compare=False, repr=False)

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the content (less at its end)."""
        if offset < 0 or size <= 0:
            return b""
        if offset + size <= len(self.head) or self.content is None:
            return self.head[offset : offset + size]
        try:
            self.content.seek(offset)
            return self.content.read(size)
        except (OSError, ValueError):  # closed: the walk has moved on
            return self.head[offset : offset + size]

    def contains(self, needle: bytes) -> bool:
        """Whether ``needle`` occurs anywhere in the content (the head if incomplete)."""
        if needle in self.head:
            return True
        if self.content is None or self.size <= len(self.head) or not needle:
            return False
        keep = len(needle) - 1
        try:
            self.content.seek(0)
            previous = b""
            while block := self.content.read(16 * _CHUNK):
                if needle in block or needle in previous + block[:keep]:
                    return True
                previous = block[-keep:] if keep else b""
        except (OSError, ValueError):
            pass
        return False


@dataclass(frozen=True)
class Obstacle:
    location: str
    depth: int
    kind: ObstacleKind


@dataclass
class _Budget:
    limits: WalkLimits
    members: int = 0
    bytes: int = 0


def normalise_name(name: str) -> str:
    """The name as Windows would act on it: NFKC, no invisible marks, last path part."""
    name = unicodedata.normalize("NFKC", name)
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cf", "Cc") or c == "\0")
    name = re.split(r"[/\\]", name)[-1]
    return name.rstrip(_TRAILING)


def name_variants(name: str) -> list[str]:
    """The normalised name, plus the part before a NUL (C strings stop there)."""
    out = [normalise_name(name.replace("\0", ""))]
    if "\0" in name:
        out.append(normalise_name(name.split("\0", 1)[0]))
    return [n for n in dict.fromkeys(out) if n]


def _decode_word(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # noqa: BLE001 - malformed encoded word: keep the raw text
        return value


def declared_names(part: Message) -> list[str]:
    """Every file name a part declares.

    A part may declare several (Content-Disposition ``filename`` and
    Content-Type ``name``, or the same parameter twice): clients differ in
    which one they use, so every one of them is judged.
    """
    raw: list[object] = []
    for param, header in (("filename", "content-disposition"), ("name", "content-type")):
        try:
            raw.append(part.get_param(param, header=header))
        except Exception:  # noqa: BLE001 - unparseable header: no name from it
            continue
    raw += _all_name_params(part)
    names: list[str] = []
    for value in raw:
        if value is None:
            continue
        if isinstance(value, tuple):  # compat32 RFC 2231 triple
            value = collapse_rfc2231_value(value)
        names += name_variants(_decode_word(str(value)))
    return list(dict.fromkeys(names))


_NAME_PARAM = re.compile(
    r"""(?:^|;)\s*(?P<key>(?:file)?name)(?:\*(?P<idx>\d+))?\*?\s*=\s*"""
    r"""(?P<val>"(?:[^"\\]|\\.)*"|[^;\s]*)""",
    re.I,
)


def _all_name_params(part: Message) -> list[object]:
    """Name parameters including duplicates, which the default policy drops."""
    found: list[object] = []
    for key, value in part.raw_items():
        if key.lower() not in ("content-disposition", "content-type"):
            continue
        try:
            legacy = Message()  # compat32: keeps duplicate parameters
            legacy[key] = str(value)
            params = legacy.get_params(header=key) or []
            found += [v for k, v in params if k.lower() in ("filename", "name")]
        except Exception:  # noqa: BLE001 - the stdlib chokes on some RFC 2231 mixes
            found += _scan_name_params(str(value))
    return found


def _scan_name_params(header: str) -> list[str]:
    """A forgiving parameter scan: single values, and RFC 2231 continuations joined."""
    single: list[str] = []
    segments: dict[str, list[tuple[int, str]]] = {}
    for match in _NAME_PARAM.finditer(header):
        text = match["val"].strip('"')
        if match["idx"] is None:
            single.append(_rfc2231_text(text))
        else:
            segments.setdefault(match["key"].lower(), []).append((int(match["idx"]), text))
    for parts in segments.values():
        single.append(_rfc2231_text("".join(text for _, text in sorted(parts))))
    return single


def _rfc2231_text(text: str) -> str:
    if text.count("'") >= 2:  # charset'language'percent-encoded
        return unquote(text.split("'", 2)[2], errors="replace")
    return unquote(text, errors="replace") if "%" in text else text


def looks_like_zip(head: bytes, tail: bytes) -> bool:
    """A local header at the start, or an end record near the end (zip appended)."""
    return head.startswith(_ZIP_LOCAL) or _EOCD in tail[-TAIL_BYTES:]


# -- the walk ---------------------------------------------------------------------------

# Where an entity's body ended: (level of the multipart whose boundary line was met,
# outermost 0; whether it was the closing one), or None at the end of input.
_Term = tuple[int, bool] | None
_Walked = Generator["Item | Obstacle", None, _Term]


def walk(chunks: Iterable[bytes], limits: WalkLimits | None = None) -> Iterator[Item | Obstacle]:
    """Every leaf part, uuencoded names in text parts, and zip members, depth first.

    ``chunks`` is the raw message (``Message.iter_raw()``), in pieces of any size.
    """
    walker = _Walker(limits or WalkLimits())
    try:
        yield from walker.entity(_Reader(chunks), _Stack(()), 0, "text/plain")
    except _StopWalk:
        return


class _Stack:
    """Boundaries of the enclosing multiparts, outermost first."""

    def __init__(self, patterns: tuple[re.Pattern[bytes] | None, ...]) -> None:
        self.patterns = patterns

    def __len__(self) -> int:
        return len(self.patterns)

    def push(self, boundary: str) -> _Stack:
        try:
            raw = boundary.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:  # decoded RFC 2231 text: no raw line can match it
            return _Stack((*self.patterns, None))
        # email.feedparser's boundaryre, applied to a line with its ending.
        pattern = re.compile(re.escape(b"--" + raw) + rb"(--)?[ \t]*(?:\r\n|\r|\n)?\Z")
        return _Stack((*self.patterns, pattern))

    def match(self, line: bytes) -> _Term:
        """The outermost multipart this line is a boundary of (the parser's precedence)."""
        if not line.startswith(b"--"):
            return None
        for level, pattern in enumerate(self.patterns):
            found = pattern.match(line) if pattern is not None else None
            if found is not None:
                return (level, found.group(1) is not None)
        return None


class _Reader:
    """A read position over a stream of chunks, with line access and bounded buffering."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._chunk = memoryview(b"")
        self._buf = bytearray()
        self._pos = 0
        self.eof = False

    def fill(self) -> bool:
        """Append up to ``_CHUNK`` more bytes; False at the end of input."""
        while not self._chunk:
            if self.eof:
                return False
            try:
                self._chunk = memoryview(next(self._chunks))
            except StopIteration:
                self.eof = True
                return False
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += self._chunk[:_CHUNK]
        self._chunk = self._chunk[_CHUNK:]
        return True

    def _line_end(self, limit: int | None = None) -> re.Match[bytes] | None:
        end = len(self._buf) if limit is None else min(len(self._buf), self._pos + limit)
        found = _EOL.search(self._buf, self._pos, end)
        # A CR at the end of the buffer may be the first half of a CRLF.
        if found and found.end() == len(self._buf) and found.group() == b"\r" and not self.eof:
            return None
        return found

    def peek_line(self, cap: int = MAX_LINE) -> bytes:
        """The line at the read position with its ending, at most ``cap`` bytes; b"" at the end."""
        while True:
            found = self._line_end(cap + 2)
            if found is not None:
                return bytes(self._buf[self._pos : found.end()])
            if len(self._buf) - self._pos > cap or not self.fill():
                return bytes(self._buf[self._pos : self._pos + cap])

    def skip_line(self) -> None:
        """Move past the line at the read position, however long it is."""
        while True:
            found = self._line_end()
            if found is not None:
                self._pos = found.end()
                return
            cr = self._buf.endswith(b"\r")
            self._pos = len(self._buf) - (1 if cr else 0)
            if not self.fill():
                self._pos = len(self._buf)
                return

    def body(self, stack: _Stack) -> Generator[bytes, None, _Term]:
        """The bytes up to the next boundary line of ``stack`` (consumed), or the end.

        As in RFC 2046, the line ending before a boundary belongs to the
        boundary. (The stdlib parser drops zero to two line endings at the end
        of a part depending on the structure around it; only the last bytes of
        unencoded parts can differ.)
        """
        if not len(stack):
            while self._pos < len(self._buf) or self.fill():
                yield bytes(self._buf[self._pos :])
                self._pos = len(self._buf)
            return None
        pending = b""  # a line ending that is content unless a boundary follows
        at_line_start = True
        while True:
            if at_line_start:
                at_line_start = False
                line = self.peek_line()
                term = stack.match(line) if line else None
                if not line or term is not None:
                    self.skip_line()
                    if pending and term is None:
                        yield pending
                    return term
            buf, pos = self._buf, self._pos
            k = _boundary_candidate(buf, pos)
            if k >= 0:
                eol = k - 1 if buf[k] == 0x0A and k > pos and buf[k - 1] == 0x0D else k
                data = pending + bytes(buf[pos:eol])
                pending = bytes(buf[eol : k + 1])
                self._pos = k + 1
                at_line_start = True
                if data:
                    yield data
                continue
            # No line starting with "--" in the buffer: pass on all but the last
            # bytes, which may be the start of one.
            end = len(buf) - 3
            if end > pos:
                data = pending + bytes(buf[pos:end])
                pending = b""
                self._pos = end
                yield data
            if not self.fill():
                rest = pending + bytes(self._buf[self._pos :])
                self._pos = len(self._buf)
                if rest:
                    yield rest
                return None
            # (``pending`` is always empty here: it is only set at a line start.)


def _boundary_candidate(buf: bytearray, pos: int) -> int:
    """Index of the line ending before the next line that starts with "--" (-1: none)."""
    i = buf.find(b"--", pos + 1)
    while i >= 0:
        if buf[i - 1] in (0x0A, 0x0D):
            return i - 1
        i = buf.find(b"--", i + 1)
    return -1


class _Body:
    """One entity's body as raw pieces; ``term`` says how it ended once it is exhausted."""

    def __init__(
        self,
        reader: _Reader,
        stack: _Stack,
        ended: bool = False,
        term: _Term = None,
    ) -> None:
        self.term: _Term = term
        self._pieces: Iterator[bytes] = iter(()) if ended else self._run(reader, stack)

    def _run(self, reader: _Reader, stack: _Stack) -> Iterator[bytes]:
        self.term = yield from reader.body(stack)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._pieces)

    def drain(self) -> _Term:
        for _ in self._pieces:
            pass
        return self.term


def _read_headers(reader: _Reader, stack: _Stack) -> tuple[list[bytes], _Body | None]:
    """The kept header lines of an entity; a finished body if a boundary or the end came first.

    Follows email.feedparser: a blank line ends the headers; a line that is
    not a header line ends them too and is the first line of the body.
    """
    kept: list[bytes] = []
    size = 0
    keeping = False
    while True:
        line = reader.peek_line()
        if not line:
            return kept, _Body(reader, stack, ended=True)
        term = stack.match(line)
        if term is not None:
            reader.skip_line()
            return kept, _Body(reader, stack, ended=True, term=term)
        if line[0] in (0x0A, 0x0D):
            reader.skip_line()
            return kept, None
        if not _HEADER_LINE.match(line):
            return kept, None
        reader.skip_line()
        if line[0] not in (0x20, 0x09):  # not a continuation line
            keeping = line.split(b":", 1)[0].lower() in _KEPT_HEADERS
        if keeping and size + len(line) < MAX_HEADER_BYTES:
            if not line.endswith((b"\n", b"\r")):
                line += b"\n"
            kept.append(line)
            size += len(line)


def _parse_headers(lines: list[bytes], default_type: str) -> EmailMessage:
    part = _HEADER_PARSER.parsebytes(b"".join(lines) + b"\n", headersonly=True)
    assert isinstance(part, EmailMessage)
    part.set_default_type(default_type)
    return part


def _header(part: Message, name: str) -> str:
    try:
        return str(part.get(name, "")).strip().lower()
    except Exception:  # noqa: BLE001 - unparseable header: as if absent
        return ""


class _StopWalk(Exception):
    """A structure limit was reached: the walk ends after its obstacle."""


class _Walker:
    def __init__(self, limits: WalkLimits) -> None:
        self.limits = limits
        self.budget = _Budget(limits)
        self.parts = 0
        self.entities = 0

    def entity(
        self,
        reader: _Reader,
        stack: _Stack,
        nesting: int,
        default_type: str,
    ) -> _Walked:
        """One message or body part, up to the boundary line that ends it (returned)."""
        deadline.check()
        self.entities += 1
        if nesting > self.limits.max_nesting or self.entities > self.limits.max_parts:
            yield Obstacle(f"part {self.parts}", 0, "structure")
            raise _StopWalk
        lines, ended = _read_headers(reader, stack)
        part = _parse_headers(lines, default_type)
        try:
            ctype = part.get_content_type().lower()
        except Exception:  # noqa: BLE001
            ctype = "application/octet-stream"
        if ctype.startswith("multipart/"):
            try:
                boundary = part.get_boundary()
            except Exception:  # noqa: BLE001 - unparseable: no boundary, as the parser does
                boundary = None
            if boundary is not None:
                inner = stack.push(boundary)
                preamble = ended or _Body(reader, inner)
                return (
                    yield from self._multipart(reader, stack, inner, part, ctype, preamble, nesting)
                )
        if ctype.startswith("message/"):
            return (yield from self._message(part, ctype, ended or _Body(reader, stack), nesting))
        return (yield from self._leaf(part, ctype, ended or _Body(reader, stack)))

    def _multipart(
        self,
        reader: _Reader,
        stack: _Stack,
        inner: _Stack,
        part: EmailMessage,
        ctype: str,
        preamble: _Body,
        nesting: int,
    ) -> _Walked:
        own = len(stack)
        # Until the first boundary we cannot know whether there will be one; if
        # not, the parser makes this text the (leaf) content of the multipart.
        spool, names = self._spool(preamble, _header(part, "content-transfer-encoding"), False)
        term = preamble.term
        if term is None or term[0] < own or term[1]:
            try:
                yield from self._leaf_item(part, ctype, spool, names)
            finally:
                spool.close()
            if term is not None and term[0] == own:  # a closing boundary, no opening one
                return _Body(reader, stack).drain()
            return term
        spool.close()
        default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        while True:
            # The parser skips boundary lines that follow one another (even a closing one).
            while line := reader.peek_line():
                found = inner.match(line)
                if found is None or found[0] < own:
                    break
                reader.skip_line()
            term = yield from self.entity(reader, inner, nesting + 1, default)
            if term is None or term[0] < own:
                return term
            if term[1]:
                return _Body(reader, stack).drain()  # the epilogue

    def _message(self, part: EmailMessage, ctype: str, body: _Body, nesting: int) -> _Walked:
        # An attached message can itself carry a name or a banned type. A
        # base64/QP-encoded one (forbidden by RFC 2046, decoded by some clients
        # anyway) is decoded first.
        self.parts += 1
        yield Item(f"part {self.parts}", 0, tuple(declared_names(part)), ctype, b"", True)
        decoded = _decoded(body, _header(part, "content-transfer-encoding"), [])
        yield from self.entity(_Reader(decoded), _Stack(()), nesting + 1, "text/plain")
        return body.drain()

    def _leaf(self, part: EmailMessage, ctype: str, body: _Body) -> _Walked:
        cte = _header(part, "content-transfer-encoding")
        spool, names = self._spool(body, cte, ctype.startswith("text/"))
        try:
            yield from self._leaf_item(part, ctype, spool, names)
        finally:
            spool.close()
        return body.term

    def _leaf_item(
        self, part: EmailMessage, ctype: str, spool: _Spool, found: list[str]
    ) -> Iterator[Item | Obstacle]:
        """The item for a leaf; ``found``: names found in its content (uuencoding)."""
        self.parts += 1
        location = f"part {self.parts}"
        names = list(dict.fromkeys([*declared_names(part), *found]))
        head = bytes(spool.head)
        if not spool.complete:
            # Bigger than max_bytes decoded (only if the message size limit allows it).
            yield Item(location, 0, tuple(names), ctype, head, False, spool.size)
            if head.startswith(_ZIP_LOCAL):
                yield Obstacle(location, 0, "bytes")
            return
        item = Item(
            location,
            0,
            tuple(names),
            ctype,
            head,
            True,
            spool.size,
            spool.tail(),
            content=spool.file,
        )
        yield from _item(item, self.budget)

    def _spool(self, body: Iterable[bytes], cte: str, text: bool) -> tuple[_Spool, list[str]]:
        """A body decoded into a spool, and the names of uuencoded files it carries.

        Those are looked for in ``text`` parts (``begin 644 name`` lines) and
        in parts whose transfer encoding is uuencode.
        """
        spool = _Spool(self.limits.max_bytes, self.limits.spool_dir)
        scanner = _UueScanner() if text else None
        names: list[str] = []
        try:
            for block in _decoded(body, cte, names):
                spool.write(block)
                if scanner is not None:
                    scanner.feed(block)
        except BaseException:
            spool.close()
            raise
        if scanner is not None:
            names += scanner.finish()
        return spool, names


class _Spool:
    """Decoded content: the head in memory, the whole in a spooled file up to ``cap``."""

    def __init__(self, cap: int, directory: str | None) -> None:
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - see close()
            max_size=SPOOL_MEMORY, dir=directory or None
        )
        self.cap = cap
        self.size = 0
        self.head = bytearray()

    @property
    def complete(self) -> bool:
        return self.size <= self.cap

    def write(self, data: bytes) -> None:
        if len(self.head) < SNIFF_BYTES:
            self.head += data[: SNIFF_BYTES - len(self.head)]
        room = self.cap - self.size
        if room > 0:
            self.file.write(data[:room] if len(data) > room else data)
        self.size += len(data)

    def tail(self) -> bytes:
        self.file.seek(max(0, min(self.size, self.cap) - TAIL_BYTES))
        return self.file.read(TAIL_BYTES)

    def close(self) -> None:
        self.file.close()


# -- transfer decoding, incrementally ---------------------------------------------------


def _decoded(pieces: Iterable[bytes], cte: str, uu_names: list[str]) -> Iterator[bytes]:
    """The body decoded by its Content-Transfer-Encoding; unknown ones as they are."""
    if cte == "base64":
        return _base64(pieces)
    if cte == "quoted-printable":
        return _quoted_printable(pieces)
    if cte in _UU_ENCODINGS:
        return _uudecode(pieces, uu_names)
    return iter(pieces)


def _base64(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Lenient, as binascii (and so the stdlib) decodes: characters outside the
    alphabet are skipped, and padding that completes a quantum ends the data
    ("AA==" + anything is one byte); other "=" are skipped."""
    carry = b""
    done = False
    for piece in pieces:
        if done:
            continue  # consume the rest of the body
        data = carry + piece.translate(None, _B64_DROP)
        hold = len(data)
        start = 0
        while (pad := data.find(b"=", start)) >= 0:
            run = len(data) - pad - len(data[pad:].lstrip(b"="))
            quad = pad % 4  # everything before ``pad`` is alphabet, from a quantum start
            if quad == 3 or (quad == 2 and run >= 2):
                data, done = data[:pad] + b"=" * (4 - quad), True
                hold = len(data)
                break
            if quad == 2 and pad + run == len(data):
                hold = pad - 2  # "xx=": the next piece may complete the padding
                break
            data = data[:pad] + data[pad + run :]
            start = pad
        cut = min(len(data) - len(data) % 4, hold)
        if cut:
            yield binascii.a2b_base64(data[:cut])
        carry = data[cut:]
    carry = carry.rstrip(b"=")
    if len(carry) >= 2 and not done:
        yield binascii.a2b_base64(carry + b"=" * (4 - len(carry)))


def _quoted_printable(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Decoded in runs that never split an escape or a soft line break."""
    carry = b""
    for piece in pieces:
        data = carry + piece
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            cut = len(data)
        escape = data.rfind(b"=", max(0, cut - 2), cut)
        if escape >= 0:
            cut = escape
        if cut:
            yield binascii.a2b_qp(data[:cut])
        carry = data[cut:]
    if carry:
        yield binascii.a2b_qp(carry)


def _lines(pieces: Iterable[bytes], cap: int) -> Iterator[bytes]:
    """Lines with their endings; longer ones are cut into pieces of ``cap``."""
    carry = b""
    for piece in pieces:
        data = carry + piece
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            yield data[start : end + 1]
            start = end + 1
        carry = data[start:]
        while len(carry) > cap:
            yield carry[:cap]
            carry = carry[cap:]
    if carry:
        yield carry


def _uudecode(pieces: Iterable[bytes], names: list[str]) -> Iterator[bytes]:
    """Content-Transfer-Encoding x-uuencode: the lines between ``begin`` and ``end``."""
    raw: list[bytes] = []  # kept while no begin line has come: the content if none does
    kept = 0
    state = "before"
    for line in _lines(pieces, _UUE_LINE):
        if state == "before":
            found = _UUE_BEGIN.match(line.rstrip(b"\r\n"))
            if found is not None:
                names += name_variants(found.group(1).decode("utf-8", "replace"))
                state, raw = "body", []
                continue
            raw.append(line)
            kept += len(line)
            if kept > _CHUNK:  # no uuencoding in sight: pass it on as it is
                yield from raw
                state, raw = "raw", []
        elif state == "raw":
            yield line
        elif state == "body":
            stripped = line.strip(b" \t\r\n\f")
            if stripped == b"end":
                state = "after"
            elif stripped:
                try:
                    yield binascii.a2b_uu(line)
                except binascii.Error:
                    count = (((line[0] - 32) & 63) * 4 + 5) // 3
                    try:
                        yield binascii.a2b_uu(line[:count])
                    except binascii.Error:
                        continue
    yield from raw


class _UueScanner:
    """Finds ``begin 644 name`` lines of uuencoded files in text, a block at a time."""

    def __init__(self) -> None:
        self._carry = b""
        self._skipping = False  # inside a line too long to be a begin line
        self.names: list[str] = []

    def feed(self, data: bytes) -> None:
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return
            self._skipping = False
            data = data[newline + 1 :]
        text = self._carry + data
        cut = text.rfind(b"\n") + 1
        self._scan(text[:cut])
        self._carry = text[cut:]
        if len(self._carry) > _UUE_LINE:
            self._carry, self._skipping = b"", True

    def _scan(self, text: bytes) -> None:
        if b"begin" in text:
            for found in _UUE_BEGIN.finditer(text):
                self.names += name_variants(found.group(1).decode("utf-8", "replace"))

    def finish(self) -> list[str]:
        if not self._skipping:
            self._scan(self._carry)
        self._carry = b""
        return self.names


# -- zip archives ------------------------------------------------------------------------


def _item(item: Item, budget: _Budget) -> Iterator[Item | Obstacle]:
    """A complete item, and when it is a zip, its members."""
    location, depth = item.location, item.depth
    if item.content is None or not looks_like_zip(item.head, item.tail):
        yield item
        return
    if depth >= budget.limits.max_depth:
        yield item
        yield Obstacle(location, depth, "depth")
        return
    count = _declared_member_count(item.tail)
    if count is not None and budget.members + count > budget.limits.max_members:
        yield item
        yield Obstacle(location, depth, "members")
        return
    try:
        item.content.seek(0)
        archive = zipfile.ZipFile(item.content)
        infos = archive.infolist()
    except Exception:  # noqa: BLE001 - zipfile raises many types on bad input
        yield item
        if item.head.startswith(_ZIP_LOCAL):
            yield Obstacle(location, depth, "damaged")
        return
    # An empty name (a NUL at its start) is a file; zipfile's is_dir() would raise on it.
    files = [i for i in infos if not i.filename.endswith("/")]
    encrypted = any(i.flag_bits & 0x1 for i in files)
    yield replace(item, members=tuple(i.filename for i in files), encrypted=encrypted)
    budget.members += len(files)
    if budget.members > budget.limits.max_members:
        yield Obstacle(location, depth, "members")
        return
    if encrypted:
        yield Obstacle(location, depth, "encrypted")
    if _ZIP64_LOCATOR in item.tail:
        yield Obstacle(location, depth, "zip64")
    scan_limit = budget.limits.max_scan_member_bytes
    for number, info in enumerate(files, 1):
        deadline.check()
        where = f"{location} > member {number}"
        if _is_zip64(info) or _local_zip64(item.content, info):
            yield Obstacle(where, depth + 1, "zip64")
        if scan_limit is not None and info.file_size > scan_limit:
            yield Obstacle(where, depth + 1, "scan-size")
        yield from _member(archive, info, where, depth + 1, budget)


def _member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, location: str, depth: int, budget: _Budget
) -> Iterator[Item | Obstacle]:
    names = tuple(name_variants(info.filename))
    if info.flag_bits & 0x1:
        # Names of encrypted members are still visible; contents are not.
        yield Item(location, depth, names, "", b"", False, encrypted=True)
        return
    remaining = budget.limits.max_bytes - budget.bytes
    spool: _Spool | None = None
    try:
        with archive.open(info) as stream:
            head = stream.read(SNIFF_BYTES)
            # A nested zip must be unpacked whole (its directory is at the end).
            if head.startswith(_ZIP_LOCAL) and info.file_size <= remaining:
                spool = _Spool(remaining, budget.limits.spool_dir)
                spool.write(head)
                while spool.size <= remaining and (block := stream.read(_CHUNK)):
                    spool.write(block)
    except Exception:  # noqa: BLE001 - bad CRC, unsupported method, truncated data
        if spool is not None:
            spool.close()
        yield Item(location, depth, names, "", b"", False)
        yield Obstacle(location, depth, "damaged")
        return
    if not head.startswith(_ZIP_LOCAL):
        yield Item(location, depth, names, "", head, False)
        return
    if spool is None:
        yield Item(location, depth, names, "", head, False)
        yield Obstacle(location, depth, "bytes")
        return
    try:
        budget.bytes += spool.size
        if budget.bytes > budget.limits.max_bytes:
            # The declared size lied (a bomb): stop here.
            yield Item(location, depth, names, "", head, False)
            yield Obstacle(location, depth, "bytes")
            return
        item = Item(
            location, depth, names, "", head, True, spool.size, spool.tail(), content=spool.file
        )
        yield from _item(item, budget)
    finally:
        spool.close()


def _local_zip64(content: IO[bytes], info: zipfile.ZipInfo) -> bool:
    """Whether the member's local header carries a ZIP64 extra field.

    Writers may put it there only (Python's ``force_zip64`` does), and the local
    header is what a streaming unpacker such as clamd's reads.
    """
    try:
        content.seek(info.header_offset)
        header = content.read(30)
        if len(header) < 30 or not header.startswith(_ZIP_LOCAL):
            return False
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        content.seek(info.header_offset + 30 + name_len)
        return _has_zip64_extra(content.read(extra_len))
    except (OSError, ValueError):
        return False


def _is_zip64(info: zipfile.ZipInfo) -> bool:
    """Whether the member's central-directory entry carries a ZIP64 extra field."""
    return _has_zip64_extra(info.extra)


def _has_zip64_extra(extra: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(extra):
        header_id, size = struct.unpack_from("<HH", extra, pos)
        if header_id == _ZIP64_EXTRA:
            return True
        pos += 4 + size
    return False


def _declared_member_count(tail: bytes) -> int | None:
    """Entries in the end-of-central-directory record (None if not found)."""
    pos = tail.rfind(_EOCD, max(0, len(tail) - 65535 - 22))
    if pos < 0 or pos + 22 > len(tail):
        return None
    (total,) = struct.unpack_from("<H", tail, pos + 10)
    if total == 0xFFFF:  # ZIP64: the real count is elsewhere; treat as huge
        return 1 << 32
    return int(total)
