"""Fixtures shared by the integration tests (the rest live in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import start_mosquitto
from tests.e2e.conftest import Cluster
from tests.integration.postgres import postgres_cluster

__all__ = ["cluster", "postgres_cluster"]  # one PostgreSQL server for the whole session, whichever modules use it


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Real processes on a Mosquitto of the test's own (it may be killed and restarted); their logs are printed
    when the test failed."""
    broker = start_mosquitto(tmp_path)
    cluster = Cluster(root=tmp_path, broker=broker)
    failed = request.session.testsfailed
    try:
        yield cluster
    finally:
        cluster.stop_all()
        broker.stop()
        if request.session.testsfailed > failed:
            print(cluster.logs())
