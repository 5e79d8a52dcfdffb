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
        return int(mmh3.hash(token))
    except UnicodeEncodeError:  # lone surrogates: hash the bytes Python can represent
        return int(mmh3.hash(token.encode("utf-8", "surrogatepass")))


def token_indices(tokens: Iterable[str], n_features: int) -> np.ndarray:
    """Sorted unique column indices (int64) of ``tokens``.

    ``mmh3.hash`` with its defaults is seed 0, signed; ``map`` over it and a sort-based
    de-duplication are several times faster than a list comprehension and ``np.unique``.
    """
    uniq = set(tokens)
    try:
        a = np.fromiter(map(mmh3.hash, uniq), dtype=np.int64, count=len(uniq))
    except UnicodeEncodeError:
        a = np.fromiter(map(_h, uniq), dtype=np.int64, count=len(uniq))
    # abs() in int64 maps -2**31 to 2**31; sklearn's special case gives the same remainder.
    np.abs(a, out=a)
    a %= n_features
    a.sort()
    if a.size > 1:
        a = a[np.concatenate(([True], a[1:] != a[:-1]))]
    return a


def row_value(n_columns: int) -> float:
    """The value of every present column in an L2-normalised binary row."""
    return 1.0 / math.sqrt(n_columns) if n_columns else 0.0
