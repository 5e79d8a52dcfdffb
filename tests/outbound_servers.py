"""A private Postfix with a submission listener built from `filterd postfix-config --submission`.

Test-only (the lead may move it to tests/servers/ with the other launchers). The
submission service and its cleanup come from ``filterd.outbound.postfix.submission_recipe``
for the installed Postfix version, adapted only where a private instance must differ:
a loopback port instead of ``submission``, no chroot, the header_checks file in the
instance's own directory, and no TLS/SASL lines (the tests authenticate with
``XCLIENT LOGIN=...`` from loopback, which sets the same ``{auth_authen}`` macro).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import redis
import redis.cluster

from filterd.outbound.postfix import Recipe, installed_version, submission_recipe
from tests.servers import PostfixServer, free_port


class SubmissionPostfix(PostfixServer):
    def __init__(self, workdir: Path, sink_port: int, **kwargs: Any) -> None:
        super().__init__(workdir, sink_port, **kwargs)
        self.submission_port = free_port()
        self.recipe: Recipe = submission_recipe(
            installed_version() or (3, 7, 0),
            listen=f"127.0.0.1:{self.submission_port}",
            chroot="n",
            header_checks=str(Path(workdir).absolute() / "conf" / "submission_header_checks"),
            tls=False,
            sasl=False,
        )

    def _write_config(self) -> None:
        super()._write_config()
        for path, text in self.recipe.files.items():
            Path(path).write_text(text)
        master = self.confdir / "master.cf"
        master.write_text(master.read_text() + self.recipe.master_cf())
        self._age_config()


class RedisCluster3:
    """Three Redis Cluster masters on loopback (no replicas), for the hash-tag test.

    The redis helper is adding Cluster test servers of its own; at merge this can give way
    to theirs. Readiness is polled (``CLUSTER INFO`` says ``cluster_state:ok`` on every node);
    each node is stopped by its own PID.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.ports = [free_port() for _ in range(3)]
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> RedisCluster3:
        try:
            for port in self.ports:
                node = self.workdir / str(port)
                node.mkdir(parents=True, exist_ok=True)
                self._procs.append(
                    subprocess.Popen(
                        ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-port", str(free_port()), "--dir", str(node),
                         "--save", "", "--appendonly", "no"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                )  # fmt: skip
            for port in self.ports:
                self._wait(lambda p=port: redis.Redis(port=p).ping())
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            for port in self.ports:
                self._wait(lambda p=port: _cluster_info(p).get("cluster_state") == "ok")
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _wait(probe: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if probe():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("redis cluster did not become ready")
            time.sleep(0.05)

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.ports[0])

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_info(port: int) -> dict[str, str]:
    client = redis.Redis(port=port, decode_responses=True)
    try:
        info = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
        return {str(k): str(v) for k, v in dict(info).items()}
    finally:
        client.close()
