"""Checks: the explicit registry ``{name: module}``; one name per check.

Each module defines ``SECTION`` (equal to its name), ``Config`` and
``build(config, services)``; see ``filterd/checks/base.py`` for the contract.
A reader (or a call-graph tool) follows a ``[pipeline]`` name or a section
name here to the one module that uses it. Adding a check means one module,
one line below and its section in rules/filterd.toml.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from filterd.checks import allowlist, antivirus, attachments, classifier, dnsbl, uribl

if TYPE_CHECKING:
    from collections.abc import Mapping

    from filterd.checks.base import Check, Services
    from filterd.settings import Section


class CheckModule(Protocol):
    """What the registry holds: a module with its section, its Config and ``build``."""

    SECTION: str

    @property
    def Config(self) -> type[Section]: ...

    def build(self, config: Any, services: Services) -> Check: ...


REGISTRY: Mapping[str, CheckModule] = MappingProxyType(
    {
        "allowlist": allowlist,
        "antivirus": antivirus,
        "attachments": attachments,
        "classifier": classifier,
        "dnsbl": dnsbl,
        "uribl": uribl,
    }
)

# Names that older configurations used, still accepted with a logged deprecation
# warning: [clamav] was the antivirus check's section before it took the check's name.
SECTION_ALIASES: Mapping[str, str] = MappingProxyType({"clamav": "antivirus"})
CHECK_ALIASES: Mapping[str, str] = MappingProxyType({"clamav": "antivirus"})

__all__ = ["CHECK_ALIASES", "REGISTRY", "SECTION_ALIASES", "CheckModule"]
