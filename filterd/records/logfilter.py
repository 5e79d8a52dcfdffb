"""Log lines on stderr follow the retention schema too.

A logging.Filter for the handlers: it redacts e-mail addresses and IP addresses in
the message text, in every extra field and in exception text, unless the schema's
``stderr-log`` kind declares a field of that type (the operator's explicit choice),
and it drops extra fields named like something that may never be stored (subject,
body, headers...). Redaction works on values, not on field names, so a new log
call elsewhere cannot leak an address by picking a new name. Loopback addresses
are left alone: they identify this host's own services, not a person.

Subjects and bodies cannot be recognised in free text; callers must not log them
(the codebase logs codes and counts). The filter is the safety net for addresses
and IPs, the ones that slip into exception messages and f-strings.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import Any

from filterd.records.config import Config
from filterd.records.schema import FORBIDDEN_FIELDS, Schema, load_schema

ADDRESS_MASK = "[address]"
IP_MASK = "[ip]"
REMOVED = "[removed]"

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# The domain part needs a letter: "8894@127.0.0.1" (a libmilter socket) is not an address.
_ADDR_CH = r"[^\s@<>()\[\]{}\"',;:/=]"
_EMAIL = re.compile(rf"{_ADDR_CH}+@{_ADDR_CH}*[A-Za-z]{_ADDR_CH}*")
_IPV4 = re.compile(r"(?<![\w.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?!\.?\w)")
# Candidates only (hex groups and colons, maybe an embedded IPv4); ipaddress decides.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:[0-9]{1,3}\.){3}[0-9]{1,3})?"
    r"(?![\w:.])"
)


def _is_public_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not ip.is_loopback


def _mask_address(match: re.Match[str]) -> str:
    """Mask an address; a bare wildcard local part (``*@domain``, ``*@*.domain``, the
    allowlist's own syntax and help text) names no mailbox and stays readable."""
    text = match.group()
    return text if text.startswith("*@") else ADDRESS_MASK


class Redactor:
    """Masks addresses and IPs in text according to what the schema allows."""

    def __init__(self, allow_addresses: bool = False, allow_ips: bool = False) -> None:
        self.allow_addresses = allow_addresses
        self.allow_ips = allow_ips

    @classmethod
    def from_schema(cls, schema: Schema) -> Redactor:
        kind = schema.kinds.get("stderr-log")
        types = {f.type for f in kind.fields.values()} if kind is not None else set()
        return cls("address" in types or "address-list" in types, "ip" in types)

    def text(self, value: str) -> str:
        if not self.allow_addresses:
            value = _EMAIL.sub(_mask_address, value)
        if not self.allow_ips:
            for pattern in (_IPV6, _IPV4):
                value = pattern.sub(
                    lambda m: IP_MASK if _is_public_ip(m.group()) else m.group(), value
                )
        return value

    def value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if depth > 4:
            return value
        if isinstance(value, dict):
            return {k: self.value(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v, depth + 1) for v in value]
        if isinstance(value, bool | int | float) or value is None:
            return value
        return self.text(str(value))


class RecordsLogFilter(logging.Filter):
    """Attach to a handler (filters on a logger miss records propagated from children)."""

    def __init__(self, schema: Schema | None = None) -> None:
        super().__init__()
        self.redactor = Redactor.from_schema(schema) if schema is not None else Redactor()
        self.forbidden = set(schema.never if schema is not None else FORBIDDEN_FIELDS)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not kill the log line
            message = str(record.msg)
        record.msg = self.redactor.text(message)
        record.args = ()
        for key in [k for k in vars(record) if k not in _STANDARD and not k.startswith("_")]:
            if key.lower() in self.forbidden:
                setattr(record, key, REMOVED)
            else:
                setattr(record, key, self.redactor.value(getattr(record, key)))
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            # exc_text is what logging.Formatter prints; "exc" is what a JSON
            # formatter that dumps extras prints. Either way, the redacted text.
            record.exc_text = self.redactor.text(text)
            record.exc_info = None
            record.exc = record.exc_text
        elif record.exc_text:
            record.exc_text = self.redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.text(record.stack_info)
        return True


def install(
    schema: Schema | None = None, handlers: Iterable[logging.Handler] | None = None
) -> RecordsLogFilter:
    """Add the filter to ``handlers`` (default: the root logger's), once each."""
    log_filter = RecordsLogFilter(schema)
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        for old in [f for f in handler.filters if isinstance(f, RecordsLogFilter)]:
            handler.removeFilter(old)
        handler.addFilter(log_filter)
    return log_filter


def install_from_config(
    config: Config, handlers: Iterable[logging.Handler] | None = None
) -> RecordsLogFilter:
    """What the daemon calls after setting up logging: the filter for the configured schema.

    Raises SchemaError if the schema is unusable (start-up must stop then). With
    records disabled the filter still runs, with the strictest rule (no address, no IP).
    """
    schema = load_schema(config.resolve(config.schema_file)) if config.enabled else None
    return install(schema, handlers)
