"""`filterd records export|erase MAILBOX` and `filterd stats`.

Data-subject requests read and delete through the same schema and key builder
as the daemon writes with, so they cannot miss a kind of record. The commands
find Redis as the daemon does: [redis] url, else the private instance that
`filterd serve` starts under [daemon] state_dir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from filterd.clients.redis import RedisNotConfigured, connect_for_tools
from filterd.cliopts import CONFIG_OPTION, REDIS_URL_OPTION
from filterd.records.config import Config
from filterd.records.pseudonym import Pseudonymizer
from filterd.records.query import (
    MailboxSource,
    audit_keys,
    columns,
    daily_stats,
    erase_mailbox,
    export_mailbox,
)
from filterd.records.schema import Schema, SchemaError, load_schema

_config_option = CONFIG_OPTION
_redis_option = REDIS_URL_OPTION


@dataclass
class _Context:
    config: Config
    schema: Schema
    redis: Any
    pseudonymizer: Pseudonymizer | None
    sources: dict[str, MailboxSource]


def _open(config_path: Path | None, redis_url: str | None, *, sources: bool = True) -> _Context:

    from filterd.settings import ConfigError, load_settings

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    config: Config = settings.section("records")
    try:
        schema = load_schema(config.resolve(config.schema_file))
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        client = connect_for_tools(settings, redis_url)
    except RedisNotConfigured as exc:
        raise click.ClickException(str(exc)) from None
    pepper = b""
    if config.pseudonym_secret_file:
        pepper = config.resolve(config.pseudonym_secret_file).read_bytes().strip()
    try:
        # Always look for pseudonymised entries: the setting may have changed while
        # entries written under the old one are still within their retention.
        pseudonymizer: Pseudonymizer | None = Pseudonymizer(client, schema, pepper=pepper)
    except SchemaError:
        if config.pseudonymise:
            raise
        pseudonymizer = None
    found: dict[str, MailboxSource] = {}
    if sources and "allowlist" in settings.sections:
        try:
            from filterd.allowlist.store import AllowlistStore
        except ImportError:
            pass
        else:
            found["allowlist"] = AllowlistStore(client, settings.section("allowlist"))
    return _Context(config, schema, client, pseudonymizer, found)


def _redis_errors() -> tuple[type[Exception], ...]:
    import redis

    return (redis.RedisError, OSError)


@click.group("records")
def records() -> None:
    """Data-subject requests: what filterd holds about a mailbox."""


@records.command("export")
@_config_option
@_redis_option
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the JSON here instead of standard output.",
)
@click.argument("mailbox")
def export_cmd(
    config_path: Path | None, redis_url: str | None, output: Path | None, mailbox: str
) -> None:
    """Print everything held that refers to MAILBOX, as JSON."""
    ctx = _open(config_path, redis_url)
    try:
        data = export_mailbox(
            ctx.redis,
            ctx.schema,
            mailbox,
            pseudonymizer=ctx.pseudonymizer,
            sources=ctx.sources,
            subaddress_separators=ctx.config.subaddress_separators,
        )
    except _redis_errors() as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    text = json.dumps(data, indent=2, sort_keys=False)
    if output is None:
        click.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
        click.echo(f"{len(data['records'])} record(s) written to {output}", err=True)


@records.command("erase")
@_config_option
@_redis_option
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--records-only", is_flag=True, help="Leave the mailbox's allowlist (user content) in place."
)
@click.argument("mailbox")
def erase_cmd(
    config_path: Path | None,
    redis_url: str | None,
    dry_run: bool,
    records_only: bool,
    mailbox: str,
) -> None:
    """Delete everything held that refers to MAILBOX; print what went, as JSON."""
    ctx = _open(config_path, redis_url, sources=not records_only)
    try:
        counts = erase_mailbox(
            ctx.redis,
            ctx.schema,
            mailbox,
            pseudonymizer=ctx.pseudonymizer,
            sources={} if dry_run else ctx.sources,
            subaddress_separators=ctx.config.subaddress_separators,
            dry_run=dry_run,
        )
        if dry_run:
            # What each owner's erase would delete: the entries its export holds
            # (a dry run used to report 0 here, then the erase deleted them).
            for name, source in ctx.sources.items():
                counts[name] = _would_erase(source, mailbox)
    except _redis_errors() as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    except ValueError as exc:  # an owner refused the mailbox (e.g. unparsable): say so
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    click.echo(json.dumps({"mailbox": mailbox, "dry_run": dry_run, "deleted": counts}))


def _would_erase(source: MailboxSource, mailbox: str) -> int:
    count = getattr(source, "count_mailbox", None)
    if callable(count):
        return int(count(mailbox))
    exported = source.export_mailbox(mailbox)
    return len(exported.get("entries") or exported.get("records") or [])


@records.command("find")
@_config_option
@_redis_option
@click.argument("ident")
def find_cmd(config_path: Path | None, redis_url: str | None, ident: str) -> None:
    """SMTP-log entries for a Postfix queue id or a Message-ID, as JSON lines.

    Only what rules/retention.toml keeps, while it keeps it: entries past their
    retention are gone from Redis, and only the smtp-log kind's declared fields
    are printed (with ``expires_in`` seconds). Exit 1 when nothing is found.
    """
    ctx = _open(config_path, redis_url, sources=False)
    kind = ctx.schema.kinds.get("smtp-log")
    searchable = [f for f in ("queue_id", "message_id") if kind and f in kind.fields]
    if kind is None or not searchable:
        raise click.ClickException(
            "rules/retention.toml keeps no smtp-log queue_id or message_id: nothing to search"
        )
    try:
        found = find_entries(ctx.redis, ident, searchable, list(kind.fields))
    except _redis_errors() as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    for entry in found:
        click.echo(json.dumps(entry))
    if not found:
        click.echo(f"no smtp-log entry with {' or '.join(searchable)} {ident!r}", err=True)
        raise SystemExit(1)


def find_entries(
    client: Any, ident: str, searchable: list[str], declared: list[str]
) -> list[dict[str, Any]]:
    """Scan the smtp-log entries (SCAN, never KEYS) for a queue id or Message-ID."""
    from filterd import keyspace as keys

    wanted = ident.strip()
    bare = wanted.strip("<>")
    found: list[dict[str, Any]] = []
    for key in client.scan_iter(match=keys.log_key("*"), count=1000):
        raw = client.get(key)
        if raw is None:
            continue
        try:
            fields = json.loads(raw)
        except ValueError:
            continue
        values = {str(fields.get(name) or "") for name in searchable}
        if wanted in values or bare in {v.strip("<>") for v in values if v}:
            entry = {name: fields[name] for name in declared if name in fields}
            entry["expires_in"] = int(client.ttl(key))
            found.append(entry)
    found.sort(key=lambda e: float(e.get("timestamp") or 0))
    return found


@records.command("audit")
@_config_option
@_redis_option
def audit_cmd(config_path: Path | None, redis_url: str | None) -> None:
    """Check every key in Redis against the retention schema (exit 1 on a problem)."""
    ctx = _open(config_path, redis_url, sources=False)
    try:
        result = audit_keys(ctx.redis, ctx.schema)
    except _redis_errors() as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    for problem in result.problems:
        click.echo(f"problem: {problem}")
    summary = ", ".join(f"{k}={n}" for k, n in sorted(result.keys_by_kind.items())) or "no keys"
    click.echo(f"{'ok' if result.ok else 'FAILED'}: {summary}")
    if not result.ok:
        raise SystemExit(1)


@click.command("stats")
@_config_option
@_redis_option
@click.option(
    "--days",
    type=click.IntRange(1, 100000),
    default=None,
    help="Only the last N days (UTC, today included).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--reasons", is_flag=True, help="Also show counts per action and reason code.")
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a stacked bar chart (PNG) for a transparency report.",
)
def stats(
    config_path: Path | None,
    redis_url: str | None,
    days: int | None,
    as_json: bool,
    reasons: bool,
    png: Path | None,
) -> None:
    """Anonymous statistics per day: accepted, refused (by cause), tempfailed.

    Counts are recipients (a message to three recipients counts three); no mailbox
    and no IP address is kept in these counters.
    """
    ctx = _open(config_path, redis_url, sources=False)
    since = None
    if days is not None:
        since = (datetime.now(UTC) - timedelta(days=days - 1)).date()
    try:
        result = daily_stats(ctx.redis, ctx.schema, since=since)
    except _redis_errors() as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    cols = columns(ctx.schema, result)
    if as_json:
        rows = [
            {
                "day": d.day,
                **{c: d.categories.get(c, 0) for c in cols},
                "total": d.total,
                **({"reasons": d.reasons} if reasons else {}),
            }
            for d in result
        ]
        click.echo(json.dumps({"unit": "recipients", "days": rows}))
    else:
        _print_table(result, cols, reasons)
    if png is not None:
        from filterd.records.chart import write_png

        today = datetime.now(UTC).date()
        write_png(result, cols, png, start=since, end=today if since is not None else None)
        click.echo(f"chart written to {png}", err=True)


def _print_table(result: list[Any], cols: list[str], reasons: bool) -> None:
    header = ["day", *cols, "total"]
    rows = [[d.day, *(str(d.categories.get(c, 0)) for c in cols), str(d.total)] for d in result]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    for row in [header, *rows]:
        click.echo(
            "  ".join(
                v.rjust(w) if i else v.ljust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if not rows:
        click.echo("(no statistics recorded)")
    if reasons:
        for d in result:
            for label, n in sorted(d.reasons.items()):
                click.echo(f"{d.day}  {label}  {n}")
