"""Shared fixtures: real servers on loopback, from tests.servers.

Servers that are slow to set up or stateless per test (Redis, clamd) are session-wide;
anything a test configures (rbldnsd zones, Postfix settings, the sink's mailbox) is per test,
so no test sees another's data. Directories are made reachable for the users Postfix and
rbldnsd drop to, since pytest's temporary directories are 0700.

The session's temporary root is moved out of /tmp/pytest-of-USER: every pytest session
resets that directory to 0700, so a second pytest run on the machine (another developer, a
bench) would cut the postfix/rbldns users off from the first run's directories mid-test
(seen: "open lock file .../master.lock: Permission denied"). ``--basetemp`` still wins.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import redis

from tests.servers import (
    ClamdServer,
    PostfixServer,
    RbldnsdServer,
    RedisServer,
    SmtpSink,
    make_reachable,
    project_signature_dir,
)

# The harmless string the project's test signature "Filterd.Test.Virus" matches.
HARMLESS_TEST_VIRUS = b"FILTERD-HARMLESS-" + b"TEST-VIRUS-7f3a9c"


def eicar_bytes() -> bytes:
    """The 68-byte EICAR test file, assembled here so no file in the repo contains it whole
    (a scanner on a developer's machine would otherwise quarantine the repository)."""
    return b"".join(
        [b"X5O!P%@AP[4\\PZX54(P^)7CC)7}", b"$EICAR-STANDARD-", b"ANTIVIRUS-TEST-FILE!", b"$H+H*"]
    )


_RUNS_KEPT = 3


def _session_basetemp() -> Path:
    """A fresh per-session root under /tmp/filterd-tests-USER (0711), keeping the last runs.

    The name stays short: unix socket paths below it must fit in 107 bytes.
    """
    parent = Path(tempfile.gettempdir()) / f"filterd-tests-{getpass.getuser()}"
    parent.mkdir(mode=0o711, exist_ok=True)
    info = parent.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise pytest.UsageError(f"{parent} is not a directory owned by you; remove it")
    parent.chmod(0o711)
    runs = sorted(p for p in parent.iterdir() if p.is_dir() and "-" in p.name)
    for old in runs[: max(0, len(runs) - _RUNS_KEPT)]:
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue  # a session still running
        shutil.rmtree(old, ignore_errors=True)
    return parent / f"{time.strftime('%y%m%d-%H%M%S')}-{os.getpid()}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # tryfirst: before pytest's tmpdir plugin reads the option in its own pytest_configure.
    if config.option.basetemp is None:
        with contextlib.suppress(OSError):
            config.option.basetemp = str(_session_basetemp())
    # Also declared in pyproject.toml; repeated so the markers exist whatever config is used.
    config.addinivalue_line(
        "markers", "integration: talks to a real server (redis, clamd, rbldnsd) started by tests"
    )
    config.addinivalue_line("markers", "e2e: goes through a real Postfix and the real daemon")


def _private_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    return make_reachable(factory.mktemp(name))


@pytest.fixture
def eicar() -> bytes:
    return eicar_bytes()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(_private_dir(tmp_path_factory, "redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may stop, restart or flush."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdServer]:
    """clamd with the project's tiny database (rules/clamav-sigs)."""
    with ClamdServer(_private_dir(tmp_path_factory, "clamd"), project_signature_dir()) as server:
        yield server


RbldnsdFactory = Callable[..., RbldnsdServer]


@pytest.fixture
def rbldnsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbldnsdFactory]:
    """``rbldnsd(zones, ttl=None)`` starts an rbldnsd serving ``zones`` for this test."""
    started: list[RbldnsdServer] = []

    def make(zones: Sequence[tuple[str, str, str]], ttl: int | None = None) -> RbldnsdServer:
        server = RbldnsdServer(_private_dir(tmp_path_factory, "rbldnsd"), zones, ttl=ttl)
        started.append(server)
        return server.start()

    yield make
    for server in reversed(started):
        server.stop()


@pytest.fixture
def smtp_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    with SmtpSink(_private_dir(tmp_path_factory, "sink")) as sink:
        yield sink


PostfixFactory = Callable[..., PostfixServer]


@pytest.fixture
def postfix_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixFactory]:
    """``postfix_factory(milter=None, default_action="tempfail", extra_main_cf=None)``.

    Returns a started PostfixServer relaying to its own started SmtpSink (``server.sink``).
    """
    started: list[PostfixServer | SmtpSink] = []

    def make(
        milter: str | None = None,
        default_action: str = "tempfail",
        extra_main_cf: Mapping[str, str] | None = None,
    ) -> PostfixServer:
        sink = SmtpSink(_private_dir(tmp_path_factory, "sink"))
        started.append(sink)
        sink.start()
        server = PostfixServer(
            _private_dir(tmp_path_factory, "postfix"),
            sink.port,
            milter=milter,
            milter_default_action=default_action,
            extra_main_cf=extra_main_cf,
        )
        server.sink = sink
        started.append(server)
        return server.start()

    yield make
    for server in reversed(started):
        server.stop()
