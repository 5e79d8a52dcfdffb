"""A small HTTP JSON API for a customer panel: list, add and remove one mailbox's entries.

Authentication is a per-list token ``EXPIRES.GEN.MAC`` with
``MAC = hex(HMAC-SHA256(secret, "filterd-allowlist-token|v2|key|EXPIRES|GEN"))``,
where ``key`` is the canonical mailbox (``alice@example.org``) or ``@domain``
for a hosted domain's list, ``EXPIRES`` a Unix time and ``GEN`` the list's
revocation generation. The panel holds the secret and computes the token for
the user it has logged in; the token opens that one list and no other, until it
expires or the list's tokens are revoked (``filterd allow revoke-tokens LIST``
raises the generation of that list only), and is compared in constant time.
Failed token checks are limited per client address and per list
(``api_max_failed_attempts`` per ``api_failed_window_seconds``, then 429): the
limiter is in memory, so no client IP is ever stored. Canonical means:
lower-case, IDN domain as punycode, sub-address folded; a local part that only
case folding or NFKC turns into ASCII (Kelvin sign, long s, fullwidth letters)
is refused, so no address folds onto another user's list -- ``GET`` returns the
key it used.

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
import threading
import time
from collections import deque
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


TOKEN_CONTEXT = "filterd-allowlist-token|v2"
DEFAULT_TOKEN_SECONDS = 30 * 86400


def _mac(secret: bytes, key: str, expires: int, generation: int) -> str:
    message = f"{TOKEN_CONTEXT}|{key}|{expires}|{generation}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def make_token(
    secret: bytes,
    key: str,
    *,
    generation: int = 0,
    ttl: float = DEFAULT_TOKEN_SECONDS,
    now: float | None = None,
) -> str:
    """The token for one list: what the panel computes for its logged-in user.

    ``generation`` is the list's revocation generation (0 until its tokens are
    first revoked; ``AllowlistStore.token_generation``).
    """
    expires = int((time.time() if now is None else now) + ttl)
    return f"{expires}.{generation}.{_mac(secret, key, expires, generation)}"


def check_token(
    secret: bytes, key: str, token: str, generation: int, now: float | None = None
) -> str | None:
    """None when ``token`` opens list ``key``; else why not: forbidden | expired | revoked.

    A first-release token (a bare HMAC of the key, no expiry) of this very list is
    "expired", not "forbidden": the panel then knows to fetch a new one after the
    upgrade instead of reporting a wrong secret.
    """
    if "." not in token:
        legacy = hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()
        same = hmac.compare_digest(token.encode("utf-8", "replace"), legacy.encode("ascii"))
        return "expired" if same else "forbidden"
    expires_text, _, rest = token.partition(".")
    gen_text, _, mac = rest.partition(".")
    if not (expires_text.isascii() and expires_text.isdigit()):
        return "forbidden"
    if not (gen_text.isascii() and gen_text.isdigit()) or len(expires_text + gen_text) > 30:
        return "forbidden"
    expires, token_gen = int(expires_text), int(gen_text)
    expected = _mac(secret, key, expires, token_gen).encode("ascii")
    if not hmac.compare_digest(mac.encode("utf-8", "replace"), expected):
        return "forbidden"
    if token_gen != generation:
        return "revoked"
    if expires <= (time.time() if now is None else now):
        return "expired"
    return None


class FailureLimiter:
    """Failed token checks per client address and per list in a sliding window.

    Hand-written (a few lines) because it must stay in memory: a Redis-backed
    limiter would store client IPs next to mailbox names. Bounded: at most
    ``max_keys`` tracked names; the oldest is forgotten first.
    """

    def __init__(self, limit: int, window: float, max_keys: int = 100000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> deque[float]:
        times = self._seen.get(name)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._seen[name]
        return times

    def blocked(self, names: list[str], now: float | None = None) -> float:
        """Seconds until ``names`` may try again (0: not blocked)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            wait = 0.0
            for name in names:
                times = self._recent(name, now)
                if len(times) >= self.limit:
                    wait = max(wait, times[0] + self.window - now)
            return wait

    def failed(self, names: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for name in names:
                self._recent(name, now)
                if name not in self._seen and len(self._seen) >= self.max_keys:
                    del self._seen[next(iter(self._seen))]
                self._seen.setdefault(name, deque(maxlen=self.limit)).append(now)


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
        self.limiter = FailureLimiter(
            config.api_max_failed_attempts, config.api_failed_window_seconds
        )

    def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
        client: str = "",
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
        try:
            denied = self._authenticate(target, token, client)
            if denied is not None:
                return denied
            if method == "GET":
                return self._list(target)
            items = _body_entries(body, parts.query if method == "DELETE" else "", self.config)
            if isinstance(items, Response):
                return items
            return self._add(target, items) if method == "POST" else self._remove(target, items)
        except redis.RedisError as exc:
            log.error("allowlist API: store unavailable", extra={"error": type(exc).__name__})
            return _error(503, "unavailable", "the allowlist store is unavailable; retry later")

    def _authenticate(self, target: Target, token: str, client: str) -> Response | None:
        names = [f"client:{client}", f"list:{target.key}"]
        wait = self.limiter.blocked(names)
        if wait > 0:
            response = _error(429, "too_many_failures", "too many failed token checks; retry later")
            response.headers["Retry-After"] = str(max(1, int(wait + 0.999)))
            return response
        why = check_token(self.secret, target.key, token, self.store.token_generation(target))
        if why is None:
            return None
        self.limiter.failed(names)
        if why == "expired":
            return _error(401, "token_expired", "the token has expired; get a new one")
        if why == "revoked":
            return _error(401, "token_revoked", "the token was revoked; get a new one")
        return _error(403, "forbidden", "the token does not open this list")

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
            response = api.handle(
                self.command,
                self.path,
                self.headers,  # type: ignore[arg-type]
                body,
                client=str(self.client_address[0]),
            )
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
