"""Outbound pieces without a daemon: direction, header stripping, the Postfix recipe and its
check (the header_checks table is run by Postfix's own postmap), the outbound pipeline."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from filterd.outbound.config import Config
from filterd.outbound.direction import INBOUND, OUTBOUND, prepare
from filterd.outbound.headers import headers_to_remove
from filterd.outbound.postfix import (
    HEADER_CHECKS,
    parse_version,
    submission_leaks,
    submission_recipe,
)
from filterd.types import Envelope

NAMES = Config().strip_headers


# ---- direction -------------------------------------------------------------------------


def test_authenticated_is_outbound_and_loses_the_client_ip() -> None:
    env = Envelope(client_ip="192.0.2.77", client_name="dsl.example.com", auth_user="a@example.org")
    out = prepare(env, Config())
    assert out.direction == OUTBOUND
    assert out.client_ip is None and out.client_name is None and out.auth_user == "a@example.org"


def test_service_by_daemon_name_is_outbound_but_keeps_the_ip() -> None:
    env = Envelope(client_ip="10.1.2.3", daemon_name="webmail")
    assert prepare(env, Config()).direction == INBOUND
    out = prepare(env, Config(services=["webmail"]))
    assert out.direction == OUTBOUND and out.client_ip == "10.1.2.3"  # limited per IP if set


def test_unauthenticated_mail_and_disabled_outbound_are_inbound() -> None:
    assert prepare(Envelope(client_ip="192.0.2.1"), Config()).direction == INBOUND
    env = Envelope(client_ip="192.0.2.1", auth_user="a@example.org")
    assert prepare(env, Config(enabled=False)) == env
    assert prepare(env, Config(authenticated=False)).direction == INBOUND


# ---- header stripping ------------------------------------------------------------------


def _block(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_named_headers_and_trace_headers_with_the_ip_are_removed() -> None:
    block = _block(
        "From: Alice <alice@example.org>",
        "Subject: meet me at 192.0.2.77",  # the user's own words stay
        "X-Originating-IP: [192.0.2.77]",
        "x-forwarded-for: 10.0.0.1, 192.0.2.77",
        "X-Mailer: ExampleWebmail (client 192.0.2.77)",
        "Received: from [192.0.2.77] by webmail.example.org with HTTP;",
        "\tTue, 1 Dec 2026 22:00:00 +0000",
        "Received: from [203.0.113.5] by relay.example.org",
        "User-Agent: Mutt/2.2",
        "X-Originating-IP: [203.0.113.200]",  # named: removed whatever the address
    )
    doomed = headers_to_remove(block, "192.0.2.77", None, NAMES)
    assert doomed == [
        ("Received", 1),
        ("x-forwarded-for", 1),
        ("X-Mailer", 1),
        ("X-Originating-IP", 2),  # highest index first: deleting it shifts no other
        ("X-Originating-IP", 1),
    ]


def test_other_ip_notations_and_the_host_name_are_found() -> None:
    block = _block(
        "X-Trace: via ::ffff:192.0.2.77",
        "X-Web-Client: 2001:db8:0:0::7",
        "X-Host: DSL-77.Example.COM",
        "X-Other: 192.0.2.7",
    )
    v4 = headers_to_remove(block, "192.0.2.77", "dsl-77.example.com", [])
    assert [n for n, _ in v4] == ["X-Host", "X-Trace"]
    v6 = headers_to_remove(block, "2001:db8::7", None, [])
    assert [n for n, _ in v6] == ["X-Web-Client"]


def test_nothing_to_remove_and_garbage_headers() -> None:
    assert (
        headers_to_remove(_block("From: a@example.org", "Subject: hi"), "192.0.2.1", None, NAMES)
        == []
    )
    assert headers_to_remove(b"\xff\xfe: \x00\r\n\r\n", "192.0.2.1", None, NAMES) == []


# ---- Postfix recipe --------------------------------------------------------------------


def test_recipe_for_3_7_uses_a_submission_only_cleanup_with_header_checks() -> None:
    recipe = submission_recipe(parse_version("3.7.11"))
    master = recipe.master_cf()
    assert "submission inet n - y - - smtpd" in master
    assert "-o cleanup_service_name=filterd_subcleanup" in master
    assert "filterd_subcleanup unix n - y - 0 cleanup" in master
    assert "-o header_checks=regexp:/etc/postfix/filterd_submission_header_checks" in master
    assert "-o milter_macro_daemon_name=submission" in master
    assert "smtpd_hide_client_session" not in master
    assert recipe.files == {"/etc/postfix/filterd_submission_header_checks": HEADER_CHECKS}
    commands = recipe.render("postconf")
    assert "postconf -M 'submission/inet=submission inet n - y - - smtpd'" in commands
    assert "postconf -P 'submission/inet/cleanup_service_name=filterd_subcleanup'" in commands


def test_recipe_for_3_10_hides_the_client_session() -> None:
    recipe = submission_recipe(parse_version("3.10.0"))
    assert "-o smtpd_hide_client_session=yes" in recipe.master_cf()
    assert "cleanup" not in recipe.master_cf() and not recipe.files


def test_cli_prints_the_recipe() -> None:
    from filterd.cli import main

    out = CliRunner().invoke(
        main, ["postfix-config", "--submission", "--postfix-version", "3.7.11"]
    )
    assert out.exit_code == 0, out.output
    assert "cleanup_service_name=filterd_subcleanup" in out.output
    assert "REPLACE Received: $1" in out.output


RECEIVED = (
    "Received: from pc.example.net (unknown [192.0.2.77])\n"
    "\tby mx.example.org (Postfix) with {proto} id 4Qx1\n"
    "\tfor <bob@example.net>; Tue,  1 Dec 2026 22:00:00 +0000 (UTC)\n"
)


@pytest.mark.skipif(shutil.which("postmap") is None, reason="needs Postfix's postmap")
@pytest.mark.parametrize("proto", ["ESMTPA", "ESMTPSA", "ESMTP", "ESMTPS"])
def test_header_checks_table_run_by_postfix(tmp_path: Path, proto: str) -> None:
    """Postfix's own regexp engine decides (postmap -h reads headers like cleanup does)."""
    table = tmp_path / "hc"
    table.write_text(HEADER_CHECKS)
    message = RECEIVED.format(proto=proto) + "Subject: x\n\nbody\n"
    out = subprocess.run(
        ["postmap", "-h", "-q", "-", f"regexp:{table}"],
        input=message, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proto.endswith("A"):  # authenticated submission: replaced, the client is gone
        key, _, result = out.stdout.partition("\tREPLACE ")
        assert key.startswith("Received: from pc.example.net")
        assert result.startswith("Received: by mx.example.org (Postfix) with " + proto)
        assert "192.0.2.77" not in result and "pc.example.net" not in result
        assert "for <bob@example.net>" in result
    else:  # inbound mail keeps its Received: line
        assert out.stdout == ""


def test_submission_leaks(tmp_path: Path) -> None:
    table = tmp_path / "hc"
    table.write_text(HEADER_CHECKS)
    good = submission_recipe((3, 7, 11), header_checks=str(table)).master_cf()
    main_cf = "smtpd_milters = unix:/run/filterd/milter.sock\n"
    assert submission_leaks(main_cf, good, (3, 7, 11)) == []
    bare = "submission inet n - y - - smtpd\n  -o smtpd_sasl_auth_enable=yes\n"
    warnings = submission_leaks(main_cf, bare, (3, 7, 11))
    assert len(warnings) == 1 and "keeps the client IP" in warnings[0]
    assert "smtpd_hide_client_session" in submission_leaks(main_cf, bare, (3, 10, 0))[0]
    hidden = bare + "  -o smtpd_hide_client_session=yes\n"
    assert submission_leaks(main_cf, hidden, (3, 10, 0)) == []
    table.write_text("/^Received:.*with ESMTPSA/ IGNORE\n")  # misses plain-text ESMTPA
    assert "ESMTPA and ESMTPSA" in submission_leaks(main_cf, good, (3, 7, 11))[0]
    assert "no smtpd_milters" in submission_leaks("", good, (3, 7, 11))[0]
    assert "no submission service" in submission_leaks(main_cf, "", (3, 7, 11))[0]
    (tmp_path / "main.cf").write_text(main_cf)
    (tmp_path / "master.cf").write_text(hidden)
    for main_path, master_path in (
        (tmp_path / "main.cf", tmp_path / "master.cf"),
        (str(tmp_path / "main.cf"), str(tmp_path / "master.cf")),
    ):
        assert submission_leaks(main_path, master_path, (3, 10, 0)) == []
        assert submission_leaks(main_path, master_path, (3, 9, 0))  # no hide_client_session
