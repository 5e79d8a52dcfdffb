"""Parsers for the address notations operators already know.

Milter sockets are written as libmilter writes them (``inet:PORT@HOST``,
``inet6:PORT@HOST``, ``unix:/path``), clamd addresses as clamav-milter's
``ClamdSocket`` (``tcp:HOST:PORT``, ``unix:/path``), nameservers as
``HOST[:PORT]`` lists. Keeping them in one module means a config error always
reads the same way wherever the address is used.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from filterd.errors import InvalidValue


class AddressError(InvalidValue):
    """An address string that does not follow its documented notation."""


@dataclass(frozen=True)
class SocketAddress:
    """A parsed socket: either ``path`` (unix) or ``host`` + ``port`` (TCP)."""

    kind: str  # "inet", "inet6" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.kind == "unix"


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise AddressError(f"{what}: port must be 1-65535, got {text!r}")
    return int(text)


def parse_milter_socket(text: str) -> SocketAddress:
    """``inet:8894@127.0.0.1``, ``inet6:8894@::1``, ``unix:/run/filterd/milter.sock``."""
    kind, sep, rest = text.partition(":")
    if not sep:
        raise AddressError(
            f"milter socket {text!r}: expected inet:PORT@HOST, inet6:PORT@HOST or unix:/path"
        )
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise AddressError(f"milter socket {text!r}: unix socket needs an absolute path")
        return SocketAddress("unix", path=rest)
    if kind in ("inet", "inet6"):
        port, at, host = rest.partition("@")
        port_no = _port(port, f"milter socket {text!r}")
        host = host or ("127.0.0.1" if kind == "inet" else "::1")
        if not at and not rest.isdigit():
            raise AddressError(f"milter socket {text!r}: expected {kind}:PORT@HOST")
        return SocketAddress(kind, host=host, port=port_no)
    raise AddressError(f"milter socket {text!r}: unknown kind {kind!r} (use inet, inet6 or unix)")


def parse_clamd_address(text: str) -> SocketAddress:
    """``tcp:127.0.0.1:3310`` or ``unix:/run/clamav/clamd.ctl`` (clamav-milter style)."""
    kind, sep, rest = text.partition(":")
    if kind == "unix" and sep and rest.startswith("/"):
        return SocketAddress("unix", path=rest)
    if kind == "tcp" and sep:
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise AddressError(f"clamd address {text!r}: expected tcp:HOST:PORT")
        return SocketAddress(
            "inet", host=host.strip("[]"), port=_port(port, f"clamd address {text!r}")
        )
    raise AddressError(f"clamd address {text!r}: expected tcp:HOST:PORT or unix:/path")


def parse_nameserver(text: str) -> tuple[str, int]:
    """``127.0.0.1``, ``127.0.0.1:5353``, ``[::1]:5353`` or ``::1``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = _port(rest[1:], f"nameserver {text!r}") if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, f"nameserver {text!r}")
    else:
        host, port = text, 53
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"nameserver {text!r}: must be an IP address, not a name") from None
    return host, port


def parse_nameservers(text: str | list[str]) -> list[tuple[str, int]]:
    """A comma-separated string or a list of nameserver entries."""
    items = text.split(",") if isinstance(text, str) else text
    result = [parse_nameserver(item) for item in items if item.strip()]
    return result
