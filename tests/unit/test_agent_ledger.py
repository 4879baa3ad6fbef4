"""The command ledger: each idempotency key at most once, across reopen; bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.ledger import RUNNING, Ledger
from selfheal.errors import StoreError

NOW = 1_700_000_000.0


def test_a_key_is_claimed_once_and_remembered_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path).open(NOW) as ledger:
        assert ledger.claim("k1", "c1", NOW) is None
        again = ledger.claim("k1", "c2", NOW + 1)
        assert again is not None
        assert (again.command_id, again.status) == ("c1", RUNNING)
        ledger.finish("k1", "done", "restarted unit 'web'", NOW + 2)

    with Ledger(path).open(NOW + 3) as reopened:
        entry = reopened.claim("k1", "c3", NOW + 3)
        assert entry is not None
        assert (entry.command_id, entry.status, entry.detail) == ("c1", "done", "restarted unit 'web'")
        assert reopened.claim("k2", "c4", NOW + 3) is None
        assert reopened.count() == 2


def test_a_claim_interrupted_by_a_crash_stays_claimed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    crashed = Ledger(path).open(NOW)
    assert crashed.claim("k1", "c1", NOW) is None
    # No finish, no close: the process died while executing.
    with Ledger(path).open(NOW + 1) as after:
        entry = after.get("k1")
        assert entry is not None
        assert entry.status == RUNNING
    crashed.close()


def test_prune_forgets_old_entries_and_the_oldest_beyond_the_row_cap(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite3", max_age=100.0, max_rows=3).open(NOW) as ledger:
        for i in range(5):
            ledger.claim(f"k{i}", f"c{i}", NOW + i)
        ledger.claim("old", "c-old", NOW - 1000)
        removed = ledger.prune(NOW + 10)
        assert removed == 3
        assert ledger.count() == 3
        assert [ledger.get(f"k{i}") is not None for i in range(5)] == [False, False, True, True, True]


def test_a_closed_ledger_raises_store_error(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3").open(NOW)
    ledger.close()
    with pytest.raises(StoreError):
        ledger.claim("k", "c", NOW)


def test_an_unopenable_ledger_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(StoreError, match="cannot open"):
        Ledger(tmp_path / "dir.sqlite3").open(NOW)
