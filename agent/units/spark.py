"""Unit kind ``spark``: a Spark application whose driver runs on this node.

Two ways to run one (``[agent.units.spark]``):

- ``application = "/path/job.py"`` (or a ``.jar``): the agent runs
  ``spark-submit --master M --name UNIT --conf k=v ... job.py ARGS`` from the
  pyspark package (or ``spark.home``);
- ``command = ["python", "-m", "workloads.etl", ...]``: the driver program
  runs as it is, and pyspark inside it launches Spark with the agent's
  master and properties, passed as ``PYSPARK_SUBMIT_ARGS``.

Either way the unit is a process unit underneath (own process group, log
file, leftover record, SIGTERM then SIGKILL): stopping it cancels the
application cleanly — the JVM's shutdown hooks stop the SparkContext, which
tells the cluster manager the application ended.

Before each start the unit checks its prerequisites, so that a missing one
is a ``failed`` unit with a reason the controller reports, and the rest of
the node keeps running: a Java 17+ runtime (``JAVA_HOME`` or ``java`` on
PATH; "Java 17+ not found") and Spark itself (the pyspark package, installed
with selfheal's ``spark`` extra, or ``spark.home``).

While a run is alive the unit reads Spark's own status from the driver's
REST API (``http://127.0.0.1:<ui_port>/api/v1``, the Spark UI's port, picked
free at each start unless ``spark.ui_port`` is set): jobs running, succeeded
and failed, and task attempts completed and failed. Failed task attempts
are Spark's business — it retries them up to ``spark.task.maxFailures`` —
so the unit only reports them. Without a progress file, completed tasks out
of all tasks are the unit's progress, which stall detection watches. With
``spark.ui.enabled = "false"`` there is no REST status: the process and its
progress file are what the agent sees.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from agent.units.base import UnitContext
from agent.units.process import ProcessUnit
from selfheal.config import SparkConfig, UnitConfig
from selfheal.errors import UnitError
from selfheal.wire import SparkStatus, UnitProgress, UnitReport

if TYPE_CHECKING:
    import httpx

MIN_JAVA = 17
JAVA_VERSION_TIMEOUT = 15.0
"""Seconds ``java -version`` may take (a cold JVM on a busy host is slow)."""
STATUS_POLL = 1.0
"""Seconds between reads of the driver's REST API while a run is alive."""
STATUS_TIMEOUT = 1.0
NO_PYSPARK = ("pyspark is not installed in the agent's environment: install selfheal with its `spark` extra "
              "(pip install 'selfheal[spark]'), or set spark.home to a Spark installation")


def parse_java_version(text: str) -> int | None:
    """The major version in ``java -version`` output (``1.8.0_392`` is 8, ``17.0.15`` is 17), or None."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:
        return int(match.group(2))
    return major


def find_java(env: dict[str, str]) -> str | None:
    """The ``java`` the unit would run: ``$JAVA_HOME/bin/java``, else ``java`` on the unit's PATH."""
    java_home = env.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        return str(candidate) if os.access(candidate, os.X_OK) else None
    return shutil.which("java", path=env.get("PATH"))


def check_java(env: dict[str, str]) -> str:
    """The java executable if it is Java 17+, else ``UnitError("Java 17+ not found...")`` (blocking)."""
    java = find_java(env)
    hint = "install a Java 17+ runtime (Debian: openjdk-17-jre-headless) or set JAVA_HOME in the unit's env"
    if java is None:
        where = f"JAVA_HOME={env['JAVA_HOME']!r} has no bin/java" if env.get("JAVA_HOME") else "no java on PATH"
        raise UnitError(f"Java {MIN_JAVA}+ not found ({where}): {hint}")
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=JAVA_VERSION_TIMEOUT,
                              env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UnitError(f"Java {MIN_JAVA}+ not found ({java} -version failed: {exc}): {hint}") from None
    version = parse_java_version(done.stderr + done.stdout)
    if version is None or version < MIN_JAVA:
        found = f"Java {version}" if version is not None else "an unknown version"
        raise UnitError(f"Java {MIN_JAVA}+ not found ({java} is {found}): {hint}")
    return java


def find_spark_home(spark: SparkConfig) -> Path:
    """``spark.home``, else the pyspark package of this environment; ``UnitError`` naming the extra if none."""
    if spark.home is not None:
        home = Path(spark.home)
    else:
        spec = importlib.util.find_spec("pyspark")
        if spec is None or spec.origin is None:
            raise UnitError(NO_PYSPARK)
        home = Path(spec.origin).parent
    if not os.access(home / "bin" / "spark-submit", os.X_OK):
        raise UnitError(f"{home}/bin/spark-submit not found: " + NO_PYSPARK)
    return home


def submit_options(name: str, spark: SparkConfig, ui_port: int | None) -> list[str]:
    """``spark-submit`` options for the unit's master, name and properties (the UI port when tracked)."""
    options = ["--master", spark.master, "--name", name]
    conf = dict(spark.conf)
    if ui_port is not None:
        conf["spark.ui.port"] = str(ui_port)
    for key, value in sorted(conf.items()):
        options += ["--conf", f"{key}={value}"]
    return options


def summarize_jobs(app_id: str, jobs: Any, now: float) -> SparkStatus:
    """A ``SparkStatus`` from ``/api/v1/applications/{id}/jobs`` (a list of job objects)."""
    counts = {"RUNNING": 0, "SUCCEEDED": 0, "FAILED": 0}
    total = completed = failed = 0
    for job in jobs if isinstance(jobs, list) else []:
        if not isinstance(job, dict):
            continue
        status = job.get("status")
        if status in counts:
            counts[status] += 1
        total += _int(job.get("numTasks"))
        completed += _int(job.get("numCompletedTasks"))
        failed += _int(job.get("numFailedTasks"))
    return SparkStatus(app_id=app_id, jobs_running=counts["RUNNING"], jobs_succeeded=counts["SUCCEEDED"],
                       jobs_failed=counts["FAILED"], tasks_total=total, tasks_completed=completed,
                       tasks_failed=failed, checked_at=now)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SparkUnit(ProcessUnit):
    """A ``spark`` unit; see the module docstring."""

    kind = "spark"

    def __init__(self, config: UnitConfig, ctx: UnitContext) -> None:
        super().__init__(config, ctx)
        self.spark = config.spark or SparkConfig()
        self.tracked = self.spark.conf.get("spark.ui.enabled", "true").strip().lower() != "false"
        self.status: SparkStatus | None = None
        self._ui_port: int | None = None
        self._closed = asyncio.Event()

    @staticmethod
    def check_config(config: UnitConfig) -> None:
        application = config.spark.application if config.spark is not None else None
        if bool(application) == bool(config.command):
            raise UnitError(f"unit {config.name!r}: a spark unit needs either spark.application or command")

    async def prepare(self) -> tuple[list[str], dict[str, str]]:
        argv, env = await super().prepare()
        home = find_spark_home(self.spark)
        await asyncio.to_thread(check_java, env)
        self._ui_port = (self.spark.ui_port or _free_port()) if self.tracked else None
        self.status = None
        options = submit_options(self.name, self.spark, self._ui_port)
        env["SPARK_HOME"] = str(home)
        # Python workers (and a .py application's driver) run with the agent's interpreter unless told
        # otherwise: it is the environment that has pyspark (and selfheal's workloads).
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        if self.spark.application:
            return [str(home / "bin" / "spark-submit"), *options, self.spark.application, *self.spark.args], env
        env["PYSPARK_SUBMIT_ARGS"] = shlex.join([*options, "pyspark-shell"])
        return argv, env

    async def watch(self) -> None:
        async with asyncio.TaskGroup() as tg:
            if self.tracked:
                tg.create_task(self._track(), name=f"spark-status-{self.name}")
            await super().watch()
            self._closed.set()

    def report(self) -> UnitReport:
        report = super().report()
        status = self.status
        if status is None:
            return report
        progress = None
        if self.config.progress_file is None and status.tasks_total:
            progress = UnitProgress(done=status.tasks_completed, total=status.tasks_total, stage="spark tasks",
                                    updated_at=status.checked_at)
        return msgspec.structs.replace(report, spark=status, progress=progress)

    async def _track(self) -> None:
        import httpx  # noqa: PLC0415 - loaded once a spark run is tracked

        async with httpx.AsyncClient(timeout=STATUS_TIMEOUT) as client:
            while not self._closed.is_set():
                if self.pid is not None and self._ui_port is not None:
                    status = await self._read_status(client, self._ui_port)
                    if status is not None and self.pid is not None:
                        self.status = status
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), STATUS_POLL)

    async def _read_status(self, client: httpx.AsyncClient, port: int) -> SparkStatus | None:
        import httpx  # noqa: PLC0415 - already loaded by _track

        base = f"http://127.0.0.1:{port}/api/v1/applications"
        try:
            apps = (await client.get(base)).raise_for_status().json()
            if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
                return None
            app_id = str(apps[0].get("id", ""))
            jobs = (await client.get(f"{base}/{app_id}/jobs")).raise_for_status().json()
        except (httpx.HTTPError, ValueError):
            return None  # the UI is not up yet, or gone with the run: the process is what we have
        return summarize_jobs(app_id, jobs, self.ctx.clock.wall())
