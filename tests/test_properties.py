"""Property-based tests (hypothesis) for the code that reads what strangers send.

Over the MIME walk, feature extraction, allowlist entry parsing, the settings loader and
the milter callbacks driven in-process (pymilter's TestCtx): no exception escapes, every
input gets a defined verdict, memory stays bounded. Example counts are small so the
whole file runs in seconds; the strategies aim at structure (boundaries, nesting,
encodings, zip headers) rather than at random bytes only.
"""

from __future__ import annotations

import base64
import email.message
import io
import logging
import tracemalloc
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path

import Milter
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from Milter import testctx

from filterd import milter as filterd_milter
from filterd.allowlist.config import Config as AllowConfig
from filterd.allowlist.entries import EntryError, parse_entry, parse_target, sender_address
from filterd.classify.features import extract_features
from filterd.mail.walk import Item, Obstacle, WalkLimits, walk
from filterd.runtime import Runtime
from filterd.settings import ConfigError, Settings, load_settings, section_models
from tests.servers import toml_value

FAST = settings(
    max_examples=60,
    deadline=None,
    # caplog is cleared per example; tmp_path_factory is session-wide.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# -- messages ---------------------------------------------------------------------------------

HEADER_NAMES = [
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "Subject",
    "From",
    "X-Any",
    "MIME-Version",
]
CTYPES = [
    "text/plain",
    "text/html",
    "multipart/mixed",
    "multipart/alternative",
    "message/rfc822",
    "application/zip",
    "application/octet-stream",
    "multipart/digest",
    "text/plain; charset=utf-8",
    'multipart/mixed; boundary="b"',
    "multipart/mixed; boundary=",
    "application/x-msdownload",
]
CTES = ["7bit", "base64", "quoted-printable", "x-uuencode", "8bit", "bogus"]
junk = st.binary(max_size=300)
header_value = st.one_of(
    st.sampled_from(CTYPES + CTES),
    st.text(max_size=80),
    st.builds(lambda n: f'attachment; filename="{n}"', st.text(max_size=30)),
    st.builds(lambda n: f"attachment; filename*=utf-8''{n}", st.text(max_size=30)),
)


def _zip(members: list[tuple[str, bytes]], zip64: bool) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            with archive.open(name or "x", "w", force_zip64=zip64) as member:
                member.write(data)
    return out.getvalue()


zips = st.builds(
    _zip,
    st.lists(
        st.tuples(st.text(min_size=1, max_size=20), junk),
        min_size=1,
        max_size=4,
        unique_by=lambda member: member[0].split("\x00")[0].replace("\\", "/"),
    ),
    st.booleans(),
)


@st.composite
def entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A MIME entity: real structure, with junk and lies mixed in."""
    headers = [
        f"{draw(st.sampled_from(HEADER_NAMES))}: {draw(header_value)}"
        for _ in range(draw(st.integers(0, 4)))
    ]
    kind = draw(st.sampled_from(["leaf", "zip", "multi", "junk"] if depth < 3 else ["leaf"]))
    if kind == "multi":
        boundary = draw(st.sampled_from(["b", "b1", "=_x", "b b"]))
        parts = draw(st.lists(entity(depth + 1), max_size=4))
        close = draw(st.booleans())
        body = b"".join(b"--" + boundary.encode() + b"\n" + p + b"\n" for p in parts)
        body += (b"--" + boundary.encode() + b"--\n") if close else b""
        headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    elif kind == "zip":
        body = base64.encodebytes(draw(zips))
        headers += ["Content-Type: application/zip", "Content-Transfer-Encoding: base64"]
    elif kind == "junk":
        body = draw(junk)
    else:
        body = draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    return "\n".join(headers).encode("utf-8", "surrogatepass") + b"\n\n" + body


raw_messages = st.one_of(entity(), junk)
chunkings = st.integers(1, 4096)


def _chunks(raw: bytes, size: int) -> Iterator[bytes]:
    return (raw[i : i + size] for i in range(0, len(raw), size))


@FAST
@given(raw_messages, chunkings)
def test_mime_walk_never_raises_and_stays_bounded(raw: bytes, size: int) -> None:
    limits = WalkLimits(max_parts=50, max_bytes=1 << 20)
    tracemalloc.start()
    try:
        entries = list(walk(_chunks(raw, size), limits))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(isinstance(e, (Item, Obstacle)) for e in entries)
    # At most one item per part plus archive members, each with a bounded head.
    assert len(entries) <= 4 * (limits.max_parts + limits.max_members)
    assert peak < 8 * 1024 * 1024 + 4 * len(raw)
    # Chunking does not change what is found.
    assert [(type(e), getattr(e, "kind", None)) for e in entries] == [
        (type(e), getattr(e, "kind", None)) for e in walk(_chunks(raw, 65536), limits)
    ]


@FAST
@given(raw_messages)
def test_feature_extraction_never_raises(raw: bytes) -> None:
    features = extract_features(raw)
    assert isinstance(features, list) and all(isinstance(f, str) for f in features)
    assert len(features) < 100_000


# -- allowlist entries --------------------------------------------------------------------------

local_chars = st.sampled_from(
    [*"abcKk.+-_*@!#", "\u212a", "\u017f", "\uff41", "\u00df", "\u00fc", "\u0130", " ", "\x00"]
)
domains = st.sampled_from(
    [
        "example.org",
        "Example.ORG.",
        "xn--bcher-kva.example",
        "bücher.example",
        "*",
        "*.example.org",
        "com",
        "a..b",
        "",
    ]
)
entries = st.one_of(
    st.builds(lambda local, d: f"{local}@{d}", st.text(local_chars, max_size=12), domains),
    st.sampled_from(
        [
            "192.0.2.7",
            "192.0.2.0/24",
            "10.0.0.0/8",
            "::ffff:192.0.2.1",
            "2001:db8::/48",
            "2001:db8::/16",
            "300.1.1.1",
            "*@*",
        ]
    ),
    st.text(max_size=40),
)


@FAST
@given(entries)
def test_allowlist_parsing_refuses_or_gives_a_stable_canonical_form(text: str) -> None:
    config = AllowConfig()
    try:
        entry = parse_entry(text, config)
    except EntryError:
        pass
    else:
        assert parse_entry(entry.text, config) == entry  # canonical is a fixed point
    try:
        target = parse_target(text, config)
    except EntryError:
        return
    assert parse_target(target.key, config) == target
    # No list key holds a character that folding would turn into another address.
    local = target.key.rpartition("@")[0]
    for char in local:
        if not char.isascii():
            assert not unicodedata.normalize("NFKC", char.lower()).isascii()


@FAST
@given(st.text(max_size=60))
def test_sender_address_never_raises(text: str) -> None:
    result = sender_address(text)
    assert result is None or (isinstance(result, tuple) and "@" in result[0])


# -- the settings loader ------------------------------------------------------------------------

SECTIONS = sorted(section_models())
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.lists(st.text(max_size=8), max_size=3),
)


@st.composite
def config_docs(draw: st.DrawFn) -> str:
    lines = []
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), max_size=4, unique=True)):
        model = section_models().get(section)
        keys = sorted(model.model_fields) if model is not None else ["x"]
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from([*keys, "unknown_key"]), max_size=4, unique=True)):
            lines.append(f"{key} = {toml_value(draw(scalars))}")
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=30)))  # sometimes not TOML at all
    return "\n".join(lines) + "\n"


@FAST
@given(
    config_docs(),
    st.dictionaries(
        st.sampled_from(
            [
                "FILTERD_PIPELINE_WORKERS",
                "FILTERD_MILTER_MAX_HEADER_BYTES",
                "FILTERD_REDIS_URL",
                "FILTERD_CLAMAV_TIMEOUT",
                "FILTERD_NOPE_X",
            ]
        ),
        st.text(max_size=12),
        max_size=2,
    ),
)
def test_settings_loader_gives_settings_or_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, doc: str, env: dict[str, str]
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "filterd.toml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    try:
        loaded = load_settings(path, env=env)
    except ConfigError as exc:
        assert str(path) in str(exc) or "FILTERD_" in str(exc)
        return
    assert isinstance(loaded, Settings)


# -- the milter callbacks, in process ----------------------------------------------------------


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[filterd_milter.RuntimeHolder]:
    base = tmp_path_factory.mktemp("milter")
    path = base / "filterd.toml"
    path.write_text(
        '[pipeline]\nrecipient_checks = []\nmessage_checks = ["attachments"]\n'
        "[records]\nenabled = false\n"
        f'[milter]\nmax_header_bytes = 4096\nmax_message_bytes = 65536\nspool_dir = "{base}"\n'
    )
    runtime = Runtime(load_settings(path, env={}))
    holder = filterd_milter.RuntimeHolder(runtime)
    yield holder
    runtime.retire()


headers = st.lists(
    st.tuples(st.sampled_from([*HEADER_NAMES, "X-\u00e9", ""]), st.text(max_size=300)),
    max_size=30,
)
_NO_REPLY_FLAGS = 0
for _flag in ("P_NR_CONN", "P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT", "P_NR_DATA", "P_NR_UNKN",
              "P_NR_EOH", "P_NR_BODY", "P_NR_HDR"):  # fmt: skip
    _NO_REPLY_FLAGS |= getattr(Milter, _flag, 0)


class Ctx(testctx.TestCtx):  # type: ignore[misc]
    """pymilter's test context offering a protocol without no-reply events.

    TestCtx treats a callback's NOREPLY as a refusal and closes the context, so the
    events are negotiated with replies here, as Postfix does when asked.
    """

    default_opts = [Milter.CURR_ACTS, 0x1FFFFF & ~_NO_REPLY_FLAGS, 0, 0]

    def __init__(self) -> None:
        super().__init__()
        self._opts = Ctx.default_opts

    def _negotiate(self) -> int:
        testctx.TestCtx.default_opts = Ctx.default_opts
        try:
            return int(super()._negotiate())
        finally:
            testctx.TestCtx.default_opts = Ctx.base_opts

    base_opts = list(testctx.TestCtx.default_opts)


def _wire(text: str) -> str:
    """A header value as TestCtx expects it: raw bytes carried in surrogate escapes."""
    return text.encode("utf-8", "surrogatepass").decode("ascii", "surrogateescape")


VERDICTS = {Milter.CONTINUE, Milter.ACCEPT, Milter.REJECT, Milter.TEMPFAIL}
STEPS = VERDICTS | {Milter.NOREPLY}  # callbacks negotiated without a reply


@FAST
@given(
    st.sampled_from(["<a@example.net>", "<>", "a@b", "<\u212aen@example.org>", "<<>>", "x"]),
    st.lists(
        st.sampled_from(["<b@example.org>", "<\u00fc@example.org>", "<>", "c"]),
        min_size=1,
        max_size=3,
    ),
    headers,
    raw_messages,
)
def test_milter_callbacks_give_a_verdict_for_any_input(
    holder: filterd_milter.RuntimeHolder,
    caplog: pytest.LogCaptureFixture,
    sender: str,
    rcpts: list[str],
    header_list: list[tuple[str, str]],
    body: bytes,
) -> None:
    filterd_milter.install(holder)
    ctx = Ctx()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="filterd.milter"):
        assert ctx._connect(ip="192.0.2.1") in (Milter.CONTINUE, Milter.NOREPLY)
        assert ctx._envfrom(sender) in STEPS
        codes = [ctx._envrcpt(rcpt) for rcpt in rcpts]
        assert set(codes) <= STEPS
        if set(codes) & {Milter.CONTINUE, Milter.NOREPLY}:
            for name, value in header_list:
                assert ctx._header(name, _wire(value)) in STEPS
            assert ctx._feed_body(io.BytesIO(body)) in STEPS
            ctx._msg = email.message.Message()  # where TestCtx records added headers
            verdict = ctx._eom()
            assert verdict in VERDICTS
            if verdict in (Milter.REJECT, Milter.TEMPFAIL):
                assert ctx._reply is not None  # a refusal always says why
        ctx._close()
    # No callback needed the last-resort handler.
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    assert holder.in_flight == 0


def test_property_inputs_reach_the_limits() -> None:
    """The strategies are not toothless: the limits they aim at are reachable."""
    deep = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(40)
    )
    kinds = [getattr(e, "kind", None) for e in walk([deep], WalkLimits(max_nesting=30))]
    assert "structure" in kinds
    zipped = base64.encodebytes(_zip([("a.txt", b"x")], zip64=True))
    raw = b"Content-Type: application/zip\nContent-Transfer-Encoding: base64\n\n" + zipped
    assert "zip64" in [getattr(e, "kind", None) for e in walk([raw])]
    assert Path(__file__).name == "test_properties.py"
