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
from itertools import filterfalse

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


_WORD_HASHES: dict[str, bytes] = {}
# Distinct words remembered, ~0.25 KB each with the word (12 MB per worker when full); then
# cleared. The two corpora hold 73k distinct words, 2000 random messages of them 36k: at 20k
# entries the cache kept being refilled (scoring them: ~1.0 ms a message, ~0.8 at 50k).
_WORD_HASHES_MAX = 50_000


def word_hashes(words: Iterable[str]) -> np.ndarray:
    """The signed hashes (int64) of the tokens of each distinct body word, one after another.

    Words recur across messages (Zipf), so a message's body-word tokens -- its ``w:`` and
    ``g:`` tokens, nine in ten of all (``features.word_tokens``) -- cost a dict lookup per
    word instead of strings and a hash per token. Each word's hashes are remembered as the
    bytes of its int64 array, so a message's are one ``bytes.join`` away.
    """
    from filterd.classify.features import word_tokens

    cache = _WORD_HASHES
    words = list(words)
    # (``set - cache.keys()`` would walk the whole cache: dict views subtract that way.)
    missing = list(filterfalse(cache.__contains__, words))
    if missing:
        if len(cache) + len(missing) > _WORD_HASHES_MAX:
            cache.clear()
            missing = words
        for w in missing:
            cache[w] = _hashes(word_tokens(w)).tobytes()
    return np.frombuffer(b"".join(map(cache.__getitem__, words)), dtype=np.int64)


def token_indices(
    tokens: Iterable[str], n_features: int, deferred_words: Iterable[str] = ()
) -> np.ndarray:
    """Sorted unique column indices (int64) of ``tokens`` plus the tokens of ``deferred_words``.

    ``mmh3.hash`` with its defaults is seed 0, signed; ``map`` over it and a sort-based
    de-duplication are several times faster than a list comprehension and ``np.unique``.
    ``deferred_words`` (``Tokens.deferred_words`` of a serving extraction) gives the same
    indices as listing those words' tokens in ``tokens``.
    """
    a = _hashes(tokens)
    if deferred_words:
        words = word_hashes(deferred_words)
        if words.size:
            a = np.concatenate([a, words])
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
