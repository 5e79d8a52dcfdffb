"""Read one TOML file and report problems the same way everywhere.

Three loaders (settings, banned attachment types, the retention schema) each
had their own copy of "read, parse, name the file in the error"; this is it once.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from filterd.errors import ConfigError


def load_toml(path: Path, what: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """The file's tables; ``error`` (naming the file and ``what`` it is) when unusable."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


def validation_report(path: Path, exc: ValidationError, section: str | None = None) -> str:
    """One line per problem: file, [section] if any, dotted key, message, bad value."""
    lines = []
    where = f"{path}: [{section}] " if section else f"{path}: "
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(section)"
        got = err.get("input")
        shown = "" if section is None or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{where}{key}: {err['msg']}{shown}")
    return "\n".join(lines)
