"""The retention schema: strict loading, value validation, the statistics table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from filterd import keyspace as keys
from filterd.records.config import Config
from filterd.records.schema import (
    DEFAULT_SCHEMA,
    SchemaError,
    SchemaViolation,
    load_schema,
    validate,
)
from filterd.settings import load_settings

DEFAULT_TEXT = DEFAULT_SCHEMA.read_text(encoding="utf-8")
LOG_FIELDS_HEADER = "[kinds.smtp-log.fields]\n"


def _variant(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "retention.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _with_log_field(tmp_path: Path, line: str) -> Path:
    assert LOG_FIELDS_HEADER in DEFAULT_TEXT
    return _variant(tmp_path, DEFAULT_TEXT.replace(LOG_FIELDS_HEADER, LOG_FIELDS_HEADER + line))


def test_shipped_schema_keeps_the_promise() -> None:
    schema = load_schema()
    log = schema.kind("smtp-log")
    assert log.retention.seconds == 7 * 86400
    assert set(log.fields) >= {
        "timestamp",
        "queue_id",
        "action",
        "reason_code",
        "size",
        "sender",
        "recipients",
        "message_id",
        "client_ip",
    }
    # An IP is kept with a mailbox reference only in kinds that expire within 7 days.
    for kind in schema.kinds.values():
        types = {f.type for f in kind.fields.values()}
        if "ip" in types and types & {"address", "address-list"}:
            assert kind.retention.seconds is not None
            assert kind.retention.seconds <= 7 * 86400, kind.name
    counters = schema.kind("daily-counters")
    assert counters.retention.seconds is not None and counters.retention.seconds > 7 * 86400
    assert not {f.type for f in counters.fields.values()} & {"address", "address-list", "ip"}
    for kind in schema.kinds.values():
        assert not set(kind.fields) & {"subject", "body", "attachment_names", "headers"}
        if kind.owner == "records" and kind.store == "redis":
            assert kind.retention.expires, kind.name


def test_field_without_retention_tag_is_refused(tmp_path: Path) -> None:
    path = _with_log_field(tmp_path, 'helo = { type = "name" }\n')
    with pytest.raises(SchemaError, match=r"smtp-log.*'helo'.*no retention tag"):
        load_schema(path)


def test_field_with_undefined_tag_is_refused(tmp_path: Path) -> None:
    path = _with_log_field(tmp_path, 'helo = { tag = "forever", type = "name" }\n')
    with pytest.raises(SchemaError, match=r"'forever' is not defined"):
        load_schema(path)


def test_forbidden_field_is_refused_even_without_the_files_never_list(tmp_path: Path) -> None:
    text = re.sub(r"(?ms)^never = \[.*?\]\n", "", DEFAULT_TEXT)
    assert "never =" not in text
    text = text.replace(
        LOG_FIELDS_HEADER, LOG_FIELDS_HEADER + 'subject = { tag = "smtp-log", type = "name" }\n'
    )
    with pytest.raises(SchemaError, match=r"'subject'.*may never be stored"):
        load_schema(_variant(tmp_path, text))


def test_one_kind_with_two_expiries_is_refused(tmp_path: Path) -> None:
    path = _with_log_field(tmp_path, 'helo = { tag = "stats", type = "name" }\n')
    with pytest.raises(SchemaError, match="different tags"):
        load_schema(path)


def test_records_may_not_be_kept_until_removed(tmp_path: Path) -> None:
    text = DEFAULT_TEXT.replace('smtp-log = "7d"', 'smtp-log = "until-removed"')
    with pytest.raises(SchemaError, match="records must expire"):
        load_schema(_variant(tmp_path, text))


@pytest.mark.parametrize("value", ["7", "0d", "7w", "-1d", "seven days", ""])
def test_bad_durations_are_refused(tmp_path: Path, value: str) -> None:
    text = DEFAULT_TEXT.replace('smtp-log = "7d"', f'smtp-log = "{value}"')
    with pytest.raises(SchemaError, match="smtp-log"):
        load_schema(_variant(tmp_path, text))


def test_short_durations_parse(tmp_path: Path) -> None:
    text = DEFAULT_TEXT.replace('smtp-log = "7d"', 'smtp-log = "2s"')
    assert load_schema(_variant(tmp_path, text)).kind("smtp-log").retention.seconds == 2


def test_undeclared_field_is_refused_at_write_time() -> None:
    kind = load_schema().kind("smtp-log")
    with pytest.raises(SchemaViolation, match="'subject' is not declared"):
        validate(kind, {"timestamp": 1.0, "subject": "hello"})


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("daily-counters", "reason_code", "alice@example.org"),
        ("daily-counters", "reason_code", "192.0.2.10"),
        ("daily-counters", "day", "2026-01-01 alice@example.org"),
        ("smtp-log", "sender", "Alice Example <alice@example.org>"),
        ("smtp-log", "sender", "alice@example.org\r\nSubject: hi"),
        ("smtp-log", "recipients", "bob@example.org"),
        ("smtp-log", "client_ip", "mail.example.net"),
        ("smtp-log", "message_id", "<a b@c>"),
        ("smtp-log", "reply_code", "554 5.7.1 virus found"),
        ("smtp-log", "size", -1),
        ("smtp-log", "action", "discard"),
    ],
)
def test_values_are_type_checked(kind: str, field: str, value: object) -> None:
    with pytest.raises(SchemaViolation) as info:
        validate(load_schema().kind(kind), {field: value})
    # The error (which ends up in logs) does not repeat the refused value.
    assert "example" not in str(info.value) and "192.0.2" not in str(info.value)


def test_valid_values_pass_and_none_is_dropped() -> None:
    kind = load_schema().kind("smtp-log")
    out = validate(
        kind,
        {
            "timestamp": 1700000000.12345,
            "action": "reject",
            "reason_code": "CLAMAV_VIRUS",
            "reply_code": "554 5.7.1",
            "sender": "",
            "recipients": ("bob@example.org",),
            "client_ip": "2001:DB8::1",
            "message_id": None,
        },
    )
    assert out == {
        "timestamp": 1700000000.123,
        "action": "reject",
        "reason_code": "CLAMAV_VIRUS",
        "reply_code": "554 5.7.1",
        "sender": "",
        "recipients": ["bob@example.org"],
        "client_ip": "2001:db8::1",
    }


@pytest.mark.parametrize(
    ("action", "reason", "category"),
    [
        ("accept", "OK", "accepted"),
        ("accept", "DNSBL_SPAMCOP", "accepted"),
        ("reject", "CLAMAV_VIRUS", "virus"),
        ("reject", "BANNED_EXECUTABLE", "banned-type"),
        ("reject", "ENCRYPTED_ARCHIVE", "banned-type"),
        ("reject", "DNSBL_ZEN_SBL", "blocklist"),
        ("reject", "URIBL_DBL_SPAM", "blocklist"),
        ("reject", "CLASSIFIER_SPAM", "classifier"),
        ("reject", "OVERSIZE", "refused-other"),
        ("tempfail", "CLAMAV_FAIL", "tempfailed"),
        ("tempfail", "SPLIT_RECIPIENTS", "split"),
    ],
)
def test_statistics_categories_come_from_the_table(action: str, reason: str, category: str) -> None:
    assert load_schema().category(action, reason) == category


def test_every_key_builder_lands_in_its_declared_kind() -> None:
    schema = load_schema()
    built = {
        "smtp-log": keys.log_key("0123456789ab"),
        "mailbox-index": keys.index_key("alice@example.org"),
        "daily-counters": keys.stats_key("2026-11-22"),
        "abuse-evidence": keys.abuse_key("0123456789ab"),
        "pseudonym-key": keys.pseudonym_key(12345),
    }
    for kind, key in built.items():
        suffix = keys.strip_prefix(key)
        assert suffix is not None
        found = schema.kind_for_key(suffix)
        assert found is not None and found.name == kind, key
    assert schema.kind_for_key("allow:mbox:alice@example.org") is not None
    assert schema.kind_for_key("something:else") is None


@pytest.mark.parametrize(
    ("address", "separators", "expected"),
    [
        ("Alice+Shop@Example.ORG", "+", "alice@example.org"),
        ("alice+shop@example.org", "", "alice+shop@example.org"),
        ("+only@example.org", "+", "+only@example.org"),
        ("a-b+c@example.org", "+-", "a@example.org"),
        ("<postmaster>", "+", "postmaster"),
    ],
)
def test_mailbox_normalisation(address: str, separators: str, expected: str) -> None:
    assert keys.normalise_mailbox(address, separators) == expected


def test_records_section_loads_with_defaults_and_env(tmp_path: Path) -> None:
    config = tmp_path / "filterd.toml"
    config.write_text("[pipeline]\nrecipient_checks = []\nmessage_checks = []\n")
    settings = load_settings(config, env={"FILTERD_RECORDS_PSEUDONYMISE": "true"})
    section = settings.section("records")
    assert isinstance(section, Config)
    assert section.enabled and section.pseudonymise and not section.abuse_evidence
    assert section.resolve(section.schema_file) == DEFAULT_SCHEMA
