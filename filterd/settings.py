"""Settings: one TOML file in rules/, FILTERD_<SECTION>_<KEY> overrides, validated once.

Each section is a frozen pydantic model. Core sections are declared here;
each check module under ``filterd.checks`` declares its own section (``SECTION``
and ``Config``), and other owners register theirs in ``_EXTRA_SECTION_MODULES``,
so adding a check means one new module plus configuration. Validation errors
always name the file, the section and the key.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from filterd.addresses import AddressError, parse_milter_socket

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "rules" / "filterd.toml"
ENV_PREFIX = "FILTERD_"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


class Section(BaseModel):
    """Base for every section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MilterConfig(Section):
    # unix is the default: measured never slower than TCP, and immune to Nagle
    # stalls (bench/README.md). inet:8894@127.0.0.1 works as well.
    socket: str = "unix:/run/filterd/milter.sock"
    # libmilter's per-connection I/O timeout in seconds.
    timeout: int = 600
    # Unix socket permissions: Postfix's smtpd (user postfix) must be able to write.
    # 0660 with socket_group: only Postfix's group reaches it (0666 let any local user).
    socket_mode: str = "0660"
    # Group of the unix socket; "" = "postfix" when that group exists.
    socket_group: str = ""
    # Worker processes that share the socket; 0 = one per CPU.
    workers: int = Field(default=0, ge=0, le=256)
    # Bodies above this size are not kept; the message gets `oversize_action`.
    max_message_bytes: int = 50 * 1024 * 1024
    # Bodies up to this size stay in memory; larger ones spill to spool_dir.
    memory_spool_bytes: int = 1024 * 1024
    spool_dir: str = ""
    oversize_action: Literal["accept", "reject", "tempfail"] = "tempfail"
    # On SIGTERM, how long in-flight messages may take before the process exits.
    drain_seconds: float = 30.0

    @field_validator("socket")
    @classmethod
    def _socket(cls, value: str) -> str:
        try:
            parse_milter_socket(value)
        except AddressError as exc:
            raise ValueError(str(exc)) from None
        return value


class PipelineConfig(Section):
    recipient_checks: list[str] = ["allowlist", "dnsbl"]
    message_checks: list[str] = ["allowlist", "antivirus", "attachments", "uribl", "classifier"]
    # Overall time for all checks of one phase; well below Postfix's
    # milter_content_timeout (300 s) and milter_command_timeout (30 s).
    rcpt_budget_seconds: float = 8.0
    message_budget_seconds: float = 25.0
    workers: int = 16


class PolicyConfig(Section):
    # Sum of finding scores (blocklist weights, classifier points) that refuses.
    reject_score: float = 10.0
    # Sum that marks the message as spam (X-Spam-Flag: YES) but accepts it.
    tag_score: float = 5.0
    add_score_header: bool = True


class RedisConfig(Section):
    # Empty: `filterd serve` starts a private redis-server under state_dir.
    url: str = ""
    socket_timeout: float = 2.0


class DaemonConfig(Section):
    # Where private services (Redis, clamd) keep their files when started by serve.
    state_dir: str = "var"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Unprivileged user the daemon runs as after binding, when started as root;
    # "" = "filterd" when that user exists (else it stays root and says so).
    user: str = ""
    # Pid file of the supervisor (`filterd reload` / `status` read it); "" = state_dir/filterd.pid.
    pidfile: str = ""


_CORE_SECTIONS: dict[str, type[Section]] = {
    "milter": MilterConfig,
    "pipeline": PipelineConfig,
    "policy": PolicyConfig,
    "redis": RedisConfig,
    "daemon": DaemonConfig,
}

# Non-check modules that own a section: each defines SECTION and Config.
_EXTRA_SECTION_MODULES: tuple[str, ...] = (
    "filterd.records.config",
    "filterd.allowlist.config",
)


def section_models() -> dict[str, type[Section]]:
    """Every known section: core, each check module, each registered owner."""
    import filterd.checks as checks_pkg

    models: dict[str, type[Section]] = dict(_CORE_SECTIONS)
    names = [f"filterd.checks.{m.name}" for m in pkgutil.iter_modules(checks_pkg.__path__)]
    for modname in names + list(_EXTRA_SECTION_MODULES):
        mod = importlib.import_module(modname)
        section = getattr(mod, "SECTION", None)
        config = getattr(mod, "Config", None)
        if section and config is not None:
            models.setdefault(section, config)
    return models


@dataclass(frozen=True)
class Settings:
    """All validated sections; ``source`` says which file they came from."""

    source: Path
    sections: Mapping[str, Section] = field(default_factory=dict)

    def section(self, name: str) -> Any:
        return self.sections[name]

    @property
    def milter(self) -> MilterConfig:
        return self.sections["milter"]  # type: ignore[return-value]

    @property
    def pipeline(self) -> PipelineConfig:
        return self.sections["pipeline"]  # type: ignore[return-value]

    @property
    def policy(self) -> PolicyConfig:
        return self.sections["policy"]  # type: ignore[return-value]

    @property
    def redis(self) -> RedisConfig:
        return self.sections["redis"]  # type: ignore[return-value]

    @property
    def daemon(self) -> DaemonConfig:
        return self.sections["daemon"]  # type: ignore[return-value]

    def resolve_path(self, value: str) -> Path:
        """Relative paths in any config file are relative to the project root, so a
        config written elsewhere (tests, /etc) still finds rules/ and models/."""
        return resolve_path(value)


def resolve_path(value: str | os.PathLike[str]) -> Path:
    path = Path(value)
    return path if path.is_absolute() else PROJECT_ROOT / path


def _env_value(raw: str) -> Any:
    """Read an override as a TOML value when it is one, else as a plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str], known: set[str]) -> None:
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == "FILTERD_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in known or not key:
            raise ConfigError(
                f"environment {name}: no section [{section}] (known: {sorted(known)})"
            )
        data.setdefault(section, {})[key] = _env_value(raw)


def _format_error(source: Path, section: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(section)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: [{section}] {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def load_settings(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load, override from the environment, validate. Raises ConfigError."""
    env = os.environ if env is None else env
    source = Path(path or env.get("FILTERD_CONFIG") or DEFAULT_CONFIG)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    models = section_models()
    unknown = sorted(set(data) - set(models))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown} (known: {sorted(models)})")
    for name, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, got {type(value).__name__}")
    _apply_env(data, env, set(models))
    sections: dict[str, Section] = {}
    errors: list[str] = []
    for name, model in models.items():
        try:
            sections[name] = model.model_validate(data.get(name, {}))
        except ValidationError as exc:
            errors.append(_format_error(source, name, exc))
    if errors:
        raise ConfigError("\n".join(errors))
    settings = Settings(source=source, sections=sections)
    for phase in ("recipient_checks", "message_checks"):
        for check in getattr(settings.pipeline, phase):
            if importlib.util.find_spec(f"filterd.checks.{check}") is None:
                raise ConfigError(f"{source}: [pipeline] {phase}: unknown check {check!r}")
    return settings
