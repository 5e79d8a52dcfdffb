"""Start-up health: the real daemon with clamd down refuses or starts degraded, as configured;
a clamd on the project's test signatures is a WARNING at every start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from filterd.health import preflight
from filterd.settings import load_settings
from tests.helpers_daemon import DaemonProcess, write_config
from tests.servers import ClamdServer, free_port, make_reachable

pytestmark = pytest.mark.integration


def _config(path: Path, clamd_address: str, mode: str, **extra: dict[str, object]) -> Path:
    return write_config(
        path,
        {
            "daemon": {"state_dir": str(path.parent / "state"), "on_dependency_down": mode},
            "pipeline": {"recipient_checks": [], "message_checks": ["antivirus"]},
            "clamav": {"address": clamd_address, "timeout": 2.0},
            "records": {"enabled": False},
            "metrics": {"enabled": False},
            **extra,
        },
    )


def _lines(log: str) -> list[dict[str, object]]:
    out = []
    for line in log.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_clamd_down_refuses_start_naming_it(tmp_path: Path) -> None:
    base = make_reachable(tmp_path)
    dead = f"tcp:127.0.0.1:{free_port()}"
    daemon = DaemonProcess(base / "d", _config(base / "f.toml", dead, "refuse"))
    with pytest.raises(RuntimeError, match="exited at start"):
        daemon.start(timeout=30)
    assert daemon.proc is not None and daemon.proc.returncode == 3
    lines = _lines(daemon.log())
    refusal = [line for line in lines if line["level"] == "critical"]
    assert len(refusal) == 1, daemon.log()
    assert "refusing to start: clamd is down" in str(refusal[0]["msg"])
    assert dead in str(refusal[0]["msg"])
    assert not any(line["msg"] == "milter listening" for line in lines)


def test_clamd_down_degraded_starts_and_logs_error(tmp_path: Path) -> None:
    base = make_reachable(tmp_path)
    dead = f"tcp:127.0.0.1:{free_port()}"
    with DaemonProcess(base / "d", _config(base / "f.toml", dead, "degraded")) as daemon:
        lines = _lines(daemon.log())
    errors = [line for line in lines if line["level"] == "error"]
    assert any("dependency down at start: clamd" in str(e["msg"]) for e in errors), daemon.log()
    assert "starting degraded" in str(errors[0]["msg"])


def test_test_signatures_are_a_warning_at_every_start(
    tmp_path: Path, clamd_server: ClamdServer
) -> None:
    base = make_reachable(tmp_path)
    cfg = _config(base / "f.toml", clamd_server.address, "refuse")
    for run in range(2):
        with DaemonProcess(base / f"d{run}", cfg) as daemon:
            lines = _lines(daemon.log())
        warnings = [line for line in lines if line["level"] == "warning"]
        assert any("no official signature database" in str(w["msg"]) for w in warnings)


def test_preflight_names_redis_and_model(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "f.toml",
        {
            "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"},
            "pipeline": {"recipient_checks": ["allowlist"], "message_checks": ["classifier"]},
            "classifier": {"models_dir": str(tmp_path / "no-models"), "on_failure": "tempfail"},
        },
    )
    problems = {p.dependency: p for p in preflight(load_settings(cfg, env={}))}
    assert set(problems) == {"redis", "model"}
    assert problems["redis"].fails_closed  # allowlist on_failure = tempfail (default)
    assert "does not answer PING" in problems["redis"].message
    assert problems["model"].fails_closed
