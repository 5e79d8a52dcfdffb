"""Feature hashing for serving and training: tokens -> sorted unique column indices.

The indices are those of scikit-learn's ``FeatureHasher(input_type="string",
alternate_sign=False)`` (MurmurHash3 x86 32-bit, seed 0, over the UTF-8 bytes, ``abs(h) %
n_features``), computed with the ``mmh3`` C extension so the serving process needs neither
scikit-learn nor scipy (importing them costs ~1 s and ~60 MB per process).  Training uses the
same function, so serving and training cannot disagree; ``tests/test_classify_hashing.py``
checks it against sklearn's hasher.

Rows are binary presence vectors with L2 norm 1: each present column has value
``1/sqrt(number of distinct columns)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import mmh3
import numpy as np

HASHING = "murmurhash3_32 seed 0 utf-8, abs(h) % n_features (= sklearn FeatureHasher, no sign)"


def _h(token: str) -> int:
    try:
        return mmh3.hash(token, 0, True)
    except UnicodeEncodeError:  # lone surrogates: hash the bytes Python can represent
        return mmh3.hash(token.encode("utf-8", "surrogatepass"), 0, True)


def token_indices(tokens: Iterable[str], n_features: int) -> np.ndarray:
    """Sorted unique column indices (int64) of ``tokens``."""
    try:
        hs = [mmh3.hash(t, 0, True) for t in set(tokens)]
    except UnicodeEncodeError:
        hs = [_h(t) for t in set(tokens)]
    if not hs:
        return np.zeros(0, dtype=np.int64)
    # abs() in int64 maps -2**31 to 2**31; sklearn's special case gives the same remainder.
    return np.unique(np.abs(np.asarray(hs, dtype=np.int64)) % n_features)


def row_value(n_columns: int) -> float:
    """The value of every present column in an L2-normalised binary row."""
    return 1.0 / math.sqrt(n_columns) if n_columns else 0.0
