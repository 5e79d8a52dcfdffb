"""Walks a message's attachments: MIME leaf parts, then zip members, nested.

The walker only reports what is there; the attachments check judges it. For
every MIME leaf part and every zip member it yields an ``Item`` with the names
the sender declared (Content-Disposition ``filename`` and Content-Type
``name``, RFC 2231 and encoded words decoded by the stdlib parser, normalised
the way Windows reads them), the declared content type, and the leading bytes
for content sniffing. Anything that stops it from looking further is yielded
as an ``Obstacle`` (archive nested too deep, too many members, too much to
unpack, damaged, encrypted) so that a verdict can be configured for it.

Zip bombs: nothing is extracted to disk; only the central directory is read
for names, member contents are read up to ``SNIFF_BYTES`` each, and a nested
archive is read whole only while the walk's ``max_bytes`` budget lasts. The
member count is checked from the end-of-central-directory record before
``zipfile`` parses the directory.

Locations (``part 3 > member 2``) are positions, never file names: they go
to logs.
"""

from __future__ import annotations

import binascii
import email
import email.policy
import io
import quopri
import re
import struct
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email import errors
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.utils import collapse_rfc2231_value
from typing import Literal
from urllib.parse import unquote

# Enough for every magic the check knows (ISO 9660 at 0x8001..0x9006).
SNIFF_BYTES = 40 * 1024
# Multipart and attached-message nesting that is followed (the parser allows more).
MAX_MIME_NESTING = 30
ObstacleKind = Literal["depth", "members", "bytes", "damaged", "encrypted"]

_EOCD = b"PK\x05\x06"
_ZIP_LOCAL = b"PK\x03\x04"
_UUE_BEGIN = re.compile(rb"^begin(?:-base64)? [0-7]{3,4} ([^\r\n]+)$", re.MULTILINE)
# Windows ignores trailing dots and spaces in file names.
_TRAILING = " .\t\r\n"


@dataclass(frozen=True)
class WalkLimits:
    max_depth: int = 3  # archive levels opened: a zip attached to the mail is level 1
    max_members: int = 1000  # zip members over the whole message
    max_bytes: int = 64 * 1024 * 1024  # decompressed bytes for nested archives


@dataclass(frozen=True)
class Item:
    """One attachment or archive member.

    ``data`` is the whole decoded content for MIME parts and the first
    ``SNIFF_BYTES`` for archive members (``complete`` says which).
    ``members`` lists the member names when the item is itself a zip.
    """

    location: str
    depth: int
    names: tuple[str, ...]
    content_type: str
    data: bytes
    complete: bool
    members: tuple[str, ...] = ()
    encrypted: bool = False


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


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - broken transfer encoding: use the raw text
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def _source_text(msg: Message) -> bytes:
    """The text a parsed (mis-parsed) message came from, as near as it can be rebuilt.

    ``as_bytes`` would refold headers and add a blank line, which breaks a
    quoted-printable soft line break that the parser took for a header end.
    """
    if msg.is_multipart():
        return msg.as_bytes()
    headers = "".join(f"{k}: {v}\n" for k, v in msg.raw_items())
    glued = any(isinstance(d, errors.MissingHeaderBodySeparatorDefect) for d in msg.defects)
    body = msg.get_payload()
    text = (
        headers + ("" if glued or not headers else "\n") + (body if isinstance(body, str) else "")
    )
    return text.encode("utf-8", "surrogateescape")


def walk(message: EmailMessage, limits: WalkLimits | None = None) -> Iterator[Item | Obstacle]:
    """Every leaf part, uuencoded names in text parts, and zip members, depth first."""
    yield from _walk_mime(message, _Budget(limits or WalkLimits()), [0], 0)


def _walk_mime(
    part: Message, budget: _Budget, counter: list[int], nesting: int
) -> Iterator[Item | Obstacle]:
    if nesting > MAX_MIME_NESTING:
        yield Obstacle(f"part {counter[0]}", 0, "depth")
        return
    try:
        ctype = part.get_content_type().lower()
    except Exception:  # noqa: BLE001
        ctype = "application/octet-stream"
    if part.is_multipart():
        if ctype.startswith("message/"):
            # An attached message can itself carry a name or a banned type.
            counter[0] += 1
            yield Item(f"part {counter[0]}", 0, tuple(declared_names(part)), ctype, b"", True)
            encoded = _encoded_message(part)
            if encoded is not None:
                # base64/QP-encoded message/rfc822 (forbidden by RFC 2046, decoded
                # by some clients anyway): the parser saw only encoded text.
                inner = email.message_from_bytes(encoded, policy=email.policy.default)
                yield from _walk_mime(inner, budget, counter, nesting + 1)
                return
        payload = part.get_payload()
        for sub in payload if isinstance(payload, list) else ():
            if isinstance(sub, Message):
                yield from _walk_mime(sub, budget, counter, nesting + 1)
        return
    counter[0] += 1
    data = _payload(part)
    names = declared_names(part)
    if ctype.startswith("text/") and b"begin" in data:
        names += _uuencoded_names(data)
    yield from _item(f"part {counter[0]}", 0, tuple(names), ctype, data, True, budget)


def _encoded_message(part: Message) -> bytes | None:
    """The decoded text of a transfer-encoded message/* part, else None."""
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte not in ("base64", "quoted-printable"):
        return None
    payload = part.get_payload()
    subs = payload if isinstance(payload, list) else []
    try:
        text = b"".join(_source_text(sub) for sub in subs if isinstance(sub, Message))
        if cte == "base64":
            cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", text)
            extra = len(cleaned) % 4
            cleaned = cleaned[:-1] if extra == 1 else cleaned + b"=" * ((4 - extra) % 4)
            return binascii.a2b_base64(cleaned)
        return quopri.decodestring(text)
    except Exception:  # noqa: BLE001 - undecodable: walk it as the parser saw it
        return None


def _uuencoded_names(data: bytes) -> list[str]:
    names: list[str] = []
    for match in _UUE_BEGIN.finditer(data[: 4 * 1024 * 1024]):
        names += name_variants(match.group(1).decode("utf-8", "replace"))
    return names


def looks_like_zip(data: bytes) -> bool:
    """A local header at the start, or an end record near the end (zip appended)."""
    return data.startswith(_ZIP_LOCAL) or _EOCD in data[-(65535 + 22) :]


def _item(
    location: str,
    depth: int,
    names: tuple[str, ...],
    ctype: str,
    data: bytes,
    complete: bool,
    budget: _Budget,
) -> Iterator[Item | Obstacle]:
    if not (complete and looks_like_zip(data)):
        yield Item(
            location, depth, names, ctype, data[:SNIFF_BYTES] if not complete else data, complete
        )
        return
    if depth >= budget.limits.max_depth:
        yield Item(location, depth, names, ctype, data, complete)
        yield Obstacle(location, depth, "depth")
        return
    count = _declared_member_count(data)
    if count is not None and budget.members + count > budget.limits.max_members:
        yield Item(location, depth, names, ctype, data, complete)
        yield Obstacle(location, depth, "members")
        return
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception:  # noqa: BLE001 - zipfile raises many types on bad input
        yield Item(location, depth, names, ctype, data, complete)
        if data.startswith(_ZIP_LOCAL):
            yield Obstacle(location, depth, "damaged")
        return
    files = [i for i in infos if not i.is_dir()]
    encrypted = any(i.flag_bits & 0x1 for i in files)
    yield Item(
        location,
        depth,
        names,
        ctype,
        data,
        complete,
        members=tuple(i.filename for i in files),
        encrypted=encrypted,
    )
    budget.members += len(files)
    if budget.members > budget.limits.max_members:
        yield Obstacle(location, depth, "members")
        return
    if encrypted:
        yield Obstacle(location, depth, "encrypted")
    for number, info in enumerate(files, 1):
        yield from _member(archive, info, f"{location} > member {number}", depth + 1, budget)


def _member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, location: str, depth: int, budget: _Budget
) -> Iterator[Item | Obstacle]:
    names = tuple(name_variants(info.filename))
    if info.flag_bits & 0x1:
        # Names of encrypted members are still visible; contents are not.
        yield Item(location, depth, names, "", b"", False, encrypted=True)
        return
    remaining = budget.limits.max_bytes - budget.bytes
    try:
        with archive.open(info) as stream:
            head = stream.read(SNIFF_BYTES)
            if not head.startswith(_ZIP_LOCAL):
                yield Item(location, depth, names, "", head, False)
                return
            # A nested zip must be read whole (its directory is at the end).
            if info.file_size > remaining:
                yield Item(location, depth, names, "", head, False)
                yield Obstacle(location, depth, "bytes")
                return
            rest = stream.read(max(0, remaining - len(head)) + 1)
    except Exception:  # noqa: BLE001 - bad CRC, unsupported method, truncated data
        yield Item(location, depth, names, "", b"", False)
        yield Obstacle(location, depth, "damaged")
        return
    data = head + rest
    budget.bytes += len(data)
    if budget.bytes > budget.limits.max_bytes:
        # The declared size lied (a bomb): stop here.
        yield Item(location, depth, names, "", head, False)
        yield Obstacle(location, depth, "bytes")
        return
    yield from _item(location, depth, names, "", data, True, budget)


def _declared_member_count(data: bytes) -> int | None:
    """Entries in the end-of-central-directory record (None if not found)."""
    pos = data.rfind(_EOCD, max(0, len(data) - 65535 - 22))
    if pos < 0 or pos + 22 > len(data):
        return None
    (total,) = struct.unpack_from("<H", data, pos + 10)
    if total == 0xFFFF:  # ZIP64: the real count is elsewhere; treat as huge
        return 1 << 32
    return int(total)
