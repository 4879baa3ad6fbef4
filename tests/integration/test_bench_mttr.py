"""``bench/mttr.py --background-nodes`` runs end to end: Mosquitto, simulated nodes, a real controller and agents.

Behaviour, not speed: a small background and one crash, then the JSON line
must hold the crash figure next to the background's (N, R, what the generator
sent, what the controller accepted), every simulated node's status must have
reached the controller, and none of their signed messages may be refused
(their keys sit in the controller's key_dir next to the real agents').
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_crash_heals_with_a_background_fleet() -> None:
    require_binary("mosquitto", "mosquitto")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "mttr.py"), "-n", "1", "--faults", "crash", "--background-nodes", "40",
         "--background-rate", "20", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=220, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert "background: 40 simulated nodes offering 20 reports/s" in done.stdout  # the human lines came first

    assert set(figures) == {"crash", "background"}
    assert figures["crash"]["n"] == 1
    assert figures["crash"]["median_s"] > 0
    background = figures["background"]
    assert background["nodes"] == 40
    assert background["offered"] == 20
    assert background["statuses"]["published"] == 40
    assert background["statuses"]["received"] >= 40, background["statuses"]
    assert not background["statuses"]["rejected"], background["statuses"]  # signed with keys the controller knows
    assert background["sent"] > 0
    assert background["accepted"] > 0
    assert {"generator_ok", "controller_kept_up", "dropped", "controller_cpu"} <= set(background)
