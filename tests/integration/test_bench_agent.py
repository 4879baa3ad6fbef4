"""``bench/agent.py`` runs end to end: real Mosquitto, a real agent with three units, the psutil anchor.

Behaviour, not speed: a short run must print both subjects' figures, the ratio
and the goals, and end with a JSON line in which both published (so neither
looks cheap by being silent).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {"cpu_percent", "rss_steady_mib", "rss_peak_mib", "uss_mib", "threads", "messages", "message_bytes"}


def test_a_short_run_reports_both_subjects() -> None:
    require_binary("mosquitto", "mosquitto")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "agent.py"), "--seconds", "2.5", "--warmup", "1",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "agent / anchor" in done.stdout
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "agent"
    for subject in ("agent", "anchor"):
        assert set(figures[subject]) == FIGURES
        assert figures[subject]["messages"] >= 1
        assert figures[subject]["rss_peak_mib"] > 0
    assert figures["agent"]["message_bytes"] > 1000
    assert set(figures["goals"]["met"]) == {"rss_peak_mib", "cpu_percent"}
