"""`filterd limits ...` (per-account sending limits) and `filterd postfix-config`.

LOGIN is the SASL login as Postfix passes it in ``{auth_authen}``; ``--ip``
addresses the per-IP buckets of unauthenticated outbound sources instead.
Exit status: 0 done, 1 Redis refused or failed, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

import click

from filterd.clients.redis import RedisNotConfigured, connect_for_tools
from filterd.cliopts import CONFIG_OPTION, REDIS_URL_OPTION
from filterd.keyspace import SubjectKind
from filterd.outbound.config import LIMIT_NAMES, SECTION, Config
from filterd.outbound.postfix import (
    DEFAULT_HEADER_CHECKS,
    installed_version,
    parse_version,
    submission_recipe,
)
from filterd.outbound.ratelimit import RateLimiter, limiter_for
from filterd.settings import ConfigError, load_settings


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _limiter(config_path: Path | None, redis_url: str | None) -> RateLimiter:
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        _fail(str(exc), 2)
    config = settings.sections.get(SECTION)
    if not isinstance(config, Config):
        config = Config()
    try:
        client = connect_for_tools(settings, redis_url)
    except RedisNotConfigured as exc:
        _fail(str(exc), 1)
    return limiter_for(client, config)


def _subject(login: str, ip: bool) -> tuple[SubjectKind, str]:
    if not login.strip():
        _fail("LOGIN must not be empty", 2)
    return ("ip" if ip else "u"), login


IP_OPTION = click.option(
    "--ip", "is_ip", is_flag=True, help="LOGIN is a client IP (unauthenticated outbound source)."
)


@click.group()
def limits() -> None:
    """Per-account sending limits of outbound mail (`[outbound] *_per_*`)."""


def _limit_options(func: click.decorators.FC) -> click.decorators.FC:
    for name in reversed(LIMIT_NAMES):
        func = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=click.IntRange(min=0),
            default=None,
            help=f"{name.replace('_', ' ')} (0 = unlimited).",
        )(func)
    return func


@limits.command("set")
@CONFIG_OPTION
@REDIS_URL_OPTION
@IP_OPTION
@click.argument("login")
@_limit_options
def set_cmd(
    config_path: Path | None, redis_url: str | None, is_ip: bool, login: str, **values: int | None
) -> None:
    """Override limits for LOGIN (e.g. `--messages-per-hour 50`); 0 means unlimited."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        _fail("give at least one limit, e.g. --messages-per-hour 50", 2)
    limiter = _limiter(config_path, redis_url)
    try:
        limiter.set_overrides(*_subject(login, is_ip), given)
    except ValueError as exc:
        _fail(str(exc), 2)
    except Exception as exc:  # noqa: BLE001 - report, do not trace back
        _fail(f"{type(exc).__name__}: {exc}", 1)
    click.echo(f"set {', '.join(f'{k}={v}' for k, v in given.items())} for {login}")


@limits.command("show")
@CONFIG_OPTION
@REDIS_URL_OPTION
@IP_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.argument("login")
def show_cmd(
    config_path: Path | None, redis_url: str | None, is_ip: bool, as_json: bool, login: str
) -> None:
    """Effective limits of LOGIN, what is used in each window, and refused outbound spam."""
    limiter = _limiter(config_path, redis_url)
    subject = _subject(login, is_ip)
    today = datetime.now(UTC).date()
    days = [(today - timedelta(days=i)).isoformat() for i in range(30)]
    try:
        usage = limiter.usage(*subject)
        spam = limiter.spam_counts(*subject, days)
    except Exception as exc:  # noqa: BLE001
        _fail(f"{type(exc).__name__}: {exc}", 1)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "login": login,
                    "limits": {
                        u.name: {"limit": u.limit, "used": u.used, "override": u.overridden}
                        for u in usage
                    },
                    "outbound_spam_30d": sum(spam.values()),
                    "outbound_spam_by_day": spam,
                }
            )
        )
        return
    click.echo(f"{login}")
    for u in usage:
        limit = "unlimited" if u.limit == 0 else str(u.limit)
        source = "override" if u.overridden else "default"
        click.echo(f"  {u.name:<24} {limit:>10} ({source})  used {u.used}")
    click.echo(f"  refused outbound spam, last 30 days: {sum(spam.values())}")


@limits.command("reset")
@CONFIG_OPTION
@REDIS_URL_OPTION
@IP_OPTION
@click.option("--counters", is_flag=True, help="Also clear what LOGIN used in every window.")
@click.argument("login")
def reset_cmd(
    config_path: Path | None, redis_url: str | None, is_ip: bool, counters: bool, login: str
) -> None:
    """Remove LOGIN's overrides (back to the defaults); --counters also unblocks it now."""
    limiter = _limiter(config_path, redis_url)
    try:
        removed = limiter.reset(*_subject(login, is_ip), counters=counters)
    except Exception as exc:  # noqa: BLE001
        _fail(f"{type(exc).__name__}: {exc}", 1)
    click.echo(f"reset {login}: {removed} key(s) removed")


@click.command("postfix-config")
@click.option("--submission", is_flag=True, required=True, help="The submission service recipe.")
@click.option("--postfix-version", default=None, help="Target version (default: installed).")
@click.option(
    "--format",
    "style",
    type=click.Choice(["files", "postconf"]),
    default="files",
    help="main.cf/master.cf lines, or postconf -e/-M/-P commands.",
)
@click.option("--listen", default="submission", show_default=True, help="master.cf service name.")
@click.option("--header-checks", default=DEFAULT_HEADER_CHECKS, show_default=True)
@click.option("--milter", default=None, help="smtpd_milters for the service (default: main.cf's).")
def postfix_config(
    submission: bool,
    postfix_version: str | None,
    style: str,
    listen: str,
    header_checks: str,
    milter: str | None,
) -> None:
    """Print the Postfix lines that keep the submitting client's IP out of outgoing mail."""
    version = parse_version(postfix_version) if postfix_version else installed_version()
    if version is None:
        _fail("no Postfix found; give --postfix-version", 2)
    recipe = submission_recipe(version, listen=listen, header_checks=header_checks, milter=milter)
    click.echo(recipe.render(style), nl=False)
