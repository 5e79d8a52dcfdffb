"""Pipeline ordering, failure handling and budgets, with plain fake checks."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from filterd.pipeline import Pipeline
from filterd.settings import Settings, load_settings
from filterd.types import Action, Effect, Envelope, Finding, Message, SmtpReply

ENV = Envelope(client_ip="192.0.2.1", mail_from="a@example.net", recipients=("u@example.org",))


@dataclass
class FakeCheck:
    name: str
    bypassable: bool = True
    on_failure: str = "tempfail"
    gate: bool = False
    findings: Sequence[Finding] = ()
    delay: float = 0.0
    error: Exception | None = None
    calls: list[str] = field(default_factory=list)

    def _go(self, label: str) -> Sequence[Finding]:
        self.calls.append(label)
        if self.delay:
            time.sleep(self.delay)
        if self.error:
            raise self.error
        return self.findings

    def check_recipient(self, envelope: Envelope, recipient: str) -> Sequence[Finding]:
        return self._go(recipient)

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        return self._go(f"msg exempt={exempt}")

    def close(self) -> None:
        pass

    def selftest(self) -> list[str]:
        return []


def settings(tmp_path: Path, rcpt: list[str], msg: list[str], budget: float = 2.0) -> Settings:
    # Real check names are required by the loader; the fakes stand in for them.
    path = tmp_path / "f.toml"
    path.write_text(
        "[pipeline]\nrecipient_checks = []\nmessage_checks = []\n"
        f"rcpt_budget_seconds = {budget}\nmessage_budget_seconds = {budget}\n"
    )
    s = load_settings(path, env={})
    pipeline_cfg = s.pipeline.model_copy(update={"recipient_checks": rcpt, "message_checks": msg})
    return Settings(source=s.source, sections={**s.sections, "pipeline": pipeline_cfg})


def make(tmp_path: Path, rcpt: list[FakeCheck], msg: list[FakeCheck], budget: float = 2.0):
    checks = {c.name: c for c in rcpt + msg}
    s = settings(tmp_path, [c.name for c in rcpt], [c.name for c in msg], budget)
    return Pipeline(s, checks)  # type: ignore[arg-type]


EXEMPT = Finding("allow", "ALLOWLIST_MATCH", effect=Effect.EXEMPT, bypassable=False)


def test_allowlist_match_skips_later_bypassable_recipient_checks(tmp_path: Path) -> None:
    allow = FakeCheck("allow", bypassable=False, findings=[EXEMPT])
    dnsbl = FakeCheck("dnsbl", findings=[Finding("dnsbl", "DNSBL_X", score=50)])
    p = make(tmp_path, [allow, dnsbl], [])
    d = p.judge_recipient(ENV, "u@example.org", None)
    assert d.action is Action.ACCEPT and d.exempt
    assert dnsbl.calls == []


def test_recipient_refused_by_listing(tmp_path: Path) -> None:
    dnsbl = FakeCheck(
        "dnsbl",
        findings=[Finding("dnsbl", "DNSBL_X", score=50, reply=SmtpReply(554, "5.7.1", "listed"))],
    )
    p = make(tmp_path, [FakeCheck("allow", bypassable=False), dnsbl], [])
    d = p.judge_recipient(ENV, "u@example.org", None)
    assert d.action is Action.REJECT and str(d.reply) == "554 5.7.1 listed"


def test_exception_becomes_fail_finding_per_on_failure(tmp_path: Path) -> None:
    closed = FakeCheck("av", bypassable=False, error=ConnectionRefusedError("clamd down"))
    opened = FakeCheck("uri", on_failure="accept", error=OSError("dns down"))
    p = make(tmp_path, [], [opened, closed])
    d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [])
    assert d.action is Action.TEMPFAIL and d.reason_code == "AV_FAIL"
    codes = {f.code: f.effect for f in d.findings}
    assert codes == {"AV_FAIL": Effect.TEMPFAIL, "URI_FAIL": Effect.SCORE}


def test_slow_check_times_out_within_budget(tmp_path: Path) -> None:
    slow = FakeCheck("slow", delay=3.0)
    fast = FakeCheck("fast")
    p = make(tmp_path, [], [fast, slow], budget=0.5)
    start = time.monotonic()
    d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [])
    assert time.monotonic() - start < 2.0
    assert d.action is Action.TEMPFAIL and d.reason_code == "SLOW_FAIL"


def test_message_checks_run_concurrently(tmp_path: Path) -> None:
    barrier = threading.Barrier(2, timeout=2)

    class Meet(FakeCheck):
        def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
            barrier.wait()  # only passes if both run at the same time
            return ()

    p = make(tmp_path, [], [Meet("a"), Meet("b")])
    assert p.judge_message(Message.from_bytes(b"\r\nx", ENV), []).action is Action.ACCEPT


def test_exempt_transaction_skips_bypassable_message_checks(tmp_path: Path) -> None:
    gate = FakeCheck("gate", bypassable=False, gate=True)
    classifier = FakeCheck(
        "cls", findings=[Finding("cls", "CLASSIFIER_SPAM", effect=Effect.REJECT)]
    )
    av = FakeCheck("av", bypassable=False)
    p = make(tmp_path, [], [gate, av, classifier])
    d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [EXEMPT])
    assert d.action is Action.ACCEPT
    assert classifier.calls == [] and av.calls == ["msg exempt=True"]
    assert gate.calls == ["msg exempt=True"]


def test_gate_unexempt_brings_bypassable_checks_back(tmp_path: Path) -> None:
    gate = FakeCheck(
        "gate",
        bypassable=False,
        gate=True,
        findings=[
            Finding("gate", "ALLOWLIST_UNVERIFIED", effect=Effect.UNEXEMPT, bypassable=False)
        ],
    )
    classifier = FakeCheck(
        "cls", findings=[Finding("cls", "CLASSIFIER_SPAM", effect=Effect.REJECT)]
    )
    p = make(tmp_path, [], [gate, classifier])
    d = p.judge_message(Message.from_bytes(b"\r\nx", ENV), [EXEMPT])
    assert d.action is Action.REJECT and classifier.calls == ["msg exempt=False"]


@pytest.mark.parametrize("raw", [b"", b"\x00\x00garbage", b"Subject: \xff\xfe\r\n\r\n\x00body"])
def test_odd_bytes_make_a_message(raw: bytes) -> None:
    m = Message.from_bytes(raw, ENV)
    assert m.raw == raw
    m.header("Subject")  # must not raise


def test_provisional_exemption_still_runs_the_blocklists(tmp_path: Path) -> None:
    provisional = Finding(
        "allow", "ALLOWLIST_MATCH", effect=Effect.EXEMPT, bypassable=False, provisional=True
    )
    allow = FakeCheck("allow", bypassable=False, findings=[provisional])
    dnsbl = FakeCheck("dnsbl", findings=[Finding("dnsbl", "DNSBL_X", score=50)])
    p = make(tmp_path, [allow, dnsbl], [])
    d = p.judge_recipient(ENV, "u@example.org", None)
    assert d.action is Action.ACCEPT and d.policy_class == "provisional"
    assert dnsbl.calls == ["u@example.org"]
    assert any(f.code == "DNSBL_X" for f in d.findings)
