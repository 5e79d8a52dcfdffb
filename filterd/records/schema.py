"""The retention schema (rules/retention.toml): what may be kept, and for how long.

Loading is strict on purpose: the schema is the privacy promise, so a field without
a retention tag, an unknown tag or type, a forbidden field name, or one kind with two
expiries is a start-up error, never a warning. Value validators live here too, so the
writer and the log filter check the same types the same way.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filterd.errors import FilterdError
from filterd.settings import resolve_path
from filterd.tomlfile import load_toml

DEFAULT_SCHEMA = resolve_path("rules/retention.toml")

UNTIL_REMOVED = "until-removed"
STORES = ("redis", "stderr")
# Never storable, whatever the file says: the file's `never` list is added to this one.
FORBIDDEN_FIELDS = frozenset(
    {"subject", "body", "content", "attachment_names", "filenames", "headers", "full_headers"}
)
PERSONAL_TYPES = frozenset({"address", "address-list", "ip"})
ACTIONS = ("accept", "reject", "tempfail")
OTHER_CATEGORY = "other"

_DURATION = re.compile(r"^([1-9][0-9]{0,8})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class SchemaError(FilterdError):
    """The schema file cannot be used; the message names the file, kind and field."""


class SchemaViolation(ValueError):
    """A write or log line tried to store something the schema does not allow."""


@dataclass(frozen=True)
class Retention:
    tag: str
    seconds: int | None  # None: until-removed (no expiry)

    @property
    def expires(self) -> bool:
        return self.seconds is not None


@dataclass(frozen=True)
class Field:
    name: str
    tag: str
    type: str

    @property
    def personal(self) -> bool:
        return self.type in PERSONAL_TYPES


@dataclass(frozen=True)
class Kind:
    name: str
    store: str
    owner: str
    key: str | None
    retention: Retention
    fields: Mapping[str, Field]
    description: str = ""

    def matches_key(self, suffix: str) -> bool:
        """Whether a key (without the filterd:v1: prefix) belongs to this kind."""
        return self.key is not None and fnmatch.fnmatchcase(suffix, self.key)


@dataclass(frozen=True)
class CategoryRule:
    action: str
    reasons: tuple[str, ...]
    category: str

    def matches(self, action: str, reason: str) -> bool:
        if action != self.action:
            return False
        return not self.reasons or any(fnmatch.fnmatchcase(reason, p) for p in self.reasons)


@dataclass(frozen=True)
class Schema:
    source: Path
    tags: Mapping[str, Retention]
    kinds: Mapping[str, Kind]
    never: frozenset[str]
    categories: tuple[CategoryRule, ...] = field(default=())

    def kind(self, name: str) -> Kind:
        try:
            return self.kinds[name]
        except KeyError:
            raise SchemaViolation(f"kind {name!r} is not declared in {self.source}") from None

    def kind_for_key(self, suffix: str) -> Kind | None:
        for kind in self.kinds.values():
            if kind.store == "redis" and kind.matches_key(suffix):
                return kind
        return None

    def category(self, action: str, reason: str) -> str:
        for rule in self.categories:
            if rule.matches(action, reason):
                return rule.category
        return OTHER_CATEGORY

    @property
    def category_names(self) -> list[str]:
        names: list[str] = []
        for rule in self.categories:
            if rule.category not in names:
                names.append(rule.category)
        return names


# ---- value validators: each returns the value as stored or raises SchemaViolation ----

_QUEUE_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_REPLY_CODE = re.compile(r"^[245][0-9]{2}( [245]\.[0-9]{1,3}\.[0-9]{1,3})?$")
_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_RECORD_ID = re.compile(r"^[0-9a-f]{8,64}$")
_SECRET = re.compile(r"^[0-9a-f]{64}$")
_PSEUDONYM = re.compile(r"^p:[0-9a-f]{32}$")
# Printable, no spaces or controls: an envelope address or a Message-ID can carry no
# free text (a subject line has spaces) and no line breaks.
_TOKEN = re.compile(r"^[\x21-\x7e\u00a0-\U0010ffff]+$")


def _fail(what: str, value: Any) -> SchemaViolation:
    # The value itself is not shown: it may be personal data, and errors get logged.
    size = f", {len(value)} chars" if isinstance(value, str) else ""
    return SchemaViolation(f"not a valid {what} ({type(value).__name__}{size})")


def _str(pattern: re.Pattern[str], what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not pattern.match(value):
            raise _fail(what, value)
        return value

    return check


def _timestamp(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**33:
        raise _fail("timestamp", value)
    return round(float(value), 3)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail("count", value)
    return value


def _address(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail("address", value)
    if value == "" or _PSEUDONYM.match(value):
        return value
    if len(value) > 320 or not _TOKEN.match(value) or "<" in value or ">" in value:
        raise _fail("address", value)
    return value


def _address_list(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple) or len(value) > 1000:
        raise _fail("address list", value)
    return [_address(v) for v in value]


@functools.lru_cache(maxsize=4096)
def canonical_ip(text: str) -> str | None:
    """``text`` as ipaddress writes it, None if it is no IP; cached (a daemon sees the
    same clients again and again, and ipaddress parses in pure Python)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _ip(value: Any) -> str:
    if isinstance(value, str):
        if _PSEUDONYM.match(value):
            return value
        canonical = canonical_ip(value)
        if canonical is None:
            raise _fail("IP address", value)
        return canonical
    try:
        return str(ipaddress.ip_address(value))
    except (TypeError, ValueError):
        raise _fail("IP address", value) from None


def _message_id(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 256 or not _TOKEN.match(value):
        raise _fail("Message-ID", value)
    return value


def _action(value: Any) -> str:
    value = getattr(value, "value", value)
    if value not in ACTIONS:
        raise _fail("action", value)
    return str(value)


def _phase(value: Any) -> str:
    if value not in ("rcpt", "data"):
        raise _fail("phase", value)
    return str(value)


def _opaque(value: Any) -> Any:
    raise SchemaViolation("opaque fields belong to another owner and are not written here")


VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "timestamp": _timestamp,
    "phase": _phase,
    "queue-id": _str(_QUEUE_ID, "queue id"),
    "action": _action,
    "code": _str(_CODE, "reason code"),
    "name": _str(_NAME, "name"),
    "reply-code": _str(_REPLY_CODE, "reply code"),
    "count": _count,
    "address": _address,
    "address-list": _address_list,
    "ip": _ip,
    "message-id": _message_id,
    "day": _str(_DAY, "day"),
    "record-id": _str(_RECORD_ID, "record id"),
    "secret": _str(_SECRET, "secret"),
    "opaque": _opaque,
}


def validate(kind: Kind, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every field against the kind; None values are dropped (not stored)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        spec = kind.fields.get(name)
        if spec is None:
            raise SchemaViolation(
                f"field {name!r} is not declared for kind {kind.name!r}: add it to the "
                "retention schema with a retention tag before storing it"
            )
        if value is None:
            continue
        try:
            out[name] = VALIDATORS[spec.type](value)
        except SchemaViolation as exc:
            raise SchemaViolation(f"{kind.name}.{name}: {exc}") from None
    return out


# ---- loading ----


def parse_retention(tag: str, value: Any) -> Retention:
    if value == UNTIL_REMOVED:
        return Retention(tag, None)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise SchemaError(
            f"tag {tag!r}: retention {value!r} is not '<N>s|m|h|d' or {UNTIL_REMOVED!r}"
        )
    return Retention(tag, int(match.group(1)) * _UNITS[match.group(2)])


def _table(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"{where} must be a table")
    return value


def _load_kind(
    name: str, raw: dict[str, Any], tags: Mapping[str, Retention], never: frozenset[str]
) -> Kind:
    where = f"kind {name!r}"
    allowed = {"description", "store", "owner", "key", "fields"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise SchemaError(f"{where}: unknown key(s) {extra}")
    store = raw.get("store", "redis")
    if store not in STORES:
        raise SchemaError(f"{where}: store {store!r} is not one of {list(STORES)}")
    key = raw.get("key")
    if store == "redis" and (not isinstance(key, str) or not key):
        raise SchemaError(f"{where}: a redis kind needs a key pattern")
    raw_fields = _table(f"{where}: fields", raw.get("fields", {}))
    if not raw_fields:
        raise SchemaError(f"{where}: declares no fields")
    fields: dict[str, Field] = {}
    for fname, spec in raw_fields.items():
        fwhere = f"{where} field {fname!r}"
        if fname.lower() in never:
            raise SchemaError(f"{fwhere}: this field may never be stored")
        if not isinstance(spec, dict):
            raise SchemaError(f"{fwhere}: must be {{ tag = ..., type = ... }}")
        unknown = sorted(set(spec) - {"tag", "type"})
        if unknown:
            raise SchemaError(f"{fwhere}: unknown key(s) {unknown}")
        tag = spec.get("tag")
        if not tag:
            raise SchemaError(f"{fwhere}: has no retention tag")
        if tag not in tags:
            raise SchemaError(f"{fwhere}: retention tag {tag!r} is not defined in [tags]")
        ftype = spec.get("type")
        if ftype not in VALIDATORS:
            raise SchemaError(f"{fwhere}: type {ftype!r} is not one of {sorted(VALIDATORS)}")
        fields[fname] = Field(fname, tag, ftype)
    used = sorted({f.tag for f in fields.values()})
    if len(used) > 1:
        raise SchemaError(
            f"{where}: fields carry different tags {used}; one key has one expiry, "
            "so split the kind"
        )
    return Kind(
        name=name,
        store=store,
        owner=str(raw.get("owner", "records")),
        key=key if store == "redis" else None,
        retention=tags[used[0]],
        fields=fields,
        description=str(raw.get("description", "")),
    )


def _load_categories(raw: Any) -> tuple[CategoryRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SchemaError("[[categories]] must be an array of tables")
    rules = []
    for i, item in enumerate(raw):
        where = f"categories[{i}]"
        item = _table(where, item)
        action = item.get("action")
        if action not in ACTIONS:
            raise SchemaError(f"{where}: action {action!r} is not one of {list(ACTIONS)}")
        reasons = item.get("reason", [])
        if isinstance(reasons, str):
            reasons = [reasons]
        category = item.get("category")
        if not isinstance(category, str) or not _NAME.match(category.replace("-", "_")):
            raise SchemaError(f"{where}: category {category!r} must be a short lowercase name")
        rules.append(CategoryRule(action, tuple(str(r) for r in reasons), category))
    return tuple(rules)


def load_schema(path: Path | str | None = None) -> Schema:
    """Load and check the schema; raises SchemaError naming file, kind and field."""
    source = Path(path) if path else DEFAULT_SCHEMA
    data = load_toml(source, "retention schema", SchemaError)
    try:
        return _build(source, data)
    except SchemaError as exc:
        raise SchemaError(f"{source}: {exc}") from None


def _build(source: Path, data: dict[str, Any]) -> Schema:
    if data.get("schema_version") != 1:
        raise SchemaError(f"schema_version must be 1, got {data.get('schema_version')!r}")
    extra = sorted(set(data) - {"schema_version", "never", "tags", "kinds", "categories"})
    if extra:
        raise SchemaError(f"unknown top-level key(s) {extra}")
    never = FORBIDDEN_FIELDS | {str(n).lower() for n in data.get("never", [])}
    raw_tags = _table("[tags]", data.get("tags"))
    tags = {tag: parse_retention(tag, value) for tag, value in raw_tags.items()}
    kinds = {
        name: _load_kind(name, _table(f"kind {name!r}", raw), tags, never)
        for name, raw in _table("[kinds]", data.get("kinds", {})).items()
    }
    for kind in kinds.values():
        if kind.owner == "records" and not kind.retention.expires:
            raise SchemaError(
                f"kind {kind.name!r}: records must expire; {UNTIL_REMOVED!r} is "
                "only for user content owned elsewhere"
            )
    return Schema(
        source=source,
        tags=tags,
        kinds=kinds,
        never=frozenset(never),
        categories=_load_categories(data.get("categories")),
    )
