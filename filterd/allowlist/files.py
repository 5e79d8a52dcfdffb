"""The plain-text list format (``allowlists/*.txt``) and the site-wide list.

Format, one entry per line, UTF-8::

    # comment lines start with '#'; blank lines are ignored
    friend@example.org            # a trailing comment needs whitespace before '#'
    *@partner.example
    *@*.partner.example
    192.0.2.0/24

('#' is a legal character inside an address, hence the whitespace rule.) The
same format is what ``filterd allow export`` writes and ``import`` reads, so
a mailbox's list can be kept in version control like the site list.

The site-wide list is read from files, not Redis: admins change it through
review, and every node reloads it on its own when a file's modification time
changes (checked at most every ``site_reload_seconds``), without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from filterd.allowlist.entries import Entry, EntryError, parse_entry

if TYPE_CHECKING:
    from filterd.allowlist.config import Config

log = logging.getLogger("filterd.allowlist")

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_REPORTED_ERRORS = 20


class ListFileError(EntryError):
    """A list file with malformed lines; the message lists them as ``file:line: reason``."""


def parse_list(text: str, source: str, config: Config) -> list[Entry]:
    """All entries of a list text, in file order without duplicates; raises ListFileError."""
    entries: dict[str, Entry] = {}
    errors: list[str] = []
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        token, *tail = stripped.split(None, 1)
        rest = tail[0] if tail else ""
        try:
            if rest and not rest.startswith("#"):
                raise EntryError(
                    "one entry per line; text after an entry must be a comment starting with '#'"
                )
            entry = parse_entry(token, config)
        except EntryError as exc:
            errors.append(f"{source}:{number}: {exc}")
            continue
        entries.setdefault(entry.text, entry)
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        shown = errors[:MAX_REPORTED_ERRORS] + ([f"... and {more} more"] if more > 0 else [])
        raise ListFileError("\n".join(shown))
    return list(entries.values())


def read_list_file(path: Path | str, config: Config) -> list[Entry]:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ListFileError(f"{path}: {size} bytes; list files are limited to {MAX_FILE_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise ListFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ListFileError(f"{path}: not UTF-8 (byte {exc.start})") from None
    return parse_list(text, str(path), config)


def format_list(entries: Iterable[Entry | str], title: str) -> str:
    """A list file's text: a comment header naming the list, then sorted entries."""
    lines = [f"# {title}", "# filterd allowlist: one entry per line (see allowlists/site.txt)"]
    lines.extend(sorted(str(e) for e in entries))
    return "\n".join(lines) + "\n"


class SiteList:
    """The site-wide entries from ``site_files``, reloaded when a file changes.

    A file that turns malformed keeps the previous good list in force (logged),
    so a bad edit cannot silently empty the site list. A missing file counts as
    empty (logged): that only makes filtering stricter.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        config: Config,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = list(paths)
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self._checked = 0.0
        self.entries: frozenset[str] = frozenset()
        self.reload()

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        result = []
        for path in self.paths:
            try:
                st = os.stat(path)
                result.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                result.append((0, -1, 0))
        return tuple(result)

    def reload(self) -> None:
        """Read every file now; raises ListFileError (the old list stays in force)."""
        with self._lock:
            stamp = self._stamps()
            entries: set[str] = set()
            for path in self.paths:
                if not os.path.exists(path):
                    # Stricter, not looser: a missing site list grants nothing. It is
                    # read as soon as it appears (the stamp changes).
                    log.warning("site allowlist file missing", extra={"path": str(path)})
                    continue
                entries.update(e.text for e in read_list_file(path, self.config))
            self.entries = frozenset(entries)
            self._stamp = stamp
            self._checked = self._clock()

    def maybe_reload(self) -> None:
        """Reload if a file changed; cheap enough to call on every lookup."""
        now = self._clock()
        if now - self._checked < self.config.site_reload_seconds:
            return
        self._checked = now
        if self._stamps() == self._stamp:
            return
        try:
            self.reload()
            log.info("site allowlist reloaded", extra={"entries": len(self.entries)})
        except ListFileError as exc:
            with self._lock:
                self._stamp = self._stamps()
            log.error(
                "site allowlist not reloaded, keeping the previous list",
                extra={"error": str(exc)},
            )
