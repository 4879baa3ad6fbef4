"""``bench/ingest.py`` runs end to end: real Mosquitto, publisher processes, both anchors, a real controller.

Behaviour, not speed: a tiny fleet and two short steps, then the JSON line must
hold every figure the issue asks for, every retained status must have reached
the controller, and the controller must have accepted reports (signed ones,
when this selfheal signs node traffic: none refused).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
STEP_KEYS = {"offered", "achieved", "accepted", "cpu", "rss_mb", "backlog_start", "backlog_end", "broker_cpu",
             "generator_cpu", "generator_ok", "kept_up"}
TARGET_KEYS = {"steps", "ceiling", "kept_up_at", "limit", "fell_behind", "sent"}


def test_quick_run_reports_every_figure() -> None:
    require_binary("mosquitto", "mosquitto")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--quick", "--json", "--fleets", "20", "--steps", "20,40",
         "--step-seconds", "1.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert "controller / decode anchor" in done.stdout  # the human table came first

    assert {"bench", "signed", "report_bytes", "settings", "fleets"} <= set(figures)
    assert 1500 < figures["report_bytes"] < 4096
    [fleet] = figures["fleets"]
    assert fleet["nodes"] == 20
    assert fleet["statuses"]["published"] == 20
    assert fleet["statuses"]["received"] == 20, fleet["statuses"]
    assert fleet["statuses"]["nodes_known"] == 20
    assert set(fleet["targets"]) == {"count", "decode", "controller"}
    for name, target in fleet["targets"].items():
        assert set(target) >= TARGET_KEYS, name
        assert len(target["steps"]) >= 1, name
        for step in target["steps"]:
            assert set(step) >= STEP_KEYS, (name, step)
        assert target["ceiling"] > 0, (name, target)
    assert "ratio_controller_to_decode" in fleet

    controller = fleet["targets"]["controller"]
    assert controller["received_by_channel"].get("report", 0) > 0
    assert all(step["accepted"] > 0 for step in controller["steps"])
    assert {"p99_ms", "requests", "errors"} <= set(controller["steps"][0]["api"])
    assert controller["steps"][0]["api"]["requests"] > 0
    if figures["signed"]:
        assert not controller["rejected"], controller["rejected"]  # every simulated node signs with its own key
