"""Run ``filterd serve`` with a different milter negotiation, to measure a proposal first.

Why: the bench may not edit filterd/, yet a claim such as "over TCP, no-reply
header events cost a delayed ACK per message" should be measured on the real
daemon before the lead changes filterd/milter.py. This entry point removes the
``@Milter.noreply`` or ``@Milter.nocallback`` flag from the callbacks named in
``BENCH_MILTER_REPLY`` (comma-separated, e.g. ``header,body,data``) so Postfix
sends those events and waits for a reply to each, and
``BENCH_MILTER_NODELAY_PORT`` sets TCP_NODELAY on the listening socket; then
it runs the ordinary ``filterd serve``. ``BENCH_SWITCH_INTERVAL`` (seconds)
sets the GIL switch interval, for the GIL study. (The one-process daemon's studies
of serial checks and of scoring in a process pool went with the pre-forked workers:
the pipeline now runs CPU-bound checks on the connection's thread, and each worker
is a process of its own.) Without the variables it is exactly ``python -m filterd``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

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
