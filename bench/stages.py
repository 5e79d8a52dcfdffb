"""Each stage of the daemon's work, timed alone, in-process, against the bench's real servers.

Why: the daemon's log gives each check's wall time, but the message checks run
side by side in threads, so a check that waits for clamd or DNS is also
waiting for the GIL that the classifier holds: the log cannot say what each
stage *costs*. Here the daemon's own objects (a Runtime built from the bench's
configuration) run one stage at a time, serially, and both wall time and
this thread's CPU time are recorded: CPU-bound stages (wall ~ CPU) are what
limit throughput on a GIL; I/O-bound ones (wall >> CPU) only add latency.

For the large message, tracemalloc's peak per stage shows which stage holds
the message in memory (the RSS growth the daemon shows with a 25 MB message).
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from load import FROM, HELO, TO, percentile

from filterd.runtime import Runtime
from filterd.settings import load_settings
from filterd.types import Envelope, Message

# What each check waits for, for the labels of the breakdown.
RESOURCE = {
    "allowlist": "Redis",
    "dnsbl": "DNS",
    "uribl": "DNS",
    "antivirus": "ClamAV",
    "classifier": "model",
    "attachments": "MIME walk",
}


def _envelope() -> Envelope:
    return Envelope(
        client_ip="127.0.0.1",
        client_name=None,
        helo=HELO,
        mail_from=FROM,
        recipients=(TO,),
        queue_id="BENCH1",
    )


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _message(data: bytes, parsed: bool = False) -> Message:
    """A Message as the daemon builds it: header block + body read in 64 KiB chunks.

    ``data`` has CRLF line ends already, so building it copies nothing.
    """
    sep = data.find(b"\r\n\r\n") + 4
    view = memoryview(data)

    def body() -> Iterator[bytes]:
        for offset in range(sep, len(data), 65536):
            yield bytes(view[offset : offset + 65536])

    msg = Message(_envelope(), data[:sep], body, len(data))
    if parsed:
        _ = msg.parsed
    return msg


def _time(
    fn: Callable[[Any], Any], n: int, setup: Callable[[], Any] = lambda: None
) -> dict[str, float]:
    """Time ``fn(setup())`` n times; only ``fn`` is inside the timed region."""
    fn(setup())  # first call: lazy imports, connections
    walls, cpus = [], []
    for _ in range(n):
        arg = setup()
        w, c = time.perf_counter(), time.thread_time()
        fn(arg)
        cpus.append(time.thread_time() - c)
        walls.append(time.perf_counter() - w)
    return {
        "wall_p50_ms": round(percentile(walls, 50) * 1000, 3),
        "cpu_p50_ms": round(percentile(cpus, 50) * 1000, 3),
        "wall_mean_ms": round(sum(walls) / n * 1000, 3),
    }


def time_stages(config: Path, raw: bytes, n: int = 50) -> dict[str, dict[str, float]]:
    """Per-stage wall and CPU time (ms) for one message, each stage alone."""
    raw = crlf(raw)
    runtime = Runtime(load_settings(config, {}))
    try:
        env = _envelope()
        out: dict[str, dict[str, float]] = {}
        fresh = lambda: _message(raw)  # noqa: E731
        parsed = lambda: _message(raw, parsed=True)  # noqa: E731
        out["parse (Message.parsed)"] = _time(lambda m: m.parsed, n, fresh)
        for check in runtime.pipeline.recipient_checks:
            label = f"rcpt {check.name} ({RESOURCE.get(check.name, 'CPU')})"
            out[label] = _time(lambda _, c=check: c.check_recipient(env, TO), n)
        for check in runtime.pipeline.message_checks:
            # Parsed beforehand: the parse is its own line above.
            label = f"eom {check.name} ({RESOURCE.get(check.name, 'CPU')})"
            out[label] = _time(lambda m, c=check: c.check_message(m, False), n, parsed)
        msg = _message(raw, parsed=True)
        decision = runtime.pipeline.judge_message(msg, [])
        out["records write (Redis)"] = _time(lambda _: runtime.notify_message(msg, decision), n)
        out["pipeline.judge_message, as run"] = _time(
            lambda m: runtime.pipeline.judge_message(m, []), n, fresh
        )
        return out
    finally:
        runtime.retire()


def memory_stages(config: Path, raw: bytes) -> dict[str, float]:
    """tracemalloc peak (MB) of each stage for one (large) message, each stage alone."""
    raw = crlf(raw)
    runtime = Runtime(load_settings(config, {}))
    out: dict[str, float] = {}
    try:

        def peak(fn: Callable[[], Any]) -> float:
            tracemalloc.start()
            try:
                fn()
                return round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
            finally:
                tracemalloc.stop()

        out["Message.raw"] = peak(lambda: _message(raw).raw)
        out["Message.parsed"] = peak(lambda: _message(raw).parsed)
        for check in runtime.pipeline.message_checks:
            out[f"{check.name} (incl. parse if it parses)"] = peak(
                lambda c=check: c.check_message(_message(raw), False)
            )
        return out
    finally:
        runtime.retire()
