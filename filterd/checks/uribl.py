"""End-of-message domain blocklist check: the From: header domain and the
registered domains of links in text and HTML bodies (URIBL).

Spam that gets past IP reputation usually still advertises a listed domain.
Lookups are bounded per message (``max_uri_lookups``, first-seen order after
removing duplicates and ``skip_domains``), run concurrently within ``budget``,
and fail open like the RCPT-time lists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import field_validator

from filterd.checks.base import Done, Services, Started
from filterd.dns.engine import (
    Engine,
    EngineCheck,
    Evaluation,
    Subject,
    domain_subject,
    engine_for,
)
from filterd.dns.lists import ListConfig, ResolverSettings, spamhaus_dbl, split_list
from filterd.mail.analysis import analysis_of
from filterd.settings import Settings
from filterd.types import Finding, Message

SECTION = "uribl"

log = logging.getLogger(__name__)

DEFAULT_LISTS = [
    spamhaus_dbl(["from", "body"]),
]


class Config(ResolverSettings):
    budget: float = 5.0
    # At most this many distinct link domains are looked up per message.
    max_uri_lookups: int = 20
    # Links are read from the top of the message only: a 25 MB attachment is not parsed.
    max_bytes: int = 1024 * 1024
    check_from: bool = True
    check_body: bool = True
    # Registered domains never looked up (your own domains, busy safe ones):
    # saves lookups and keeps them from crowding out the rest.
    skip_domains: list[str] = []
    lists: list[ListConfig] = DEFAULT_LISTS

    @field_validator("skip_domains", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("max_uri_lookups")
    @classmethod
    def _bound(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value


def from_domains(message: Message) -> list[str]:
    """Registered domains of the From: header's addresses (usually one)."""
    return analysis_of(message).from_domains


class UriblCheck(EngineCheck):
    config: Config

    name = "uribl"
    bypassable = True
    gate = False

    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self.config = config
        self.on_failure: Literal["tempfail", "accept"] = config.on_failure
        self.engine = engine or Engine(config, check="uribl", prefix="URIBL")
        # How much of the top of a message the shared analysis must parse for us.
        self.head_bytes = config.max_bytes
        self._skip = frozenset(d.lower().rstrip(".") for d in config.skip_domains)

    def subjects(self, message: Message) -> list[Subject]:
        skip = self._skip
        body: list[Subject] = []
        # The body first: its parse of the head also serves the From: header's values.
        if self.config.check_body and self.engine.serves("body") and self.config.max_uri_lookups:
            try:
                domains = analysis_of(message).link_domains(skip)
            except Exception as exc:  # noqa: BLE001 - a malformed MIME tree is not a failure
                log.info("uribl: cannot read the message body: %s", type(exc).__name__)
                domains = []
            if len(domains) > self.config.max_uri_lookups:
                self.engine.count("uri_lookups_capped")
            body = [domain_subject("body", d) for d in domains[: self.config.max_uri_lookups]]
        froms: list[Subject] = []
        if self.config.check_from and self.engine.serves("from"):
            froms = [domain_subject("from", d) for d in from_domains(message) if d not in skip]
        return froms + body

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        return self.start_message(message, exempt).collect(time.monotonic() + self.config.budget)

    def start_message(self, message: Message, exempt: bool) -> Started:
        """Read the link domains and send their lookups; the answers are read by ``collect``."""
        if exempt or not self.config.enabled or not self.engine.lists:
            return Done()
        return _Lookups(self.engine.start(self.subjects(message)), self.config.budget)


class _Lookups:
    """The lookups of one message, under the check's own budget and the pipeline's deadline."""

    def __init__(self, evaluation: Evaluation, budget: float) -> None:
        self.evaluation = evaluation
        self.deadline = time.monotonic() + budget

    def collect(self, deadline: float) -> Sequence[Finding]:
        return self.evaluation.finish(min(deadline, self.deadline))

    def close(self) -> None:
        self.evaluation.close()


def build(config: Config, services: Services | None = None) -> UriblCheck:
    engine = engine_for(config, check="uribl", prefix="URIBL", services=services)
    return UriblCheck(config, engine)


def selftest(config: Config | Settings) -> list[str]:
    """See filterd.checks.dnsbl.selftest; with Settings, checks [dnsbl] and [uribl]."""
    from filterd.checks import dnsbl

    return dnsbl.selftest(config)
