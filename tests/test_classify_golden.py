"""Golden test: ``extract_features`` output pinned on a few generated messages.

Any change to the token set breaks deployed models silently unless ``FEATURES_VERSION`` is bumped,
so a diff here must come with a version bump and a retrained model.  To accept a deliberate
change: ``FILTERD_REGEN_GOLDEN=1 pytest tests/test_classify_golden.py`` and commit the JSON.
"""

from __future__ import annotations

import json
import os
from email.mime.image import MIMEImage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from filterd.classify.features import FEATURES_VERSION, extract_features

GOLDEN = Path(__file__).parent / "golden" / "features.json"


def _messages() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    out["plain"] = (
        b"From: Alice Example <alice@example.org>\nTo: bob@example.net\nSubject: Re: build fix\n"
        b"Message-ID: <20240101.1@mail.example.org>\nIn-Reply-To: <x@example.net>\n"
        b"Content-Type: text/plain; charset=utf-8\n\n> the build broke\nFixed in "
        b"https://git.example.org/commit/abc123 - thanks!\n"
    )
    alt = MIMEMultipart("alternative")
    alt["From"] = '"PayPaI Security" <service@secure-login.xyz>'
    alt["Subject"] = "=?utf-8?b?VXJnZW50OiB2ZXJpZnkgeW91ciBhY2NvdW50?="
    alt["Reply-To"] = "claims@gmail.com"
    alt.attach(MIMEText("V1agra 90% off! Click http://bit.ly/x1 now", "plain"))
    alt.attach(
        MIMEText(
            '<html><body><a href="http://203.0.113.9/login">www.paypal.com</a>'
            '<font color="#ffffff" size=1>hidden words</font><img src="cid:x"></body></html>',
            "html",
            "utf-8",
        )
    )
    out["phish alternative"] = alt.as_bytes()
    mixed = MIMEMultipart()
    mixed["Subject"] = "photo"
    mixed.attach(MIMEText("", "plain"))
    mixed.attach(MIMEText("Here it is.", "plain"))
    mixed.attach(MIMEImage(b"GIF89a\x01\x00\x01\x00\x80\x00\x00", "gif"))
    out["image and empty part"] = mixed.as_bytes()
    out["garbage"] = b"\x00\xff<html><a href=\n\n--\r\n"
    return out


def _features() -> dict[str, list[str]]:
    return {k: sorted(extract_features(v)) for k, v in _messages().items()}


def test_extract_features_matches_golden() -> None:
    got = {"features_version": FEATURES_VERSION, "messages": _features()}
    if os.environ.get("FILTERD_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        pytest.skip("golden file regenerated")
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert want["features_version"] == FEATURES_VERSION, "features changed: regenerate + retrain"
    for name, toks in want["messages"].items():
        assert got["messages"][name] == toks, name


def test_golden_pins_what_the_model_reads() -> None:
    f = _features()
    phish = set(f["phish alternative"])
    assert {
        "w:v1agra",
        "g: via",
        "g:agr",
        "u:bit.ly",
        "us:ip",
        "o:link_text_domain_mismatch",
    } <= phish
    assert "h:reply_to_freemail" in phish
    assert not any("bob" in t or "example.net" in t for t in f["plain"])  # never recipients
    assert "m:text/plain" in f["image and empty part"]
