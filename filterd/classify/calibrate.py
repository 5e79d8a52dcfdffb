"""``filterd calibrate``: set the served thresholds from an operator's own ham, keeping no mail.

Only scores go in (each message is scored and dropped), only thresholds and counts come out (into
the model card).  The reject threshold is the smallest one with at most ``fpr`` of the sample's ham
over it; the run also says how precise that is for the sample size: the exact (Clopper-Pearson)
95% upper bound on the true ham false-reject rate given the ham observed over the threshold.  With
``n`` ham and none over, that bound is ``1 - 0.025**(1/n)`` (about 3.7/n): 1000 ham can show at
best "FPR < 0.37%", and a 0.1% target needs about 3700 ham to be confirmed.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from filterd.classify import evaluate as ev
from filterd.classify.model import CARD_FILE, ModelError, _atomic_write


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact two-sided ``confidence`` upper bound of a binomial rate with ``k`` of ``n``."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence
    if k == 0:
        return float(1.0 - (alpha / 2.0) ** (1.0 / n))
    from scipy.stats import beta

    return float(beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))


def ham_needed(target_fpr: float, confidence: float = 0.95) -> int:
    """Ham needed before zero observed false rejects bound the rate below ``target_fpr``."""
    alpha = 1.0 - confidence
    return math.ceil(math.log(alpha / 2.0) / math.log(1.0 - target_fpr))


def calibrate_scores(
    ham: np.ndarray, spam: np.ndarray | None, fpr: float = 0.001, tag_fpr: float = 0.005
) -> dict[str, Any]:
    """Thresholds and their precision from score samples (no messages involved)."""
    ham = np.asarray(ham, dtype=np.float64)
    if ham.size == 0:
        raise ValueError("no ham scores to calibrate on")
    reject = ev.select_threshold(ham, fpr)
    tag = min(reject, ev.select_threshold(ham, tag_fpr))
    k = int((ham >= reject).sum())
    out: dict[str, Any] = {
        "reject": reject,
        "tag": tag,
        "reject_target_fpr": fpr,
        "tag_target_fpr": tag_fpr,
        "n_ham": int(ham.size),
        "ham_over_reject": k,
        "ham_over_tag": int((ham >= tag).sum()),
        "ham_fpr_observed": k / ham.size,
        "ham_fpr_upper_95": clopper_pearson_upper(k, int(ham.size)),
        "ham_needed_to_confirm_target": ham_needed(fpr),
        "measurable": bool(ham.size * fpr >= 1.0),
    }
    if spam is not None and np.asarray(spam).size:
        sp_ = np.asarray(spam, dtype=np.float64)
        out["n_spam"] = int(sp_.size)
        out["spam_over_reject"] = int((sp_ >= reject).sum())
        out["spam_over_tag"] = int((sp_ >= tag).sum())
        out["spam_recall_at_reject"] = float((sp_ >= reject).mean())
    return out


def write_to_card(model_dir: Path, result: dict[str, Any], note: str = "") -> dict[str, Any]:
    """Record the thresholds and counts in ``model_dir/card.json`` (atomic replace)."""
    p = Path(model_dir) / CARD_FILE
    try:
        card: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {p}: {e}") from None
    th = dict(card.get("thresholds") or {})
    previous = {k: th.get(k) for k in ("reject", "tag", "chosen_on")}
    th.update(
        reject=result["reject"],
        tag=result["tag"],
        reject_target_fpr=result["reject_target_fpr"],
        tag_target_fpr=result["tag_target_fpr"],
        chosen_on=(
            f"filterd calibrate: {result['n_ham']} ham of the operator's own mail"
            + (f" ({note})" if note else "")
        ),
    )
    card["thresholds"] = th
    cal = {
        "at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **result,
        "previous": previous,
    }
    card.setdefault("calibrations", []).append(cal)
    _atomic_write(p, (json.dumps(card, indent=2) + "\n").encode())
    return card


def format_result(r: dict[str, Any]) -> str:
    lines = [
        f"ham scored: {r['n_ham']}" + (f", spam scored: {r['n_spam']}" if "n_spam" in r else ""),
        f"reject threshold {r['reject']:.6g} (target ham FPR {r['reject_target_fpr']:g}): "
        f"{r['ham_over_reject']} ham over it ({r['ham_fpr_observed'] * 100:.3f}%); "
        f"true FPR < {r['ham_fpr_upper_95'] * 100:.3f}% with 95% confidence",
        f"tag threshold {r['tag']:.6g} (target ham FPR {r['tag_target_fpr']:g}): "
        f"{r['ham_over_tag']} ham over it",
    ]
    if not r["measurable"]:
        lines.append(
            f"WARNING: {r['n_ham']} ham cannot measure a {r['reject_target_fpr']:g} rate; "
            f"the threshold sits just above the highest ham score"
        )
    if r["ham_fpr_upper_95"] > r["reject_target_fpr"]:
        lines.append(
            f"note: confirming FPR <= {r['reject_target_fpr']:g} needs about "
            f"{r['ham_needed_to_confirm_target']} ham with none over the threshold"
        )
    if "spam_recall_at_reject" in r:
        lines.append(
            f"spam over reject: {r['spam_over_reject']}/{r['n_spam']} "
            f"({r['spam_recall_at_reject'] * 100:.2f}%), over tag: {r['spam_over_tag']}"
        )
    return "\n".join(lines)
