"""The data generator: realistic dirt in exactly the amounts it says, reproducibly, landed atomically."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfheal.progress import read_progress
from tests.workload_data import restored_logging
from workloads import generate
from workloads.telemetry import COLUMNS, NUMERIC, RANGES, STATUSES, BatchStats, Dirt, make_batch


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with restored_logging():
        yield


def parse_lines(text: str, fmt: str) -> tuple[list[dict[str, str | None]], int]:
    """(well-formed records with None for empty cells, malformed line count), as a careful reader sees them."""
    records: list[dict[str, str | None]] = []
    malformed = 0
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        assert tuple(rows[0]) == COLUMNS
        for row in rows[1:]:
            if len(row) != len(COLUMNS):
                malformed += 1
                continue
            records.append({c: (v or None) for c, v in zip(COLUMNS, row, strict=True)})
        return records, malformed
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            malformed += 1
            continue
        records.append({c: None if record[c] is None else str(record[c]) for c in COLUMNS})
    return records, malformed


def is_bad(record: dict[str, str | None]) -> bool:
    if not record["event_id"] or not record["device_id"] or not record["ts"] or not record["ts"].startswith("20"):
        return True
    for name in NUMERIC:
        value = record[name]
        if value is None:
            continue
        try:
            number = float(value)
        except ValueError:
            return True
        low, high = RANGES[name]
        if not low <= number <= high:
            return True
    if record["failure"] not in ("0", "1"):
        return True
    return record["status"] is not None and record["status"] not in STATUSES


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_batch_holds_exactly_the_dirt_it_reports(fmt: str) -> None:
    text, stats = make_batch(3, 5, fmt, rows=1000, devices=25)  # type: ignore[arg-type]
    records, malformed = parse_lines(text, fmt)
    assert malformed == stats.malformed == 10
    assert len(records) + malformed == stats.lines
    bad = [r for r in records if is_bad(r)]
    good = [r for r in records if not is_bad(r)]
    assert len(bad) == stats.bad == 20
    ids = Counter(r["event_id"] for r in good)
    assert sum(n - 1 for n in ids.values()) == stats.duplicates == 30
    assert len(ids) == stats.events == 980
    unique = {r["event_id"]: r for r in good}.values()
    missing = sum(r[c] is None for r in unique for c in (*NUMERIC, "status"))
    assert missing == stats.missing_cells
    assert 0.02 < missing / (len(unique) * 5) < 0.06  # about the 4 % asked for
    assert {r["device_id"] for r in good} == {f"dev-{i:03d}" for i in range(25)}
    assert {r["failure"] for r in good} == {"0", "1"}  # worn devices fail: both classes present


def test_batches_are_reproducible_and_differ_by_seed_and_number() -> None:
    assert make_batch(1, 1, "csv") == make_batch(1, 1, "csv")
    assert make_batch(1, 1, "csv")[0] != make_batch(2, 1, "csv")[0]
    assert make_batch(1, 1, "csv")[0] != make_batch(1, 2, "csv")[0]


def test_clean_data_has_no_dirt() -> None:
    text, stats = make_batch(1, 1, "csv", rows=50, dirt=Dirt(missing=0, duplicates=0, bad=0, malformed=0))
    assert stats == BatchStats(lines=50, events=50, duplicates=0, bad=0, malformed=0, missing_cells=0)
    records, malformed = parse_lines(text, "csv")
    assert malformed == 0
    assert not any(is_bad(r) for r in records)


def test_worn_devices_run_hotter_and_fail_more() -> None:
    text, _ = make_batch(1, 30, "csv", rows=4000, devices=10, dirt=Dirt(0, 0, 0, 0))
    records, _ = parse_lines(text, "csv")
    by_device: dict[str, list[dict[str, str | None]]] = {}
    for r in records:
        by_device.setdefault(str(r["device_id"]), []).append(r)
    mean_temp = {d: sum(float(str(r["temperature"])) for r in rs) / len(rs) for d, rs in by_device.items()}
    failures = {d: sum(r["failure"] == "1" for r in rs) for d, rs in by_device.items()}
    hottest, coolest = max(mean_temp, key=mean_temp.__getitem__), min(mean_temp, key=mean_temp.__getitem__)
    assert failures[hottest] > failures[coolest]


def test_the_generator_lands_numbered_batches_atomically_and_continues_numbering(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    progress = tmp_path / "progress.json"
    assert generate.main(["--landing", str(landing), "--batches", "2", "--rows", "20",
                          "--progress", str(progress)]) == 0
    assert generate.main(["--landing", str(landing), "--batches", "1", "--rows", "20", "--format", "csv"]) == 0
    assert sorted(p.name for p in landing.iterdir()) == ["batch-000001.csv", "batch-000002.jsonl",
                                                          "batch-000003.csv"]
    recorded = read_progress(progress)
    assert recorded is not None
    assert (recorded.done, recorded.total, recorded.stage) == (2, 2, "done")


def test_the_generator_takes_its_options_from_the_environment(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFHEAL_GENERATE_LANDING", str(tmp_path / "env-landing"))
    monkeypatch.setenv("SELFHEAL_GENERATE_ROWS", "10")
    monkeypatch.setenv("SELFHEAL_GENERATE_FORMAT", "jsonl")
    assert generate.main([]) == 0
    (landed,) = (tmp_path / "env-landing").iterdir()
    assert landed.name == "batch-000001.jsonl"
    assert len(landed.read_text().splitlines()) == 10  # 10 events, dirt rounded to none at this size


def test_the_generator_refuses_nonsense(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main([]) == 78
    assert "--landing" in capsys.readouterr().err
    assert generate.main(["--landing", str(tmp_path), "--rows", "0"]) == 78
