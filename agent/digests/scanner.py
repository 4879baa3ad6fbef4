"""The agent's digest loop: scan each dataset on its schedule, off the event loop, and publish.

``DatasetScanner.run`` scans every dataset at start, then each one every
``scan_interval`` (incremental: unchanged files are not read) and, when
``deep_scan_interval`` has passed since the last deep scan (kept in the
cache, so restarts do not trigger one), re-reads everything. A settling
dataset is scanned again after ``SETTLE_RETRY`` seconds instead of a whole
interval. Scans run one at a time, each in a thread off the event loop
(which hands large files to a pool of ``pool.HASH_WORKERS`` hashing threads,
two at most), and stop between chunks when the agent stops.

After each scan the whole node's ``DatasetDigest`` goes to ``publish``
(retained on the ``digests`` channel). Peers are served from ``view(name)``:
the tree of the latest scan, but only while that scan said ``ok``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from agent.digests.cache import DigestCache
from agent.digests.hashing import DEFAULT, Algorithm, parse_digest
from agent.digests.selection import Selection
from agent.digests.throttle import Throttle
from agent.digests.trees import DatasetTree, ScanOutcome, scan_dataset
from selfheal.clocks import Clock
from selfheal.config import DatasetConfig
from selfheal.errors import SelfhealError
from selfheal.logs import get_logger
from selfheal.wire import DatasetSummary

SETTLE_RETRY = 5.0
"""Seconds before a settling dataset is scanned again (or its scan_interval, if shorter)."""
MAX_MANIFEST = 4096


def read_manifest(path: Path) -> str:
    """The root digest a manifest file publishes: its first line that is not blank or a ``#`` comment.

    Raises ``OSError`` or ``ValueError`` (not a digest).
    """
    with path.open("rb") as stream:
        text = stream.read(MAX_MANIFEST).decode("utf-8", errors="replace")
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            parse_digest(line)
            return line
    raise ValueError("no digest in it")


def manifest_path(config: DatasetConfig) -> Path | None:
    if config.manifest is None:
        return None
    return Path(os.path.normpath(Path(config.path) / config.manifest))


def inside(config: DatasetConfig, path: Path | None) -> frozenset[str]:
    """``path`` relative to the dataset root when it lies inside it (then it is not digested)."""
    if path is None:
        return frozenset()
    rel = os.path.relpath(path, os.path.normpath(config.path))
    return frozenset() if rel == ".." or rel.startswith("../") else frozenset({rel})


@dataclass
class DatasetView:
    """One dataset's latest scan, as the HTTP side and the publisher see it."""

    config: DatasetConfig
    throttle: Throttle
    summary: DatasetSummary | None = None
    tree: DatasetTree | None = None
    """The latest scan's tree, only while that scan is ``ok``."""
    next_at: float = 0.0
    scans: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DatasetScanner:
    def __init__(self, datasets: Sequence[DatasetConfig], *, cache: DigestCache,
                 publish: Callable[[list[DatasetSummary]], None], clock: Clock, node_id: str = "",
                 alg: Algorithm = DEFAULT) -> None:
        self.cache = cache
        self.publish = publish
        self.clock = clock
        self.alg = alg
        self.views = {d.name: DatasetView(d, Throttle(d.read_bandwidth)) for d in datasets}
        self._abort = threading.Event()
        self.log = get_logger("agent.digests", node=node_id)

    def view(self, name: str) -> DatasetView | None:
        return self.views.get(name)

    def summaries(self) -> list[DatasetSummary]:
        return [v.summary for v in self.views.values() if v.summary is not None]

    async def run(self, *, stop: asyncio.Event) -> None:
        """Scan on schedule until ``stop``; a scan in progress is aborted between two chunks."""
        if not self.views:
            return
        loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(stop.wait(), name="digests-stop-watch")  # cancelled below, always
        try:
            while not stop.is_set():
                view = min(self.views.values(), key=lambda v: v.next_at)
                delay = view.next_at - loop.time()
                if delay > 0:
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                scan = asyncio.create_task(self.scan(view.config.name), name=f"digests-scan-{view.config.name}")
                await asyncio.wait({stopping, scan}, return_when=asyncio.FIRST_COMPLETED)
                if not scan.done():
                    self._abort.set()  # the thread notices between chunks; wait for it to hand back
                try:
                    await scan
                except SelfhealError as exc:  # the cache failed: say so, try again next interval
                    self.log.exception("digests.scan_failed", dataset=view.config.name, error=str(exc))
                    view.next_at = loop.time() + view.config.scan_interval
        finally:
            stopping.cancel()

    async def scan(self, name: str, *, deep: bool | None = None) -> DatasetSummary:
        """Scan one dataset now (``deep``: None decides by schedule), record and publish the result."""
        view = self.views[name]
        async with view.lock:
            config = view.config
            record = await asyncio.to_thread(self.cache.dataset, name)
            wall = self.clock.wall()
            if deep is None:
                deep = record is None or wall - record.deep_at >= config.deep_scan_interval
            manifest = manifest_path(config)
            began = self.clock.monotonic()
            outcome = await asyncio.to_thread(
                scan_dataset, config.path, name=name, cache=self.cache, alg=self.alg, chunk_size=config.chunk_size,
                selection=Selection.of(config.include, config.exclude), deep=deep, throttle=view.throttle,
                abort=self._abort, skip=inside(config, manifest))
            manifest_root, manifest_error = None, ""
            if manifest is not None:
                try:
                    manifest_root = await asyncio.to_thread(read_manifest, manifest)
                except (OSError, ValueError) as exc:
                    manifest_error = f"manifest {manifest}: {getattr(exc, 'strerror', None) or exc}"
            summary = await self._record(view, outcome, deep=deep, manifest_root=manifest_root,
                                         manifest_error=manifest_error)
            loop = asyncio.get_running_loop()
            interval = config.scan_interval
            view.next_at = loop.time() + (min(interval, SETTLE_RETRY) if summary.state == "settling" else interval)
            view.scans += 1
            self._log(name, outcome, summary, deep=deep, seconds=self.clock.monotonic() - began)
        if not self._abort.is_set():
            self.publish(self.summaries())
        return summary

    async def _record(self, view: DatasetView, outcome: ScanOutcome, *, deep: bool, manifest_root: str | None,
                      manifest_error: str) -> DatasetSummary:
        config = view.config
        now = self.clock.wall()
        previous = view.summary
        record = await asyncio.to_thread(self.cache.dataset, config.name)
        generation = record.generation if record is not None else 0
        deep_at = record.deep_at if record is not None else 0.0
        tree = outcome.tree
        state, error = outcome.state, outcome.error
        if state == "ok" and manifest_error:
            state, error = "error", manifest_error
        if state == "ok" and tree is not None:
            record = await asyncio.to_thread(self.cache.record_root, config.name, tree.root_digest,
                                             deep_at=now if deep else None)
            generation, deep_at = record.generation, record.deep_at
            view.tree = tree
        else:
            view.tree = None
        summary = DatasetSummary(
            name=config.name, root=tree.root_digest if state == "ok" and tree is not None else "",
            files=tree.file_count if tree is not None else (previous.files if previous else 0),
            bytes=tree.byte_count if tree is not None else (previous.bytes if previous else 0),
            generation=generation, state=state, error=error[:300], scanned_at=now, deep_scanned_at=deep_at,
            chunk_size=config.chunk_size, manifest_root=manifest_root)
        view.summary = summary
        return summary

    def _log(self, name: str, outcome: ScanOutcome, summary: DatasetSummary, *, deep: bool, seconds: float) -> None:
        stats = outcome.stats
        fields = {"dataset": name, "state": summary.state, "deep": deep, "root": summary.root,
                  "generation": summary.generation, "files_read": stats.files_read, "bytes_read": stats.bytes_read,
                  "files_reused": stats.files_reused, "seconds": round(seconds, 3)}
        if stats.rot:
            self.log.warning("digests.bit_rot", files=stats.rot[:20], count=len(stats.rot), **fields)
        if summary.state == "ok":
            self.log.info("digests.scanned", **fields)
        else:
            self.log.warning("digests.not_ok", error=summary.error, **fields)
