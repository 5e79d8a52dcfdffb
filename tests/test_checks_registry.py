"""The explicit check registry: one name per check, old names still accepted with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from filterd.checks import REGISTRY, SECTION_ALIASES
from filterd.checks.antivirus import Config as AntivirusConfig
from filterd.checks.base import Check
from filterd.settings import ConfigError, load_settings, section_models


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "filterd.toml"
    path.write_text(text)
    return path


def test_each_check_has_one_name_for_module_and_section() -> None:
    for name, module in REGISTRY.items():
        assert module.__name__ == f"filterd.checks.{name}"
        assert name == module.SECTION
        assert section_models()[name] is module.Config


def test_every_check_class_has_a_selftest() -> None:
    for module in REGISTRY.values():
        assert callable(getattr(Check, "selftest", None))
        own = [
            v
            for v in vars(module).values()
            if isinstance(v, type)
            and v.__module__ == module.__name__
            and v.__name__.endswith("Check")
        ]
        assert own and all(callable(getattr(c, "selftest", None)) for c in own), module.__name__


def test_old_clamav_section_still_works_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        "[pipeline]\nrecipient_checks = []\nmessage_checks = ['clamav']\n"
        "[clamav]\naddress = 'tcp:127.0.0.1:3310'\ntimeout = 4.0\n",
    )
    with caplog.at_level(logging.WARNING, logger="filterd.settings"):
        settings = load_settings(path, env={})
    section = settings.section("antivirus")
    assert isinstance(section, AntivirusConfig)
    assert (section.address, section.timeout) == ("tcp:127.0.0.1:3310", 4.0)
    assert settings.section("clamav") is section
    assert settings.pipeline.message_checks == ["antivirus"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "[clamav] is deprecated" in messages and "'clamav' is now called 'antivirus'" in messages


def test_old_env_name_still_works_and_errors_name_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "[pipeline]\nrecipient_checks = []\nmessage_checks = []\n")
    with caplog.at_level(logging.WARNING, logger="filterd.settings"):
        settings = load_settings(path, env={"FILTERD_CLAMAV_TIMEOUT": "7"})
    assert settings.section("antivirus").timeout == 7
    assert "FILTERD_ANTIVIRUS_TIMEOUT" in caplog.text
    with pytest.raises(ConfigError, match=r"\[antivirus\] timeout"):
        load_settings(path, env={"FILTERD_ANTIVIRUS_TIMEOUT": "-1"})


def test_new_name_wins_over_the_old_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[pipeline]\nrecipient_checks = []\nmessage_checks = []\n"
        "[clamav]\ntimeout = 4.0\nmax_scan_bytes = 1000\n[antivirus]\ntimeout = 9.0\n",
    )
    section = load_settings(path, env={}).section("antivirus")
    assert (section.timeout, section.max_scan_bytes) == (9.0, 1000)


def test_unknown_check_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[pipeline]\nrecipient_checks = ['nope']\nmessage_checks = []\n")
    with pytest.raises(ConfigError, match="unknown check 'nope'"):
        load_settings(path, env={})
    assert set(SECTION_ALIASES.values()) <= set(REGISTRY)
