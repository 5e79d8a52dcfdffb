#!/usr/bin/env python3
"""Classifier benchmark: 5-fold CV on the SpamAssassin corpus, model vs plain baseline.

    .venv/bin/python bench/classifier_bench.py [--corpus /work/shared/corpus] [--card models/NAME]

Per outer fold (stratified, split by message), for both the filterd model and the baseline
(hashed word 1+2-gram logistic regression on the raw message bytes):
  - thresholds are chosen on the *training* part only (inner 5-fold out-of-fold ham scores at
    the target false-reject rate 0.1% / tag 1%), then applied to the test fold;
  - test scores are pooled over the folds for ROC AUC and spam recall at ham FPR 0.1/0.5/1%
    (those recall figures read the threshold off the pooled test ham: a ranking property);
  - hard_ham over threshold is reported both at the pooled 0.1%-FPR threshold and at the
    inner-chosen reject threshold.
Then the model is trained on the whole corpus and checked on corpus/modern (headers masked:
only Subject, MIME-Version and Content-* are kept, for ham and spam alike), and per-message
scoring latency is measured through the real serving path (SpamModel.load + score(bytes)).

Results go to stdout and bench/out/classifier_bench.json; ``--card`` also records them in a
model card under metrics.benchmark (the card is not covered by the array sha256).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filterd.classify import evaluate as ev
from filterd.classify.features import extract_features
from filterd.classify.model import SpamModel, sigmoid, vectorize
from filterd.classify.train import TrainConfig, choose_thresholds, fit_sgd

HAM = ("easy_ham", "easy_ham_2", "hard_ham")
SPAM = ("spam", "spam_2")
KEEP_HEADERS = ("subject", "mime-version", "content-")


def load_dir(d: Path) -> list[tuple[str, bytes]]:
    return [
        (f.name, f.read_bytes()) for f in sorted(d.iterdir()) if f.is_file() and f.name != "cmds"
    ]


def mask_headers(raw: bytes) -> bytes:
    """Keep only Subject, MIME-Version and Content-* top-level headers (modern corpus masking)."""
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    sep = raw.find(b"\n\n")
    if sep < 0:
        return raw
    head, body = raw[:sep], raw[sep:]
    out: list[bytes] = []
    keep = False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower().decode("latin-1")
        keep = name.startswith(KEEP_HEADERS)
        if keep:
            out.append(line)
    return b"\n".join(out) + body


# --------------------------------------------------------------------------- models


class FiltredModel:
    """The filterd model: features.extract_features -> hashed binary -> SGD logistic."""

    name = "filterd"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def featurize(self, raws: list[bytes]):  # type: ignore[no-untyped-def]
        return vectorize([extract_features(r) for r in raws], self.cfg.n_features)

    def fit(self, X, y, seed: int = 0):  # type: ignore[no-untyped-def]
        rng = np.random.default_rng(seed)
        bs = self.cfg.batch_size

        def batches(ep: int):  # type: ignore[no-untyped-def]
            p = rng.permutation(len(y))
            for i in range(0, len(p), bs):
                b = p[i : i + bs]
                yield X[b], y[b]

        coef, b = fit_sgd(batches, self.cfg.n_features, self.cfg)
        return lambda Xt: sigmoid(np.asarray(Xt @ coef).ravel() + b)


class Baseline:
    """Plain baseline: HashingVectorizer word 1+2-grams over the raw bytes + LogisticRegression."""

    name = "baseline"

    def featurize(self, raws: list[bytes]):  # type: ignore[no-untyped-def]
        from sklearn.feature_extraction.text import HashingVectorizer

        hv = HashingVectorizer(
            n_features=2**20, ngram_range=(1, 2), alternate_sign=False, norm="l2"
        )
        return hv.transform([r.decode("latin-1") for r in raws])

    def fit(self, X, y, seed: int = 0):  # type: ignore[no-untyped-def]
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(solver="liblinear", max_iter=1000, random_state=seed).fit(X, y)
        return lambda Xt: clf.predict_proba(Xt)[:, 1]


def inner_thresholds(model, X, y, reject_fpr: float, tag_fpr: float, k: int = 5, seed: int = 0):  # type: ignore[no-untyped-def]
    from sklearn.model_selection import StratifiedKFold

    oof = np.zeros(len(y))
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed + 1).split(
        np.zeros(len(y)), y
    ):
        oof[te] = model.fit(X[tr], y[tr], seed)(X[te])
    return choose_thresholds(oof[y == 0], reject_fpr, tag_fpr)


def cross_validate(model, X, y, groups, folds: int, reject_fpr: float, tag_fpr: float) -> dict:  # type: ignore[no-untyped-def]
    from sklearn.model_selection import StratifiedKFold

    s = np.zeros(len(y))
    over_reject = np.zeros(len(y), dtype=bool)
    over_tag = np.zeros(len(y), dtype=bool)
    fold_aucs, fold_th = [], []
    t0 = time.time()
    for i, (tr, te) in enumerate(
        StratifiedKFold(folds, shuffle=True, random_state=0).split(np.zeros(len(y)), y)
    ):
        th = inner_thresholds(model, X[tr], y[tr], reject_fpr, tag_fpr)
        s[te] = model.fit(X[tr], y[tr])(X[te])
        over_reject[te] = s[te] >= th["reject"]
        over_tag[te] = s[te] >= th["tag"]
        fold_aucs.append(ev.roc_auc(y[te], s[te]))
        fold_th.append(th)
        print(
            f"  [{model.name}] fold {i + 1}/{folds}: AUC {fold_aucs[-1]:.5f} reject>={th['reject']:.4g}",  # noqa: E501
            flush=True,
        )
    m = ev.metrics(y, s, groups=groups)
    hard = groups == "hard_ham"

    def rates(over: np.ndarray) -> dict:
        return {
            "ham_fpr": float(over[y == 0].mean()),
            "ham_over": int(over[y == 0].sum()),
            "spam_recall": float(over[y == 1].mean()),
            "hard_ham_over": int(over[hard].sum()),
            "hard_ham_rate": float(over[hard].mean()),
        }

    m["inner_thresholds"] = {
        "per_fold": fold_th,
        "reject": rates(over_reject),
        "tag": rates(over_tag),
    }
    m["fold_auc_mean"] = float(np.mean(fold_aucs))
    m["fold_auc_min"] = float(np.min(fold_aucs))
    m["seconds"] = round(time.time() - t0, 1)
    m["_scores"] = s
    return m


def summary_line(name: str, m: dict, groups: np.ndarray) -> str:
    r = m["recall_at_fpr"]
    hh = r["0.001"]["over_by_group"]["hard_ham"]
    ir = m["inner_thresholds"]["reject"]
    return (
        f"{name:<9} AUC {m['roc_auc']:.5f} | recall@0.1% {r['0.001']['spam_recall'] * 100:6.2f}% "
        f"@0.5% {r['0.005']['spam_recall'] * 100:6.2f}% @1% {r['0.01']['spam_recall'] * 100:6.2f}% | "  # noqa: E501
        f"hard_ham over 0.1%-thr {hh['over']}/{hh['total']} ({hh['rate'] * 100:.2f}%) | "
        f"inner reject thr: ham FPR {ir['ham_fpr'] * 100:.3f}% ({ir['ham_over']}), recall "
        f"{ir['spam_recall'] * 100:.2f}%, hard_ham {ir['hard_ham_over']} ({ir['hard_ham_rate'] * 100:.2f}%)"  # noqa: E501
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", default="/work/shared/corpus")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--card", default=None, help="model dir whose card.json gets metrics.benchmark")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "out" / "classifier_bench.json")
    )
    ap.add_argument(
        "--show-top", type=int, default=10, help="list the top-scoring ham / lowest spam"
    )
    args = ap.parse_args()
    cfg = TrainConfig()
    root = Path(args.corpus) / "spamassassin"

    t0 = time.time()
    raws: list[bytes] = []
    names: list[str] = []
    groups_l: list[str] = []
    for g in HAM + SPAM:
        for name, raw in load_dir(root / g):
            raws.append(raw)
            names.append(f"{g}/{name}")
            groups_l.append(g)
    y = np.array([0 if g in HAM else 1 for g in groups_l])
    groups = np.array(groups_l)
    print(
        f"loaded {len(raws)} messages ({(y == 0).sum()} ham, {(y == 1).sum()} spam) in {time.time() - t0:.1f}s"  # noqa: E501
    )

    results: dict = {
        "corpus": str(root),
        "folds": args.folds,
        "train_config": cfg.__dict__,
        "models": {},
    }
    models = [FiltredModel(cfg)] + ([] if args.no_baseline else [Baseline()])
    feats = {}
    for mdl in models:
        t0 = time.time()
        feats[mdl.name] = mdl.featurize(raws)
        print(f"[{mdl.name}] featurised in {time.time() - t0:.1f}s")
        m = cross_validate(mdl, feats[mdl.name], y, groups, args.folds, cfg.reject_fpr, cfg.tag_fpr)
        scores = m.pop("_scores")
        results["models"][mdl.name] = m
        if mdl.name == "filterd" and args.show_top:
            order = np.argsort(-scores)
            top_ham = [i for i in order if y[i] == 0][: args.show_top]
            low_spam = [i for i in order[::-1] if y[i] == 1][: args.show_top]
            m["top_ham"] = [(names[i], round(float(scores[i]), 5)) for i in top_ham]
            m["lowest_spam"] = [(names[i], round(float(scores[i]), 5)) for i in low_spam]

    print("\n== 5-fold CV on SpamAssassin (test scores pooled over folds) ==")
    for name, m in results["models"].items():
        print(summary_line(name, m, groups))
    fm = results["models"]["filterd"]
    if "top_ham" in fm:
        print("highest-scoring ham (CV):", ", ".join(f"{n} {s:.3f}" for n, s in fm["top_ham"]))
        print("lowest-scoring spam (CV):", ", ".join(f"{n} {s:.3f}" for n, s in fm["lowest_spam"]))

    # ---------------------------------------------------------------- modern sanity check
    mdl = models[0]
    X = feats["filterd"]
    th = inner_thresholds(mdl, X, y, cfg.reject_fpr, cfg.tag_fpr)
    predict = mdl.fit(X, y)
    modern = Path(args.corpus) / "modern"
    if modern.is_dir():
        mh = [mask_headers(r) for _, r in load_dir(modern / "ham")]
        ms = [mask_headers(r) for _, r in load_dir(modern / "spam")]
        ym = np.array([0] * len(mh) + [1] * len(ms))
        sm = predict(mdl.featurize(mh + ms))
        mm = ev.metrics(ym, sm, th)
        results["modern_masked"] = mm
        print(
            "\n== modern corpus (2015-2025, headers masked), model trained on all SpamAssassin =="
        )
        print(ev.format_metrics(mm))
        if not args.no_baseline:
            bl = models[1]
            sb = bl.fit(feats["baseline"], y)(bl.featurize(mh + ms))
            thb = inner_thresholds(bl, feats["baseline"], y, cfg.reject_fpr, cfg.tag_fpr)
            results["modern_masked_baseline"] = ev.metrics(ym, sb, thb)
            print("-- baseline on the same:")
            print(ev.format_metrics(results["modern_masked_baseline"]))

    # ---------------------------------------------------------------- serving latency
    from filterd.classify.train import fit_sgd as _fit  # noqa: F401 (same training path)

    with tempfile.TemporaryDirectory() as td:
        rng = np.random.default_rng(0)
        p = rng.permutation(len(y))
        coef, b = fit_sgd(
            lambda ep: ((X[p[i : i + 1000]], y[p[i : i + 1000]]) for i in range(0, len(p), 1000)),
            cfg.n_features,
            cfg,
        )
        SpamModel.save(Path(td) / "bench", coef, b, {"thresholds": th})
        sm_model = SpamModel.load(Path(td) / "bench")
        npz_bytes = os.path.getsize(Path(td) / "bench" / "model.npz")
        sample = [raws[i] for i in rng.choice(len(raws), size=min(1500, len(raws)), replace=False)]
        for r in sample[:50]:
            sm_model.score(r)  # warm-up
        lat = []
        for r in sample:
            t = time.perf_counter()
            sm_model.score(r)
            lat.append((time.perf_counter() - t) * 1000)
        lat_a = np.array(lat)
        sizes = np.array([len(r) for r in sample])
        typical = lat_a[(sizes > 2000) & (sizes < 10000)]
    results["latency_ms"] = {
        "p50": float(np.percentile(lat_a, 50)),
        "p90": float(np.percentile(lat_a, 90)),
        "p99": float(np.percentile(lat_a, 99)),
        "max": float(lat_a.max()),
        "typical_2_10kB_p50": float(np.percentile(typical, 50)) if typical.size else None,
        "messages": int(lat_a.size),
    }
    results["model_npz_bytes"] = npz_bytes
    L = results["latency_ms"]
    print(
        f"\n== scoring latency (SpamModel.score on raw bytes, {L['messages']} corpus messages, one core) =="  # noqa: E501
    )
    print(
        f"p50 {L['p50']:.2f} ms  p90 {L['p90']:.2f} ms  p99 {L['p99']:.2f} ms  max {L['max']:.1f} ms  "  # noqa: E501
        f"(2-10 kB messages p50 {L['typical_2_10kB_p50']:.2f} ms); model.npz {npz_bytes / 1e6:.2f} MB"  # noqa: E501
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nwritten {out}")
    if args.card:
        card_p = Path(args.card) / "card.json"
        card = json.loads(card_p.read_text())
        bench = {k: v for k, v in results.items() if k != "train_config"}
        for m in bench["models"].values():
            m.pop("top_ham", None)
            m.pop("lowest_spam", None)
        bench["script"] = "bench/classifier_bench.py"
        bench["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        card.setdefault("metrics", {})["benchmark"] = bench
        tmp = card_p.with_suffix(".tmp")
        tmp.write_text(json.dumps(card, indent=2, default=float) + "\n")
        os.replace(tmp, card_p)
        print(f"recorded in {card_p}")


if __name__ == "__main__":
    main()
