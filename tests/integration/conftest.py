"""Fixtures shared by the integration tests (the rest live in ``tests/conftest.py``)."""

from tests.integration.postgres import postgres_cluster

__all__ = ["postgres_cluster"]  # one PostgreSQL server for the whole session, whichever modules use it
