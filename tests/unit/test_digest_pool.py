"""The scan's hashing pool: large files hashed by worker threads give exactly the one-thread tree.

``INLINE_MAX`` is lowered so that small test files go to the pool, and
``MAX_OPEN`` so that most of them wait their turn (kept by the walker and
opened again beneath the root when the pool has room).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.digests import pool, reading, trees
from agent.digests.cache import DigestCache
from agent.digests.hashing import DEFAULT, SHA256, Algorithm
from agent.digests.reading import RESYNC_TEMP_SUFFIX
from agent.digests.throttle import Throttle
from agent.digests.trees import ScanOutcome, scan_dataset

CHUNK = 4096
OLD = 1_600_000_000 * 10**9


@pytest.fixture(autouse=True)
def small_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trees, "INLINE_MAX", 3 * CHUNK)
    monkeypatch.setattr(pool, "MAX_OPEN", 2)
    monkeypatch.setattr(pool, "SPAN_BYTES", 2 * CHUNK)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[DigestCache]:
    with DigestCache(tmp_path / "state" / "digests.sqlite3").open() as opened:
        yield opened


def write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(OLD, OLD))
    return path


def make_tree(root: Path) -> Path:
    for i in range(6):  # large: 2 to 9 chunks each, cut into spans of 2 chunks, the last ones short
        write(root, f"big/part-{i}.bin", os.urandom(CHUNK * (2 + i) + 17 * i))
    write(root, "big/exact.bin", os.urandom(8 * CHUNK))
    for i in range(20):
        write(root, f"small/{i:02d}.txt", os.urandom(i * 300))
    write(root, "mixed/z-large.bin", os.urandom(5 * CHUNK))
    write(root, "mixed/a-small.txt", b"small")
    return root


def scan(root: Path, cache: DigestCache, *, name: str, workers: int, alg: Algorithm = DEFAULT,
         **kwargs: object) -> ScanOutcome:
    return scan_dataset(str(root), name=name, cache=cache, alg=alg, chunk_size=CHUNK, workers=workers,
                        **kwargs)  # type: ignore[arg-type]


class _Hook(Throttle):
    """Runs ``action`` at the first read (from whichever thread reads first), then lets everything through."""

    def __init__(self, action: Callable[[], object], rate: int = 0) -> None:
        super().__init__(rate)
        self.action: Callable[[], object] | None = action
        self.lock = threading.Lock()

    def consume(self, nbytes: int, abort: threading.Event | None = None) -> bool:
        with self.lock:
            action, self.action = self.action, None
        if action is not None:
            action()
        return super().consume(nbytes, abort)


@pytest.mark.parametrize("alg", [DEFAULT, SHA256], ids=lambda a: a.name)
def test_the_pool_builds_exactly_the_tree_one_thread_builds(tmp_path: Path, cache: DigestCache,
                                                           alg: Algorithm) -> None:
    root = make_tree(tmp_path / "ds")
    alone = scan(root, cache, name="alone", workers=0, alg=alg)
    pooled = scan(root, cache, name="pooled", workers=2, alg=alg)
    assert alone.tree is not None
    assert pooled.tree is not None
    assert pooled.tree.root == alone.tree.root
    assert pooled.tree.dirs == alone.tree.dirs
    assert pooled.tree.files == alone.tree.files
    assert (pooled.stats.files_read, pooled.stats.bytes_read) == (alone.stats.files_read, alone.stats.bytes_read)
    for path in alone.tree.files:
        pooled_row, alone_row = cache.chunks("pooled", path), cache.chunks("alone", path)
        assert pooled_row is not None
        assert alone_row is not None
        assert pooled_row[0]._replace(checked_ns=0) == alone_row[0]._replace(checked_ns=0)
        assert pooled_row[1] == alone_row[1]
    again = scan(root, cache, name="pooled", workers=2, alg=alg)
    assert (again.stats.files_read, again.stats.files_reused) == (0, alone.stats.files_read)
    deep = scan(root, cache, name="pooled", workers=2, alg=alg, deep=True)
    assert deep.tree is not None
    assert (deep.tree.root, deep.stats.files_read, deep.stats.rot) == (alone.tree.root, alone.stats.files_read, [])


def test_a_large_file_growing_while_a_worker_reads_it_makes_the_dataset_settling(tmp_path: Path,
                                                                                  cache: DigestCache) -> None:
    root = tmp_path / "ds"
    victim = write(root, "only.bin", os.urandom(6 * CHUNK))

    def append() -> None:
        with victim.open("ab") as stream:
            stream.write(b"more")

    outcome = scan(root, cache, name="ds", workers=2, throttle=_Hook(append))
    assert (outcome.state, outcome.tree) == ("settling", None)
    assert outcome.error == "changed while being read: only.bin"
    assert scan(root, cache, name="ds", workers=2).state == "ok"


def _before_reopening(monkeypatch: pytest.MonkeyPatch, rel: str, action: Callable[[], object]) -> None:
    """Run ``action`` just before the walker opens ``rel`` again to hand it over (it had no room before).

    The pool says it has no room until the walk has met ``rel``, so ``rel`` is always kept for later and
    opened again, whatever the timing (on an idle machine the workers could otherwise keep up)."""
    real_open, real_file, real_has_room = reading.open_beneath, trees._Walk.file, pool.HashPool.has_room
    met: list[str] = []

    def open_beneath(root: str, parts: tuple[str, ...], *, directory: bool = False) -> int:
        if "/".join(parts) == rel:
            action()
        return real_open(root, parts, directory=directory)

    def file(self: trees._Walk, fd: int, name: str, path: str, st: os.stat_result) -> object:
        found = real_file(self, fd, name, path, st)
        met.extend([path] if path == rel else [])
        return found

    def has_room(self: pool.HashPool) -> bool:
        return bool(met) and real_has_room(self)

    monkeypatch.setattr(trees, "open_beneath", open_beneath)
    monkeypatch.setattr(trees._Walk, "file", file)
    monkeypatch.setattr(pool.HashPool, "has_room", has_room)


def test_a_large_file_gone_before_the_pool_had_room_makes_the_dataset_settling(
        tmp_path: Path, cache: DigestCache, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "ds")
    _before_reopening(monkeypatch, "big/part-5.bin", (root / "big/part-5.bin").unlink)
    outcome = scan(root, cache, name="ds", workers=2)
    assert outcome.state == "settling"
    assert outcome.error == "changed while being read: big/part-5.bin"


def test_a_large_file_replaced_by_a_symlink_before_its_turn_is_never_followed(
        tmp_path: Path, cache: DigestCache, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "ds")
    secret = write(tmp_path, "outside/secret", os.urandom(6 * CHUNK))

    def swap() -> None:
        (root / "big/part-5.bin").unlink()
        (root / "big/part-5.bin").symlink_to(secret)

    _before_reopening(monkeypatch, "big/part-5.bin", swap)
    outcome = scan(root, cache, name="ds", workers=2)
    assert outcome.state == "settling"
    assert outcome.error == "changed while being read: big/part-5.bin"
    assert outcome.stats.bytes_read < sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_an_abort_stops_workers_even_in_a_throttle_wait(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")
    abort = threading.Event()
    timer = threading.Timer(0.3, abort.set)
    timer.start()
    began = time.monotonic()
    try:
        outcome = scan(root, cache, name="ds", workers=2, throttle=Throttle(CHUNK), abort=abort)  # ~40 s of reads
    finally:
        timer.cancel()
    assert outcome.state == "settling"
    assert time.monotonic() - began < 10
    assert [t for t in threading.enumerate() if t.name.startswith("digest-hash")] == []


def test_resync_temp_files_are_never_digested(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")
    before = scan(root, cache, name="ds", workers=2)
    write(root, f"big/.part-1.bin{RESYNC_TEMP_SUFFIX}", b"half a file")
    write(root, f".top{RESYNC_TEMP_SUFFIX}", os.urandom(9 * CHUNK))
    after = scan(root, cache, name="ds", workers=2)
    assert before.tree is not None
    assert after.tree is not None
    assert after.tree.root == before.tree.root
    assert not any(RESYNC_TEMP_SUFFIX in path for path in after.tree.files)
