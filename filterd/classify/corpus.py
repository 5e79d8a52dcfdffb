"""Stream messages from maildir folders, mbox files and plain directories of messages.

Nothing is loaded in bulk: each message is read when yielded, mbox files are read line by line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

MAX_READ_BYTES = 10 * 1024 * 1024  # per message; the rest is ignored by feature extraction anyway

_SKIP_NAMES = {"cmds", ".DS_Store"}


def is_maildir(path: Path) -> bool:
    return path.is_dir() and (path / "cur").is_dir() and (path / "new").is_dir()


def looks_like_mbox(path: Path) -> bool:
    """A file whose first line is an mbox ``From `` line and which holds several messages."""
    try:
        with open(path, "rb") as f:
            head = f.read(5)
            if head != b"From ":
                return False
            f.readline()
            prev_blank = False
            for _ in range(200_000):
                line = f.readline()
                if not line:
                    return False
                if prev_blank and line.startswith(b"From "):
                    return True
                prev_blank = line in (b"\n", b"\r\n")
    except OSError:
        return False
    return False


def iter_mbox(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (id, raw bytes) per message of an mbox file (mboxrd ``>From`` unescaped)."""
    buf: list[bytes] = []
    size = 0
    n = 0
    prev_blank = True

    def flush() -> tuple[str, bytes] | None:
        nonlocal buf, size, n
        if not buf:
            return None
        data = b"".join(buf)
        buf, size = [], 0
        n += 1
        return f"{path}#{n}", data

    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"From ") and prev_blank:
                item = flush()
                if item and item[1].strip():
                    yield item
                prev_blank = False
                continue  # envelope line itself is dropped
            prev_blank = line in (b"\n", b"\r\n")
            if line.startswith(b">") and line.lstrip(b">").startswith(b"From "):
                line = line[1:]
            if size < MAX_READ_BYTES:
                buf.append(line)
                size += len(line)
    item = flush()
    if item and item[1].strip():
        yield item


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(MAX_READ_BYTES)


def _plain_files(d: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "tmp")
        for name in sorted(files):
            if name.startswith(".") or name in _SKIP_NAMES:
                continue
            yield Path(root) / name


def iter_messages(source: str | os.PathLike[str]) -> Iterator[tuple[str, bytes]]:
    """Yield (id, raw bytes) for every message under ``source``.

    ``source`` may be a maildir (``cur/`` + ``new/``), an mbox file, a single message file,
    or a directory (searched recursively) of message files, maildirs and mbox files.
    A leading mbox ``From `` line of a single-message file is kept; feature extraction drops it.
    """
    p = Path(source)
    if p.is_file():
        if looks_like_mbox(p):
            yield from iter_mbox(p)
        else:
            yield str(p), _read(p)
        return
    if not p.is_dir():
        raise FileNotFoundError(f"no such message source: {p}")
    if is_maildir(p):
        for sub in ("cur", "new"):
            for f in _plain_files(p / sub):
                yield str(f), _read(f)
        return
    for f in _plain_files(p):
        if f.name.endswith((".mbox", ".mbx")) or looks_like_mbox(f):
            yield from iter_mbox(f)
        else:
            yield str(f), _read(f)


def count_messages(sources: list[str]) -> int:
    """Cheap estimate for progress bars (files, not mbox messages)."""
    n = 0
    for s in sources:
        p = Path(s)
        if p.is_file():
            n += 1
        elif p.is_dir():
            for _root, dirs, files in os.walk(p):
                dirs[:] = [x for x in dirs if not x.startswith(".") and x != "tmp"]
                n += sum(1 for x in files if not x.startswith("."))
    return n
