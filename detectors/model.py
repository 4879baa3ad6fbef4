"""What detectors take and return: a frozen node snapshot in, findings out."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import msgspec
from msgspec.structs import astuple

from selfheal.wire import Report, UnitReport, UnitStateName

Severity = Literal["info", "warning", "critical"]
_T = TypeVar("_T")


# --- report history: what detectors read of past reports, and nothing more -----------------------
# The controller keeps a bounded history of every node's reports for the threshold detector, the
# anomaly watches and the API's charts. They read the host's numbers and each unit's numbers and
# state, never strings a node wrote (errors, probe messages, Spark ids), so a sample keeps only those:
# a flood of maximal reports costs the fixed size of its numbers, within the node's byte budget.


class HostSample(msgspec.Struct, frozen=True, gc=False):
    """The numeric fields of ``wire.HostMetrics``, with the disks folded into ``disk_max_percent``."""

    cpu_percent: float
    load1: float
    load5: float
    load15: float
    mem_total_bytes: int
    mem_available_bytes: int
    mem_percent: float
    swap_percent: float
    disk_read_bytes: int
    disk_write_bytes: int
    net_sent_bytes: int
    net_recv_bytes: int
    disk_max_percent: float | None


class UnitSample(msgspec.Struct, frozen=True, gc=False):
    """A unit's name, state and the numeric fields of ``wire.UnitReport`` a threshold or watch may name."""

    name: str
    state: UnitStateName
    restarts: int
    started_at: float
    cpu_percent: float
    rss_bytes: int
    num_fds: int
    num_threads: int
    runs: int


class ReportSample(msgspec.Struct, frozen=True, gc=False):
    """One report as the history keeps it (``ReportSample.of``)."""

    node: str
    session: int
    seq: int
    ts: float
    host: HostSample
    units: tuple[UnitSample, ...] = ()

    @classmethod
    def of(cls, report: Report, previous: ReportSample | None = None) -> ReportSample:
        """The report's numbers, sharing objects where it can: a value equal to the ``previous`` sample's (a
        start time, a restart count) is that sample's object, and names (the same in every report) are
        interned, so a steady node's history holds mostly the numbers that moved."""
        h = report.host
        ph = previous.host if previous is not None else None
        host = HostSample(h.cpu_percent, h.load1, h.load5, h.load15,
                          _same(h.mem_total_bytes, ph.mem_total_bytes if ph else None), h.mem_available_bytes,
                          h.mem_percent, h.swap_percent, h.disk_read_bytes, h.disk_write_bytes, h.net_sent_bytes,
                          h.net_recv_bytes, max((d.percent for d in h.disks), default=None))
        before = {u.name: u for u in previous.units} if previous is not None else {}
        units = []
        for u in report.units:
            p = before.get(u.name)
            if p is None:
                units.append(UnitSample(sys.intern(u.name), _STATES.get(u.state, u.state), u.restarts, u.started_at,
                                        u.cpu_percent, u.rss_bytes, u.num_fds, u.num_threads, u.runs))
                continue
            units.append(UnitSample(p.name, _STATES.get(u.state, u.state), _same(u.restarts, p.restarts),
                                    _same(u.started_at, p.started_at), u.cpu_percent, u.rss_bytes,
                                    _same(u.num_fds, p.num_fds), _same(u.num_threads, p.num_threads),
                                    _same(u.runs, p.runs)))
        return cls(sys.intern(report.node), report.session, report.seq, report.ts, host, tuple(units))

    def nbytes(self, previous: ReportSample | None = None) -> int:
        """Bytes this sample adds to a history that already holds ``previous`` (what ``of`` was given): its own
        objects, not those it shares (the allocator's rounding included; a test holds it to tracemalloc)."""
        size = sum(map(_own, (self, self.host, self.units, self.ts, self.session, self.seq)))
        host = astuple(self.host)
        if previous is None:
            size += sum(map(_own, host))
        else:
            size += sum(_own(v) for v, p in zip(host, astuple(previous.host), strict=True) if v is not p)
        before = {u.name: u for u in previous.units} if previous is not None else {}
        for unit in self.units:
            size += _own(unit)
            numbers = astuple(unit)[2:]  # name and state are shared (interned)
            p = before.get(unit.name)
            if p is None:
                size += sum(map(_own, numbers))
            else:
                size += sum(_own(v) for v, q in zip(numbers, astuple(p)[2:], strict=True) if v is not q)
        return size


_STATES: dict[str, UnitStateName] = {state: state for state in get_args(UnitStateName)}
"""One string per unit state, shared (a decoder hands out a new one per report)."""
_FLOAT = (sys.getsizeof(0.0) + 15) // 16 * 16


def _own(value: object) -> int:
    """Memory of one object as the allocator hands it out; nothing for the interpreter's shared small ints."""
    kind = type(value)
    if kind is float:
        return _FLOAT  # most numbers of a sample: one size
    if value is None or kind is bool or (kind is int and -5 <= value <= 256):  # type: ignore[operator]
        return 0
    return (sys.getsizeof(value) + 15) // 16 * 16


def _same(value: _T, before: _T | None) -> _T:
    """``before`` when it equals ``value`` (same type): the history keeps one object for a value that stays."""
    return before if before is not None and before == value and type(before) is type(value) else value


Observation = Report | ReportSample
"""What the anomaly watches take: a report as it came, or as the history keeps it."""


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One node as the controller sees it at ``now``."""

    node: str
    online: bool
    """The node's last presence message said online (and no newer will said offline)."""
    last_seen: float
    """Wall time of the last message from the node."""
    units: tuple[UnitReport, ...] = ()
    """Latest state of each unit (reports, updated by events between reports)."""
    confirmed: bool = True
    """``units`` come from a report of the node's current connection. False right after it reconnects (a
    partition healed: its units may have been fenced or lost meanwhile) or before this controller's first
    report from it: unit-based verdicts wait, and it runs no unit as far as placement is concerned."""
    reports: tuple[ReportSample, ...] = ()
    """Recent reports as samples, oldest first (bounded by the controller's history and byte budget)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A condition that holds now. Findings with the same ``key`` are the same problem."""

    kind: str
    node: str
    unit: str | None
    severity: Severity
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    scope: str | None = None
    """What else tells two findings of one node apart when there is no unit (a dataset's name)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Labels of the finding itself (an external alert's), added to the node's labels for rule matching."""

    @property
    def key(self) -> str:
        base = f"{self.kind}/{self.node}/{self.unit or '-'}"
        return f"{base}/{self.scope}" if self.scope else base


@dataclass(frozen=True, slots=True)
class Threshold:
    """A metric over a limit for ``samples`` consecutive reports."""

    name: str
    metric: str
    """``host.<field>`` of ``wire.HostMetrics``, ``host.disk_max_percent``, or ``unit.<field>`` of
    ``wire.UnitReport`` (checked per unit)."""
    above: float
    samples: int = 3
    severity: Severity = "warning"


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    offline_after: float = 5.0
    """Seconds without any message before an 'online' node counts as offline."""
    thresholds: tuple[Threshold, ...] = ()
