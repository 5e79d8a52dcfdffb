"""The short soak (issue 15): real Postfix, daemon, clamd, Redis and rbldnsd, each SIGKILLed
and SIGSTOPped once while four sessions send mail; every message is accounted for.

``bench/soak.py`` is the harness (the long run in the README uses it too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import soak

pytestmark = pytest.mark.e2e


def test_short_soak_loses_nothing(tmp_path: Path) -> None:
    run = soak.Soak(
        tmp_path, sessions=4, seconds=45, fault_every=2.0, fault_seconds=1.5, pause=0.02
    )
    report = run.run()
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    # Every dependency was hurt both ways.
    faults = summary["faults"]
    assert isinstance(faults, dict)
    # "filterd" is the supervisor (restarted), "worker" its forked workers (replaced by it).
    assert set(faults) == {"clamd", "redis", "dns", "filterd", "worker"}, faults
    for name, numbers in faults.items():
        assert numbers["kills"] >= 1 and numbers["stops"] >= 1, (name, numbers)
        assert numbers["not_recovered"] == 0, (name, numbers)
    sent = summary["sent"]
    assert isinstance(sent, dict) and sent.get("clean", 0) > 20, summary
    assert summary["delivered"] > 0
    assert report.lost == [], summary
    assert report.duplicated == [], summary
    assert report.delivered_after_refusal == [], summary
    assert report.virus_passed == [], summary
