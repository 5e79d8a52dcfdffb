"""The classifier's fast paths give exactly what the plain regex scans and counts give."""

from __future__ import annotations

import random

from filterd.classify import features as F

_PIECES = [*"abcXYZ019@.:/-+_ w\t\n<>\"'()[]{}", "://", "www.", "WWW.", "http://", "https://a.b"]
_PIECES += ["ftp://", "@x.com", "a@b.c@d.e", "\u017f", "é", "\u00a0", "\u2028", "Ⅻ", "İ", "K"]
_PIECES += ["Www.", "HTTP://", "\n>", "\n \n>", " >", "\r>", "\x1c>", "\u0436", "\u200b", "don't"]


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


def test_html_scans_skipped_by_their_literal_guards_still_fire_in_any_case() -> None:
    """html_to_text skips a regex when the lower-cased text lacks a literal every match
    holds; upper-case and mixed-case markup must still give the same tokens."""
    page = (
        '<HTML><BODY><P STYLE="DISPLAY : NONE">x</P><FONT SIZE=1>tiny</FONT>'
        '<TD BGCOLOR=red><SPAN STYLE="COLOR: #FFFFFF">white</SPAN></TD>'
        '<META HTTP-EQUIV="Refresh" CONTENT="0"><BASE HREF="http://b.example/">'
        'wo<!-- x -->rd <A HREF="http://evil.example/x">www.bank.example</A>'
        "<SCRIPT>var a = 1;</SCRIPT><TITLE>t</TITLE></BODY></HTML>"
    )
    for variant in (page, page.lower(), page.swapcase()):
        toks: list[str] = []
        urls: list[str] = []
        text = F.html_to_text(variant, toks, urls)
        for token in (
            "o:html_hidden",
            "o:html_tinyfont",
            "o:html_white",
            "t:meta_refresh",
            "t:base_href",
            "o:html_comment_inword",
            "o:link_text_domain_mismatch",
            "n:html_comments=1",
        ):
            assert token in toks, (token, variant[:40])
        assert "var a" not in text.lower() and "http://evil.example/x" in [u.lower() for u in urls]
    plain: list[str] = []
    F.html_to_text("<p>just words, no styling</p>", plain, [])
    assert not {"o:html_hidden", "o:html_tinyfont", "o:html_white", "t:meta_refresh"} & set(plain)


def test_urls_read_from_the_runs_around_markers_equal_a_full_scan() -> None:
    """``_text_urls`` finds what ``_URL_TEXT_RE.finditer`` finds, in order, any case,
    also when lower-casing changes the text's length (U+0130)."""
    long = "x" * 70 + "WwW." + "y" * 600 + " HTTPS://" + "z" * 700 + "http://q www.r"
    for text in [*_samples(20000), long, "İ www.a.example İ http://b"]:
        want = [m.group(0) for m in F._URL_TEXT_RE.finditer(text)]
        assert list(F._text_urls(text)) == want, text


def test_quoted_line_count_equals_the_multiline_regex() -> None:
    for text in [*_samples(20000), "a\n\n  \n> b\n>c\nd > e\n\t>"]:
        assert F._quoted_lines(text) == len(F._QUOTED_RE.findall(text)), text


def test_word_features_equal_the_per_word_rules() -> None:
    """The set-based word mapping and letter-digit count give the per-word results."""
    for text in [*_samples(3000), "abc " * 3 + "a1 a1 b2 123 " + "q" * 31 + " x9" * 40]:
        toks = F.Tokens()
        F._text_features(text, toks, 3000)
        words = F._WORD_RE.findall(_masked(text))
        want_words = {w if (len(w) <= 30 and w.isalpha()) else F._map_word(w) for w in words}
        mix = sum(
            1
            for w in words
            if not w.isalpha()
            and len(w) <= 30
            and not w.isdigit()
            and any(c.isdigit() for c in w)
            and any(c.isalpha() for c in w)
        )
        assert {t[2:] for t in toks if t.startswith("w:")} == want_words, text
        assert f"o:alnum_mix={F._bucket(mix)}" in toks, text


def _masked(text: str) -> str:
    low = F._URL_TEXT_RE.sub(" _url_ ", text.lower())
    return F._EMAIL_TEXT_RE.sub(" _email_ ", low)


def test_words_of_ascii_text_split_in_c_equal_the_pattern() -> None:
    """``_words`` (translate + split, the pattern only on runs holding ' $ ! _) gives
    ``_WORD_RE.findall`` token for token, in order, ASCII or not."""
    extra = ["'", "''", "$", "!", "_", "_url_", "_email_", "x_url_y", "don't", "a'b'c", "-", "€"]
    rnd = random.Random(3)
    pieces = _PIECES + extra
    texts = ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 60))) for _ in range(20000)]
    for text in [*texts, "Mixed CASE don't", "a\tb\x0bc\x1cd"]:
        for variant in (text, text.lower()):
            assert F._words(variant) == F._WORD_RE.findall(variant), variant
