"""Tests for filterd.classify: features, corpus readers, train/evaluate, model files, registry."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from filterd.classify import corpus, evaluate, registry
from filterd.classify.cli import evaluate as evaluate_cmd
from filterd.classify.cli import model as model_cmd
from filterd.classify.cli import train as train_cmd
from filterd.classify.features import FEATURES_VERSION, extract_features
from filterd.classify.model import ModelError, SpamModel
from filterd.classify.registry import ModelHolder
from filterd.classify.train import TrainConfig, fit_sgd, train

# --------------------------------------------------------------------------- synthetic corpus

HAM_WORDS = [
    "meeting",
    "agenda",
    "patch",
    "review",
    "kernel",
    "build",
    "compile",
    "thanks",
    "regards",
    "attached",
    "notes",
    "draft",
    "schedule",
    "lunch",
    "tomorrow",
    "project",
    "release",
    "branch",
    "merge",
    "question",
    "answer",
    "bug",
    "fix",
    "test",
]
SPAM_WORDS = [
    "free",
    "money",
    "winner",
    "viagra",
    "cheap",
    "offer",
    "click",
    "now",
    "limited",
    "guaranteed",
    "cash",
    "prize",
    "casino",
    "loan",
    "credit",
    "discount",
    "pills",
    "urgent",
    "claim",
    "million",
    "unsubscribe",
    "lottery",
    "bonus",
]


def _msg(i: int, spam: bool, rng: random.Random) -> bytes:
    words = SPAM_WORDS if spam else HAM_WORDS
    body = " ".join(rng.choice(words) for _ in range(40))
    subj = " ".join(rng.choice(words) for _ in range(4))
    if spam:
        return (
            f'From: "WINNER" <promo{i}@deals{i}.biz>\r\nTo: you@example.org\r\n'
            f"Subject: {subj.upper()}!!!\r\nMessage-ID: <{i}.{i * 7}@deals{i}.biz>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=iso-8859-1\r\n\r\n"
            f"<html><body><font color=white>x</font><a href='http://deals{i}.biz/c?id={i}'>"
            f"{body}</a><img src='http://1.2.3.4/a.gif'></body></html>\r\n"
        ).encode()
    return (
        f"From: Alice Example <alice{i % 5}@example.org>\nTo: bob@example.org\n"
        f"Subject: Re: {subj}\nMessage-ID: <{i}@mail.example.org>\nIn-Reply-To: <x{i}@example.org>\n"  # noqa: E501
        f"Content-Type: text/plain; charset=utf-8\n\n> earlier text\n{body}\n"
    ).encode()


def make_corpus(root: Path, n: int = 60, seed: int = 0) -> dict[str, Path]:
    """ham: maildir + plain dir; spam: mbox file + plain dir (first line an mbox From line)."""
    rng = random.Random(seed)
    ham_md = root / "ham_maildir"
    for sub in ("cur", "new", "tmp"):
        (ham_md / sub).mkdir(parents=True)
    ham_plain = root / "ham_plain"
    ham_plain.mkdir()
    spam_plain = root / "spam_plain"
    spam_plain.mkdir()
    mbox_parts = []
    for i in range(n):
        h = _msg(i, False, rng)
        if i % 2:
            (ham_md / ("cur" if i % 4 == 1 else "new") / f"{i}.host:2,S").write_bytes(h)
        else:
            (ham_plain / f"{i:05d}").write_bytes(h)
        s = _msg(i, True, rng)
        if i % 2:
            mbox_parts.append(
                b"From spammer@x Mon Jan  1 00:00:00 2024\n" + s.replace(b"\r\n", b"\n") + b"\n"
            )
        else:
            (spam_plain / f"{i:05d}").write_bytes(b"From spammer@x Mon Jan  1 00:00:00 2024\n" + s)
    (root / "spam.mbox").write_bytes(b"".join(mbox_parts))
    return {
        "ham_md": ham_md,
        "ham_plain": ham_plain,
        "spam_mbox": root / "spam.mbox",
        "spam_plain": spam_plain,
    }


SMALL_CFG = TrainConfig(
    n_features=2**16, epochs=3, folds=3, batch_size=32, reject_fpr=0.01, tag_fpr=0.05
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clf")
    srcs = make_corpus(root)
    mdir = root / "models"
    train(
        [srcs["ham_md"], srcs["ham_plain"]],
        [srcs["spam_mbox"], srcs["spam_plain"]],
        mdir / "m1",
        SMALL_CFG,
    )
    return {"root": root, "models": mdir, **srcs}


# --------------------------------------------------------------------------- features


def test_features_basic_prefixes() -> None:
    toks = extract_features(_msg(1, True, random.Random(1)))
    assert any(t.startswith("w:") for t in toks)
    assert any(t.startswith("s:") for t in toks)
    assert "m:text/html" in toks
    assert any(t.startswith("u:") for t in toks) and "us:ip" in toks
    assert "o:html_white" in toks


def test_features_exclude_corpus_identifying_headers() -> None:
    raw = (
        b"From: a@b.example\nTo: secret-recipient@corp.example\nList-Id: <mylist.lists.example>\n"
        b"X-Spam-Status: Yes, score=99\nDelivered-To: zzz@corp.example\nDate: Tue, 1 Jan 2002 00:00:00 +0000\n"  # noqa: E501
        b"Subject: [MYLIST] hello\n\nbody text\n"
    )
    joined = " ".join(extract_features(raw))
    for leak in ("secret", "mylist", "99", "zzz", "2002", "corp"):
        assert leak not in joined, leak


def test_list_footer_stripped() -> None:
    raw = (
        b"From: a@b.example\nSubject: x\n\nreal content here\n"
        b"_______________________________________________\nFoo-users mailing list\n"
        b"Foo-users@lists.example.net\nhttps://lists.example.net/mailman/listinfo/foo-users\n"
    )
    toks = extract_features(raw)
    assert "w:content" in toks
    assert not any("listinfo" in t or "foo" in t or "example.net" in t for t in toks)


GARBAGE = [
    b"",
    b"\x00" * 1000,
    bytes(random.Random(3).getrandbits(8) for _ in range(20000)),
    b"From \n\n\n",
    b'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Transfer-Encoding: base64\n'
    b"Content-Type: text/plain; charset=utf-8\n\n!!!not base64@@@===\n--b--\n",
    b"Content-Type: text/plain; charset=x-bogus-charset-\xff\nSubject: =?x-nope?B?////?=\n\n\xff\xfe\xfd text",  # noqa: E501
    b'Content-Type: text/html; charset="utf-16"\n\n<html>\x00<a href=http://[::1>x</a',
    b"Subject: =?utf-8?Q?broken=ZZ?= =?iso-8859-1?B?not-base64?=\nFrom: <<<@@@>>>\nMessage-ID: @\n\nx",  # noqa: E501
    b"Content-Type: multipart/alternative; boundary=x\n\n"
    + b"--x\nContent-Type: multipart/mixed; boundary=x\n\n" * 300,
    b"Received: from\nReceived: (\nFrom: \"\xff\" <@>\nReply-To: ,,,\n\n<a href='http://%%%/'>http://a.b</a>",
]


@pytest.mark.parametrize("raw", GARBAGE)
def test_features_never_raise_on_garbage(raw: bytes) -> None:
    toks = extract_features(raw)
    assert isinstance(toks, list) and all(isinstance(t, str) for t in toks)


def test_features_huge_part_is_capped() -> None:
    big = base64.encodebytes(b"spam word " * 500_000)  # ~5 MB decoded, ~6.7 MB encoded
    raw = b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n" + big
    toks = extract_features(raw)
    assert "x:truncated" in toks
    assert sum(t.startswith("w:") for t in toks) <= 3000


def test_features_accept_non_bytes() -> None:
    assert isinstance(extract_features("Subject: hi\n\nhello"), list)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- corpus readers


def test_corpus_readers(trained: dict[str, Path]) -> None:
    md = list(corpus.iter_messages(trained["ham_md"]))
    plain = list(corpus.iter_messages(trained["ham_plain"]))
    mbox = list(corpus.iter_messages(trained["spam_mbox"]))
    assert len(md) == 30 and len(plain) == 30 and len(mbox) == 30
    assert corpus.is_maildir(trained["ham_md"])
    assert all(b"Subject:" in raw and not raw.startswith(b"From ") for _, raw in mbox)


def test_mbox_from_unescape(tmp_path: Path) -> None:
    p = tmp_path / "x.mbox"
    p.write_bytes(b"From a\nSubject: 1\n\n>From me\n\nFrom b\nSubject: 2\n\nbody\n")
    msgs = [r for _, r in corpus.iter_messages(p)]
    assert len(msgs) == 2 and b"\nFrom me\n" in msgs[0]


# --------------------------------------------------------------------------- thresholds / metrics


def test_select_threshold_known_case() -> None:
    ham = [0.1, 0.2, 0.3, 0.9]
    t = evaluate.select_threshold(ham, 0.25)  # one of four ham may be over
    assert 0.3 < t <= 0.9
    assert evaluate.select_threshold(ham, 0.0) > 0.9
    assert (
        evaluate.select_threshold(list(np.linspace(0, 1, 1000)), 0.001)
        > np.linspace(0, 1, 1000)[-2]
    )


def test_metrics_perfectly_separable() -> None:
    y = np.array([0] * 50 + [1] * 50)
    s = np.concatenate([np.linspace(0, 0.4, 50), np.linspace(0.6, 1, 50)])
    m = evaluate.metrics(y, s, {"reject": 0.5})
    assert m["roc_auc"] == 1.0
    assert m["recall_at_fpr"]["0.001"]["spam_recall"] == 1.0
    c = m["at_thresholds"]["reject"]
    assert c["ham_over"] == 0 and c["spam_over"] == 50
    assert evaluate.roc_auc(np.array([0, 1, 0, 1]), np.array([0.9, 0.1, 0.8, 0.2])) == 0.0


# --------------------------------------------------------------------------- training + model files


def test_train_and_load_roundtrip(trained: dict[str, Path]) -> None:
    m = SpamModel.load(trained["models"] / "m1")
    reject, tag = m.thresholds
    assert 0 <= tag <= reject <= 1
    assert m.name == "m1"
    card = m.card
    assert card["features"]["features_version"] == FEATURES_VERSION
    assert (
        card["training_data"]["ham_messages"] == 60 and card["training_data"]["spam_messages"] == 60
    )
    assert len(card["files"]["model.npz"]["sha256"]) == 64
    assert "scikit-learn" in card["libraries"]
    assert card["metrics"]["out_of_fold"]["roc_auc"] > 0.95
    rng = random.Random(99)
    assert m.score(_msg(500, True, rng)) > m.score(_msg(501, False, rng))
    p = m.score(b"\x00garbage")
    assert isinstance(p, float) and 0.0 <= p <= 1.0
    # arrays really are pickle-free
    with np.load(trained["models"] / "m1" / "model.npz", allow_pickle=False) as z:
        assert set(z.files) == {"indices", "values", "intercept"}


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in ("model.npz", "card.json"):
        (dst / f).write_bytes((src / f).read_bytes())


def test_tampered_model_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    _copy_model(trained["models"] / "m1", bad)
    data = bytearray((bad / "model.npz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "model.npz").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        SpamModel.load(bad)


def test_wrong_features_version_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "oldfx"
    _copy_model(trained["models"] / "m1", bad)
    card = json.loads((bad / "card.json").read_text())
    card["features"]["features_version"] = "fx-0"
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="features version"):
        SpamModel.load(bad)


@pytest.mark.parametrize("what", ["missing_npz", "missing_card", "bad_json", "bad_thresholds"])
def test_broken_model_refused(trained: dict[str, Path], tmp_path: Path, what: str) -> None:
    bad = tmp_path / what
    _copy_model(trained["models"] / "m1", bad)
    if what == "missing_npz":
        (bad / "model.npz").unlink()
    elif what == "missing_card":
        (bad / "card.json").unlink()
    elif what == "bad_json":
        (bad / "card.json").write_text("{not json")
    else:
        card = json.loads((bad / "card.json").read_text())
        card["thresholds"]["reject"] = 2.0
        (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError):
        SpamModel.load(bad)


# --------------------------------------------------------------------------- registry / holder


def test_promote_and_holder(
    trained: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mdir = tmp_path / "models"
    _copy_model(trained["models"] / "m1", mdir / "a")
    _copy_model(trained["models"] / "m1", mdir / "b")
    _copy_model(trained["models"] / "m1", mdir / "corrupt")
    (mdir / "corrupt" / "model.npz").write_bytes(b"PK\x03\x04 nope")
    assert registry.active_name(mdir) is None
    holder = ModelHolder(mdir, check_interval=0)
    assert holder.current() is None and holder.last_error
    registry.promote(mdir, "a")
    assert registry.active_name(mdir) == "a"
    assert holder.maybe_reload() is True
    assert holder.current() is not None and holder.current().name == "a"  # type: ignore[union-attr]
    assert holder.maybe_reload() is False  # nothing changed
    with pytest.raises(ModelError):
        registry.promote(mdir, "corrupt")  # promote verifies first
    assert registry.active_name(mdir) == "a"
    # someone bypasses promote: ACTIVE points at a corrupt model -> holder keeps the old one
    (mdir / "ACTIVE").write_text("corrupt\n")
    with caplog.at_level(logging.ERROR, logger="filterd.classify"):
        assert holder.maybe_reload() is False
    assert holder.current().name == "a"  # type: ignore[union-attr]
    assert "corrupt" in (holder.last_error or "") and "keeping model 'a'" in caplog.text
    holder.request_reload()
    assert holder.maybe_reload() is False and holder.current().name == "a"  # type: ignore[union-attr]
    registry.promote(mdir, "b")
    assert holder.maybe_reload() is True and holder.name == "b"
    names = {e["name"]: e for e in registry.list_models(mdir)}
    assert names["b"]["active"] and names["a"]["ok"] and not names["corrupt"]["ok"]
    with pytest.raises(ModelError):
        registry.promote(mdir, "../etc")
    assert not [p for p in os.listdir(mdir) if p.endswith(".tmp")]


def test_concurrent_scoring_while_promoting(trained: dict[str, Path], tmp_path: Path) -> None:
    mdir = tmp_path / "models"
    for n in ("a", "b"):
        _copy_model(trained["models"] / "m1", mdir / n)
    registry.promote(mdir, "a")
    holder = ModelHolder(mdir, check_interval=0)
    msgs = [_msg(i, i % 2 == 0, random.Random(i)) for i in range(10)]
    errors: list[BaseException] = []
    results: list[float] = []
    stop = threading.Event()

    def worker() -> None:
        try:
            i = 0
            while not stop.is_set():
                holder.maybe_reload()
                m = holder.current()
                assert m is not None
                p = m.score(msgs[i % len(msgs)])
                assert isinstance(p, float) and 0.0 <= p <= 1.0
                results.append(p)
                i += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        registry.promote(mdir, "b" if i % 2 == 0 else "a")
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert len(results) > 0
    assert registry.active_name(mdir) == "a"


# --------------------------------------------------------------------------- CLI


def test_cli_train_evaluate_promote(tmp_path: Path) -> None:
    srcs = make_corpus(tmp_path / "c", n=30, seed=5)
    mdir = tmp_path / "models"
    runner = CliRunner()
    r = runner.invoke(
        train_cmd,
        [
            "--ham",
            str(srcs["ham_md"]),
            "--ham",
            str(srcs["ham_plain"]),
            "--spam",
            str(srcs["spam_mbox"]),
            "--spam",
            str(srcs["spam_plain"]),
            "--out",
            str(mdir / "cli1"),
            "--bits",
            "14",
            "--epochs",
            "2",
            "--folds",
            "3",
            "--ensemble",
            "2",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "thresholds" in r.output
    assert "averaged over 2 runs" in (mdir / "cli1" / "card.json").read_text()
    r = runner.invoke(model_cmd, ["promote", "cli1", "--models-dir", str(mdir)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(model_cmd, ["list"], env={registry.ENV_MODELS_DIR: str(mdir)})
    assert r.exit_code == 0 and "* cli1" in r.output
    r = runner.invoke(model_cmd, ["show", "cli1", "--models-dir", str(mdir)])
    assert r.exit_code == 0 and json.loads(r.output)["name"] == "cli1"
    png = tmp_path / "roc.png"
    r = runner.invoke(
        evaluate_cmd,
        [
            "cli1",
            "--models-dir",
            str(mdir),
            "--ham",
            str(srcs["ham_plain"]),
            "--spam",
            str(srcs["spam_plain"]),
            "--roc-png",
            str(png),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "ROC AUC" in r.output and png.stat().st_size > 1000
    r = runner.invoke(model_cmd, ["promote", "nope", "--models-dir", str(mdir)])
    assert r.exit_code != 0


def _sparse_batches(random_state: int):  # type: ignore[no-untyped-def]
    """A small random sparse problem as ``fit_sgd`` reads it: epoch -> shuffled batches."""
    import scipy.sparse as sp

    X = sp.random(60, 64, density=0.2, format="csr", random_state=random_state, dtype=np.float32)
    y = (np.asarray(X[:, :8].sum(1)).ravel() > 0.5).astype(np.int64)

    def batches(ep: int):  # type: ignore[no-untyped-def]
        p = np.random.default_rng(ep).permutation(len(y))
        for i in range(0, len(p), 20):
            yield X[p[i : i + 20]], y[p[i : i + 20]]

    return batches


def test_fit_sgd_ensemble_is_mean_of_runs() -> None:
    batches = _sparse_batches(1)
    cfg = TrainConfig(n_features=64, epochs=2, ensemble=2, seed=0)
    coef, b = fit_sgd(batches, 64, cfg)
    c0, b0 = fit_sgd(batches, 64, TrainConfig(n_features=64, epochs=2, ensemble=1, seed=0))
    c1, b1 = fit_sgd(
        lambda ep: batches(ep + 2), 64, TrainConfig(n_features=64, epochs=2, ensemble=1, seed=1)
    )
    assert not np.allclose(c0, c1)
    np.testing.assert_allclose(coef, (c0 + c1) / 2)
    assert b == pytest.approx((b0 + b1) / 2)


def test_fit_sgd_average_returns_the_mean_of_the_iterates() -> None:
    # TrainConfig.average (default, chosen out of source) must reach sklearn as average=True:
    # the same seed and batches give sklearn's averaged weights, not the last iterate
    from sklearn.linear_model import SGDClassifier

    batches = _sparse_batches(2)
    assert TrainConfig().average
    cfg = TrainConfig(n_features=64, epochs=3, ensemble=1, seed=0, ham_weight=1.0)
    coef, b = fit_sgd(batches, 64, cfg)
    last, _ = fit_sgd(batches, 64, TrainConfig(**{**cfg.__dict__, "average": False}))
    ref = SGDClassifier(
        loss="log_loss", penalty="l2", alpha=cfg.alpha, random_state=0, average=True
    )
    for ep in range(3):
        for xb, yb in batches(ep):
            ref.partial_fit(xb, yb, classes=np.array([0, 1]), sample_weight=np.ones(len(yb)))
    np.testing.assert_allclose(coef, ref.coef_.ravel())
    assert b == pytest.approx(float(ref.intercept_[0]))
    assert not np.allclose(coef, last)


def test_shipped_default_model_loads() -> None:
    mdir = Path(__file__).resolve().parents[1] / "models"
    name = registry.active_name(mdir) if mdir.is_dir() else None
    if not name:
        pytest.skip("no active model shipped")
    m = SpamModel.load(mdir / name)
    assert (mdir / name / "model.npz").stat().st_size < 5_000_000
    spam = _msg(1, True, random.Random(1))
    assert 0.0 <= m.score(spam) <= 1.0
