"""Configuration: validation errors name the key; env overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd.addresses import (
    AddressError,
    parse_clamd_address,
    parse_milter_socket,
    parse_nameservers,
)
from filterd.settings import DEFAULT_CONFIG, ConfigError, load_settings

CORE_ONLY = """
[pipeline]
recipient_checks = []
message_checks = []
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "filterd.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid() -> None:
    settings = load_settings(DEFAULT_CONFIG, env={})
    assert settings.milter.socket == "unix:/run/filterd/milter.sock"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, CORE_ONLY + "[milter]\nsockett = 'inet:1@127.0.0.1'\n")
    with pytest.raises(ConfigError, match=r"\[milter\] sockett"):
        load_settings(path, env={})


def test_bad_type_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, CORE_ONLY + "[policy]\nreject_score = 'lots'\n")
    with pytest.raises(ConfigError, match=r"\[policy\] reject_score.*'lots'"):
        load_settings(path, env={})


def test_bad_socket_string_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, CORE_ONLY + "[milter]\nsocket = 'tcp:8894'\n")
    with pytest.raises(ConfigError, match=r"\[milter\] socket.*unknown kind 'tcp'"):
        load_settings(path, env={})


def test_unknown_section_and_check(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown section"):
        load_settings(write(tmp_path, CORE_ONLY + "[spamfilter]\nx = 1\n"), env={})
    text = "[pipeline]\nrecipient_checks = []\nmessage_checks = ['nosuchcheck']\n"
    with pytest.raises(ConfigError, match="unknown check 'nosuchcheck'"):
        load_settings(write(tmp_path, text), env={})


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[milter\n"), env={})


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, CORE_ONLY)
    env = {
        "FILTERD_MILTER_SOCKET": "unix:/run/filterd/milter.sock",
        "FILTERD_POLICY_REJECT_SCORE": "12.5",
        "FILTERD_REDIS_URL": "redis://127.0.0.1:6380/2",
    }
    s = load_settings(path, env=env)
    assert s.milter.socket == "unix:/run/filterd/milter.sock"
    assert s.policy.reject_score == 12.5
    assert s.redis.url == "redis://127.0.0.1:6380/2"


def test_env_override_with_bad_value_or_section(tmp_path: Path) -> None:
    path = write(tmp_path, CORE_ONLY)
    with pytest.raises(ConfigError, match=r"\[policy\] reject_score"):
        load_settings(path, env={"FILTERD_POLICY_REJECT_SCORE": "high"})
    with pytest.raises(ConfigError, match="FILTERD_NOPE_X"):
        load_settings(path, env={"FILTERD_NOPE_X": "1"})


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, CORE_ONLY + "[policy]\ntag_score = 3.0\n")
    assert load_settings(None, env={"FILTERD_CONFIG": str(path)}).policy.tag_score == 3.0


def test_address_notations() -> None:
    assert parse_milter_socket("inet:8894@127.0.0.1").port == 8894
    assert parse_milter_socket("inet6:8894@::1").host == "::1"
    assert parse_milter_socket("unix:/run/filterd/milter.sock").path == "/run/filterd/milter.sock"
    assert parse_clamd_address("tcp:127.0.0.1:3310").port == 3310
    assert parse_clamd_address("unix:/run/clamav/clamd.ctl").is_unix
    assert parse_nameservers("127.0.0.1:5353, 127.0.0.2,[::1]:53") == [
        ("127.0.0.1", 5353),
        ("127.0.0.2", 53),
        ("::1", 53),
    ]
    for bad in ("inet:99999@127.0.0.1", "unix:relative", "inet:@host"):
        with pytest.raises(AddressError):
            parse_milter_socket(bad)
    for bad in ("tcp:3310", "127.0.0.1:3310", "unix:"):
        with pytest.raises(AddressError):
            parse_clamd_address(bad)
    with pytest.raises(AddressError, match="not a name"):
        parse_nameservers("dns.example:53")
