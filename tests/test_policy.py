"""The policy's precedence rules, one rule per test."""

from __future__ import annotations

import pytest

from filterd import policy
from filterd.settings import MilterConfig, PolicyConfig
from filterd.types import Action, Effect, Finding, Message, SmtpReply

CFG = PolicyConfig(reject_score=10.0, tag_score=5.0)
MILTER = MilterConfig()
MSG = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n")
VIRUS = Finding(
    "antivirus",
    "CLAMAV_VIRUS",
    effect=Effect.REJECT,
    bypassable=False,
    reply=SmtpReply(554, "5.7.1", "virus found: Test"),
)
EXEMPT = Finding("allowlist", "ALLOWLIST_MATCH", effect=Effect.EXEMPT, bypassable=False)
CLAMD_DOWN = Finding(
    "antivirus",
    "ANTIVIRUS_FAIL",
    effect=Effect.TEMPFAIL,
    bypassable=False,
    reply=SmtpReply(451, "4.7.1", "Temporary failure (antivirus); try again later"),
)


def listed(weight: float, name: str = "ZEN") -> Finding:
    return Finding(
        "dnsbl",
        f"DNSBL_{name}",
        score=weight,
        reply=SmtpReply(554, "5.7.1", f"blocked using {name.lower()}"),
    )


def decide(*findings: Finding):
    return policy.decide_message(MSG, list(findings), CFG, MILTER)


def test_clean_message_is_accepted_with_score_header() -> None:
    d = decide()
    assert d.action is Action.ACCEPT and d.reply is None and d.reason_code == "OK"
    assert ("X-Spam-Score", "0.0") in d.add_headers
    assert all(name != "X-Spam-Flag" for name, _ in d.add_headers)


def test_virus_refuses_even_when_allowlisted() -> None:
    d = decide(EXEMPT, VIRUS)
    assert d.action is Action.REJECT
    assert str(d.reply) == "554 5.7.1 virus found: Test"
    assert d.reason_code == "CLAMAV_VIRUS"


def test_virus_beats_a_tempfail_of_another_check() -> None:
    assert decide(CLAMD_DOWN, VIRUS).action is Action.REJECT


def test_dependency_failure_tempfails_even_when_allowlisted() -> None:
    d = decide(EXEMPT, CLAMD_DOWN)
    assert d.action is Action.TEMPFAIL and d.reply is not None and d.reply.code == 451


def test_weights_add_up_to_the_reject_threshold() -> None:
    assert decide(listed(5, "A")).action is Action.ACCEPT
    d = decide(listed(5, "A"), listed(5, "B"))
    assert d.action is Action.REJECT
    assert d.reply is not None and d.reply.code == 554


def test_score_between_tag_and_reject_tags() -> None:
    d = decide(listed(6))
    assert d.action is Action.ACCEPT
    assert ("X-Spam-Flag", "YES") in d.add_headers
    assert ("X-Spam-Score", "6.0") in d.add_headers
    assert d.reason_code == "DNSBL_ZEN"


def test_exemption_drops_bypassable_findings() -> None:
    spam = Finding(
        "classifier",
        "CLASSIFIER_SPAM",
        effect=Effect.REJECT,
        reply=SmtpReply(550, "5.7.1", "spam"),
        spam_probability=0.99,
    )
    d = decide(EXEMPT, listed(20), spam)
    assert d.action is Action.ACCEPT and d.reason_code == "ALLOWLISTED"
    assert d.spam_score == 0.99


def test_unexempt_cancels_the_exemption() -> None:
    unverified = Finding(
        "allowlist", "ALLOWLIST_UNVERIFIED", effect=Effect.UNEXEMPT, bypassable=False
    )
    assert decide(EXEMPT, unverified, listed(20)).action is Action.REJECT


def test_fail_open_check_adds_unchecked_header() -> None:
    failed = Finding("dnsbl", "DNSBL_FAIL", effect=Effect.SCORE, unchecked=True)
    d = decide(failed)
    assert d.action is Action.ACCEPT
    assert ("X-Filterd-Unchecked", "dnsbl") in d.add_headers


@pytest.mark.parametrize("action", ["reject", "tempfail"])
def test_oversize_message_gets_the_configured_verdict(action: str) -> None:
    big = Message(MSG.envelope, b"", lambda: iter(()), 10**9, oversize=True)
    d = policy.decide_message(big, [], CFG, MilterConfig(oversize_action=action))
    assert d.action.value == action and d.reason_code == "OVERSIZE"
    assert d.reply is not None and d.reply.enhanced.startswith("5" if action == "reject" else "4")


def test_recipient_split_when_classes_differ() -> None:
    first = policy.decide_recipient("a@example.org", [EXEMPT], CFG, None)
    assert first.action is Action.ACCEPT and first.exempt
    second = policy.decide_recipient("b@example.org", [], CFG, first.policy_class)
    assert second.action is Action.TEMPFAIL
    assert str(second.reply).startswith("452 4.5.3")
    same = policy.decide_recipient("c@example.org", [EXEMPT], CFG, first.policy_class)
    assert same.action is Action.ACCEPT


def test_refused_recipient_is_not_split_but_refused() -> None:
    d = policy.decide_recipient("b@example.org", [listed(10)], CFG, "exempt")
    assert d.action is Action.REJECT and d.reason_code == "DNSBL_ZEN"


def test_provisional_exemption_is_its_own_transaction_class() -> None:
    provisional = Finding(
        "allowlist", "ALLOWLIST_MATCH", effect=Effect.EXEMPT, bypassable=False, provisional=True
    )
    first = policy.decide_recipient("a@example.org", [provisional], CFG, None)
    assert first.policy_class == "provisional" and first.exempt
    mixed = policy.decide_recipient("b@example.org", [EXEMPT], CFG, first.policy_class)
    assert mixed.action is Action.TEMPFAIL and mixed.reason_code == "SPLIT_RECIPIENTS"
