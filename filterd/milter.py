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
from dataclasses import replace
from functools import wraps
from typing import Any, TypeVar

import Milter

from filterd.runtime import Runtime
from filterd.transaction import Transaction
from filterd.types import Action, Decision, Envelope, SmtpReply

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
    """The Runtime currently in service, swapped atomically on reload.

    It also counts what a drain waits for: ``in_flight`` transactions (MAIL FROM
    to end of message) and open ``sessions`` (connections, with or without one).
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self.in_flight = 0
        self.sessions = 0

    def acquire(self) -> Runtime:
        """A connection starts: the Runtime it keeps until it closes."""
        with self._lock:
            self.sessions += 1
            return self._runtime.acquire()

    def release(self, runtime: Runtime) -> None:
        """The connection that acquired ``runtime`` has closed."""
        with self._lock:
            self.sessions -= 1
        runtime.release()

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


def install(holder: RuntimeHolder) -> None:
    """Serve every new milter connection from ``holder``'s Runtime.

    pymilter creates one ``Milter.factory()`` object per SMTP connection; the
    factory made here closes over the holder, so no module global is needed.
    """

    def factory() -> FilterdMilter:
        return FilterdMilter(holder)

    Milter.factory = factory


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
    """One SMTP connection: its client facts, and the transaction in progress, if any."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder
        self.runtime = holder.acquire()
        # Connection-level facts (client, HELO); MAIL FROM starts a Transaction with them.
        # The Transaction of an authenticated submission drops the client; this copy keeps
        # it, used only to strip it from outbound headers.
        self.envelope = Envelope()
        self.tx: Transaction | None = None

    # -- replies -----------------------------------------------------------
    def _reply(self, reply: SmtpReply) -> None:
        try:
            self.setreply(str(reply.code), reply.enhanced, reply.text.replace("%", "%%"))
        except Exception:
            log.debug("setreply failed", exc_info=True)

    def _end_transaction(self) -> None:
        if self.tx is not None:
            self.tx.close()
            self.tx = None
            self.holder.track(-1)

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
        self.envelope = Envelope(
            client_ip=ip,
            client_name=hostname or None,
            daemon_name=self.getsymval("{daemon_name}") or None,
        )
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def hello(self, heloname: str) -> int:
        self.envelope = replace(self.envelope, helo=heloname)
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._end_transaction()
        auth = self.getsymval("{auth_authen}")
        envelope = replace(
            self.envelope,
            mail_from=_clean_addr(mailfrom),
            auth_user=auth or None,
        )
        self.holder.track(+1)
        self.tx = Transaction(self.runtime, envelope, spool=True)
        return Milter.CONTINUE

    @_guarded
    def envrcpt(self, to: str, *params: str) -> int:
        if self.tx is None:  # RCPT without MAIL: libmilter never does this
            return Milter.CONTINUE
        decision = self.tx.add_recipient(_clean_addr(to))
        if decision.action is Action.ACCEPT:
            return Milter.CONTINUE
        self.runtime.notify_recipient(self.tx.envelope, decision)
        log.info(
            "recipient refused",
            extra={
                "event": "rcpt",
                "action": decision.action.value,
                "code": decision.reason_code,
                # Postfix has a queue id at RCPT once its queue file is open (not for
                # the first recipient under smtpd_delay_open_until_valid_rcpt=yes).
                "queue_id": self.getsymval("i") or None,
            },
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
        if self.tx is not None and self.tx.builder is not None:
            name_b = (
                name if isinstance(name, bytes) else str(name).encode("utf-8", "surrogateescape")
            )
            value_b = (
                value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
            )
            self.tx.builder.add_header(name_b, value_b)
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def body(self, chunk: bytes) -> int:
        if self.tx is not None and self.tx.builder is not None:
            self.tx.builder.add_body(chunk)
        return Milter.CONTINUE

    @_guarded
    def eom(self) -> int:
        tx = self.tx
        if tx is None or tx.builder is None:
            return Milter.CONTINUE
        start = time.monotonic()
        message = tx.spooled_message(self.getsymval("i") or None)
        decision = tx.judge(message)
        self._apply(decision)
        if decision.action is Action.ACCEPT:
            outbound = self.runtime.outbound
            for name, index in outbound.headers_to_remove(
                message, self.envelope.client_ip, self.envelope.client_name
            ):
                self.chgheader(name, index, None)
        records_start = time.monotonic()
        self.runtime.notify_message(message, decision)
        records_ms = (time.monotonic() - records_start) * 1000
        rcpt_ms = tx.rcpt_timings_ms()
        log.info(
            "message judged",
            extra={
                "event": "eom",
                "queue_id": message.envelope.queue_id,
                "action": decision.action.value,
                "code": decision.reason_code,
                "spam_probability": decision.spam_score,
                "thresholds": self.runtime.served_thresholds(),
                "size": message.size,
                "ms": round((time.monotonic() - start) * 1000, 1),
                # Per check, wall time: a started check (clamd, uribl) counts from sending
                # to collecting, so the CPU checks run in between are included.
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
        self.holder.release(self.runtime)
        return Milter.CONTINUE
