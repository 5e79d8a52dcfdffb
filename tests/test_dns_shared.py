"""One DNS resolver ([dns]) built once and shared by the dnsbl and uribl checks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filterd.runtime import Runtime
from filterd.settings import load_settings
from filterd.types import Envelope, Message
from tests.servers import RbldnsdServer, write_config
from tests.test_dnsbl import DBL_LIST, ZONES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rbl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbldnsdServer]:
    with RbldnsdServer(tmp_path_factory.mktemp("rbldnsd-shared"), ZONES) as server:
        yield server


def runtime(tmp_path: Path, rbl: RbldnsdServer, **extra: dict[str, Any]) -> Runtime:
    dbl_helo = {**DBL_LIST, "targets": ["helo", "sender"]}
    dbl_body = {**DBL_LIST, "targets": ["from", "body"]}
    sections: dict[str, dict[str, Any]] = {
        "pipeline": {"recipient_checks": ["dnsbl"], "message_checks": ["uribl"]},
        "dns": {"nameservers": rbl.nameserver},
        "dnsbl": {"lists": [dbl_helo], "skip_private": False},
        "uribl": {"lists": [dbl_body]},
        "records": {"enabled": False},
    }
    for name, keys in extra.items():
        sections.setdefault(name, {}).update(keys)
    path = write_config(tmp_path / "filterd.toml", sections)
    return Runtime(load_settings(path, env={}))


def test_both_checks_share_one_resolver_and_one_cache(tmp_path: Path, rbl: RbldnsdServer) -> None:
    rt = runtime(tmp_path, rbl)
    try:
        checks = rt.pipeline.checks
        shared = rt.services.resolver
        assert shared is not None
        assert checks["dnsbl"].engine.resolver is shared  # type: ignore[attr-defined]
        assert checks["uribl"].engine.resolver is shared  # type: ignore[attr-defined]
        env = Envelope(client_ip="192.0.2.1", helo="mx.linked.example", mail_from="a@b.example")
        qname = "linked.example.dbl.test"
        before = rbl.query_count(qname)
        rcpt = rt.pipeline.judge_recipient(env, "u@example.org", None)
        assert "DNSBL_DBL_SPAM" in {f.code for f in rcpt.findings}
        raw = b"From: x@linked.example\r\nSubject: t\r\n\r\nsee http://www.linked.example/\r\n"
        decision = rt.pipeline.judge_message(Message.from_bytes(raw, env), [])
        assert "URIBL_DBL_SPAM" in {f.code for f in decision.findings}
        # uribl's lookup of the same name was answered from the cache dnsbl filled.
        assert rbl.query_count(qname) - before == 1
    finally:
        rt.retire()


def test_old_per_check_nameservers_still_work_with_a_warning(
    tmp_path: Path, rbl: RbldnsdServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        rt = runtime(
            tmp_path, rbl, dns={"nameservers": "127.0.0.1:9"}, uribl={"nameservers": rbl.nameserver}
        )
    try:
        uribl_engine = rt.pipeline.checks["uribl"].engine  # type: ignore[attr-defined]
        assert uribl_engine.resolver is not rt.services.resolver
        assert "[uribl] nameservers: deprecated here" in caplog.text
        raw = b"From: x@linked.example\r\n\r\nbody\r\n"
        decision = rt.pipeline.judge_message(Message.from_bytes(raw, Envelope()), [])
        assert "URIBL_DBL_SPAM" in {f.code for f in decision.findings}
    finally:
        rt.retire()
