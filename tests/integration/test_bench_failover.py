"""``bench/failover.py`` runs end to end: three real controllers on a throwaway database of the session's
PostgreSQL server, a real agent, one round of SIGKILL of the bucket's owner and of the unit.

Behaviour, not speed: the round must end with the unit running again, its first command must carry the new
owner's epoch (above the victim's), and the figures must be ordered as time is: lease gained, then the
command, then the agent's result and the unit's start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.integration.postgres import Cluster as Postgres

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def test_one_round_is_remediated_by_the_new_owner(postgres_cluster: Postgres) -> None:
    require_binary("mosquitto", "mosquitto")
    require_binary("mosquitto_sub", "mosquitto-clients")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "failover.py"), "--rounds", "1", "--lease-ttl", "3",
         "--lease-renew", "1", "--postgres", postgres_cluster.url(), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert "first command at the agent" in done.stdout

    [round_] = figures["rounds"]
    assert round_["from_new_owner"], round_
    assert round_["successor"] != "c1"
    assert round_["command_epoch"] > round_["victim_epoch"]
    assert round_["command_step"] == "restart_unit"
    assert 0 < round_["lease_seconds"] <= round_["command_seconds"] <= round_["agent_done_seconds"]
    assert round_["running_seconds"] >= round_["command_seconds"]
    assert figures["all_from_new_owner"]
    assert {"median", "min", "max"} <= set(figures["command_seconds"])
