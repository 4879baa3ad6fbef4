"""The pipeline end to end in a temp dir, each stage its real entry point as a process:
generate → etl (pyspark ``local[2]``) → train → serve answers predictions.

Also the ETL's restart contract: a run with nothing new is a no-op, leftovers
of a killed run (a staging dir, an uncommitted commit dir) are thrown away,
and a new batch becomes exactly one new commit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from selfheal.progress import read_progress
from tests.conftest import eventually_sync, free_port
from tests.spark_support import conf_args, require_spark, spark_env
from workloads.manifests import read_current, read_etl_manifest, verify_files
from workloads.telemetry import FEATURES

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def job(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", f"workloads.{name}", *args], capture_output=True, text=True,
                          timeout=timeout, env=spark_env(), check=False)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


@pytest.mark.timeout(420)  # two Spark runs
def test_generated_data_becomes_a_model_that_answers_predictions(tmp_path: Path) -> None:
    require_spark()
    landing, features, models = tmp_path / "landing", tmp_path / "features", tmp_path / "models"
    job("generate", "--landing", str(landing), "--batches", "5", "--rows", "300", "--devices", "30")
    etl = ["--landing", str(landing), "--output", str(features), "--master", "local[2]", "--batches-per-commit", "3",
           *conf_args()]
    job("etl", *etl, "--progress", str(tmp_path / "etl.json"))
    manifest = read_etl_manifest(features)
    assert [[b.name for b in c.batches] for c in manifest.commits] == [
        ["batch-000001.csv", "batch-000002.jsonl", "batch-000003.csv"], ["batch-000004.jsonl", "batch-000005.csv"]]
    assert sum(c.feature_rows for c in manifest.commits) == 150
    assert all(c.rows_quarantined > 0 and c.duplicates_dropped > 0 and c.missing_filled > 0 for c in manifest.commits)
    assert verify_files(features, [f for c in manifest.commits for f in c.files]) == []
    progress = read_progress(tmp_path / "etl.json")
    assert progress is not None
    assert (progress.done, progress.total, progress.stage) == (5, 5, "done")

    # Nothing new: a no-op that does not even start Spark. Then the leftovers of a killed run, and a new batch.
    job("etl", *etl)
    assert read_etl_manifest(features) == manifest
    (features / "_staging" / "commit-000003.999").mkdir(parents=True)
    (features / "commits" / "commit-000003" / "features").mkdir(parents=True)
    (features / "commits" / "commit-000003" / "features" / "part-0.parquet").write_bytes(b"half")
    job("generate", "--landing", str(landing), "--batches", "1", "--rows", "300", "--devices", "30")
    job("etl", *etl)
    after = read_etl_manifest(features)
    assert after.commits[:2] == manifest.commits
    assert [b.name for b in after.commits[2].batches] == ["batch-000006.jsonl"]
    assert sorted(p.name for p in (features / "commits").iterdir()) == [
        "commit-000001", "commit-000002", "commit-000003"]
    assert not (features / "_staging").exists()
    assert verify_files(features, [f for c in after.commits for f in c.files]) == []
    assert after.root != manifest.root

    job("train", "--features", str(features), "--models", str(models), "--trees", "50", "--min-rows", "20")
    current = read_current(models)
    assert current is not None
    metrics = json.loads((models / current.version / "metrics.json").read_text())
    assert metrics["data_root"] == after.root
    assert metrics["train_rows"] + metrics["test_rows"] == 180

    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "workloads.serve", "--models", str(models), "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        eventually_sync(up, timeout=30, what="the prediction service")
        rows = [dict.fromkeys(FEATURES, 1.0), {**dict.fromkeys(FEATURES, 0.5), "temp_mean": 90.0, "events": 20.0}]
        answer = httpx.post(url + "/predict", json={"instances": rows}, timeout=5).json()
        assert answer["model_version"] == current.version
        assert len(answer["predictions"]) == len(answer["probabilities"]) == 2
        assert all(0.0 <= p <= 1.0 for p in answer["probabilities"])
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(15) == 0
