"""The private clamd that ``filterd serve`` starts when no [antivirus] address is configured."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Self

from filterd.services.addresses import CLAMD_SOCKET, clamd_unix_address
from filterd.services.launcher import (
    LOOPBACK,
    ServerStartError,
    _as_root,
    _check_unix_path,
    _find_program,
    _PortOrSocketServer,
    free_port,
)


def project_signature_dir() -> Path:
    """The project's tiny ClamAV database (EICAR + a harmless test signature).

    It lets clamd start where no official database can be downloaded; clamd refuses to start
    with an empty DatabaseDirectory.
    """
    path = Path(__file__).resolve().parents[2] / "rules" / "clamav-sigs"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found (running from an installed package?)")
    return path


#: Where clamd's temp files go when there is room: clamd writes every INSTREAM to a temp
#: file before scanning it. Serially, a 10 KB message's scan cost clamd 0.21 ms of CPU with
#: the file on ext4 and 0.12 ms in memory (at concurrency 16 in bench/perf_bench.py the
#: difference did not show), and in memory scanned mail never reaches a disk, where a crash
#: mid-scan would leave it.
MEMORY_DIR = Path("/dev/shm")
# Room the memory file system must have, free, for clamd's temp files to go there: a few
# streams of the largest size scanned at once (else a container's 64 MB /dev/shm would fail
# big scans with 451s); below it the temp directory stays in workdir.
MEMORY_STREAMS = 8
# In workdir: the path of the directory in memory this clamd spools into, so that the next
# start removes what a killed clamd left there.
SPOOL_RECORD = "spool-dir"


def _size_bytes(text: str) -> int:
    """clamd's size syntax: a number with an optional K or M suffix."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * scale


def memory_root(stream_max_length: str, memory: Path = MEMORY_DIR) -> Path | None:
    """``memory`` when it has room for clamd's temp files (see MEMORY_STREAMS), else None."""
    try:
        st = os.statvfs(memory)
        room = st.f_bavail * st.f_frsize
        wanted = MEMORY_STREAMS * _size_bytes(stream_max_length)
    except (OSError, ValueError):
        return None
    if room < wanted or not os.access(memory, os.W_OK | os.X_OK):
        return None
    return memory


def _remove_own_dir(path: Path) -> None:
    """Remove ``path`` if it is a directory of ours: never a symlink or another user's
    directory, which anyone can plant in a world-writable /dev/shm."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        shutil.rmtree(path, ignore_errors=True)


class ClamdServer(_PortOrSocketServer):
    """A private clamd with its own config, database directory and temp directory.

    The temp directory is private (0700) and lives in memory when there is room (a fresh
    ``mkdtemp`` in :data:`MEMORY_DIR` at each start), else in workdir: scanned mail never
    lands in a shared /tmp.
    ``restart()`` keeps the address because tests stop clamd mid-run and expect the
    daemon's configured ClamdSocket to work again once it is back.
    """

    name = "clamd"

    def __init__(
        self,
        workdir: Path,
        database_dir: Path,
        unix_socket: bool = False,
        stream_max_length: str = "50M",
        start_timeout: float = 120.0,
        user: str | None = None,
        max_file_size: str = "100M",
    ) -> None:
        # start_timeout is generous: a full official database takes tens of seconds to load.
        super().__init__(workdir, start_timeout)
        self.database_dir = Path(database_dir).absolute()
        self.stream_max_length = stream_max_length
        self.max_file_size = max_file_size
        # clamd only honours User when started as root; as root the tests keep root so clamd
        # can read any database/temp directory it is given.
        self.user = user if user is not None else ("root" if _as_root() else None)
        self.socket_path: Path | None = self.workdir / CLAMD_SOCKET if unix_socket else None
        self._port = 0 if unix_socket else free_port()
        self.config_path = self.workdir / "clamd.conf"
        self._logfile = self.workdir / "clamd.log"
        self._memory = memory_root(stream_max_length)
        self._tmpdir = self.workdir / "tmp"  # until a start puts it in memory

    @property
    def address(self) -> str:
        """Address in clamav-milter ``ClamdSocket`` syntax: ``tcp:127.0.0.1:P`` or ``unix:/p``."""
        if self.socket_path is not None:
            return clamd_unix_address(self.socket_path)
        return f"tcp:{LOOPBACK}:{self._port}"

    def restart(self) -> Self:
        """Stop, then start again on the same port or socket path."""
        self.stop()
        return self.start()

    def _config_text(self) -> str:
        lines = [
            "Foreground yes",
            f"DatabaseDirectory {self.database_dir}",
            f"LogFile {self._logfile}",
            "LogTime yes",
            "LogFileMaxSize 10M",
            f"TemporaryDirectory {self._tmpdir}",
            f"StreamMaxLength {self.stream_max_length}",
            # Generous limits: mail up to StreamMaxLength is scanned whole, archives included.
            "MaxScanSize 400M",
            f"MaxFileSize {self.max_file_size}",
            "MaxRecursion 16",
            "MaxFiles 10000",
            "ScanArchive yes",
            "ScanMail yes",
            "ScanHTML yes",
            "ScanOLE2 yes",
            "ScanPDF yes",
            "ScanPE yes",
            "ScanELF yes",
            # A file over a limit is reported (Heuristics.Limits.Exceeded.*), never passed as
            # clean. clamd 1.4 still skips archive *members* over MaxFileSize silently, so
            # [attachments] max_scannable_member_bytes (= MaxFileSize) refuses those.
            "AlertExceedsMax yes",
            "SelfCheck 600",
        ]
        if self.user is not None:
            lines.append(f"User {self.user}")
        if self.socket_path is not None:
            lines += [f"LocalSocket {self.socket_path}", "LocalSocketMode 660"]
        else:
            lines += [f"TCPSocket {self._port}", f"TCPAddr {LOOPBACK}"]
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        if not self.database_dir.is_dir():
            raise ServerStartError(f"clamd: database directory {self.database_dir} missing")
        self._drop_memory_dir()  # and whatever a killed clamd left mid-scan
        if self._memory is not None:
            # mkdtemp: a fresh name, created 0700 by us, so nothing planted can be reused.
            self._tmpdir = Path(tempfile.mkdtemp(prefix="filterd-clamd-", dir=self._memory))
            (self.workdir / SPOOL_RECORD).write_text(f"{self._tmpdir}\n")
        else:
            self._tmpdir = self.workdir / "tmp"
            self._tmpdir.mkdir(mode=0o700, exist_ok=True)
        if self.socket_path is not None:
            _check_unix_path(self.socket_path)
            self.socket_path.unlink(missing_ok=True)
        self.config_path.write_text(self._config_text())

    def _command(self) -> list[str]:
        return [_find_program("clamd"), f"--config-file={self.config_path}"]

    def start(self) -> Self:
        try:
            return super().start()
        except ServerStartError:
            self._drop_memory_dir()
            raise

    def stop(self, grace_s: float = 5.0) -> None:
        super().stop(grace_s)
        self._drop_memory_dir()

    def _drop_memory_dir(self) -> None:
        """The directory in memory this clamd spooled into, if any (also after a failed start)."""
        record = self.workdir / SPOOL_RECORD
        try:
            path = Path(record.read_text().strip())
        except OSError:
            return
        if path.parent == self._memory or path.parent == MEMORY_DIR:
            _remove_own_dir(path)
        record.unlink(missing_ok=True)

    @property
    def temp_dir(self) -> Path:
        """clamd's TemporaryDirectory."""
        return self._tmpdir

    def _probe(self) -> bool:
        sock = self._ask(b"zPING\0", 2.0)
        if sock is None:
            return False
        with sock:
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply.rstrip(b"\0") == b"PONG"
