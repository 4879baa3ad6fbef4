"""Workload units with real processes: schedules, progress files, and spark units whose prerequisites are
missing (no Java, no pyspark) — failed with a clear reason while the rest of the node keeps running."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.units import spark as spark_kind
from selfheal.config import SparkConfig, UnitConfig
from selfheal.errors import UnitError
from tests.conftest import eventually
from tests.integration.test_agent_units import SLEEPER, supervising
from tests.workload_data import restored_logging
from workloads import etl

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with restored_logging():
        yield


async def test_a_scheduled_job_completes_and_runs_again_on_its_schedule(tmp_path: Path) -> None:
    job = UnitConfig(name="tick", command=[sys.executable, "-c", "print('tick')"], every=0.5)
    async with supervising(tmp_path, job) as (sup, rec):
        unit = sup.entries["tick"].unit
        await eventually(lambda: unit.report().runs >= 2, timeout=20, what="two completed runs")
        assert all(e.expected and e.exit_code == 0 for e in rec.exited())
        assert len(rec.started()) >= 2
        assert unit.report().restarts == 0  # a scheduled run is not a restart
        await eventually(lambda: unit.state == "completed", timeout=10, what="completed between runs")
        report = sup.reports()[0]
        assert (report.state, report.every, report.exit_code) == ("completed", 0.5, 0)
        assert report.next_run_at is not None
    assert (tmp_path / "logs" / "tick.log").read_text().count("tick\n") >= 2


async def test_a_scheduled_job_that_fails_is_exited_and_not_rerun_by_the_agent(tmp_path: Path) -> None:
    job = UnitConfig(name="broken", command=["sh", "-c", "exit 3"], every=0.2)
    async with supervising(tmp_path, job) as (sup, rec):
        unit = sup.entries["broken"].unit
        await eventually(lambda: unit.state == "exited", timeout=10, what="the failed run")
        await asyncio.sleep(1.0)  # five periods: the agent never retries on its own
        assert len(rec.started()) == 1
        (exited,) = rec.exited()
        assert (exited.exit_code, exited.expected) == (3, False)
        await sup.restart("broken")  # the controller's restart runs it again
        await eventually(lambda: len(rec.exited()) == 2, timeout=10, what="the second failed run")
        assert unit.report().restarts == 1


PROGRESSING = """
import json, os, sys, time
path = os.environ["SELFHEAL_PROGRESS_FILE"]
for done in range(3):
    with open(path + ".tmp", "w") as f:
        json.dump({"done": done, "total": 3, "stage": "working", "updated_at": time.time()}, f)
    os.replace(path + ".tmp", path)
    time.sleep(0.3)
time.sleep(600)
"""


async def test_progress_from_the_units_file_reaches_its_report(tmp_path: Path) -> None:
    # The job finds its progress file through $SELFHEAL_PROGRESS_FILE, which the agent sets.
    job = UnitConfig(name="worker", command=[sys.executable, "-c", PROGRESSING], progress_file="worker.json",
                     stall_after=30.0, start_timeout=60.0)
    async with supervising(tmp_path, job) as (sup, _rec):
        def done() -> float | None:
            progress = sup.reports()[0].progress
            return progress.done if progress is not None else None

        await eventually(lambda: done() == 2, timeout=20, what="progress 2/3")
        report = sup.reports()[0]
        assert report.progress is not None
        assert (report.progress.total, report.progress.stage) == (3, "working")
        assert (report.stall_after, report.start_timeout) == (30.0, 60.0)
        assert report.progress_at is not None
        assert report.progress_at >= report.started_at
        moved = report.progress_at
        await asyncio.sleep(1.2)  # the job sleeps now: progress stays where it was
        assert sup.reports()[0].progress_at == moved
        assert json.loads((tmp_path / "worker.json").read_text())["done"] == 2


async def test_a_unit_without_progress_or_stall_limit_reports_none(tmp_path: Path) -> None:
    async with supervising(tmp_path, UnitConfig(name="plain", command=SLEEPER)) as (sup, _rec):
        report = sup.reports()[0]
        assert (report.progress, report.progress_at, report.stall_after, report.start_timeout, report.every) == (
            None, None, None, None, None)


GATED = """
import json, os, sys, time
path = os.environ["SELFHEAL_PROGRESS_FILE"]
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
with open(path + ".tmp", "w") as f:
    json.dump({"done": 1, "total": 3, "stage": "working", "updated_at": time.time()}, f)
os.replace(path + ".tmp", path)
time.sleep(600)
"""


async def test_a_run_reports_no_progress_time_until_its_first_progress(tmp_path: Path) -> None:
    """What the file holds from the previous run is not this run's progress; the default start limit goes along."""
    gate = tmp_path / "gate"
    (tmp_path / "job.json").write_text(json.dumps({"done": 3, "total": 3, "stage": "done", "updated_at": 1.0}))
    job = UnitConfig(name="job", command=[sys.executable, "-c", GATED, str(gate)], progress_file="job.json",
                     stall_after=30.0)
    async with supervising(tmp_path, job) as (sup, _rec):
        watcher = sup.entries["job"].progress
        assert watcher is not None
        await eventually(lambda: sup.reports()[0].state == "running", timeout=10, what="the run")
        await watcher.poll()  # the watcher has seen the file during this run
        report = sup.reports()[0]
        assert report.progress is not None
        assert report.progress.stage == "done"  # the last run's word, shown as it is
        assert report.progress_at is None  # but not progress of this run
        assert (report.stall_after, report.start_timeout) == (30.0, 600.0)
        gate.touch()
        await eventually(lambda: sup.reports()[0].progress_at is not None, timeout=10, what="the first progress")
        report = sup.reports()[0]
        assert report.progress is not None
        assert report.progress.stage == "working"
        assert report.progress_at is not None
        assert report.progress_at >= report.started_at


def spark_unit(name: str = "etl", **env: str) -> UnitConfig:
    return UnitConfig(name=name, kind="spark", command=[sys.executable, "-m", "workloads.etl", "--help"], env=env,
                      spark=SparkConfig(master="local[1]"))


async def test_without_java_the_spark_unit_fails_to_start_and_the_rest_runs_on(tmp_path: Path) -> None:
    no_java = spark_unit(JAVA_HOME=str(tmp_path / "no-jdk"))
    no_path = spark_unit("etl2", PATH=str(tmp_path / "empty-bin"), JAVA_HOME="")
    async with supervising(tmp_path, no_java, no_path, UnitConfig(name="web", command=SLEEPER)) as (sup, rec):
        reports = {r.name: r for r in sup.reports()}
        assert reports["web"].state == "running"
        for name, detail in (("etl", "has no bin/java"), ("etl2", "no java on PATH")):
            report = reports[name]
            assert (report.state, report.pid, report.kind) == ("failed", None, "spark")
            assert report.error.startswith("Java 17+ not found (")
            assert detail in report.error
        assert [e.unit for e in rec.started()] == ["web"]
        with pytest.raises(UnitError, match="Java 17"):
            await sup.restart("etl")  # the controller's restart fails the same way, and says so
    log = (tmp_path / "logs").glob("etl*.log")
    assert not list(log)  # nothing was started


async def test_an_old_java_is_not_enough(tmp_path: Path) -> None:
    jdk = tmp_path / "jdk8" / "bin"
    jdk.mkdir(parents=True)
    (jdk / "java").write_text('#!/bin/sh\necho \'java version "1.8.0_392"\' >&2\n')
    (jdk / "java").chmod(0o755)
    async with supervising(tmp_path, spark_unit(JAVA_HOME=str(jdk.parent))) as (sup, _rec):
        report = sup.reports()[0]
        assert report.state == "failed"
        assert f"Java 17+ not found ({jdk / 'java'} is Java 8)" in report.error


async def test_without_pyspark_the_spark_unit_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(spark_kind.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyspark" else real(name, *a))
    async with supervising(tmp_path, spark_unit()) as (sup, _rec):
        report = sup.reports()[0]
        assert report.state == "failed"
        assert "pyspark is not installed" in report.error
        assert "`spark` extra" in report.error
        assert "pip install 'selfheal[spark]'" in report.error


def test_the_etl_job_names_the_extra_when_pyspark_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(etl.importlib.util, "find_spec", lambda name, *a: None if name == "pyspark" else real(name, *a))
    code = etl.main(["--landing", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert code == 78
    assert "pyspark is not installed: install selfheal with its `spark` extra" in capsys.readouterr().err


def test_the_etl_job_says_java_17_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    assert etl.main(["--landing", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 78
    assert "Java 17+ not found" in capsys.readouterr().err

