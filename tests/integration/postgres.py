"""PostgreSQL for the tests: a cluster of their own, on a free loopback port, and a throwaway database each.

Like Mosquitto (``tests/conftest.py``), the server is started by the tests, never assumed: ``initdb`` and
``pg_ctl`` from the machine's PostgreSQL (Debian's ``postgresql`` package) make a cluster in a temp dir
(trust authentication on 127.0.0.1 only, ``fsync`` off: the tests kill server processes, never the
machine), once per test session. Each test that needs a database gets a new ``selfheal_test_<random>``
one, dropped afterwards. A test that restarts or stops the server starts a cluster of its own.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import free_port

PACKAGE = "postgresql"


def bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (the newest installed version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        pytest.fail(f"PostgreSQL's pg_ctl not found: install the Debian package {PACKAGE!r} "
                    f"(apt-get install -y {PACKAGE})")
    return Path(pg_ctl).resolve().parent


@dataclass
class Cluster:
    """A PostgreSQL server of the tests' own: ``start``, ``stop``, ``restart`` as a crash would."""

    directory: Path
    port: int
    bin: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        runner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*runner, *argv], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            log = self.directory / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr or done.stdout}\n{tail}")

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-l",
                  str(self.directory / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown; ``immediate``: every server process quits at once, as in a crash."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-m", mode, "-w", "-t", "60", "stop")

    @classmethod
    def create(cls) -> Cluster:
        directory = Path(tempfile.mkdtemp(prefix="selfheal-pg-"))
        cluster = cls(directory, free_port(), bindir())
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
        cluster._run(str(cluster.bin / "initdb"), "-D", str(directory / "data"), "-U", "postgres",
                     "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C")
        with (directory / "data" / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {cluster.port}\n"
                       f"unix_socket_directories = '{directory}'\nfsync = off\nfull_page_writes = off\n"
                       "max_connections = 200\n")
        return cluster

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    cluster = Cluster.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """One server for the session's tests; each test takes a database of its own (``throwaway_database``)."""
    with running_cluster() as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def throwaway_database(cluster: Cluster) -> AsyncIterator[str]:
    """A new empty database on ``cluster``, dropped (with whatever is still connected to it) afterwards."""
    name = f"selfheal_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(cluster.url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield cluster.url(name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
