"""The classifier through a real Postfix: spam refused at SMTP time, hot swap under load."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from filterd.classify import registry
from filterd.classify.train import train
from filterd.settings import PROJECT_ROOT
from tests.helpers_daemon import DaemonProcess, write_config
from tests.servers import PostfixServer, SmtpSink, make_reachable, send_mail
from tests.test_classify import SMALL_CFG, _msg, make_corpus

pytestmark = pytest.mark.e2e


def shipped_and_tiny(base: Path) -> Path:
    """A models dir holding the shipped model (ACTIVE) and "tiny", trained on a small corpus
    that is easy to separate: promoting it changes every verdict a test can see."""
    models = base / "models"
    shipped = registry.active_name(PROJECT_ROOT / "models")
    assert shipped, "the repository ships an active default model"
    shutil.copytree(PROJECT_ROOT / "models" / shipped, models / shipped)
    registry.promote(models, shipped)
    corpus = make_corpus(base / "corpus")
    train(
        [corpus["ham_md"], corpus["ham_plain"]],
        [corpus["spam_mbox"], corpus["spam_plain"]],
        models / "tiny",
        SMALL_CFG,
    )
    return models


def test_promote_under_load_every_message_gets_a_verdict(tmp_path: Path) -> None:
    base = make_reachable(tmp_path)
    models = shipped_and_tiny(base)

    cfg = write_config(
        base / "filterd.toml",
        {
            "pipeline": {"recipient_checks": [], "message_checks": ["classifier"]},
            # The tiny model's own thresholds sit right at its training scores; fixed
            # thresholds make the test about the swap, not about that model's calibration.
            "classifier": {
                "models_dir": str(models),
                "reload_check_seconds": 0.2,
                "reject_threshold": 0.5,
                "tag_threshold": 0.4,
            },
            "records": {"enabled": False},
            "daemon": {"state_dir": str(base / "state")},
        },
    )
    rng = random.Random(7)
    spam = _msg(1001, True, rng)
    ham = _msg(1002, False, rng)
    with (
        SmtpSink(base / "sink") as sink,
        DaemonProcess(base / "d", cfg) as daemon,
        PostfixServer(
            base / "pf", sink.port, milter=daemon.milter_for_postfix, milter_default_action="reject"
        ) as postfix,
    ):
        codes: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                r = send_mail(postfix.port, "a@example.net", ["b@example.org"], spam)
                codes.append(r.data.code if r.data else 0)

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            time.sleep(0.5)
            registry.promote(models, "tiny")
            deadline = time.monotonic() + 15
            while "tiny" not in daemon.log():
                assert time.monotonic() < deadline, "promotion was not picked up"
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            thread.join()
        # Every message got a verdict; none was deferred or dropped by the swap.
        assert codes and set(codes) <= {250, 550}, codes
        after = send_mail(postfix.port, "a@example.net", ["b@example.org"], spam)
        assert after.data is not None and after.data.code == 550
        assert "5.7.1" in after.data.text
        assert send_mail(postfix.port, "a@example.net", ["b@example.org"], ham).accepted

        # A corrupt model promoted by hand (bypassing `promote`'s own check) is refused
        # and the daemon keeps serving with the model it had.
        shutil.copytree(models / "tiny", models / "broken")
        (models / "broken" / "model.npz").write_bytes(b"not a model")
        (models / registry.ACTIVE_FILE).write_text("broken\n")
        deadline = time.monotonic() + 15
        while "broken" not in daemon.log():  # the check looks for a new model per message
            assert time.monotonic() < deadline
            again = send_mail(postfix.port, "a@example.net", ["b@example.org"], spam)
            assert again.data is not None and again.data.code == 550
            time.sleep(0.1)
        assert "keeping model 'tiny'" in daemon.log()
