"""The progress file contract (parse, write) and the agent's tracker of when progress last moved."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.progress import ProgressTracker, progress_path
from selfheal.config import UnitConfig
from selfheal.progress import MAX_BYTES, parse_progress, read_progress, write_progress
from selfheal.wire import UnitProgress

T0 = 1_700_000_000.0


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"done": 3, "total": 10, "stage": "writing", "updated_at": 1700000000.5}',
     UnitProgress(done=3, total=10, stage="writing", updated_at=1700000000.5)),
    (b'{"done": 2.5}', UnitProgress(done=2.5)),
    (b'{"done": 0, "total": null, "stage": "starting"}', UnitProgress(done=0, stage="starting")),
    (b'{"done": 1, "total": "ten", "stage": 7}', UnitProgress(done=1)),  # unusable extras are dropped
    (b'{"done": 1, "stage": "' + b"x" * 100 + b'"}', UnitProgress(done=1, stage="x" * 64)),
    (b'{"done": 4, "total": 9, "extra": {"k": 1}}', UnitProgress(done=4, total=9)),
    (b"", None),
    (b"{", None),  # a torn write (by a writer not using rename)
    (b"[1, 2]", None),
    (b'{"total": 10}', None),  # no done: no progress
    (b'{"done": "3"}', None),
    (b'{"done": true}', None),
    (b'{"done": -1}', None),
    (b'{"done": 1e999}', None),
    (b"\xff\xfe", None),
])
def test_parse_progress(raw: bytes, expected: UnitProgress | None) -> None:
    assert parse_progress(raw) == expected


def test_an_oversized_file_is_not_progress() -> None:
    assert parse_progress(b'{"done": 1, "pad": "' + b"x" * MAX_BYTES + b'"}') is None


def test_write_then_read_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "progress.json"
    write_progress(path, done=2, total=5, stage="cleaning", now=T0)
    assert read_progress(path) == UnitProgress(done=2, total=5, stage="cleaning", updated_at=T0)
    assert [p.name for p in path.parent.iterdir()] == ["progress.json"]
    assert read_progress(tmp_path / "missing.json") is None


def test_progress_path_is_taken_from_the_units_working_directory(tmp_path: Path) -> None:
    base = UnitConfig(name="etl", command=["x"])
    assert progress_path(base, tmp_path) is None
    assert progress_path(UnitConfig(name="etl", command=["x"], progress_file="p.json"), tmp_path) == tmp_path / "p.json"
    cwd = UnitConfig(name="etl", command=["x"], progress_file="p.json", cwd="/srv/etl")
    assert progress_path(cwd, tmp_path) == Path("/srv/etl/p.json")
    absolute = UnitConfig(name="etl", command=["x"], progress_file="/run/etl.json", cwd="/srv/etl")
    assert progress_path(absolute, tmp_path) == Path("/run/etl.json")


def p(done: float, stage: str = "s", total: float | None = 10, updated_at: float = 0.0) -> UnitProgress:
    return UnitProgress(done=done, total=total, stage=stage, updated_at=updated_at)


def test_the_tracker_moves_only_when_done_total_or_stage_change() -> None:
    tracker = ProgressTracker()
    tracker.observe(None, run_started=T0, now=T0 + 1)
    assert (tracker.current, tracker.moved_at) == (None, None)  # no progress in this run yet
    tracker.observe(p(1), run_started=T0, now=T0 + 2)
    assert tracker.moved_at == T0 + 2  # the run's first progress
    tracker.observe(p(1, updated_at=T0 + 3), run_started=T0, now=T0 + 3)  # a heartbeat: not movement
    assert tracker.moved_at == T0 + 2
    tracker.observe(p(1, stage="writing"), run_started=T0, now=T0 + 4)
    assert tracker.moved_at == T0 + 4
    tracker.observe(p(1, stage="writing", total=12), run_started=T0, now=T0 + 5)
    assert tracker.moved_at == T0 + 5
    tracker.observe(None, run_started=T0, now=T0 + 6)  # the file vanished: keep what we knew
    assert (tracker.current, tracker.moved_at) == (p(1, stage="writing", total=12), T0 + 5)


def test_a_new_run_has_no_progress_until_the_file_moves_or_the_run_writes_it() -> None:
    tracker = ProgressTracker()
    tracker.observe(p(3, "holding"), run_started=T0, now=T0 + 1)
    tracker.observe(p(3, "holding"), run_started=T0, now=T0 + 100)
    assert tracker.moved_at is None  # what the file said at the start is not progress of this run
    # Restarted at +200: the old run's file is the new run's baseline, neither progress nor a stall.
    tracker.observe(p(3, "holding", updated_at=T0 + 150), run_started=T0 + 200, now=T0 + 200.5)
    assert tracker.moved_at is None
    assert tracker.moved_in(T0 + 200) is None
    tracker.observe(p(3, "starting"), run_started=T0 + 200, now=T0 + 203)
    assert tracker.moved_at == T0 + 203
    assert tracker.moved_in(T0 + 200) == T0 + 203
    assert tracker.moved_in(T0 + 300) is None  # a report of a newer run the tracker has not seen yet
    # Restarted at +400, and the run wrote its file before the tracker first looked: that is its progress.
    tracker.observe(p(0, "starting", updated_at=T0 + 400.2), run_started=T0 + 400, now=T0 + 400.5)
    assert tracker.moved_at == T0 + 400.5
