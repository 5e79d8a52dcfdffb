"""The allowlist HTTP API over real HTTP, against a real redis-server."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from filterd.allowlist.api import AllowlistApi, ApiConfigError, load_secret, make_server, make_token
from filterd.allowlist.config import Config
from filterd.allowlist.store import AllowlistStore

pytestmark = pytest.mark.integration

SECRET = b"0123456789abcdef-test-secret"


class Api:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        payload = json.loads(response.read() or b"{}")
        conn.close()
        return response.status, payload


@pytest.fixture
def api(redis_url: str) -> Iterator[Api]:
    config = Config(max_entries_per_mailbox=5, api_max_body_bytes=2048)
    store = AllowlistStore(redis.Redis.from_url(redis_url), config)
    server = make_server(AllowlistApi(store, config, SECRET), "127.0.0.1:0")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield Api(server.server_address[1])
    server.shutdown()
    server.server_close()


def tok(key: str) -> str:
    return make_token(SECRET, key)


ALICE = "/v1/allowlists/alice%40example.org"


def test_add_list_remove(api: Api) -> None:
    status, body = api.call(
        "POST",
        ALICE + "/entries",
        {"entries": ["Friend@Bank.example", "*@münchen.de"]},
        tok("alice@example.org"),
    )
    assert status == 200, body
    assert body["added"] == ["friend@bank.example", "*@xn--mnchen-3ya.de"]
    assert body["count"] == 2 and body["limit"] == 5
    # The sub-addressed, upper-case spelling names the same list and the same token opens it.
    status, body = api.call(
        "GET", "/v1/allowlists/" + quote("Alice+x@EXAMPLE.org"), token=tok("alice@example.org")
    )
    assert status == 200
    assert body == {
        "mailbox": "alice@example.org",
        "entries": ["*@xn--mnchen-3ya.de", "friend@bank.example"],
        "count": 2,
        "limit": 5,
    }
    status, body = api.call(
        "DELETE",
        ALICE + "/entries",
        {"entries": ["friend@bank.example", "x@y.example"]},
        tok("alice@example.org"),
    )
    assert status == 200
    assert body["removed"] == ["friend@bank.example"] and body["not_present"] == ["x@y.example"]
    status, body = api.call(
        "DELETE", ALICE + "/entries?entry=" + quote("*@münchen.de"), token=tok("alice@example.org")
    )
    assert status == 200 and body["count"] == 0


def test_cross_user_access_is_refused(api: Api) -> None:
    api.call(
        "POST", ALICE + "/entries", {"entries": ["friend@bank.example"]}, tok("alice@example.org")
    )
    bob = tok("bob@example.org")
    assert api.call("GET", ALICE, token=bob)[0] == 403
    assert api.call("POST", ALICE + "/entries", {"entries": ["evil@x.example"]}, bob)[0] == 403
    assert (
        api.call("DELETE", ALICE + "/entries", {"entries": ["friend@bank.example"]}, bob)[0] == 403
    )
    # A mailbox token does not open its domain's list, nor the other way round.
    assert (
        api.call("GET", "/v1/allowlists/%40example.org", token=tok("alice@example.org"))[0] == 403
    )
    assert api.call("GET", ALICE, token=tok("@example.org"))[0] == 403
    assert api.call("GET", "/v1/allowlists/%40example.org", token=tok("@example.org"))[0] == 200
    # Tokens made with another secret, truncated, or non-ASCII, fail.
    assert (
        api.call("GET", ALICE, token=make_token(b"another-secret-0123456", "alice@example.org"))[0]
        == 403
    )
    assert api.call("GET", ALICE, token=tok("alice@example.org")[:-1])[0] == 403
    assert (
        api.call(
            "GET", ALICE, headers={"Authorization": "Bearer t\u00f6ken".encode().decode("latin-1")}
        )[0]
        == 403
    )
    status, body = api.call("GET", ALICE)
    assert status == 401 and body["error"] == "unauthorized"
    assert api.call("GET", ALICE, headers={"Authorization": "Basic abc"})[0] == 401
    status, body = api.call("GET", ALICE, token=tok("alice@example.org"))
    assert body["entries"] == ["friend@bank.example"]


@pytest.mark.parametrize(
    ("method", "path", "payload", "raw", "status", "error"),
    [
        ("POST", ALICE + "/entries", {"entries": ["example.org"]}, None, 400, "invalid_entry"),
        (
            "POST",
            ALICE + "/entries",
            {"entries": ["a@b.example", "10.0.0.0/8"]},
            None,
            400,
            "invalid_entry",
        ),
        (
            "POST",
            ALICE + "/entries",
            {"entries": ["x\u0000@y.example"]},
            None,
            400,
            "invalid_entry",
        ),
        ("POST", ALICE + "/entries", {"entries": "a@b.example"}, None, 400, "invalid_request"),
        ("POST", ALICE + "/entries", {"entries": [1]}, None, 400, "invalid_request"),
        ("POST", ALICE + "/entries", {"entries": []}, None, 400, "invalid_request"),
        (
            "POST",
            ALICE + "/entries",
            {"entries": ["a@b.example"], "x": 1},
            None,
            400,
            "invalid_request",
        ),
        ("POST", ALICE + "/entries", None, b"{not json", 400, "invalid_json"),
        ("POST", ALICE + "/entries", None, b"\xff\xfe", 400, "invalid_json"),
        ("POST", ALICE + "/entries", None, b"", 400, "invalid_request"),
        ("POST", ALICE + "/entries", None, b"[" * 3000, 413, "too_large"),
        (
            "POST",
            ALICE + "/entries",
            {"entries": ["a@b.example"] * 6},
            None,
            400,
            "invalid_request",
        ),
        ("GET", "/v1/allowlists/not-a-mailbox", None, None, 400, "invalid_mailbox"),
        ("GET", "/v1/allowlists/%2A%40example.org", None, None, 400, "invalid_mailbox"),
        ("GET", "/v1/allowlists/%ff%40example.org", None, None, 400, "invalid_mailbox"),
        (
            "GET",
            "/v1/allowlists/" + "a" * 300 + "%40example.org",
            None,
            None,
            400,
            "invalid_mailbox",
        ),
        ("GET", "/v1/other", None, None, 404, "not_found"),
        ("GET", ALICE + "/nothing", None, None, 404, "not_found"),
        ("PUT", ALICE, None, None, 405, "method_not_allowed"),
    ],
)
def test_malformed_requests(
    api: Api, method: str, path: str, payload: Any, raw: bytes | None, status: int, error: str
) -> None:
    got, body = api.call(method, path, payload, tok("alice@example.org"), raw=raw)
    assert (got, body.get("error")) == (status, error), body
    # Nothing was written by any refused request.
    assert api.call("GET", ALICE, token=tok("alice@example.org"))[1]["entries"] == []


def test_invalid_entry_errors_say_which_and_why(api: Api) -> None:
    status, body = api.call(
        "POST", ALICE + "/entries", {"entries": ["ok@x.example", "*@com"]}, tok("alice@example.org")
    )
    assert status == 400
    assert body["errors"] == [{"index": 1, "entry": "*@com", "error": body["errors"][0]["error"]}]
    assert "public suffix" in body["errors"][0]["error"]


def test_limit_gives_409_and_writes_nothing(api: Api) -> None:
    t = tok("alice@example.org")
    assert (
        api.call("POST", ALICE + "/entries", {"entries": [f"u{i}@x.example" for i in range(4)]}, t)[
            0
        ]
        == 200
    )
    status, body = api.call(
        "POST", ALICE + "/entries", {"entries": ["a@y.example", "b@y.example"]}, t
    )
    assert status == 409 and body["error"] == "limit_exceeded" and body["limit"] == 5
    assert api.call("GET", ALICE, token=t)[1]["count"] == 4


def test_wrong_content_type_and_chunked(api: Api) -> None:
    t = tok("alice@example.org")
    status, _ = api.call(
        "POST",
        ALICE + "/entries",
        {"entries": ["a@b.example"]},
        t,
        headers={"Content-Type": "text/plain"},
    )
    assert status == 415
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
    conn.putrequest("POST", ALICE + "/entries")
    conn.putheader("Authorization", f"Bearer {t}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 411
    conn.close()


def test_health_needs_no_token(api: Api) -> None:
    assert api.call("GET", "/v1/health") == (200, {"status": "ok"})


def test_store_down_gives_503() -> None:
    config = Config()
    store = AllowlistStore(
        redis.Redis(
            host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        ),
        config,
    )
    response = AllowlistApi(store, config, SECRET).handle(
        "GET", ALICE, {"Authorization": f"Bearer {tok('alice@example.org')}"}, None
    )
    assert response.status == 503 and response.body["error"] == "unavailable"


def test_secret_is_required_and_read_from_file(tmp_path: Any) -> None:
    with pytest.raises(ApiConfigError, match="no API secret"):
        load_secret(Config())
    with pytest.raises(ApiConfigError, match="at least 16"):
        load_secret(Config(api_secret="short"))
    path = tmp_path / "secret"
    path.write_text("file-secret-0123456789\n")
    assert load_secret(Config(api_secret_file=str(path))) == b"file-secret-0123456789"
    assert "file-secret" not in repr(Config(api_secret="file-secret-0123456789"))


def test_listen_is_loopback_by_default() -> None:
    assert Config().api_listen.startswith("127.0.0.1:")


def test_api_command_serves(redis_url: str, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys
    import time

    from tests.servers import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILTERD_")}
    env.update(
        {
            "FILTERD_REDIS_URL": redis_url,
            "FILTERD_ALLOWLIST_API_SECRET": SECRET.decode(),
            "FILTERD_PIPELINE_RECIPIENT_CHECKS": "[]",
            "FILTERD_PIPELINE_MESSAGE_CHECKS": "[]",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "filterd", "api", "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = Api(port)
        deadline = time.monotonic() + 15
        while True:
            try:
                assert client.call("GET", "/v1/health")[0] == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "API did not start"
                time.sleep(0.05)
        status, body = client.call("GET", ALICE, token=tok("alice@example.org"))
        assert status == 200 and body["entries"] == []
        assert client.call("GET", ALICE, token=tok("bob@example.org"))[0] == 403
    finally:
        proc.terminate()
        proc.wait(10)


def test_openapi_description_names_every_error_code() -> None:
    import re
    from pathlib import Path

    import filterd.allowlist.api as module

    source = Path(module.__file__).read_text()
    codes = set(re.findall(r'_error\(\s*\d+,\s*"(\w+)"', source))
    assert {"forbidden", "unauthorized", "invalid_entry", "too_large"} <= codes
    spec = (Path(__file__).resolve().parent.parent / "docs" / "allowlist-api.yaml").read_text()
    assert [c for c in sorted(codes) if c not in spec] == []
    for status in ("400", "401", "403", "409", "413"):
        assert f'"{status}":' in spec
