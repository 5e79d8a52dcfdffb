"""Soak under faults: N SMTP sessions through a real Postfix for M seconds while a fault
schedule SIGKILLs and SIGSTOPs clamd, Redis, the DNS list server and the filterd daemon.

Every message carries a unique ``X-Soak-Id`` and is accounted for at the end, by the reply
the client saw and by what reached the sink (smtp-sink behind Postfix):

- ``lost``: the client got 250 but the message never reached the sink;
- ``duplicated``: one id at the sink more than once;
- ``delivered_after_refusal``: at the sink although the client saw 4xx/5xx (a real client
  would retry a 4xx: that is a duplicate in waiting, or a refusal that did not hold);
- ``virus_passed``: a test-virus message delivered (antivirus fails closed: never);
- ``recovery``: per fault, seconds from the end of the fault (restart / SIGCONT) until a
  probe message is accepted again.

Targets are pluggable (``Target``: a name, a function returning the PIDs to signal and a
restart function), so the daemon's workers can be targeted once a multi-process
supervisor exists: pass ``pids=`` returning the worker PIDs.

Run ``python -m bench.soak --sessions 50 --minutes 10`` (as root, like the test suite:
it starts private Postfix, clamd, Redis and rbldnsd on loopback). The short run in
``tests/test_soak.py`` uses the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# These need the project root on the path (run as a script).
from tests.helpers_daemon import DaemonProcess  # noqa: E402
from tests.servers import (  # noqa: E402
    ClamdServer,
    PostfixServer,
    RbldnsdServer,
    RedisServer,
    SmtpSink,
    make_reachable,
    project_signature_dir,
    send_mail,
    write_config,
)

ZONE = "zen.soak.test"
LISTED_IP = "192.0.2.10"
CLEAN_IPS = ("198.51.100.7", "198.51.100.8", "203.0.113.9")
SOA = "$SOA 600 ns.test. hostmaster.test. 1 600 600 600 45\n"
ZEN = SOA + "$TTL 5\n:127.0.0.2:SBL listed\n192.0.2.10\n"
RCPT_DOMAIN = "example.org"


def eicar() -> str:
    # Built from pieces so that this file is not itself a test virus.
    return "X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!" + "$H+H*"


# -- what is sent ------------------------------------------------------------------------------


@dataclass
class Sent:
    soak_id: str
    kind: str  # clean | virus | listed | probe
    code: int  # final reply the client saw: DATA reply, or the RCPT/MAIL refusal; 0 = none
    at: float


def message(soak_id: str, kind: str) -> bytes:
    body = eicar() if kind == "virus" else "Lunch on Thursday? The usual place at noon.\n"
    return (
        f"From: <sender@example.net>\nTo: <user@{RCPT_DOMAIN}>\nSubject: soak {kind}\n"
        f"Message-ID: <{soak_id}@soak.example.net>\nX-Soak-Id: {soak_id}\n"
        f"MIME-Version: 1.0\nContent-Type: text/plain\n\n{body}\n"
    ).encode()


def send_one(port: int, soak_id: str, kind: str) -> Sent:
    xclient = {"ADDR": LISTED_IP if kind == "listed" else random.choice(CLEAN_IPS)}
    at = time.monotonic()
    try:
        result = send_mail(
            port,
            "sender@example.net",
            [f"user{soak_id[-2:]}@{RCPT_DOMAIN}"],
            message(soak_id, kind),
            xclient=xclient,
            timeout=60,
        )
    except OSError:
        return Sent(soak_id, kind, 0, at)
    if result.data is not None:
        code = result.data.code
    elif result.rcpts:
        code = max(r.code for r in result.rcpts.values())
    elif result.mail is not None and result.mail.code >= 400:
        code = result.mail.code
    else:
        code = 0
    return Sent(soak_id, kind, code, at)


# -- faults ------------------------------------------------------------------------------------


@dataclass
class Target:
    """Something the schedule can hurt: ``pids()`` to signal, ``restart()`` after SIGKILL."""

    name: str
    pids: Callable[[], Sequence[int]]
    restart: Callable[[], None]


@dataclass
class Fault:
    target: str
    action: str  # kill | stop
    started: float
    ended: float = 0.0
    recovered: float | None = None  # seconds from ended to the first accepted probe


@dataclass
class Report:
    seconds: float
    sessions: int
    sent: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    delivered: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    delivered_after_refusal: list[str] = field(default_factory=list)
    virus_passed: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def ok(self) -> bool:
        return not (
            self.lost or self.duplicated or self.delivered_after_refusal or self.virus_passed
        )

    def summary(self) -> dict[str, object]:
        per_target: dict[str, dict[str, object]] = {}
        for name in sorted({f.target for f in self.faults}):
            mine = [f for f in self.faults if f.target == name]
            times = [f.recovered for f in mine if f.recovered is not None]
            per_target[name] = {
                "kills": sum(1 for f in mine if f.action == "kill"),
                "stops": sum(1 for f in mine if f.action == "stop"),
                "recovery_s_median": round(statistics.median(times), 2) if times else None,
                "recovery_s_max": round(max(times), 2) if times else None,
                "not_recovered": sum(1 for f in mine if f.recovered is None),
            }
        return {
            "seconds": round(self.seconds, 1),
            "sessions": self.sessions,
            "sent": dict(self.sent),
            "replies": dict(self.replies),
            "delivered": self.delivered,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "delivered_after_refusal": len(self.delivered_after_refusal),
            "virus_passed": len(self.virus_passed),
            "faults": per_target,
            "examples": {
                "lost": self.lost[:5],
                "duplicated": self.duplicated[:5],
                "delivered_after_refusal": self.delivered_after_refusal[:5],
            },
        }


def _signal(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class Soak:
    """The whole stack, the senders, the fault schedule and the accounting."""

    def __init__(
        self,
        workdir: Path,
        sessions: int = 4,
        seconds: float = 40.0,
        fault_every: float = 4.0,
        fault_seconds: float = 2.0,
        classifier: bool = False,
        pause: float = 0.0,
    ) -> None:
        self.workdir = make_reachable(Path(workdir))
        self.pause = pause  # seconds a session waits between messages (load on a shared box)
        self.sessions = sessions
        self.seconds = seconds
        self.fault_every = fault_every
        self.fault_seconds = fault_seconds
        self.classifier = classifier
        self._ids = itertools.count()
        self._sent: list[Sent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- the stack -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def stack(self) -> Iterator[tuple[PostfixServer, SmtpSink, list[Target]]]:
        base = self.workdir
        with contextlib.ExitStack() as stack:
            redis = stack.enter_context(RedisServer(base / "redis"))
            clamd = stack.enter_context(ClamdServer(base / "clamd", project_signature_dir()))
            rbl = stack.enter_context(
                RbldnsdServer(base / "rbldnsd", [(ZONE, "ip4set", ZEN)], log_queries=False)
            )
            sink = stack.enter_context(SmtpSink(base / "sink"))
            checks = ["allowlist", "antivirus", "attachments"]
            if self.classifier:
                checks.append("classifier")
            config = write_config(
                base / "filterd.toml",
                {
                    # info: the harness waits for the supervisor's "milter ready" line.
                    "daemon": {"state_dir": str(base / "state"), "log_level": "info"},
                    "redis": {"url": redis.url, "socket_timeout": 1.0},
                    "pipeline": {
                        "recipient_checks": ["allowlist", "dnsbl"],
                        "message_checks": checks,
                        "rcpt_budget_seconds": 3.0,
                        "message_budget_seconds": 6.0,
                    },
                    "antivirus": {"address": clamd.address, "timeout": 5.0},
                    "allowlist": {"site_files": []},
                    "dns": {"nameservers": rbl.nameserver, "query_timeout": 0.5},
                    "dnsbl": {
                        "skip_private": False,
                        "budget": 1.0,
                        "transaction_cache_seconds": 0,
                        "lists": [
                            {
                                "id": "ZEN",
                                "zone": ZONE,
                                "type": "ip",
                                "rules": [{"name": "SBL", "match": "127.0.0.2", "weight": 10}],
                            }
                        ],
                    },
                    "records": {"enabled": True},
                },
            )
            daemon = DaemonProcess(base / "daemon", config)
            daemon.start(timeout=60)
            stack.callback(daemon.stop)
            postfix = stack.enter_context(
                PostfixServer(
                    base / "postfix",
                    sink.port,
                    milter=daemon.milter_for_postfix,
                    milter_default_action="tempfail",
                )
            )

            def restart_daemon() -> None:
                daemon.stop(timeout=5)
                daemon.start(timeout=60)

            def restarter(server: RedisServer | ClamdServer | RbldnsdServer) -> Callable[[], None]:
                def restart() -> None:
                    server.stop()
                    server.start()

                return restart

            def pids_of(get: Callable[[], int | None]) -> Callable[[], list[int]]:
                return lambda: [p for p in [get()] if p is not None]

            def worker_pids() -> list[int]:
                """The supervisor's children: its workers (it replaces any that die)."""
                if daemon.proc is None:
                    return []
                pid = daemon.proc.pid
                try:
                    return [
                        int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                    ]
                except OSError:
                    return []

            targets = [
                Target("clamd", pids_of(lambda: clamd.pid), restarter(clamd)),
                Target("redis", pids_of(lambda: redis.pid), restarter(redis)),
                Target("dns", pids_of(lambda: rbl.pid), restarter(rbl)),
                Target(
                    "filterd",
                    pids_of(lambda: daemon.proc.pid if daemon.proc else None),
                    restart_daemon,
                ),
                Target("worker", worker_pids, lambda: None),
            ]
            yield postfix, sink, targets

    # -- senders and faults ----------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"soak{next(self._ids):07d}"

    def _record(self, sent: Sent) -> None:
        with self._lock:
            self._sent.append(sent)

    def _session(self, port: int, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            roll = rng.random()
            kind = "virus" if roll < 0.1 else "listed" if roll < 0.2 else "clean"
            self._record(send_one(port, self._next_id(), kind))
            if self.pause:
                self._stop.wait(self.pause)

    def _probe_until_accepted(self, port: int, limit: float) -> float | None:
        """Seconds until a clean probe is accepted again; None if not within ``limit``."""
        start = time.monotonic()
        while time.monotonic() - start < limit:
            sent = send_one(port, self._next_id(), "probe")
            self._record(sent)
            if sent.code == 250:
                return time.monotonic() - start
            time.sleep(0.1)
        return None

    def _faults(self, port: int, targets: list[Target], faults: list[Fault]) -> None:
        schedule = itertools.cycle([(t, a) for a in ("kill", "stop") for t in targets])
        while not self._stop.wait(self.fault_every):
            target, action = next(schedule)
            fault = Fault(target.name, action, time.monotonic())
            faults.append(fault)
            pids = list(target.pids())
            if action == "kill":
                _signal(pids, signal.SIGKILL)
                time.sleep(self.fault_seconds)
                target.restart()
            else:
                _signal(pids, signal.SIGSTOP)
                time.sleep(self.fault_seconds)
                _signal(pids, signal.SIGCONT)
            fault.ended = time.monotonic()
            fault.recovered = self._probe_until_accepted(port, 60.0)

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> Report:
        with self.stack() as (postfix, sink, targets):
            start = time.monotonic()
            faults: list[Fault] = []
            threads = [
                threading.Thread(target=self._session, args=(postfix.port, n), daemon=True)
                for n in range(self.sessions)
            ]
            faulter = threading.Thread(
                target=self._faults, args=(postfix.port, targets, faults), daemon=True
            )
            for thread in [*threads, faulter]:
                thread.start()
            time.sleep(self.seconds)
            self._stop.set()
            faulter.join(timeout=120)
            for thread in threads:
                thread.join(timeout=120)
            elapsed = time.monotonic() - start
            return self._account(sink, faults, elapsed)

    def _account(self, sink: SmtpSink, faults: list[Fault], elapsed: float) -> Report:
        report = Report(elapsed, self.sessions, faults=faults)
        accepted = {s.soak_id for s in self._sent if s.code == 250}
        # Postfix relays what it accepted to the sink (never faulted): wait for all of it.
        deadline = time.monotonic() + 60
        seen: Counter[str] = Counter()
        while True:
            seen = Counter(_soak_ids(sink))
            if accepted <= set(seen) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # anything delivered twice would arrive now
        seen = Counter(_soak_ids(sink))
        by_id = {s.soak_id: s for s in self._sent}
        for sent in self._sent:
            report.sent[sent.kind] += 1
            report.replies[str(sent.code)[:1] + "xx" if sent.code else "none"] += 1
        report.delivered = sum(seen.values())
        report.lost = sorted(accepted - set(seen))
        report.duplicated = sorted(i for i, n in seen.items() if n > 1)
        report.delivered_after_refusal = sorted(
            i for i in seen if i in by_id and by_id[i].code >= 400
        )
        report.virus_passed = sorted(i for i in seen if i in by_id and by_id[i].kind == "virus")
        return report


def _soak_ids(sink: SmtpSink) -> Iterator[str]:
    for delivery in sink.deliveries():
        for line in delivery.data.split(b"\n"):
            if not line:
                break  # end of headers
            if line.startswith(b"X-Soak-Id: "):
                yield line[len(b"X-Soak-Id: ") :].strip().decode()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fault-every", type=float, default=6.0, help="seconds between faults")
    parser.add_argument("--fault-seconds", type=float, default=2.0, help="how long each lasts")
    parser.add_argument("--classifier", action="store_true", help="also run the classifier")
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds between a session's mails"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="filterd-soak-"))
    soak = Soak(
        workdir,
        sessions=args.sessions,
        seconds=args.minutes * 60,
        fault_every=args.fault_every,
        fault_seconds=args.fault_seconds,
        classifier=args.classifier,
        pause=args.pause,
    )
    report = soak.run()
    print(json.dumps(report.summary(), indent=2))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
