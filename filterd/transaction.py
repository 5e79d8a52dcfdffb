"""One SMTP transaction, MAIL FROM to end of message: the state both front ends share.

The milter (``milter.py``, fed by Postfix) and the offline judge (``scan.py``,
``filterd scan``) used to keep the accepted recipients, the transaction split
and the RCPT findings each in their own way. A ``Transaction`` holds that state
once: recipients are judged in order (a recipient whose policy class differs
from the first accepted one is split off by the policy), the accepted ones
carry their findings into the content decision, and the body is spooled by a
``MessageBuilder`` when the front end streams it.
"""

from __future__ import annotations

from dataclasses import replace

from filterd.builder import MessageBuilder
from filterd.checks.base import Started
from filterd.runtime import Runtime
from filterd.types import Action, Decision, Envelope, Finding, Message, RecipientDecision


class Transaction:
    def __init__(self, runtime: Runtime, envelope: Envelope, spool: bool = False) -> None:
        self.runtime = runtime
        # Direction is settled once, at MAIL FROM: an authenticated submission
        # loses its client IP here, before any check or record sees it.
        self.envelope = runtime.outbound.prepare(envelope)
        self.pipeline = runtime.pipeline_for(self.envelope)
        self.accepted: list[RecipientDecision] = []
        self.refused: list[RecipientDecision] = []
        # Only a streaming front end (the milter) spools a body.
        self.builder: MessageBuilder | None = (
            MessageBuilder(runtime.settings.milter, self.envelope) if spool else None
        )
        # A live SMTP front end has the client's RCPT round trip to spare: the RCPT
        # checks start their lookups now (dnsbl), and the first RCPT collects them.
        prefetch = getattr(self.pipeline, "prefetch", None)
        self._prefetched: list[Started] = (
            prefetch(self.envelope) if spool and prefetch is not None else []
        )

    @property
    def policy_class(self) -> str | None:
        """The class of the first accepted recipient: later ones must share it."""
        return self.accepted[0].policy_class if self.accepted else None

    def add_recipient(self, recipient: str) -> RecipientDecision:
        decision = self.pipeline.judge_recipient(self.envelope, recipient, self.policy_class)
        (self.accepted if decision.action is Action.ACCEPT else self.refused).append(decision)
        return decision

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(d.recipient for d in self.accepted)

    @property
    def rcpt_findings(self) -> list[Finding]:
        return [f for d in self.accepted for f in d.findings]

    def rcpt_timings_ms(self) -> dict[str, float]:
        """RCPT-phase time per check over every accepted recipient, in ms."""
        spent: dict[str, float] = {}
        for accepted in self.accepted:
            for name, seconds in accepted.timings.items():
                spent[name] = spent.get(name, 0.0) + seconds * 1000
        return spent

    def spooled_message(self, queue_id: str | None) -> Message:
        """The streamed message, addressed to the accepted recipients."""
        assert self.builder is not None, "this transaction spools no body"
        return self.builder.build(self.recipients, queue_id)

    def message_from_bytes(self, raw: bytes) -> Message:
        """A whole message given at once (offline judgement)."""
        return Message.from_bytes(raw, replace(self.envelope, recipients=self.recipients))

    def judge(self, message: Message) -> Decision:
        """The content decision for the accepted recipients."""
        return self.pipeline.judge_message(message, self.rcpt_findings)

    def close(self) -> None:
        for handle in self._prefetched:
            handle.close()
        self._prefetched = []
        if self.builder is not None:
            self.builder.close()
            self.builder = None
