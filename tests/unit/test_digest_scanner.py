"""The digest loop: manifests, generations, deep-scan schedule, settling retries, publishing, stopping."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.digests import __main__ as digest_cli
from agent.digests.cache import DigestCache
from agent.digests.scanner import SETTLE_RETRY, DatasetScanner, read_manifest
from agent.digests.throttle import Throttle
from selfheal.clocks import SystemClock
from selfheal.config import DatasetConfig
from selfheal.wire import DatasetSummary
from tests.conftest import eventually

OLD = 1_600_000_000 * 10**9


def put(root: Path, rel: str, data: bytes, *, later: int = 0) -> None:
    """Write a file at rest (an mtime long past, plus ``later`` seconds to tell edits apart)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(OLD, OLD + later * 10**9))


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[DigestCache]:
    with DigestCache(tmp_path / "state/digests.sqlite3").open() as opened:
        yield opened


def scanner_for(cache: DigestCache, *datasets: DatasetConfig) -> tuple[DatasetScanner, list[list[DatasetSummary]]]:
    published: list[list[DatasetSummary]] = []
    return DatasetScanner(list(datasets), cache=cache, publish=published.append, clock=SystemClock()), published


def cli_root(path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert digest_cli.main([str(path), *args]) == 0
    return capsys.readouterr().out.strip()


async def test_a_manifest_inside_the_dataset_is_reported_and_not_digested(
        tmp_path: Path, cache: DigestCache, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    put(data, "shard-0", b"zero" * 100)
    put(data, "sub/shard-1", b"one" * 100)
    published_root = cli_root(data, "--chunk-size", "4096", capsys=capsys)  # what the publisher records
    (data / "MANIFEST").write_text(f"# published 2026-01-01\n{published_root}\n", encoding="utf-8")
    scanner, published = scanner_for(cache, DatasetConfig(name="ds", path=str(data), chunk_size=4096,
                                                          manifest="MANIFEST"))
    summary = await scanner.scan("ds")
    assert (summary.state, summary.root, summary.manifest_root) == ("ok", published_root, published_root)
    assert (summary.files, summary.generation, summary.chunk_size) == (2, 1, 4096)
    assert published == [[summary]]
    assert (await scanner.scan("ds")).generation == 1  # same root, same generation
    put(data, "shard-0", b"ZERO" * 100, later=1)
    changed = await scanner.scan("ds")
    assert (changed.generation, changed.manifest_root) == (2, published_root)
    assert changed.root != published_root


async def test_an_unreadable_manifest_is_an_error_not_a_digest(tmp_path: Path, cache: DigestCache) -> None:
    data = tmp_path / "data"
    put(data, "a", b"a")
    put(tmp_path, "bad-manifest", b"not a digest\n")
    scanner, _ = scanner_for(cache, DatasetConfig(name="missing", path=str(data), manifest="/nonexistent/M"),
                             DatasetConfig(name="bad", path=str(data), manifest=str(tmp_path / "bad-manifest")))
    missing = await scanner.scan("missing")
    assert (missing.state, missing.root, missing.manifest_root) == ("error", "", None)
    assert "manifest /nonexistent/M" in missing.error
    bad = await scanner.scan("bad")
    assert bad.state == "error"
    assert "not a digest" in bad.error
    assert scanner.view("bad").tree is None  # type: ignore[union-attr]  # nothing served from it


def test_read_manifest_takes_the_first_digest_line(tmp_path: Path) -> None:
    root = "sha256:" + "0f" * 32
    (tmp_path / "m").write_text(f"\n# comment\n  {root}  \nblake3:{'1' * 64}\n", encoding="utf-8")
    assert read_manifest(tmp_path / "m") == root
    (tmp_path / "empty").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no digest"):
        read_manifest(tmp_path / "empty")


async def test_deep_scans_follow_their_interval(tmp_path: Path, cache: DigestCache) -> None:
    data = tmp_path / "data"
    put(data, "a", b"a" * 10)
    rarely, _ = scanner_for(cache, DatasetConfig(name="ds", path=str(data)))
    first = await rarely.scan("ds")
    assert first.deep_scanned_at == first.scanned_at  # the first scan reads everything
    second = await rarely.scan("ds")
    assert second.deep_scanned_at == first.deep_scanned_at  # a day has not passed
    often, _ = scanner_for(cache, DatasetConfig(name="ds", path=str(data), deep_scan_interval=1e-9))
    third = await often.scan("ds")
    assert third.deep_scanned_at == third.scanned_at > first.deep_scanned_at


async def test_the_loop_scans_on_schedule_publishes_and_stops(tmp_path: Path, cache: DigestCache) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    put(one, "a", b"1")
    put(two, "b", b"2")
    scanner, published = scanner_for(cache, DatasetConfig(name="one", path=str(one), scan_interval=0.05),
                                     DatasetConfig(name="two", path=str(two), scan_interval=30))
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(scanner.run(stop=stop), name="scanner")
        await eventually(lambda: len(published) >= 4, timeout=10, what="repeated scans")
        stop.set()
    assert {s.name for s in published[-1]} == {"one", "two"}
    assert scanner.views["one"].scans >= 3
    assert scanner.views["two"].scans == 1  # its interval has not come round again


class _AppendWhileRead(Throttle):
    """Appends to ``path`` the first time a chunk has been read: the file changes under the scan."""

    def __init__(self, path: Path) -> None:
        super().__init__(0)
        self.path: Path | None = path

    def consume(self, nbytes: int, abort: threading.Event | None = None) -> bool:
        if self.path is not None:
            with self.path.open("ab") as stream:
                stream.write(b"+")
            self.path = None
        return True


async def test_a_settling_dataset_is_retried_sooner_and_an_error_keeps_the_last_counts(
        tmp_path: Path, cache: DigestCache) -> None:
    data = tmp_path / "data"
    put(data, "a", b"a")
    scanner, published = scanner_for(cache, DatasetConfig(name="ds", path=str(data), scan_interval=3600))
    view = scanner.views["ds"]
    loop = asyncio.get_running_loop()
    view.throttle = _AppendWhileRead(data / "a")
    settling = await scanner.scan("ds")
    assert (settling.state, settling.root, settling.error) == ("settling", "", "changed while being read: a")
    assert view.next_at <= loop.time() + SETTLE_RETRY
    assert published[-1] == [settling]

    ok = await scanner.scan("ds")
    assert (ok.state, ok.files, ok.bytes, ok.generation) == ("ok", 1, 2, 1)
    assert view.next_at > loop.time() + 3000
    data.rename(tmp_path / "gone")
    failed = await scanner.scan("ds")
    assert (failed.state, failed.root) == ("error", "")
    assert "cannot open the dataset root" in failed.error
    assert (failed.files, failed.bytes, failed.generation) == (1, 2, 1)  # the last known figures
    assert view.tree is None
