"""Headers of outbound mail that reveal where the sender is.

Mail clients and webmailers add the user's IP or host name in headers of their
own (``X-Originating-IP`` from Outlook/Exchange and webmail plugins,
``X-Forwarded-For``/``X-Real-IP`` from proxies in front of webmail, SOGo's
``X-Forward``, cPanel's ``X-Source-IP``, SquirrelMail's and Roundcube's own
``Received: from [IP] ... with HTTP``, an IP inside ``X-Mailer`` or
``User-Agent``). The milter removes, at end of message and for outbound mail
only: every header named in ``[outbound] strip_headers``, and every other
header that is not message content (see ``CONTENT_HEADERS``) whose value
contains the client's IP address in any notation, or its reverse-DNS name.

Postfix's own ``Received:`` line is invisible to milters; the Postfix recipe
(``filterd postfix-config --submission``) takes care of that one.
"""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import re
from collections.abc import Iterable

# What the user wrote or what MIME needs: never removed, even if an IP appears in it.
CONTENT_HEADERS = frozenset(
    {
        "from", "sender", "reply-to", "to", "cc", "bcc", "subject", "date", "message-id",
        "in-reply-to", "references", "mime-version", "dkim-signature", "content-type",
        "content-transfer-encoding", "content-disposition", "content-id",
        "content-description", "content-language",
    }
)  # fmt: skip

_IPV4 = re.compile(r"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9])")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
                   r"(?:(?<=:)(?:[0-9]{1,3}\.){3}[0-9]{1,3})?")  # fmt: skip


def _ips_in(text: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for pattern in (_IPV4, _IPV6):
        for match in pattern.finditer(text):
            try:
                ip = ipaddress.ip_address(match.group())
            except ValueError:
                continue
            found.add(ip)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                found.add(ip.ipv4_mapped)
    return found


def _parse_ip(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not value:
        return None
    text = value.strip().strip("[]").removeprefix("IPv6:").removeprefix("ipv6:")
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def header_items(header_block: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) in order; a block that does not parse yields []."""
    try:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            header_block
        )
        return [(str(k), str(v)) for k, v in parsed.items()]
    except Exception:  # noqa: BLE001 - unparsable headers: remove only what we can name
        return []


def headers_to_remove(
    header_block: bytes,
    client_ip: str | None,
    client_name: str | None,
    names: Iterable[str],
) -> list[tuple[str, int]]:
    """``(name, index)`` pairs for ``chgheader(name, index, None)``.

    ``index`` is the 1-based occurrence among headers of that name (compared
    without case, as Postfix does). The list is ordered so that deleting in
    order never shifts a later index: highest index first per name.
    """
    always = {n.lower() for n in names}
    ip = _parse_ip(client_ip)
    host = (client_name or "").strip().lower().rstrip(".")
    if host in ("", "unknown", "localhost") or "." not in host:
        host = ""
    seen: dict[str, int] = {}
    doomed: list[tuple[str, int]] = []
    for name, value in header_items(header_block):
        key = name.lower()
        seen[key] = seen.get(key, 0) + 1
        reveals = key not in CONTENT_HEADERS and (
            (ip is not None and ip in _ips_in(value)) or bool(host and host in value.lower())
        )
        if key in always or reveals:
            doomed.append((name, seen[key]))
    return sorted(doomed, key=lambda item: (item[0].lower(), -item[1]))
