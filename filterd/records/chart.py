"""A PNG chart of the anonymous daily statistics, for transparency reports.

Uses matplotlib's object API with the Agg canvas directly (no pyplot), so it
needs no display, touches no global backend state and is safe in any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from filterd.records.query import DayStats


def write_png(
    days: Sequence[DayStats],
    categories: Sequence[str],
    path: Path | str,
    *,
    title: str = "Mail handled per day (recipients)",
) -> None:
    """A stacked bar per day, one colour per category, in ``categories`` order."""
    fig = Figure(figsize=(max(6.0, 0.35 * len(days) + 3.0), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [d.day for d in days]
    positions = list(range(len(days)))
    bottom = [0] * len(days)
    for category in categories:
        values = [d.categories.get(category, 0) for d in days]
        if not any(values):
            continue
        ax.bar(positions, values, bottom=bottom, label=category, width=0.8)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_title(title)
    ax.set_ylabel("recipients")
    ax.set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
    if not days:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif any(bottom):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(Path(path), format="png")
