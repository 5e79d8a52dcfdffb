"""Authentication-Results (RFC 8601): the one parser of these headers.

Hand-written (it was the allowlist's private parser): only the authserv-id and
``method=result`` with ``ptype.property=value`` pairs are needed, read
tolerantly, because a malformed header must verify nothing and never raise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuthResult:
    """One ``method=result`` of an Authentication-Results header (RFC 8601)."""

    method: str
    result: str
    props: dict[str, str]


def _strip_comments(value: str) -> str:
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(char)
            continue
        if char == "\\":
            escaped = True
            if depth == 0:
                out.append(char)
            continue
        if char == '"' and depth == 0:
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
            continue
        elif not quoted and char == ")" and depth:
            depth -= 1
            continue
        if depth == 0:
            out.append(char)
    return "".join(out)


def parse_authres(value: str) -> tuple[str, list[AuthResult]]:
    """(authserv-id, results) of one header value; tolerant, never raises."""
    text = " ".join(_strip_comments(value).split())
    parts = text.split(";")
    head = parts[0].split()
    authserv = head[0].lower() if head else ""
    results = []
    for part in parts[1:]:
        tokens = part.replace(" =", "=").replace("= ", "=").split()
        if not tokens or "=" not in tokens[0]:
            continue
        method, _, result = tokens[0].partition("=")
        props = {}
        for token in tokens[1:]:
            key, eq, val = token.partition("=")
            if eq and "." in key:
                props[key.lower()] = val.strip('"')
        results.append(AuthResult(method.split("/")[0].lower(), result.lower(), props))
    return authserv, results
