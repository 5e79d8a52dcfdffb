"""Metrics across worker processes: the supervisor's calls (prepare, worker_exited,
serve_http) with real forked workers, as the pre-forked daemon will make them.

Runs in a fresh interpreter: prometheus_client decides at import time whether it is in
multiprocess mode, and the test process may have imported it already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers_daemon import ROOT, write_config
from tests.servers import free_port

SCRIPT = r"""
import json, os, sys, time, urllib.request, urllib.error
from filterd import metrics
from filterd.settings import load_settings
from filterd.types import Action, Decision, Envelope, Message

settings = load_settings(sys.argv[1], env={})
metrics.prepare(settings)
assert "prometheus_client" not in sys.modules  # nothing imported it before prepare
assert oct(os.stat(os.environ["PROMETHEUS_MULTIPROC_DIR"]).st_mode & 0o777) == "0o700"
assert metrics.build_observer(settings) is None  # the supervisor serves no mail

def worker(go):
    observer = metrics.build_observer(settings)
    msg = Message.from_bytes(b"Subject: x\r\n\r\nhi\r\n", Envelope(mail_from="a@example.net"))
    observer.on_message(msg, Decision(Action.ACCEPT, None, "OK", timings={"total": 0.01}))
    os.read(go, 1)  # wait until told to exit
    os._exit(0)

pipes, pids = [], []
for _ in range(2):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        worker(r)
    pipes.append(w); pids.append(pid)

http = os.fork()
if http == 0:
    metrics.serve_http(settings)
    os._exit(0)

url = "http://" + settings.section("metrics").listen

def get(path):
    try:
        with urllib.request.urlopen(url + path, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""

def value(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None

out = {}
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    status, text = get("/metrics")
    accepted = value(text, 'filterd_messages_total{action="accept",reason="OK"}')
    if value(text, "filterd_workers") == 2 and accepted == 2:
        break
    time.sleep(0.05)
out["workers_live"] = value(text, "filterd_workers")
out["messages_live"] = value(text, 'filterd_messages_total{action="accept",reason="OK"}')
out["health_live"] = get("/health")[0]
for w in pipes:
    os.write(w, b"x")
for pid in pids:
    os.waitpid(pid, 0)
    metrics.worker_exited(pid)
status, text = get("/metrics")
out["workers_after"] = value(text, "filterd_workers")
out["messages_after"] = value(text, 'filterd_messages_total{action="accept",reason="OK"}')
out["health_after"] = json.loads(get("/health")[1])
os.kill(http, 15)
os.waitpid(http, 0)
print(json.dumps(out))
"""


def test_counters_add_up_across_workers_and_dead_workers_leave_live_gauges(
    tmp_path: Path,
) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path / "f.toml",
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "metrics": {"listen": f"127.0.0.1:{port}", "health_interval_seconds": 0.1},
        },
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["workers_live"] == 2
    assert out["messages_live"] == 2  # one message per worker, summed
    assert out["health_live"] == 503  # no dependency sample without a runtime: not healthy
    assert out["workers_after"] is None  # mark_process_dead dropped their live gauges
    assert out["messages_after"] == 2  # counters of dead workers still count
    assert out["health_after"]["problems"] == ["no worker running"]
