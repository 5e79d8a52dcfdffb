"""The spam classifier as a message check: the active model's probability as evidence.

The model and its card live in filterd.classify.  The served thresholds come from one function,
:func:`filterd.classify.thresholds.served` (card, optionally overridden in ``[classifier]``), the
same one ``filterd evaluate``, ``filterd model show`` and the start-up log use.  The check reloads
the model when it is promoted.

A missing or broken model (bad ``models/ACTIVE``, corrupt arrays, a feature-version mismatch)
never stops the daemon from starting when ``on_failure = "accept"``: the check is built without a
model, each message gets a ``CLASSIFIER_FAIL`` finding (fail open: ``X-Filterd-Unchecked:
classifier``), and the holder keeps looking for a loadable model (issue 15 item 5).
"""

from __future__ import annotations

import email.message
import logging
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from filterd import deadline
from filterd.checks.base import Services
from filterd.classify.features import MAX_MESSAGE_BYTES, has_envelope_line
from filterd.classify.model import ModelError
from filterd.classify.registry import ModelHolder
from filterd.classify.thresholds import Served, served
from filterd.mail.analysis import analysis_of
from filterd.settings import Section, resolve_path
from filterd.types import Finding, Message, Thresholds

SECTION = "classifier"

log = logging.getLogger("filterd.classify")


class Config(Section):
    models_dir: str = "models"
    # None: use the thresholds recorded in the model card (chosen at training time on pooled
    # out-of-source ham, or by `filterd calibrate` on your own ham).
    reject_threshold: float | None = Field(default=None, gt=0, le=1)
    tag_threshold: float | None = Field(default=None, ge=0, le=1)
    # Points a "suspect" verdict adds to the score ([policy] tag_score is 5).
    tag_points: float = 6.0
    # Only the top of a message is read: spam features live there, attachments do not.
    max_bytes: int = Field(default=512 * 1024, ge=4096)
    # A missing model fails open (the message gets X-Filterd-Unchecked).
    on_failure: Literal["tempfail", "accept"] = "accept"
    # How often the daemon looks for a newly promoted model, in seconds.
    reload_check_seconds: float = 1.0


class ClassifierCheck:
    name = "classifier"
    bypassable = True
    gate = False
    # Pure CPU, no I/O: run in the milter's thread while the I/O checks wait in the pool
    # (on one GIL a thread hand-off costs more than it saves).
    cpu_bound = True

    def __init__(self, config: Config, holder: ModelHolder) -> None:
        self.config = config
        self.on_failure = config.on_failure
        self.holder = holder

    def served(self, card: tuple[float, float]) -> Served:
        return served(card, self.config.reject_threshold, self.config.tag_threshold)

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        changed = self.holder.maybe_reload()
        model = self.holder.current()
        if model is None:
            raise ModelError(self.holder.last_error or "no classifier model loaded")
        if changed:
            log.info(
                "classifier model %r in service: %s",
                model.name,
                self.served(model.thresholds).describe(),
            )
        deadline.check()  # run inline: do not start once the pipeline has replied
        p = model.score(*self._input(message))
        th = self.served(model.thresholds)
        detail = f"p={p:.4f} reject={th.reject:.4g} tag={th.tag:.4g} model={model.name}"
        # Evidence only: filterd.policy turns p and these thresholds into SPAM/SUSPECT/HAM.
        cut = Thresholds(th.reject, th.tag, self.config.tag_points)
        return [Finding(self.name, "CLASSIFIER", detail, spam_probability=p, thresholds=cut)]

    def _input(self, message: Message) -> tuple[bytes | email.message.Message, int | None]:
        """What the model reads: the message's one parse when it is the parse the model's
        own would be (the whole message, within both size limits, no mbox "From " line,
        which the features' parser drops first), else the top ``max_bytes`` as bytes."""
        limit = min(self.config.max_bytes, MAX_MESSAGE_BYTES)
        if not has_envelope_line(message.header_block):
            whole = analysis_of(message).whole_head(limit)
            if whole is not None:
                return whole
        return message.head(self.config.max_bytes), None

    def close(self) -> None:
        pass

    def selftest(self) -> list[str]:
        return [] if self.holder.current() is not None else ["no classifier model loaded"]


def build(config: Config, services: Services) -> ClassifierCheck:
    holder = ModelHolder(
        resolve_path(config.models_dir), check_interval=config.reload_check_seconds
    )
    check = ClassifierCheck(config, holder)
    model = holder.current()
    if model is None:
        if config.on_failure != "accept":
            # Fail-closed: refusing to build keeps a running daemon on the model it had.
            raise ModelError(holder.last_error or "no classifier model could be loaded")
        log.error(
            "classifier: no usable model (%s); failing open: messages are accepted with "
            "X-Filterd-Unchecked: classifier until a model loads",
            holder.last_error,
        )
        return check
    log.info(
        "classifier model %r in service: %s", model.name, check.served(model.thresholds).describe()
    )
    # The first score pays for lazy table loads; pay it at start-up, not in an SMTP session.
    model.score(b"Subject: warm-up\r\n\r\nhello http://example.org/\r\n")
    return check
