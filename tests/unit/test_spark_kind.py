"""The spark unit kind's pure parts: Java versions, spark-submit options, Spark's REST job status."""

from __future__ import annotations

import pytest

from agent.units.spark import parse_java_version, submit_options, summarize_jobs
from selfheal.config import SparkConfig
from selfheal.wire import SparkStatus


@pytest.mark.parametrize(("text", "major"), [
    ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment (build 17.0.15+6-Debian-1deb12u1)', 17),
    ('openjdk version "21" 2023-09-19', 21),
    ('java version "1.8.0_392"\nJava(TM) SE Runtime Environment', 8),
    ('openjdk version "11.0.21" 2023-10-17', 11),
    ('Picked up JAVA_TOOL_OPTIONS: -Xmx1g\nopenjdk version "25-ea" 2025-09-16', 25),
    ("bash: java: command not found", None),
    ("", None),
])
def test_parse_java_version(text: str, major: int | None) -> None:
    assert parse_java_version(text) == major


def test_submit_options_carry_master_name_properties_and_the_ui_port() -> None:
    spark = SparkConfig(master="spark://10.0.0.5:7077", conf={"spark.task.maxFailures": "4", "spark.a": "b c"})
    assert submit_options("etl", spark, 4041) == [
        "--master", "spark://10.0.0.5:7077", "--name", "etl",
        "--conf", "spark.a=b c", "--conf", "spark.task.maxFailures=4", "--conf", "spark.ui.port=4041"]
    assert submit_options("etl", SparkConfig(), None) == ["--master", "local[*]", "--name", "etl"]


def test_summarize_jobs_counts_jobs_and_task_attempts() -> None:
    jobs = [
        {"jobId": 2, "status": "RUNNING", "numTasks": 8, "numCompletedTasks": 3, "numFailedTasks": 2},
        {"jobId": 1, "status": "SUCCEEDED", "numTasks": 4, "numCompletedTasks": 4, "numFailedTasks": 1},
        {"jobId": 0, "status": "FAILED", "numTasks": 2, "numCompletedTasks": 0, "numFailedTasks": 8},
        {"jobId": -1, "status": "UNKNOWN", "numTasks": "x", "numCompletedTasks": True},
        "not a job",
    ]
    assert summarize_jobs("app-1", jobs, 5.0) == SparkStatus(
        app_id="app-1", jobs_running=1, jobs_succeeded=1, jobs_failed=1, tasks_total=14, tasks_completed=7,
        tasks_failed=11, checked_at=5.0)
    assert summarize_jobs("app-1", {"error": "x"}, 6.0) == SparkStatus(app_id="app-1", checked_at=6.0)
