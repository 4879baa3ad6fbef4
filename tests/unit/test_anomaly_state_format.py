"""The saved anomaly state is plain data: every detector kind round-trips exactly, and bad files are refused.

A restored detector must score every later sample exactly as the live one
would (a fused detector carries weeks of history), and nothing in a state
file can choose code: a pickle is unreadable, a file off the schema or with
numbers that do not fit the spec's detector is a ``ValueError``.
"""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from detectors.anomaly.host_watch import FitJob, HostModelSpec, HostVectorWatch, run_jobs
from detectors.anomaly.policy import AlertPolicySpec
from detectors.anomaly.registry import build_detector
from detectors.anomaly.state import AnyDetectorState, SeasonalResidualState
from detectors.anomaly.watch import STATE_FORMAT, STATE_VERSION, AnomalyWatch, WatchSpec
from selfheal import wire

SPECS: list[dict[str, Any]] = [
    {"kind": "fused"},
    {"kind": "fused", "seasons": "daily", "step": 600},
    {"kind": "robust_z", "window": 3600, "calibrate": "tail"},
    {"kind": "robust_z", "window": 3600, "on": "diff", "recent": 3, "calibrate": "peak"},
    {"kind": "ewma_z", "half_life": 600},
    {"kind": "extremes", "half_life": 3600, "mature": 7200},
    {"kind": "running_extremes"},
    {"kind": "forecast", "limit": 900, "horizon": 3600, "window": 1800},
    {"kind": "random", "seed": 7},
    {"kind": "null"},
]


def series(start: int, count: int) -> list[tuple[float, float]]:
    """A daily cycle with noise, a level shift and spikes; 5-minute samples."""
    out = []
    for i in range(start, start + count):
        ts = 1_700_000_000.0 + i * 300.0
        value = 500 + 100 * math.sin(2 * math.pi * (ts % 86400) / 86400) + (i * 7919) % 37
        value += 150 if i > start + count // 2 else 0
        value += 400 if i % 97 == 0 else 0
        out.append((ts, value))
    return out


def saved(state: AnyDetectorState) -> AnyDetectorState:
    data = msgspec.msgpack.encode(state)
    return msgspec.msgpack.decode(data, type=AnyDetectorState)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_detector_kind_round_trips_exactly(spec: dict[str, Any]) -> None:
    live = build_detector(spec)
    for ts, value in series(0, 3 * 288):
        live.update(ts, value)
    restored = build_detector(spec)
    restored.load_state(saved(live.to_state()))
    for ts, value in series(3 * 288, 2 * 288):
        assert restored.update(ts, value) == live.update(ts, value)
        assert restored.evidence() == pytest.approx(live.evidence(), nan_ok=True)
    assert msgspec.msgpack.encode(restored.to_state()) == msgspec.msgpack.encode(live.to_state())  # bit for bit


def test_state_of_another_shape_is_refused() -> None:
    fused = build_detector({"kind": "fused"})
    ewma = build_detector({"kind": "ewma_z"})
    with pytest.raises(ValueError, match="expected"):
        ewma.load_state(fused.to_state())
    weekly = build_detector({"kind": "fused", "seasons": "weekly"})
    with pytest.raises(ValueError, match="parts"):
        weekly.load_state(fused.to_state())  # the daily part has nowhere to go


def test_numbers_that_do_not_fit_the_built_detector_are_refused() -> None:
    detector = build_detector({"kind": "fused"})
    state = detector.to_state()

    def walk(node: Any) -> SeasonalResidualState:
        if isinstance(node, SeasonalResidualState):
            return node
        for child in (getattr(node, "inner", None), *getattr(node, "parts", ())):
            if child is not None and (found := walk(child)) is not None:
                return found
        return None  # type: ignore[return-value]

    seasonal = walk(state)
    grown = msgspec.structs.replace(seasonal, means=seasonal.means * 1000)
    data = msgspec.msgpack.encode(state).replace(msgspec.msgpack.encode(seasonal.means),
                                                 msgspec.msgpack.encode(grown.means), 1)
    with pytest.raises(ValueError, match="means"):
        build_detector({"kind": "fused"}).load_state(msgspec.msgpack.decode(data, type=AnyDetectorState))


def report(ts: float, seq: int, rss: int) -> wire.Report:
    host = wire.HostMetrics(cpu_percent=1, load1=0, load5=0, load15=0, mem_total_bytes=1, mem_available_bytes=1,
                            mem_percent=1, swap_percent=0)
    return wire.Report(node="n1", session=1, seq=seq, ts=ts, host=host,
                       units=[wire.UnitReport(name="svc", kind="process", state="running", rss_bytes=rss)])


def watch() -> AnomalyWatch:
    return AnomalyWatch([WatchSpec(name="mem", metric="unit.rss_bytes", detector={"kind": "fused"})])


class Plant:
    """Unpickling this creates a file: what an attacker would put in a pickled state file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_a_pickle_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = pickle.dumps({"format": 1, "code": "code-1", "specs": {}, "streams": [Plant(marker)]})
    with pytest.raises(ValueError, match=r"unreadable|format"):
        watch().restore(crafted, "code-1")
    assert not marker.exists()


def test_the_header_is_checked_before_the_streams_are_read() -> None:
    live = watch()
    for i in range(50):
        live.observe(report(1_700_000_000.0 + 300 * i, i + 1, 500 + i % 7))
    data = live.snapshot("code-1")
    header = msgspec.msgpack.decode(data)
    assert (header["format"], header["version"]) == (STATE_FORMAT, STATE_VERSION)
    broken = msgspec.msgpack.encode({**header, "streams": [{"watch": "mem", "junk": True}]})
    with pytest.raises(ValueError, match="other detector code"):
        watch().restore(broken, "code-2")  # refused on the header: the broken stream was never looked at
    with pytest.raises(ValueError, match="schema"):
        watch().restore(broken, "code-1")
    with pytest.raises(ValueError, match="format"):
        watch().restore(msgspec.msgpack.encode({**header, "version": 1}), "code-1")
    restored = watch()
    assert restored.restore(data, "code-1") == (1, 0)
    assert restored._streams[("mem", "n1", "svc")].window == live._streams[("mem", "n1", "svc")].window


def test_deeply_nested_junk_is_unreadable_not_a_crash() -> None:
    header = {"format": STATE_FORMAT, "version": STATE_VERSION, "code": "code-1", "specs": {}}
    data = msgspec.msgpack.encode({**header, "streams": None})
    assert data.endswith(b"\xc0")
    nested = data[:-1] + b"\x91" * 100_000 + b"\xc0"  # [[[[...]]]] 100k deep
    for code in ("code-1", "code-2"):
        with pytest.raises(ValueError, match=r"unreadable|schema|other detector code"):
            watch().restore(nested, code)


def host_report(ts: float, cpu: float, mem: float) -> wire.Report:
    host = wire.HostMetrics(cpu_percent=cpu, load1=0, load5=0, load15=0, mem_total_bytes=1, mem_available_bytes=1,
                            mem_percent=mem, swap_percent=0)
    return wire.Report(node="n1", session=1, seq=int(ts), ts=ts, host=host, units=[])


def host_watch() -> AnomalyWatch:
    spec = HostModelSpec(name="vec", features=("cpu_percent", "mem_percent"), step=0.0, history=400,
                         min_samples=200, refit_every=1e9,
                         policy=AlertPolicySpec(threshold=0.98, persistence=3, window=3, hold=10))
    return AnomalyWatch([], hosts=HostVectorWatch([spec]))


def settle(watch: AnomalyWatch) -> list[object]:
    assert watch.hosts is not None
    jobs = watch.hosts.take_work()
    watch.hosts.apply(run_jobs(jobs))
    return list(jobs)


def test_host_vectors_are_kept_and_the_forest_is_refitted_not_saved() -> None:
    rng = random.Random(5)  # noqa: S311 - test data
    live = host_watch()
    for i in range(200):
        cpu = rng.uniform(10, 80)
        live.observe(host_report(1000.0 + i, cpu, cpu + rng.gauss(0, 2)))
    settle(live)
    data = live.snapshot("code-1")
    assert b"IsolationForest" not in data
    assert b"sklearn" not in data
    restored = host_watch()
    assert restored.restore(data, "code-1") == (1, 0)
    assert restored.hosts is not None
    assert [type(job) for job in settle(restored)] == [FitJob]  # refitted from the saved vectors
    for i in range(4):  # the unseen combination: both raise it, with the same scores
        sample = host_report(1200.0 + i, 10.0, 80.0)
        live.observe(sample)
        restored.observe(sample)
        settle(live)
        settle(restored)
    assert [f.evidence for f in restored.findings("n1")] == [f.evidence for f in live.findings("n1")]
    assert restored.findings("n1")
