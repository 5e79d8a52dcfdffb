"""Issue 15 item 8: a DNS list outage shorter than the breaker period closes again within seconds.

A real rbldnsd is stopped (queries fail at once: ICMP port unreachable), the breaker opens,
rbldnsd comes back on the same port, and a listed client must be caught again within
``breaker_probe_seconds`` plus a little -- not after the full 30 s ``breaker_seconds``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from filterd.checks import dnsbl
from filterd.types import Envelope
from tests.servers import RbldnsdServer

pytestmark = pytest.mark.integration

ZONE = "$SOA 600 ns.test. hostmaster.test. 1 600 600 600 45\n:127.0.0.2:SBL listed\n192.0.2.0/24\n"
LIST = {
    "id": "ZEN",
    "zone": "zen.test",
    "type": "ip",
    "rules": [{"name": "SBL", "match": "127.0.0.2", "weight": 10}],
}


def _codes(check: dnsbl.DnsblCheck, ip: str) -> list[str]:
    return sorted(f.code for f in check.check_recipient(Envelope(client_ip=ip), "a@x.org"))


def test_short_outage_reopens_the_list_within_the_probe_interval(tmp_path: Path) -> None:
    with RbldnsdServer(tmp_path / "rbl", [("zen.test", "ip4set", ZONE)]) as rbl:
        config = dnsbl.Config.model_validate({
            "nameservers": rbl.nameserver, "lists": [LIST], "skip_private": False,
            "query_timeout": 0.3, "budget": 0.6, "breaker_failures": 2,
            "breaker_seconds": 30, "breaker_probe_seconds": 0.5,
        })  # fmt: skip
        check = dnsbl.build(config)
        try:
            assert _codes(check, "192.0.2.10") == ["DNSBL_ZEN_SBL"]
            rbl.stop()
            for ip in ("198.51.100.30", "198.51.100.31", "198.51.100.32"):
                assert _codes(check, ip) == ["DNSBL_UNAVAILABLE"]
            assert check.stats()["resolver_breaker_opened"] == 1
            rbl.start()  # same port: the outage lasted well under breaker_seconds
            back = time.monotonic()
            caught = None
            for n in range(11, 250):
                if time.monotonic() - back > 10:
                    break
                # A fresh listed address each time: no cache can answer for the list.
                if _codes(check, f"192.0.2.{n}") == ["DNSBL_ZEN_SBL"]:
                    caught = time.monotonic() - back
                    break
                time.sleep(0.05)
            assert caught is not None, "list still skipped 10 s after it came back"
            # Well inside breaker_seconds (30 s): the probe reopened it, not the timer.
            assert caught < 5.0, f"listed client passed for {caught:.1f}s after the list returned"
        finally:
            check.close()
