"""The spool: bodies are streamed, concurrently, without sharing a file position."""

from __future__ import annotations

import hashlib
import os
import threading

from filterd.builder import MessageBuilder
from filterd.settings import MilterConfig
from filterd.types import Envelope


def test_concurrent_readers_each_get_the_whole_body() -> None:
    """clamd and the attachment walk read the same spool at the same time."""
    body = os.urandom(3 * 1024 * 1024)  # larger than memory_spool_bytes: a real file
    builder = MessageBuilder(MilterConfig(memory_spool_bytes=1024 * 1024), Envelope())
    for i in range(0, len(body), 65535):
        builder.add_body(body[i : i + 65535])
    message = builder.build(("u@example.org",), None)
    want = hashlib.sha256(message.header_block + body).hexdigest()
    got: list[str] = []

    def read() -> None:
        h = hashlib.sha256()
        for chunk in message.iter_raw():
            h.update(chunk)
        got.append(h.hexdigest())

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    builder.close()
    assert got == [want] * 8


def test_oversize_body_is_counted_not_kept() -> None:
    builder = MessageBuilder(MilterConfig(max_message_bytes=1000), Envelope())
    builder.add_header(b"Subject", b"x")
    for _ in range(10):
        builder.add_body(b"y" * 500)
    message = builder.build((), None)
    assert message.oversize and message.size > 5000
    assert b"".join(message.iter_raw()).count(b"y") == 0
    builder.close()
