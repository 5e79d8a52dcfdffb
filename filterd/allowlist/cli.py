"""`filterd allow ...`: edit, import, export and check allowlists; `filterd api` serves the API.

LIST is a mailbox (``alice@example.org``) or ``@example.org`` for the list that
applies to every mailbox of a hosted domain. The site-wide list is a file
(allowlists/site.txt) edited under version control; ``filterd allow check``
validates such files.

Exit status: 0 done, 1 the store refused or failed (limit, Redis down),
2 bad input (malformed entry or mailbox, unreadable file).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import click
import redis

from filterd.allowlist.api import ApiConfigError, load_secret, make_token
from filterd.allowlist.config import Config
from filterd.allowlist.entries import Entry, EntryError, Target, parse_entry, parse_target
from filterd.allowlist.files import ListFileError, format_list, parse_list, read_list_file
from filterd.allowlist.store import AllowlistStore, LimitError
from filterd.clients.redis import RedisNotConfigured, connect_for_tools
from filterd.cliopts import CONFIG_OPTION, REDIS_URL_OPTION
from filterd.settings import ConfigError, Settings, load_settings

_KEY = "filterd.allowlist"
T = TypeVar("T")


@dataclass
class _Options:
    config_path: Path | None
    redis_url: str | None
    _settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config_path)
            except ConfigError as exc:
                _fail(str(exc), 2)
        return self._settings

    def config(self) -> Config:
        section = self.settings().section("allowlist")
        assert isinstance(section, Config)
        return section

    def store(self) -> AllowlistStore:
        try:
            client = connect_for_tools(self.settings(), self.redis_url)
        except RedisNotConfigured as exc:
            _fail(str(exc), 1)
        return AllowlistStore(client, self.config())


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _opts() -> _Options:
    ctx = click.get_current_context()
    opts = ctx.meta.get(_KEY)
    if opts is None:
        opts = ctx.meta[_KEY] = _Options(None, None)
    assert isinstance(opts, _Options)
    return opts


def _target(text: str, config: Config) -> Target:
    try:
        return parse_target(text, config)
    except EntryError as exc:
        _fail(str(exc), 2)


def _entries(texts: tuple[str, ...], config: Config) -> list[Entry]:
    parsed, errors = [], []
    for text in texts:
        try:
            parsed.append(parse_entry(text, config))
        except EntryError as exc:
            errors.append(str(exc))
    if errors:
        for error in errors:
            click.echo(f"error: {error}", err=True)
        _fail(f"{len(errors)} invalid entr{'y' if len(errors) == 1 else 'ies'}; nothing changed", 2)
    return parsed


def _store_call(call: Callable[[], T]) -> T:
    try:
        return call()
    except LimitError as exc:
        _fail(f"{exc}; nothing changed", 1)
    except redis.RedisError as exc:
        _fail(f"the allowlist store (Redis) is unavailable: {exc}", 1)


CONFIG = CONFIG_OPTION
REDIS = REDIS_URL_OPTION


@click.group("allow")
@CONFIG
@REDIS
def allow(config_path: Path | None, redis_url: str | None) -> None:
    """Per-mailbox allowlists: senders that skip blocklists and the spam classifier.

    LIST is a mailbox (alice@example.org) or @example.org for the list of every
    mailbox of a hosted domain. Entries: friend@example.org, *@example.org,
    *@*.example.org (subdomains only), 192.0.2.7, 192.0.2.0/24. Viruses and
    banned attachment types are refused whatever a list says.
    """
    click.get_current_context().meta[_KEY] = _Options(config_path, redis_url)


@allow.command("add")
@click.argument("target", metavar="LIST")
@click.argument("entries", nargs=-1, required=True)
def add(target: str, entries: tuple[str, ...]) -> None:
    """Add ENTRIES to LIST (all or nothing)."""
    opts = _opts()
    config = opts.config()
    tgt = _target(target, config)
    parsed = _entries(entries, config)
    store = opts.store()
    change = _store_call(lambda: store.add(tgt, parsed))
    click.echo(
        f"{tgt}: added {len(change.changed)}, already present {len(change.unchanged)}; "
        f"{change.count} of {store.limit} entries"
    )


@allow.command("remove")
@click.argument("target", metavar="LIST")
@click.argument("entries", nargs=-1, required=True)
def remove(target: str, entries: tuple[str, ...]) -> None:
    """Remove ENTRIES from LIST."""
    opts = _opts()
    config = opts.config()
    tgt = _target(target, config)
    parsed = _entries(entries, config)
    store = opts.store()
    change = _store_call(lambda: store.remove(tgt, parsed))
    for entry in change.unchanged:
        click.echo(f"not present: {entry}", err=True)
    click.echo(f"{tgt}: removed {len(change.changed)}; {change.count} entries left")


@allow.command("list")
@click.argument("target", metavar="LIST")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def list_(target: str, as_json: bool) -> None:
    """Print LIST's entries, one per line."""
    opts = _opts()
    tgt = _target(target, opts.config())
    store = opts.store()
    entries = _store_call(lambda: store.entries(tgt))
    if as_json:
        click.echo(json.dumps({"list": tgt.key, "entries": entries}, ensure_ascii=False))
    else:
        for entry in entries:
            click.echo(entry)


@allow.command("import")
@click.argument("target", metavar="LIST")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True), default="-")
@click.option("--replace", is_flag=True, help="Make LIST exactly the file's entries.")
def import_(target: str, file: str, replace: bool) -> None:
    """Add the entries of FILE (list format, '-' = stdin) to LIST, or replace LIST."""
    opts = _opts()
    config = opts.config()
    tgt = _target(target, config)
    try:
        if file == "-":
            parsed = parse_list(sys.stdin.read(), "<stdin>", config)
        else:
            parsed = read_list_file(file, config)
    except ListFileError as exc:
        _fail(f"{exc}\nnothing changed", 2)
    store = opts.store()
    if replace:
        count = _store_call(lambda: store.replace(tgt, parsed))
        click.echo(f"{tgt}: replaced; {count} entries")
    else:
        change = _store_call(lambda: store.add(tgt, parsed))
        click.echo(
            f"{tgt}: added {len(change.changed)}, already present {len(change.unchanged)}; "
            f"{change.count} of {store.limit} entries"
        )


@allow.command("export")
@click.argument("target", metavar="LIST")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None)
def export(target: str, output: str | None) -> None:
    """Write LIST in the list file format (stdout, or --output FILE)."""
    opts = _opts()
    tgt = _target(target, opts.config())
    store = opts.store()
    entries = _store_call(lambda: store.entries(tgt))
    text = format_list(entries, f"allowlist of {tgt}")
    if output is None:
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text, encoding="utf-8")


@allow.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def check(files: tuple[str, ...]) -> None:
    """Validate list files (e.g. allowlists/site.txt) without touching Redis."""
    config = _opts().config()
    bad = False
    for name in files:
        try:
            entries = read_list_file(name, config)
        except ListFileError as exc:
            click.echo(str(exc), err=True)
            bad = True
            continue
        click.echo(f"{name}: {len(entries)} entries, OK")
    if bad:
        sys.exit(2)


@allow.command("token")
@click.argument("target", metavar="LIST")
@click.option(
    "--days", type=float, default=None, help="Lifetime (default [allowlist] api_token_days)."
)
def token(target: str, days: float | None) -> None:
    """Print an API token for LIST (what the customer panel computes); it expires."""
    opts = _opts()
    config = opts.config()
    tgt = _target(target, config)
    try:
        secret = load_secret(config, opts.settings().source.resolve().parent.parent)
    except ApiConfigError as exc:
        _fail(str(exc), 1)
    store = opts.store()
    generation = _store_call(lambda: store.token_generation(tgt))
    lifetime = (config.api_token_days if days is None else days) * 86400
    click.echo(make_token(secret, tgt.key, generation=generation, ttl=lifetime))


@allow.command("revoke-tokens")
@click.argument("target", metavar="LIST")
def revoke_tokens(target: str) -> None:
    """Revoke every API token of LIST (other lists' tokens stay valid)."""
    opts = _opts()
    tgt = _target(target, opts.config())
    store = opts.store()
    generation = _store_call(lambda: store.revoke_tokens(tgt))
    click.echo(f"{tgt}: tokens revoked (generation {generation})")


@click.command("api")
@CONFIG
@REDIS
@click.option("--listen", default=None, help="IP:PORT (default: [allowlist] api_listen).")
def api(config_path: Path | None, redis_url: str | None, listen: str | None) -> None:
    """Serve the allowlist HTTP JSON API for a customer panel (loopback by default)."""
    from filterd.allowlist.api import AllowlistApi, make_server

    ctx = click.get_current_context()
    parent = ctx.meta.get(_KEY)
    opts = _Options(
        config_path or (parent.config_path if parent else None),
        redis_url or (parent.redis_url if parent else None),
    )
    ctx.meta[_KEY] = opts
    config = opts.config()
    settings = opts.settings()
    from filterd.logsetup import setup_logging

    setup_logging(settings.daemon.log_level)
    try:
        secret = load_secret(config, settings.source.resolve().parent.parent)
        server = make_server(
            AllowlistApi(opts.store(), config, secret), listen or config.api_listen
        )
    except (ApiConfigError, OSError) as exc:
        _fail(str(exc), 1)
    host, port = server.server_address[:2]
    click.echo(f"allowlist API on http://{host!s}:{port}/v1/ (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


allow.add_command(api)
