"""The ETL job on a real Spark standalone cluster (master + worker on loopback, from the pyspark package),
submitted by a ``spark`` unit with ``spark-submit`` and tracked through the driver's REST API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.units.spark import SparkUnit
from selfheal.config import SparkConfig, UnitConfig
from tests.conftest import eventually
from tests.integration.test_agent_units import supervising
from tests.spark_support import StandaloneCluster, require_spark
from tests.workload_data import restored_logging
from workloads import etl, generate
from workloads.manifests import read_etl_manifest, verify_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with restored_logging():
        yield


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[StandaloneCluster]:
    cluster = StandaloneCluster(home=require_spark(), logs=tmp_path / "spark-cluster")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.timeout(420)  # three JVMs: master, worker, driver (+ an executor)
async def test_the_etl_job_runs_unchanged_on_a_standalone_cluster(cluster: StandaloneCluster, tmp_path: Path) -> None:
    landing, output = tmp_path / "landing", tmp_path / "output"
    assert generate.main(["--landing", str(landing), "--batches", "3", "--rows", "200", "--devices", "10"]) == 0
    unit = UnitConfig(
        name="etl", kind="spark", every=3600.0, stop_grace=10.0, progress_file="etl.json",
        env={"SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable},
        spark=SparkConfig(
            master=cluster.master_url, application=str(Path(etl.__file__)),
            args=["--landing", str(landing), "--output", str(output), "--batches-per-commit", "2",
                  "--shuffle-partitions", "2"],
            conf={"spark.driver.memory": "512m", "spark.executor.memory": "512m", "spark.cores.max": "2",
                  "spark.task.maxFailures": "2"}))
    async with supervising(tmp_path, unit) as (sup, rec):
        spark_unit = sup.entries["etl"].unit
        inner = getattr(spark_unit, "inner", None)
        assert isinstance(inner, SparkUnit)
        await eventually(lambda: inner.status is not None and inner.status.tasks_completed > 0, timeout=150,
                         interval=0.5, what="Spark's own status of the running application")
        assert inner.status is not None
        running_report = sup.reports()[0]
        assert running_report.spark is not None
        assert running_report.spark.app_id.startswith("app-")  # a standalone cluster's application id
        apps = cluster.state()
        assert any(a["name"] == "etl" for a in [*apps["activeapps"], *apps["completedapps"]])  # type: ignore[misc]
        await eventually(lambda: spark_unit.state in ("completed", "exited"), timeout=240, interval=0.5,
                         what="the application to finish")
        # The progress file is polled: its last word ("done") reaches the report within one poll.
        await eventually(lambda: (p := sup.reports()[0].progress) is not None and p.stage == "done", timeout=30,
                         interval=0.2, what="the job's final progress")
        report = sup.reports()[0]
        log = (tmp_path / "logs" / "etl.log").read_text(errors="replace")
        assert report.state == "completed", log[-4000:]
        assert report.spark is not None
        assert report.spark.jobs_succeeded >= 2
        assert report.spark.jobs_failed == 0
        assert report.progress is not None
        assert (report.progress.done, report.progress.total, report.progress.stage) == (3, 3, "done")
        assert [e.expected for e in rec.exited()] == [True]  # a finished run: nobody heals it
    manifest = read_etl_manifest(output)
    assert [[b.name for b in c.batches] for c in manifest.commits] == [
        ["batch-000001.csv", "batch-000002.jsonl"], ["batch-000003.csv"]]
    assert sum(c.feature_rows for c in manifest.commits) == 30
    assert verify_files(output, [f for c in manifest.commits for f in c.files]) == []
    completed = cluster.state()["completedapps"]
    assert [a["name"] for a in completed] == ["etl"]  # type: ignore[attr-defined]
