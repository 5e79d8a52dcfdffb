"""Admin CLI: ``filterd train``, ``filterd evaluate``, ``filterd model promote|list|show``.

Register with the main click group::

    from filterd.classify.cli import calibrate, evaluate, model, train
    main.add_command(train); main.add_command(evaluate); main.add_command(model); ...

Every command that reports thresholds reports the *served* ones, from
:func:`filterd.classify.thresholds.served_from_config` (card + ``[classifier]`` overrides).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from filterd.classify import registry
from filterd.classify.model import ModelError, SpamModel
from filterd.classify.thresholds import Served, served_from_config
from filterd.cliopts import CONFIG_OPTION
from filterd.settings import ConfigError

_models_dir_opt = click.option(
    "--models-dir",
    type=click.Path(file_okay=False),
    default=None,
    help=f"Models directory (default: ${registry.ENV_MODELS_DIR} or ./models).",
)


def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda **kw: tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


def _served(m: SpamModel, config_path: Path | None) -> Served:
    try:
        return served_from_config(m.thresholds, config_path)
    except ConfigError as e:
        raise click.ClickException(f"cannot read the [classifier] overrides: {e}") from None


def _score_sources(m: SpamModel, sources: tuple[str, ...], bar, digests=None) -> list[float]:  # type: ignore[no-untyped-def]
    """Score every message of ``sources``; only the scores are kept.

    ``digests`` (a dict) receives each source's digest as the card records training sources
    (sha256 over the sha256 of each message, in order), so in-sample scoring can be flagged.
    """
    import hashlib

    from filterd.classify import corpus

    out: list[float] = []
    for src in sources:
        agg = hashlib.sha256()
        for _mid, raw in corpus.iter_messages(src):
            agg.update(hashlib.sha256(raw).digest())
            out.append(m.score(raw))
            if bar is not None:
                bar.update(1)
        if digests is not None:
            digests[src] = agg.hexdigest()
    return out


def _in_sample(m: SpamModel, digests: dict[str, str]) -> list[str]:
    """Scored sources identical to a training source of ``m`` (figures would be in-sample)."""
    trained = {
        s.get("digest")
        for s in (m.card.get("training_data") or {}).get("sources") or []
        if isinstance(s, dict)
    }
    return [src for src, d in digests.items() if d in trained]


def _resolve_model(spec: str, models_dir: str | None) -> Path:
    p = Path(spec)
    if p.is_dir():
        return p
    return registry.models_dir(models_dir) / registry.check_name(spec)


def _sources(label: str, required: bool = True, text: str | None = None):  # type: ignore[no-untyped-def]
    """The repeatable ``--ham`` / ``--spam`` option of train, evaluate and calibrate."""
    return click.option(
        f"--{label}",
        label,
        multiple=True,
        required=required,
        type=click.Path(exists=True),
        help=text or f"{label.capitalize()} source: maildir, mbox file or directory (repeatable).",
    )


@click.command("train")
@_sources("ham")
@_sources("spam")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output model directory, e.g. models/sa-20250101.",
)
@click.option(
    "--reject-fpr",
    default=0.001,
    show_default=True,
    help="Target false-reject rate on held-out ham.",
)
@click.option(
    "--tag-fpr", default=0.005, show_default=True, help="Target false-tag rate on held-out ham."
)
@click.option(
    "--stratum",
    "strata",
    multiple=True,
    type=click.Path(exists=True),
    help="A --ham or --spam source that is a difficulty stratum of the others, not a source of "
    "its own (SpamAssassin's hard_ham): scored out-of-fold, never left out whole, when the "
    "thresholds are chosen on leave-one-source-out ham.",
)
@click.option(
    "--threshold-on",
    type=click.Choice(["sources", "folds"]),
    default="sources",
    show_default=True,
    help="Choose thresholds on pooled leave-one-source-out ham, or on out-of-fold ham.",
)
@click.option(
    "--bits",
    default=20,
    show_default=True,
    type=click.IntRange(10, 24),
    help="log2 of hashed feature dims.",
)
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--alpha", default=1e-5, show_default=True, help="L2 regularisation strength.")
@click.option(
    "--balance/--no-balance",
    default=True,
    show_default=True,
    help="Weigh spam by n_ham/n_spam of each fit (scores do not move with the class ratio).",
)
@click.option(
    "--ham-weight", default=2.0, show_default=True, help="Sample weight of ham relative to spam."
)
@click.option(
    "--folds",
    default=5,
    show_default=True,
    type=click.IntRange(2, 50),
    help="Out-of-fold splits used to choose thresholds.",
)
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 10**6))
@click.option(
    "--ensemble",
    default=5,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Independent SGD runs whose weights are averaged (steadier thresholds).",
)
@click.option(
    "--average/--no-average",
    default=True,
    show_default=True,
    help="Averaged SGD: each run's weights are the mean of its iterates (transfers better).",
)
@click.option(
    "--description", default="", help="Free text for the model card (training data description)."
)
@click.option(
    "--tmp-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where to put the feature cache.",
)
@click.option("--promote", "do_promote", is_flag=True, help="Promote the model after training.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train(  # type: ignore[no-untyped-def]
    ham,
    spam,
    out,
    reject_fpr,
    tag_fpr,
    strata,
    threshold_on,
    bits,
    epochs,
    alpha,
    balance,
    ham_weight,
    folds,
    batch_size,
    ensemble,
    average,
    description,
    tmp_dir,
    do_promote,
    progress,
):
    """Train a model from ham and spam sources (streaming; memory bounded by --batch-size)."""
    from filterd.classify.evaluate import format_metrics
    from filterd.classify.train import TrainConfig
    from filterd.classify.train import train as do_train

    out_p = Path(out)
    registry.check_name(out_p.name)
    cfg = TrainConfig(
        n_features=2**bits,
        alpha=alpha,
        balance=balance,
        epochs=epochs,
        ham_weight=ham_weight,
        batch_size=batch_size,
        ensemble=ensemble,
        average=average,
        folds=folds,
        reject_fpr=reject_fpr,
        tag_fpr=tag_fpr,
        strata=tuple(str(x) for x in strata),
        threshold_on=threshold_on,
    )
    try:
        card = do_train(
            ham,
            spam,
            out_p,
            cfg,
            progress=_progress(progress),
            description=description,
            tmp_dir=tmp_dir,
        )
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    th = card["thresholds"]
    click.echo(f"model written to {out_p}")
    click.echo(f"thresholds: reject={th['reject']:.6g} tag={th['tag']:.6g}")
    click.echo(f"chosen on: {th['chosen_on']}")
    for key, title in (
        ("leave_one_source_out", "leave-one-source-out"),
        ("out_of_fold", "out-of-fold"),
    ):
        if key in card["metrics"]:
            click.echo(f"{title} metrics:")
            click.echo(format_metrics(card["metrics"][key]))
    if do_promote:
        registry.promote(out_p.parent, out_p.name)
        click.echo(f"promoted {out_p.name} (ACTIVE in {out_p.parent})")


@click.command("evaluate")
@click.argument("model_spec", metavar="MODEL")
@_sources("ham")
@_sources("spam")
@click.option(
    "--roc-png", default=None, type=click.Path(dir_okay=False), help="Write a ROC curve PNG here."
)
@click.option("--json", "as_json", is_flag=True, help="Print figures as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_models_dir_opt
@CONFIG_OPTION
def evaluate(model_spec, ham, spam, roc_png, as_json, progress, models_dir, config_path):  # type: ignore[no-untyped-def]
    """Score ham and spam sources with MODEL (name in the models dir, or a path).

    Reports AUC, recall at 0.1/0.5/1% ham FPR (saying when the ham count cannot measure a rate)
    and the outcome at the served thresholds (card + [classifier] overrides).
    """
    from filterd.classify import corpus
    from filterd.classify import evaluate as ev

    try:
        m = SpamModel.load(_resolve_model(model_spec, models_dir))
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    th = _served(m, config_path)
    ys: list[int] = []
    ss: list[float] = []
    groups: list[str] = []
    bar_f = _progress(progress)
    total = corpus.count_messages(list(ham) + list(spam))
    bar = bar_f(total=total, desc="scoring", unit="msg") if bar_f else None
    digests: dict[str, str] = {}
    for label, srcs in ((0, ham), (1, spam)):
        for src in srcs:
            scores = _score_sources(m, (src,), bar, digests)
            ss.extend(scores)
            ys.extend([label] * len(scores))
            groups.extend([src] * len(scores))
    if bar is not None:
        bar.close()
    y, s = np.array(ys), np.array(ss)
    res = ev.metrics(y, s, {"reject": th.reject, "tag": th.tag}, groups=np.array(groups))
    res["model"] = m.name
    res["served_thresholds"] = th.as_dict()
    res["in_sample_sources"] = _in_sample(m, digests)
    if roc_png:
        ev.roc_png(y, s, roc_png, title=m.name, thresholds={"reject": th.reject, "tag": th.tag})
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"model: {m.name}; served thresholds: {th.describe()}")
        for src in res["in_sample_sources"]:
            click.echo(f"WARNING: {src} is a training source of this model: figures are in-sample")
        click.echo(ev.format_metrics(res))


@click.command("calibrate")
@click.argument("model_spec", metavar="NAME")
@_sources("ham", text="Your own ham (maildir, mbox or directory; repeatable); only scores kept.")
@_sources("spam", required=False)
@click.option(
    "--fpr",
    default=0.001,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Target ham false-reject rate of the reject threshold.",
)
@click.option(
    "--tag-fpr",
    default=0.005,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Target ham rate over the tag threshold.",
)
@click.option("--dry-run", is_flag=True, help="Report only; do not write the card.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@_models_dir_opt
def calibrate(model_spec, ham, spam, fpr, tag_fpr, dry_run, as_json, progress, models_dir):  # type: ignore[no-untyped-def]
    """Set NAME's reject and tag thresholds from a sample of your own ham.

    Messages are scored one at a time and dropped; only the thresholds and counts are written
    into the model card, with the 95% upper bound on the false-reject rate the sample supports.
    """
    from filterd.classify import corpus
    from filterd.classify.calibrate import calibrate_scores, format_result, write_to_card

    path = _resolve_model(model_spec, models_dir)
    try:
        m = SpamModel.load(path)
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    bar_f = _progress(progress)
    bar = (
        bar_f(total=corpus.count_messages(list(ham) + list(spam)), desc="scoring", unit="msg")
        if bar_f
        else None
    )
    hs = np.array(_score_sources(m, tuple(ham), bar))
    ss = np.array(_score_sources(m, tuple(spam), bar)) if spam else None
    if bar is not None:
        bar.close()
    try:
        res = calibrate_scores(hs, ss, fpr, tag_fpr)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if not dry_run:
        write_to_card(path, res)
        SpamModel.load(path)  # the card still verifies
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(format_result(res))
        click.echo("dry run: card unchanged" if dry_run else f"written to {path / 'card.json'}")


@click.group("model")
def model() -> None:
    """Manage classifier models (list, show, promote)."""


@model.command("list")
@_models_dir_opt
@CONFIG_OPTION
def model_list(models_dir, config_path):  # type: ignore[no-untyped-def]
    """List models; '*' marks the active one."""
    d = registry.models_dir(models_dir)
    entries = registry.list_models(d)
    if not entries:
        click.echo(f"no models in {d}")
        return
    for e in entries:
        mark = "*" if e["active"] else " "
        if e["ok"]:
            try:
                th = served_from_config((e["reject"], e["tag"]), config_path)
            except ConfigError as err:
                raise click.ClickException(str(err)) from None
            click.echo(
                f"{mark} {e['name']:<24} {e.get('created') or '-':<20} "
                f"served reject={th.reject:.6g} tag={th.tag:.6g}"
            )
        else:
            click.echo(f"{mark} {e['name']:<24} INVALID: {e['error']}")


@model.command("show")
@click.argument("name")
@_models_dir_opt
@CONFIG_OPTION
def model_show(name, models_dir, config_path):  # type: ignore[no-untyped-def]
    """Print the model card of NAME (after verifying the model loads) and the served thresholds."""
    try:
        m = SpamModel.load(_resolve_model(name, models_dir))
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    out = dict(m.card)
    out["served_thresholds"] = _served(m, config_path).as_dict()
    click.echo(json.dumps(out, indent=2))


@model.command("promote")
@click.argument("name")
@_models_dir_opt
@CONFIG_OPTION
def model_promote(name, models_dir, config_path):  # type: ignore[no-untyped-def]
    """Make NAME the active model (atomic; running daemons pick it up on SIGHUP or change)."""
    d = registry.models_dir(models_dir)
    try:
        m = registry.promote(d, name)
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"promoted {m.name}; served thresholds: {_served(m, config_path).describe()}")


__all__ = ["calibrate", "evaluate", "model", "train"]
