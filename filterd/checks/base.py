"""The contract every check module follows.

A check module ``filterd/checks/<name>.py`` defines:

- ``SECTION``: the rules/filterd.toml section it reads, equal to the check's
  name (``"antivirus"``) and listed in ``filterd.checks.REGISTRY``;
- ``Config``: a ``filterd.settings.Section`` subclass for that section;
- ``build(config, services) -> Check``: creates the check with its own
  long-lived clients (built once per configuration load, closed by ``close``).

The returned object implements ``check_recipient`` (RCPT phase), or
``check_message`` (end of message), or both, and returns findings. It never
chooses the SMTP outcome itself: that is ``filterd.policy``'s job. A check that
cannot do its work raises; the pipeline turns the exception or a timeout into a
``<NAME>_FAIL`` finding whose effect follows ``on_failure``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from filterd.types import Envelope, Finding, Message

if TYPE_CHECKING:
    from filterd.clients.redis import RedisClient
    from filterd.dns.resolver import DnsblResolver
    from filterd.settings import Settings

OnFailure = Literal["tempfail", "accept"]


@dataclass
class Services:
    """Clients shared by several checks, built once per configuration load."""

    settings: Settings
    redis: RedisClient | None = None
    # The one DNS resolver ([dns]) the list checks share; None when no list check runs.
    resolver: DnsblResolver | None = None


@runtime_checkable
class Check(Protocol):
    """What every check has. ``bypassable``: an allowlist exemption skips it."""

    name: str
    bypassable: bool
    on_failure: OnFailure

    def close(self) -> None: ...

    def selftest(self) -> list[str]:
        """Problems worth an operator's attention at start-up (logged, never fatal)."""
        ...


@runtime_checkable
class RecipientCheck(Check, Protocol):
    def check_recipient(self, envelope: Envelope, recipient: str) -> Sequence[Finding]: ...


@runtime_checkable
class MessageCheck(Check, Protocol):
    """``gate`` checks run first, in order, before the others run concurrently.

    Allowlist verification is a gate: whether the exemption holds decides
    whether the bypassable checks need to run at all.
    """

    gate: bool

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]: ...


class Started(Protocol):
    """A check whose I/O is under way (``start_message`` / ``start_recipient``).

    ``collect`` waits for the answers and turns them into findings; it returns by
    ``deadline`` (time.monotonic) or raises TimeoutError. ``close`` abandons the
    I/O when the decision no longer needs it.
    """

    def collect(self, deadline: float) -> Sequence[Finding]: ...

    def close(self) -> None: ...


class StartableMessageCheck(MessageCheck, Protocol):
    """A message check that can send its requests without blocking, to collect them later.

    ``start_message`` returns None when it cannot (a message too big for one write):
    the pipeline then runs ``check_message`` in its pool.
    """

    def start_message(self, message: Message, exempt: bool) -> Started | None: ...


class StartableRecipientCheck(RecipientCheck, Protocol):
    def start_recipient(self, envelope: Envelope, recipient: str) -> Started | None: ...


class Done:
    """A ``Started`` whose findings were known at once (cached, or nothing to ask)."""

    def __init__(self, findings: Sequence[Finding] | None = None) -> None:
        self.findings = list(findings or [])

    def collect(self, deadline: float) -> list[Finding]:
        return list(self.findings)

    def close(self) -> None:
        """Nothing under way."""
