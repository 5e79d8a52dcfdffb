"""The ROC picture starts where the ham count allows and marks the served thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from filterd.roc import at_threshold, render, write_roc_png


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    ham = rng.beta(1, 12, 400)
    spam = rng.beta(8, 1.5, 100)
    return np.r_[np.zeros(400), np.ones(100)], np.r_[ham, spam]


def test_axis_starts_at_one_over_ham_count_and_thresholds_are_marked(tmp_path: Path) -> None:
    y, s = _data()
    fig = render(y, s, title="m", thresholds={"reject": 0.99, "tag": 0.3})
    ax = fig.axes[0]
    left, right = ax.get_xlim()
    assert left == 1 / 400 / 2 and right == 1.0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1] == "below 1/400: not measurable"
    f_reject, r_reject = at_threshold(y, s, 0.99)
    f_tag, r_tag = at_threshold(y, s, 0.3)
    assert f_reject == 0 and f_tag > 0
    assert labels[2] == f"reject (served) p ≥ 0.99: FPR < 1/400, recall {r_reject * 100:.1f}%"
    assert labels[3] == f"tag (served) p ≥ 0.3: FPR {f_tag * 100:.2f}%, recall {r_tag * 100:.1f}%"
    curve = ax.get_lines()[0]
    assert min(curve.get_xdata()) >= 1 / 400  # nothing drawn where nothing was measured
    out = tmp_path / "roc.png"
    write_roc_png(y, s, out, thresholds={"reject": 0.99})
    assert out.read_bytes()[:4] == b"\x89PNG"
