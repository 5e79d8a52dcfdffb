"""Options shared by every `filterd` subcommand, so they read the same everywhere."""

from __future__ import annotations

from pathlib import Path

import click

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="FILTERD_CONFIG",
    help="Main configuration file (default: rules/filterd.toml).",
)

REDIS_URL_OPTION = click.option(
    "--redis-url",
    default=None,
    help="Redis to use (default: [redis] url, else the running daemon's private instance).",
)
