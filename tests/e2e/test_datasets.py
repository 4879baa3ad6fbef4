"""Dataset replicas end to end: real controller and agents on loopback, files changed under them.

Three agents hold a replica each; the controller compares their digests,
localises a divergent replica over the agents' HTTP, and the agent repairs it
from a replica that verifies against the majority. Two agents that disagree
have no authority: an incident for a human, and no repair. A pulling agent
killed with SIGKILL mid-transfer leaves the old file and no temp file; once
restarted, the next attempt repairs the replica.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import eventually_sync
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e

CHUNK = 4096


def dataset_toml(path: Path, *, read_bandwidth: int = 0) -> str:
    return (f'[[agent.datasets]]\nname = "train"\npath = "{path}"\nchunk_size = {CHUNK}\nscan_interval = 1.0\n'
            f"read_bandwidth = {read_bandwidth}\n")


def make_dataset(root: Path, *, big: int = 3 * CHUNK + 100) -> None:
    (root / "shards").mkdir(parents=True)
    for i in range(3):
        (root / "shards" / f"part-{i}.bin").write_bytes(bytes([i + 1]) * (2 * CHUNK + 17))
    (root / "shards" / "big.bin").write_bytes(os.urandom(big))
    (root / "README").write_bytes(b"a replicated training set\n")


def start(cluster: Cluster, nodes: list[str], *, read_bandwidth: dict[str, int] | None = None,
          big: int = 3 * CHUNK + 100) -> dict[str, Path]:
    cluster.write_controller()
    cluster.start("controller", "controller", cluster.root / "controller.toml")
    paths = {}
    for n, node in enumerate(nodes):
        paths[node] = cluster.root / f"data-{node}"
        if n == 0:
            make_dataset(paths[node], big=big)
        else:
            shutil.copytree(paths[nodes[0]], paths[node])
    for node in nodes:
        limit = (read_bandwidth or {}).get(node, 0)
        config = cluster.write_agent(node, dataset_toml(paths[node], read_bandwidth=limit))
        cluster.start(node, "agent", config)
    cluster.wait_ready()
    eventually_sync(lambda: agreement(cluster) == (1.0, 1.0) and len(replicas(cluster)) == len(nodes),
                    timeout=40, what="every replica digested and in agreement")
    return paths


def dataset(cluster: Cluster) -> dict[str, Any] | None:
    items = cluster.get("/api/v1/datasets")["items"]
    return next((d for d in items if d["name"] == "train"), None)


def replicas(cluster: Cluster) -> list[dict[str, Any]]:
    found = dataset(cluster)
    return list(found["replicas"]) if found else []


def agreement(cluster: Cluster) -> tuple[float | None, float | None] | None:
    found = dataset(cluster)
    if found is None:
        return None
    return found["agreement"]["replicas"], found["agreement"]["files"]


def incident(cluster: Cluster, kind: str, node: str | None = None,
             state: str | None = None) -> dict[str, Any] | None:
    for item in cluster.get("/api/v1/incidents")["items"]:
        if item["kind"] == kind and node in (None, item["node"]) and state in (None, item["state"]):
            return dict(item)
    return None


def entries(cluster: Cluster, incident_id: int, kind: str) -> list[dict[str, Any]]:
    return [e["data"] for e in cluster.audit(incident_id) if e["kind"] == kind]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_and_a_deleted_file_are_repaired_from_the_majority(cluster: Cluster) -> None:
    paths = start(cluster, ["node-a", "node-b", "node-c"])
    original = (paths["node-a"] / "shards/part-1.bin").read_bytes()

    flip(paths["node-c"] / "shards/part-1.bin", CHUNK + 3)
    eventually_sync(lambda: incident(cluster, "dataset_divergent", "node-c") is not None, timeout=30,
                    what="the divergent replica detected")
    found = incident(cluster, "dataset_divergent", "node-c")
    assert found is not None
    eventually_sync(lambda: incident(cluster, "dataset_divergent", "node-c", "resolved") is not None, timeout=60,
                    what="the replica repaired and the incident resolved")
    assert (paths["node-c"] / "shards/part-1.bin").read_bytes() == original
    localised = entries(cluster, found["id"], "localised")
    assert localised, "the audit trail records the localisation"
    assert localised[0]["files"] == ["shards/part-1.bin"]
    assert localised[0]["differences"][0]["chunks"] == [1]
    assert localised[0]["source"] in ("node-a", "node-b")
    results = entries(cluster, found["id"], "command_result")
    assert [r["status"] for r in results] == ["done"]
    assert "matches the authority" in results[0]["detail"]
    eventually_sync(lambda: agreement(cluster) == (1.0, 1.0), timeout=20, what="agreement 1.0 again")

    (paths["node-b"] / "README").unlink()
    eventually_sync(lambda: incident(cluster, "dataset_divergent", "node-b", "resolved") is not None, timeout=60,
                    what="the deleted file restored")
    assert (paths["node-b"] / "README").read_bytes() == b"a replicated training set\n"
    eventually_sync(lambda: agreement(cluster) == (1.0, 1.0), timeout=20, what="agreement 1.0 again")

    status = cluster.cli("datasets")
    assert status.returncode == 0, status.stderr
    assert "train" in status.stdout
    assert "100%" in status.stdout
    metrics = cluster.get_text("/metrics")
    assert 'selfheal_dataset_agreement_ratio{dataset="train"} 1.0' in metrics
    assert 'selfheal_dataset_files_agreement_ratio{dataset="train"} 1.0' in metrics


def test_one_against_one_opens_an_incident_and_repairs_nothing(cluster: Cluster) -> None:
    paths = start(cluster, ["node-a", "node-b"])
    flip(paths["node-b"] / "shards/part-0.bin", 10)
    flipped = (paths["node-b"] / "shards/part-0.bin").read_bytes()
    eventually_sync(lambda: incident(cluster, "dataset_no_authority") is not None, timeout=30,
                    what="an incident for a human")
    found = incident(cluster, "dataset_no_authority")
    assert found is not None
    eventually_sync(lambda: any(p["state"] == "escalated" for p in cluster.plans(found["id"])), timeout=20,
                    what="a human paged")
    assert incident(cluster, "dataset_divergent") is None
    assert all(p["action"] == "notify" for p in cluster.plans(found["id"]))
    assert not entries(cluster, found["id"], "command_sent")
    assert (paths["node-b"] / "shards/part-0.bin").read_bytes() == flipped
    view = dataset(cluster)
    assert view is not None
    assert view["authority"]["kind"] == "none"
    assert view["agreement"] == {"replicas": None, "files": None}


def test_a_source_that_changes_mid_transfer_is_not_used(cluster: Cluster) -> None:
    # node-c pulls at 32 KiB/s, so its transfer of the whole 256 KiB file takes about 8 s.
    size = 64 * CHUNK
    paths = start(cluster, ["node-a", "node-b", "node-c"], read_bandwidth={"node-c": 32 * 1024}, big=size)
    original = (paths["node-a"] / "shards/big.bin").read_bytes()
    (paths["node-c"] / "shards/big.bin").write_bytes(os.urandom(size))
    eventually_sync(lambda: incident(cluster, "dataset_divergent", "node-c") is not None, timeout=40,
                    what="the divergent replica detected")
    found = incident(cluster, "dataset_divergent", "node-c")
    assert found is not None
    eventually_sync(lambda: bool(entries(cluster, found["id"], "command_sent")), timeout=30,
                    what="the transfer started")
    source = entries(cluster, found["id"], "localised")[0]["source"]
    # Rewritten while node-c reads from it (its first bytes written prove the transfer under way, whatever the
    # API's latency on a busy machine): the source no longer serves what it verified.
    eventually_sync(lambda: transfer_progress(cluster.procs["node-c"].pid, paths["node-c"] / "shards", "big.bin") > 0,
                    timeout=60, interval=0.02, what="node-c part way through pulling big.bin")
    (paths[source] / "shards/big.bin").unlink()
    (paths[source] / "shards/big.bin").write_bytes(original)
    eventually_sync(lambda: incident(cluster, "dataset_divergent", "node-c", "resolved") is not None, timeout=90,
                    what="the replica repaired from a verified source after all")
    results = entries(cluster, found["id"], "command_result")
    assert results[0]["status"] == "failed", results
    assert "409" in results[0]["detail"] or "not used" in results[0]["detail"]
    assert results[-1]["status"] == "done"
    assert (paths["node-c"] / "shards/big.bin").read_bytes() == original


def transfer_progress(pid: int, folder: Path, final: str) -> int:
    """Bytes the agent ``pid`` has written so far into the file that is to replace ``folder/final``.

    That file is an unnamed (O_TMPFILE) file the process holds open in ``folder`` or, on a filesystem
    without O_TMPFILE, a named temp file beside the target; 0 while there is neither.
    """
    names = {item.name: item for item in os.scandir(folder)}
    written = max((item.stat(follow_symlinks=False).st_size for name, item in names.items()
                   if name != final and name.startswith(f".{final}")), default=0)
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir() if fds.exists() else ():
        try:
            target = str(fd.readlink())
            if target.startswith(f"{folder}/") and target.removeprefix(f"{folder}/") not in names:
                written = max(written, fd.stat().st_size)
        except OSError:
            continue  # closed meanwhile
    return written


def tree_listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_puller_killed_mid_transfer_leaves_the_old_file_and_the_next_attempt_repairs_it(cluster: Cluster) -> None:
    # node-c reads at 64 KiB/s, so pulling the whole 512 KiB file takes several seconds: time to kill it midway.
    size = 128 * CHUNK
    paths = start(cluster, ["node-a", "node-b", "node-c"], read_bandwidth={"node-c": 64 * 1024}, big=size)
    original = (paths["node-a"] / "shards/big.bin").read_bytes()
    corrupted = os.urandom(size)
    (paths["node-c"] / "shards/big.bin").write_bytes(corrupted)
    expected_names = tree_listing(paths["node-a"])
    eventually_sync(lambda: incident(cluster, "dataset_divergent", "node-c") is not None, timeout=90,
                    what="the divergent replica detected")
    found = incident(cluster, "dataset_divergent", "node-c")
    assert found is not None

    puller = cluster.procs["node-c"]
    shards = paths["node-c"] / "shards"
    eventually_sync(lambda: transfer_progress(puller.pid, shards, "big.bin") >= 4 * CHUNK, timeout=120,
                    what="node-c part way through pulling big.bin")
    puller.kill()  # SIGKILL: no cleanup of any kind runs
    puller.wait(10)
    assert entries(cluster, found["id"], "command_result") == [], "killed before it could finish"
    assert (shards / "big.bin").read_bytes() == corrupted, "the old file is left exactly as it was"
    assert tree_listing(paths["node-c"]) == expected_names, "no temp file is left to be taken for data"

    cluster.start("node-c", "agent", cluster.root / "node-c.toml")
    eventually_sync(lambda: any(r["node"] == "node-c" and r["online"] for r in replicas(cluster)), timeout=60,
                    what="node-c back")
    # The command died with the old process: the controller sees the agent's new session, fails that
    # attempt at once (not after the 600 s resync ack timeout) and the engine makes the next one.
    eventually_sync(lambda: incident(cluster, "dataset_divergent", "node-c", "resolved") is not None, timeout=180,
                    what="the replica repaired by the next attempt")
    assert (shards / "big.bin").read_bytes() == original
    assert tree_listing(paths["node-c"]) == expected_names
    eventually_sync(lambda: agreement(cluster) == (1.0, 1.0), timeout=30, what="agreement 1.0 again")
    assert len(entries(cluster, found["id"], "command_lost")) == 1
    results = entries(cluster, found["id"], "command_result")
    assert [r["status"] for r in results] == ["done"]
    assert "matches the authority" in results[0]["detail"]
