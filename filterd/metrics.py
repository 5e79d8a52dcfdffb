"""Metrics hooks called by the supervisor.

placeholder; replaced by the service helper's module at merge.
"""

from __future__ import annotations

from filterd.settings import Settings


def prepare(settings: Settings) -> None:
    """placeholder; replaced by the service helper's module at merge."""


def enabled(settings: Settings) -> bool:
    """placeholder; replaced by the service helper's module at merge."""
    return False


def serve_http(settings: Settings) -> None:
    """placeholder; replaced by the service helper's module at merge."""


def worker_exited(pid: int) -> None:
    """placeholder; replaced by the service helper's module at merge."""
