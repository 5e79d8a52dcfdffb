"""CPU-bound checks run on the connection's thread while I/O checks wait in the pool."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filterd.types import Envelope, Finding, Message
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
