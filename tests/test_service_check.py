"""`filterd check` through the real CLI: broken configs fail naming the key; the shipped
config passes; dependencies are PINGed; `--postfix` reads a main.cf with Postfix's postconf."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers_daemon import ROOT, write_config
from tests.servers import ClamdServer, free_port

pytestmark = pytest.mark.integration


def run_check(*args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "filterd", "check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_shipped_config_passes() -> None:
    code, out = run_check("--config", str(ROOT / "rules" / "filterd.toml"))
    assert code == 0, out
    assert "ok: configuration" in out and "ok: retention schema" in out
    assert "ok: check classifier: built" in out
    assert out.strip().splitlines()[-1].startswith("OK: 0 error(s)")


def test_misspelt_key_and_section_fail_with_suggestions(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text(
        '[clamav]\nadress = "tcp:127.0.0.1:3310"\n[metrcs]\nenabled = true\n'
        '[daemon]\nlog_level = "verbose"\n'
    )
    code, out = run_check("--config", str(cfg), "--no-services")
    assert code == 1, out
    assert f"{cfg}: [clamav] adress: unknown key (did you mean 'address'?)" in out
    assert "unknown section [metrcs] (did you mean 'metrics'?)" in out
    assert "[daemon] log_level:" in out
    assert "FAILED: 3 error(s)" in out


def test_dependencies_are_pinged(tmp_path: Path, clamd_server: ClamdServer, redis_url: str) -> None:
    base = {
        "clamav": {"address": clamd_server.address},
        "redis": {"url": redis_url},
        "pipeline": {"recipient_checks": ["allowlist"], "message_checks": ["antivirus"]},
    }
    code, out = run_check("--config", str(write_config(tmp_path / "ok.toml", base)))
    assert code == 0, out
    assert f"ok: clamd: {clamd_server.address} answers PING" in out
    assert "ok: redis: answers PING" in out
    assert "warning: clamd:" in out and "no official signature database" in out

    dead = f"redis://127.0.0.1:{free_port()}/0"
    broken = write_config(tmp_path / "dead.toml", {**base, "redis": {"url": dead}})
    code, out = run_check("--config", str(broken))
    assert code == 1, out
    assert f"error: redis: {dead} does not answer PING" in out


MASTER_CF = (
    "smtp      inet  n       -       {chroot}       -       -       smtpd\n"
    "  -o smtpd_tls_security_level=none\n"
    "pickup    unix  n       -       y       60      1       pickup\n"
)


def _postfix_dir(tmp_path: Path, main: str, chroot: str | None) -> Path:
    confdir = tmp_path / "postfix"
    confdir.mkdir()
    (confdir / "main.cf").write_text(main)
    if chroot is not None:
        (confdir / "master.cf").write_text(MASTER_CF.format(chroot=chroot))
    return confdir / "main.cf"


def _filterd_cfg(tmp_path: Path, socket: str) -> Path:
    return write_config(tmp_path / "f.toml", {"milter": {"socket": socket}})


def test_postfix_fits_unchrooted_unix_socket(tmp_path: Path) -> None:
    main_cf = _postfix_dir(
        tmp_path,
        "smtpd_milters = unix:/run/filterd/milter.sock\nmilter_default_action = tempfail\n",
        chroot="n",
    )
    cfg = _filterd_cfg(tmp_path, "unix:/run/filterd/milter.sock")
    code, out = run_check(
        "--config", str(cfg), "--no-services", "--postfix", "--main-cf", str(main_cf)
    )
    assert code == 0, out
    assert "smtpd_milters names filterd's socket unix:/run/filterd/milter.sock" in out
    assert "ok: postfix" in out and "milter_protocol = 6" in out


def test_postfix_mismatch_and_default_action_are_reported(tmp_path: Path) -> None:
    main_cf = _postfix_dir(
        tmp_path,
        "smtpd_milters = inet:127.0.0.1:8894\n"
        "milter_default_action = accept\nmilter_protocol = 2\n",
        chroot="n",
    )
    cfg = _filterd_cfg(tmp_path, "unix:/run/filterd/milter.sock")
    code, out = run_check(
        "--config", str(cfg), "--no-services", "--postfix", "--main-cf", str(main_cf)
    )
    assert code == 1, out
    assert "does not name filterd's socket: expected unix:/run/filterd/milter.sock" in out
    assert "warning:" in out and "milter_default_action = accept" in out
    assert "milter_protocol = 2" in out


def test_postfix_chroot_needs_socket_inside_and_relative_name(tmp_path: Path) -> None:
    main = "smtpd_milters = unix:/run/filterd/milter.sock\nqueue_directory = /var/spool/postfix\n"
    main_cf = _postfix_dir(tmp_path, main, chroot="y")
    code, out = run_check(
        "--config",
        str(_filterd_cfg(tmp_path, "unix:/run/filterd/milter.sock")),
        "--no-services",
        "--postfix",
        "--main-cf",
        str(main_cf),
    )
    assert code == 1, out
    assert "smtpd runs chrooted in /var/spool/postfix" in out

    (tmp_path / "f.toml").unlink()
    main_cf.write_text(main.replace("unix:/run/filterd/milter.sock", "unix:/filterd/milter.sock"))
    cfg = _filterd_cfg(tmp_path, "unix:/var/spool/postfix/filterd/milter.sock")
    code, out = run_check(
        "--config", str(cfg), "--no-services", "--postfix", "--main-cf", str(main_cf)
    )
    assert code == 0, out
    assert "unix:/filterd/milter.sock (unix socket inside the chroot" in out


def test_every_broken_list_is_named(tmp_path: Path) -> None:
    site = tmp_path / "site.txt"
    site.write_text("good@example.org\n*@com\n")
    cfg = write_config(
        tmp_path / "f.toml",
        {
            "allowlist": {"site_files": [str(site)]},
            "attachments": {"banned_file": str(tmp_path / "missing.toml")},
        },
    )
    code, out = run_check("--config", str(cfg), "--no-services")
    assert code == 1, out
    assert f"error: check allowlist [allowlist]: {site}:2: com is a public suffix" in out
    assert "error: check attachments [attachments]:" in out and "missing.toml" in out
    assert "ok: check classifier: built" in out


def test_dns_lists_are_asked_for_their_test_entries(tmp_path: Path, rbldnsd: Any) -> None:
    rbl = rbldnsd([("zen.test", "ip4set", ":127.0.0.2:SBL\n127.0.0.2\n")])
    rule = [{"name": "SBL", "match": "127.0.0.2", "weight": 10}]
    cfg = write_config(
        tmp_path / "f.toml",
        {
            "pipeline": {"recipient_checks": ["dnsbl"], "message_checks": []},
            "dnsbl": {
                "nameservers": rbl.nameserver,
                "lists": [
                    {"id": "ZEN", "zone": "zen.test", "rules": rule},
                    {"id": "GONE", "zone": "unserved.test", "rules": rule},
                ],
            },
        },
    )
    code, out = run_check("--config", str(cfg))
    assert code == 0, out  # lists fail open: warnings, not errors
    warnings = [line for line in out.splitlines() if line.startswith("warning: dns lists:")]
    assert len(warnings) == 1 and "GONE (unserved.test)" in warnings[0], out


def test_postfix_submission_leaks_are_reported(tmp_path: Path) -> None:
    """`check --postfix` reads master.cf for the submission service (issue 17)."""
    from filterd.outbound.postfix import installed_version, submission_recipe

    main = "smtpd_milters = unix:/run/filterd/milter.sock\nmilter_default_action = tempfail\n"
    main_cf = _postfix_dir(tmp_path, main, chroot="n")
    master_cf = main_cf.parent / "master.cf"
    master_cf.write_text(
        MASTER_CF.format(chroot="n")
        + "submission inet n       -       n       -       -       smtpd\n"
        + "  -o smtpd_sasl_auth_enable=yes\n"
    )
    cfg = _filterd_cfg(tmp_path, "unix:/run/filterd/milter.sock")
    args = ("--config", str(cfg), "--no-services", "--postfix", "--main-cf", str(main_cf))
    _, out = run_check(*args)
    leaks = [line for line in out.splitlines() if line.startswith("warning: postfix")]
    assert any("submission" in line for line in leaks), out
    # With the printed recipe in place the same check finds nothing to warn about.
    table = main_cf.parent / "filterd_submission_header_checks"
    recipe = submission_recipe(
        installed_version() or (3, 7, 0), chroot="n", header_checks=str(table)
    )
    master_cf.write_text(MASTER_CF.format(chroot="n") + recipe.master_cf())
    for name, text in recipe.files.items():
        Path(name).write_text(text)
    code, out = run_check(*args)
    assert code == 0, out
    assert "ok: postfix" in out and "submission: no client IP leaks on submission" in out, out
