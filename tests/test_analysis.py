"""One analysis per message: one parse, text decoded once, links once, shared by every check."""

from __future__ import annotations

import email.message
import email.policy
import threading
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from filterd.checks import uribl
from filterd.checks.allowlist import _headers
from filterd.checks.base import Services
from filterd.checks.classifier import ClassifierCheck
from filterd.checks.classifier import Config as ClassifierConfig
from filterd.classify.registry import ModelHolder
from filterd.mail import psl
from filterd.mail.analysis import MessageAnalysis, analysis_of, attach
from filterd.mail.links import link_domains
from filterd.pipeline import Pipeline, build_checks
from filterd.records.observer import message_id
from filterd.settings import Settings, load_settings
from filterd.types import Envelope, Message
from tests.servers import write_config

ROOT = Path(__file__).resolve().parent.parent

RAW = (
    b'From: "Shop" <news@mail.shop.example.co.uk>\r\n'
    b"Message-ID: <abc@shop.example>\r\n"
    b"Authentication-Results: mx.example;\r\n\tspf=pass smtp.mailfrom=news@shop.example.co.uk\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"see http://www.plain-link.example/x and hxxp://evil[.]example\r\n"
    b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<a href="https://html-link.example/">x</a>\r\n'
    b"--b--\r\n"
)


class CountingMessage(Message):
    """A message that counts how often its top is parsed."""

    parses = 0

    def parse_head(self, limit: int) -> tuple[email.message.Message, bytes]:
        type(self).parses += 1
        return super().parse_head(limit)


def counting(raw: bytes) -> CountingMessage:
    base = Message.from_bytes(raw, Envelope(recipients=("u@example.org",)))
    CountingMessage.parses = 0
    return CountingMessage(base.envelope, base.header_block, base._body_reader, base.size)


def test_every_reader_shares_one_analysis_and_one_parse() -> None:
    message = counting(RAW)
    analysis = analysis_of(message)
    assert analysis_of(message) is analysis and attach(message) is analysis
    assert analysis.link_domains() == ["plain-link.example", "evil.example", "html-link.example"]
    assert analysis.link_domains(skip=["evil.example"]) == [
        "plain-link.example",
        "html-link.example",
    ]
    assert [p.subtype for p in analysis.text_parts] == ["plain", "html"]
    assert uribl.from_domains(message) == ["example.co.uk"]
    froms, authres = _headers(message)
    assert froms == ['"Shop" <news@mail.shop.example.co.uk>']
    assert authres == ["mx.example;\r\n\tspf=pass smtp.mailfrom=news@shop.example.co.uk"]
    assert message_id(message) == "<abc@shop.example>"
    assert CountingMessage.parses == 1


def test_same_domains_as_the_standalone_extractor() -> None:
    message = counting(RAW)
    assert analysis_of(message).link_domains() == link_domains(message.parse_head(1 << 20)[0])


def test_concurrent_readers_compute_once() -> None:
    message = counting(RAW)
    analysis = MessageAnalysis(message)
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def read() -> None:
        barrier.wait()
        results.append(analysis.link_domains())

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r == results[0] for r in results)
    assert CountingMessage.parses == 1


def test_head_limit_bounds_what_is_parsed() -> None:
    big = RAW.replace(b"--b--\r\n", b"--b\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 3_000_000)
    message = counting(big + b"\r\nhttp://after-the-limit.example/\r\n--b--\r\n")
    analysis = MessageAnalysis(message, head_limit=64 * 1024)
    assert sum(len(p.text) for p in analysis.text_parts) < 64 * 1024
    assert "after-the-limit.example" not in analysis.link_domains()


def test_one_public_suffix_instance() -> None:
    from filterd.allowlist import entries

    assert entries._psl() is psl.psl()
    assert psl.private_suffix("www.shop.example.co.uk") == "example.co.uk"


def test_pipeline_parses_as_far_as_uribl_reads(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "f.toml",
        {
            "pipeline": {"recipient_checks": [], "message_checks": ["uribl"]},
            "uribl": {"max_bytes": 200_000, "enabled": False},
        },
    )
    settings: Settings = load_settings(path, env={})
    checks = build_checks(settings, Services(settings=settings))
    pipeline = Pipeline(settings, checks)
    try:
        message = counting(RAW)
        pipeline.judge_message(message, [])
        assert analysis_of(message).head_limit == 200_000
    finally:
        pipeline.close()


def test_from_domains_read_the_first_from_as_written() -> None:
    # A folded From: whose encoded display name decodes to a comma and an address:
    # only the real address counts, and only the first From: header.
    raw = (
        b"From: =?utf-8?q?Smith=2C_evil=40spam=2Eexample?=\r\n"
        b"  <john@Mail.Good.Example>, other@second.example\r\n"
        b"From: late@third.example\r\n"
        b"Subject: x\r\n\r\nbody\r\n"
    )
    message = Message.from_bytes(raw, Envelope())
    assert MessageAnalysis(message).from_domains == ["good.example", "second.example"]
    assert MessageAnalysis(Message.from_bytes(b"Subject: x\r\n\r\n", Envelope())).from_domains == []
    empty = Message.from_bytes(b"From: \r\n\r\n", Envelope())
    assert MessageAnalysis(empty).from_domains == []


def _classifier(max_bytes: int = 512 * 1024) -> ClassifierCheck:
    return ClassifierCheck(ClassifierConfig(max_bytes=max_bytes), ModelHolder(ROOT / "models"))


def test_the_classifier_scores_the_one_parse_as_it_would_score_the_bytes() -> None:
    """Same probability as from the message's bytes, from the one parse -- also after the
    link reader has decoded a part with broken base64 (decoding records a defect on the
    part, which the features read: reading must not change the shared parse)."""
    broken = (
        b"From: a@b.example\r\nSubject: win\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Type: text/plain\r\n\r\n" + b"aHR0cDovL3guZXhhbXBsZS8gY2xpY2sgaGVyZQ" + b"\r\n"
    )
    check = _classifier()
    model = check.holder.current()
    assert model is not None
    for raw in (RAW, broken):
        message = counting(raw)
        assert analysis_of(message).link_domains() is not None  # the link reader goes first
        [finding] = check.check_message(message, exempt=False)
        assert finding.spam_probability == model.score(raw)
        assert CountingMessage.parses == 1
    cut = email.message_from_bytes(broken, policy=email.policy.compat32)
    assert cut.get_payload(decode=True) and cut.defects  # the defect the guard is about


def test_a_message_larger_than_the_classifier_reads_gets_its_own_cut() -> None:
    check = _classifier(max_bytes=4096)
    big = RAW.replace(b"--b--\r\n", b"--b\r\nContent-Type: text/plain\r\n\r\n" + b"word " * 2000)
    message = counting(big + b"\r\n--b--\r\n")
    model = check.holder.current()
    assert model is not None
    assert analysis_of(message).whole_head(4096) is None
    [finding] = check.check_message(message, exempt=False)
    assert finding.spam_probability == model.score(message.head(4096))


def test_a_parsed_head_serves_the_header_values_without_a_header_parse() -> None:
    message = counting(RAW)
    analysis = analysis_of(message)
    assert analysis.link_domains() and CountingMessage.parses == 1
    assert uribl.from_domains(message) == ["example.co.uk"]
    assert message_id(message) == "<abc@shop.example>"
    assert _headers(message)[1] == [
        "mx.example;\r\n\tspf=pass smtp.mailfrom=news@shop.example.co.uk"
    ]
    assert "headers" not in vars(message)  # Message.headers (the header-only parse) never ran


def test_uribl_reads_the_body_before_the_from_header() -> None:
    """uribl's From: lookup comes after the head parse, so it needs no header parse."""
    message = counting(RAW)
    check = uribl.UriblCheck(uribl.Config())  # the default lists serve From: and body
    assert [s.target for s in check.subjects(message)][:1] == ["from"]  # order kept
    assert CountingMessage.parses == 1
    assert "headers" not in vars(message)


_HEADER_LINE = st.one_of(
    st.builds(
        lambda n, v: n + b": " + v,
        st.sampled_from([b"From", b"from", b"Message-ID", b"Authentication-Results", b"X-A"]),
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    st.builds(lambda v: b"\t" + v, st.text(max_size=20).map(lambda t: t.encode())),  # fold
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)


@settings_(max_examples=300, deadline=None)
@given(st.lists(_HEADER_LINE, min_size=1, max_size=12), st.sampled_from([64, 100_000]))
def test_header_values_are_the_same_from_either_parse(lines: list[bytes], limit: int) -> None:
    """Head parse or header-only parse: the same (name, value) pairs, any header block."""
    raw = b"\r\n".join(lines) + b"\r\n\r\nbody http://x.example/\r\n"
    message = Message.from_bytes(raw, Envelope())
    for name in ("From", "Message-ID", "Authentication-Results", "X-A"):
        fresh = MessageAnalysis(Message.from_bytes(raw, Envelope()), limit)
        assert fresh.raw_header_values(name) == [
            str(v) for k, v in message.headers.raw_items() if k.lower() == name.lower()
        ]
    after_head = MessageAnalysis(Message.from_bytes(raw, Envelope()), limit)
    _ = after_head.head_message
    assert after_head.header_items == [(str(k), str(v)) for k, v in message.headers.raw_items()]
