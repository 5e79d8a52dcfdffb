"""CPU per DNS-list lookup batch, old resolver vs new, in one run against a real rbldnsd.

Why: the bench runs with the DNS caches off (every message pays its lookups, as
mail from new senders does), so what each lookup costs in CPU is what the DNS
lists cost per message. Wall time here is mostly rbldnsd's round trip and says
nothing about that; this thread's CPU time (``time.thread_time``) does.

The baseline's ``filterd/dns/resolver.py`` and ``engine.py`` are loaded from git
(``--baseline``, by default the commit before issue 12's DNS work) next to the
working tree's, and the two alternate round by round over the same batches:

- ``resolver, 3 names``: the RCPT shape (client IP on ZEN, HELO and sender on
  DBL), every answer NXDOMAIN, as for ordinary mail;
- ``resolver, 10 names``: a URIBL-shaped batch of link domains;
- ``dnsbl check_recipient``: the whole RCPT-time check (shipped list rules,
  cache and transaction memo off);
- ``uribl check_message``: the whole end-of-message check on the reference
  ~10 KB ham (its analysis done beforehand: it is shared with other checks) and
  on a message with 20 link domains.

rbldnsd's own CPU per query (utime+stime from /proc, in 10 ms ticks, summed
over the rounds) is printed per scenario and side too. Loopback only; bounded in count.
Run: .venv/bin/python bench/dns_bench.py [-n 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.servers
sys.path.insert(0, str(ROOT / "bench"))

from messages import ham_10k  # noqa: E402
from stack import DBL_DATA, ZEN_DATA  # noqa: E402
from stages import _message, crlf  # noqa: E402

import filterd.dns.engine as new_engine  # noqa: E402
import filterd.dns.resolver as new_resolver  # noqa: E402
from filterd.checks import dnsbl, uribl  # noqa: E402
from filterd.mail.analysis import analysis_of  # noqa: E402
from filterd.types import Envelope, Message  # noqa: E402
from tests.servers import RbldnsdServer  # noqa: E402

DEFAULT_BASELINE = "bae050f"  # the branch point of issue 12's DNS work


def _module_from_git(rev: str, path: str, name: str) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # our own code, from git
    return module


def load_baseline(rev: str) -> tuple[ModuleType, ModuleType]:
    """The baseline's resolver and engine; its engine imports the baseline's resolver."""
    resolver = _module_from_git(rev, "filterd/dns/resolver.py", "baseline_dns_resolver")
    current = sys.modules["filterd.dns.resolver"]
    sys.modules["filterd.dns.resolver"] = resolver
    try:
        engine = _module_from_git(rev, "filterd/dns/engine.py", "baseline_dns_engine")
    finally:
        sys.modules["filterd.dns.resolver"] = current
    return resolver, engine


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class Side:
    """One implementation (old or new): its checks and resolver, built from the same config."""

    def __init__(
        self, label: str, resolver_mod: ModuleType, engine_mod: ModuleType, rbl: RbldnsdServer
    ) -> None:
        self.label = label
        rules = tomllib.loads((ROOT / "rules" / "filterd.toml").read_text())
        off = {"nameservers": rbl.nameserver, "cache_max_ttl": 0.0, "cache_negative_ttl": 0.0}
        dcfg = dnsbl.Config.model_validate(
            {**rules["dnsbl"], **off, "transaction_cache_seconds": 0.0, "skip_private": False}
        )
        ucfg = uribl.Config.model_validate({**rules["uribl"], **off})
        servers = [("127.0.0.1", rbl.port)]
        self.resolver = resolver_mod.DnsblResolver(servers, cache_max_ttl=0, cache_negative_ttl=0)
        self.dnsbl = dnsbl.DnsblCheck(
            dcfg, engine_mod.Engine(dcfg, "dnsbl", "DNSBL", resolver=self.resolver)
        )
        self.uribl = uribl.UriblCheck(
            ucfg, engine_mod.Engine(ucfg, "uribl", "URIBL", resolver=self.resolver)
        )
        self.cpu: dict[str, list[float]] = {}
        self.rbl_ticks: dict[str, int] = {}
        self.rbl_queries: dict[str, int] = {}

    def close(self) -> None:
        self.resolver.close()


def _scenarios(n: int) -> dict[str, tuple[int, Callable[[Side, int], Any]]]:
    """name -> (queries per call as planned, call(side, i)); main counts the real ones."""
    envelope = Envelope(
        client_ip="198.51.100.7", helo="mail.example.net", mail_from="alice@example.net"
    )
    ham = _message(crlf(ham_10k().data), parsed=True)
    links = "\n".join(f"http://www.site{i}.example/page" for i in range(20))
    twenty = Message.from_bytes(f"From: a@f.example\r\n\r\n{links}\r\n".encode())
    for message in (ham, twenty):
        analysis_of(message).link_domains(set())  # shared with other checks: not ours to time
    ham_names = len(_side_probe_subjects(ham))

    def three(side: Side, i: int) -> Any:
        j = i % 250
        queries = [
            ("zen.spamhaus.org", f"{j}.{i // 250 % 250}.51.198.zen.spamhaus.org"),
            ("dbl.spamhaus.org", f"h{i}.example.dbl.spamhaus.org"),
            ("dbl.spamhaus.org", f"s{i}.example.dbl.spamhaus.org"),
        ]
        return side.resolver.start_many(queries).collect(time.monotonic() + 2)

    def ten(side: Side, i: int) -> Any:
        queries = [("dbl.spamhaus.org", f"l{i}d{k}.example.dbl.spamhaus.org") for k in range(10)]
        return side.resolver.start_many(queries).collect(time.monotonic() + 2)

    return {
        "resolver, 3 names (RCPT shape)": (3, three),
        "resolver, 10 names (URIBL shape)": (10, ten),
        "dnsbl check_recipient (IP, HELO, sender)": (
            3,
            lambda s, i: s.dnsbl.check_recipient(envelope, "b@x.org"),
        ),
        f"uribl check_message, ham-10k ({ham_names} names)": (
            ham_names,
            lambda s, i: s.uribl.check_message(ham, False),
        ),
        "uribl check_message, 20 links + From": (
            21,
            lambda s, i: s.uribl.check_message(twenty, False),
        ),
    }


def _side_probe_subjects(message: Message) -> list[Any]:
    cfg = uribl.Config.model_validate(
        tomllib.loads((ROOT / "rules" / "filterd.toml").read_text())["uribl"]
    )
    check = uribl.UriblCheck(cfg)
    try:
        return check.subjects(message)
    finally:
        check.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000, help="calls per scenario, side and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare")
    args = parser.parse_args()
    old_resolver, old_engine = load_baseline(args.baseline)
    zones = [("zen.spamhaus.org", "ip4set", ZEN_DATA), ("dbl.spamhaus.org", "dnset", DBL_DATA)]
    with (
        tempfile.TemporaryDirectory() as tmp,
        RbldnsdServer(Path(tmp), zones, ttl=300, log_queries=False) as rbl,
    ):
        assert rbl.pid is not None
        sides = [
            Side(f"old ({args.baseline})", old_resolver, old_engine, rbl),
            Side("new (working tree)", new_resolver, new_engine, rbl),
        ]
        scenarios = _scenarios(args.n)
        for side in sides:  # warm-up: imports, first sockets, lazy objects
            for _per, call in scenarios.values():
                for i in range(50):
                    call(side, i)
        for name, (_per, call) in scenarios.items():  # the queries one call really sends
            before = sides[1].resolver.stats().get("queries", 0)
            call(sides[1], 0)
            scenarios[name] = (sides[1].resolver.stats()["queries"] - before, call)
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                for name, (per, call) in scenarios.items():
                    ticks = _cpu_ticks(rbl.pid)
                    start = time.thread_time()
                    for i in range(args.n):
                        call(side, r * args.n + i)
                    cpu = time.thread_time() - start
                    side.rbl_ticks[name] = side.rbl_ticks.get(name, 0) + _cpu_ticks(rbl.pid) - ticks
                    side.rbl_queries[name] = side.rbl_queries.get(name, 0) + per * args.n
                    side.cpu.setdefault(name, []).append(cpu / args.n)
        old, new = sides
        tick = 1e6 / os.sysconf("SC_CLK_TCK")
        print(f"{args.rounds} rounds x {args.n} calls per scenario and side, alternated")
        print(
            f"daemon CPU (this thread) per call; rbldnsd CPU per query ({tick / 1000:.0f} ms ticks)"
        )
        print(
            f"{'scenario':<44} {'old us':>8} {'new us':>8} {'new/old':>8}"
            f" {'rbldnsd old':>12} {'new':>6}"
        )
        for name, (per, _call) in scenarios.items():
            o = statistics.median(old.cpu[name]) * 1e6
            w = statistics.median(new.cpu[name]) * 1e6
            r_old, r_new = (
                side.rbl_ticks[name] * tick / max(1, side.rbl_queries[name]) for side in sides
            )
            print(
                f"{name:<44} {o:8.1f} {w:8.1f} {w / o:8.2f} {r_old:12.1f} {r_new:6.1f}"
                f"   ({per} lookups/call)"
            )
        for side in sides:
            side.close()


if __name__ == "__main__":
    main()
