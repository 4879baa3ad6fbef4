"""``bench/ingest.py --controllers 1,2 --postgres`` runs end to end: one, then two real controllers on a
throwaway database of the session's PostgreSQL server, sharing the fleet's buckets.

Behaviour, not speed: a tiny fleet and two short steps; every node must be known to exactly one of the two
controllers (each subscribes only to its buckets' topics), both must have accepted reports, the rate must be
their sum, and the ratio two / one must be in the JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.integration.postgres import Cluster as Postgres

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def test_one_and_two_controllers_on_postgres_report_their_sum_and_ratio(postgres_cluster: Postgres) -> None:
    require_binary("mosquitto", "mosquitto")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--quick", "--json", "--fleets", "20", "--steps", "20,40",
         "--step-seconds", "1.5", "--controllers", "1,2", "--postgres", postgres_cluster.url()],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert "two controllers / one (PostgreSQL)" in done.stdout

    [fleet] = figures["fleets"]
    assert set(fleet["targets"]) == {"pg-1", "pg-2"}
    for name, count in (("pg-1", 1), ("pg-2", 2)):
        statuses = fleet["statuses"][name]
        assert statuses["nodes_known"] == 20, statuses
        assert len(statuses["nodes_known_each"]) == count
        target = fleet["targets"][name]
        assert target["controllers"] == count
        assert len(target["reports_each"]) == count
        assert all(reports > 0 for reports in target["reports_each"]), target["reports_each"]
        assert all(step["accepted"] > 0 for step in target["steps"])
        if figures["signed"]:
            assert not target["rejected"], target["rejected"]
    assert all(known > 0 for known in fleet["statuses"]["pg-2"]["nodes_known_each"])
    assert fleet["ratio_two_to_one"] > 0
