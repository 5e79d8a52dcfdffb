"""Findings carry evidence; the policy alone turns it into outcomes and replies."""

from __future__ import annotations

import pytest

from filterd import policy
from filterd.settings import MilterConfig, PolicyConfig
from filterd.types import Action, Effect, Envelope, Finding, Message, Thresholds

CFG = PolicyConfig(reject_score=10, tag_score=5)
MSG = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n", Envelope(recipients=("u@example.org",)))
CUT = Thresholds(reject=0.9, tag=0.4, tag_points=6.0)


def decide(*findings: Finding):
    return policy.decide_message(MSG, list(findings), CFG, MilterConfig())


@pytest.mark.parametrize(
    ("p", "action", "code", "flagged"),
    [
        (0.95, Action.REJECT, "CLASSIFIER_SPAM", False),
        (0.5, Action.ACCEPT, "CLASSIFIER_SUSPECT", True),
        (0.1, Action.ACCEPT, "OK", False),
    ],
)
def test_probability_and_thresholds_become_the_verdict(
    p: float, action: Action, code: str, flagged: bool
) -> None:
    evidence = Finding("classifier", "CLASSIFIER", spam_probability=p, thresholds=CUT)
    d = decide(evidence)
    assert (d.action, d.reason_code) == (action, code)
    assert (("X-Spam-Flag", "YES") in d.add_headers) is flagged
    assert d.spam_score == p
    [resolved] = d.findings
    assert resolved.code.startswith("CLASSIFIER_")
    if action is Action.REJECT:
        assert d.reply == policy.SPAM_REPLY


def test_failure_reply_is_worded_by_the_policy() -> None:
    down = Finding("antivirus", "ANTIVIRUS_FAIL", effect=Effect.TEMPFAIL, unchecked=True)
    d = decide(down)
    assert d.action is Action.TEMPFAIL
    assert str(d.reply) == "451 4.7.1 Temporary failure (antivirus); try again later"


def test_unchecked_is_a_field_not_a_code_suffix() -> None:
    odd_name = Finding("uribl", "URIBL_SOMETHING", unchecked=True)
    named_fail = Finding("dnsbl", "DNSBL_FAIL")
    d = decide(odd_name, named_fail)
    assert ("X-Filterd-Unchecked", "uribl") in d.add_headers


@pytest.mark.parametrize(
    ("scope", "action", "effect", "reply"),
    [
        ("scan", "reject", Effect.REJECT, "552 5.3.4 Message too big to be scanned for viruses"),
        ("scan", "accept_with_header", Effect.SCORE, "None"),
        (
            "message",
            "tempfail",
            Effect.TEMPFAIL,
            "452 4.3.1 Message too big to filter now; try again later",
        ),
    ],
)
def test_one_oversize_table(scope: str, action: str, effect: Effect, reply: str) -> None:
    got_effect, got_reply = policy.oversize(scope, action)  # type: ignore[arg-type]
    assert (got_effect, str(got_reply)) == (effect, reply)
