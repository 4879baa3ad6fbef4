"""Tree building: deterministic roots, what changes them, incremental and deep scans, settling, selection."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.digests.cache import DigestCache
from agent.digests.hashing import BLAKE3, DEFAULT, SHA256, Algorithm, parse_digest
from agent.digests.selection import Selection, compile_glob
from agent.digests.throttle import Throttle
from agent.digests.trees import ScanOutcome, scan_dataset

CHUNK = 4096
OLD = 1_600_000_000 * 10**9  # an mtime long past: not "racily clean"


def write(root: Path, rel: str, data: bytes, *, mode: int = 0o644, old: bool = True, later: int = 0) -> Path:
    """Write a file; ``old``: with an mtime long past (plus ``later`` seconds, to tell edits apart)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    if old:
        os.utime(path, ns=(OLD, OLD + later * 10**9))
    return path


def make_tree(root: Path) -> Path:
    write(root, "a.txt", b"alpha\n")
    write(root, "models/weights.bin", bytes(range(256)) * 40)  # 10240 bytes: three chunks
    write(root, "models/config.json", b'{"layers": 3}')
    write(root, "empty.dat", b"")
    (root / "emptydir").mkdir()
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[DigestCache]:
    with DigestCache(tmp_path / "state" / "digests.sqlite3").open() as opened:
        yield opened


def scan(root: Path, cache: DigestCache, *, name: str = "ds", alg: Algorithm = DEFAULT, **kwargs: object
         ) -> ScanOutcome:
    return scan_dataset(str(root), name=name, cache=cache, alg=alg, chunk_size=CHUNK, **kwargs)  # type: ignore[arg-type]


def root_of(outcome: ScanOutcome) -> str:
    assert outcome.state == "ok", outcome.error
    assert outcome.tree is not None
    return outcome.tree.root_digest


def test_identical_trees_have_the_same_root_and_a_rescan_keeps_it(tmp_path: Path, cache: DigestCache) -> None:
    first = scan(make_tree(tmp_path / "one"), cache, name="one")
    second = scan(make_tree(tmp_path / "two"), cache, name="two")
    assert root_of(first) == root_of(second)
    assert root_of(scan(tmp_path / "one", cache, name="one")) == root_of(first)
    tree = first.tree
    assert tree is not None
    assert (tree.file_count, tree.byte_count) == (4, 6 + 10240 + 13)
    assert parse_digest(tree.root_digest)[0] == DEFAULT.name
    assert [e.name for e in tree.dirs[""]] == ["a.txt", "empty.dat", "emptydir", "models"]
    assert tree.dirs["emptydir"] == ()


@pytest.mark.parametrize("edit", ["content", "mode", "rename", "new_file", "delete", "new_empty_dir"])
def test_every_kind_of_edit_changes_the_root(tmp_path: Path, cache: DigestCache, edit: str) -> None:
    root = make_tree(tmp_path / "ds")
    before = scan(root, cache)
    weights = root / "models/weights.bin"
    if edit == "content":
        data = bytearray(weights.read_bytes())
        data[5000] ^= 1
        write(root, "models/weights.bin", bytes(data), later=1)
    elif edit == "mode":
        weights.chmod(0o600)
    elif edit == "rename":
        weights.rename(root / "models/weights2.bin")
    elif edit == "new_file":
        write(root, "models/extra", b"x")
    elif edit == "delete":
        weights.unlink()
    else:
        (root / "models/sub").mkdir()
    after = scan(root, cache)
    assert root_of(after) != root_of(before)
    assert before.tree is not None
    assert after.tree is not None
    if edit == "mode":  # as in Git: the mode lives in the directory entry, the file node is unchanged
        assert after.tree.files["models/weights.bin"].hash == before.tree.files["models/weights.bin"].hash
        assert after.tree.dirs["models"] != before.tree.dirs["models"]
    assert after.tree.dirs["emptydir"] == ()


def test_an_incremental_rescan_reads_no_unchanged_file(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")
    first = scan(root, cache)
    assert first.stats.files_read == 4
    again = scan(root, cache)
    assert (again.stats.files_read, again.stats.bytes_read, again.stats.files_reused) == (0, 0, 4)
    assert root_of(again) == root_of(first)
    write(root, "a.txt", b"alpha, edited\n", later=1)
    third = scan(root, cache)
    assert (third.stats.files_read, third.stats.files_reused) == (1, 3)
    assert root_of(third) != root_of(first)


def test_a_racily_clean_file_is_read_again_once(tmp_path: Path, cache: DigestCache) -> None:
    root = tmp_path / "ds"
    write(root, "fresh", b"just written", old=False)
    assert scan(root, cache).stats.files_read == 1
    # Read within the file's mtime tick (< RACY_NS after it): a same-tick write would be invisible.
    assert scan(root, cache).stats.files_read == 1
    later = scan(root, cache, wall_ns=lambda: 2**62)  # stands for a read long after the last write
    assert later.stats.files_read == 1
    assert scan(root, cache).stats.files_read == 0


def test_a_deep_scan_rereads_everything_and_finds_bit_rot(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")
    clean = scan(root, cache)
    weights = root / "models/weights.bin"
    before = weights.stat()
    with weights.open("r+b") as stream:  # flip a bit in place: same size, same inode...
        stream.seek(9000)
        byte = stream.read(1)
        stream.seek(9000)
        stream.write(bytes([byte[0] ^ 0x10]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and the mtime put back
    incremental = scan(root, cache)
    assert incremental.stats.files_read == 0
    assert root_of(incremental) == root_of(clean)  # invisible without reading: why deep scans exist
    deep = scan(root, cache, deep=True)
    assert deep.stats.files_read == 4
    assert deep.stats.rot == ["models/weights.bin"]
    assert root_of(deep) != root_of(clean)


class _Hook(Throttle):
    """A throttle that runs ``action`` once, in the middle of hashing (after the first chunk)."""

    def __init__(self, action: object) -> None:
        super().__init__(0)
        self.action = action

    def consume(self, nbytes: int, abort: threading.Event | None = None) -> bool:
        if self.action is not None:
            action, self.action = self.action, None
            action()  # type: ignore[operator]
        return True


def test_a_file_growing_while_read_makes_the_dataset_settling(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")

    def append() -> None:  # runs after the first chunk of the first file read: a.txt
        with (root / "a.txt").open("ab") as stream:
            stream.write(b"more")

    outcome = scan(root, cache, throttle=_Hook(append))
    assert (outcome.state, outcome.tree) == ("settling", None)
    assert outcome.error == "changed while being read: a.txt"
    assert scan(root, cache).state == "ok"


def test_a_file_vanishing_during_the_walk_makes_the_dataset_settling(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")
    write(root, "zzz-last", b"gone soon")
    outcome = scan(root, cache, deep=True, throttle=_Hook((root / "zzz-last").unlink))
    assert outcome.state == "settling"
    assert outcome.error == "changed while being read: zzz-last"


def test_an_unreadable_root_is_an_error(tmp_path: Path, cache: DigestCache) -> None:
    outcome = scan(tmp_path / "nope", cache)
    assert outcome.state == "error"
    assert "cannot open the dataset root" in outcome.error


def test_symlinks_are_recorded_never_followed(tmp_path: Path, cache: DigestCache) -> None:
    outside = write(tmp_path, "outside/secret", b"not part of the dataset")
    root = make_tree(tmp_path / "ds")
    (root / "link").symlink_to(outside)
    (root / "dirlink").symlink_to(outside.parent)
    first = scan(root, cache)
    assert first.tree is not None
    assert {e.name: e.type for e in first.tree.dirs[""]}["link"] == "link"
    assert "dirlink/secret" not in first.tree.files
    write(tmp_path, "outside/secret", b"changed outside")
    assert root_of(scan(root, cache)) == root_of(first)
    (root / "link").unlink()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    assert root_of(scan(root, cache)) != root_of(first)


def test_include_and_exclude_globs(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")
    write(root, "scratch.tmp", b"x")
    write(root, "cache/blob.bin", b"y")
    write(root, "deep/er/model.bin", b"z")
    selection = Selection.of(include=["**/*.bin", "a.txt"], exclude=["*.tmp", "cache"])
    outcome = scan(root, cache, selection=selection)
    assert outcome.tree is not None
    assert sorted(outcome.tree.files) == ["a.txt", "deep/er/model.bin", "models/weights.bin"]
    assert "emptydir" not in outcome.tree.dirs  # with include set, directories without included files go
    excluded_only = scan(root, cache, name="other", selection=Selection.of(exclude=["models/*.json"]))
    assert excluded_only.tree is not None
    assert "models/config.json" not in excluded_only.tree.files
    assert "scratch.tmp" in excluded_only.tree.files


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("*.tmp", "a.tmp", True),
    ("*.tmp", "x/y/a.tmp", True),
    ("*.tmp", "a.tmpx", False),
    ("models/*.bin", "models/w.bin", True),
    ("models/*.bin", "models/sub/w.bin", False),
    ("models/**/*.bin", "models/w.bin", True),
    ("models/**/*.bin", "models/a/b/w.bin", True),
    ("**/cache", "cache", True),
    ("**/cache", "a/b/cache", True),
    ("data/**", "data/a/b", True),
    ("file?.[ch]", "file1.c", True),
    ("file?.[!ch]", "file1.c", False),
])
def test_glob_semantics(pattern: str, path: str, matches: bool) -> None:
    assert bool(compile_glob(pattern).match(path)) is matches


def test_sha256_is_the_fallback_and_roots_carry_their_algorithm(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")
    with_sha = root_of(scan(root, cache, name="sha", alg=SHA256))
    assert with_sha.startswith("sha256:")
    if BLAKE3 is not None:
        assert root_of(scan(root, cache, name="b3", alg=BLAKE3)).startswith("blake3:")
        assert DEFAULT is BLAKE3


def test_the_cache_is_pruned_of_files_that_are_gone(tmp_path: Path, cache: DigestCache) -> None:
    root = make_tree(tmp_path / "ds")
    scan(root, cache)
    assert set(cache.known("ds")) == {"a.txt", "empty.dat", "models/config.json", "models/weights.bin"}
    (root / "a.txt").unlink()
    scan(root, cache)
    assert "a.txt" not in cache.known("ds")


class _RecordingAbort(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return False


def test_the_throttle_waits_for_the_budget_and_caps_bursts() -> None:
    now = [100.0]
    throttle = Throttle(1000, monotonic=lambda: now[0])
    abort = _RecordingAbort()
    assert throttle.consume(1000, abort)  # a full second of budget to start with
    assert abort.waits == []
    assert throttle.consume(500, abort)
    assert abort.waits == [pytest.approx(0.5)]
    now[0] += 60.0  # a long idle period earns at most one second of budget
    assert throttle.consume(2000, abort)
    assert abort.waits[-1] == pytest.approx(1.0)
    assert Throttle(0).consume(10**12)  # 0: unlimited


def test_the_throttle_stops_waiting_when_aborted() -> None:
    throttle = Throttle(10)
    abort = threading.Event()
    abort.set()
    assert throttle.consume(1000, abort) is False
