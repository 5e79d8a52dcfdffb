"""Linear spam model stored as arrays (.npz, no pickle) with a JSON model card beside it.

Layout of a model directory ``models/NAME/``::

    model.npz   indices (int32), values (float32), intercept (float64[1])
    card.json   model card: data description + hashes, date, feature settings, metrics,
                thresholds, library versions, and the sha256 of model.npz

Loading verifies the card (format, feature version, hashing settings), then the sha256 of
``model.npz``, then loads it with ``allow_pickle=False`` and validates the arrays.  Any problem
raises :class:`ModelError` with a message naming the file and the reason.
"""

from __future__ import annotations

import email.message
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from filterd.classify.features import (
    FEATURES_VERSION,
    SETTINGS,
    Tokens,
    count_evidence,
    extract_features,
)
from filterd.classify.hashing import HASHING, row_value, token_indices

MODEL_FORMAT = "filterd-linear-v2"
ARRAY_FILE = "model.npz"
CARD_FILE = "card.json"
DEFAULT_N_FEATURES = 2**20
MAX_CARD_BYTES = 4 * 1024 * 1024
MAX_ARRAY_BYTES = 64 * 1024 * 1024

# Thin evidence: a message with fewer than ``full_words`` distinct words (body + subject) gets its
# log-odds pulled toward ``prior_logit`` in proportion, so "message 1" or an empty HTML part cannot
# be scored as sure spam (issue 11).  Stored in the card; these are the defaults for training.
DEFAULT_EVIDENCE = {"full_words": 12, "prior_logit": -3.0}


class ModelError(Exception):
    """A model could not be loaded or saved (corrupt, tampered, mismatched, missing)."""


# --------------------------------------------------------------------------- vectorising


def evidence_of(tokens: Sequence[str]) -> int:
    """Distinct body and subject words of a token list (the evidence the text gives)."""
    if isinstance(tokens, Tokens):
        return tokens.evidence
    return count_evidence(tokens)


# While evidence is thin the log-odds are also capped at logit(0.999) before shrinking, so no
# weight vector can make a few words sure spam.
THIN_CAP_LOGIT = 6.9


def shrink(z: Any, evidence: Any, full_words: float, prior_logit: float) -> Any:
    """Pull log-odds ``z`` toward ``prior_logit`` when ``evidence`` < ``full_words``.

    ``z' = prior + k * (min(z, cap) - prior)`` with ``k = evidence / full_words`` (below 1 only):
    with 2 of 12 words a message can reach at most ``sigmoid(-3 + 9.9/6) = 0.21``.
    """
    k = np.minimum(1.0, np.asarray(evidence, dtype=np.float64) / max(1e-9, float(full_words)))
    z = np.asarray(z, dtype=np.float64)
    z = np.where(k < 1.0, np.minimum(z, THIN_CAP_LOGIT), z)
    return prior_logit + k * (z - prior_logit)


def vectorize(token_lists: Iterable[Sequence[str]], n_features: int = DEFAULT_N_FEATURES) -> Any:
    """Hash token lists -> scipy CSR rows of binary presence, L2-normalised, float32.

    Training only (imports scipy); the serving path (:meth:`SpamModel.score_tokens`) uses the
    same :func:`filterd.classify.hashing.token_indices` without building a matrix.
    """
    import scipy.sparse as sp

    indptr = [0]
    chunks: list[np.ndarray] = []
    data: list[np.ndarray] = []
    for toks in token_lists:
        idx = token_indices(toks, n_features)
        chunks.append(idx)
        data.append(np.full(idx.size, row_value(idx.size), dtype=np.float32))
        indptr.append(indptr[-1] + idx.size)
    ind = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    dat = np.concatenate(data) if data else np.zeros(0, dtype=np.float32)
    return sp.csr_matrix(
        (dat, ind.astype(np.int32), np.asarray(indptr, dtype=np.int64)),
        shape=(len(indptr) - 1, n_features),
    )


def vectorizer_settings(n_features: int) -> dict[str, Any]:
    return {
        **SETTINGS,
        "hashing": HASHING,
        "n_features": int(n_features),
        "tf": "binary",
        "norm": "l2",
    }


def sigmoid(z: np.ndarray | float) -> Any:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


# --------------------------------------------------------------------------- hashing / IO


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import platform

    import scipy
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:  # noqa: SIM105
            os.unlink(tmp)
        except OSError:
            pass
        raise


class SpamModel:
    """An immutable loaded linear model.  Thread-safe for concurrent :meth:`score` calls.

    ``thresholds`` are the card's (reject, tag); what the daemon serves is decided by
    :func:`filterd.classify.thresholds.served`, which may apply an override.
    """

    def __init__(self, name: str, weights: np.ndarray, intercept: float, card: dict[str, Any]):
        self.name = name
        self._w = weights
        self._b = float(intercept)
        self.card = card
        self.n_features = int(weights.shape[0])
        th = card.get("thresholds", {})
        self.thresholds: tuple[float, float] = (float(th["reject"]), float(th["tag"]))
        ev = card.get("evidence") or {}
        self.full_words = float(ev.get("full_words", 0.0))
        self.prior_logit = float(ev.get("prior_logit", 0.0))

    # ----------------------------------------------------------------- scoring
    def decision(self, X: Any, evidence: np.ndarray | None = None) -> np.ndarray:
        z = np.asarray(X @ self._w, dtype=np.float64).ravel() + self._b
        if evidence is not None and self.full_words > 0:
            z = shrink(z, evidence, self.full_words, self.prior_logit)
        return np.asarray(z)

    def logit_tokens(self, tokens: Sequence[str]) -> float:
        deferred = tokens.deferred_words if isinstance(tokens, Tokens) else None
        idx = token_indices(tokens, self.n_features, deferred or ())
        z = float(self._w[idx].sum(dtype=np.float64)) * row_value(idx.size) + self._b
        if self.full_words > 0:
            z = float(shrink(z, evidence_of(tokens), self.full_words, self.prior_logit))
        return z

    def score_tokens(self, tokens: Sequence[str]) -> float:
        return float(sigmoid(self.logit_tokens(tokens)))

    def score(self, raw: bytes | email.message.Message, raw_size: int | None = None) -> float:
        """Spam probability in [0, 1] for raw message bytes (or a parsed message + its size).

        Never raises on message content.  Imports neither scikit-learn nor scipy.
        """
        return self.score_tokens(extract_features(raw, raw_size, defer_grams=True))

    def score_many(self, raws: Iterable[bytes]) -> np.ndarray:
        return np.array([self.score(r) for r in raws], dtype=np.float64)

    def __repr__(self) -> str:
        r, t = self.thresholds
        return f"SpamModel(name={self.name!r}, reject={r:.6g}, tag={t:.6g})"

    # ----------------------------------------------------------------- persistence
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpamModel:
        """Load and verify ``path`` (a model directory). Raises :class:`ModelError`."""
        d = Path(path)
        card_path = d / CARD_FILE
        arr_path = d / ARRAY_FILE
        if not d.is_dir():
            raise ModelError(f"model {d}: not a directory")
        try:
            if card_path.stat().st_size > MAX_CARD_BYTES:
                raise ModelError(f"model {d}: {CARD_FILE} is implausibly large")
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"model {d}: missing {CARD_FILE}") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelError(f"model {d}: unreadable {CARD_FILE}: {e}") from None
        if not isinstance(card, dict):
            raise ModelError(f"model {d}: {CARD_FILE} is not a JSON object")
        if card.get("format") != MODEL_FORMAT:
            raise ModelError(f"model {d}: format {card.get('format')!r}, expected {MODEL_FORMAT!r}")
        feats = card.get("features") or {}
        fv = feats.get("features_version")
        if fv != FEATURES_VERSION:
            raise ModelError(
                f"model {d}: trained with features version {fv!r}, this filterd extracts "
                f"{FEATURES_VERSION!r}; retrain the model"
            )
        if feats.get("hashing") != HASHING:
            raise ModelError(
                f"model {d}: hashing {feats.get('hashing')!r}, this filterd hashes {HASHING!r}"
            )
        ev = card.get("evidence")
        if not isinstance(ev, dict) or not all(
            isinstance(ev.get(k), (int, float)) and math.isfinite(ev[k])
            for k in ("full_words", "prior_logit")
        ):
            raise ModelError(f"model {d}: card lacks evidence.full_words / evidence.prior_logit")
        n_features = feats.get("n_features")
        if not isinstance(n_features, int) or not (2**10 <= n_features <= 2**24):
            raise ModelError(f"model {d}: bad n_features {n_features!r}")
        th = card.get("thresholds") or {}
        try:
            reject, tag = float(th["reject"]), float(th["tag"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                f"model {d}: card lacks numeric thresholds.reject / thresholds.tag"
            ) from None
        if not (0.0 <= tag <= reject <= 1.0) or math.isnan(reject) or math.isnan(tag):
            raise ModelError(f"model {d}: invalid thresholds reject={reject} tag={tag}")
        expected = (card.get("files") or {}).get(ARRAY_FILE, {}).get("sha256")
        if not isinstance(expected, str) or len(expected) != 64:
            raise ModelError(f"model {d}: card has no sha256 for {ARRAY_FILE}")
        try:
            if arr_path.stat().st_size > MAX_ARRAY_BYTES:
                raise ModelError(f"model {d}: {ARRAY_FILE} is implausibly large")
            actual = sha256_file(arr_path)
        except FileNotFoundError:
            raise ModelError(f"model {d}: missing {ARRAY_FILE}") from None
        except OSError as e:
            raise ModelError(f"model {d}: cannot read {ARRAY_FILE}: {e}") from None
        if actual != expected:
            raise ModelError(
                f"model {d}: sha256 of {ARRAY_FILE} is {actual}, card says {expected} "
                "(file corrupt or tampered with); refusing to load"
            )
        try:
            with np.load(arr_path, allow_pickle=False) as z:
                indices = np.asarray(z["indices"])
                values = np.asarray(z["values"])
                intercept = np.asarray(z["intercept"])
        except Exception as e:  # zipfile/format errors  # noqa: BLE001
            raise ModelError(f"model {d}: cannot read arrays from {ARRAY_FILE}: {e}") from None
        if (
            indices.dtype.kind not in "iu"
            or values.dtype.kind != "f"
            or intercept.dtype.kind != "f"
        ):
            raise ModelError(f"model {d}: unexpected array dtypes")
        if indices.ndim != 1 or values.shape != indices.shape or intercept.size != 1:
            raise ModelError(f"model {d}: unexpected array shapes")
        if indices.size and (indices.min() < 0 or indices.max() >= n_features):
            raise ModelError(f"model {d}: feature index out of range")
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(intercept))):
            raise ModelError(f"model {d}: non-finite weights")
        w = np.zeros(n_features, dtype=np.float32)
        w[indices.astype(np.int64)] = values.astype(np.float32)
        name = d.resolve().name  # the directory name is what ACTIVE refers to
        return cls(name, w, float(intercept.ravel()[0]), card)

    @staticmethod
    def save(
        path: str | os.PathLike[str],
        coef: np.ndarray,
        intercept: float,
        card: dict[str, Any],
        value_dtype: str = "float16",
    ) -> dict[str, Any]:
        """Write ``model.npz`` (sparse, non-zero weights only) and ``card.json`` into ``path``.

        ``card`` is completed with format, name, feature settings and the array sha256; the
        final card is returned.  Files are written via temp file + rename.
        """
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        coef = np.asarray(coef, dtype=np.float64).ravel()
        n_features = coef.shape[0]
        values = coef.astype(value_dtype)
        nz = np.flatnonzero(values)
        buf = _npz_bytes(
            indices=nz.astype(np.int32),
            values=values[nz],
            intercept=np.array([float(intercept)], dtype=np.float64),
        )
        _atomic_write(d / ARRAY_FILE, buf)
        full = dict(card)
        full["format"] = MODEL_FORMAT
        full["name"] = d.name
        full.setdefault("features", vectorizer_settings(n_features))
        full.setdefault("evidence", dict(DEFAULT_EVIDENCE))
        full["features"]["n_features"] = int(n_features)
        full["files"] = {
            ARRAY_FILE: {
                "sha256": hashlib.sha256(buf).hexdigest(),
                "bytes": len(buf),
                "nonzero_weights": int(nz.size),
                "value_dtype": value_dtype,
            }
        }
        full.setdefault("libraries", library_versions())
        _atomic_write(d / CARD_FILE, (json.dumps(full, indent=2, sort_keys=False) + "\n").encode())
        return full


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    bio = io.BytesIO()
    np.savez_compressed(bio, **arrays)  # type: ignore[arg-type]
    return bio.getvalue()
