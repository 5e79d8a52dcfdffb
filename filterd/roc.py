"""The ROC picture of `filterd evaluate --roc-png`: honest about what the ham count can show.

With N ham messages the smallest false-positive rate that can be measured is
1/N; a log axis that runs below it draws an extrapolation, not a measurement.
So the x axis starts at 1/N, the curve is drawn as steps (no interpolation
between measured points), and the thresholds in service are marked with the
FPR and recall they have on this data ("< 1/N" when no ham reached them).
Matplotlib's object API on the Agg canvas: no display, no global state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLOURS = {"reject": "#e41a1c", "tag": "#ff7f00"}


def roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct score, highest first (ties move together)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last_of_tie = np.r_[ss[1:] != ss[:-1], True]
    tp = np.cumsum(ys)[last_of_tie]
    fp = np.cumsum(~ys)[last_of_tie]
    n_spam, n_ham = max(1, int(y.sum())), max(1, int((~y).sum()))
    return np.r_[0.0, fp / n_ham], np.r_[0.0, tp / n_spam]


def at_threshold(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[float, float]:
    """(fpr, recall) of "score >= threshold" on this data."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    over = s >= threshold
    return float(over[~y].mean()) if (~y).any() else 0.0, float(over[y].mean()) if y.any() else 0.0


def render(
    y: np.ndarray,
    s: np.ndarray,
    *,
    title: str = "ROC",
    thresholds: Mapping[str, float] | None = None,
    auc: float | None = None,
) -> Figure:
    y = np.asarray(y).astype(bool)
    n_ham, n_spam = int((~y).sum()), int(y.sum())
    floor = 1.0 / max(1, n_ham)
    fpr, tpr = roc_points(y, s)
    fig = Figure(figsize=(7, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = fpr >= floor
    # Recall reached with no ham over the threshold is drawn at the floor (x = 0 has no
    # place on a log axis); nothing left of the floor is a measurement.
    start = float(tpr[~shown].max()) if (~shown).any() else 0.0
    ax.plot(
        np.r_[floor, floor, fpr[shown]],
        np.r_[0.0, start, tpr[shown]],
        drawstyle="steps-post",
        color="#377eb8",
        lw=1.5,
        label="ROC (measured points only)",
    )
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, 1.0)
    ax.axvspan(floor / 2, floor, color="#e6e6e6", lw=0, label=f"below 1/{n_ham}: not measurable")
    lowest = start
    for name, threshold in sorted((thresholds or {}).items(), key=lambda kv: -kv[1]):
        f, r = at_threshold(y, s, threshold)
        lowest = min(lowest, r)
        fpr_text = f"< 1/{n_ham}" if f == 0 else f"{f * 100:.2f}%"
        ax.plot(
            [max(f, floor)],
            [r],
            marker="o",
            ls="none",
            color=COLOURS.get(name, "#4daf4a"),
            ms=8,
            zorder=3,
            label=f"{name} (served) p ≥ {threshold:.4g}: FPR {fpr_text}, recall {r * 100:.1f}%",
        )
    ax.set_ylim(max(0.0, lowest - 0.05), 1.005)
    ax.set_xlabel(
        f"ham false-positive rate (log; starts at 1/{n_ham} ham, the smallest measurable)"
    )
    ax.set_ylabel(f"spam recall ({n_spam} spam)")
    ax.legend(loc="lower right", fontsize=8)
    heading = title if auc is None else f"{title}  AUC={auc:.5f}"
    ax.set_title(f"{heading}\n{n_ham} ham, {n_spam} spam")
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    return fig


def write_roc_png(
    y: np.ndarray,
    s: np.ndarray,
    path: str | Path,
    *,
    title: str = "ROC",
    thresholds: Mapping[str, float] | None = None,
    auc: float | None = None,
) -> None:
    render(y, s, title=title, thresholds=thresholds, auc=auc).savefig(Path(path), format="png")
