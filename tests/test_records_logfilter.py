"""Log lines on stderr: addresses and IPs only where the retention schema allows."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from filterd.logsetup import JsonFormatter
from filterd.records.logfilter import (
    ADDRESS_MASK,
    IP_MASK,
    REMOVED,
    Redactor,
    install,
    install_from_config,
)
from filterd.records.schema import DEFAULT_SCHEMA, load_schema


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("filterd.test_records_logfilter")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def test_addresses_and_ips_are_masked_everywhere(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    install(load_schema(), [handler])
    try:
        raise ConnectionError("lookup for bob@example.org from 198.51.100.7 failed")
    except ConnectionError:
        logger.exception(
            "refused %s from %s via 2001:db8::1",
            "alice@example.org",
            "192.0.2.10",
            extra={
                "client": "192.0.2.10",
                "rcpts": ["carol@example.org"],
                "redis": "127.0.0.1:6379",
                "code": "DNSBL_ZEN_SBL",
                "subject": "Quarterly zebra plan",
            },
        )
    line = json.loads(stream.getvalue())
    text = json.dumps(line)
    for personal in (
        "alice@",
        "bob@",
        "carol@",
        "192.0.2.10",
        "198.51.100.7",
        "2001:db8::1",
        "zebra",
    ):
        assert personal not in text, personal
    assert line["msg"] == f"refused {ADDRESS_MASK} from {IP_MASK} via {IP_MASK}"
    assert line["client"] == IP_MASK and line["rcpts"] == [ADDRESS_MASK]
    assert line["redis"] == "127.0.0.1:6379"  # our own loopback service, not a person
    assert line["code"] == "DNSBL_ZEN_SBL" and line["subject"] == REMOVED
    assert "ConnectionError" in line["exc"] and ADDRESS_MASK in line["exc"]


def test_plain_formatter_gets_the_redacted_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    install(None, [handler])
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), None)
    try:
        raise ValueError("dave@example.net")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    handler.handle(record)
    out = stream.getvalue()
    assert "ValueError" in out and "dave@" not in out and ADDRESS_MASK in out


def test_schema_can_allow_ips_on_stderr(tmp_path: Path) -> None:
    text = DEFAULT_SCHEMA.read_text().replace(
        "[kinds.stderr-log.fields]\n",
        '[kinds.stderr-log.fields]\nclient_ip = { tag = "smtp-log", type = "ip" }\n',
    )
    path = tmp_path / "retention.toml"
    path.write_text(text)
    redactor = Redactor.from_schema(load_schema(path))
    masked = redactor.text("from 192.0.2.10 for a@example.org")
    assert masked == f"from 192.0.2.10 for {ADDRESS_MASK}"
    assert Redactor.from_schema(load_schema()).text("192.0.2.10") == IP_MASK


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3",
        "took 12:30:45",
        "code 5.7.1",
        "DNSBL_ZEN_SBL",
        "queue 4ABC123DEF",
        "127.0.0.1:6379",
        "::1",
    ],
)
def test_non_personal_text_is_left_alone(text: str) -> None:
    assert Redactor().text(text) == text


@pytest.mark.parametrize(
    "text",
    ["203.0.113.9", "[2001:db8::25]:25", "::ffff:192.0.2.1", "fe80::1%eth0", "x <u@d.example>"],
)
def test_personal_text_is_masked(text: str) -> None:
    out = Redactor().text(text)
    assert out != text and (IP_MASK in out or ADDRESS_MASK in out), out


def test_install_is_idempotent(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    _, _, handler = capture
    install(None, [handler])
    install(None, [handler])
    assert len(handler.filters) == 1


def test_install_from_config_uses_the_configured_schema(tmp_path: Path) -> None:
    from filterd.records.config import Config

    text = DEFAULT_SCHEMA.read_text().replace(
        "[kinds.stderr-log.fields]\n",
        '[kinds.stderr-log.fields]\nclient_ip = { tag = "smtp-log", type = "ip" }\n',
    )
    path = tmp_path / "retention.toml"
    path.write_text(text)
    handler = logging.StreamHandler(io.StringIO())
    log_filter = install_from_config(Config(schema_file=str(path)), [handler])
    assert log_filter.redactor.allow_ips and not log_filter.redactor.allow_addresses
    strict = install_from_config(Config(enabled=False, schema_file=str(path)), [handler])
    assert not strict.redactor.allow_ips and handler.filters == [strict]
