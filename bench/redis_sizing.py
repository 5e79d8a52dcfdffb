"""What one message costs Redis: commands, bytes on the wire, keys and memory kept.

Sizing figures for docs/deployment.md, measured the way an operator runs filterd:
a real Postfix in front of the real daemon (``python -m filterd serve``), records
on, the allowlist check at RCPT and end of message, against a single Redis and a
three-master Redis Cluster. Redis's own counters (``INFO stats``, ``INFO
commandstats``, ``DBSIZE``, ``used_memory``; summed over every primary) are read
before and after a batch of messages, so the figures include everything filterd
sends and nothing else (the bench's own INFO/DBSIZE calls are subtracted).

    .venv/bin/python bench/redis_sizing.py [--messages 200] [--json out.json]

Round trips are not visible to Redis; they are derived from the commands: one
pipeline per RCPT lookup (two SMISMEMBER: the mailbox's and the domain's list) and
one per message for the records (one MULTI/EXEC on a single Redis; on Cluster one
pipeline sent to each primary that owns one of the message's keys).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from tests.helpers_daemon import DaemonProcess  # noqa: E402
from tests.redis_topology import RedisClusterGroup  # noqa: E402
from tests.servers import (  # noqa: E402
    PostfixServer,
    RedisServer,
    SmtpSink,
    make_reachable,
    send_mail,
    write_config,
)

SENDER = "sender@example.net"
_OWN = {"info", "dbsize", "flushall", "scan", "memory|usage", "hello", "client|setinfo"}


def _clients(ports: list[int]) -> list[redis.Redis]:
    return [redis.Redis("127.0.0.1", p) for p in ports]


def _snapshot(clients: list[redis.Redis]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "in": 0, "out": 0, "keys": 0, "memory": 0, "stored": 0, "commands": {}, "usec": {}
    }  # fmt: skip
    for c in clients:
        stats = c.info("stats")
        out["in"] += int(stats["total_net_input_bytes"])
        out["out"] += int(stats["total_net_output_bytes"])
        out["keys"] += int(c.dbsize())
        out["memory"] += int(c.info("memory")["used_memory"])
        # What the keys themselves take (MEMORY USAGE), without allocator/buffer noise.
        out["stored"] += sum(int(c.memory_usage(k) or 0) for k in c.scan_iter(count=1000))
        for name, value in c.info("commandstats").items():
            cmd = name.removeprefix("cmdstat_")
            out["commands"][cmd] = out["commands"].get(cmd, 0) + int(value["calls"])
            out["usec"][cmd] = out["usec"].get(cmd, 0) + int(value["usec"])
    return out


def _message(i: int) -> bytes:
    return (
        f"From: Sender <{SENDER}>\nTo: <list@example.org>\nSubject: sizing {i}\n"
        f"Message-ID: <sizing-{i}@example.net>\n\nA plain message of about a hundred bytes, "
        "the size matters little: Redis never sees the content.\n"
    ).encode()


def run(topology: str, url: str, ports: list[int], base: Path, n: int) -> dict[str, Any]:
    clients = _clients(ports)
    for c in clients:
        c.flushall()
    cfg = write_config(
        base / f"{topology}.toml",
        {
            "daemon": {"state_dir": str(base / "state"), "log_level": "warning"},
            "redis": {"url": url},
            "pipeline": {"recipient_checks": ["allowlist"], "message_checks": ["allowlist"]},
            "allowlist": {"site_files": []},
        },
    )
    with (
        SmtpSink(base / f"sink-{topology}") as sink,
        DaemonProcess(base / f"daemon-{topology}", cfg) as daemon,
        PostfixServer(
            base / f"postfix-{topology}",
            sink.port,
            milter=daemon.milter_for_postfix,
            milter_default_action="reject",
        ) as postfix,
    ):
        # Warm-up: connections, script cache, the day's counter key.
        send_mail(postfix.port, SENDER, ["warm@example.org"], _message(-1))
        results = {}
        for rcpts in (1, 3):
            before = _snapshot(clients)
            t0 = time.monotonic()
            for i in range(n):
                to = [f"user{(i * 7 + j) % 500}@example.org" for j in range(rcpts)]
                result = send_mail(postfix.port, SENDER, to, _message(i))
                assert result.accepted, result
            seconds = time.monotonic() - t0
            after = _snapshot(clients)
            calls = {
                k: after["commands"].get(k, 0) - before["commands"].get(k, 0)
                for k in after["commands"]
                if k not in _OWN
            }
            calls = {k: v for k, v in calls.items() if v}
            usec = sum(
                after["usec"].get(k, 0) - before["usec"].get(k, 0)
                for k in after["usec"]
                if k not in _OWN
            )
            per = {k: round(v / n, 2) for k, v in sorted(calls.items())}
            lookups = calls.get("smismember", 0) / 2
            records = calls.get("exec", 0) if topology == "single" else None
            results[f"{rcpts}_rcpt"] = {
                "messages": n,
                "commands_per_message": round(sum(calls.values()) / n, 2),
                "calls_per_message": per,
                "rcpt_lookups_per_message": round(lookups / n, 2),
                "records_transactions_per_message": (
                    round(records / n, 2) if records is not None else None
                ),
                "bytes_to_redis_per_message": round((after["in"] - before["in"]) / n),
                "bytes_from_redis_per_message": round((after["out"] - before["out"]) / n),
                "keys_created_per_message": round((after["keys"] - before["keys"]) / n, 2),
                "used_memory_bytes_per_message": round((after["memory"] - before["memory"]) / n),
                "stored_bytes_per_message": round((after["stored"] - before["stored"]) / n),
                "redis_cpu_usec_per_message": round(usec / n, 1),
                "messages_per_second": round(n / seconds, 1),
            }
    for c in clients:
        c.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = make_reachable(Path(tempfile.mkdtemp(prefix="filterd-sizing-")))
    report: dict[str, Any] = {}
    with RedisServer(base / "single") as single:
        assert single.port is not None
        report["single"] = run("single", single.url, [single.port], base, args.messages)
    with RedisClusterGroup(base / "cluster") as cluster:
        report["cluster"] = run("cluster", cluster.url, cluster.ports, base, args.messages)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
