"""Spark in tests, kept small: ``local[2]``, no UI unless a test tracks it, two shuffle partitions, little memory.

A missing prerequisite fails the test with what to install (Java: a Debian
package, which ``.ci/run`` installs; pyspark: selfheal's ``spark`` extra, which
``make`` installs), so CI never skips. ``StandaloneCluster`` starts a real
Spark standalone master and worker from the pyspark package on loopback.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

LIGHT_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "2",
    "spark.driver.memory": "512m",
    "spark.executor.memory": "512m",
    "spark.ui.showConsoleProgress": "false",
}


def require_spark() -> Path:
    """The pyspark package directory (SPARK_HOME); fails naming what to install when Java or pyspark is missing."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("java not found: install the Debian package 'openjdk-17-jre-headless' "
                    "(apt-get install -y openjdk-17-jre-headless)")
    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        pytest.fail("pyspark not installed: install selfheal's spark extra (pip install -e '.[dev,spark]')")
    return Path(spec.origin).parent


def spark_env(**extra: str) -> dict[str, str]:
    """The environment for a Spark process in a test: loopback only, the test's own interpreter."""
    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
            "SPARK_DAEMON_MEMORY": "256m", **extra}


def conf_args(conf: dict[str, str] | None = None) -> list[str]:
    args = []
    for key, value in {**LIGHT_CONF, **(conf or {})}.items():
        args += ["--conf", f"{key}={value}"]
    return args


@dataclass
class StandaloneCluster:
    """A Spark standalone master and one worker on loopback, from the pyspark package."""

    home: Path
    logs: Path
    port: int = field(default_factory=free_port)
    ui_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def state(self) -> dict[str, object]:
        return dict(httpx.get(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2).json())

    def start(self, timeout: float = 90.0) -> None:
        env = spark_env(SPARK_HOME=str(self.home), SPARK_WORKER_DIR=str(self.logs / "work"))
        spark_class = str(self.home / "bin" / "spark-class")
        self._spawn("master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(self.port), "--webui-port", str(self.ui_port)], env)
        self._spawn("worker", [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                               "--port", str(free_port()), "--webui-port", str(free_port()), "--cores", "2",
                               "--memory", "1g", self.master_url], env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.state().get("aliveworkers", 0):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("*.log")))
        self.stop()
        pytest.fail(f"the Spark standalone cluster did not come up within {timeout}s:\n{logs}")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))
        log.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
