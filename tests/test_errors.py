"""The exception tree: every deliberate root derives from FilterdError; one TOML loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd.addresses import AddressError
from filterd.clients.clamd import ClamdError, ClamdUnavailable
from filterd.clients.redis import RedisNotConfigured
from filterd.dns.lists import PatternError
from filterd.errors import (
    CheckBuildError,
    ConfigError,
    DependencyError,
    FilterdError,
    InvalidValue,
)
from filterd.pipeline import CheckBuildError as PipelineCheckBuildError
from filterd.records.schema import SchemaError, load_schema
from filterd.settings import ConfigError as SettingsConfigError
from filterd.settings import load_settings
from filterd.tomlfile import load_toml


def test_tree() -> None:
    assert SettingsConfigError is ConfigError and PipelineCheckBuildError is CheckBuildError
    for cls in (AddressError, PatternError):
        assert issubclass(cls, InvalidValue) and issubclass(cls, ValueError)
    for cls in (ClamdError, ClamdUnavailable, RedisNotConfigured):
        assert issubclass(cls, DependencyError)
    for cls in (ConfigError, InvalidValue, DependencyError, CheckBuildError, SchemaError):
        assert issubclass(cls, FilterdError)


def test_one_loader_names_the_file_for_every_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[x\n")
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=rf"{bad}: not valid TOML"):
        load_toml(bad, "thing")
    with pytest.raises(ConfigError, match=rf"{missing}: configuration file not found"):
        load_settings(missing, env={})
    with pytest.raises(SchemaError, match=rf"{missing}: retention schema not found"):
        load_schema(missing)
    with pytest.raises(SchemaError, match=rf"{bad}: not valid TOML"):
        load_schema(bad)
