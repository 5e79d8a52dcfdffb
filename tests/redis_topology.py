"""Test-only Redis topologies on loopback: Sentinel (master, replica, sentinels) and Cluster.

Built on ``tests.servers.RedisServer`` (private directory, free port, readiness by
protocol, stop by PID). The recipes are the verified ones in
/work/shared/docs/real-servers.md:

* Sentinel: each sentinel is ``redis-server SENTINEL.conf --sentinel`` with its own
  writable config (sentinels rewrite it); the group is ready when every sentinel's
  ``SENTINEL CKQUORUM`` says ``OK N usable`` and it knows the replica; a replica is
  ready when its link to the master is up.
* Cluster: each node has ``--cluster-enabled yes`` and an explicit ``--cluster-port``
  (the default PORT+10000 overflows for high free ports); ``redis-cli --cluster
  create ... --cluster-replicas 0 --cluster-yes`` assigns the slots; the cluster is
  ready when every node's ``CLUSTER INFO`` says ``cluster_state:ok``.

Readiness is polled against a deadline, never slept on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import redis

from filterd.services.launcher import _Stoppable
from tests.servers import LOOPBACK, RedisServer, ServerStartError, free_port

POLL_S = 0.05


def _wait(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll ``check`` until true; returns the seconds it took. Errors count as "not yet"."""
    t0 = time.monotonic()
    last: Exception | None = None
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() - t0 > timeout:
            raise ServerStartError(f"{what}: not within {timeout:g}s (last error: {last})")
        time.sleep(POLL_S)


def _client(port: int) -> redis.Redis:
    return redis.Redis(LOOPBACK, port, socket_timeout=1.0, socket_connect_timeout=1.0)


def _ask(port: int, *command: str) -> Any:
    client = _client(port)
    try:
        return client.execute_command(*command)
    finally:
        client.close()


class ReplicaServer(RedisServer):
    """A replica of ``master_port`` (``--replicaof``)."""

    def __init__(self, workdir: Path, master_port: int, **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.master_port = master_port

    def _command(self) -> list[str]:
        return [*super()._command(), "--replicaof", LOOPBACK, str(self.master_port)]


class SentinelServer(RedisServer):
    """One sentinel watching ``master_name`` at ``master_port``."""

    name = "sentinel"

    def __init__(
        self,
        workdir: Path,
        master_name: str,
        master_port: int,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
    ) -> None:
        super().__init__(workdir)
        self.master_name = master_name
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.config_path = self.workdir / "sentinel.conf"

    def _prepare(self) -> None:
        # Written before every spawn: the sentinel rewrites it (known peers, epochs).
        n = self.master_name
        self.config_path.write_text(
            f"port {self._port}\nbind {LOOPBACK}\ndaemonize no\n"
            f'dir "{self.workdir}"\nlogfile "{self._logfile}"\n'
            f"sentinel monitor {n} {LOOPBACK} {self.master_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {n} {self.down_after_ms}\n"
            f"sentinel failover-timeout {n} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {n} 1\n"
        )
        self.config_path.chmod(0o600)

    def _command(self) -> list[str]:
        return [super()._command()[0], str(self.config_path), "--sentinel"]

    def master_address(self) -> tuple[str, int] | None:
        got = _ask(self._port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        if not got:
            return None
        host, port = (v.decode() if isinstance(v, bytes) else str(v) for v in got)
        return host, int(port)


class SentinelGroup(_Stoppable):
    """A master, ``replicas`` replicas and ``sentinels`` sentinels, all on loopback.

    ``url`` is the ``redis+sentinel://`` URL filterd is configured with.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        master_name: str = "filterd",
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10000,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.master_name = master_name
        self.start_timeout = start_timeout
        self.master = RedisServer(self.workdir / "master")
        self._replica_count = replicas
        self._sentinel_count = sentinels
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self.replicas: list[ReplicaServer] = []
        self.sentinels: list[SentinelServer] = []
        #: Seconds from the master's SIGKILL to the sentinels naming a new master.
        self.promotion_seconds: float | None = None

    @property
    def url(self) -> str:
        nodes = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{self.master_name}/0"

    def start(self) -> Self:
        try:
            self.master.start()
            assert self.master.port is not None
            for i in range(self._replica_count):
                replica = ReplicaServer(self.workdir / f"replica{i}", self.master.port)
                self.replicas.append(replica.start())
            for replica in self.replicas:
                assert replica.port is not None
                port = replica.port
                _wait(
                    f"replica {port} in sync",
                    lambda p=port: _client(p).info("replication").get("master_link_status") == "up",
                    self.start_timeout,
                )
            quorum = self._sentinel_count // 2 + 1
            for i in range(self._sentinel_count):
                sentinel = SentinelServer(
                    self.workdir / f"sentinel{i}",
                    self.master_name,
                    self.master.port,
                    quorum,
                    self._down_after_ms,
                    self._failover_timeout_ms,
                )
                self.sentinels.append(sentinel.start())
            self._wait_quorum()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_quorum(self) -> None:
        want = f"OK {self._sentinel_count} usable".encode()
        name = self.master_name
        for s in self.sentinels:
            assert s.port is not None
            port = s.port
            _wait(
                f"sentinel {port}: CKQUORUM",
                lambda p=port: want in _ask(p, "SENTINEL", "CKQUORUM", name),
                self.start_timeout,
            )
            _wait(
                f"sentinel {port}: knows the replicas",
                lambda p=port: len(_ask(p, "SENTINEL", "REPLICAS", name)) >= self._replica_count,
                self.start_timeout,
            )

    def master_address(self) -> tuple[str, int] | None:
        """What the first sentinel that answers names as master."""
        for s in self.sentinels:
            with contextlib.suppress(redis.RedisError, OSError):
                return s.master_address()
        return None

    def kill_master(self) -> int:
        """SIGKILL the current master (no shutdown, no save); returns its port."""
        address = self.master_address()
        assert address is not None
        port = address[1]
        victim = next(s for s in [self.master, *self.replicas] if s.port == port)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        self._killed_at = time.monotonic()
        self._killed_port = port
        return port

    def wait_promoted(self, timeout: float = 30.0) -> tuple[str, int]:
        """Until every sentinel names a new master that says role:master."""
        old = self._killed_port

        def promoted() -> bool:
            for s in self.sentinels:
                address = s.master_address()
                if address is None or address[1] == old:
                    return False
            new = self.master_address()
            assert new is not None
            return bool(_client(new[1]).info("replication").get("role") == "master")

        _wait("promotion of a replica", promoted, timeout)
        self.promotion_seconds = time.monotonic() - self._killed_at
        address = self.master_address()
        assert address is not None
        return address

    def stop(self) -> None:
        for server in [*reversed(self.sentinels), *reversed(self.replicas), self.master]:
            with contextlib.suppress(Exception):
                server.stop()


class ClusterNodeServer(RedisServer):
    """One cluster-enabled node with an explicit bus port."""

    name = "cluster-node"

    def __init__(self, workdir: Path, **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.bus_port = free_port()

    def _prepare(self) -> None:
        super()._prepare()
        # A fresh cluster each start: no slot map left from an earlier run.
        (self.workdir / "nodes.conf").unlink(missing_ok=True)

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", "2000",
        ]  # fmt: skip

    def _rebind(self) -> bool:
        self.bus_port = free_port()
        return super()._rebind()


class RedisClusterGroup(_Stoppable):
    """``masters`` cluster primaries (no replicas), slots assigned by ``redis-cli --cluster``."""

    def __init__(self, workdir: Path, masters: int = 3, start_timeout: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.start_timeout = start_timeout
        self.nodes = [ClusterNodeServer(self.workdir / f"node{i}") for i in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{n.port}" for n in self.nodes)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.port is not None]

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            create = [
                "redis-cli", "--cluster", "create",
                *(f"{LOOPBACK}:{p}" for p in self.ports),
                "--cluster-replicas", "0", "--cluster-yes",
            ]  # fmt: skip
            done = subprocess.run(
                create,
                capture_output=True,
                timeout=self.start_timeout,
                check=False,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
            if done.returncode != 0:
                raise ServerStartError(
                    f"redis-cli --cluster create failed ({done.returncode}):\n"
                    f"{done.stdout.decode(errors='replace')[-2000:]}"
                    f"{done.stderr.decode(errors='replace')[-2000:]}"
                )
            for port in self.ports:
                _wait(
                    f"cluster node {port}: cluster_state:ok",
                    lambda p=port: b"cluster_state:ok" in _ask(p, "CLUSTER", "INFO"),
                    self.start_timeout,
                )
        except BaseException:
            self.stop()
            raise
        return self

    def flush(self) -> None:
        for port in self.ports:
            _ask(port, "FLUSHALL")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.stop()


__all__: Sequence[str] = [
    "ClusterNodeServer",
    "RedisClusterGroup",
    "ReplicaServer",
    "SentinelGroup",
    "SentinelServer",
]
