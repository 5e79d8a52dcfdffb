"""filterd configuration files for the daemons these servers surround."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    """A TOML value; dicts become inline tables, so lists of tables work too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A filterd config file with these sections; keys not given keep their defaults."""
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def zen_dnsbl(nameserver: str, *more_lists: dict[str, Any]) -> dict[str, Any]:
    """The ``[dnsbl]`` section most end-to-end tests use: list ZEN on the test rbldnsd
    (zone zen.test, 127.0.0.2 = SBL, weight 10), private addresses not skipped."""
    zen = {
        "id": "ZEN",
        "zone": "zen.test",
        "rules": [{"name": "SBL", "match": "127.0.0.2", "weight": 10}],
    }
    return {"nameservers": nameserver, "skip_private": False, "lists": [zen, *more_lists]}


def dbl_uribl(nameserver: str) -> dict[str, Any]:
    """The ``[uribl]`` section of the end-to-end tests: list DBL on the test rbldnsd
    (zone dbl.test, 127.0.1.2 = SPAM, weight 10; dbltest.com its test entry)."""
    dbl = {
        "id": "DBL",
        "zone": "dbl.test",
        "type": "domain",
        "test_entry": "dbltest.com",
        "rules": [{"name": "SPAM", "match": "127.0.1.2", "weight": 10}],
    }
    return {"nameservers": nameserver, "lists": [dbl]}
