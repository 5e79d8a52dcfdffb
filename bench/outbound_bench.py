"""Cost of one sending-limit decision (the Lua GCRA script over six windows) against the
floor of any Redis work: one PING round trip on the same connection, alternating in one run.

    .venv/bin/python bench/outbound_bench.py [--n 3000]

Prints the median latency of each and their ratio. It starts a private redis-server on a
free loopback port and stops it by PID.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from filterd.outbound.config import Config
from filterd.outbound.ratelimit import limiter_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers, run as a script
from tests.servers import RedisServer, make_reachable


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(make_reachable(Path(tmp))) as server:
        client = redis.Redis.from_url(server.url)
        big = Config(messages_per_minute=10**6, messages_per_hour=10**7, messages_per_day=10**8,
                     recipients_per_minute=10**6, recipients_per_hour=10**7,
                     recipients_per_day=10**8)  # fmt: skip
        limiter = limiter_for(client, big)
        limiter.consume("u", "warm@example.org", 1, 1)
        ping: list[float] = []
        decide: list[float] = []
        for i in range(args.n):
            t0 = time.perf_counter()
            client.ping()
            t1 = time.perf_counter()
            verdict = limiter.consume("u", f"user{i % 50}@example.org", 1, 1)
            t2 = time.perf_counter()
            assert verdict.allowed
            ping.append(t1 - t0)
            decide.append(t2 - t1)
        p, d = statistics.median(ping) * 1e6, statistics.median(decide) * 1e6
        print(f"n={args.n} PING p50 {p:.0f} us, limit decision p50 {d:.0f} us, ratio {d / p:.2f}")
        client.close()


if __name__ == "__main__":
    main()
