"""Issue 15 item 9 (identities): expiring, revocable per-list tokens; failed-attempt limit;
no mailbox spelling folds onto another user's list (Kelvin sign U+212A vs ``ken@``).

Against a real Redis and the real HTTP server, through the same client as
tests/test_allowlist_api.py.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from filterd.allowlist.api import AllowlistApi, make_server, make_token
from filterd.allowlist.config import Config
from filterd.allowlist.entries import EntryError, parse_entry, parse_target, sender_address
from filterd.allowlist.store import AllowlistStore
from tests.test_allowlist_api import Api

pytestmark = pytest.mark.integration

SECRET = b"0123456789abcdef-test-secret"
ALICE, BOB = "/v1/allowlists/alice%40example.org", "/v1/allowlists/bob%40example.org"
KELVIN = "\u212a"


@pytest.fixture
def served(redis_url: str) -> Iterator[tuple[Api, AllowlistStore]]:
    config = Config(api_max_failed_attempts=5, api_failed_window_seconds=60)
    store = AllowlistStore(redis.Redis.from_url(redis_url), config)
    server = make_server(AllowlistApi(store, config, SECRET), "127.0.0.1:0")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield Api(server.server_address[1]), store
    server.shutdown()
    server.server_close()


def test_kelvin_sign_and_other_ascii_folds_are_refused_not_folded() -> None:
    config = Config()
    assert parse_target("ken@example.org", config).key == "ken@example.org"
    for spoof in (f"{KELVIN}en@example.org", "\u017fam@example.org", "\uff4ben@example.org"):
        with pytest.raises(EntryError, match="plain ASCII"):
            parse_target(spoof, config)
        with pytest.raises(EntryError, match="plain ASCII"):
            parse_entry(spoof, config)
        # A sender spelled that way matches no address entry (never ken@'s).
        assert sender_address(spoof) is None
    # Real non-ASCII local parts keep working and stay distinct.
    assert parse_target("stra\u00dfe@example.org", config).key == "stra\u00dfe@example.org"
    assert parse_target("M\u00fcller@example.org", config).key == "m\u00fcller@example.org"


def test_kelvin_mailbox_gets_400_not_kens_list(served: tuple[Api, AllowlistStore]) -> None:
    api, _ = served
    token = make_token(SECRET, "ken@example.org")
    status, body = api.call("GET", "/v1/allowlists/%E2%84%AAen%40example.org", token=token)
    assert status == 400 and body["error"] == "invalid_mailbox"


def test_expired_token_is_refused(served: tuple[Api, AllowlistStore]) -> None:
    api, _ = served
    assert api.call("GET", ALICE, token=make_token(SECRET, "alice@example.org"))[0] == 200
    old = make_token(SECRET, "alice@example.org", ttl=60, now=time.time() - 61)
    status, body = api.call("GET", ALICE, token=old)
    assert status == 401 and body["error"] == "token_expired"
    # The first release's format (a bare HMAC of the key) opens nothing any more; on its
    # own list it reads as expired (the panel fetches a new one), elsewhere as forbidden.
    legacy = hmac.new(SECRET, b"alice@example.org", hashlib.sha256).hexdigest()
    status, body = api.call("GET", ALICE, token=legacy)
    assert status == 401 and body["error"] == "token_expired"
    assert api.call("GET", BOB, token=legacy)[0] == 403
    assert api.call("GET", ALICE, token="0" * 64)[0] == 403


def test_revoking_one_lists_tokens_leaves_the_others(served: tuple[Api, AllowlistStore]) -> None:
    api, store = served
    alice = make_token(SECRET, "alice@example.org")
    bob = make_token(SECRET, "bob@example.org")
    target = parse_target("alice@example.org", store.config)
    assert store.revoke_tokens(target) == 1
    status, body = api.call("GET", ALICE, token=alice)
    assert status == 401 and body["error"] == "token_revoked"
    assert api.call("GET", BOB, token=bob)[0] == 200
    fresh = make_token(SECRET, "alice@example.org", generation=store.token_generation(target))
    assert api.call("GET", ALICE, token=fresh)[0] == 200
    # Forging the generation without the secret does not help.
    expires, _gen, mac = alice.split(".")
    assert api.call("GET", ALICE, token=f"{expires}.1.{mac}")[0] == 403


def test_failed_attempts_are_limited(served: tuple[Api, AllowlistStore]) -> None:
    api, _ = served
    good = make_token(SECRET, "alice@example.org")
    for n in range(5):
        assert api.call("GET", ALICE, token=f"{n}.0.{'0' * 64}")[0] == 403
    status, body = api.call("GET", ALICE, token=good)
    assert status == 429 and body["error"] == "too_many_failures"
    # Another list from the same client address is blocked too (guessing is per client).
    assert api.call("GET", BOB, token=make_token(SECRET, "bob@example.org"))[0] == 429
