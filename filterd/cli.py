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

from filterd import __version__
from filterd.check import check as check_command
from filterd.cliopts import CONFIG_OPTION
from filterd.logsetup import setup_logging
from filterd.pipeline import CheckBuildError
from filterd.records.logfilter import install_from_config as install_logfilter
from filterd.scan import scan_bytes
from filterd.settings import ConfigError, load_settings


@click.group()
@click.version_option(__version__, prog_name="filterd")
def main() -> None:
    """filterd: a privacy-first spam and virus filter for Postfix."""


@main.command()
@CONFIG_OPTION
def serve(config_path: Path | None) -> None:
    """Run the milter daemon: a supervisor and its workers (SIGHUP reloads, SIGTERM drains)."""
    from filterd.supervisor import Supervisor

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(settings.daemon.log_level)
    install_logfilter(settings.section("records"))
    try:
        code = Supervisor(config_path).run()
    except (ConfigError, CheckBuildError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command()
@CONFIG_OPTION
def reload(config_path: Path | None) -> None:
    """Tell the running daemon to reload configuration, lists and model (SIGHUP)."""
    import signal

    from filterd.supervisor import signal_daemon

    try:
        pid = signal_daemon(load_settings(config_path), signal.SIGHUP)
    except (ConfigError, LookupError, PermissionError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"reload requested (pid {pid})")


@main.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Is the daemon running? Pid, workers alive, uptime. Exit 3 when it is not running."""
    from filterd.supervisor import daemon_status

    try:
        info = daemon_status(load_settings(config_path))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info))
    elif info["running"]:
        click.echo(
            f"filterd running: pid {info['pid']}, {info['workers']} workers alive, "
            f"up {info['uptime_seconds']:.0f} s, socket {info['socket']}"
        )
    else:
        click.echo(f"filterd not running (pid file {info['pidfile']})")
    sys.exit(0 if info["running"] else 3)


@main.command()
@CONFIG_OPTION
@click.option("--from", "mail_from", default="", help="Envelope sender (MAIL FROM).")
@click.option("--rcpt", "rcpts", multiple=True, help="Envelope recipient; repeatable.")
@click.option("--client-ip", default=None, help="Connecting client's IP address.")
@click.option("--helo", default=None, help="HELO/EHLO name.")
@click.option("--auth-user", default=None, help="SASL login, as if authenticated.")
@click.option("--pretty", is_flag=True, help="Readable text instead of JSON lines.")
@click.argument("files", nargs=-1, required=True)
def scan(
    config_path: Path | None,
    mail_from: str,
    rcpts: tuple[str, ...],
    client_ip: str | None,
    helo: str | None,
    auth_user: str | None,
    pretty: bool,
    files: tuple[str, ...],
) -> None:
    """The daemon's verdict on RFC 822 files ('-' = stdin): one JSON line each.

    Uses the same services as the running daemon (its private clamd and Redis
    when none is configured), so per-user allowlists apply as they would.
    """
    from filterd.discover import load_like_daemon
    from filterd.runtime import Runtime
    from filterd.scan import pretty as pretty_text
    from filterd.types import Envelope

    try:
        settings = load_like_daemon(config_path)
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
                failed = {"file": name, "error": str(exc)}
                click.echo(pretty_text(failed) if pretty else json.dumps(failed))
                worst = 2
                continue
            result: dict[str, Any] = {"file": name, **scan_bytes(runtime, raw, envelope)}
            click.echo(pretty_text(result) if pretty else json.dumps(result))
    finally:
        runtime.retire()
    sys.exit(worst)


def _register_owned_commands() -> None:
    from filterd.allowlist.cli import allow, api
    from filterd.classify.cli import calibrate, evaluate, model, train
    from filterd.outbound.cli import limits, postfix_config
    from filterd.records.cli import records, stats

    for command in (train, evaluate, calibrate, model, allow, api, records, stats):
        main.add_command(command)
    for command in (limits, postfix_config):
        main.add_command(command)


_register_owned_commands()
main.add_command(check_command)
