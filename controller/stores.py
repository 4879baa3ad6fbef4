"""Which state store a controller opens: ``[store] url`` names a PostgreSQL one, else SQLite as always.

The composition root (``controller.app``) calls ``open_store`` and hands the result, typed as the
``Store`` protocol, to everything else; nothing downstream knows which store it has.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from controller.store import SqliteStore, Store
from selfheal.config import Config
from selfheal.errors import StoreError

SQLITE_NAME = "selfheal.sqlite3"
"""The SQLite store's file under ``controller.state_dir``."""


async def open_store(config: Config, *, on_write_error: Callable[[str], None] | None = None) -> Store:
    """Open the store ``config`` names; ``StoreError`` if it cannot be opened (or its driver is missing)."""
    if not config.store.url:
        return await SqliteStore.open(Path(config.controller.state_dir) / SQLITE_NAME, on_write_error=on_write_error)
    try:
        from controller.pgstore import PostgresStore  # noqa: PLC0415 - asyncpg is an optional extra
    except ImportError as exc:
        raise StoreError(f"[store] url names PostgreSQL, but its driver is not installed ({exc}): "
                         "pip install 'selfheal[postgres]'") from exc
    return await PostgresStore.open(config.store.url, on_write_error=on_write_error)
