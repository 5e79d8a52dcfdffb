"""The only module that imports pymilter: callbacks in, milter calls out.

Callbacks only collect (into a MessageBuilder) and ask the pipeline; every
outcome comes from filterd.policy. Events we do not need are negotiated away
and the ones we only listen to are marked no-reply, because each milter event
is a round trip between Postfix and us (~30 per message otherwise).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import Milter

from filterd.builder import MessageBuilder
from filterd.runtime import Runtime
from filterd.types import Action, Decision, Envelope, RecipientDecision, SmtpReply

log = logging.getLogger("filterd.milter")

INTERNAL_ERROR = SmtpReply(
    451, "4.3.0", "Temporary local problem in the content filter; try again later"
)

_RESULT = {
    Action.ACCEPT: Milter.CONTINUE,
    Action.REJECT: Milter.REJECT,
    Action.TEMPFAIL: Milter.TEMPFAIL,
}

F = TypeVar("F", bound=Callable[..., Any])


class RuntimeHolder:
    """The Runtime currently in service, swapped atomically on reload."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self.in_flight = 0

    def acquire(self) -> Runtime:
        with self._lock:
            return self._runtime.acquire()

    def swap(self, runtime: Runtime) -> Runtime:
        with self._lock:
            old, self._runtime = self._runtime, runtime
        return old

    @property
    def current(self) -> Runtime:
        return self._runtime

    def track(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta


HOLDER: RuntimeHolder | None = None


def install(holder: RuntimeHolder) -> None:
    """Serve this process's connections from ``holder`` (the daemon's only entry point)."""
    global HOLDER
    HOLDER = holder
    Milter.factory = FilterdMilter


def _guarded(func: F) -> F:
    """Last-resort handler: an unexpected error tempfails, never crashes or accepts."""

    @wraps(func)
    def wrapper(self: FilterdMilter, *args: Any) -> Any:
        try:
            return func(self, *args)
        except Exception:
            log.exception("internal error in %s", func.__name__)
            self._reply(INTERNAL_ERROR)
            return Milter.TEMPFAIL

    return wrapper  # type: ignore[return-value]


def _clean_addr(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value


class FilterdMilter(Milter.Base):  # type: ignore[misc]
    def __init__(self) -> None:
        assert HOLDER is not None, "install a RuntimeHolder before serving"
        self.runtime = HOLDER.acquire()
        self.envelope = Envelope()
        self.builder: MessageBuilder | None = None
        self.accepted: list[RecipientDecision] = []
        self.in_transaction = False

    # -- replies -----------------------------------------------------------
    def _reply(self, reply: SmtpReply) -> None:
        try:
            self.setreply(str(reply.code), reply.enhanced, reply.text.replace("%", "%%"))
        except Exception:
            log.debug("setreply failed", exc_info=True)

    def _end_transaction(self) -> None:
        if self.builder is not None:
            self.builder.close()
            self.builder = None
        self.accepted = []
        if self.in_transaction:
            self.in_transaction = False
            assert HOLDER is not None
            HOLDER.track(-1)

    # -- callbacks ---------------------------------------------------------
    @Milter.noreply
    @_guarded
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        ip = None
        if isinstance(hostaddr, tuple) and hostaddr:
            try:
                ip = str(ipaddress.ip_address(str(hostaddr[0]).split("%")[0]))
            except ValueError:
                ip = None
        self.envelope = Envelope(client_ip=ip, client_name=hostname or None)
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def hello(self, heloname: str) -> int:
        self.envelope = Envelope(
            client_ip=self.envelope.client_ip, client_name=self.envelope.client_name, helo=heloname
        )
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._end_transaction()
        assert HOLDER is not None
        HOLDER.track(+1)
        self.in_transaction = True
        auth = self.getsymval("{auth_authen}")
        self.envelope = Envelope(
            client_ip=self.envelope.client_ip,
            client_name=self.envelope.client_name,
            helo=self.envelope.helo,
            mail_from=_clean_addr(mailfrom),
            auth_user=auth or None,
        )
        self.builder = MessageBuilder(self.runtime.settings.milter, self.envelope)
        return Milter.CONTINUE

    @_guarded
    def envrcpt(self, to: str, *params: str) -> int:
        rcpt = _clean_addr(to)
        first_class = self.accepted[0].policy_class if self.accepted else None
        decision = self.runtime.pipeline.judge_recipient(self.envelope, rcpt, first_class)
        if decision.action is Action.ACCEPT:
            self.accepted.append(decision)
            return Milter.CONTINUE
        self.runtime.notify_recipient(self.envelope, decision)
        log.info(
            "recipient refused",
            extra={"event": "rcpt", "action": decision.action.value, "code": decision.reason_code},
        )
        assert decision.reply is not None
        self._reply(decision.reply)
        return _RESULT[decision.action]

    def data(self) -> int:
        # Negotiated *with* a reply on purpose: when DATA is skipped, Postfix sends
        # the DATA macros alone and its next write waits ~40 ms for a delayed ACK
        # over TCP (measured in bench/milter_variants.py); over unix it costs nothing.
        return Milter.CONTINUE

    @Milter.nocallback
    def unknown(self, cmd: str) -> int:
        return Milter.CONTINUE

    @Milter.nocallback
    def eoh(self) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    @_guarded
    def header(self, name: Any, value: Any) -> int:
        if self.builder is not None:
            name_b = (
                name if isinstance(name, bytes) else str(name).encode("utf-8", "surrogateescape")
            )
            value_b = (
                value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
            )
            self.builder.add_header(name_b, value_b)
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def body(self, chunk: bytes) -> int:
        if self.builder is not None:
            self.builder.add_body(chunk)
        return Milter.CONTINUE

    @_guarded
    def eom(self) -> int:
        if self.builder is None:
            return Milter.CONTINUE
        start = time.monotonic()
        recipients = tuple(d.recipient for d in self.accepted)
        message = self.builder.build(recipients, self.getsymval("i") or None)
        rcpt_findings = [f for d in self.accepted for f in d.findings]
        decision = self.runtime.pipeline.judge_message(message, rcpt_findings)
        self._apply(decision)
        records_start = time.monotonic()
        self.runtime.notify_message(message, decision)
        records_ms = (time.monotonic() - records_start) * 1000
        rcpt_ms: dict[str, float] = {}
        for accepted in self.accepted:
            for name, seconds in accepted.timings.items():
                rcpt_ms[name] = rcpt_ms.get(name, 0.0) + seconds * 1000
        log.info(
            "message judged",
            extra={
                "event": "eom",
                "queue_id": message.envelope.queue_id,
                "action": decision.action.value,
                "code": decision.reason_code,
                "size": message.size,
                "ms": round((time.monotonic() - start) * 1000, 1),
                # Per check, wall time (concurrent checks include waiting for the GIL).
                "timings_ms": {k: round(v * 1000, 1) for k, v in decision.timings.items()},
                "rcpt_timings_ms": {k: round(v, 1) for k, v in rcpt_ms.items()},
                "records_ms": round(records_ms, 1),
            },
        )
        self._end_transaction()
        return _RESULT[decision.action] if decision.action is not Action.ACCEPT else Milter.ACCEPT

    def _apply(self, decision: Decision) -> None:
        if decision.action is Action.ACCEPT:
            for name, value in decision.add_headers:
                self.addheader(name, value)
        elif decision.reply is not None:
            self._reply(decision.reply)

    def abort(self) -> int:
        self._end_transaction()
        return Milter.CONTINUE

    def close(self) -> int:
        self._end_transaction()
        self.runtime.release()
        return Milter.CONTINUE
