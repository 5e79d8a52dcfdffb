"""The served reject and tag thresholds: one function, used by every reporter.

The thresholds live in the model card (``thresholds.reject`` / ``thresholds.tag``, chosen at
training time on pooled out-of-source ham or later by ``filterd calibrate`` on an operator's own
ham); ``[classifier] reject_threshold`` / ``tag_threshold`` in ``rules/filterd.toml`` may override
them.  The daemon's check, its start-up log, ``filterd evaluate`` and ``filterd model show|list``
all call :func:`served` so they can never disagree (issue 11: the card said 0.09 while the daemon
tagged at 0.34).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Served:
    """Thresholds in service and where each came from ("card" or "[classifier] override")."""

    reject: float
    tag: float
    reject_from: str
    tag_from: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "reject": self.reject,
            "tag": self.tag,
            "reject_from": self.reject_from,
            "tag_from": self.tag_from,
        }

    def describe(self) -> str:
        return (
            f"reject p>={self.reject:.4g} ({self.reject_from}), "
            f"tag p>={self.tag:.4g} ({self.tag_from})"
        )


OVERRIDE = "[classifier] override"


def served(
    card: tuple[float, float], reject_override: float | None, tag_override: float | None
) -> Served:
    """The thresholds in service for a model whose card says ``card`` = (reject, tag)."""
    reject = float(reject_override) if reject_override is not None else float(card[0])
    tag = float(tag_override) if tag_override is not None else float(card[1])
    return Served(
        reject=reject,
        tag=min(tag, reject),
        reject_from=OVERRIDE if reject_override is not None else "card",
        tag_from=OVERRIDE if tag_override is not None else "card",
    )


def served_from_config(card: tuple[float, float], config_path: Path | str | None) -> Served:
    """:func:`served` with the overrides read from the configuration file (for admin commands).

    A configuration that cannot be loaded is reported, not ignored: the caller gets the error.
    """
    from filterd.settings import load_settings

    cfg = load_settings(config_path).section("classifier")
    return served(card, cfg.reject_threshold, cfg.tag_threshold)
