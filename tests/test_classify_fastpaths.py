"""The classifier's fast paths give exactly what the plain regex scans and counts give."""

from __future__ import annotations

import random

from filterd.classify import features as F

_PIECES = [*"abcXYZ019@.:/-+_ w\t\n<>\"'()[]{}", "://", "www.", "WWW.", "http://", "https://a.b"]
_PIECES += ["ftp://", "@x.com", "a@b.c@d.e", "\u017f", "é", "\u00a0", "\u2028", "Ⅻ", "İ", "K"]


def _samples(n: int) -> list[str]:
    rnd = random.Random(12)
    return ["".join(rnd.choice(_PIECES) for _ in range(rnd.randint(0, 40))) for _ in range(n)]


def test_masking_only_the_runs_around_markers_equals_a_full_scan() -> None:
    long = "x" * 70 + "@a.com " + "y" * 600 + "http://" + "z" * 700 + "http://q www.r"
    for text in [*_samples(20000), long]:
        low = text.lower()
        url = F._sub_in_runs(F._URL_TEXT_RE, " _url_ ", low, ("://", "www."))
        assert url == F._URL_TEXT_RE.sub(" _url_ ", low), low
        mail = F._sub_in_runs(F._EMAIL_TEXT_RE, " _email_ ", url, ("@",))
        assert mail == F._EMAIL_TEXT_RE.sub(" _email_ ", url), url


def test_letter_counts_equal_isalpha_and_isupper() -> None:
    for text in [*_samples(5000), "ABC def", "ÀÉ \u017f İ", ""]:
        want = (sum(c.isalpha() for c in text), sum(c.isupper() for c in text))
        assert F._count_letters(text) == want, text
