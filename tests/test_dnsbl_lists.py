"""Pure unit tests: return-code patterns, list classification, configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from filterd.checks import dnsbl, uribl
from filterd.dns.lists import CodePattern, CodeRule, CompiledList, ListConfig, PatternError
from filterd.dns.resolver import reverse_ip
from filterd.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
# Only this owner's checks in the pipeline, so these tests do not depend on other modules.
ONLY_MINE = {
    "FILTERD_PIPELINE_RECIPIENT_CHECKS": '["dnsbl"]',
    "FILTERD_PIPELINE_MESSAGE_CHECKS": '["uribl"]',
}


@pytest.mark.parametrize(
    ("pattern", "inside", "outside"),
    [
        ("127.0.0.2", ["127.0.0.2"], ["127.0.0.3", "127.0.0.20", "127.0.1.2"]),
        ("127.0.0.[4..7]", ["127.0.0.4", "127.0.0.7"], ["127.0.0.3", "127.0.0.8"]),
        ("127.0.0.[10;11]", ["127.0.0.10", "127.0.0.11"], ["127.0.0.12", "127.0.0.1"]),
        ("127.0.0.[2;4..6]", ["127.0.0.2", "127.0.0.5"], ["127.0.0.3", "127.0.0.7"]),
        ("127.255.255.[0..255]", ["127.255.255.0", "127.255.255.254"], ["127.255.254.1"]),
        ("127.[0..1].[0;1].2", ["127.1.1.2", "127.0.0.2"], ["127.2.0.2", "127.0.2.2"]),
    ],
)
def test_postscreen_patterns_match_exactly_their_set(
    pattern: str, inside: list[str], outside: list[str]
) -> None:
    compiled = CodePattern.parse(pattern)
    assert all(compiled.matches(a) for a in inside)
    assert not any(compiled.matches(a) for a in outside)
    assert not compiled.matches("not an address")


@pytest.mark.parametrize(
    "bad", ["127.0.0", "127.0.0.256", "127.0.0.[7..4]", "127.0.0.[a..b]", "127.0.0.x", ""]
)
def test_malformed_patterns_are_refused_with_the_pattern_named(bad: str) -> None:
    with pytest.raises(PatternError, match="return code"):
        CodePattern.parse(bad)


def _list(**kw: object) -> CompiledList:
    base: dict[str, object] = {
        "id": "ZEN",
        "zone": "zen.test",
        "rules": [
            CodeRule(name="SBL", match="127.0.0.[2;3]", weight=10),
            CodeRule(name="XBL", match="127.0.0.[4..7]", weight=10),
            CodeRule(name="PBL", match="127.0.0.[10;11]", weight=3),
        ],
    }
    base.update(kw)
    return CompiledList(ListConfig.model_validate(base))


def test_classify_reports_every_matching_rule_with_its_codes() -> None:
    match = _list().classify(("127.0.0.10", "127.0.0.4"))
    assert match.verdict == "listed"
    assert [(rule.name, codes) for rule, codes in match.hits] == [
        ("XBL", ("127.0.0.4",)),
        ("PBL", ("127.0.0.10",)),
    ]


def test_error_codes_are_never_listings_even_next_to_a_listing() -> None:
    match = _list().classify(("127.0.0.2", "127.255.255.254"))
    assert match.verdict == "error"
    assert match.hits == ()
    assert "127.255.255.254" in match.error


def test_answers_outside_loopback_are_errors_and_unknown_codes_are_ignored() -> None:
    assert _list().classify(("192.0.2.1",)).verdict == "error"
    unknown = _list().classify(("127.0.0.200",))
    assert unknown.verdict == "unlisted"
    assert unknown.unmatched == ("127.0.0.200",)


def test_reverse_ip_for_ipv4_ipv6_and_mapped_addresses() -> None:
    assert reverse_ip("192.0.2.10") == "10.2.0.192"
    assert reverse_ip("::ffff:192.0.2.10") == "10.2.0.192"
    v6 = reverse_ip("2001:db8::1")
    assert v6 is not None
    assert v6 == "1." + "0." * 23 + "8.b.d.0.1.0.0.2"
    assert len(v6.split(".")) == 32
    assert reverse_ip("[IPv6:2001:db8::1]") == v6
    assert reverse_ip("mail.example.com") is None


def test_list_config_rejects_targets_of_the_wrong_type() -> None:
    with pytest.raises(ValidationError, match="do not fit type"):
        ListConfig(id="X", zone="x.test", type="ip", targets=["helo"], rules=[])  # type: ignore[list-item]
    with pytest.raises(ValidationError, match="is not a DNS name"):
        _list(zone="not a zone")
    with pytest.raises(ValidationError, match="return code"):
        _list(errors=["127.0.0.[1..]"])


def test_shipped_defaults_are_spamhaus_with_error_codes() -> None:
    config = dnsbl.Config()
    zones = {item.zone: item for item in config.lists}
    assert set(zones) == {"zen.spamhaus.org", "dbl.spamhaus.org"}
    zen = CompiledList(zones["zen.spamhaus.org"])
    assert zen.classify(("127.255.255.254",)).verdict == "error"
    assert [r.name for r, _ in zen.classify(("127.0.0.2", "127.0.0.10")).hits] == ["SBL", "PBL"]
    dbl = CompiledList(zones["dbl.spamhaus.org"])
    assert dbl.classify(("127.0.1.255",)).verdict == "error"
    assert dbl.serves("helo") and dbl.serves("sender") and not dbl.serves("client")
    assert config.nameservers == "127.0.0.1"
    assert uribl.Config().max_uri_lookups == 20


def test_shipped_rules_file_loads_and_matches_code_defaults() -> None:
    settings = load_settings(ROOT / "rules" / "filterd.toml", env=ONLY_MINE)
    section = settings.section("dnsbl")
    assert isinstance(section, dnsbl.Config)
    assert {item.zone for item in section.lists} == {"zen.spamhaus.org", "dbl.spamhaus.org"}
    assert section.lists == dnsbl.Config().lists
    assert settings.section("uribl").lists == uribl.Config().lists


def test_env_overrides_accept_plain_strings_and_toml_lists(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text(
        '[dnsbl]\nnameservers = "127.0.0.1"\n'
        '[[dnsbl.lists]]\nid = "T"\nzone = "bl.test"\n'
        'rules = [{name = "HIT", match = "127.0.0.2", weight = 5}]\n'
    )
    env = {
        **ONLY_MINE,
        "FILTERD_DNSBL_NAMESERVERS": "127.0.0.1:5353,[::1]:5300",
        "FILTERD_URIBL_SKIP_DOMAINS": "example.org, example.net",
        "FILTERD_URIBL_LISTS": '[{id = "U", zone = "uri.test", type = "domain", '
        'rules = [{name = "HIT", match = "127.0.0.[2..3]", weight = 10}]}]',
    }
    settings = load_settings(path, env=env)
    assert settings.section("dnsbl").nameservers == "127.0.0.1:5353,[::1]:5300"
    assert [item.id for item in settings.section("dnsbl").lists] == ["T"]
    assert settings.section("uribl").skip_domains == ["example.org", "example.net"]
    assert settings.section("uribl").lists[0].zone == "uri.test"


def test_bad_values_name_section_and_key(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[dnsbl]\nnameservers = "resolver.example:53"\n')
    with pytest.raises(ConfigError, match=r"\[dnsbl\] nameservers"):
        load_settings(path, env=ONLY_MINE)
    path.write_text(
        '[uribl]\n[[uribl.lists]]\nid = "U"\nzone = "u.test"\ntype = "domain"\n'
        'rules = [{name = "X", match = "127.0.0.300", weight = 1}]\n'
    )
    with pytest.raises(ConfigError, match=r"\[uribl\] lists\.0\.rules\.0\.match"):
        load_settings(path, env=ONLY_MINE)
