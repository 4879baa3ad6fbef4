"""``bench/soak.py`` runs end to end: Mosquitto, simulated nodes with faults, a real controller and a real agent.

Behaviour, not speed: a small fleet for half a minute, then the JSON line must
hold every figure the issue asks for — samples of the controller (RSS, fds,
threads, asyncio tasks from its ``/metrics``) and of the agent (RSS, fds,
threads, asyncio tasks from its own ``/metrics``), a slope and a verdict per series, the faults injected, the SIGKILLs
on the real agent's units and the remediations the controller finished, and
the load check (sent against accepted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
SERIES = {"controller": {"rss_mb", "fds", "threads", "tasks"}, "agent": {"rss_mb", "fds", "threads", "tasks"}}
TREND_KEYS = {"samples", "tolerance_per_h", "slope_per_h", "se_per_h", "verdict", "late_slope_per_h"}


@pytest.mark.timeout(180)
def test_a_short_soak_samples_both_processes_and_judges_each_series() -> None:
    require_binary("mosquitto", "mosquitto")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.5", "--nodes", "50", "--rate", "25",
         "--sample-seconds", "2", "--fault-rate", "30", "--kill-every", "8", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert "goal (no growth after warm-up):" in done.stdout  # the human summary came first

    assert {"settings", "samples", "trends", "load", "faults", "remediations", "verdict", "state_fill_s"} <= set(
        figures)
    assert figures["statuses"]["received"] >= 50, figures["statuses"]
    samples = figures["samples"]
    assert len(samples) >= 5
    for row in samples:
        for proc in ("controller", "agent"):
            assert row[proc]["rss_mb"] > 0, row
            assert row[proc]["fds"] > 0, row
            assert row[proc]["threads"] >= 1, row
            assert 0 < row[proc]["anon_mb"] <= row[proc]["rss_mb"], row
        assert row["controller"]["tasks"] > 0  # selfheal_asyncio_tasks on the controller's /metrics
        assert row["agent"]["tasks"] > 0  # selfheal_agent_asyncio_tasks on the agent's /metrics
    for proc, series in SERIES.items():
        assert set(figures["trends"][proc]) == series
        for name, trend in figures["trends"][proc].items():
            assert set(trend) >= TREND_KEYS, (proc, name)
            assert trend["verdict"] in {"flat", "GROWS", "noisy"}, (proc, name, trend)
    assert set(figures["anon"]) == set(SERIES)
    assert all(anon["slope_mb_per_h"] is not None for anon in figures["anon"].values()), figures["anon"]
    assert figures["load"]["sent_per_s"] > 0
    assert figures["load"]["accepted_per_s"] > 0
    assert {"generator_ok", "controller_kept_up"} <= set(figures["load"])

    faults = figures["faults"]
    assert sum(faults["ordered"].values()) >= 1
    assert sum(v for k, v in faults["simulated"].items() if k.endswith(".applied")) >= 1
    assert faults["real_kills"]["sent"] >= 1
    assert not figures["rejected"], figures["rejected"]  # every simulated node signs with its own key
