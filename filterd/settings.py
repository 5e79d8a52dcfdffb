"""Settings: one TOML file in rules/, FILTERD_<SECTION>_<KEY> overrides, validated once.

Each section is a frozen pydantic model. Core sections are declared here;
each check module under ``filterd.checks`` declares its own section (``SECTION``
and ``Config``), listed in ``filterd.checks.REGISTRY``; the few non-check owners
(dns, records, outbound, metrics) are named in ``section_models``. Adding a check means
one new module plus configuration. Validation errors always name the file, the
section and the key.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from filterd.addresses import AddressError, parse_milter_socket
from filterd.errors import ConfigError as ConfigError  # re-exported: its old home
from filterd.tomlfile import load_toml, validation_report

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "rules" / "filterd.toml"
ENV_PREFIX = "FILTERD_"

log = logging.getLogger("filterd.settings")


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
    # Header bytes kept per message (they are held in memory); beyond it the message
    # is treated as oversize (`oversize_action`) and no more of it is kept.
    max_header_bytes: int = 1024 * 1024
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
    # CPU-bound checks (the attachment walk) run one after another on the
    # connection's thread while the I/O-bound ones wait in the pool (bench/core_bench.py).
    inline_cpu_checks: bool = True


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

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        # redis://, unix://, redis+sentinel://, redis+cluster:// (filterd.clients.redis).
        from filterd.clients.redis import RedisUrlError, parse_url

        if value:
            try:
                parse_url(value)
            except RedisUrlError as exc:
                raise ValueError(str(exc)) from None
        return value


class DaemonConfig(Section):
    # Where private services (Redis, clamd) keep their files when started by serve.
    state_dir: str = "var"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # A fail-closed dependency (clamd, Redis, model) down at start: refuse to start,
    # or start "degraded" (logged at ERROR; mail needing it gets 4xx). filterd.health.
    on_dependency_down: Literal["refuse", "degraded"] = "refuse"
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


def section_models() -> dict[str, type[Section]]:
    """Every known section: core, each registered check, dns, records, outbound, metrics.

    Imported here, not at the top: the check modules build on this module's
    ``Section``, and the registry (``filterd.checks.REGISTRY``) is where their
    names are listed, once.
    """
    from filterd import metrics
    from filterd.checks import REGISTRY
    from filterd.dns import config as dns_config
    from filterd.outbound import config as outbound_config
    from filterd.records import config as records_config

    models: dict[str, type[Section]] = dict(_CORE_SECTIONS)
    for module in REGISTRY.values():
        models[module.SECTION] = module.Config
    models[dns_config.SECTION] = dns_config.Config
    models[records_config.SECTION] = records_config.Config
    models[outbound_config.SECTION] = outbound_config.Config
    models[metrics.SECTION] = metrics.Config
    return models


def _aliases() -> tuple[Mapping[str, str], Mapping[str, str]]:
    from filterd.checks import CHECK_ALIASES, SECTION_ALIASES

    return SECTION_ALIASES, CHECK_ALIASES


@dataclass(frozen=True)
class Settings:
    """All validated sections; ``source`` says which file they came from."""

    source: Path
    sections: Mapping[str, Section] = field(default_factory=dict)
    # Sections the configuration still names by a deprecated alias: {current: as written}.
    written_as: Mapping[str, str] = field(default_factory=dict)

    def section(self, name: str) -> Any:
        """A section by its name, or by a deprecated alias of it ([clamav])."""
        if name not in self.sections:
            name = _aliases()[0].get(name, name)
        return self.sections[name]

    def section_label(self, name: str) -> str:
        """``[name]`` as the operator's configuration spells it, for error messages."""
        return f"[{self.written_as.get(name, name)}]"

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


def _apply_env(
    data: dict[str, Any],
    env: Mapping[str, str],
    known: set[str],
    aliases: Mapping[str, str],
    written_as: dict[str, str],
) -> None:
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == "FILTERD_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section in aliases:
            log.warning(
                "deprecated environment name %s: use FILTERD_%s_%s",
                name,
                aliases[section].upper(),
                key.upper(),
            )
            written_as.setdefault(aliases[section], section)
            section = aliases[section]
        if section not in known or not key:
            raise ConfigError(
                f"environment {name}: no section [{section}] (known: {sorted(known)})"
            )
        data.setdefault(section, {})[key] = _env_value(raw)


def _format_error(source: Path, section: str, exc: ValidationError) -> str:
    return validation_report(source, exc, section)


def load_settings(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load, override from the environment, validate. Raises ConfigError."""
    env = os.environ if env is None else env
    source = Path(path or env.get("FILTERD_CONFIG") or DEFAULT_CONFIG)
    data = load_toml(source, "configuration file")
    models = section_models()
    section_aliases, check_aliases = _aliases()
    written_as: dict[str, str] = {}
    for old, new in section_aliases.items():
        if old in data and isinstance(data[old], dict):
            log.warning("%s: section [%s] is deprecated: call it [%s]", source, old, new)
            written_as[new] = old
            data[new] = {**data.pop(old), **data.get(new, {})}
    unknown = sorted(set(data) - set(models))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown} (known: {sorted(models)})")
    for name, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, got {type(value).__name__}")
    _apply_env(data, env, set(models), section_aliases, written_as)
    sections: dict[str, Section] = {}
    errors: list[str] = []
    for name, model in models.items():
        try:
            sections[name] = model.model_validate(data.get(name, {}))
        except ValidationError as exc:
            errors.append(_format_error(source, written_as.get(name, name), exc))
    if errors:
        raise ConfigError("\n".join(errors))
    sections["pipeline"] = _pipeline_names(source, settings_pipeline(sections), check_aliases)
    return Settings(source=source, sections=sections, written_as=written_as)


def settings_pipeline(sections: Mapping[str, Section]) -> PipelineConfig:
    pipeline = sections["pipeline"]
    assert isinstance(pipeline, PipelineConfig)
    return pipeline


def _pipeline_names(
    source: Path, pipeline: PipelineConfig, aliases: Mapping[str, str]
) -> PipelineConfig:
    """Check names in [pipeline], deprecated ones replaced (and logged); unknown ones refused."""
    from filterd.checks import REGISTRY

    update: dict[str, list[str]] = {}
    for phase in ("recipient_checks", "message_checks"):
        names: list[str] = []
        for check in getattr(pipeline, phase):
            if check in aliases:
                log.warning(
                    "%s: [pipeline] %s: check %r is now called %r",
                    source, phase, check, aliases[check],
                )  # fmt: skip
                check = aliases[check]
            if check not in REGISTRY:
                raise ConfigError(f"{source}: [pipeline] {phase}: unknown check {check!r}")
            names.append(check)
        update[phase] = names
    return pipeline.model_copy(update=update)
