"""CPU-bound checks run on the connection's thread; I/O is started before them and collected
after (or waits in the pool when it cannot start without blocking)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filterd.types import Effect, Envelope, Finding, Message, SmtpReply
from tests.test_pipeline import FakeCheck, make

ENV = Envelope(client_ip="192.0.2.1", mail_from="s@example.net", recipients=("u@example.org",))


@dataclass
class ThreadCheck(FakeCheck):
    """Records the thread it ran on; an I/O check waits until the CPU check has started."""

    cpu_bound: bool = False
    started: threading.Event = field(default_factory=threading.Event)
    wait_for: threading.Event | None = None
    threads: list[str] = field(default_factory=list)

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        self.threads.append(threading.current_thread().name)
        self.started.set()
        if self.wait_for is not None:
            assert self.wait_for.wait(2), "the CPU-bound check never started"
        return [Finding(self.name, f"{self.name.upper()}_SEEN")]


def test_cpu_check_inline_io_checks_in_pool_findings_in_order(tmp_path: Path) -> None:
    walk = ThreadCheck("walk", cpu_bound=True)
    clamd = ThreadCheck("clamd", wait_for=walk.started)
    dns = ThreadCheck("dns")
    p = make(tmp_path, [], [clamd, walk, dns])
    try:
        d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [])
    finally:
        p.close()
    assert walk.threads == [threading.current_thread().name]
    assert clamd.threads[0].startswith("check") and dns.threads[0].startswith("check")
    # Configured order, whatever ran where: the policy's first refusal depends on it.
    assert [f.code for f in d.findings] == ["CLAMD_SEEN", "WALK_SEEN", "DNS_SEEN"]


@dataclass
class Handle:
    """What a started check hands back: collected on the connection's thread, or closed."""

    check: StartCheck
    collected_on: list[str] = field(default_factory=list)
    closed: bool = False

    def collect(self, deadline: float) -> Sequence[Finding]:
        self.collected_on.append(threading.current_thread().name)
        self.check.events.append(f"collect {self.check.name}")
        if self.check.collect_error is not None:
            raise self.check.collect_error
        return [Finding(self.check.name, f"{self.check.name.upper()}_SEEN")]

    def close(self) -> None:
        self.closed = True


@dataclass
class StartCheck(FakeCheck):
    """A check that starts its I/O without blocking (like clamd and the DNS lists)."""

    events: list[str] = field(default_factory=list)
    can_start: bool = True
    start_error: Exception | None = None
    collect_error: Exception | None = None
    handles: list[Handle] = field(default_factory=list)

    def start_message(self, message: Message, exempt: bool) -> Handle | None:
        self.events.append(f"start {self.name}")
        if self.start_error is not None:
            raise self.start_error
        if not self.can_start:
            return None
        self.handles.append(Handle(self))
        return self.handles[-1]

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        self.events.append(f"pool {self.name} {threading.current_thread().name}")
        return [Finding(self.name, f"{self.name.upper()}_POOLED")]


@dataclass
class CpuCheck(FakeCheck):
    cpu_bound: bool = True
    events: list[str] = field(default_factory=list)

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        self.events.append(f"cpu {self.name}")
        return self.findings


def test_io_is_started_before_the_cpu_checks_and_collected_after_on_one_thread(
    tmp_path: Path,
) -> None:
    events: list[str] = []
    clamd = StartCheck("clamd", events=events)
    walk = CpuCheck("walk", events=events, findings=[Finding("walk", "WALK_SEEN")])
    dns = StartCheck("dns", events=events)
    p = make(tmp_path, [], [clamd, walk, dns])
    try:
        d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [])
    finally:
        p.close()
    assert events == ["start clamd", "start dns", "cpu walk", "collect clamd", "collect dns"]
    me = threading.current_thread().name
    assert clamd.handles[0].collected_on == [me] and dns.handles[0].collected_on == [me]
    assert [f.code for f in d.findings] == ["CLAMD_SEEN", "WALK_SEEN", "DNS_SEEN"]
    assert set(d.timings) >= {"clamd", "walk", "dns"}


def test_a_check_that_cannot_start_goes_to_the_pool_and_failures_are_evidence(
    tmp_path: Path,
) -> None:
    big = StartCheck("big", can_start=False)
    broken = StartCheck("broken", start_error=ConnectionRefusedError("clamd gone"))
    slow = StartCheck("slow", collect_error=TimeoutError())
    p = make(tmp_path, [], [big, broken, slow])
    try:
        d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [])
    finally:
        p.close()
    assert big.events[0] == "start big" and big.events[1].startswith("pool big check")
    codes = [f.code for f in d.findings]
    assert codes == ["BIG_POOLED", "BROKEN_FAIL", "SLOW_FAIL"]
    fails = {f.code: f for f in d.findings}
    assert "clamd gone" in fails["BROKEN_FAIL"].detail
    assert fails["SLOW_FAIL"].detail == "timed out"
    # on_failure = tempfail (the fakes' default): nothing passes unchecked.
    assert d.action.value == "tempfail"


def test_a_refusal_by_a_cpu_check_abandons_the_started_io(tmp_path: Path) -> None:
    virus = Finding("walk", "BANNED", effect=Effect.REJECT, bypassable=False,
                    reply=SmtpReply(554, "5.7.1", "banned"))  # fmt: skip
    dns = StartCheck("dns")
    walk = CpuCheck("walk", findings=[virus])
    p = make(tmp_path, [], [dns, walk])
    try:
        d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [])
    finally:
        p.close()
    assert d.action.value == "reject"
    assert dns.handles[0].closed and dns.handles[0].collected_on == []


def test_inline_off_runs_everything_in_the_pool(tmp_path: Path) -> None:
    dns = StartCheck("dns")
    p = make(tmp_path, [], [dns])
    p._inline_cpu = False
    try:
        d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [])
    finally:
        p.close()
    assert [f.code for f in d.findings] == ["DNS_POOLED"] and dns.handles == []


def test_one_pooled_check_raising_timeouterror_is_its_failure_not_the_budget(
    tmp_path: Path,
) -> None:
    redis = FakeCheck("redis", error=TimeoutError("Timeout reading from socket"))
    p = make(tmp_path, [redis], [], budget=5.0)
    try:
        start = time.monotonic()
        findings = p.recipient_findings(ENV, "u@example.org")
        assert time.monotonic() - start < 2.0
    finally:
        p.close()
    assert [f.code for f in findings] == ["REDIS_FAIL"]
    assert "Timeout reading from socket" in findings[0].detail


def test_one_pooled_slow_check_times_out_at_the_budget(tmp_path: Path) -> None:
    slow = FakeCheck("slow", delay=3.0)
    p = make(tmp_path, [slow], [], budget=0.3)
    try:
        start = time.monotonic()
        findings = p.recipient_findings(ENV, "u@example.org")
        assert time.monotonic() - start < 1.5
    finally:
        p.close()
    assert [(f.code, f.detail) for f in findings] == [("SLOW_FAIL", "timed out")]
