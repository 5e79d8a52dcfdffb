"""`filterd check`: validate everything before it is put in service (like `postfix check`).

Checks, in order: the configuration file (with "did you mean" for misspelt
sections and keys — difflib against the known names), the retention schema,
every configured check built once (site allowlists, banned types, DNS lists,
the model), and each dependency (clamd, Redis: PING, via filterd.health).
``--postfix`` reads Postfix's configuration through ``postconf -c DIR`` (so
defaults and ``$name`` expansions are Postfix's own) and says whether
``smtpd_milters``, ``milter_default_action``, ``milter_protocol`` and the socket
path fit filterd's ``[milter] socket`` — including Debian's chrooted smtpd.

Every line says ``ok``, ``note``, ``warning`` or ``error``; the exit status is
1 when there is an error.
"""

from __future__ import annotations

import difflib
import importlib
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from filterd.cliopts import CONFIG_OPTION
from filterd.settings import DEFAULT_CONFIG, ConfigError, Settings, load_settings, section_models

Level = Literal["ok", "note", "warning", "error"]


@dataclass(frozen=True)
class Line:
    level: Level
    what: str
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.what}: {self.text}"


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_names(source: Path, data: Mapping[str, Any]) -> list[Line]:
    """Unknown sections and keys, each with the closest known name."""
    from filterd.checks import SECTION_ALIASES

    models = section_models()
    lines: list[Line] = []
    for section, keys in data.items():
        if section in SECTION_ALIASES:
            current = SECTION_ALIASES[section]
            lines.append(
                Line("warning", f"{source}", f"[{section}] is deprecated: call it [{current}]")
            )
            fields = models[current].model_fields
        elif section not in models:
            lines.append(
                Line(
                    "error", f"{source}", f"unknown section [{section}]{_suggest(section, models)}"
                )
            )
            continue
        else:
            fields = models[section].model_fields
        if not isinstance(keys, dict):
            continue
        for key in keys:
            if key not in fields:
                lines.append(
                    Line(
                        "error",
                        f"{source}",
                        f"[{section}] {key}: unknown key{_suggest(key, fields)}",
                    )
                )
    return lines


def _value_errors(source: Path, data: Mapping[str, Any]) -> list[Line]:
    """Bad values in the known keys, so one run shows every mistake, not the first kind."""
    from pydantic import ValidationError

    from filterd.checks import SECTION_ALIASES

    lines: list[Line] = []
    written = {SECTION_ALIASES.get(name, name): name for name in data}
    for current, model in section_models().items():
        section = written.get(current, current)
        keys = data.get(section, {})
        if not isinstance(keys, dict):
            continue
        known = {k: v for k, v in keys.items() if k in model.model_fields}
        try:
            model.model_validate(known)
        except ValidationError as exc:
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"]) or "(section)"
                lines.append(Line("error", str(source), f"[{section}] {key}: {err['msg']}"))
    return lines


def check_config(path: Path | None) -> tuple[Settings | None, list[Line]]:
    source = Path(path or os.environ.get("FILTERD_CONFIG") or DEFAULT_CONFIG)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [Line("error", str(source), "configuration file not found")]
    except tomllib.TOMLDecodeError as exc:
        return None, [Line("error", str(source), f"not valid TOML: {exc}")]
    names = check_names(source, data)
    if names:
        names += _value_errors(source, data)
    try:
        settings = load_settings(source)
    except ConfigError as exc:
        # Unknown names are already reported above, with a suggestion.
        rest = [
            Line("error", "configuration", text)
            for text in str(exc).splitlines()
            if not (
                names and ("Extra inputs are not permitted" in text or "unknown section" in text)
            )
        ]
        return None, [*names, *rest]
    return settings, [*names, Line("ok", "configuration", str(source))]


def check_schema(settings: Settings) -> list[Line]:
    if "records" not in settings.sections:
        return []
    from filterd.records.schema import SchemaError, load_schema

    config = settings.section("records")
    path = config.resolve(config.schema_file)
    try:
        schema = load_schema(path)
    except SchemaError as exc:
        return [Line("error", "retention schema", f"{path}: {exc}")]
    return [Line("ok", "retention schema", f"{path} ({len(schema.kinds)} record kinds)")]


def check_checks(settings: Settings) -> list[Line]:
    """Build every configured check once, as the daemon does (lists, types, model)."""
    from filterd.checks.base import Services

    if not settings.section("antivirus").address:
        # The daemon would start a private clamd there; building contacts nothing.
        from filterd.services import addresses

        address = addresses.clamd_unix_address(addresses.clamd_socket(settings))
        settings = load_settings(
            settings.source, {**os.environ, **addresses.overrides(antivirus_address=address)}
        )
    services = Services(settings=settings, redis=None)
    names = dict.fromkeys(settings.pipeline.recipient_checks + settings.pipeline.message_checks)
    lines: list[Line] = []
    for name in names:
        # One at a time, so every broken list or file is reported, not only the first.
        module = importlib.import_module(f"filterd.checks.{name}")
        try:
            check = module.build(settings.section(module.SECTION), services)
        except Exception as exc:  # noqa: BLE001 - any build failure is the finding
            what = f"check {name} [{module.SECTION}]"
            lines.extend(Line("error", what, text) for text in str(exc).splitlines() if text)
            continue
        lines.append(Line("ok", f"check {name}", "built"))
        check.close()
    return lines


def check_dependencies(settings: Settings) -> list[Line]:
    from filterd import health

    lines: list[Line] = []
    if (
        not settings.section("antivirus").address
        and "antivirus" in settings.pipeline.message_checks
    ):
        lines.append(Line("note", "clamd", "[antivirus] address empty: `filterd serve` starts one"))
    if not settings.redis.url:
        lines.append(Line("note", "redis", "[redis] url empty: `filterd serve` starts one"))
    problems = [
        p
        for p in health.preflight(settings)
        if not (p.dependency == "clamd" and not settings.section("antivirus").address)
    ]
    for problem in problems:
        lines.append(Line(problem.severity, problem.dependency, problem.message))
    down = {p.dependency for p in problems if p.severity == "error"}
    clamd = settings.section("antivirus").address
    if clamd and "antivirus" in settings.pipeline.message_checks and "clamd" not in down:
        lines.append(Line("ok", "clamd", f"{clamd} answers PING"))
    if settings.redis.url and "redis" not in down:
        lines.append(Line("ok", "redis", "answers PING"))
        lines += check_redis_topology(settings)
    lines += check_dns_lists(settings)
    return lines


def check_redis_topology(settings: Settings) -> list[Line]:
    """What the Redis URL leads to now: the master in service, the shards (issue 16)."""
    from filterd.clients.redis import connect, describe_topology, redacted_url

    what = f"redis {redacted_url(settings.redis.url)}"
    client = connect(settings, settings.redis.url)
    try:
        topo = describe_topology(client)
    except Exception as exc:  # noqa: BLE001 - reported, like every dependency problem
        return [Line("error", what, f"topology not readable: {exc}")]
    finally:
        client.close()
    if topo["mode"] == "cluster":
        text = (
            f"cluster, {topo['shards']} shards ({', '.join(topo['masters'])}), "
            f"{topo['replicas']} replicas, cluster_state {topo['state']}"
        )
    elif topo["mode"] == "sentinel":
        text = (
            f"sentinel service {topo['service']}: master {topo['master']}, "
            f"{topo['replicas']} replicas, {len(topo['sentinels'])} sentinels"
        )
    else:
        text = f"single server {topo['master']} ({topo['role']}), {topo['replicas']} replicas"
    return [Line("ok", what, text)]


def check_dns_lists(settings: Settings) -> list[Line]:
    """Each DNS list's RFC 5782 test entries through the configured resolver.

    Lists fail open, so a problem is a warning: mail flows, unprotected by that list.
    """
    used = set(settings.pipeline.recipient_checks) | set(settings.pipeline.message_checks)
    if not used & {"dnsbl", "uribl"}:
        return []
    from filterd.checks.dnsbl import selftest

    problems: list[str] = []
    for name in sorted(used & {"dnsbl", "uribl"}):
        problems += selftest(settings.section(name))
    if not problems:
        return [Line("ok", "dns lists", "test entries answer as expected")]
    return [Line("warning", "dns lists", problem) for problem in problems]


# --------------------------------------------------------------------------------------------
# Postfix


def _postconf(confdir: Path, names: list[str]) -> dict[str, str]:
    """Values as Postfix sees them (defaults, $expansion) via `postconf -c DIR -x -h`."""
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    out = subprocess.run(
        [postconf, "-c", str(confdir), "-x", *names],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    values: dict[str, str] = {}
    for line in out.stdout.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            values[name.strip()] = value.strip()
    return values


def _chrooted_smtpd(confdir: Path) -> bool | None:
    """Whether any smtpd in master.cf runs chrooted (None: no master.cf to read)."""
    master = confdir / "master.cf"
    if not master.exists():
        return None
    entries: list[str] = []
    for raw in master.read_text(errors="replace").splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t" and entries:
            entries[-1] += " " + raw.strip()  # continuation of the previous entry
        else:
            entries.append(raw.strip())
    # Columns: service type private unpriv chroot wakeup maxproc command.
    chrooted = any(
        len(f) >= 8 and f[7] == "smtpd" and f[4] == "y" for f in (e.split() for e in entries)
    )
    return chrooted


def postfix_socket(milter_socket: str, chroot: Path | None) -> tuple[str | None, str]:
    """How Postfix should name filterd's socket; (None, why) when it cannot reach it."""
    from filterd.addresses import parse_milter_socket

    address = parse_milter_socket(milter_socket)
    if not address.is_unix:
        host = f"[{address.host}]" if ":" in (address.host or "") else address.host
        return f"inet:{host}:{address.port}", "TCP"
    path = Path(address.path)
    if chroot is None:
        return f"unix:{path}", "unix socket"
    try:
        inside = path.relative_to(chroot)
    except ValueError:
        return None, (
            f"smtpd runs chrooted in {chroot} but filterd's socket {path} is outside it: "
            f"set [milter] socket = unix:{chroot}/filterd/milter.sock "
            "and smtpd_milters = unix:/filterd/milter.sock (or run smtpd unchrooted)"
        )
    return f"unix:/{inside}", f"unix socket inside the chroot {chroot}"


def check_postfix(settings: Settings, main_cf: Path) -> list[Line]:
    what = f"postfix {main_cf}"
    if not main_cf.exists():
        return [Line("error", what, "main.cf not found (--main-cf PATH)")]
    confdir = main_cf.parent
    values = _postconf(
        confdir,
        [
            "smtpd_milters",
            "milter_default_action",
            "milter_protocol",
            "queue_directory",
            "milter_rcpt_macros",
        ],
    )
    lines: list[Line] = []
    chrooted = _chrooted_smtpd(confdir)
    chroot = Path(values.get("queue_directory", "/var/spool/postfix")) if chrooted else None
    expected, why = postfix_socket(settings.milter.socket, chroot)
    milters = values.get("smtpd_milters", "").replace(",", " ").split()
    if expected is None:
        lines.append(Line("error", what, why))
    elif expected in milters:
        lines.append(Line("ok", what, f"smtpd_milters names filterd's socket {expected} ({why})"))
    elif not milters:
        lines.append(Line("error", what, f"smtpd_milters is empty: add {expected}"))
    else:
        lines.append(
            Line(
                "error",
                what,
                f"smtpd_milters = {' '.join(milters)} does not name filterd's socket: "
                f"expected {expected} ({why}; [milter] socket = {settings.milter.socket})",
            )
        )
    action = values.get("milter_default_action", "")
    if action == "tempfail":
        lines.append(Line("ok", what, "milter_default_action = tempfail"))
    else:
        consequence = {
            "accept": "mail passes unfiltered while filterd is down",
            "reject": "mail is refused for good while filterd is down",
        }.get(action, "unusual value")
        lines.append(
            Line(
                "warning",
                what,
                f"milter_default_action = {action}: {consequence}; tempfail defers it instead",
            )
        )
    protocol = values.get("milter_protocol", "")
    if protocol == "6":
        lines.append(Line("ok", what, "milter_protocol = 6"))
    else:
        lines.append(Line("warning", what, f"milter_protocol = {protocol}: filterd expects 6"))
    if "i" not in values.get("milter_rcpt_macros", "i").split():
        lines.append(
            Line(
                "note",
                what,
                "milter_rcpt_macros lacks i: RCPT-time log lines will carry no queue id",
            )
        )
    if chrooted is None:
        lines.append(Line("note", what, "no master.cf beside main.cf: chroot not checked"))
    else:
        from filterd.outbound.postfix import submission_leaks

        leaks = submission_leaks(main_cf, confdir / "master.cf")
        lines += [Line("warning", f"{what} submission", leak) for leak in leaks]
        if not leaks:
            lines.append(Line("ok", f"{what} submission", "no client IP leaks on submission"))
    return lines


def run_checks(
    config_path: Path | None, *, services: bool = True, main_cf: Path | None = None
) -> list[Line]:
    settings, lines = check_config(config_path)
    if settings is None:
        return lines
    lines += check_schema(settings)
    if services:
        from filterd.discover import private_overrides

        overrides = private_overrides(settings)
        if overrides:
            settings = load_settings(settings.source, {**os.environ, **overrides})
    lines += check_checks(settings)
    if services:
        lines += check_dependencies(settings)
    if main_cf is not None:
        lines += check_postfix(settings, main_cf)
    return lines


@click.command("check")
@CONFIG_OPTION
@click.option("--postfix", "postfix", is_flag=True, help="Also check Postfix's main.cf.")
@click.option(
    "--main-cf",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/postfix/main.cf"),
    show_default=True,
    help="Postfix main.cf to check (its directory is given to postconf -c).",
)
@click.option("--no-services", is_flag=True, help="Do not contact clamd or Redis.")
def check(config_path: Path | None, postfix: bool, main_cf: Path, no_services: bool) -> None:
    """Validate configuration, lists, model, retention schema and dependencies."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    lines = run_checks(config_path, services=not no_services, main_cf=main_cf if postfix else None)
    for line in lines:
        click.echo(str(line))
    errors = sum(1 for line in lines if line.level == "error")
    warnings = sum(1 for line in lines if line.level == "warning")
    click.echo(f"{'FAILED' if errors else 'OK'}: {errors} error(s), {warnings} warning(s)")
    raise SystemExit(1 if errors else 0)
