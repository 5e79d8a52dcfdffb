"""What one message's records cost, in the daemon and in Redis: old code vs new, one run.

The baseline is the records code of a git revision (``--baseline-rev``, default the
commit before the batching/EVALSHA change), loaded from git into a private package
next to the current code, so both run in this process against the same private
Redis (unix socket, ``filterd.services.redis.RedisServer``), alternated round by
round. Measured per message, as CPU time (never wall time):

* ``direct``: ``RecordsObserver.write`` of one accepted message (one sender, one
  recipient, records defaults), one round trip each: the client's CPU
  (``time.process_time``) and the Redis server's (utime+stime from /proc).
* ``background``: the daemon's ``BackgroundObserver`` fed by a producer that
  queues one message every ``--interval`` seconds (a daemon under load), CPU of
  the whole process (producer included; its cost is the same in both) and of
  Redis, until every entry is written.
* ``burst``: the same observer fed ``--messages`` at once (a backlog), then flushed.
* ``idle``: the ``background`` producer with no observer, for the same time: what the
  pacing itself costs the process and an idle Redis; ``background net`` subtracts it.

Each variant also runs with redis-py's pure-Python protocol code (``py``) and with
hiredis (``hiredis``) where hiredis is installed. Loopback only; bounded by count.

Run: nice -n 5 .venv/bin/python bench/records_bench.py [--messages 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers, filterd

import redis
from redis._parsers import _RESP2Parser
from redis.connection import PythonRespSerializer, UnixDomainSocketConnection
from redis.utils import HIREDIS_AVAILABLE

from filterd.records import observer as new_observer
from filterd.records.config import Config
from filterd.services.redis import RedisServer
from filterd.types import Action, Envelope

ROOT = Path(__file__).resolve().parents[1]
OLD_MODULES = ("keyspace", "records.schema", "records.pseudonym", "records.writer",
               "records.observer")  # fmt: skip
BASELINE_REV = "bae050f"


def load_baseline(rev: str) -> types.ModuleType:
    """The observer module of ``rev``, with its records imports pointing at ``rev``'s too."""
    package = types.ModuleType("filterd_baseline")
    package.__path__ = []
    sys.modules["filterd_baseline"] = package
    loaded: types.ModuleType | None = None
    for name in OLD_MODULES:
        path = "filterd/" + name.replace(".", "/") + ".py"
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        for old in OLD_MODULES:
            mod = "filterd_baseline." + old.replace(".", "_")
            text = re.sub(rf"\bfilterd\.{re.escape(old)}\b", mod, text)
        text = text.replace("from filterd import keyspace as keys",
                            "import filterd_baseline.keyspace as keys")  # fmt: skip
        qualified = "filterd_baseline." + name.replace(".", "_")
        module = types.ModuleType(qualified)
        module.__file__ = f"<{rev}:{path}>"
        sys.modules[qualified] = module
        exec(compile(text, module.__file__, "exec"), module.__dict__)
        loaded = module
    assert loaded is not None
    return loaded


class _PyConnection(UnixDomainSocketConnection):
    """redis-py's pure-Python packer, whatever is installed."""

    def _construct_command_packer(self, packer: Any) -> Any:
        return PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)


def client(sock: str, protocol: str) -> redis.Redis:
    if protocol == "py":
        pool = redis.ConnectionPool(
            connection_class=_PyConnection, path=sock, parser_class=_RESP2Parser
        )
        return redis.Redis(connection_pool=pool)
    return redis.Redis(unix_socket_path=sock)


def job() -> dict[str, Any]:
    env = Envelope(client_ip="192.0.2.1", helo="h.example", mail_from="a@example.com",
                   recipients=("b@example.org",), queue_id="ABC123")  # fmt: skip
    return {"envelope": env, "phase": "data", "action": Action.ACCEPT, "code": "OK",
            "reply": None, "recipients": ("b@example.org",), "size": 10000,
            "message_id": "<x@example.net>"}  # fmt: skip


def redis_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(pid: int, run: Callable[[], None], n: int) -> tuple[float, float]:
    """(client ms, redis ms) CPU per message."""
    c0, r0 = time.process_time(), redis_cpu(pid)
    run()
    return (time.process_time() - c0) * 1000 / n, (redis_cpu(pid) - r0) * 1000 / n


def direct(module: types.ModuleType, r: redis.Redis, n: int) -> Callable[[], None]:
    observer = module.build_observer(Config(), r)
    for _ in range(50):
        observer.write(job())

    def run() -> None:
        for _ in range(n):
            observer.write(job())

    return run


def background(
    module: types.ModuleType, r: redis.Redis, n: int, interval: float, linger: float | None
) -> Callable[[], None]:
    def run() -> None:
        if linger is None:
            observer = module.build_daemon_observer(Config(), r)
        else:  # the current code with another linger than its default
            observer = module.BackgroundObserver(module.build_observer(Config(), r), linger=linger)
        try:
            pending = job()
            for _ in range(n):
                observer._take(dict(pending))
                if interval:
                    time.sleep(interval)
            assert observer.flush(timeout=120)
            assert observer.failures == 0 and observer.dropped == 0
        finally:
            observer.close()

    return run


def idle(n: int, interval: float) -> Callable[[], None]:
    def run() -> None:
        pending = job()
        sink: list[dict[str, Any]] = []
        for _ in range(n):
            sink.append(dict(pending))
            sink.clear()
            if interval:
                time.sleep(interval)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.002, help="background: s between jobs")
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--linger", type=float, default=None, help="new code: BackgroundObserver "
                    "linger in s (default: its own default)")  # fmt: skip
    args = ap.parse_args()
    old = load_baseline(args.baseline_rev)
    new = importlib.reload(new_observer)
    protocols = ["py", "hiredis"] if HIREDIS_AVAILABLE else ["py"]
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), unix_socket=True)
        server.start()
        try:
            sock = server.url.removeprefix("unix://").split("?")[0]
            pid = server.pid
            assert pid is not None
            clients = {p: client(sock, p) for p in protocols}
            n = args.messages
            for _ in range(args.rounds):
                results.setdefault("idle", []).append(
                    measure(pid, idle(n // 3, args.interval), n // 3)
                )
                for proto in protocols:
                    for label, module in (("old", old), ("new", new)):
                        r = clients[proto]
                        linger = args.linger if module is new else None
                        cases = {
                            "direct": direct(module, r, n),
                            "background": background(module, r, n // 3, args.interval, linger),
                            "burst": background(module, r, n, 0.0, linger),
                        }
                        for case, run in cases.items():
                            count = n // 3 if case == "background" else n
                            r.flushall()
                            key = f"{case:<10} {proto:<7} {label}"
                            results.setdefault(key, []).append(measure(pid, run, count))
        finally:
            server.stop()
    print(f"records CPU ms per message (median of {args.rounds} rounds; "
          f"baseline {args.baseline_rev}; background interval {args.interval}s)")  # fmt: skip
    print(f"{'case':<10} {'proto':<7} {'old client':>10} {'new client':>10} {'ratio':>6}"
          f" {'old redis':>10} {'new redis':>10} {'ratio':>6}")  # fmt: skip
    ic = statistics.median(x[0] for x in results["idle"])
    irc = statistics.median(x[1] for x in results["idle"])
    for case in ("direct", "background", "burst", "bg net"):
        for proto in protocols:
            source = "background" if case == "bg net" else case
            o = results[f"{source:<10} {proto:<7} old"]
            w = results[f"{source:<10} {proto:<7} new"]
            oc, orc = statistics.median(x[0] for x in o), statistics.median(x[1] for x in o)
            nc, nrc = statistics.median(x[0] for x in w), statistics.median(x[1] for x in w)
            if case == "bg net":
                oc, nc, orc, nrc = oc - ic, nc - ic, orc - irc, nrc - irc
            print(
                f"{case:<10} {proto:<7} {oc:>10.4f} {nc:>10.4f} {nc / oc:>6.2f}"
                f" {orc:>10.4f} {nrc:>10.4f} {nrc / orc if orc else float('nan'):>6.2f}"
            )
    print(f"idle (pacing alone): client {ic:.4f}, redis {irc:.4f} ms per message slot")


if __name__ == "__main__":
    main()
