"""The pipeline's data: machine telemetry events, their dirt, and the features learned from them.

A fleet of devices reports events (temperature, vibration, pressure, rpm,
status, and whether the device failed at that moment). Each device wears
down at its own pace; worn devices run hotter, shake more, and fail more
often. The ETL job aggregates events per device and batch window into
``FEATURES``; the model predicts ``LABEL``: did the device fail in the window.

``make_batch`` is pure (seeded): it returns the events of one landing batch
already rendered as CSV or JSON lines, with realistic dirt — missing values,
duplicate deliveries, bad values and malformed lines — and ``BatchStats``
saying exactly how much of each it put in, so tests can hold the ETL's
cleaning to the truth.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import msgspec
import numpy as np

COLUMNS = ("event_id", "device_id", "ts", "temperature", "vibration", "pressure", "rpm", "status", "failure")
NUMERIC = ("temperature", "vibration", "pressure", "rpm")
STATUSES = ("ok", "warn", "error")
RANGES = {"temperature": (-40.0, 150.0), "vibration": (0.0, 20.0), "pressure": (0.0, 100.0), "rpm": (0.0, 6000.0)}
"""Physically possible values; anything outside is a bad reading, quarantined."""
FEATURES = ("events", "temp_mean", "temp_max", "vib_mean", "vib_max", "pressure_mean", "rpm_mean",
            "error_share", "warn_share")
LABEL = "failed"
BATCH_NAME = re.compile(r"^batch-(\d{6})\.(csv|jsonl)$")
"""Landing file names; anything else in the landing dir (temp files) is not a batch."""
Format = Literal["csv", "jsonl"]

# Bad values the field devices really send: (field, value) pairs.
_BAD_VALUES: tuple[tuple[str, str | None], ...] = (
    ("temperature", "n/a"), ("temperature", "9999"), ("vibration", "ERR"), ("rpm", "-5"),
    ("ts", "yesterday"), ("device_id", None), ("failure", "maybe"), ("status", "on fire"),
)


@dataclass(frozen=True, slots=True)
class Dirt:
    """Shares of dirt in a batch (each of the events it has)."""

    missing: float = 0.04
    """Of each event's sensor and status cells: left empty."""
    duplicates: float = 0.03
    """Of the events: delivered twice (the same event id)."""
    bad: float = 0.02
    """Of the events: one unusable value (not a number, impossible, no id, bad time or label)."""
    malformed: float = 0.01
    """Of the events, as extra lines: broken CSV rows / JSON that does not parse."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    lines: int
    """Data lines in the file (without a CSV header)."""
    events: int
    """Distinct events that are good (what the ETL must keep)."""
    duplicates: int
    bad: int
    malformed: int
    missing_cells: int
    """Empty cells in the good events (duplicates not counted twice)."""


def batch_file_name(number: int, fmt: Format) -> str:
    return f"batch-{number:06d}.{fmt}"


def device_wear(seed: int, devices: int, batch: int) -> np.ndarray:
    """Each device's wear (0..1) in ``batch``: its own start and pace, fixed by the seed."""
    rng = np.random.default_rng([seed, 7919])
    base = rng.uniform(0.0, 0.7, devices)
    pace = rng.uniform(0.0, 0.04, devices)
    return np.asarray(np.clip(base + pace * batch, 0.0, 1.0))


def make_events(seed: int, batch: int, *, rows: int, devices: int, start: float, span: float) -> list[dict[str, str]]:
    """``rows`` clean events of one batch window ``[start + batch*span, +span)``, values as text."""
    rng = np.random.default_rng([seed, batch])
    wear = device_wear(seed, devices, batch)
    device = rng.integers(0, devices, rows)
    w = wear[device]
    t0 = start + batch * span
    times = np.sort(t0 + rng.uniform(0.0, span, rows))
    temperature = 55 + 35 * w + rng.normal(0, 3, rows)
    vibration = np.clip(0.2 + 1.5 * w**2 + rng.normal(0, 0.1, rows), 0.0, None)
    pressure = 30 - 5 * w + rng.normal(0, 2, rows)
    rpm = 1500 - 300 * w + rng.normal(0, 50, rows)
    p_error = 0.01 + 0.3 * w**3
    p_warn = 0.05 + 0.3 * w**2
    draw = rng.uniform(size=rows)
    failure = rng.uniform(size=rows) < 0.001 + 0.08 * w**4
    events = []
    for i in range(rows):
        status = "error" if draw[i] < p_error[i] else "warn" if draw[i] < p_error[i] + p_warn[i] else "ok"
        events.append({
            "event_id": f"e{batch:06d}-{i:05d}", "device_id": f"dev-{device[i]:03d}",
            "ts": datetime.fromtimestamp(float(times[i]), tz=UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "temperature": f"{temperature[i]:.2f}", "vibration": f"{vibration[i]:.3f}",
            "pressure": f"{pressure[i]:.2f}", "rpm": f"{rpm[i]:.0f}", "status": status,
            "failure": "1" if failure[i] else "0",
        })
    return events


def make_batch(seed: int, batch: int, fmt: Format, *, rows: int = 400, devices: int = 20,
               start: float = 1_700_000_000.0, span: float = 600.0, dirt: Dirt | None = None) -> tuple[str, BatchStats]:
    """One landing batch as file text, with dirt, and how much dirt it holds."""
    dirt = dirt or Dirt()
    rng = np.random.default_rng([seed, batch, 1])
    clean = make_events(seed, batch, rows=rows, devices=devices, start=start, span=span)
    events: list[dict[str, str | None]] = [dict(e) for e in clean]
    missing = 0
    bad_at = set(rng.choice(rows, size=min(rows, round(rows * dirt.bad)), replace=False).tolist())
    for i, event in enumerate(events):
        for name in (*NUMERIC, "status"):
            if rng.uniform() < dirt.missing:
                event[name] = None
                missing += i not in bad_at
    for i in sorted(bad_at):
        field, value = _BAD_VALUES[int(rng.integers(0, len(_BAD_VALUES)))]
        events[i][field] = value
    good = [i for i in range(rows) if i not in bad_at]
    dup_count = min(len(good), round(rows * dirt.duplicates))
    duplicates = [dict(events[i]) for i in rng.choice(good, size=dup_count, replace=False).tolist()] if good else []
    lines: list[str | dict[str, str | None]] = [*events, *duplicates]
    malformed = round(rows * dirt.malformed)
    lines.extend(_malformed_line(fmt, batch, k) for k in range(malformed))
    order = rng.permutation(len(lines))
    shuffled = [lines[i] for i in order]
    text = render_csv(shuffled) if fmt == "csv" else render_jsonl(shuffled)
    stats = BatchStats(lines=len(lines), events=len(good), duplicates=dup_count, bad=len(bad_at),
                       malformed=malformed, missing_cells=missing)
    return text, stats


def _malformed_line(fmt: Format, batch: int, k: int) -> str:
    if fmt == "csv":
        # A row cut short by a lost packet, or one with a stray separator: the wrong number of fields.
        return f"e{batch:06d}-x{k:04d},dev-000" if k % 2 == 0 else f"e{batch:06d}-y{k:04d},dev-001,1,2,3,4,5,6,7,8,9"
    return f'{{"event_id": "e{batch:06d}-x{k:04d}", "device_id": "dev-0'


def render_csv(lines: list[str | dict[str, str | None]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for line in lines:
        if isinstance(line, str):
            out.write(line + "\n")
        else:
            writer.writerow(["" if line[c] is None else line[c] for c in COLUMNS])
    return out.getvalue()


def render_jsonl(lines: list[str | dict[str, str | None]]) -> str:
    out = []
    for line in lines:
        if isinstance(line, str):
            out.append(line)
            continue
        # Devices send numbers as JSON numbers; what does not parse as one stays a string.
        record = {c: _json_value(c, line[c]) for c in COLUMNS}
        out.append(msgspec.json.encode(record).decode())
    return "\n".join(out) + "\n"


def _json_value(column: str, value: str | None) -> str | float | int | None:
    if value is None or column not in (*NUMERIC, "failure"):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):
        return value
    return int(number) if column == "failure" or number.is_integer() else number
