"""Models directory, the ACTIVE pointer, atomic promotion and the daemon-side ModelHolder.

Layout::

    models/
      ACTIVE            one line: the name of the active model
      sa-20250101/      model.npz + card.json (see filterd.classify.model)

``promote`` verifies the model loads, then replaces ``ACTIVE`` atomically (temp file + fsync +
os.replace), so a reader sees either the old or the new name, never a partial file.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from filterd.classify.model import ARRAY_FILE, CARD_FILE, ModelError, SpamModel, _atomic_write

ENV_MODELS_DIR = "FILTERD_CLASSIFIER_MODELS_DIR"
ACTIVE_FILE = "ACTIVE"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

log = logging.getLogger("filterd.classify")


def models_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else $FILTERD_CLASSIFIER_MODELS_DIR, else the project's ``models/`` --
    the same directory the daemon's ``[classifier] models_dir`` default points at,
    so `filterd model promote` from any directory promotes what the daemon serves."""
    from filterd.settings import resolve_path

    return resolve_path(path or os.environ.get(ENV_MODELS_DIR) or "models")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name == ACTIVE_FILE:
        raise ModelError(f"invalid model name {name!r} (letters, digits, '.', '_', '-'; no paths)")
    return name


def active_name(mdir: str | os.PathLike[str]) -> str | None:
    try:
        name = (Path(mdir) / ACTIVE_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read {Path(mdir) / ACTIVE_FILE}: {e}") from None
    return check_name(name) if name else None


def promote(mdir: str | os.PathLike[str], name: str) -> SpamModel:
    """Verify ``name`` loads, then make it active atomically. Returns the loaded model."""
    d = Path(mdir)
    model = SpamModel.load(d / check_name(name))
    _atomic_write(d / ACTIVE_FILE, (name + "\n").encode())
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return model


def list_models(mdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One dict per model directory: name, active, ok, error, created, thresholds, auc."""
    d = Path(mdir)
    try:
        active = active_name(d)
    except ModelError:
        active = None
    out: list[dict[str, Any]] = []
    if not d.is_dir():
        return out
    for sub in sorted(p for p in d.iterdir() if p.is_dir() and (p / CARD_FILE).exists()):
        entry: dict[str, Any] = {"name": sub.name, "active": sub.name == active}
        try:
            m = SpamModel.load(sub)
            entry.update(
                ok=True,
                created=m.card.get("created"),
                reject=m.thresholds[0],
                tag=m.thresholds[1],
                auc=((m.card.get("metrics") or {}).get("out_of_fold") or {}).get("roc_auc"),
            )
        except ModelError as e:
            entry.update(ok=False, error=str(e))
        out.append(entry)
    return out


def _stat_sig(p: Path) -> tuple[int, int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ModelHolder:
    """Thread-safe holder of the active model for the daemon.

    - :meth:`current` returns the loaded :class:`SpamModel` (or ``None`` if none could be loaded
      yet); the returned object is immutable, so a message scored while a reload happens simply
      uses the model it got.
    - :meth:`reload` re-reads ``ACTIVE`` and loads the model it names; on any error it logs,
      keeps the model it had, and returns ``False``.  Returns ``True`` when the model changed.
    - :meth:`maybe_reload` is cheap (a few ``stat`` calls, rate-limited by ``check_interval``)
      and reloads when ``ACTIVE`` or the active model's files changed, or when
      :meth:`request_reload` was called (safe to call from a SIGHUP handler).
    """

    def __init__(
        self,
        mdir: str | os.PathLike[str] | None = None,
        check_interval: float = 1.0,
        load: bool = True,
    ):
        self.models_dir = models_dir(mdir)
        self.check_interval = check_interval
        self._model: SpamModel | None = None
        self._lock = threading.Lock()
        self._requested = False
        self._next_check = 0.0
        self._sig: tuple[Any, ...] | None = None
        self._failed_sig: tuple[Any, ...] | None = None
        self.last_error: str | None = None
        if load:
            self.reload()

    def current(self) -> SpamModel | None:
        return self._model

    @property
    def name(self) -> str | None:
        m = self._model
        return m.name if m else None

    def request_reload(self) -> None:
        """Ask for a reload at the next :meth:`maybe_reload` (async-signal-safe: sets a flag)."""
        self._requested = True

    def _signature(self) -> tuple[Any, ...]:
        d = self.models_dir
        try:
            name = active_name(d)
        except ModelError:
            name = "?"
        sig: tuple[Any, ...] = (_stat_sig(d / ACTIVE_FILE), name)
        if name and name != "?":
            sig += (_stat_sig(d / name / CARD_FILE), _stat_sig(d / name / ARRAY_FILE))
        return sig

    def reload(self) -> bool:
        with self._lock:
            self._requested = False
            sig = self._signature()
            try:
                name = active_name(self.models_dir)
                if not name:
                    raise ModelError(
                        f"no active model ({self.models_dir / ACTIVE_FILE} missing or empty)"
                    )
                if self._model is not None and sig == self._sig:
                    return False
                model = SpamModel.load(self.models_dir / name)
            except ModelError as e:
                self.last_error = str(e)
                if sig != self._failed_sig:
                    kept = (
                        f"keeping model {self._model.name!r}" if self._model else "no model loaded"
                    )
                    log.error("classifier model reload failed: %s; %s", e, kept)
                self._failed_sig = sig
                return False
            except Exception as e:  # never let a reload take the daemon down
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("classifier model reload failed unexpectedly; keeping the old model")
                self._failed_sig = sig
                return False
            old = self._model
            self._model = model
            self._sig = sig
            self._failed_sig = None
            self.last_error = None
            changed = old is None or old.name != model.name or old.card != model.card
            if changed:
                # The served thresholds (card + overrides) are logged by the check that serves it.
                log.info("classifier model %r loaded from %s", model.name, self.models_dir)
            return changed

    def maybe_reload(self) -> bool:
        """Reload if requested or if the files changed; cheap enough to call per message."""
        now = time.monotonic()
        if not self._requested:
            if now < self._next_check:
                return False
            self._next_check = now + self.check_interval
            sig = self._signature()
            if sig == self._sig or sig == self._failed_sig:
                return False
        return self.reload()
