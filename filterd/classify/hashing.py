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


def _hashes(tokens: Iterable[str]) -> np.ndarray:
    uniq = set(tokens)
    try:
        return np.fromiter(map(mmh3.hash, uniq), dtype=np.int64, count=len(uniq))
    except UnicodeEncodeError:
        return np.fromiter(map(_h, uniq), dtype=np.int64, count=len(uniq))


_WORD_GRAM_HASHES: dict[str, bytes] = {}
# Distinct words remembered (about 0.1 KB each); cleared when full, like the n-gram cache.
_WORD_GRAM_HASHES_MAX = 20_000


def word_gram_hashes(words: Iterable[str]) -> np.ndarray:
    """The signed hashes (int64) of the ``g:`` n-gram tokens of ``words``, one word after another.

    Words recur across messages (Zipf), so a message's n-grams -- four in five of its
    tokens -- cost a dict lookup per word instead of a string and a hash per n-gram. Each
    word's hashes are remembered as the bytes of its int64 array (empty for a word without
    n-grams, see ``features.has_grams``), so a message's are one ``bytes.join`` away.
    """
    from filterd.classify.features import has_grams, word_grams

    cache = _WORD_GRAM_HASHES
    words = list(words)
    got = list(map(cache.get, words))
    if None in got:
        for i, h in enumerate(got):
            if h is None:
                if len(cache) >= _WORD_GRAM_HASHES_MAX:
                    cache.clear()
                w = words[i]
                h = got[i] = cache[w] = _hashes(word_grams(w) if has_grams(w) else ()).tobytes()
    return np.frombuffer(b"".join(got), dtype=np.int64)  # type: ignore[arg-type]


def token_indices(
    tokens: Iterable[str], n_features: int, gram_words: Iterable[str] = ()
) -> np.ndarray:
    """Sorted unique column indices (int64) of ``tokens`` plus the n-grams of ``gram_words``.

    ``mmh3.hash`` with its defaults is seed 0, signed; ``map`` over it and a sort-based
    de-duplication are several times faster than a list comprehension and ``np.unique``.
    ``gram_words`` (``Tokens.gram_words`` of a serving extraction) gives the same indices
    as listing those words' n-gram tokens in ``tokens``.
    """
    a = _hashes(tokens)
    if gram_words:
        grams = word_gram_hashes(gram_words)
        if grams.size:
            a = np.concatenate([a, grams])
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
