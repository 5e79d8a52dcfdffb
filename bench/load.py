"""Load drivers: Postfix's smtp-source for throughput, a timed SMTP client for latency.

Why two: smtp-source is C and never the bottleneck, so its messages/second
is the server's; but it reports nothing per message. The Python client times
every SMTP step of every message (connect+banner, EHLO, MAIL, RCPT, DATA,
body+final reply), which shows *where* a milter adds its time: RCPT carries
the recipient checks (allowlist, DNSBL), the final reply carries the
end-of-message checks. Both only ever talk to 127.0.0.1, and every run is
bounded by a message count and a deadline.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filterd.services.launcher import LOOPBACK

HELO = "mail.example.net"
FROM = "alice@example.net"
TO = "bob@example.org"
PHASES = ("connect", "ehlo", "mail", "rcpt", "data", "body")


# ---------------------------------------------------------------------------------------------
# smtp-source


@dataclass
class SourceRun:
    sessions: int
    count: int
    seconds: float
    returncode: int
    error: str = ""

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def smtp_source(
    port: int, message: bytes, sessions: int, count: int, timeout: float | None = None
) -> SourceRun:
    """Send ``count`` copies of ``message`` over ``sessions`` parallel SMTP sessions.

    One message per connection (no ``-d``), as an MX sees mail. ``-A`` keeps it
    going past a refusal; refusals are counted from the daemon's log instead.
    """
    with tempfile.NamedTemporaryFile(prefix="bench-msg-", suffix=".eml", delete=False) as fh:
        fh.write(message.replace(b"\r\n", b"\n"))
        path = Path(fh.name)
    cmd = [
        "smtp-source", "-A", "-s", str(sessions), "-m", str(count), "-F", str(path),
        "-f", FROM, "-t", TO, "-M", HELO, f"{LOOPBACK}:{port}",
    ]  # fmt: skip
    limit = timeout if timeout is not None else 60.0 + count * 0.5
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
        seconds = time.monotonic() - start
        return SourceRun(sessions, count, seconds, proc.returncode, proc.stderr.strip()[-500:])
    except subprocess.TimeoutExpired:
        return SourceRun(sessions, count, time.monotonic() - start, -1, f"timed out after {limit}s")
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# timed smtplib client


def prepare(message: bytes) -> bytes:
    """CRLF line ends, dot-stuffing and the final dot, done once per message, not per send."""
    data = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = re.sub(rb"(?m)^\.", b"..", data)
    return data + b".\r\n"


@dataclass
class Timed:
    """One SMTP transaction: seconds per step and the final reply code."""

    phases: dict[str, float]
    code: int
    size: int
    kind: str = ""

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def timed_send(port: int, prepared: bytes, kind: str = "", timeout: float = 60.0) -> Timed:
    phases: dict[str, float] = {}
    smtp = smtplib.SMTP(local_hostname=HELO, timeout=timeout)
    code = 0
    try:
        t = time.perf_counter()
        code, _ = smtp.connect(LOOPBACK, port)
        phases["connect"] = (t2 := time.perf_counter()) - t
        if code != 220:
            return Timed(phases, code, len(prepared), kind)
        code, _ = smtp.ehlo(HELO)
        phases["ehlo"] = (t := time.perf_counter()) - t2
        if code != 250:
            return Timed(phases, code, len(prepared), kind)
        code, _ = smtp.mail(FROM)
        phases["mail"] = (t2 := time.perf_counter()) - t
        if code != 250:
            return Timed(phases, code, len(prepared), kind)
        code, _ = smtp.rcpt(TO)
        phases["rcpt"] = (t := time.perf_counter()) - t2
        if code != 250:
            return Timed(phases, code, len(prepared), kind)
        smtp.putcmd("data")
        code, _ = smtp.getreply()
        phases["data"] = (t2 := time.perf_counter()) - t
        if code != 354:
            return Timed(phases, code, len(prepared), kind)
        assert smtp.sock is not None
        smtp.sock.sendall(prepared)
        code, _ = smtp.getreply()
        phases["body"] = time.perf_counter() - t2
        return Timed(phases, code, len(prepared), kind)
    except (OSError, smtplib.SMTPException):
        return Timed(phases, code or -1, len(prepared), kind)
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


@dataclass
class ClientRun:
    results: list[Timed] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.results) / self.seconds if self.seconds > 0 else 0.0

    @property
    def accepted(self) -> int:
        return sum(1 for r in self.results if 200 <= r.code < 300)


def run_client(
    port: int,
    messages: Sequence[tuple[str, bytes]],
    concurrency: int,
    deadline_s: float = 300.0,
) -> ClientRun:
    """Send each (kind, prepared bytes) once, ``concurrency`` sessions at a time."""
    run = ClientRun()
    lock = threading.Lock()
    index = 0
    stop_at = time.monotonic() + deadline_s

    def worker() -> None:
        nonlocal index
        while time.monotonic() < stop_at:
            with lock:
                if index >= len(messages):
                    return
                kind, data = messages[index]
                index += 1
            result = timed_send(port, data, kind)
            with lock:
                run.results.append(result)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, stop_at - time.monotonic() + 60))
    run.seconds = time.monotonic() - start
    return run


# ---------------------------------------------------------------------------------------------
# statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean of seconds, in milliseconds."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50) * 1000, 2),
        "p95": round(percentile(values, 95) * 1000, 2),
        "p99": round(percentile(values, 99) * 1000, 2),
        "mean": round(sum(values) / len(values) * 1000, 2),
    }


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process (all threads), from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and every descendant: filterd is a supervisor and its workers.

    Reaped children count through the parent's cutime/cstime, living ones are summed.
    """
    import os

    total = 0.0
    for child in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def descendants(pid: int) -> list[int]:
    """Living descendants of ``pid`` (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def process_cpu() -> dict[int, tuple[str, float]]:
    """(program name, CPU seconds) of every living process, by pid.

    Children a process has reaped count through its cutime/cstime, so Postfix's
    short-lived helpers land on their master. Kernel threads are named "kernel".
    """
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name.startswith(("kworker", "ksoftirqd", "rcu_", "kswapd", "migration")):
            name = "kernel"
        fields = text.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (name, sum(int(x) for x in fields[11:15]) / tick)
    return out


def cpu_by_program(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two ``process_cpu`` snapshots, summed by program.

    By pid, so a program that started in between counts whole and one that exited
    unreaped is lost: shown beside the machine's total, not instead of it.
    """
    out: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        spent = seconds - before.get(pid, (name, 0.0))[1]
        out[name] = out.get(name, 0.0) + spent
    return out


def machine_cpu_seconds() -> float:
    """CPU time spent by the whole machine (all cores, not idle), from /proc/stat."""
    import os

    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def nice_cpu_seconds() -> float:
    """CPU time of niced processes (other jobs sharing the machine), from /proc/stat."""
    import os

    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[2]) / os.sysconf("SC_CLK_TCK")
