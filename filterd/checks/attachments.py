"""Banned attachment types: programs, scripts, disk images, macro documents.

Three independent routes find a type, so that lying about one of them does not
help the sender: the declared file name (after decoding and normalising, see
``filterd.mail.walk``), the declared content type, and what the bytes are
(content sniffing). All three are applied to MIME parts and to zip members,
nested up to ``max_zip_depth``. The lists are data in ``rules/banned-types.toml``.

Archives that cannot be looked into are not waved through by accident:

- encrypted zips (the usual way to carry malware past scanners, password in the
  body) get ``encrypted_archive_action`` (default ``reject``; a domain that
  needs them can be allowed in banned-types.toml ``[domains]``); the names of
  encrypted members are still checked first;
- zips nested deeper than ``max_zip_depth``, with more than ``max_zip_members``
  members, bigger than ``max_unpack_bytes`` when unpacked, or damaged get
  ``uninspectable_action`` (default ``reject``);
- a message with more than ``max_mime_parts`` MIME parts or nested deeper than
  ``max_mime_nesting`` is refused with ``554 5.6.0`` (structurally abusive;
  the walk stops there instead of spending seconds of CPU on every retry);
- zips whose content the virus scanner would not look into -- ZIP64 members
  (clamd does not unpack them: a test virus inside one is "OK") and members
  declared bigger than ``max_scannable_member_bytes`` (keep it at clamd's
  ``MaxFileSize``; clamd skips bigger members) -- get ``unscannable_action``:
  ``reject`` (default, ``554 5.7.1 archive not accepted: the virus scanner
  cannot look inside it (...)``) or ``accept``, which marks the message
  ``X-Filterd-Unchecked: attachments`` and counts it (``stats()``), never
  passing it as scanned.

Only zip is unpacked here (clamd unpacks many more formats for viruses). Every
refusal is ``554 5.7.1`` naming the type, never the sender's file name; the
finding's detail names the position (``part 2 > member 1``) for the admin.
Nothing is quarantined.
"""

from __future__ import annotations

import struct
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from filterd import deadline
from filterd.checks.base import OnFailure, Services
from filterd.mail.analysis import analysis_of
from filterd.mail.walk import Item, Obstacle, WalkLimits
from filterd.settings import ConfigError, Section
from filterd.tomlfile import load_toml, validation_report
from filterd.types import Effect, Finding, Message, SmtpReply

SECTION = "attachments"
NAME = "attachments"
MAX_FINDINGS = 10
BANNED_CODES = ("BANNED_EXTENSION", "BANNED_CONTENT_TYPE", "BANNED_MAGIC")

ArchiveAction = Literal["reject", "accept"]

OBSTACLE_TEXT = {
    "depth": "archives nested too deep",
    "members": "too many files in archive",
    "bytes": "archive too large to unpack",
    "damaged": "damaged archive",
}
STRUCTURE_REPLY = SmtpReply(554, "5.6.0", "message structure too complex to be checked")
UNSCANNABLE_TEXT = {
    "zip64": "ZIP64 archive",
    "scan-size": "archive member too large to scan",
}


class Config(Section):
    banned_file: str = "rules/banned-types.toml"
    # Zip in zip in zip: a zip attached to the mail is level 1.
    max_zip_depth: int = Field(default=3, ge=1, le=10)
    # Members of all archives in one message together.
    max_zip_members: int = Field(default=1000, ge=1)
    # Decompressed bytes spent on nested archives per message (zip-bomb guard).
    max_unpack_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    encrypted_archive_action: ArchiveAction = "reject"
    uninspectable_action: ArchiveAction = "reject"
    # ZIP64 members and members bigger than max_scannable_member_bytes: the virus
    # scanner would not look inside. reject (554) | accept (X-Filterd-Unchecked, counted).
    unscannable_action: ArchiveAction = "reject"
    # Keep at clamd's MaxFileSize (clamd skips bigger archive members unscanned).
    max_scannable_member_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    # MIME parts (attached messages included) and nesting walked per message; beyond
    # either the message is refused: 554 5.6.0 (structurally abusive, retrying won't help).
    max_mime_parts: int = Field(default=1000, ge=1)
    max_mime_nesting: int = Field(default=30, ge=1, le=100)
    on_failure: OnFailure = "tempfail"


# -- banned-types.toml ----------------------------------------------------------


class DomainOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_extensions: list[str] = []
    allow_content_types: list[str] = []
    allow_magic: list[str] = []
    encrypted_archive_action: ArchiveAction | None = None

    @field_validator("allow_extensions", "allow_content_types", "allow_magic", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            return [str(v).strip().lower().lstrip(".") for v in value if str(v).strip()]
        return value


class BannedTypes(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    extensions: dict[str, str] = {}
    content_types: dict[str, str] = {}
    magic: dict[str, str] = {}
    domains: dict[str, DomainOverride] = {}

    @field_validator("extensions", "content_types", "domains", mode="after")
    @classmethod
    def _keys(cls, value: dict[str, object]) -> dict[str, object]:
        return {k.strip().lower().lstrip("."): v for k, v in value.items()}

    @field_validator("magic", mode="after")
    @classmethod
    def _known_magic(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(SNIFFERS))
        if unknown:
            raise ValueError(f"unknown sniffer(s) {unknown} (known: {sorted(SNIFFERS)})")
        return value


def load_banned(path: Path) -> BannedTypes:
    """Read and validate the banned list; ConfigError names the file and key."""
    data = load_toml(path, "banned types file")
    try:
        return BannedTypes.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_report(path, exc)) from None


# -- content sniffing -------------------------------------------------------------

_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_MSI_CLSID = bytes.fromhex("84100c0000000000c000000000000046")
_VBA_PROJECT = "_VBA_PROJECT".encode("utf-16-le")
_LNK = bytes.fromhex("4c0000000114020000000000c000000000000046")


def _pe(item: Item) -> bool:
    data = item.head
    if not data.startswith(b"MZ") or len(data) < 0x40:
        return False
    (offset,) = struct.unpack_from("<I", data, 0x3C)
    sig = item.read_at(offset, 4)
    return sig == b"PE\0\0" or sig[:2] in (b"NE", b"LE", b"LX")


def _elf(item: Item) -> bool:
    return item.head.startswith(b"\x7fELF") and len(item.head) >= 20


def _macho(item: Item) -> bool:
    head = item.head[:4]
    if head in (b"\xfe\xed\xfa\xce", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xcf\xfa\xed\xfe"):
        return len(item.head) >= 28
    if head == b"\xca\xfe\xba\xbe" and len(item.head) >= 8:
        # Universal binary: a small architecture count (a Java class has its
        # version there, 45 and up).
        count: int = struct.unpack_from(">I", item.head, 4)[0]
        return 0 < count < 43
    return False


def _java_class(item: Item) -> bool:
    if not item.head.startswith(b"\xca\xfe\xba\xbe") or len(item.head) < 8:
        return False
    major: int = struct.unpack_from(">H", item.head, 6)[0]
    return 45 <= major < 100


def _jar(item: Item) -> bool:
    names = {m.lower() for m in item.members}
    return "meta-inf/manifest.mf" in names and any(n.endswith(".class") for n in names)


def _lnk(item: Item) -> bool:
    return item.head.startswith(_LNK)


def _ole_root_clsid(item: Item) -> bytes | None:
    """The root storage CLSID of an OLE compound file, when it is in the content."""
    data = item.head
    if not data.startswith(_OLE) or len(data) < 512:
        return None
    (shift,) = struct.unpack_from("<H", data, 0x1E)
    (first_dir,) = struct.unpack_from("<I", data, 0x30)
    if shift not in (9, 12):
        return None
    start = (first_dir + 1) << shift
    clsid = item.read_at(start + 0x50, 16)
    return clsid if len(clsid) == 16 else None


def _msi(item: Item) -> bool:
    return _ole_root_clsid(item) == _MSI_CLSID


def _office_macro(item: Item) -> bool:
    if any(m.lower().rsplit("/", 1)[-1] == "vbaproject.bin" for m in item.members):
        return True
    return item.head.startswith(_OLE) and item.contains(_VBA_PROJECT)


def _cab(item: Item) -> bool:
    return item.head.startswith(b"MSCF\0\0\0\0")


def _chm(item: Item) -> bool:
    return item.head.startswith(b"ITSF\x03\0\0\0")


def _iso(item: Item) -> bool:
    for offset in (0x8001, 0x8801, 0x9001):
        if item.head[offset : offset + 5] in (b"CD001", b"BEA01", b"NSR02", b"NSR03"):
            return True
    return False


def _vhd(item: Item) -> bool:
    if item.head.startswith((b"vhdxfile", b"conectix")):
        return True
    return item.complete and item.size >= 512 and item.tail[-512:-504] == b"conectix"


SNIFFERS: dict[str, Callable[[Item], bool]] = {
    "pe": _pe,
    "elf": _elf,
    "macho": _macho,
    "java_class": _java_class,
    "jar": _jar,
    "lnk": _lnk,
    "msi": _msi,
    "office_macro": _office_macro,
    "cab": _cab,
    "chm": _chm,
    "iso": _iso,
    "vhd": _vhd,
}


# -- the check ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rules:
    """The banned list as it applies to one message (domain exceptions folded in)."""

    extensions: dict[str, str]
    content_types: dict[str, str]
    magic: dict[str, str]
    encrypted_action: ArchiveAction


def _extension(name: str) -> str | None:
    _, dot, ext = name.rpartition(".")
    return ext.lower() if dot and ext else None


def _banned(code: str, label: str, item: Item, detail: str) -> Finding:
    """554 5.7.1 naming the type (``label``), never the file name."""
    inside = " inside an archive" if item.depth > 0 else ""
    return _reject(code, f"banned attachment type: {label}{inside}", detail)


def _reject(code: str, text: str, detail: str) -> Finding:
    return Finding(
        check=NAME,
        code=code,
        detail=detail,
        effect=Effect.REJECT,
        reply=SmtpReply(554, "5.7.1", text),
        bypassable=False,
    )


class AttachmentsCheck:
    name = NAME
    bypassable = False
    gate = False
    # Pure CPU (the walk): the pipeline runs it on the connection's thread.
    cpu_bound = True

    def __init__(self, config: Config, banned: BannedTypes, spool_dir: str | None = None) -> None:
        self.config = config
        self.banned = banned
        self.on_failure: OnFailure = config.on_failure
        self.limits = WalkLimits(
            max_depth=config.max_zip_depth,
            max_members=config.max_zip_members,
            max_bytes=config.max_unpack_bytes,
            spool_dir=spool_dir or None,
            max_scan_member_bytes=config.max_scannable_member_bytes,
            max_parts=config.max_mime_parts,
            max_nesting=config.max_mime_nesting,
        )
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        """Counters since start: ``unscannable_accepted``, ``unscannable_rejected``..."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1

    def close(self) -> None:
        """Nothing to release."""

    def selftest(self) -> list[str]:
        """The banned list was validated when the check was built; nothing left to ask."""
        return []

    def rules_for(self, recipients: Sequence[str]) -> _Rules:
        """Fold in domain exceptions: allowed only if every recipient's domain allows."""
        domains = {r.rsplit("@", 1)[-1].rstrip(".").lower() for r in recipients if "@" in r}
        overrides = [self.banned.domains.get(d) for d in domains]
        allow_ext: set[str] = set()
        allow_ct: set[str] = set()
        allow_magic: set[str] = set()
        encrypted = self.config.encrypted_archive_action
        if domains and all(o is not None for o in overrides):
            present = [o for o in overrides if o is not None]
            allow_ext = set.intersection(*(set(o.allow_extensions) for o in present))
            allow_ct = set.intersection(*(set(o.allow_content_types) for o in present))
            allow_magic = set.intersection(*(set(o.allow_magic) for o in present))
            actions = {o.encrypted_archive_action or encrypted for o in present}
            encrypted = "accept" if actions == {"accept"} else "reject"
        b = self.banned
        return _Rules(
            {k: v for k, v in b.extensions.items() if k not in allow_ext},
            {k: v for k, v in b.content_types.items() if k not in allow_ct},
            {k: v for k, v in b.magic.items() if k not in allow_magic},
            encrypted,
        )

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        # ``exempt`` is ignored on purpose: no allowlist lets programs through.
        rules = self.rules_for(message.envelope.recipients)
        findings: dict[tuple[str, str], Finding] = {}
        # Streamed from the spool: memory does not grow with the message (see mail.walk).
        for entry in analysis_of(message).walk(self.limits):
            deadline.check()  # the pipeline replied already: stop walking
            found = (
                self._obstacle(entry, rules)
                if isinstance(entry, Obstacle)
                else self._inspect(entry, rules)
            )
            for finding in found:
                text = finding.reply.text if finding.reply else ""
                findings.setdefault((finding.code, text), finding)
            if len(findings) >= MAX_FINDINGS:
                break
        # The policy answers with the first refusal: name a banned type found
        # inside an encrypted or oversized archive rather than the archive.
        return sorted(findings.values(), key=lambda f: f.code not in BANNED_CODES)

    def _inspect(self, item: Item, rules: _Rules) -> list[Finding]:
        out: list[Finding] = []
        where = f"{item.location} (depth {item.depth})"
        for name in item.names:
            ext = _extension(name)
            if ext is not None and ext in rules.extensions:
                label = f".{ext} ({rules.extensions[ext]})"
                detail = f"{where}: declared extension .{ext}"
                out.append(_banned("BANNED_EXTENSION", label, item, detail))
                break
        ctype = item.content_type
        if ctype in rules.content_types:
            label = f"{ctype} ({rules.content_types[ctype]})"
            detail = f"{where}: declared content type {ctype}"
            out.append(_banned("BANNED_CONTENT_TYPE", label, item, detail))
        for sniffer, description in rules.magic.items():
            if SNIFFERS[sniffer](item):
                label = f"{description} (detected by content)"
                detail = f"{where}: content is {sniffer}"
                out.append(_banned("BANNED_MAGIC", label, item, detail))
                break
        return out

    def _obstacle(self, obstacle: Obstacle, rules: _Rules) -> list[Finding]:
        where = f"{obstacle.location} (depth {obstacle.depth})"
        if obstacle.kind == "structure":
            limits = f"max_mime_parts={self.limits.max_parts}, max_mime_nesting="
            detail = f"{where}: {limits}{self.limits.max_nesting}"
            self._count("structure_rejected")
            return [
                Finding(
                    check=NAME,
                    code="MESSAGE_STRUCTURE",
                    detail=detail,
                    effect=Effect.REJECT,
                    reply=STRUCTURE_REPLY,
                    bypassable=False,
                )
            ]
        if obstacle.kind == "encrypted":
            code, action = "ENCRYPTED_ARCHIVE", rules.encrypted_action
            text = "encrypted archive not accepted: its content cannot be checked"
        elif obstacle.kind in UNSCANNABLE_TEXT:
            code, action = "ARCHIVE_UNINSPECTABLE", self.config.unscannable_action
            what = UNSCANNABLE_TEXT[obstacle.kind]
            text = f"archive not accepted: the virus scanner cannot look inside it ({what})"
            self._count(f"unscannable_{'rejected' if action == 'reject' else 'accepted'}")
        else:
            code, action = "ARCHIVE_UNINSPECTABLE", self.config.uninspectable_action
            text = f"archive not accepted: it cannot be checked ({OBSTACLE_TEXT[obstacle.kind]})"
        detail = f"{where}: {obstacle.kind}; action={action}"
        if action == "reject":
            return [_reject(code, text, detail)]
        return [Finding(check=NAME, code=code, detail=detail, bypassable=False, unchecked=True)]


def build(config: Config, services: Services) -> AttachmentsCheck:
    path = services.settings.resolve_path(config.banned_file)
    # Decoded parts over 1 MiB go where the daemon spools message bodies.
    spool_dir = services.settings.milter.spool_dir or None
    return AttachmentsCheck(config, load_banned(path), spool_dir)
