"""Run ``filterd serve`` with a different milter negotiation, to measure a proposal first.

Why: the bench may not edit filterd/, yet a claim such as "over TCP, no-reply
header events cost a delayed ACK per message" should be measured on the real
daemon before the lead changes filterd/milter.py. This entry point removes the
``@Milter.noreply`` or ``@Milter.nocallback`` flag from the callbacks named in
``BENCH_MILTER_REPLY`` (comma-separated, e.g. ``header,body,data``) so Postfix
sends those events and waits for a reply to each, and
``BENCH_MILTER_NODELAY_PORT`` sets TCP_NODELAY on the listening socket; then
it runs the ordinary ``filterd serve``. ``BENCH_SWITCH_INTERVAL`` (seconds)
sets the GIL switch interval and ``BENCH_SERIAL_CHECKS=1`` runs each phase's
checks serially and ``BENCH_CLASSIFIER_PROCESSES=N`` scores with the model in
N worker processes, for the GIL study. Without the variable it
is exactly ``python -m filterd``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NOREPLY_CAPABLE = (
    "connect", "hello", "envfrom", "envrcpt", "header", "body", "eoh", "data", "unknown",
)  # fmt: skip


def _plain(name: str, inner: Callable[..., int]) -> Callable[..., int]:
    def callback(self: object, *args: object) -> int:
        return inner(self, *args)

    callback.__name__ = callback.__qualname__ = name
    return callback


def require_replies(names: list[str]) -> list[str]:
    """Strip the no-reply/no-callback wrapper of each named callback; returns those changed."""
    from filterd.milter import FilterdMilter

    changed = []
    for name in names:
        if name not in NOREPLY_CAPABLE:
            raise SystemExit(f"BENCH_MILTER_REPLY: {name!r} is not a no-reply capable callback")
        func = getattr(FilterdMilter, name)
        # Milter.noreply/nocallback mark their wrapper with milter_protocol (nocallback marks
        # the wrapped function too), so a fresh function without the mark replaces it: the
        # MTA is then asked to send the event and to wait for its reply.
        if getattr(func, "milter_protocol", 0) and hasattr(func, "__wrapped__"):
            setattr(FilterdMilter, name, _plain(name, func.__wrapped__))
            changed.append(name)
    FilterdMilter.__dict__.get("_protocol_mask") and delattr(FilterdMilter, "_protocol_mask")
    return changed


def set_listener_nodelay(port: int, timeout: float = 10.0) -> bool:
    """Set TCP_NODELAY on libmilter's listening socket; accepted sockets inherit it (Linux).

    libmilter never sets it, so a reply written in several small pieces (each
    SMFIR_ADDHEADER, then the verdict) meets Nagle's algorithm, and the
    MTA's delayed ACK holds the rest back for ~40 ms.
    """
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc/self/fd").iterdir():
            try:
                fd = int(entry.name)
                if not os.readlink(entry).startswith("socket:"):
                    continue
                sock = socket.socket(fileno=os.dup(fd))
            except (OSError, ValueError):
                continue
            try:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port
                ):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return True
            except OSError:
                pass
            finally:
                sock.close()
        time.sleep(0.01)
    return False


def serial_checks() -> None:
    """Run a phase's checks one after another in the calling thread (no thread pool).

    Measures the alternative to the pipeline's concurrent checks: with the GIL,
    I/O-bound checks running beside the CPU-bound classifier wait for the
    interpreter, so "concurrent" can be slower than serial. The phase budget
    is not enforced here; this is a measurement, not a proposal to copy.
    """
    from filterd import pipeline

    def run(
        self: Any, checks: Any, work: Any, deadline: float, timings: dict[str, float]
    ) -> list[Any]:
        findings: list[Any] = []
        for check in checks:
            try:
                result, spent = pipeline._timed(check, work)
                timings[check.name] = timings.get(check.name, 0.0) + spent
                findings.extend(result)
            except Exception as exc:
                findings.append(pipeline._failure(check, f"{type(exc).__name__}: {exc}"))
        return findings

    pipeline.Pipeline._run = run  # type: ignore[method-assign]


_WORKER_MODEL: Any = None


def _load_worker_model(models_dir: str) -> None:
    global _WORKER_MODEL
    from filterd.classify.registry import ModelHolder

    _WORKER_MODEL = ModelHolder(Path(models_dir)).current()


def _worker_score(raw: bytes) -> float:
    return float(_WORKER_MODEL.score(raw))


def classifier_in_processes(workers: int) -> None:
    """Score messages in a pool of worker processes instead of under the daemon's GIL.

    Measures the proposal "the CPU-bound classifier off the GIL": the daemon
    then only ships the message head (<= [classifier] max_bytes) to a worker.
    Workers load the active model once (model reloads are not followed here).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from filterd.classify import model as model_mod
    from filterd.settings import resolve_path

    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=_load_worker_model,
        initargs=(str(resolve_path("models")),),
    )

    # Start every worker now (they load the model), not during the measurement.
    warm = b"Subject: warm-up\r\n\r\nhello\r\n"
    for future in [pool.submit(_worker_score, warm) for _ in range(workers)]:
        future.result(timeout=120)

    def score(self: Any, raw: bytes) -> float:
        return float(pool.submit(_worker_score, bytes(raw)).result(timeout=20))

    model_mod.SpamModel.score = score  # type: ignore[method-assign]


def main() -> None:
    wanted = [n.strip() for n in os.environ.get("BENCH_MILTER_REPLY", "").split(",") if n.strip()]
    if wanted:
        changed = require_replies(wanted)
        print(f"milter_variants: replies required for {changed}", file=sys.stderr, flush=True)
    interval = os.environ.get("BENCH_SWITCH_INTERVAL")
    if interval:
        # The GIL hand-over interval (default 5 ms): how long a thread whose I/O
        # is done may wait while another thread computes.
        sys.setswitchinterval(float(interval))
    if os.environ.get("BENCH_SERIAL_CHECKS"):
        serial_checks()
    if os.environ.get("BENCH_CLASSIFIER_PROCESSES"):
        classifier_in_processes(int(os.environ["BENCH_CLASSIFIER_PROCESSES"]))
    nodelay_port = os.environ.get("BENCH_MILTER_NODELAY_PORT")
    if nodelay_port:
        import threading

        def apply() -> None:
            done = set_listener_nodelay(int(nodelay_port))
            print(f"milter_variants: TCP_NODELAY on listener: {done}", file=sys.stderr, flush=True)

        threading.Thread(target=apply, daemon=True).start()
    from filterd.cli import main as cli_main

    cli_main(prog_name="filterd")


if __name__ == "__main__":
    main()
