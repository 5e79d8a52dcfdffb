"""Metrics for a spam scorer: ROC AUC, spam recall at fixed ham false-positive rates, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FPR_POINTS = (0.001, 0.005, 0.01)


def select_threshold(ham_scores: Sequence[float] | np.ndarray, target_fpr: float) -> float:
    """Smallest threshold t with fraction(ham score >= t) <= target_fpr.

    With k = floor(target_fpr * n) the k highest ham scores may lie above t; t sits just above the
    (k+1)-th highest.  With few ham messages (k = 0) that is just above the highest ham score.
    """
    hs = np.sort(np.asarray(ham_scores, dtype=np.float64))[::-1]
    if hs.size == 0:
        raise ValueError("no ham scores to choose a threshold from")
    k = int(np.floor(target_fpr * hs.size + 1e-9))
    if k >= hs.size:
        return 0.0
    return float(min(1.0, np.nextafter(hs[k], np.inf)))


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties counted half). NaN when one class is missing."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float) -> tuple[float, float]:
    """(spam recall, threshold) at the threshold where ham FPR <= fpr (threshold from these ham)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    if not y.any() or y.all():
        return float("nan"), float("nan")
    t = select_threshold(s[~y], fpr)
    return float((s[y] >= t).mean()), t


def confusion(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    over = s >= threshold
    n_ham, n_spam = int((~y).sum()), int(y.sum())
    fp, tp = int((over & ~y).sum()), int((over & y).sum())
    return {
        "threshold": float(threshold),
        "ham_over": fp,
        "ham_total": n_ham,
        "ham_fpr": fp / n_ham if n_ham else float("nan"),
        "spam_over": tp,
        "spam_total": n_spam,
        "spam_recall": tp / n_spam if n_spam else float("nan"),
    }


def metrics(
    y: np.ndarray,
    s: np.ndarray,
    thresholds: dict[str, float] | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """All figures as a JSON-able dict.

    ``recall_at_fpr`` uses thresholds read off these very scores (a property of the ranking);
    ``at_thresholds`` applies fixed thresholds chosen elsewhere (honest operating figures).
    ``groups`` (e.g. source folder per message) adds per-group rates over each threshold.
    """
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    out: dict[str, Any] = {
        "n_ham": int((~y).sum()),
        "n_spam": int(y.sum()),
        "roc_auc": roc_auc(y, s),
        "recall_at_fpr": {},
    }
    for f in FPR_POINTS:
        r, t = recall_at_fpr(y, s, f)
        entry: dict[str, Any] = {"spam_recall": r, "threshold": t}
        if groups is not None:
            entry["over_by_group"] = _by_group(s, groups, t)
        out["recall_at_fpr"][f"{f:g}"] = entry
    if thresholds:
        out["at_thresholds"] = {}
        for name, t in thresholds.items():
            c = confusion(y, s, t)
            if groups is not None:
                c["over_by_group"] = _by_group(s, groups, t)
            out["at_thresholds"][name] = c
    return out


def _by_group(s: np.ndarray, groups: np.ndarray, t: float) -> dict[str, Any]:
    res = {}
    for g in sorted(set(groups.tolist())):
        m = groups == g
        res[str(g)] = {
            "over": int((s[m] >= t).sum()),
            "total": int(m.sum()),
            "rate": float((s[m] >= t).mean()),
        }
    return res


def format_metrics(m: dict[str, Any]) -> str:
    lines = [f"messages: {m['n_ham']} ham, {m['n_spam']} spam", f"ROC AUC: {m['roc_auc']:.5f}"]
    for f, e in m["recall_at_fpr"].items():
        n_allowed = int(np.floor(float(f) * m["n_ham"] + 1e-9))
        note = (
            f"{n_allowed} of {m['n_ham']} ham over"
            if n_allowed
            else f"NOT MEASURABLE with {m['n_ham']} ham: threshold above every ham"
        )
        lines.append(
            f"spam recall at ham FPR {float(f) * 100:g}%: {e['spam_recall'] * 100:.2f}%"
            f"  (threshold {e['threshold']:.6g}; {note})"
        )
    for name, c in (m.get("at_thresholds") or {}).items():
        lines.append(
            f"{name} threshold {c['threshold']:.6g}: ham over {c['ham_over']}/{c['ham_total']} "
            f"({c['ham_fpr'] * 100:.3f}%), spam over {c['spam_over']}/{c['spam_total']} "
            f"({c['spam_recall'] * 100:.2f}%)"
        )
        for g, e in (c.get("over_by_group") or {}).items():
            lines.append(f"    {g}: {e['over']}/{e['total']} ({e['rate'] * 100:.2f}%)")
    return "\n".join(lines)


def roc_png(
    y: np.ndarray,
    s: np.ndarray,
    path: str,
    title: str = "ROC",
    thresholds: dict[str, float] | None = None,
) -> None:
    """Drawn by filterd.roc (service helper): starts at 1/N ham, marks served thresholds."""
    from filterd.roc import write_roc_png

    write_roc_png(y, s, path, title=title, thresholds=thresholds, auc=roc_auc(y, s))
