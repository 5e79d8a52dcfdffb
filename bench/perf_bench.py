#!/usr/bin/env python3
"""filterd performance bench: what the milter costs the mail flow, measured as an operator would.

    .venv/bin/python bench/perf_bench.py            # full run, ~7 minutes
    .venv/bin/python bench/perf_bench.py --quick    # ~1-2 minutes
    .venv/bin/python bench/perf_bench.py --socket unix --messages 500 --json out.json

One private stack on loopback (bench/stack.py): Redis, clamd with the project's
test signatures, rbldnsd serving ZEN/DBL-shaped zones, smtp-sink, and one
Postfix instance per configuration, all started with tests.servers:

  a) ``none``: Postfix with no milter -- the ceiling;
  b) ``unix`` / ``inet``: Postfix with the real filterd daemon, every check on
     (allowlist + dnsbl at RCPT; antivirus, attachments, uribl, classifier at
     end of message; records), over a unix socket / loopback TCP.

The same load alternates between the configurations, round by round:
  * throughput: Postfix's smtp-source, ~10 KB real ham, one message per
    connection, at concurrency 1, 16 and 64 -> messages/second and b/a;
  * latency: a timed smtplib client at concurrency 1 -> p50/p95/p99 of the
    whole transaction and of each SMTP step; "added" = b minus a;
  * realistic mix: 2 KB - 1 MB messages, a fifth with attachments, at
    concurrency 16 (the classifier, clamd and the MIME walk see real sizes);
  * per-stage breakdown from the daemon's own "message judged" log lines;
  * memory: the daemon's peak RSS (VmHWM) over the run, and before/after one
    25 MB message;
  * studies (full run; --study): the same load through variants of the
    daemon, to show where the cost comes from and what a change would buy:
      tcp      -- over TCP as shipped, with TCP_NODELAY on the listener, with
                  the DATA event negotiated with a reply, both; Postfix
                  milter_protocol = 2 (bench/milter_variants.py);
      gil      -- GIL switch interval 1 ms and 20 ms (default 5), classifier
                  first among the end-of-message checks;
      ablation -- checks added one at a time, from "milter only" to all;
      rcpt     -- the recipient checks alone, one at a time and together;
  * --profile: py-spy on the daemon during a concurrency-16 run.

Results print as tables and go to --json (default bench/out/perf_bench.json).
Every loop is bounded by a message count and a deadline; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load
import messages
import stack as st
import stages

from filterd.services.launcher import make_reachable

OUT = Path(__file__).resolve().parent / "out"
STAGES = ("antivirus", "attachments", "uribl", "classifier", "total")


class Clock:
    """The run's deadline: sections that would start after it are skipped, and said so."""

    def __init__(self, minutes: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + minutes * 60

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def background_busy(seconds: float = 2.0) -> float:
    """Share of all cores busy before the bench starts anything (other users of the machine)."""
    cpu0, t0 = load.machine_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (load.machine_cpu_seconds() - cpu0) / ((time.monotonic() - t0) * os.cpu_count())


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# sections


def warm_up(stack: st.Stack, msg: bytes) -> None:
    """First messages pay for imports, pools and model paging; keep them out of the numbers."""
    for name, postfix in stack.postfix.items():
        load.smtp_source(postfix.port, msg, 4, 40, timeout=120)
        st.wait_queue_empty(postfix)
        log(f"  warmed up {name}")


def judged_stats(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-stage timings (ms) and outcomes from the daemon's 'message judged' lines."""
    out: dict[str, Any] = {"n": len(entries)}
    out["actions"] = dict(collections.Counter(e.get("action", "?") for e in entries))
    out["codes"] = dict(collections.Counter(e.get("code", "?") for e in entries).most_common(5))
    stages: dict[str, dict[str, float]] = {}
    for key in STAGES:
        values = [e["timings_ms"][key] / 1000 for e in entries if key in e.get("timings_ms", {})]
        if values:
            stages[key] = load.summary_ms(values)
    eom = [e["ms"] / 1000 for e in entries if "ms" in e]
    if eom:
        stages["eom_handler"] = load.summary_ms(eom)
        rest = [
            (e["ms"] - e["timings_ms"].get("total", 0)) / 1000
            for e in entries
            if "ms" in e and "timings_ms" in e
        ]
        stages["build+records+reply"] = load.summary_ms(rest)
    out["stages_ms"] = stages
    return out


def throughput(
    stack: st.Stack,
    targets: list[str],
    msg: bytes,
    concurrencies: Sequence[int],
    count: int,
    reps: int,
    clock: Clock,
) -> dict[str, Any]:
    """smtp-source rounds, alternating the targets (order rotated each repetition)."""
    result: dict[str, Any] = {}
    for conc in concurrencies:
        n = max(50, count // 4) if conc == 1 else max(count, conc * 4)
        rows: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
        for rep in range(reps):
            if clock.left() < 30:
                log("  deadline reached: fewer repetitions")
                break
            order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            for target in order:
                postfix = stack.postfix[target]
                daemon = stack.daemon_of(target)
                offset = daemon.log_size() if daemon else 0
                cpu0 = load.tree_cpu_seconds(daemon.pid) if daemon else 0.0
                clam0 = load.cpu_seconds(stack.clamd.pid) if stack.clamd.pid else 0.0
                machine0 = load.machine_cpu_seconds()
                programs0 = load.process_cpu()
                run = load.smtp_source(postfix.port, msg, conc, n, timeout=60 + n * 0.5)
                programs1 = load.process_cpu()
                row: dict[str, Any] = {
                    "rate": round(run.rate, 1),
                    "seconds": round(run.seconds, 2),
                    "messages": n,
                    "ok": run.returncode == 0,
                    # All cores, everything: Postfix, smtp-source, sink, clamd, daemon, kernel.
                    "machine_cpu_ms_per_msg": round(
                        (load.machine_cpu_seconds() - machine0) / n * 1000, 2
                    ),
                }
                # Where the machine's CPU went, per program (ms per message, top ones).
                spent = {
                    name: seconds / n * 1000
                    for name, seconds in load.cpu_by_program(programs0, programs1).items()
                }
                row["program_cpu_ms_per_msg"] = {
                    name: round(ms, 2)
                    for name, ms in sorted(spent.items(), key=lambda kv: -kv[1])[:8]
                    if ms >= 0.05
                }
                if run.returncode != 0:
                    row["error"] = run.error
                if daemon:
                    row["daemon_cpu_ms_per_msg"] = round(
                        (load.tree_cpu_seconds(daemon.pid) - cpu0) / n * 1000, 2
                    )
                    judged = daemon.judged_since(offset)
                    row["judged"] = len(judged)
                    row["actions"] = dict(collections.Counter(e.get("action") for e in judged))
                if stack.clamd.pid:
                    row["clamd_cpu_ms_per_msg"] = round(
                        (load.cpu_seconds(stack.clamd.pid) - clam0) / n * 1000, 2
                    )
                rows[target].append(row)
                if not st.wait_queue_empty(postfix, timeout=120):
                    log(f"  warning: {target} queue did not drain")
                log(f"  c={conc:<3d} {target:6s} {row['rate']:8.1f} msg/s  ({n} msgs)")
        summary: dict[str, Any] = {}
        for target, runs in rows.items():
            if not runs:
                continue
            rates = [r["rate"] for r in runs]
            summary[target] = {"rate": round(statistics.median(rates), 1), "runs": runs}
            for key in ("daemon_cpu_ms_per_msg", "machine_cpu_ms_per_msg"):
                if key in runs[0]:
                    summary[target][key] = round(statistics.median(r[key] for r in runs), 2)
        ceiling = summary.get("none", {}).get("rate")
        if ceiling:
            for target in summary:
                summary[target]["ratio"] = round(summary[target]["rate"] / ceiling, 3)
        result[str(conc)] = summary
    return result


def latency(
    stack: st.Stack,
    targets: list[str],
    msg: bytes,
    per_target: int,
    block: int,
    clock: Clock,
) -> dict[str, Any]:
    """Concurrency 1, timed per SMTP step, alternating targets block by block."""
    prepared = load.prepare(msg)
    results: dict[str, list[load.Timed]] = {t: [] for t in targets}
    offsets = {t: d.log_size() for t, d in ((t, stack.daemon_of(t)) for t in targets) if d}
    rounds = max(1, per_target // block)
    for rnd in range(rounds):
        if clock.left() < 20:
            log("  deadline reached: fewer latency samples")
            break
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for target in order:
            port = stack.postfix[target].port
            results[target].extend(load.timed_send(port, prepared) for _ in range(block))
    for target in targets:
        st.wait_queue_empty(stack.postfix[target])
    out: dict[str, Any] = {}
    for target, rs in results.items():
        good = [r for r in rs if 200 <= r.code < 300]
        entry: dict[str, Any] = {
            "sent": len(rs),
            "accepted": len(good),
            "total_ms": load.summary_ms([r.total for r in good]),
            "phases_ms": {
                p: load.summary_ms([r.phases[p] for r in good if p in r.phases])
                for p in load.PHASES
            },
        }
        daemon = stack.daemon_of(target)
        if daemon:
            entry["daemon"] = judged_stats(daemon.judged_since(offsets[target]))
        out[target] = entry
    base = out.get("none")
    if base:
        for target, entry in out.items():
            if target == "none":
                continue
            entry["added_ms"] = {
                q: round(entry["total_ms"][q] - base["total_ms"][q], 2)
                for q in ("p50", "p95", "p99")
                if q in entry["total_ms"] and q in base["total_ms"]
            }
            entry["added_phase_p50_ms"] = {
                p: round(entry["phases_ms"][p]["p50"] - base["phases_ms"][p]["p50"], 2)
                for p in load.PHASES
                if "p50" in entry["phases_ms"][p] and "p50" in base["phases_ms"][p]
            }
    return out


def mix_run(
    stack: st.Stack,
    targets: list[str],
    mix: list[messages.BenchMessage],
    concurrency: int,
    clock: Clock,
) -> dict[str, Any]:
    """The realistic size mix through each target (same messages, same order)."""
    prepared = [(m.kind, load.prepare(m.data)) for m in mix]
    total_bytes = sum(m.size for m in mix)
    out: dict[str, Any] = {}
    for target in targets:
        if clock.left() < 30:
            log("  deadline reached: mix skipped for the rest")
            break
        daemon = stack.daemon_of(target)
        offset = daemon.log_size() if daemon else 0
        run = load.run_client(
            stack.postfix[target].port, prepared, concurrency, deadline_s=min(240, clock.left())
        )
        st.wait_queue_empty(stack.postfix[target], timeout=120)
        good = [r for r in run.results if 200 <= r.code < 300]
        by_kind: dict[str, Any] = {}
        for kind in sorted({r.kind for r in run.results}):
            values = [r.total for r in good if r.kind == kind]
            by_kind[kind] = load.summary_ms(values)
        entry: dict[str, Any] = {
            "rate": round(run.rate, 1),
            "mb_per_s": round(total_bytes / 1e6 / run.seconds, 2) if run.seconds else 0,
            "sent": len(run.results),
            "accepted": len(good),
            "refused_codes": dict(
                collections.Counter(r.code for r in run.results if not 200 <= r.code < 300)
            ),
            "total_ms": load.summary_ms([r.total for r in good]),
            "by_kind_ms": by_kind,
        }
        if daemon:
            entry["daemon"] = judged_stats(daemon.judged_since(offset))
        out[target] = entry
        log(f"  mix {target:6s} {entry['rate']:7.1f} msg/s {entry['mb_per_s']:6.2f} MB/s")
    ceiling = out.get("none", {}).get("rate")
    if ceiling:
        for entry in out.values():
            entry["ratio"] = round(entry["rate"] / ceiling, 3)
    return out


def memory_large(stack: st.Stack, target: str, nbytes: int) -> dict[str, Any]:
    """Daemon RSS before/after one large message (VmHWM reset just before it)."""
    daemon = stack.daemon_of(target)
    assert daemon is not None
    big = messages.large(nbytes)
    prepared = load.prepare(big.data)
    spool = stack.config["milter"]["memory_spool_bytes"]
    rss0, hwm0 = daemon.rss_kb()
    reset = daemon.reset_peak()
    offset = daemon.log_size()
    result = load.timed_send(stack.postfix[target].port, prepared, "large", timeout=120)
    st.wait_queue_empty(stack.postfix[target], timeout=120)
    rss1, hwm1 = daemon.rss_kb()
    judged = daemon.judged_since(offset)
    base = rss0 if reset else hwm0
    return {
        "target": target,
        "message_bytes": big.size,
        "smtp_code": result.code,
        "seconds": round(result.total, 2),
        "rss_before_mb": round(rss0 / 1024, 1),
        "peak_during_mb": round(hwm1 / 1024, 1),
        "rss_after_mb": round(rss1 / 1024, 1),
        "growth_mb": round((hwm1 - base) / 1024, 1),
        "peak_reset_ok": reset,
        "memory_spool_bytes": spool,
        "within_spool_limit": (hwm1 - base) * 1024 <= spool,
        "daemon": judged_stats(judged),
    }


def profile(stack: st.Stack, target: str, msg: bytes, seconds: float) -> dict[str, Any]:
    """py-spy on the daemon while smtp-source keeps it busy; top functions by GIL-holding time."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        return {"error": "py-spy not installed (pip install py-spy into .venv)"}
    daemon = stack.daemon_of(target)
    assert daemon is not None
    OUT.mkdir(exist_ok=True)
    raw = OUT / f"profile-{target}.txt"
    svg = OUT / f"profile-{target}.svg"
    procs = [
        subprocess.Popen(
            [
                pyspy,
                "record",
                "-p",
                str(daemon.pid),
                "-d",
                str(int(seconds)),
                "-r",
                "250",
                "--nonblocking",
                "--gil",
                "--subprocesses",  # the workers are the supervisor's children
                *fmt,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fmt in (["-f", "raw", "-o", str(raw)], ["-f", "flamegraph", "-o", str(svg)])
    ]
    time.sleep(1.0)
    end = time.monotonic() + seconds
    while time.monotonic() < end - 1:
        load.smtp_source(stack.postfix[target].port, msg, 16, 200, timeout=seconds + 30)
    for proc in procs:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
    st.wait_queue_empty(stack.postfix[target])
    if not raw.exists():
        return {"error": "py-spy wrote nothing (ptrace not permitted?)"}
    return {"raw": str(raw), "flamegraph": str(svg), **summarise_profile(raw)}


def summarise_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Inclusive share per frame and per filterd area, from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    area_of = (
        ("classify/", "classifier"), ("checks/antivirus", "antivirus"), ("clamd.py", "antivirus"),
        ("checks/uribl", "uribl"), ("filterd/dns/", "DNS lists"), ("checks/dnsbl", "DNS lists"),
        ("checks/attachments", "attachments"), ("mail/walk", "attachments"),
        ("mail/", "analysis (parse, links)"), ("types.py", "analysis (parse, links)"),
        ("allowlist", "allowlist"), ("records/", "records"),
        ("builder.py", "milter collect"), ("milter.py", "milter callbacks"),
        ("pipeline.py", "pipeline"), ("policy.py", "pipeline"),
    )  # fmt: skip
    # py-spy counts a thread as holding the GIL when it was the last to hold it, so a
    # process with nothing to do shows its threads blocked in a lock or in C (no Python
    # frame): that is idle time, not CPU, and is reported apart.
    waits = ("Condition.wait", "Event.wait", "Queue.get", "lock.acquire", "Thread.join")
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack_text.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        # Attribute the sample to the innermost filterd area on its stack.
        area = "other (libs, threads)"
        if frames[-1].startswith("process ") or any(w in frames[-1] for w in waits):
            area = "waits and C without a Python frame (mostly idle)"
            frames = []
        for frame in reversed(frames):
            hit = next((name for key, name in area_of if key in frame), None)
            if hit:
                area = hit
                break
        areas[area] += n
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "areas_pct": {k: round(100 * v / total, 1) for k, v in areas.most_common()},
        "top_inclusive_pct": {
            k: round(100 * v / total, 1) for k, v in inclusive.most_common(top) if k
        },
    }


STUDY_FIRST = '["classifier", "antivirus", "attachments", "uribl"]'


def study_specs(
    study: str, classifier: bool
) -> tuple[list[st.DaemonSpec], list[st.Target], list[str]]:
    """Daemons and Postfix targets of one study, and the targets it compares (in order)."""
    daemons: list[st.DaemonSpec] = []
    targets: list[st.Target] = []
    if study == "tcp":
        daemons = [
            st.DaemonSpec("inet+nodelay", "inet", nodelay=True),
            st.DaemonSpec("inet+data", "inet", reply_events="data"),
            st.DaemonSpec("inet+nodelay+data", "inet", reply_events="data", nodelay=True),
        ]
        targets = [st.Target(d.name, d.name) for d in daemons]
        targets.append(st.Target("inet+milter_protocol=2", "inet", (("milter_protocol", "2"),)))
        return daemons, targets, ["unix", "inet", *[t.name for t in targets]]
    if study == "gil":
        first = (("FILTERD_PIPELINE_MESSAGE_CHECKS", STUDY_FIRST),) if classifier else ()
        variants = {
            "unix+switch1ms": (("BENCH_SWITCH_INTERVAL", "0.001"),),
            "unix+classifier-first": first,
            "unix+switch20ms": (("BENCH_SWITCH_INTERVAL", "0.02"),),
        }
        daemons = [st.DaemonSpec(n, "unix", env=e) for n, e in variants.items() if e]
        targets = [st.Target(d.name, d.name) for d in daemons]
        return daemons, targets, ["unix", *[t.name for t in targets]]
    if study == "process":
        # The process model: the ceiling, what any Python milter reaches (one process doing
        # nothing), filterd with one worker, and with one worker per CPU (the default).
        daemons = [
            st.DaemonSpec("noop pymilter", "unix", noop=True),
            st.DaemonSpec("filterd 1 worker", "unix", env=(("FILTERD_MILTER_WORKERS", "1"),)),
        ]
        targets = [st.Target(d.name, d.name) for d in daemons]
        n = len(os.sched_getaffinity(0))
        return daemons, targets, [*[t.name for t in targets], f"unix ({n} workers)"]
    if study == "ablation":
        steps = [
            ("antivirus only", [], ["antivirus"], False),
            ("only milter", [], [], False),
            ("+records", [], [], True),
            ("+allowlist,dnsbl", ["allowlist", "dnsbl"], [], True),
            ("+antivirus", ["allowlist", "dnsbl"], ["antivirus"], True),
            ("+attachments", ["allowlist", "dnsbl"], ["antivirus", "attachments"], True),
            ("+uribl", ["allowlist", "dnsbl"], ["antivirus", "attachments", "uribl"], True),
        ]
        for name, rcpt, msg, records in steps:
            env = (
                ("FILTERD_PIPELINE_RECIPIENT_CHECKS", json.dumps(rcpt)),
                ("FILTERD_PIPELINE_MESSAGE_CHECKS", json.dumps(msg)),
                ("FILTERD_RECORDS_ENABLED", "true" if records else "false"),
            )
            daemons.append(st.DaemonSpec(name, "unix", env=env))
            targets.append(st.Target(name, name))
        last = "unix (+classifier = all)" if classifier else "unix (all)"
        return daemons, targets, [*[t.name for t in targets], last]
    if study == "rcpt":
        # The RCPT phase alone: each recipient check on its own, then both (records on,
        # no message checks), to see what each costs the daemon per message.
        for name, rcpt in (
            ("records, no checks", []),
            ("+allowlist", ["allowlist"]),
            ("+dnsbl", ["dnsbl"]),
            ("+allowlist,dnsbl", ["allowlist", "dnsbl"]),
        ):
            env = (
                ("FILTERD_PIPELINE_RECIPIENT_CHECKS", json.dumps(rcpt)),
                ("FILTERD_PIPELINE_MESSAGE_CHECKS", json.dumps([])),
            )
            daemons.append(st.DaemonSpec(name, "unix", env=env))
            targets.append(st.Target(name, name))
        return daemons, targets, [t.name for t in targets]
    raise SystemExit(f"unknown study {study!r} (tcp, gil, ablation, process, rcpt)")


def run_study(
    stack: st.Stack,
    names: list[str],
    msg: bytes,
    lat_n: int,
    tp_n: int,
    clock: Clock,
) -> dict[str, Any]:
    """Latency at c=1 (alternating blocks) and throughput at c=16 for each variant."""
    alias = {n: ("unix" if n.startswith("unix (") else n) for n in names}
    real = ["none", *dict.fromkeys(alias[n] for n in names)]
    lat = latency(stack, real, msg, lat_n, 10, clock)
    tp = throughput(stack, real, msg, [16], tp_n, 1, clock).get("16", {})
    out: dict[str, Any] = {}
    for name in names:
        target = alias[name]
        entry = lat.get(target, {})
        row = {
            "latency_ms": entry.get("total_ms", {}),
            "added_ms": entry.get("added_ms", {}),
            "added_phase_p50_ms": entry.get("added_phase_p50_ms", {}),
            "c16_rate": tp.get(target, {}).get("rate"),
            "c16_ratio": tp.get(target, {}).get("ratio"),
            "daemon_cpu_ms_per_msg": tp.get(target, {}).get("daemon_cpu_ms_per_msg"),
            "machine_cpu_ms_per_msg": tp.get(target, {}).get("machine_cpu_ms_per_msg"),
        }
        stages = entry.get("daemon", {}).get("stages_ms", {})
        if stages:
            row["eom_total_p50_ms"] = stages.get("total", {}).get("p50")
            row["stages_p50_ms"] = {k: v.get("p50") for k, v in stages.items()}
        daemon = stack.daemon_of(target)
        if daemon is not None:
            row["rss_mb"] = round(daemon.rss_kb()[0] / 1024, 1)
            row["pss_mb"] = round(daemon.pss_kb() / 1024, 1)
            row["processes"] = len(daemon.processes())
        out[name] = row
    ceiling = tp.get("none", {})
    out["none"] = {
        "latency_ms": lat.get("none", {}).get("total_ms", {}),
        "c16_rate": ceiling.get("rate"),
        "machine_cpu_ms_per_msg": ceiling.get("machine_cpu_ms_per_msg"),
    }
    return out


# ---------------------------------------------------------------------------------------------
# report


def fmt_row(cells: Sequence[Any], widths: Sequence[int]) -> str:
    return "  ".join(
        str(c).rjust(w) if i else str(c).ljust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=False))
    )


def print_report(res: dict[str, Any], targets: list[str]) -> None:
    p: Callable[..., None] = print
    meta = res["meta"]
    p("\nfilterd performance bench")
    p(f"  machine: {meta['cpus']} CPUs, {meta['python']}; message: {meta['message']}")
    p(f"  checks: {meta['checks']}; DNS cache: {meta['dns_cache']}; run {meta['seconds']:.0f} s")
    others = meta.get("others_nice_cpu_pct", "?")
    p(f"  machine busy before start: {meta['background_busy_pct']}%; niced jobs of others during")
    p(f"  the run: {others}% of the machine (other load slows every figure here)")
    tp = res.get("throughput", {})
    if tp:
        p("\nThroughput (smtp-source, one message per connection; median of repetitions)")
        cols = [("conc", 5)] + [(f"{t} msg/s", 13) for t in targets]
        cols += [(f"{t}/none", 10) for t in targets if t != "none"]
        cols += [(f"{t} cpu ms", 12) for t in targets if t != "none"]
        cols += [(f"{t} all ms", 12) for t in targets]
        p(fmt_row([c for c, _ in cols], [w for _, w in cols]))
        for conc, rows in tp.items():
            cells: list[Any] = [conc]
            cells += [rows.get(t, {}).get("rate", "-") for t in targets]
            cells += [rows.get(t, {}).get("ratio", "-") for t in targets if t != "none"]
            cells += [
                rows.get(t, {}).get("daemon_cpu_ms_per_msg", "-") for t in targets if t != "none"
            ]
            cells += [rows.get(t, {}).get("machine_cpu_ms_per_msg", "-") for t in targets]
            p(fmt_row(cells, [w for _, w in cols]))
        p("  (cpu ms = daemon CPU time per message, all threads; all ms = CPU time of the whole")
        p("   machine per message: Postfix, load generator, sink, clamd, Redis, DNS, daemon...)")
        for conc, rows in tp.items():
            for target in targets:
                runs = rows.get(target, {}).get("runs", [])
                if conc != "16" or not runs or "program_cpu_ms_per_msg" not in runs[-1]:
                    continue
                spent = runs[-1]["program_cpu_ms_per_msg"]
                p(f"  c=16 {target}, CPU ms per message by program (last repetition): "
                  + ", ".join(f"{k} {v}" for k, v in spent.items()))  # fmt: skip
    lat = res.get("latency", {})
    if lat:
        p("\nLatency at concurrency 1, 10 KB ham (ms; added = filterd minus no milter)")
        widths = [8, 7, 7, 7, 9, 9, 9]
        p(fmt_row(["target", "p50", "p95", "p99", "+p50", "+p95", "+p99"], widths))
        for target in targets:
            e = lat.get(target)
            if not e or "p50" not in e["total_ms"]:
                continue
            added = e.get("added_ms", {})
            p(fmt_row([target, e["total_ms"]["p50"], e["total_ms"]["p95"], e["total_ms"]["p99"],
                       added.get("p50", "-"), added.get("p95", "-"), added.get("p99", "-")],
                      widths))  # fmt: skip
        p("  added p50 per SMTP step: " + "; ".join(
            f"{t}: " + ", ".join(f"{k} {v:+.1f}" for k, v in lat[t].get("added_phase_p50_ms",
                                                                           {}).items())
            for t in targets if t != "none" and t in lat
        ))  # fmt: skip
    for label, section in (("concurrency 1", lat), ("mix, concurrency 16", res.get("mix", {}))):
        for target in targets:
            daemon = section.get(target, {}).get("daemon")
            if not daemon or not daemon.get("stages_ms"):
                continue
            p(f"\nStages from the daemon's log ({label}, {target}; ms, n={daemon['n']}, "
              f"actions {daemon['actions']})")  # fmt: skip
            p(fmt_row(["stage", "p50", "p95", "p99", "mean"], [22, 8, 8, 8, 8]))
            for stage, s in daemon["stages_ms"].items():
                p(fmt_row([stage, s["p50"], s["p95"], s["p99"], s["mean"]], [22, 8, 8, 8, 8]))
            break
    for label, rows in res.get("stages_inprocess", {}).items():
        p(f"\nStages alone, in-process, serial ({label}; ms; cpu = this thread's CPU time)")
        p(fmt_row(["stage", "wall p50", "cpu p50"], [32, 9, 9]))
        for stage, t in rows.items():
            p(fmt_row([stage, t["wall_p50_ms"], t["cpu_p50_ms"]], [32, 9, 9]))
    mix = res.get("mix", {})
    if mix:
        p(f"\nRealistic mix ({res['meta']['mix']}), concurrency 16")
        widths = [8, 8, 8, 7, 8, 8, 8, 10]
        p(fmt_row(["target", "msg/s", "MB/s", "ratio", "p50", "p95", "p99", "accepted"], widths))
        for target in targets:
            e = mix.get(target)
            if not e:
                continue
            t = e["total_ms"]
            p(fmt_row([target, e["rate"], e["mb_per_s"], e.get("ratio", "-"), t.get("p50", "-"),
                       t.get("p95", "-"), t.get("p99", "-"), f"{e['accepted']}/{e['sent']}"],
                      widths))  # fmt: skip
    mem = res.get("memory", {})
    if mem:
        p("\nMemory (daemon RSS, MB)")
        for name, m in mem.get("daemons", {}).items():
            p(f"  {name}: after start {m['start_mb']}, peak over the run {m['peak_mb']} (summed "
              f"over processes); PSS now {m.get('pss_mb', '-')}")  # fmt: skip
        big = mem.get("large")
        if big:
            p(f"  {big['message_bytes'] / 1e6:.1f} MB message via {big['target']}: SMTP "
              f"{big['smtp_code']} in {big['seconds']} s; RSS {big['rss_before_mb']} -> peak "
              f"{big['peak_during_mb']} -> {big['rss_after_mb']}; growth {big['growth_mb']} MB "
              f"(spool limit {big['memory_spool_bytes'] / 1048576:.1f} MiB: "
              f"{'within' if big['within_spool_limit'] else 'EXCEEDED'})")  # fmt: skip
        for label, m in mem.get("by_size", {}).items():
            p(f"  {label} message: growth {m['growth_mb']} MB (peak {m['peak_during_mb']} MB)")
        peaks = mem.get("large_stages_tracemalloc_mb")
        if peaks:
            p("  Python allocations per stage for that message (tracemalloc peak, MB): "
              + ", ".join(f"{k} {v}" for k, v in peaks.items()))  # fmt: skip
    for study, rows in res.get("studies", {}).items():
        p(f"\nStudy: {study} (10 KB ham; latency at c=1, throughput at c=16)")
        widths = [28, 8, 8, 8, 9, 9, 8, 9, 9, 8, 8]
        p(fmt_row(["variant", "p50", "p95", "+p50", "+p99", "c16 msg/s", "ratio", "cpu ms",
                   "all ms", "RSS MB", "PSS MB"], widths))  # fmt: skip
        for name, e in rows.items():
            if name == "none":
                continue
            t, a = e.get("latency_ms", {}), e.get("added_ms", {})
            p(fmt_row([name, t.get("p50", "-"), t.get("p95", "-"), a.get("p50", "-"),
                       a.get("p99", "-"), e.get("c16_rate", "-"), e.get("c16_ratio", "-"),
                       e.get("daemon_cpu_ms_per_msg", "-"), e.get("machine_cpu_ms_per_msg", "-"),
                       e.get("rss_mb", "-"), e.get("pss_mb", "-")], widths))  # fmt: skip
            if e.get("stages_p50_ms"):
                p("      eom stages p50 ms (wall): " + ", ".join(
                    f"{k} {v}" for k, v in e["stages_p50_ms"].items()))  # fmt: skip
        ref = rows.get("none", {})
        p(f"  no milter: p50 {ref.get('latency_ms', {}).get('p50', '-')} ms, "
          f"c16 {ref.get('c16_rate', '-')} msg/s, all ms {ref.get('machine_cpu_ms_per_msg', '-')}"
          "  (cpu ms: the daemon's CPU per message, supervisor + workers; all ms: the whole "
          "machine's; RSS summed over the daemon's processes)")  # fmt: skip
    prof = res.get("profile", {})
    if prof.get("areas_pct"):
        p(f"\nProfile (py-spy --gil, {prof['samples']} samples; share of GIL-holding time)")
        for area, pct in prof["areas_pct"].items():
            p(f"  {pct:5.1f}%  {area}")
        p(f"  flamegraph: {prof['flamegraph']}")
    targ = res.get("targets", {})
    if targ:
        p("\nTargets")
        for line in targ.values():
            p(f"  {line}")


def evaluate_targets(res: dict[str, Any], default: str) -> dict[str, str]:
    """The issue's targets, checked against this run's figures."""
    out: dict[str, str] = {}
    c16 = res.get("throughput", {}).get("16", {}).get(default, {})
    if "ratio" in c16:
        ok = c16["ratio"] >= 0.25
        out["throughput"] = (
            f"{'MET' if ok else 'MISSED'}: {default} at c=16 = {c16['ratio']:.2f} of the ceiling "
            "(issue 12: >= 0.25)"
        )
    lat = res.get("latency", {}).get(default, {}).get("added_ms", {})
    if lat:
        ok = lat.get("p50", 1e9) <= 8
        out["latency"] = (
            f"{'MET' if ok else 'MISSED'}: added p50 {lat.get('p50')} ms (issue 12: <= 8), "
            f"p99 {lat.get('p99')} ms at c=1, 10 KB"
        )
    daemons = res.get("memory", {}).get("daemons", {})
    if daemons:
        peak = max(m["peak_mb"] for m in daemons.values())
        pss = max(m.get("pss_mb", 0) for m in daemons.values())
        ok = peak < 400
        out["rss"] = (
            f"{'MET' if ok else 'MISSED'}: RSS summed over the daemon's processes, peak {peak} MB "
            f"(issue 12: < 400 MB); proportional (PSS, shared pages counted once) {pss} MB"
        )
    big = res.get("memory", {}).get("large")
    if big:
        out["large"] = (
            f"{'MET' if big['within_spool_limit'] else 'MISSED'}: 25 MB message grew the daemon "
            f"by {big['growth_mb']} MB (spool limit "
            f"{big['memory_spool_bytes'] / 1048576:.1f} MiB)"
        )
    return out


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~2-3 minute run (fewer messages)")
    ap.add_argument("--socket", choices=("unix", "inet", "both"), default="both")
    ap.add_argument(
        "--messages", type=int, default=None,
        help="messages per throughput round at c>1 (c=1 and latency use a quarter); "
        "default 600, quick 300",
    )  # fmt: skip
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated, default 1,16,64")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 2, quick 1)")
    ap.add_argument("--json", type=Path, default=OUT / "perf_bench.json", help="results file")
    ap.add_argument("--no-classifier", action="store_true", help="run without the classifier")
    ap.add_argument(
        "--dns-cache",
        action="store_true",
        help="let the daemon cache DNS answers (default: every message looks up)",
    )
    ap.add_argument("--skip-mix", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--large-bytes", type=int, default=25_000_000)
    ap.add_argument(
        "--study",
        default=None,
        help="comma-separated studies: tcp, gil, ablation, process, rcpt, none "
        "(default: all three in the full run, none with --quick)",
    )
    ap.add_argument(
        "--profile",
        type=float,
        default=None,
        metavar="SECONDS",
        help="py-spy the daemon for SECONDS under concurrency-16 load "
        "(default 15 in the full run when py-spy is installed, 0 with --quick)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="deadline for the whole run (default 10, quick 4); later sections are skipped",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for other load on the machine to drop below 15%% first",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    count = args.messages or (300 if quick else 600)
    reps = args.reps or (1 if quick else 2)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    studies_arg = args.study if args.study is not None else ("none" if quick else "all")
    studies = (
        ["process", "tcp", "gil", "ablation"]
        if studies_arg == "all"
        else [x.strip() for x in studies_arg.split(",") if x.strip() and x.strip() != "none"]
    )
    clock = Clock(args.max_minutes or (4 if quick else 10))
    profile_s = args.profile if args.profile is not None else (0 if quick else 15)
    sockets = ["unix", "inet"] if args.socket == "both" else [args.socket]
    default = "unix" if "unix" in sockets else sockets[0]
    classifier = st.model_available() and not args.no_classifier

    ham = messages.corpus_ham()
    ref = messages.ham_10k(ham)
    mix = messages.mixed(60 if quick else 150, ham=ham)
    sizes = sorted(m.size for m in mix)

    main_targets = ["none", *sockets]
    daemons = {s: st.DaemonSpec(s, s) for s in sockets}
    targets = {t: st.Target(t, None if t == "none" else t) for t in main_targets}
    compare: dict[str, list[str]] = {}
    for study in studies:
        extra_daemons, extra_targets, names = study_specs(study, classifier)
        for kind in ("unix", "inet"):  # the references a study compares against
            if kind in names and kind not in daemons:
                daemons[kind] = st.DaemonSpec(kind, kind)
                targets[kind] = st.Target(kind, kind)
        daemons.update({d.name: d for d in extra_daemons})
        targets.update({t.name: t for t in extra_targets})
        compare[study] = names

    busy = background_busy()
    quiet_by = time.monotonic() + args.wait_quiet
    while busy > 0.15 and time.monotonic() < quiet_by:
        log(f"machine {busy:.0%} busy: waiting for it to quieten (--wait-quiet)")
        time.sleep(20)
        busy = background_busy()
    if busy > 0.15:
        log(f"warning: the machine is {busy:.0%} busy before the bench starts: noisy figures")
    base = make_reachable(Path(tempfile.mkdtemp(prefix="filterd-bench-")))
    checks = ["allowlist", "dnsbl", "antivirus", "attachments", "uribl"]
    checks += ["classifier"] if classifier else []
    res: dict[str, Any] = {
        "meta": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "message": f"{ref.kind} ({ref.size} bytes)",
            "mix": f"{len(mix)} msgs, {sizes[0] // 1024}-{sizes[-1] // 1024} KB, "
            f"mean {sum(sizes) // len(sizes) // 1024} KB, "
            f"{dict(collections.Counter(m.kind for m in mix))}",
            "checks": "+".join(checks) + " + records",
            "dns_cache": args.dns_cache,
            "messages_per_round": count,
            "reps": reps,
            "studies": studies,
            "background_busy_pct": round(busy * 100, 1),
            "loadavg_at_start": os.getloadavg()[0],
            "workdir": str(base),
        }
    }
    log(f"bench work directory: {base} ({len(daemons)} daemons, {len(targets)} Postfix)")
    nice0 = load.nice_cpu_seconds()
    try:
        with st.running_stack(
            base, list(daemons.values()), list(targets.values()), classifier, args.dns_cache
        ) as stack:
            start_rss = {n: d.rss_kb()[0] for n, d in stack.daemons.items()}
            log("warm-up")
            warm_up(stack, ref.data)
            log("throughput (smtp-source)")
            res["throughput"] = throughput(
                stack, main_targets, ref.data, concurrencies, count, reps, clock
            )
            log("latency (smtplib, concurrency 1)")
            per_target = 60 if quick else max(100, count // 4)
            res["latency"] = latency(stack, main_targets, ref.data, per_target, 20, clock)
            if not args.skip_mix and clock.left() > 60:
                log("realistic mix (smtplib, concurrency 16)")
                res["mix"] = mix_run(stack, main_targets, mix, 16, clock)
            res["stages_inprocess"] = {}
            if clock.left() > 30:
                log("stages, in-process")
                res["stages_inprocess"]["ham-10k"] = stages.time_stages(
                    base / "filterd.toml", ref.data, 30 if quick else 100
                )
                biggest = max(mix, key=lambda m: m.size)
                res["stages_inprocess"][f"{biggest.kind}-{biggest.size // 1024}k"] = (
                    stages.time_stages(base / "filterd.toml", biggest.data, 10)
                )
            res["studies"] = {}
            for study, names in compare.items():
                if clock.left() < 60:
                    log(f"deadline: study {study} skipped")
                    continue
                log(f"study: {study}")
                res["studies"][study] = run_study(
                    stack, names, ref.data, 40 if quick else 60, 300 if quick else 400, clock
                )
            if profile_s and clock.left() > profile_s + 30:
                log(f"profile ({profile_s:.0f} s, py-spy)")
                res["profile"] = profile(stack, default, ref.data, profile_s)
            res["memory"] = {
                "daemons": {
                    n: {
                        "start_mb": round(start_rss[n] / 1024, 1),
                        "peak_mb": round(d.rss_kb()[1] / 1024, 1),
                        "pss_mb": round(d.pss_kb() / 1024, 1),
                    }
                    for n, d in stack.daemons.items()
                    if n in sockets
                }
            }
            if not args.skip_large:
                sizes_mb = [] if quick else [1, 5]
                res["memory"]["by_size"] = {}
                for mb in sizes_mb:
                    log(f"message of {mb} MB")
                    res["memory"]["by_size"][f"{mb}MB"] = memory_large(stack, default, mb * 10**6)
                log(f"large message ({args.large_bytes / 1e6:.0f} MB)")
                res["memory"]["large"] = memory_large(stack, default, args.large_bytes)
                res["memory"]["large_stages_tracemalloc_mb"] = stages.memory_stages(
                    base / "filterd.toml", messages.large(args.large_bytes).data
                )
    finally:
        res["meta"]["seconds"] = round(clock.elapsed(), 1)
        # Niced jobs of other users ran this share of the machine during the run: with 2
        # cores (possibly hyper-threads of one), that slows every figure here.
        res["meta"]["others_nice_cpu_pct"] = round(
            100 * (load.nice_cpu_seconds() - nice0) / (clock.elapsed() * (os.cpu_count() or 1)), 1
        )
        res["targets"] = evaluate_targets(res, default)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print_report(res, main_targets)
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
