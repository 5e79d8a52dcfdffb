"""Service files: the systemd unit verifies, `make install` puts unit, user and dirs in place.

`make install DESTDIR=...` stages into a private root (systemd-sysusers and systemd-tmpfiles
honour --root), so the test never touches this machine's users or /run.
"""

from __future__ import annotations

import grp
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def render_unit(prefix: Path, out: Path) -> Path:
    text = (ROOT / "packaging" / "filterd.service").read_text().replace("@PREFIX@", str(prefix))
    out.write_text(text)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # This checkout stands in for PREFIX: its .venv/bin/filterd is what ExecStart runs.
    assert (ROOT / ".venv" / "bin" / "filterd").exists()
    unit = render_unit(ROOT, tmp_path / "filterd.service")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on some parse errors ("ignoring"); any output at all is a finding.
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    text = unit.read_text()
    assert "KillMode=mixed" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_a_broken_unit_is_reported(tmp_path: Path) -> None:
    """The verify test above can fail: a misspelt kill mode shows up in its output."""
    unit = render_unit(ROOT, tmp_path / "filterd.service")
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "kill mode" in done.stderr


def test_make_install_stages_unit_user_dirs_and_config(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    (dest / "etc").mkdir(parents=True)
    # tmpfiles resolves group postfix inside the staged root, as on a Debian with Postfix.
    postfix = grp.getgrnam("postfix")
    (dest / "etc" / "group").write_text(f"postfix:x:{postfix.gr_gid}:\n")
    done = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/opt/filterd"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    unit = (dest / "etc/systemd/system/filterd.service").read_text()
    assert "ExecStart=/opt/filterd/.venv/bin/python -m filterd.supervisor" in unit
    assert "@PREFIX@" not in unit
    assert (dest / "opt/filterd/filterd/supervisor.py").exists()
    assert (dest / "opt/filterd/rules/filterd.toml").exists()
    passwd = (dest / "etc/passwd").read_text().splitlines()
    entry = next(line for line in passwd if line.startswith("filterd:")).split(":")
    assert entry[6] == "/usr/sbin/nologin" and int(entry[2]) != 0
    uid = int(entry[2])
    run = (dest / "run/filterd").stat()
    assert stat.S_IMODE(run.st_mode) == 0o750
    assert (run.st_uid, run.st_gid) == (uid, postfix.gr_gid)
    state = (dest / "var/lib/filterd").stat()
    assert stat.S_IMODE(state.st_mode) == 0o700 and state.st_uid == uid
    config = (dest / "etc/filterd/filterd.toml").read_text()
    assert 'state_dir = "/var/lib/filterd"' in config
    assert 'pidfile = "/run/filterd/filterd.pid"' in config
    assert stat.S_IMODE((dest / "etc/filterd/filterd.toml").stat().st_mode) == 0o640
    wrapper = (dest / "usr/local/sbin/filterd").read_text()
    assert "/opt/filterd/.venv/bin/filterd" in wrapper
