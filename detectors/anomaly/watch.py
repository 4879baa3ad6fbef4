"""Live anomaly watching: one streaming detector and alert policy per (watch, node, unit), fed by reports.

The controller hands every new report to ``AnomalyWatch.observe`` (in order,
once each) and asks ``findings(node)`` for the ``metric_anomaly`` findings that
hold now. A watch names a metric (``host.<field>`` or ``unit.<field>``, read
with the same helpers as the threshold detector), a detector spec for
``registry.build_detector`` and an alert policy (threshold, N-of-M
persistence, hold). A per-host budget limits how many new alerts one host may
raise per hour, so a sick host cannot flood the engine.

Pure and bounded: no I/O, no clock (times come from the reports); at most
``max_streams`` detector instances, the longest idle evicted first.
``snapshot``/``restore`` turn the streams into bytes and back, so the
controller can keep what they learned across a restart
(``controller/anomaly_state.py``): the shipped detector needs weeks of
history before a small breakout counts in full. The bytes are msgpack of
plain typed data (``state.py``), never a pickle: ``restore`` checks the
format, version and detector-code fingerprint first, then the schema, then
builds each stream from the watch's *current* spec and loads the saved
numbers into it, so a file can supply numbers but never choose code.

``hosts`` (a ``host_watch.HostVectorWatch``, optional) rides along: it sees
the same reports, and its ``host_anomaly`` findings come out of
``findings(node)`` with the univariate ones. Its forests are fitted and
scored off the event loop by ``controller/host_models.py``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import msgspec

from detectors.anomaly.host_watch import HostVectorWatch
from detectors.anomaly.model import OrderedInput
from detectors.anomaly.policy import AlertPolicy, AlertPolicySpec, HostAlertBudget
from detectors.anomaly.registry import build_detector
from detectors.anomaly.state import AnyDetectorState, EvidenceState, HostState, PolicyState, check_length
from detectors.model import Finding, Observation, Severity
from detectors.thresholds import read_host_metric, read_unit_metric

MAX_STREAMS = 50_000
T = TypeVar("T")
STATE_FORMAT = "selfheal-anomaly-state"
STATE_VERSION = 2
"""Layout of ``snapshot``'s payload (1 was a pickle, never read any more)."""
WINDOW = 30
"""Recent (ts, value, score) samples kept per stream as a finding's evidence."""


@dataclass(frozen=True, slots=True)
class WatchSpec:
    name: str
    metric: str
    """``host.<field>`` or ``unit.<field>`` of the report."""
    detector: Mapping[str, object]
    policy: AlertPolicySpec = field(default_factory=AlertPolicySpec)
    severity: Severity = "warning"


@dataclass
class _Stream:
    detector: OrderedInput
    policy: AlertPolicy
    raised: bool = False
    admitted: bool = False
    last_ts: float = 0.0
    window: list[tuple[float, float, float]] = field(default_factory=list)
    peak_evidence: dict[str, object] = field(default_factory=dict)
    """The detector's evidence at the alert's peak score (what set it off), not at the latest sample."""


class StateHeader(msgspec.Struct, frozen=True):
    """What ``restore`` reads first (the rest of the file is skipped, not built) to decide whether to go on."""

    format: str
    version: int
    code: str


class StreamState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    watch: str
    node: str
    unit: str
    detector: AnyDetectorState
    policy: PolicyState
    raised: bool
    admitted: bool
    last_ts: float
    window: list[tuple[float, float, float]]
    peak_evidence: EvidenceState


class WatchState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    version: int
    code: str
    """Fingerprint of the detector code that wrote the file."""
    specs: dict[str, str]
    """Watch name → the fingerprint of the spec its streams were made under."""
    streams: list[StreamState]
    host_specs: dict[str, str] = {}
    """Host model name → the fingerprint of its spec (the multivariate watch, ``host_watch.py``)."""
    hosts: list[HostState] = []


class AnomalyWatch:
    def __init__(self, specs: Sequence[WatchSpec], *, max_streams: int = MAX_STREAMS,
                 host_budget: tuple[int, float] = (3, 3600.0), hosts: HostVectorWatch | None = None) -> None:
        for spec in specs:  # fail at start, naming the watch, not on the first report
            try:
                build_detector(spec.detector)
            except ValueError as exc:
                raise ValueError(f"anomaly watch {spec.name!r}: detector: {exc}") from None
        self.specs = tuple(specs)
        self.max_streams = max_streams
        self.host_budget = host_budget
        self._streams: OrderedDict[tuple[str, str, str], _Stream] = OrderedDict()
        self._budgets: dict[str, HostAlertBudget] = {}
        self._by_node: dict[str, set[tuple[str, str, str]]] = {}
        """node → its stream keys, so a node's findings do not scan every stream of the fleet."""
        self.samples = 0
        self.hosts = hosts

    def observe(self, report: Observation) -> None:
        if self.hosts is not None:
            self.hosts.observe(report)
        for spec in self.specs:
            scope, _, name = spec.metric.partition(".")
            if scope == "host":
                value = read_host_metric(report.host, name)
                if value is not None:
                    self._feed(spec, report.node, "", report.ts, value)
            else:
                for unit in report.units:
                    if unit.state != "running":
                        continue
                    unit_value = read_unit_metric(unit, name)
                    if unit_value is not None:
                        self._feed(spec, report.node, unit.name, report.ts, unit_value)

    def _feed(self, spec: WatchSpec, node: str, unit: str, ts: float, value: float) -> None:
        key = (spec.name, node, unit)
        stream = self._streams.get(key)
        if stream is None:
            while len(self._streams) >= self.max_streams:
                evicted, _ = self._streams.popitem(last=False)
                self._by_node.get(evicted[1], set()).discard(evicted)
            stream = self._streams[key] = _Stream(build_detector(spec.detector), AlertPolicy(spec.policy))
            self._by_node.setdefault(node, set()).add(key)
        self._streams.move_to_end(key)
        score = stream.detector.update(ts, value)
        self.samples += 1
        verdict = stream.policy.observe(ts, score)
        if verdict.raised and score >= stream.policy.peak:
            stream.peak_evidence = dict(stream.detector.evidence())
        stream.window.append((ts, value, score))
        del stream.window[:-WINDOW]
        stream.last_ts = ts
        if verdict.onset:
            budget = self._budgets.setdefault(node, HostAlertBudget(*self.host_budget))
            stream.admitted = budget.admit(ts)
        stream.raised = verdict.raised and stream.admitted

    def findings(self, node: str) -> list[Finding]:
        out = self.hosts.findings(node) if self.hosts is not None else []
        for key in sorted(self._by_node.get(node, ())):
            name, _, unit = key
            stream = self._streams[key]
            if not stream.raised:
                continue
            spec = next(s for s in self.specs if s.name == name)
            what = f"unit {unit} on {node}" if unit else f"node {node}"
            out.append(Finding(
                kind="metric_anomaly", node=node, unit=unit or None, severity=spec.severity,
                summary=f"{spec.metric} of {what} is anomalous ({name}: score {stream.policy.peak:.2f})",
                evidence={"watch": name, "metric": spec.metric, "score": round(stream.policy.peak, 4),
                          "detector": stream.peak_evidence, "detector_now": dict(stream.detector.evidence()),
                          "window": [{"ts": ts, "value": v, "score": round(s, 4)} for ts, v, s in stream.window]}))
        return out

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def snapshot(self, code: str) -> bytes:
        """The univariate streams (detector, policy, recent window) and the multivariate hosts' vectors (not
        their forests: those are refitted) as msgpack of plain data, tagged with the watches' specs and
        ``code``, a fingerprint of the detector code that made them."""
        streams = [StreamState(watch=name, node=node, unit=unit, detector=stream.detector.to_state(),
                               policy=stream.policy.to_state(), raised=stream.raised, admitted=stream.admitted,
                               last_ts=stream.last_ts, window=list(stream.window),
                               peak_evidence=_evidence(stream.peak_evidence))
                   for (name, node, unit), stream in self._streams.items()]
        hosts = self.hosts
        payload = WatchState(format=STATE_FORMAT, version=STATE_VERSION, code=code,
                             specs={s.name: _fingerprint(s) for s in self.specs}, streams=streams,
                             host_specs=hosts.spec_fingerprints() if hosts is not None else {},
                             hosts=hosts.to_state() if hosts is not None else [])
        return msgspec.msgpack.encode(payload)

    def restore(self, data: bytes, code: str) -> tuple[int, int]:
        """Adopt streams from ``snapshot`` whose watch still exists with the same spec: ``(adopted,
        dropped)``. ``ValueError`` when ``data`` is unreadable, of another format or version, from other
        detector code, off the schema, or holds state that does not fit the detectors its watch builds;
        nothing is adopted then. Checked in that order: no detector is built before the header passed."""
        header = _decode(data, StateHeader, "not a state file of this format")
        if header.format != STATE_FORMAT or header.version != STATE_VERSION:
            raise ValueError(f"not a state file of this format ({header.format!r} version {header.version})")
        if header.code != code:
            raise ValueError("written by other detector code (an upgrade): the streams start afresh")
        payload = _decode(data, WatchState, "does not match the state schema")
        specs = {s.name: s for s in self.specs}
        built: list[tuple[tuple[str, str, str], _Stream]] = []
        dropped = 0
        for saved in payload.streams:
            spec = specs.get(saved.watch)
            if (spec is None or payload.specs.get(saved.watch) != _fingerprint(spec)
                    or len(built) + len(self._streams) >= self.max_streams):
                dropped += 1  # checked before anything is built from the saved numbers
                continue
            try:
                built.append(((saved.watch, saved.node, saved.unit), _rebuild(spec, saved)))
            except ValueError as exc:
                raise ValueError(f"stream {saved.watch}/{saved.node}/{saved.unit}: {exc}") from None
        hosts_adopted, hosts_dropped = (self.hosts.load_state(payload.hosts, payload.host_specs)
                                        if self.hosts is not None else (0, len(payload.hosts)))
        adopted, refused = self._adopt(built, {s.name: _fingerprint(s) for s in self.specs})
        return adopted + hosts_adopted, dropped + refused + hosts_dropped

    def adopt_streams(self, other: AnomalyWatch) -> tuple[int, int]:
        """Take over ``other``'s streams of the watches whose spec is unchanged (a reload): ``(adopted,
        dropped)``. The same objects move over; nothing is copied."""
        return self._adopt(list(other._streams.items()), {s.name: _fingerprint(s) for s in other.specs})

    def _adopt(self, streams: Sequence[tuple[tuple[str, str, str], _Stream]],
               specs: Mapping[str, str]) -> tuple[int, int]:
        """Keep each stream whose watch exists here with the spec it was made under (``specs``)."""
        current = {s.name: _fingerprint(s) for s in self.specs}
        adopted = dropped = 0
        for key, stream in streams:
            name, node, _ = key
            unchanged = current.get(name) is not None and specs.get(name) == current[name]
            if not unchanged or len(self._streams) >= self.max_streams:
                dropped += 1
                continue
            self._streams[key] = stream
            self._by_node.setdefault(node, set()).add(key)
            adopted += 1
        return adopted, dropped

    def forget(self, node: str) -> None:
        """Drop a node's streams (it left the fleet)."""
        for key in self._by_node.pop(node, set()):
            self._streams.pop(key, None)
        self._budgets.pop(node, None)
        if self.hosts is not None:
            self.hosts.forget(node)


def _decode(data: bytes, kind: type[T], mismatch: str) -> T:
    """msgpack ``data`` as ``kind``; any failure is a ``ValueError`` (nothing in the file is ever executed)."""
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{mismatch} ({exc})") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from None


def _rebuild(spec: WatchSpec, saved: StreamState) -> _Stream:
    """A stream built from the watch's spec, then given the saved numbers (``ValueError`` if they do not fit)."""
    check_length("window", saved.window, at_most=WINDOW)
    detector = build_detector(spec.detector)
    detector.load_state(saved.detector)
    policy = AlertPolicy(spec.policy)
    policy.load_state(saved.policy)
    return _Stream(detector, policy, raised=saved.raised, admitted=saved.admitted, last_ts=saved.last_ts,
                   window=list(saved.window), peak_evidence=dict(saved.peak_evidence))


def _evidence(evidence: Mapping[str, object]) -> EvidenceState:
    """A detector's evidence as saved: numbers and strings (anything else is dropped)."""
    return {k: v if isinstance(v, str) else float(v) for k, v in evidence.items() if isinstance(v, str | int | float)}


def _fingerprint(spec: WatchSpec) -> str:
    """What a stream's state depends on: a changed metric, detector or policy starts it afresh."""
    return json.dumps({"metric": spec.metric, "detector": dict(spec.detector), "policy": asdict(spec.policy)},
                      sort_keys=True, default=str)
