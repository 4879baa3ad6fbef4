"""Which state store a controller opens: ``[store] url`` names a PostgreSQL one, else SQLite as always;
and with it, which nodes the controller acts on (``ownership``).

The composition root (``controller.app``) calls ``open_store`` and hands the result, typed as the
``Store`` protocol, to everything else; nothing downstream knows which store it has.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from controller.ownership import Leased, Ownership, Sole
from controller.store import SqliteStore, Store
from selfheal.config import Config
from selfheal.errors import StoreError

if TYPE_CHECKING:
    from controller.leases import LeaseKeeper

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


async def ownership(config: Config, store: Store) -> tuple[Ownership, LeaseKeeper | None]:
    """SQLite: this is the only controller; it acts on every node under the epoch of this start. PostgreSQL:
    controllers share the fleet by bucket leases (``controller.leases``); the keeper returned must run, and
    the store refuses commands whose epoch is not their bucket's live lease."""
    if not config.store.url:
        return Sole(await store.next_epoch()), None
    from controller.leases import LeaseKeeper  # noqa: PLC0415 - asyncpg is an optional extra
    from controller.pgstore import PostgresStore  # noqa: PLC0415

    if isinstance(store, PostgresStore):
        store.fence_commands = True
    keeper = LeaseKeeper(config.store.url, config.controller.id, ttl=config.controller.lease_ttl,
                         renew_every=config.controller.lease_renew)
    return Leased(keeper), keeper
