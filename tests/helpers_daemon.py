"""Start the real filterd daemon (`python -m filterd serve`) for end-to-end tests.

The daemon runs as a separate process exactly as an operator runs it, with a
config file written for the test and FILTERD_* overrides; it is stopped by its
PID. Tests read its structured stderr log from ``log_path``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.servers import PostfixServer, toml_value, write_config

__all__ = ["DaemonProcess", "filtered_postfix", "toml_value", "write_config"]

ROOT = Path(__file__).resolve().parent.parent


class DaemonProcess:
    def __init__(
        self,
        workdir: Path,
        config: Path,
        env: dict[str, str] | None = None,
        tcp_port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "filterd.log"
        self.socket_path = workdir / "milter.sock"
        self.tcp_port = tcp_port

    @property
    def milter_socket(self) -> str:
        """The daemon's socket in libmilter notation."""
        if self.tcp_port:
            return f"inet:{self.tcp_port}@127.0.0.1"
        return f"unix:{self.socket_path}"

    @property
    def milter_for_postfix(self) -> str:
        """The same socket in Postfix's smtpd_milters notation."""
        if self.tcp_port:
            return f"inet:127.0.0.1:{self.tcp_port}"
        return f"unix:{self.socket_path}"

    def command(self) -> list[str]:
        """How the daemon is started: exactly as an operator runs it."""
        return [sys.executable, "-m", "filterd", "serve", "--config", str(self.config)]

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FILTERD_")}
        env.update({"FILTERD_MILTER_SOCKET": self.milter_socket, **self.env})
        env["PYTHONUNBUFFERED"] = "1"
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        log = self.log_path.open("ab")
        offset = log.tell()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"filterd exited at start:\n{self.log()[-3000:]}")
            # The socket answers as soon as the supervisor opened it (connections wait in
            # the backlog); "milter ready" says every worker has built its Runtime.
            if self._answers() and '"milter ready"' in self.log()[offset:]:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"filterd did not listen in {timeout}s:\n{self.log()[-3000:]}")

    def _answers(self) -> bool:
        if self.tcp_port:
            family, address = socket.AF_INET, ("127.0.0.1", self.tcp_port)
        elif self.socket_path.exists():
            family, address = socket.AF_UNIX, str(self.socket_path)  # type: ignore[assignment]
        else:
            return False
        with socket.socket(family) as s:
            try:
                s.connect(address)
            except OSError:
                return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def filtered_postfix(
    base: Path, config: Path, sink_port: int, default_action: str = "reject"
) -> Iterator[tuple[DaemonProcess, PostfixServer]]:
    """The real daemon with a private Postfix in front of it, relaying to ``sink_port``.

    ``milter_default_action = reject`` by default, so an accepted message proves
    the daemon answered.
    """
    with (
        DaemonProcess(base / "daemon", config) as daemon,
        PostfixServer(
            base / "postfix",
            sink_port,
            milter=daemon.milter_for_postfix,
            milter_default_action=default_action,
        ) as postfix,
    ):
        yield daemon, postfix
