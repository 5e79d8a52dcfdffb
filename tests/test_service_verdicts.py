"""Allowlisted mail says why: X-Spam-Status names the list that exempted it."""

from __future__ import annotations

import pytest

from filterd.policy import decide_message
from filterd.settings import MilterConfig, PolicyConfig
from filterd.types import Action, Effect, Finding, Message, SmtpReply

SPAM = Finding(
    "classifier",
    "CLASSIFIER_SPAM",
    effect=Effect.REJECT,
    reply=SmtpReply(550, "5.7.1", "spam"),
    spam_probability=0.99,
)


@pytest.mark.parametrize(
    ("detail", "word"),
    [
        ("mailbox address", "recipient"),
        ("domain domain", "domain"),
        ("site ip", "site"),
        ("mailbox ip (unverified)", "recipient"),
    ],
)
def test_allowlisted_message_names_the_list(detail: str, word: str) -> None:
    exempt = Finding("allowlist", "ALLOWLIST_MATCH", detail, effect=Effect.EXEMPT, bypassable=False)
    message = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n")
    d = decide_message(message, [exempt, SPAM], PolicyConfig(), MilterConfig())
    assert d.action is Action.ACCEPT and d.reason_code == "ALLOWLISTED"
    assert ("X-Spam-Status", f"No, allowlisted={word}") in d.add_headers


def test_filtered_message_has_no_allowlist_header() -> None:
    message = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n")
    d = decide_message(message, [], PolicyConfig(), MilterConfig())
    assert not [h for h in d.add_headers if h[0] == "X-Spam-Status"]
