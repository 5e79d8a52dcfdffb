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

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from filterd.classify.features import FEATURES_VERSION, SETTINGS, extract_features

MODEL_FORMAT = "filterd-linear-v1"
ARRAY_FILE = "model.npz"
CARD_FILE = "card.json"
DEFAULT_N_FEATURES = 2**20
MAX_CARD_BYTES = 4 * 1024 * 1024
MAX_ARRAY_BYTES = 64 * 1024 * 1024


class ModelError(Exception):
    """A model could not be loaded or saved (corrupt, tampered, mismatched, missing)."""


# --------------------------------------------------------------------------- vectorising

_hashers: dict[int, Any] = {}


def _hasher(n_features: int) -> Any:
    h = _hashers.get(n_features)
    if h is None:
        from sklearn.feature_extraction import FeatureHasher

        h = FeatureHasher(n_features=n_features, input_type="string", alternate_sign=False)
        _hashers[n_features] = h
    return h


def vectorize(
    token_lists: Iterable[Sequence[str]], n_features: int = DEFAULT_N_FEATURES
) -> sp.csr_matrix:
    """Hash token lists -> CSR rows of binary presence, L2-normalised, float32.

    Shared by training and serving. No vocabulary is stored anywhere.  (Binary presence beat
    sublinear tf in the benchmark: repeated stop words and "!" no longer dominate a row.)
    """
    X = _hasher(n_features).transform(token_lists).tocsr()
    X.sum_duplicates()
    X = X.astype(np.float32)
    X.data[:] = 1.0
    counts = np.diff(X.indptr).astype(np.float64)
    counts[counts == 0] = 1.0
    X.data *= np.repeat((1.0 / np.sqrt(counts)).astype(np.float32), np.diff(X.indptr))
    return X


def vectorizer_settings(n_features: int) -> dict[str, Any]:
    return {
        **SETTINGS,
        "hashing": "sklearn.FeatureHasher murmurhash3_32 input_type=string alternate_sign=False",
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
    """An immutable loaded linear model.  Thread-safe for concurrent :meth:`score` calls."""

    def __init__(self, name: str, weights: np.ndarray, intercept: float, card: dict[str, Any]):
        self.name = name
        self._w = weights
        self._b = float(intercept)
        self.card = card
        self.n_features = int(weights.shape[0])
        th = card.get("thresholds", {})
        self.thresholds: tuple[float, float] = (float(th["reject"]), float(th["tag"]))

    # ----------------------------------------------------------------- scoring
    def decision(self, X: sp.csr_matrix) -> np.ndarray:
        return np.asarray(X @ self._w, dtype=np.float64).ravel() + self._b

    def score_tokens(self, tokens: Sequence[str]) -> float:
        X = vectorize([tokens], self.n_features)
        z = float(np.dot(self._w[X.indices], X.data)) + self._b
        return float(sigmoid(z))

    def score(self, raw: bytes) -> float:
        """Spam probability in [0, 1] for raw message bytes. Never raises on message content."""
        return self.score_tokens(extract_features(raw))

    def score_many(self, raws: Iterable[bytes]) -> np.ndarray:
        X = vectorize((extract_features(r) for r in raws), self.n_features)
        return np.asarray(sigmoid(self.decision(X)))

    def verdict(self, p: float) -> str:
        """'reject', 'tag' or 'ham' for a probability, using the card thresholds."""
        reject, tag = self.thresholds
        if p >= reject:
            return "reject"
        if p >= tag:
            return "tag"
        return "ham"

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
