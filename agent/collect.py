"""Host and per-process metrics from psutil, for the agent's periodic report.

Every function here blocks (psutil reads ``/proc``), so the agent calls them
through ``asyncio.to_thread``; they never raise for a vanished process or an
unreadable mount, they report what they could read.

CPU percentages are deltas between calls (``interval=None``), which is why
``ProcessSampler`` keeps one ``psutil.Process`` per pid across calls: a fresh
object would always answer 0.0. The cache is bounded and forgets pids that
were not asked about in the latest round.

The mounted partitions are listed again at most every ``MOUNTS_TTL`` seconds
(their usage is read every time): at a 1 s interval, parsing the mount table
each round was a fifth of a host sample, and mounts rarely change.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

import psutil

from selfheal.wire import DiskUsage, HostMetrics

# Read-only images whose "usage" is always 100% and says nothing about free space.
# (overlay stays: it is the root filesystem inside a container.)
_SKIP_FSTYPES = frozenset({"squashfs", "iso9660"})
MOUNTS_TTL = 60.0
"""Seconds a listing of the mounted partitions is reused; a new or removed mount shows within this."""


class _Mounts:
    """The mount points ``collect_disks`` reads, listed again once ``MOUNTS_TTL`` has passed."""

    def __init__(self) -> None:
        self._listed_at: float | None = None
        self._mounts: list[str] = []

    def get(self, now: float) -> list[str]:
        if self._listed_at is None or now - self._listed_at >= MOUNTS_TTL or now < self._listed_at:
            partitions = psutil.disk_partitions(all=False)  # OSError: the caller reports no disks this round
            self._mounts = list(dict.fromkeys(p.mountpoint for p in partitions if p.fstype not in _SKIP_FSTYPES))
            self._listed_at = now
        return self._mounts


_MOUNTS = _Mounts()


def collect_host(prev: HostMetrics | None = None) -> HostMetrics:
    """One host sample; counters psutil cannot read now keep ``prev``'s values (they are cumulative)."""
    try:
        load1, load5, load15 = os.getloadavg()
    except OSError:
        load1 = load5 = load15 = 0.0
    memory = psutil.virtual_memory()
    try:
        swap_percent = float(psutil.swap_memory().percent)
    except (OSError, RuntimeError):
        swap_percent = 0.0
    disk_read, disk_write = _disk_io(prev)
    net_sent, net_recv = _net_io(prev)
    return HostMetrics(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        load1=load1, load5=load5, load15=load15,
        mem_total_bytes=int(memory.total),
        mem_available_bytes=int(memory.available),
        mem_percent=float(memory.percent),
        swap_percent=swap_percent,
        disks=collect_disks(),
        disk_read_bytes=disk_read, disk_write_bytes=disk_write,
        net_sent_bytes=net_sent, net_recv_bytes=net_recv,
    )


def collect_disks(now: float | None = None) -> list[DiskUsage]:
    """Usage of each real mounted partition (one entry per mount point); unreadable mounts are skipped.

    ``now``: monotonic seconds, for the reuse of the mount listing (default: the clock)."""
    disks: list[DiskUsage] = []
    try:
        mounts = _MOUNTS.get(time.monotonic() if now is None else now)
    except OSError:
        return disks
    for mount in mounts:
        try:
            usage = psutil.disk_usage(mount)
        except OSError:
            continue
        disks.append(DiskUsage(mount=mount, total_bytes=int(usage.total),
                               used_bytes=int(usage.used), percent=float(usage.percent)))
    return disks


def _disk_io(prev: HostMetrics | None) -> tuple[int, int]:
    try:
        counters = psutil.disk_io_counters(perdisk=False)
    except (OSError, RuntimeError):
        counters = None
    if counters is None:
        return (prev.disk_read_bytes, prev.disk_write_bytes) if prev else (0, 0)
    return int(counters.read_bytes), int(counters.write_bytes)


def _net_io(prev: HostMetrics | None) -> tuple[int, int]:
    try:
        counters = psutil.net_io_counters(pernic=False)
    except (OSError, RuntimeError):
        counters = None
    if counters is None:
        return (prev.net_sent_bytes, prev.net_recv_bytes) if prev else (0, 0)
    return int(counters.bytes_sent), int(counters.bytes_recv)


class ProcessSample(NamedTuple):
    cpu_percent: float
    rss_bytes: int
    num_fds: int
    num_threads: int
    status: str


class ProcessSampler:
    """Samples processes by pid, reusing ``psutil.Process`` objects so CPU percent spans calls."""

    def __init__(self, max_cached: int = 1024) -> None:
        self.max_cached = max_cached
        self._cache: OrderedDict[int, psutil.Process] = OrderedDict()

    def collect_process(self, pid: int) -> ProcessSample | None:
        """One process sample, or None when the process is gone or not ours to read."""
        proc = self._cache.get(pid)
        try:
            if proc is None:
                proc = psutil.Process(pid)
                self._cache[pid] = proc
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
            with proc.oneshot():
                cpu = float(proc.cpu_percent(interval=None))
                rss = int(proc.memory_info().rss)
                threads = int(proc.num_threads())
                status = str(proc.status())
                try:
                    fds = int(proc.num_fds())
                except psutil.AccessDenied:
                    fds = 0
        except psutil.ZombieProcess:
            return ProcessSample(0.0, 0, 0, 0, psutil.STATUS_ZOMBIE)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._cache.pop(pid, None)
            return None
        return ProcessSample(cpu, rss, fds, threads, status)

    def collect_many(self, pids: Iterable[int]) -> dict[int, ProcessSample]:
        """Sample every pid; forget cached processes that were not asked about this round."""
        wanted = set(pids)
        for stale in [pid for pid in self._cache if pid not in wanted]:
            del self._cache[stale]
        samples: dict[int, ProcessSample] = {}
        for pid in wanted:
            sample = self.collect_process(pid)
            if sample is not None:
                samples[pid] = sample
        return samples
