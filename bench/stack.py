"""The bench's private mail stack: Redis, clamd, rbldnsd, smtp-sink, Postfix, filterd.

Why a module of its own: the benchmark must measure what an operator runs,
so it starts the real programs with the project's launchers
(``tests.servers``) and the real daemon as ``tests/helpers_daemon.py``
does, and only adds what a bench needs on top: a sink that does not write
every message to disk, a daemon on a TCP socket as well as a unix one, the
daemon's peak RSS, and one Postfix instance per configuration so the same
load can alternate between them without reconfiguring anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers_daemon import DaemonProcess  # noqa: E402
from tests.servers import (  # noqa: E402
    ClamdServer,
    PostfixServer,
    RbldnsdServer,
    RedisServer,
    SmtpSink,
    free_port,
    project_signature_dir,
    write_config,
)

# Zones shaped like Spamhaus ZEN (IP) and DBL (domains); the shipped list
# definitions in rules/filterd.toml are used unchanged, only the nameserver
# points at this rbldnsd. Nothing the bench sends is listed except on purpose.
ZEN_DATA = """\
:127.0.0.2:Listed by SBL (bench)
127.0.0.2
192.0.2.0/26
:127.0.0.4:Listed by XBL (bench)
192.0.2.64/26
:127.0.0.10:Listed by PBL (bench)
192.0.2.128/25
"""
DBL_DATA = """\
:127.0.1.2:Listed by DBL (bench)
dbltest.com
spam-sender.example
"""


class QuietSink(SmtpSink):
    """smtp-sink without ``-d``: a bench delivers GBs that no one needs to read back."""

    def _command(self) -> list[str]:
        cmd = super()._command()
        i = cmd.index("-d")
        return cmd[:i] + cmd[i + 2 :]


class BenchDaemon(DaemonProcess):
    """The real daemon on a unix socket (helpers_daemon's default) or on loopback TCP.

    ``reply_events`` (e.g. "header,body") runs it through bench/milter_variants.py,
    which makes Postfix wait for a reply to those events: a proposal measured
    on the real daemon without editing filterd/.
    """

    def __init__(
        self,
        workdir: Path,
        config: Path,
        kind: str,
        reply_events: str = "",
        nodelay: bool = False,
        extra_env: dict[str, str] | None = None,
        noop: bool = False,
    ) -> None:
        self.kind = kind
        self.noop = noop
        self.port = free_port() if kind == "inet" else 0
        env = {}
        if reply_events:
            env["BENCH_MILTER_REPLY"] = reply_events
        if nodelay and kind == "inet":
            env["BENCH_MILTER_NODELAY_PORT"] = str(self.port)
        extra_env = extra_env or {}
        env.update(extra_env)
        # Anything but FILTERD_* settings overrides needs the variant entry point.
        self.variant = bool(reply_events) or (nodelay and kind == "inet")
        self.variant |= any(not k.startswith("FILTERD_") for k in extra_env)
        super().__init__(workdir, config, env, tcp_port=self.port or None)

    def command(self) -> list[str]:
        if self.noop:
            noop = Path(__file__).with_name("noop_milter.py")
            return [sys.executable, str(noop), self.milter_socket]
        if not self.variant:
            return super().command()
        variant = Path(__file__).with_name("milter_variants.py")
        return [sys.executable, str(variant), "serve", "--config", str(self.config)]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def processes(self) -> list[int]:
        """The supervisor and its workers (filterd forks; the bench's servers are not ours)."""
        import load

        return [self.pid, *load.descendants(self.pid)]

    def rss_kb(self) -> tuple[int, int]:
        """(current VmRSS, peak VmHWM) in KiB, summed over the supervisor and its workers.

        Pages the workers share with the supervisor (imports, forked before) count once
        per process here, so the sum is an upper bound of what the daemon occupies.
        """
        rss = hwm = 0
        for pid in self.processes():
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                key, _, value = line.partition(":")
                if key == "VmRSS":
                    rss += int(value.split()[0])
                elif key == "VmHWM":
                    hwm += int(value.split()[0])
        return rss, hwm

    def pss_kb(self) -> int:
        """Proportional set size summed over the processes: shared pages counted once."""
        total = 0
        for pid in self.processes():
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        return total

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux clear_refs 5); False if not allowed."""
        try:
            for pid in self.processes():
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def judged_since(self, offset: int) -> list[dict[str, Any]]:
        """The daemon's "message judged" lines written after byte ``offset``."""
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
        out = []
        for line in data.splitlines():
            if b'"message judged"' not in line:
                continue
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def model_available() -> bool:
    """A promoted classifier model exists (models/ACTIVE names a directory)."""
    active = ROOT / "models" / "ACTIVE"
    return active.is_file() and (ROOT / "models" / active.read_text().strip()).is_dir()


def daemon_settings(
    state: Path, redis_url: str, clamd: str, nameserver: str, classifier: bool, dns_cache: bool
) -> dict[str, dict[str, Any]]:
    """The shipped rules/filterd.toml with every check on, pointed at the bench's servers."""
    data: dict[str, dict[str, Any]] = tomllib.loads((ROOT / "rules" / "filterd.toml").read_text())
    data["daemon"].update(state_dir=str(state), log_level="info")
    data["redis"]["url"] = redis_url
    data["antivirus"]["address"] = clamd
    message_checks = ["antivirus", "attachments", "uribl"] + (["classifier"] if classifier else [])
    data["pipeline"].update(recipient_checks=["allowlist", "dnsbl"], message_checks=message_checks)
    data["records"]["enabled"] = True
    data["dns"]["nameservers"] = nameserver
    if not dns_cache:
        # Every message pays its lookups, as mail from ever new senders does.
        data["dns"].update(cache_max_ttl=0.0, cache_negative_ttl=0.0)
    if not dns_cache:
        data["dnsbl"]["transaction_cache_seconds"] = 0.0
    # The load comes from 127.0.0.1; look it up anyway so the IP list costs what it costs.
    data["dnsbl"]["skip_private"] = False
    return data


@dataclass(frozen=True)
class Target:
    """One way of receiving mail: a Postfix instance, with or without a filterd milter.

    ``daemon`` names a DaemonSpec (None: no milter, the ceiling); ``postfix``
    adds main.cf settings for this instance only (e.g. milter_protocol = 2).
    """

    name: str
    daemon: str | None = None
    postfix: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DaemonSpec:
    name: str
    kind: str  # "unix" | "inet"
    reply_events: str = ""  # see BenchDaemon
    nodelay: bool = False  # TCP_NODELAY on the listener (bench/milter_variants.py)
    #: FILTERD_* settings overrides, or BENCH_* switches of bench/milter_variants.py
    env: tuple[tuple[str, str], ...] = ()
    #: a do-nothing pymilter milter (bench/noop_milter.py) instead of filterd
    noop: bool = False


@dataclass
class Stack:
    base: Path
    redis: RedisServer
    clamd: ClamdServer
    rbldnsd: RbldnsdServer
    sink: QuietSink
    postfix: dict[str, PostfixServer] = field(default_factory=dict)
    daemons: dict[str, BenchDaemon] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)
    config: dict[str, dict[str, Any]] = field(default_factory=dict)

    def daemon_of(self, target: str) -> BenchDaemon | None:
        name = self.targets[target].daemon
        return None if name is None else self.daemons[name]


POSTFIX_EXTRA = {
    # The load is the point: no per-client limits between the bench and Postfix.
    "smtpd_client_connection_count_limit": "0",
    "smtpd_client_connection_rate_limit": "0",
    "default_process_limit": "200",
}


@contextlib.contextmanager
def running_stack(
    base: Path,
    daemons: list[DaemonSpec],
    targets: list[Target],
    classifier: bool,
    dns_cache: bool = False,
) -> Iterator[Stack]:
    """Every server of the bench, started in dependency order and stopped in reverse."""
    with contextlib.ExitStack() as es:
        redis = es.enter_context(RedisServer(base / "redis", unix_socket=True))
        clamd = es.enter_context(
            ClamdServer(base / "clamd", project_signature_dir(), unix_socket=True)
        )
        rbl = es.enter_context(
            RbldnsdServer(
                base / "rbldnsd",
                [("zen.spamhaus.org", "ip4set", ZEN_DATA), ("dbl.spamhaus.org", "dnset", DBL_DATA)],
                ttl=300,
                log_queries=False,
            )
        )
        sink = es.enter_context(QuietSink(base / "sink"))
        stack = Stack(base, redis, clamd, rbl, sink)
        stack.config = daemon_settings(
            base / "state", redis.url, clamd.address, rbl.nameserver, classifier, dns_cache
        )
        cfg = write_config(base / "filterd.toml", stack.config)
        for spec in daemons:
            daemon = BenchDaemon(
                base / f"daemon-{_dirname(spec.name)}",
                cfg,
                spec.kind,
                spec.reply_events,
                spec.nodelay,
                dict(spec.env),
                spec.noop,
            )
            es.callback(daemon.stop)
            daemon.start(timeout=60)
            stack.daemons[spec.name] = daemon
        for target in targets:
            milter = None if target.daemon is None else stack.daemons[target.daemon]
            server = PostfixServer(
                base / f"pf-{_dirname(target.name)}",
                sink.port,
                milter=None if milter is None else milter.milter_for_postfix,
                milter_default_action="reject",
                extra_main_cf={**POSTFIX_EXTRA, **dict(target.postfix)},
            )
            stack.postfix[target.name] = es.enter_context(server)
            stack.targets[target.name] = target
        yield stack


def _dirname(name: str) -> str:
    """A variant's name as a directory name (Postfix paths must not hold spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def queue_size(postfix: PostfixServer) -> int:
    """Messages still in this instance's queue (not yet relayed to the sink)."""
    total = 0
    for name in ("maildrop", "incoming", "active", "deferred", "hold"):
        for _dirpath, _dirs, files in os.walk(postfix.queue_dir / name):
            total += len(files)
    return total


def wait_queue_empty(postfix: PostfixServer, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if queue_size(postfix) == 0:
            return True
        time.sleep(0.05)
    return False
