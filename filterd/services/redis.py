"""The private Redis that ``filterd serve`` starts when no [redis] url is configured."""

from __future__ import annotations

from pathlib import Path

from filterd.services.addresses import REDIS_SOCKET, redis_unix_url
from filterd.services.launcher import (
    LOOPBACK,
    _check_unix_path,
    _find_program,
    _PortOrSocketServer,
    _read_line,
    free_port,
)


class RedisServer(_PortOrSocketServer):
    """A private ``redis-server`` on 127.0.0.1 (or a unix socket).

    Non-persistent by default so tests never leave data behind; ``persistent=True`` is for
    ``filterd serve``, whose reputation/Bayes state must survive restarts (AOF in workdir).
    """

    name = "redis"

    def __init__(
        self,
        workdir: Path,
        persistent: bool = False,
        unix_socket: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(workdir, start_timeout)
        self.persistent = persistent
        self.socket_path: Path | None = self.workdir / REDIS_SOCKET if unix_socket else None
        self._port = 0 if unix_socket else free_port()
        self._logfile = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        """URL for ``redis.Redis.from_url``: database 0 of this instance."""
        if self.socket_path is not None:
            return redis_unix_url(self.socket_path)
        return f"redis://{LOOPBACK}:{self._port}/0"

    def _prepare(self) -> None:
        if self.persistent:
            # The AOF and dump.rdb hold addresses and IPs: nobody else may read them,
            # whatever umask redis-server writes them with.
            self.workdir.chmod(0o700)
        if self.socket_path is not None:
            _check_unix_path(self.socket_path)
            self.socket_path.unlink(missing_ok=True)

    def _command(self) -> list[str]:
        cmd = [
            _find_program("redis-server"),
            "--bind", LOOPBACK,
            "--port", str(self._port),
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", str(self._logfile),
        ]  # fmt: skip
        if self.socket_path is not None:
            cmd += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.persistent:
            cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            cmd += ["--save", "", "--appendonly", "no"]
        return cmd

    def _probe(self) -> bool:
        sock = self._ask(b"PING\r\n", 1.0)
        if sock is None:
            return False
        with sock:
            return _read_line(sock).startswith(b"+PONG")
