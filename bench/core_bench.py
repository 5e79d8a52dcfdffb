"""The core's hot paths, as ratios against a baseline measured in the same run.

1. Link extraction guards (filterd.mail.links.hosts_in_text): the regex scans
   are skipped when the one character they need is absent. Baseline: the same
   function without guards (copied below), on the same texts, interleaved.
2. Message checks: CPU-bound checks inline (``[pipeline] inline_cpu_checks``,
   the attachment walk on the connection's thread while clamd and DNS wait in
   the pool) against every check in the pool (the previous behaviour), with a
   real clamd and a real rbldnsd, on the bench's message mix; the two
   configurations alternate message by message. Reported: process CPU ms and
   wall ms per message (p50), and the ratio.

Run: .venv/bin/python bench/core_bench.py [--messages 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # messages

import messages

from filterd.mail import links
from filterd.runtime import Runtime
from filterd.settings import load_settings
from filterd.types import Envelope, Message
from tests.servers import ClamdServer, RbldnsdServer, project_signature_dir, write_config


def hosts_unguarded(text: str) -> list[str]:
    """hosts_in_text before the guards (the baseline)."""
    text = links._DEFANG.sub(".", text[: links.MAX_PART_CHARS]).translate(links._DOTS)
    found: list[tuple[int, str]] = []
    for pattern in (links._SCHEME_URL, links._WWW):
        for match in pattern.finditer(text):
            found.append((match.start(), links._host_of(match.group("auth"))))
    found.sort()
    return [h for _, h in found]


def bench_links(rounds: int = 300) -> None:
    rng = random.Random(5)
    words = messages._sentences(rng, 10_000)
    plain = "".join(c for c in words if c not in "[({:/\\").replace("www", "w w w")
    linked = plain[:5000] + " see https://www.example.org/x and www.shop.example " + plain[5000:]
    texts = (("10 KB text, no links", plain), ("10 KB text, 2 links", linked), ("generated", words))
    for label, text in texts:
        assert list(links.hosts_in_text(text)) == hosts_unguarded(text)
        base, new = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            hosts_unguarded(text)
            base.append(time.perf_counter() - t)
            t = time.perf_counter()
            list(links.hosts_in_text(text))
            new.append(time.perf_counter() - t)
        b, n = statistics.median(base) * 1e3, statistics.median(new) * 1e3
        print(
            f"hosts_in_text, {label}: unguarded {b:.3f} ms, guarded {n:.3f} ms, ratio {n / b:.2f}"
        )


DBL = "$SOA 600 ns.test. hostmaster.test. 1 600 600 600 45\n:127.0.1.2:spam\nlisted.example\n"


def _message(raw: bytes) -> Message:
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    sep = raw.find(b"\r\n\r\n") + 4

    def body() -> Iterator[bytes]:
        for offset in range(sep, len(raw), 65536):
            yield raw[offset : offset + 65536]

    env = Envelope("127.0.0.1", None, "mx.example.net", messages.FROM, (messages.TO,))
    return Message(env, raw[:sep], body, len(raw))


def bench_pipeline(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="core-bench-") as tmp:
        base = Path(tmp)
        with (
            ClamdServer(base / "clamd", project_signature_dir()) as clamd,
            RbldnsdServer(base / "rbl", [("dbl.test", "dnset", DBL)]) as rbl,
        ):
            dbl = {
                "id": "DBL", "zone": "dbl.test", "type": "domain", "targets": ["from", "body"],
                "rules": [{"name": "SPAM", "match": "127.0.1.2", "weight": 10}],
            }  # fmt: skip
            runtimes = {}
            for inline in (False, True):
                cfg = write_config(
                    base / f"filterd-{inline}.toml",
                    {
                        "pipeline": {
                            "recipient_checks": [],
                            "message_checks": ["antivirus", "attachments", "uribl"],
                            "inline_cpu_checks": inline,
                        },
                        "dns": {"nameservers": rbl.nameserver},
                        "uribl": {"lists": [dbl]},
                        "antivirus": {"address": clamd.address},
                        "records": {"enabled": False},
                    },
                )
                runtimes[inline] = Runtime(load_settings(cfg, env={}))
            mix = [m.data for m in messages.mixed(count, ham=[])]
            cpu: dict[bool, list[float]] = {False: [], True: []}
            wall: dict[bool, list[float]] = {False: [], True: []}
            try:
                for raw in mix[:5]:  # warm-up: connections, lazy imports, DNS cache
                    for rt in runtimes.values():
                        rt.pipeline.judge_message(_message(raw), [])
                for raw in mix:
                    for inline in (False, True):
                        msg = _message(raw)
                        c, w = time.process_time(), time.perf_counter()
                        runtimes[inline].pipeline.judge_message(msg, [])
                        cpu[inline].append(time.process_time() - c)
                        wall[inline].append(time.perf_counter() - w)
            finally:
                for rt in runtimes.values():
                    rt.retire()
    for what, data in (("process CPU", cpu), ("wall", wall)):
        pooled = statistics.median(data[False]) * 1e3
        inl = statistics.median(data[True]) * 1e3
        print(
            f"judge_message {what} p50 over {len(mix)} mixed messages: all pooled {pooled:.2f} ms, "
            f"CPU checks inline {inl:.2f} ms, ratio {inl / pooled:.2f}"
        )
    total = {k: sum(v) * 1e3 / len(v) for k, v in cpu.items()}
    print(
        f"judge_message process CPU mean: all pooled {total[False]:.2f} ms, "
        f"CPU checks inline {total[True]:.2f} ms, ratio {total[True] / total[False]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=60)
    args = parser.parse_args()
    bench_links()
    bench_pipeline(args.messages)


if __name__ == "__main__":
    main()
