"""The spam classifier as a message check: the active model's probability as evidence.

The model and its card live in filterd.classify; this module only maps a
probability to findings using the card's thresholds (or overrides from
rules/), and reloads the model when it is promoted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from filterd.checks.base import Services
from filterd.classify.model import ModelError
from filterd.classify.registry import ModelHolder
from filterd.settings import Section, resolve_path
from filterd.types import Finding, Message, SmtpReply, Thresholds

SECTION = "classifier"

SPAM_REPLY = SmtpReply(550, "5.7.1", "Message refused: it looks like spam to our content filter")


class Config(Section):
    models_dir: str = "models"
    # None: use the thresholds chosen at training time and recorded in the model card.
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

    def __init__(self, config: Config, holder: ModelHolder) -> None:
        self.config = config
        self.on_failure = config.on_failure
        self.holder = holder

    def thresholds(self, card: tuple[float, float]) -> tuple[float, float]:
        reject = self.config.reject_threshold or card[0]
        tag = self.config.tag_threshold if self.config.tag_threshold is not None else card[1]
        return reject, min(tag, reject)

    def check_message(self, message: Message, exempt: bool) -> Sequence[Finding]:
        self.holder.maybe_reload()
        model = self.holder.current()
        if model is None:
            raise ModelError(self.holder.last_error or "no classifier model loaded")
        p = model.score(message.head(self.config.max_bytes))
        reject, tag = self.thresholds(model.thresholds)
        detail = f"p={p:.4f} model={model.name}"
        # Evidence only: filterd.policy turns p and these thresholds into SPAM/SUSPECT/HAM.
        cut = Thresholds(reject, tag, self.config.tag_points)
        return [Finding(self.name, "CLASSIFIER", detail, spam_probability=p, thresholds=cut)]

    def close(self) -> None:
        pass

    def selftest(self) -> list[str]:
        return [] if self.holder.current() is not None else ["no classifier model loaded"]


def build(config: Config, services: Services) -> ClassifierCheck:
    holder = ModelHolder(
        resolve_path(config.models_dir), check_interval=config.reload_check_seconds
    )
    if holder.current() is None:
        # Refusing to build keeps a running daemon on the model it had.
        raise ModelError(holder.last_error or "no classifier model could be loaded")
    # The first score pays for lazy imports and table loads (about a second);
    # pay it at start-up, not in the first sender's SMTP session.
    holder.current().score(b"Subject: warm-up\r\n\r\nhello http://example.org/\r\n")  # type: ignore[union-attr]
    return ClassifierCheck(config, holder)
