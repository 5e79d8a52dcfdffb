"""smtp-sink (the delivery end of a test Postfix) and a small SMTP client for tests."""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from filterd.services.launcher import (
    _POLL_S,
    LOOPBACK,
    _as_root,
    _ChildServer,
    _chown_to,
    _find_program,
    _read_line,
    _require_loopback,
    free_port,
    make_reachable,
)


@dataclass(frozen=True)
class SinkMessage:
    """One transaction smtp-sink dumped: envelope as received plus the message bytes."""

    path: Path
    client_addr: str
    helo: str | None
    mail_from: str
    recipients: list[str]
    # Header + body as received: LF line ends, dot-unstuffed.
    data: bytes


def _strip_address(args: str) -> str:
    """``<a@b> SIZE=12`` -> ``a@b``: the ESMTP parameters are not part of the address."""
    first = args.split(" ", 1)[0] if not args.startswith("<") else args[: args.find(">") + 1]
    return first.strip().removeprefix("<").removesuffix(">")


def _parse_sink_dump(path: Path, raw: bytes) -> SinkMessage:
    lines = raw.split(b"\n")
    fields: dict[str, list[str]] = {}
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.startswith(b"Received: "):
            # The three-line Received header ends smtp-sink's own headers.
            while index < len(lines) and lines[index][:1] in (b"\t", b" "):
                index += 1
            break
        key, _sep, value = line.decode("utf-8", "replace").partition(": ")
        fields.setdefault(key, []).append(value)
    body = b"\n".join(lines[index:])
    # smtp-sink appends one empty line after the message.
    if body.endswith(b"\n\n"):
        body = body[:-1]
    return SinkMessage(
        path=path,
        client_addr=fields.get("X-Client-Addr", [""])[0],
        helo=fields.get("X-Helo-Args", [None])[0],
        mail_from=_strip_address(fields.get("X-Mail-Args", [""])[0]),
        recipients=[_strip_address(v) for v in fields.get("X-Rcpt-Args", [])],
        data=body,
    )


class SmtpSink(_ChildServer):
    """Postfix's ``smtp-sink`` on 127.0.0.1, dumping every transaction to workdir/dump.

    It is the final hop of the private Postfix: mail that reaches it was accepted and relayed,
    which is what end-to-end tests assert on. It also serves as a fast discard target in benches.
    """

    name = "smtp-sink"

    def __init__(self, workdir: Path, start_timeout: float = 10.0) -> None:
        super().__init__(workdir, start_timeout)
        self._port = free_port()
        self.dump_dir = self.workdir / "dump"

    @property
    def port(self) -> int:
        return self._port

    def deliveries(self) -> list[SinkMessage]:
        """Completed transactions, oldest first."""
        pending = self._open_files()
        entries = []
        for path in self.dump_dir.glob("*"):
            if not path.is_file() or path in pending:
                continue
            try:
                entries.append((path.stat().st_mtime_ns, path.name, path, path.read_bytes()))
            except FileNotFoundError:
                continue  # removed by clear() meanwhile
        entries.sort(key=lambda e: (e[0], e[1]))
        return [_parse_sink_dump(path, raw) for _mtime, _name, path, raw in entries]

    def messages(self) -> list[bytes]:
        """Delivered messages (header + body, LF line ends), oldest first."""
        return [m.data for m in self.deliveries()]

    def delivered_recipients(self) -> list[str]:
        """Envelope recipients of all delivered messages, in delivery order."""
        return [rcpt for m in self.deliveries() for rcpt in m.recipients]

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """Poll until at least ``n`` messages were delivered; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"smtp-sink got {len(found)} message(s), wanted {n}")
            time.sleep(_POLL_S)

    def clear(self) -> None:
        """Forget delivered messages (a sink shared across tests)."""
        pending = self._open_files()
        for path in self.dump_dir.glob("*"):
            if path.is_file() and path not in pending:
                path.unlink(missing_ok=True)

    def _open_files(self) -> set[Path]:
        """Dump files smtp-sink still writes: a transaction in progress."""
        pid = self.pid
        if pid is None:
            return set()
        found = set()
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            return set()
        for fd in fds:
            with contextlib.suppress(OSError):
                target = Path(os.readlink(fd))
                if target.parent == self.dump_dir:
                    found.add(target)
        return found

    def _prepare(self) -> None:
        make_reachable(self.workdir)
        self.dump_dir.mkdir(exist_ok=True)
        # smtp-sink writes dumps after switching to user postfix.
        _chown_to(self.dump_dir, "postfix")

    def _command(self) -> list[str]:
        cmd = [_find_program("smtp-sink")]
        if _as_root():
            cmd += ["-u", "postfix"]  # smtp-sink refuses to run as root without it
        # %Y%m%d%H%M%S. gets a random hex suffix appended by smtp-sink.
        cmd += ["-h", "sink.filterd.test", "-d", f"{self.dump_dir}/%Y%m%d%H%M%S."]
        cmd += [f"{LOOPBACK}:{self._port}", "256"]
        return cmd

    def _probe(self) -> bool:
        with socket.create_connection((LOOPBACK, self._port), timeout=1.0) as sock:
            banner = _read_line(sock)
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return banner.startswith(b"220")

    def _rebind(self) -> bool:
        self._port = free_port()
        return True


class SmtpReply(NamedTuple):
    code: int
    text: str


@dataclass
class SmtpResult:
    """Every reply of one SMTP session, so a test asserts on codes instead of catching errors.

    ``data`` is the reply to the end of the message (or to DATA itself when it was refused);
    None when DATA was never sent (no recipient accepted, or the session ended earlier).
    """

    banner: SmtpReply
    ehlo: SmtpReply | None = None
    xclient: SmtpReply | None = None
    mail: SmtpReply | None = None
    rcpts: dict[str, SmtpReply] = field(default_factory=dict)
    data: SmtpReply | None = None
    #: The server closed the connection before QUIT (e.g. after a 421).
    disconnected: bool = False

    @property
    def accepted(self) -> bool:
        """The message was taken for delivery (2xx after the final dot)."""
        return self.data is not None and 200 <= self.data.code < 300

    @property
    def accepted_recipients(self) -> list[str]:
        return [rcpt for rcpt, reply in self.rcpts.items() if 200 <= reply.code < 300]

    @property
    def queue_id(self) -> str | None:
        """Postfix's queue id from "250 2.0.0 Ok: queued as ID", if any."""
        if self.data is None:
            return None
        match = re.search(r"queued as (\S+)", self.data.text)
        return match.group(1) if match else None


def _reply(code: int, text: bytes | str) -> SmtpReply:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return SmtpReply(code, text)


def _to_crlf(data: bytes) -> bytes:
    """Bare LF -> CRLF, as any MUA would send; CR without LF is left alone."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def send_mail(
    port: int,
    mail_from: str,
    rcpts: Iterable[str],
    data: bytes,
    xclient: Mapping[str, str] | None = None,
    helo: str = "client.example.net",
    host: str = LOOPBACK,
    timeout: float = 30.0,
) -> SmtpResult:
    """Run one SMTP session and record every reply; 4xx/5xx are returned, never raised.

    ``xclient`` (e.g. ``{"ADDR": "192.0.2.10", "NAME": "mail.example.net"}``) makes Postfix
    treat the session as coming from that client; Postfix answers XCLIENT with a new 220 and
    the session says EHLO again, as a real client would after a new greeting. Bare LF in
    ``data`` is sent as CRLF.
    """
    _require_loopback(host)
    # local_hostname is given so smtplib never calls getfqdn() (a DNS lookup).
    smtp = smtplib.SMTP(local_hostname=helo, timeout=timeout)
    result: SmtpResult | None = None
    try:
        code, msg = smtp.connect(host, port)
        result = SmtpResult(banner=_reply(code, msg))
        if code == 220:
            _converse(smtp, result, mail_from, list(rcpts), data, xclient, helo)
    except smtplib.SMTPServerDisconnected:
        if result is None:
            raise
        result.disconnected = True
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()
    return result


def _converse(
    smtp: smtplib.SMTP,
    result: SmtpResult,
    mail_from: str,
    rcpts: list[str],
    data: bytes,
    xclient: Mapping[str, str] | None,
    helo: str,
) -> None:
    """The session after the banner; returns at the first reply that ends it."""
    code, msg = smtp.ehlo(helo)
    result.ehlo = _reply(code, msg)
    if code != 250:
        return
    if xclient:
        attrs = " ".join(f"{key.upper()}={value}" for key, value in xclient.items())
        code, msg = smtp.docmd("XCLIENT", attrs)
        result.xclient = _reply(code, msg)
        if code != 220:
            return
        # A new greeting means a new session: forget the old EHLO features.
        smtp.ehlo_resp = None
        smtp.esmtp_features = {}
        code, msg = smtp.ehlo(helo)
        result.ehlo = _reply(code, msg)
        if code != 250:
            return
    code, msg = smtp.mail(mail_from)
    result.mail = _reply(code, msg)
    if code >= 300:
        return
    for rcpt in rcpts:
        code, msg = smtp.rcpt(rcpt)
        result.rcpts[rcpt] = _reply(code, msg)
    if not result.accepted_recipients:
        return
    try:
        code, msg = smtp.data(_to_crlf(data))
        result.data = _reply(code, msg)
    except smtplib.SMTPDataError as exc:  # DATA itself refused
        result.data = _reply(exc.smtp_code, exc.smtp_error)
