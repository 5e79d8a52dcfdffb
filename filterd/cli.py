"""The `filterd` command: serve, scan, and the admin groups of each owner.

Each area owns its commands (classify/cli.py, allowlist/cli.py,
records/cli.py); this module only assembles them and owns `serve` and `scan`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from filterd.cliopts import CONFIG_OPTION
from filterd.logsetup import setup_logging
from filterd.pipeline import CheckBuildError
from filterd.records.logfilter import install_from_config as install_logfilter
from filterd.scan import scan_bytes
from filterd.settings import ConfigError, load_settings


@click.group()
def main() -> None:
    """filterd: a privacy-first spam and virus filter for Postfix."""


@main.command()
@CONFIG_OPTION
def serve(config_path: Path | None) -> None:
    """Run the milter daemon (SIGHUP reloads, SIGTERM drains and stops)."""
    from filterd.daemon import Daemon

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(settings.daemon.log_level)
    install_logfilter(settings.section("records"))
    try:
        code = Daemon(config_path).run()
    except (ConfigError, CheckBuildError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command()
@CONFIG_OPTION
@click.option("--from", "mail_from", default="", help="Envelope sender (MAIL FROM).")
@click.option("--rcpt", "rcpts", multiple=True, help="Envelope recipient; repeatable.")
@click.option("--client-ip", default=None, help="Connecting client's IP address.")
@click.option("--helo", default=None, help="HELO/EHLO name.")
@click.option("--auth-user", default=None, help="SASL login, as if authenticated.")
@click.argument("files", nargs=-1, required=True)
def scan(
    config_path: Path | None,
    mail_from: str,
    rcpts: tuple[str, ...],
    client_ip: str | None,
    helo: str | None,
    auth_user: str | None,
    files: tuple[str, ...],
) -> None:
    """Run the pipeline offline on RFC 822 files ('-' = stdin); one JSON line each."""
    from filterd.runtime import Runtime
    from filterd.types import Envelope

    try:
        settings = load_settings(config_path)
        setup_logging("warning")
        runtime = Runtime(settings)
    except (ConfigError, CheckBuildError) as exc:
        raise click.ClickException(str(exc)) from None
    envelope = Envelope(
        client_ip=client_ip,
        helo=helo,
        mail_from=mail_from,
        recipients=rcpts or ("postmaster@localhost",),
        auth_user=auth_user,
    )
    worst = 0
    try:
        for name in files:
            try:
                raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
            except OSError as exc:
                click.echo(json.dumps({"file": name, "error": str(exc)}))
                worst = 2
                continue
            result: dict[str, Any] = {"file": name, **scan_bytes(runtime, raw, envelope)}
            click.echo(json.dumps(result))
    finally:
        runtime.retire()
    sys.exit(worst)


def _register_owned_commands() -> None:
    from filterd.allowlist.cli import allow, api
    from filterd.classify.cli import calibrate, evaluate, model, train
    from filterd.records.cli import records, stats

    for command in (train, evaluate, calibrate, model, allow, api, records, stats):
        main.add_command(command)


_register_owned_commands()
