"""A small HTTP JSON API for a customer panel: list, add and remove one mailbox's entries.

Authentication is a per-list token, ``hex(HMAC-SHA256(secret, key))`` where
``key`` is the canonical mailbox (``alice@example.org``) or ``@domain`` for a
hosted domain's list. The panel holds the secret and computes the token for
the user it has logged in; the token opens that one list and no other, and is
compared in constant time. Canonical means: lower-case, IDN domain as
punycode, sub-address folded -- ``GET`` returns the key it used.

Routes (see docs/allowlist-api.yaml):

- ``GET    /v1/allowlists/{mailbox}``           the list
- ``POST   /v1/allowlists/{mailbox}/entries``   ``{"entries": [...]}`` adds (all or nothing)
- ``DELETE /v1/allowlists/{mailbox}/entries``   ``{"entries": [...]}`` removes
- ``GET    /v1/health``                         no authentication, no data

It binds to loopback by default and speaks plain HTTP: expose it beyond the
host only behind a TLS-terminating proxy. Request logs never name mailboxes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis

from filterd.allowlist.config import Config
from filterd.allowlist.entries import Entry, EntryError, Target, parse_entry, parse_target
from filterd.allowlist.store import AllowlistStore, LimitError

log = logging.getLogger("filterd.allowlist.api")

MIN_SECRET_LENGTH = 16
JSON_TYPE = "application/json"


class ApiConfigError(Exception):
    """The API cannot start (no secret, bad listen address)."""


def make_token(secret: bytes, key: str) -> str:
    """The token for one list: what the panel computes for its logged-in user."""
    return hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()


def load_secret(config: Config, base: Path | None = None) -> bytes:
    """The HMAC secret from ``api_secret`` (env FILTERD_ALLOWLIST_API_SECRET) or a file."""
    secret = config.api_secret.get_secret_value()
    if not secret and config.api_secret_file:
        path = Path(config.api_secret_file)
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiConfigError(
                f"[allowlist] api_secret_file {path}: cannot read: {exc}"
            ) from None
    if not secret:
        raise ApiConfigError(
            "no API secret: set FILTERD_ALLOWLIST_API_SECRET or [allowlist] api_secret_file"
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise ApiConfigError(f"the API secret must be at least {MIN_SECRET_LENGTH} characters")
    return secret.encode("utf-8")


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:8895`` or ``[::1]:8895``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ApiConfigError(f"api_listen {text!r}: expected IP:PORT or [IPv6]:PORT") from None
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ApiConfigError(f"api_listen {text!r}: bad port")
    return host, int(port)


@dataclass
class Response:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, code: str, message: str, **extra: Any) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="filterd"'} if status == 401 else {}
    return Response(status, {"error": code, "message": message, **extra}, headers)


class AllowlistApi:
    """Request handling without HTTP plumbing (routing, auth, validation, store calls)."""

    def __init__(self, store: AllowlistStore, config: Config, secret: bytes) -> None:
        self.store = store
        self.config = config
        self.secret = secret

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None
    ) -> Response:
        parts = urlsplit(path)
        segments = parts.path.split("/")
        if segments == ["", "v1", "health"]:
            if method != "GET":
                return _error(405, "method_not_allowed", "use GET")
            return Response(200, {"status": "ok"})
        if len(segments) not in (4, 5) or segments[:3] != ["", "v1", "allowlists"]:
            return _error(404, "not_found", "no such resource")
        entries_route = len(segments) == 5
        if entries_route and segments[4] != "entries":
            return _error(404, "not_found", "no such resource")
        allowed = ("POST", "DELETE") if entries_route else ("GET",)
        if method not in allowed:
            response = _error(405, "method_not_allowed", f"use {' or '.join(allowed)}")
            response.headers["Allow"] = ", ".join(allowed)
            return response
        token = _bearer(headers.get("Authorization", ""))
        if token is None:
            return _error(401, "unauthorized", "send Authorization: Bearer <token>")
        try:
            target = parse_target(unquote(segments[3], errors="strict"), self.config)
        except (EntryError, UnicodeDecodeError) as exc:
            return _error(400, "invalid_mailbox", str(exc))
        expected = make_token(self.secret, target.key).encode("ascii")
        if not hmac.compare_digest(token.encode("utf-8", "replace"), expected):
            return _error(403, "forbidden", "the token does not open this list")
        try:
            if method == "GET":
                return self._list(target)
            items = _body_entries(body, parts.query if method == "DELETE" else "", self.config)
            if isinstance(items, Response):
                return items
            return self._add(target, items) if method == "POST" else self._remove(target, items)
        except redis.RedisError as exc:
            log.error("allowlist API: store unavailable", extra={"error": type(exc).__name__})
            return _error(503, "unavailable", "the allowlist store is unavailable; retry later")

    def _list(self, target: Target) -> Response:
        entries = self.store.entries(target)
        return Response(
            200,
            {
                "mailbox": target.key,
                "entries": entries,
                "count": len(entries),
                "limit": self.store.limit,
            },
        )

    def _parse(self, items: list[str]) -> list[Entry] | Response:
        parsed: list[Entry] = []
        errors = []
        for index, item in enumerate(items):
            try:
                parsed.append(parse_entry(item, self.config))
            except EntryError as exc:
                errors.append({"index": index, "entry": item[:300], "error": str(exc)})
        if errors:
            return _error(400, "invalid_entry", f"{len(errors)} invalid entr(y/ies)", errors=errors)
        return parsed

    def _add(self, target: Target, items: list[str]) -> Response:
        parsed = self._parse(items)
        if isinstance(parsed, Response):
            return parsed
        try:
            change = self.store.add(target, parsed)
        except LimitError as exc:
            return _error(409, "limit_exceeded", str(exc), limit=self.store.limit)
        return Response(
            200,
            {
                "mailbox": target.key,
                "added": list(change.changed),
                "already_present": list(change.unchanged),
                "count": change.count,
                "limit": self.store.limit,
            },
        )

    def _remove(self, target: Target, items: list[str]) -> Response:
        parsed = self._parse(items)
        if isinstance(parsed, Response):
            return parsed
        change = self.store.remove(target, parsed)
        return Response(
            200,
            {
                "mailbox": target.key,
                "removed": list(change.changed),
                "not_present": list(change.unchanged),
                "count": change.count,
            },
        )


def _bearer(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _body_entries(body: bytes | None, query: str, config: Config) -> list[str] | Response:
    """The ``entries`` list of a request: JSON body, or ``?entry=`` for DELETE."""
    if not body and query:
        items: Any = parse_qs(query, strict_parsing=False).get("entry", [])
    else:
        if not body:
            return _error(400, "invalid_request", 'send a JSON body {"entries": [...]}')
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, "invalid_json", f"the body is not valid UTF-8 JSON: {exc}")
        if not isinstance(data, dict) or set(data) != {"entries"}:
            return _error(400, "invalid_request", 'the body must be {"entries": [...]}')
        items = data["entries"]
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return _error(400, "invalid_request", '"entries" must be a list of strings')
    if not items:
        return _error(400, "invalid_request", '"entries" is empty')
    if len(items) > config.max_entries_per_mailbox:
        return _error(
            400,
            "invalid_request",
            f"at most {config.max_entries_per_mailbox} entries per request",
        )
    return items


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    server_version = "filterd-allowlist"
    sys_version = ""

    def _dispatch(self) -> None:
        api = self.server.api
        body: bytes | None = None
        if "Transfer-Encoding" in self.headers:
            self._send(_error(411, "length_required", "send Content-Length, not chunked"), True)
            return
        length_header = self.headers.get("Content-Length")
        if length_header is not None:
            if not length_header.strip().isdigit():
                self._send(_error(400, "invalid_request", "bad Content-Length"), True)
                return
            length = int(length_header)
            if length > api.config.api_max_body_bytes:
                limit = api.config.api_max_body_bytes
                self._send(_error(413, "too_large", f"the body is limited to {limit} bytes"), True)
                return
            ctype = self.headers.get("Content-Type", JSON_TYPE).split(";")[0].strip().lower()
            if length and ctype != JSON_TYPE:
                self._send(_error(415, "unsupported_media_type", f"send {JSON_TYPE}"), True)
                return
            body = self.rfile.read(length) if length else b""
        try:
            response = api.handle(self.command, self.path, self.headers, body)  # type: ignore[arg-type]
        except Exception:
            log.exception("allowlist API: internal error")
            response = _error(500, "internal", "internal error")
        self._send(response, False)

    def _send(self, response: Response, close: bool) -> None:
        data = json.dumps(response.body, ensure_ascii=False).encode("utf-8")
        self.send_response(response.status)
        self.send_header("Content-Type", f"{JSON_TYPE}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in response.headers.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        """Access log without the path: paths name mailboxes."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.info("allowlist API request", extra={"method": self.command, "status": code})


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: AllowlistApi) -> None:
        self.api = api
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        # Per-connection socket timeout: a slow client cannot hold a thread forever.
        handler = type("Handler", (_Handler,), {"timeout": api.config.api_timeout_seconds})
        super().__init__(address, handler)


def make_server(api: AllowlistApi, listen: str) -> ApiServer:
    host, port = parse_listen(listen)
    if not ipaddress.ip_address(host).is_loopback:
        log.warning("allowlist API listens beyond loopback: put TLS in front", extra={"host": host})
    return ApiServer((host, port), api)
