"""A PNG chart of the anonymous daily statistics, for transparency reports.

Readers compare charts from month to month, so each category has a fixed
colour and a plain label (not the schema's internal names), every day of the
range gets a bar (zero days drawn, not skipped), and the title states the date
range and the total. Uses matplotlib's object API with the Agg canvas directly
(no pyplot), so it needs no display, touches no global backend state and is
safe in any thread.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from filterd.records.query import DayStats

# Category (rules/retention.toml [[categories]]) -> (plain label, fixed colour).
STYLE: dict[str, tuple[str, str]] = {
    "accepted": ("accepted", "#4daf4a"),
    "split": ("retried separately (split)", "#a6cee3"),
    "tempfailed": ("deferred (try later)", "#ff7f00"),
    "virus": ("virus", "#e41a1c"),
    "banned-type": ("banned attachment", "#984ea3"),
    "blocklist": ("blocklist", "#377eb8"),
    "classifier": ("spam", "#f781bf"),
    "refused-other": ("refused, other", "#999999"),
}
_SPARE = ("#a65628", "#ffd92f", "#66c2a5", "#8da0cb", "#e78ac3", "#b3b3b3", "#1b9e77")


def style(category: str) -> tuple[str, str]:
    """Plain label and colour; a category not listed gets a colour fixed by its name."""
    if category in STYLE:
        return STYLE[category]
    return category.replace("-", " "), _SPARE[zlib.crc32(category.encode()) % len(_SPARE)]


def fill_days(
    days: Sequence[DayStats], start: date | None = None, end: date | None = None
) -> list[DayStats]:
    """Every day from start to end (default: the first and last day with data), zeros included."""
    by_day = {d.day: d for d in days}
    known = sorted(date.fromisoformat(d) for d in by_day)
    first = start or (known[0] if known else None)
    last = end or (known[-1] if known else None)
    if first is None or last is None:
        return []
    out = []
    current = first
    while current <= last:
        out.append(by_day.get(current.isoformat()) or DayStats(current.isoformat()))
        current += timedelta(days=1)
    return out


def write_png(
    days: Sequence[DayStats],
    categories: Sequence[str],
    path: Path | str,
    *,
    start: date | None = None,
    end: date | None = None,
    title: str = "Mail handled per day (recipients)",
) -> None:
    """Write the chart of :func:`render` as a PNG."""
    render(days, categories, start=start, end=end, title=title).savefig(Path(path), format="png")


def render(
    days: Sequence[DayStats],
    categories: Sequence[str],
    *,
    start: date | None = None,
    end: date | None = None,
    title: str = "Mail handled per day (recipients)",
) -> Figure:
    """A stacked bar per day, categories in ``categories`` order, fixed colours."""
    days = fill_days(days, start, end)
    fig = Figure(figsize=(max(7.0, 0.3 * len(days) + 4.0), 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = list(range(len(days)))
    bottom = [0] * len(days)
    grand_total = 0
    for category in categories:
        values = [d.categories.get(category, 0) for d in days]
        total = sum(values)
        if not total:
            continue
        grand_total += total
        label, colour = style(category)
        ax.bar(
            positions, values, bottom=bottom, label=f"{label}: {total:,}", color=colour, width=0.8
        )
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    span = f"{days[0].day} to {days[-1].day}" if days else "no days"
    ax.set_title(f"{title}\n{span}, {len(days)} days, {grand_total:,} recipients in total")
    ax.set_ylabel("recipients")
    ax.set_ylim(bottom=0)
    step = max(1, len(days) // 31 + 1) if len(days) > 31 else 1
    ax.set_xticks(
        positions[::step], [d.day for d in days][::step], rotation=60, ha="right", fontsize=8
    )
    if not grand_total:
        ax.text(0.5, 0.5, "no mail recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylim(0, 1)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
