"""What DNS blocklist checks cost per transaction, against a real rbldnsd on loopback.

Measures the RCPT-time check (client IP + HELO + sender on two lists) cold
(every name new: real queries) and warm (TTL cache), serially and with 16
concurrent transactions; the URIBL check on a message with 20 link domains;
and a dead list (a silent nameserver) before and after the breaker opens.
Loopback only; bounded in count. Run: .venv/bin/python bench/dnsbl_bench.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers

from filterd.checks import dnsbl, uribl
from filterd.types import Envelope, Message
from tests.servers import RbldnsdServer, SilentUdpServer

ZEN: dict[str, Any] = {
    "id": "ZEN",
    "zone": "zen.test",
    "rules": [{"name": "SBL", "match": "127.0.0.[2..3]", "weight": 10}],
}
DBL: dict[str, Any] = {
    "id": "DBL",
    "zone": "dbl.test",
    "type": "domain",
    "rules": [{"name": "SPAM", "match": "127.0.1.[2..99]", "weight": 10}],
}


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p95 = samples[max(0, int(len(samples) * 0.95) - 1)]
    return f"p50 {statistics.median(samples) * 1000:7.2f} ms  p95 {p95 * 1000:7.2f} ms"


def _run(label: str, n: int, fn: Callable[[int], object], workers: int = 1) -> None:
    samples: list[float] = []

    def one(i: int) -> None:
        start = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - start)

    start = time.perf_counter()
    if workers == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    print(f"{label:<44} n={n:<5} {_ms(samples)}  {n / wall:8.0f}/s")


def _envelope(i: int) -> Envelope:
    return Envelope(
        client_ip=f"198.51.{i // 250 % 250}.{i % 250 + 1}",
        helo=f"mx.h{i}.example",
        mail_from=f"u@s{i}.example",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000, help="transactions per run")
    args = parser.parse_args()
    n = args.n
    zones = [
        ("zen.test", "ip4set", ":127.0.0.2:x\n192.0.2.0/24\n127.0.0.2\n"),
        ("dbl.test", "dnset", ":127.0.1.2:x\nevil.example\n"),
    ]
    with (
        tempfile.TemporaryDirectory() as tmp,
        RbldnsdServer(Path(tmp), zones, log_queries=False) as rbl,
    ):
        cfg = dnsbl.Config.model_validate(
            {"nameservers": rbl.nameserver, "lists": [ZEN, DBL], "skip_private": False,
             "transaction_cache_seconds": 0.000001}
        )  # fmt: skip
        for workers in (1, 16):
            check = dnsbl.build(cfg)
            offset = workers * 100_000
            _run(
                f"rcpt check cold, {workers} concurrent",
                n,
                lambda i, c=check, o=offset: c.check_recipient(_envelope(i + o), "r@x.org"),
                workers,
            )
            _run(
                f"rcpt check warm (cache), {workers} concurrent",
                n,
                lambda i, c=check, o=offset: c.check_recipient(_envelope(i + o), "r@x.org"),
                workers,
            )
            check.close()

        links = "\n".join(f"http://www.site{i}.example/page" for i in range(20))
        ucfg = uribl.Config.model_validate({"nameservers": rbl.nameserver, "lists": [DBL]})
        check_u = uribl.build(ucfg)
        messages = [
            Message.from_bytes(
                f"From: a@f{i}.example\r\n\r\n{links.replace('site', f'm{i}s')}\r\n".encode()
            )
            for i in range(min(n, 400))  # 21 names each: fits the 10000-entry cache
        ]
        _run(
            "uribl, 20 link domains + From:, cold",
            len(messages),
            lambda i: check_u.check_message(messages[i], False),
        )
        again = [Message.from_bytes(m.raw) for m in messages]
        _run(
            "uribl, 20 link domains + From:, warm",
            len(again),
            lambda i: check_u.check_message(again[i], False),
        )
        check_u.close()

    with SilentUdpServer() as silent:
        dcfg = dnsbl.Config.model_validate(
            {"nameservers": silent.nameserver, "lists": [ZEN], "skip_private": False,
             "query_timeout": 0.5, "budget": 1.0, "breaker_failures": 5,
             "transaction_cache_seconds": 0.000001}
        )  # fmt: skip
        check = dnsbl.build(dcfg)
        _run("dead list, before breaker opens", 5, lambda i: check.check_recipient(
            _envelope(i), "r@x.org"))  # fmt: skip
        _run("dead list, breaker open", 200, lambda i: check.check_recipient(
            _envelope(i + 1000), "r@x.org"))  # fmt: skip
        print("dead-list counters:", {k: v for k, v in check.stats().items() if v})
        check.close()


if __name__ == "__main__":
    main()
