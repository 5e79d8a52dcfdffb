"""Issue 11 / 15 (items 2, 5): hashing without sklearn, thin evidence, padding, thresholds.

The spam built here is corpus-like (the prose and structure of 2002-2025 spam, written for the
test; no corpus message is copied), and checked against the shipped model as an operator would
see it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from email.mime.image import MIMEImage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from filterd.classify import registry
from filterd.classify.calibrate import calibrate_scores, clopper_pearson_upper, ham_needed
from filterd.classify.features import extract_features, parse_message
from filterd.classify.hashing import token_indices
from filterd.classify.model import ModelError, SpamModel, sigmoid, vectorize
from filterd.classify.thresholds import served, served_from_config
from filterd.settings import PROJECT_ROOT, load_settings
from filterd.types import Message

SPAM_BODY = (
    "Dear Friend,\n\nYou have been selected to receive a CASH GRANT of $25,000.00 which you "
    "never have to repay! Thousands of people just like you are receiving FREE MONEY from the "
    "government every single month. This is NOT a loan and there is NO credit check.\n\n"
    "To claim your grant today, click the link below and fill in the short secure form. "
    "This limited time offer expires in 48 hours, so act NOW!!!\n\n"
    "http://grants-4-you.biz/claim.php?id=88213\n\n"
    "100% GUARANTEED or your money back. Order now and receive a FREE bonus report.\n\n"
    "To be removed from our mailing list, reply with REMOVE in the subject line.\n"
)
SPAM_HTML = (
    "<html><body><p><b><font color=red size=5>URGENT: Your account has been suspended!</font>"
    "</b></p><p>Dear valued customer, we detected unusual activity on your account. Verify your "
    "identity within 24 hours or your account will be permanently closed. Click here to verify "
    "your account and restore full access immediately.</p>"
    '<p><a href="http://secure-verify-login.xyz/acc/update?u=8812">http://www.paypal.com/verify'
    "</a></p><p>Claim your FREE gift card worth $500 now! Limited offer, act today!!! "
    "Earn money fast, work from home, guaranteed income, no experience needed.</p>"
    '<p><font size=1 color="#ffffff">unsubscribe remove opt out</font></p></body></html>'
)


def _spam_plain() -> MIMEMultipart:
    m = MIMEMultipart("mixed")
    m["From"] = '"Grant Department" <grants8812@hotmail.com>'
    m["Subject"] = "FREE CASH GRANTS - NEVER REPAY!!!"
    m.attach(MIMEText(SPAM_BODY, "plain", "us-ascii"))
    return m


def _spam_html() -> MIMEMultipart:
    m = MIMEMultipart("mixed")
    m["From"] = '"Account Security" <no-reply@secure-verify-login.xyz>'
    m["Subject"] = "URGENT: your account is suspended - verify now"
    m.attach(MIMEText(SPAM_HTML, "html", "utf-8"))
    return m


def _padded(build, n: int = 63) -> MIMEMultipart:  # type: ignore[no-untyped-def]
    m = build()
    body = m.get_payload()
    m.set_payload([])
    for _ in range(n):
        m.attach(MIMEText("", "plain"))
    for part in body:
        m.attach(part)
    return m


def _shipped() -> SpamModel:
    mdir = PROJECT_ROOT / "models"
    name = registry.active_name(mdir)
    assert name
    return SpamModel.load(mdir / name)


# --------------------------------------------------------------------------- hashing


def test_mmh3_indices_equal_sklearn_featurehasher() -> None:
    from sklearn.feature_extraction import FeatureHasher

    toks = [*extract_features(_spam_html().as_bytes()), "w:wörld", "g: é", "x" * 300]
    for n in (2**16, 2**20):
        X = FeatureHasher(n_features=n, input_type="string", alternate_sign=False)
        ref = X.transform([toks]).tocsr()
        ref.sum_duplicates()
        assert list(ref.indices) == list(token_indices(toks, n))


def test_deferred_ngrams_hash_to_the_columns_of_the_listed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serving names each body word (``defer_grams``) instead of listing its w: and g: tokens; the
    columns must be exactly those of the listed tokens training hashes, also when the
    per-word hash cache fills and is cleared mid-message."""
    import random

    from filterd.classify import hashing

    monkeypatch.setattr(hashing, "_WORD_HASHES_MAX", 7)
    rnd = random.Random(5)
    alphabet = "abcdefghij01345$_'\u00e9\u0436 "
    texts = [
        "v1agra cheap m3ds $ave big_word x " + "a" * 25 + " caf\u00e9 \u0436\u0443\u043a",
        *("".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 400))) for _ in range(40)),
    ]
    raws = [_spam_plain().as_bytes(), _spam_html().as_bytes()] + [
        MIMEText(t, "plain", "utf-8").as_bytes() for t in texts
    ]
    for n in (2**16, 2**20):
        for raw in raws:
            listed = extract_features(raw)
            named = extract_features(raw, defer_grams=True)
            assert named.deferred_words is not None
            assert not [t for t in named if t.startswith(("g:", "w:"))]
            assert [t for t in listed if not t.startswith(("g:", "w:"))] == list(named)
            assert named.evidence == listed.evidence
            assert list(token_indices(named, n, named.deferred_words)) == list(
                token_indices(listed, n)
            )
    m = _shipped()
    for raw in raws:
        assert m.score(raw) == m.score_tokens(extract_features(raw))


def _tiny_model(tmp: Path, n: int = 2**16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    coef = rng.normal(0, 2.0, n)
    SpamModel.save(tmp / "tiny", coef, 0.3, {"thresholds": {"reject": 0.9, "tag": 0.5}})
    return tmp / "tiny"


def test_serving_and_training_paths_give_identical_scores(tmp_path: Path) -> None:
    m = SpamModel.load(_tiny_model(tmp_path))
    raws = [_spam_plain().as_bytes(), _spam_html().as_bytes(), b"Subject: hi\n\nshort"]
    toks = [extract_features(r) for r in raws]
    X = vectorize(toks, m.n_features)  # the training path: scipy CSR matrix
    evid = np.array([sum(1 for t in set(ts) if t.startswith(("w:", "s:"))) for ts in toks])
    train_p = sigmoid(m.decision(X, evid))
    serve_p = np.array([m.score(r) for r in raws])
    # the same columns and weights; only float32 (matrix) vs float64 (serving) rounding differs
    np.testing.assert_allclose(serve_p, train_p, rtol=1e-5, atol=1e-7)
    # and a parsed message scores as its bytes do (one shared parse per message)
    size = len(raws[1]) - raws[1].count(b"\r\n")
    assert m.score(parse_message(raws[1]), size) == pytest.approx(serve_p[1], rel=1e-9)


def test_serving_process_imports_neither_sklearn_nor_scipy(tmp_path: Path) -> None:
    path = _tiny_model(tmp_path)
    code = (
        "import sys\n"
        "from filterd.checks import classifier\n"
        "from filterd.classify.model import SpamModel\n"
        f"m = SpamModel.load({str(path)!r})\n"
        "p = m.score(b'Subject: hello\\n\\nsee http://example.org/ now')\n"
        "assert 0.0 <= p <= 1.0\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('sklearn', 'scipy'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    "field,value",
    [("features_version", "fx-4"), ("hashing", "sklearn.FeatureHasher something else")],
)
def test_model_with_mismatched_feature_version_is_refused(
    tmp_path: Path, field: str, value: str
) -> None:
    path = _tiny_model(tmp_path)
    card = json.loads((path / "card.json").read_text())
    card["features"][field] = value
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=field.split("_")[0]):
        SpamModel.load(path)


# --------------------------------------------------------------------------- padding (15.2)


@pytest.mark.parametrize("build", [_spam_plain, _spam_html])
def test_empty_part_padding_changes_no_feature(build) -> None:  # type: ignore[no-untyped-def]
    plain = set(extract_features(build().as_bytes())) - {"x:defects"}
    padded = set(extract_features(_padded(build).as_bytes())) - {"x:defects"}
    size = {t for t in plain ^ padded if t.startswith("n:size=")}
    assert plain ^ padded == size


@pytest.mark.parametrize("build", [_spam_plain, _spam_html])
def test_padded_corpus_like_spam_is_still_refused(build) -> None:  # type: ignore[no-untyped-def]
    m = _shipped()
    th = served(m.thresholds, None, None)
    p0 = m.score(build().as_bytes())
    p1 = m.score(_padded(build).as_bytes())
    assert p0 >= th.reject, f"the test spam itself is not refused: p={p0:.4f}"
    assert p1 >= th.reject, f"padding let it through: {p0:.4f} -> {p1:.4f}"
    assert abs(p1 - p0) < 0.02


def test_many_tiny_parts_do_not_push_the_body_out() -> None:
    m = _spam_plain()
    body = m.get_payload()
    m.set_payload([])
    for i in range(200):
        m.attach(MIMEText(f"{i}", "plain"))
    for part in body:
        m.attach(part)
    toks = set(extract_features(m.as_bytes()))
    assert {"w:grant", "w:guaranteed", "u:grants-4-you.biz"} <= toks


# --------------------------------------------------------------------------- thin evidence


def _short_hams() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    out["few words"] = b"From: Bo <bo@example.dk>\nSubject: lunch\n\nok see you at 12\n"
    mm = MIMEMultipart()
    mm["Subject"] = "test"
    mm.attach(MIMEText("message 1", "plain"))
    mm.attach(MIMEText("message 2", "plain"))
    out["message 1 / message 2"] = mm.as_bytes()
    alt = MIMEMultipart("alternative")
    alt["Subject"] = "Re: hi"
    alt.attach(MIMEText("see you soon", "plain"))
    alt.attach(MIMEText("<html><body><p>see you soon</p></body></html>", "html"))
    out["three-word multipart/alternative"] = alt.as_bytes()
    empty = MIMEMultipart("alternative")
    empty.attach(MIMEText("", "plain"))
    empty.attach(MIMEText("<html><body></body></html>", "html"))
    out["empty parts"] = empty.as_bytes()
    img = MIMEMultipart()
    img["Subject"] = "photo"
    img.attach(MIMEText("Here it is.", "plain"))
    img.attach(MIMEImage(b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!", "gif"))
    out["short note with an image part"] = img.as_bytes()
    out["danish outlook note"] = (
        "From: Jens <jens@example.dk>\nSubject: Hej\nX-Mailer: Microsoft Outlook Express 6.00\n"
        "Content-Type: text/plain; charset=iso-8859-1\n\nHej, vi ses på fredag. Mvh Jens\n"
    ).encode("latin-1")
    return out


@pytest.mark.parametrize("name", list(_short_hams()))
def test_short_minimal_ham_is_not_refused_by_the_shipped_model(name: str) -> None:
    m = _shipped()
    p = m.score(_short_hams()[name])
    assert p < served(m.thresholds, None, None).reject, f"{name}: p={p:.4f}"


def test_thin_evidence_cannot_be_sure_even_with_spammy_weights(tmp_path: Path) -> None:
    # every feature pushes toward spam: a long message is sure spam, a two-word one cannot be
    n = 2**16
    SpamModel.save(
        tmp_path / "all-spam", np.full(n, 50.0), 0.0, {"thresholds": {"reject": 0.9, "tag": 0.5}}
    )
    m = SpamModel.load(tmp_path / "all-spam")
    assert m.score(("Subject: x\n\n" + SPAM_BODY).encode()) > 0.99
    short = m.score(b"Subject: \n\nmessage 1\n")  # 2 words of the 12 that count as full
    assert short <= float(sigmoid(m.prior_logit + 2 / m.full_words * (6.9 - m.prior_logit)))
    assert short < 0.25
    assert m.score(b"") == pytest.approx(float(sigmoid(m.prior_logit)))


# --------------------------------------------------------------------------- calibrate + served


def test_calibrate_on_a_known_score_sample() -> None:
    ham = np.arange(1, 2001) / 2001.0  # 2000 distinct ham scores
    r = calibrate_scores(ham, np.array([0.2, 0.9995, 1.0]), fpr=0.001, tag_fpr=0.01)
    # 0.1% of 2000 = 2 ham may lie over: the threshold sits just above the 3rd highest
    assert r["reject"] == np.nextafter(1998 / 2001.0, 1.0)
    assert r["ham_over_reject"] == 2
    assert r["tag"] == np.nextafter(1980 / 2001.0, 1.0)
    assert r["spam_over_reject"] == 2
    assert r["measurable"]
    assert r["ham_fpr_upper_95"] == pytest.approx(clopper_pearson_upper(2, 2000))
    assert 0.001 < r["ham_fpr_upper_95"] < 0.004
    # with none observed the bound is 1 - 0.025**(1/n), and 0.1% needs ~3688 ham
    assert clopper_pearson_upper(0, 1000) == pytest.approx(1 - 0.025 ** (1 / 1000))
    assert ham_needed(0.001) == 3688
    small = calibrate_scores(np.array([0.1, 0.2, 0.3]), None, fpr=0.001)
    assert not small["measurable"] and small["reject"] == np.nextafter(0.3, 1.0)


def test_calibrate_cli_writes_thresholds_and_counts_only(tmp_path: Path) -> None:
    from filterd.classify.cli import calibrate

    path = _tiny_model(tmp_path)
    ham = tmp_path / "ham"
    ham.mkdir()
    for i, raw in enumerate(_short_hams().values()):
        (ham / f"{i}").write_bytes(raw)
    r = CliRunner().invoke(
        calibrate, [str(path), "--ham", str(ham), "--fpr", "0.001", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "NOT" in r.output or "WARNING" in r.output  # 6 ham cannot measure 0.1%
    card = json.loads((path / "card.json").read_text())
    m = SpamModel.load(path)
    scores = [m.score(x) for x in _short_hams().values()]
    assert card["thresholds"]["reject"] == np.nextafter(max(scores), 1.0)
    cal = card["calibrations"][-1]
    assert cal["n_ham"] == 6 and "ham_fpr_upper_95" in cal
    text = json.dumps(card)
    assert "lunch" not in text and "message 1" not in text  # no mail content in the card


def test_every_reporter_serves_the_same_thresholds(tmp_path: Path) -> None:
    from filterd.checks.classifier import ClassifierCheck, Config
    from filterd.classify.cli import model as model_cmd
    from filterd.classify.registry import ModelHolder

    mdir = tmp_path / "models"
    mdir.mkdir()
    path = _tiny_model(mdir)
    registry.promote(mdir, path.name)
    cfg_path = tmp_path / "filterd.toml"
    base = (PROJECT_ROOT / "rules" / "filterd.toml").read_text()
    cfg_path.write_text(base.replace("[classifier]\n", "[classifier]\ntag_threshold = 0.42\n", 1))
    m = SpamModel.load(path)
    from_config = served_from_config(m.thresholds, cfg_path)
    assert (from_config.reject, from_config.tag) == (0.9, 0.42)
    check = ClassifierCheck(Config(tag_threshold=0.42), ModelHolder(mdir))
    assert check.served(m.thresholds) == from_config
    r = CliRunner().invoke(
        model_cmd, ["show", path.name, "--models-dir", str(mdir), "--config", str(cfg_path)]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["served_thresholds"] == from_config.as_dict()


# --------------------------------------------------------------------------- fail open (15.5)


@pytest.mark.parametrize(
    "breakage", ["garbage ACTIVE", "missing ACTIVE", "names a missing model", "corrupt arrays"]
)
def test_bad_model_fails_open_and_the_check_still_builds(tmp_path: Path, breakage: str) -> None:
    from filterd.checks.base import Services
    from filterd.checks.classifier import Config, build

    mdir = tmp_path / "models"
    mdir.mkdir()
    path = _tiny_model(mdir)
    registry.promote(mdir, path.name)
    if breakage == "garbage ACTIVE":
        (mdir / "ACTIVE").write_bytes(b"../../etc/passwd\x00\xff\n")
    elif breakage == "missing ACTIVE":
        os.unlink(mdir / "ACTIVE")
    elif breakage == "names a missing model":
        (mdir / "ACTIVE").write_text("no-such-model\n")
    else:
        (path / "model.npz").write_bytes(b"PK\x03\x04 not a zip")
    check = build(
        Config(models_dir=str(mdir), on_failure="accept"), Services(settings=load_settings())
    )
    assert check.holder.current() is None
    with pytest.raises(ModelError):  # the pipeline turns this into CLASSIFIER_FAIL, fail open
        check.check_message(Message.from_bytes(b"Subject: x\n\nhello"), exempt=False)
    with pytest.raises(ModelError):  # fail closed still refuses to build
        build(
            Config(models_dir=str(mdir), on_failure="tempfail"), Services(settings=load_settings())
        )
    # repairing the models directory brings the classifier back without a restart
    shutil.rmtree(path)
    good = _tiny_model(mdir)
    registry.promote(mdir, good.name)
    check.holder.request_reload()
    assert check.check_message(Message.from_bytes(b"Subject: x\n\nhello"), exempt=False)


@pytest.mark.integration
def test_bad_active_model_daemon_pipeline_starts_and_fails_open(
    tmp_path: Path, redis_url: str
) -> None:
    """Through the real CLI pipeline (`filterd scan` builds the same Runtime as the daemon)."""
    from tests.helpers_daemon import ROOT, write_config

    mdir = tmp_path / "models"
    mdir.mkdir()
    (mdir / "ACTIVE").write_text("no-such-model\n")
    cfg = write_config(
        tmp_path / "f.toml",
        {
            "pipeline": {"recipient_checks": ["allowlist"], "message_checks": ["classifier"]},
            "classifier": {"models_dir": str(mdir), "on_failure": "accept"},
            "redis": {"url": redis_url},
            "records": {"enabled": False},
        },
    )
    msg = tmp_path / "m.eml"
    msg.write_bytes(_spam_plain().as_bytes())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "filterd",
            "scan",
            "--config",
            str(cfg),
            "--from",
            "a@example.net",
            "--rcpt",
            "u@example.org",
            str(msg),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout.decode().splitlines()[0])
    assert out["action"] == "accept", out
    codes = [r["code"] for r in out["reasons"]]
    assert "CLASSIFIER_FAIL" in codes, out
    assert "X-Filterd-Unchecked: classifier" in out["headers"], out
    assert b"failing open" in proc.stderr


def test_start_up_log_reports_the_served_thresholds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from filterd.checks.base import Services
    from filterd.checks.classifier import Config, build

    mdir = tmp_path / "models"
    mdir.mkdir()
    path = _tiny_model(mdir)
    registry.promote(mdir, path.name)
    with caplog.at_level(logging.INFO, logger="filterd.classify"):
        check = build(
            Config(models_dir=str(mdir), reject_threshold=0.95), Services(settings=load_settings())
        )
    m = check.holder.current()
    assert m is not None
    want = served(m.thresholds, 0.95, None)
    assert want.reject == 0.95 and want.tag == 0.5 and want.tag_from == "card"
    assert any(want.describe() in r.getMessage() for r in caplog.records), caplog.text
    # and the finding carries the probability and the same thresholds as evidence
    (f,) = check.check_message(Message.from_bytes(b"Subject: x\n\nhello there"), exempt=False)
    assert f.spam_probability is not None
    assert f"reject={want.reject:.4g} tag={want.tag:.4g}" in f.detail


def test_evaluate_flags_in_sample_sources_and_reports_served_thresholds(tmp_path: Path) -> None:
    from filterd.classify.cli import evaluate
    from filterd.classify.train import train
    from tests.test_classify import SMALL_CFG, make_corpus

    c = make_corpus(tmp_path / "c", n=40)
    other = make_corpus(tmp_path / "other", n=20, seed=7)
    train(
        [c["ham_md"], c["ham_plain"]], [c["spam_mbox"], c["spam_plain"]], tmp_path / "m", SMALL_CFG
    )
    args = [str(tmp_path / "m"), "--no-progress", "--spam", str(other["spam_plain"])]
    r = CliRunner().invoke(evaluate, [*args, "--ham", str(c["ham_plain"]), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["in_sample_sources"] == [str(c["ham_plain"])]
    card = SpamModel.load(tmp_path / "m").thresholds
    assert (res["served_thresholds"]["reject"], res["served_thresholds"]["tag"]) == card
    r = CliRunner().invoke(evaluate, [*args, "--ham", str(other["ham_plain"])])
    assert r.exit_code == 0 and "in-sample" not in r.output, r.output
