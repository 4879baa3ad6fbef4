"""Unit config for workloads: the spark kind, schedules (``every``), ``progress_file``, ``stall_after`` and
``start_timeout``; and the wire's UnitReport fields they fill, which old messages decode without."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from selfheal import wire
from selfheal.config import DEFAULT_START_TIMEOUT, SparkConfig, UnitConfig, load_config
from selfheal.errors import ConfigError

ETL = '[[agent.units]]\nname = "etl"\nkind = "spark"\ncommand = ["python3", "-m", "workloads.etl"]\n'


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "selfheal.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={})


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def test_a_scheduled_spark_unit_with_progress_and_a_stall_limit(tmp_path: Path) -> None:
    config = load(tmp_path, ETL + 'every = 300.0\nprogress_file = "etl.progress.json"\nstall_after = 120.0\n'
                  '[agent.units.spark]\nmaster = "spark://10.0.0.5:7077"\n'
                  'conf = {"spark.task.maxFailures" = "4"}\n')
    (unit,) = config.agent.units  # type: ignore[attr-defined]
    assert (unit.kind, unit.every, unit.progress_file, unit.stall_after) == ("spark", 300.0, "etl.progress.json", 120.0)
    assert unit.spark == SparkConfig(master="spark://10.0.0.5:7077", conf={"spark.task.maxFailures": "4"})


def test_a_spark_unit_may_submit_an_application_instead_of_running_a_driver(tmp_path: Path) -> None:
    config = load(tmp_path, '[[agent.units]]\nname = "etl"\nkind = "spark"\n'
                  '[agent.units.spark]\napplication = "/opt/jobs/etl.py"\nargs = ["--output", "/srv/out"]\n')
    (unit,) = config.agent.units  # type: ignore[attr-defined]
    assert unit.command == []
    assert unit.spark.application == "/opt/jobs/etl.py"
    assert unit.spark.master == "local[*]"


@pytest.mark.parametrize(("text", "path", "message"), [
    ('[[agent.units]]\nname = "etl"\nkind = "spark"\n', "agent.units[0].command", "either spark.application"),
    (ETL + '[agent.units.spark]\napplication = "/x.py"\n', "agent.units[0].command", "not both"),
    ('[[agent.units]]\nname = "etl"\nkind = "process"\ncommand = ["x"]\n[agent.units.spark]\nmaster = "local"\n',
     "agent.units[0].spark", "only a spark unit"),
    (ETL + '[agent.units.spark]\nmaster = " "\n', "agent.units[0].spark.master", "Spark master URL"),
    (ETL + '[agent.units.spark]\nui_port = 70000\n', "agent.units[0].spark.ui_port", "port"),
    (ETL + "every = 0\n", "agent.units[0].every", "must be > 0"),
    (ETL + 'progress_file = ""\n', "agent.units[0].progress_file", "must be a path"),
    (ETL + 'progress_file = "p.json"\nstall_after = -1\n', "agent.units[0].stall_after", "must be > 0"),
    (ETL + 'progress_file = "p.json"\nstart_timeout = 0\n', "agent.units[0].start_timeout", "must be > 0"),
    ('[[agent.units]]\nname = "job"\ncommand = ["x"]\nstart_timeout = 60\n', "agent.units[0].start_timeout",
     "needs progress_file"),
    (ETL + 'start_timeout = 60\n[agent.units.spark]\nconf = {"spark.ui.enabled" = "false"}\n',
     "agent.units[0].start_timeout", "needs progress_file"),
    ('[[agent.units]]\nname = "job"\ncommand = ["x"]\nstall_after = 60\n', "agent.units[0].stall_after",
     "needs progress_file"),
    (ETL + "every = \"often\"\n", "agent.units[0].every", "Expected `float | null`"),
    (ETL + 'stall_after = 60\n[agent.units.spark]\nconf = {"spark.ui.enabled" = "false"}\n',
     "agent.units[0].stall_after", "needs progress_file"),
])
def test_bad_workload_unit_keys_name_their_path(tmp_path: Path, text: str, path: str, message: str) -> None:
    err = error(tmp_path, text)
    assert err.path == path
    assert message in str(err)


def test_a_spark_unit_may_watch_stalls_without_a_progress_file(tmp_path: Path) -> None:
    (unit,) = load(tmp_path, ETL + "stall_after = 60\n").agent.units  # type: ignore[attr-defined]
    assert unit.stall_after == 60


def test_a_start_timeout_is_in_force_by_default_only_with_a_stall_limit(tmp_path: Path) -> None:
    (explicit,) = load(tmp_path, ETL + "stall_after = 60\nstart_timeout = 90\n").agent.units  # type: ignore[attr-defined]
    assert (explicit.start_timeout, explicit.start_limit) == (90.0, 90.0)
    def limit(stall_after: float | None = None, start_timeout: float | None = None) -> float | None:
        return UnitConfig(name="etl", command=["x"], progress_file="p.json", stall_after=stall_after,
                          start_timeout=start_timeout).start_limit

    assert limit(stall_after=60.0) == DEFAULT_START_TIMEOUT == 600.0  # generous
    assert limit(stall_after=900.0) == 900.0  # never shorter than a quiet step
    assert limit(start_timeout=30.0) == 30.0  # a start limit without stall watching
    assert limit() is None


def test_an_old_unit_report_decodes_with_the_new_fields_at_their_defaults() -> None:
    old = b'{"name": "web", "kind": "process", "state": "running", "pid": 42, "restarts": 1}'
    report = msgspec.json.decode(old, type=wire.UnitReport)
    assert (report.every, report.progress, report.progress_at, report.stall_after, report.start_timeout, report.spark,
            report.error, report.runs, report.next_run_at) == (None, None, None, None, None, None, "", 0, None)


def test_a_new_unit_report_round_trips() -> None:
    report = wire.UnitReport(
        name="etl", kind="spark", state="completed", every=60.0, next_run_at=1000.0, runs=3, stall_after=30.0,
        start_timeout=600.0,
        progress=wire.UnitProgress(done=4, total=4, stage="done", updated_at=990.0), progress_at=990.5,
        spark=wire.SparkStatus(app_id="local-1", jobs_succeeded=5, tasks_total=10, tasks_completed=10, tasks_failed=1),
        error="")
    assert msgspec.json.decode(wire.encode(report), type=wire.UnitReport) == report
