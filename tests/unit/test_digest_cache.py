"""The digest cache: rows round-trip, stale rows go, the row cap holds, roots keep their generation."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.digests.cache import RACY_NS, DigestCache, Known, Row
from selfheal.errors import StoreError

H = bytes(range(32))


def row(path: str, *, checked_ns: int = 10 * RACY_NS, chunks: int = 2) -> Row:
    return Row(path, 100, RACY_NS, 7, "blake3", 4096, H, bytes(range(32)) * chunks, checked_ns)


def test_rows_round_trip_with_their_chunk_hashes(tmp_path: Path) -> None:
    with DigestCache(tmp_path / "c.sqlite3").open() as cache:
        cache.store("ds", [row("a"), row("b/c", chunks=3)])
        known = cache.known("ds")
        assert set(known) == {"a", "b/c"}
        assert known["a"] == Known(100, RACY_NS, 7, "blake3", 4096, H, 10 * RACY_NS)
        served = cache.chunks("ds", "b/c")
        assert served is not None
        assert served[1] == (H, H, H)
        assert cache.chunks("ds", "nope") is None
        assert cache.known("other") == {}


def test_a_row_is_trusted_only_for_the_same_identity_algorithm_chunk_size_and_when_not_racy() -> None:
    known = Known(100, RACY_NS, 7, "blake3", 4096, H, 2 * RACY_NS)
    assert known.still_valid((100, RACY_NS, 7), "blake3", 4096)
    assert not known.still_valid((101, RACY_NS, 7), "blake3", 4096)
    assert not known.still_valid((100, RACY_NS + 1, 7), "blake3", 4096)
    assert not known.still_valid((100, RACY_NS, 8), "blake3", 4096)  # replaced by another file
    assert not known.still_valid((100, RACY_NS, 7), "sha256", 4096)
    assert not known.still_valid((100, RACY_NS, 7), "blake3", 8192)
    racy = known._replace(checked_ns=RACY_NS + RACY_NS // 2)
    assert not racy.still_valid((100, RACY_NS, 7), "blake3", 4096)


def test_forget_drops_gone_files_and_enforces_the_row_cap(tmp_path: Path) -> None:
    with DigestCache(tmp_path / "c.sqlite3", max_rows=3).open() as cache:
        cache.store("ds", [row(f"f{i}", checked_ns=(10 + i) * RACY_NS) for i in range(5)])
        assert cache.count() == 5
        removed = cache.forget("ds", ["f4"])
        assert removed == 2  # f4 is gone, then the least recently read row beyond the cap (f0)
        assert set(cache.known("ds")) == {"f1", "f2", "f3"}


def test_roots_get_a_generation_that_grows_only_when_the_root_changes_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with DigestCache(path).open() as cache:
        assert cache.dataset("ds") is None
        first = cache.record_root("ds", "blake3:aa", deep_at=50.0)
        assert (first.generation, first.deep_at) == (1, 50.0)
        assert cache.record_root("ds", "blake3:aa", deep_at=None).generation == 1
        changed = cache.record_root("ds", "blake3:bb", deep_at=None)
        assert (changed.generation, changed.deep_at) == (2, 50.0)
    with DigestCache(path).open(["ds"]) as reopened:
        assert reopened.dataset("ds") == changed
        assert reopened.record_root("ds", "blake3:cc", deep_at=60.0).generation == 3


def test_datasets_no_longer_configured_are_forgotten_at_open(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with DigestCache(path).open() as cache:
        cache.store("old", [row("a")])
        cache.store("kept", [row("a")])
        cache.record_root("old", "blake3:aa", deep_at=1.0)
    with DigestCache(path).open(["kept"]) as reopened:
        assert reopened.known("old") == {}
        assert reopened.dataset("old") is None
        assert set(reopened.known("kept")) == {"a"}


def test_a_closed_cache_raises_a_store_error(tmp_path: Path) -> None:
    cache = DigestCache(tmp_path / "c.sqlite3").open()
    cache.close()
    with pytest.raises(StoreError, match="not open"):
        cache.known("ds")
