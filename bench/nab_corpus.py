"""Read a NAB checkout (``data/``, ``labels/``) and split it into two halves for honest scoring.

The corpus stays where it is (``--data DIR``); nothing is copied. Timestamps
become UTC epoch seconds, the unit the detectors take.

The split is fixed and blind to scores: within each NAB category the files are
sorted by name and dealt alternately to half A and half B, so both halves hold
every kind of series (and half of the anomaly-free files).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class NabFile:
    name: str
    """Path under ``data/``, e.g. ``realKnownCause/nyc_taxi.csv`` — the key of the label files."""
    timestamps: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    windows: tuple[tuple[float, float], ...]
    labels: tuple[float, ...]
    """The labelled anomaly instants (each window is built around one)."""

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]


def read_epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def read_series(path: Path) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    times, values = [], []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            times.append(read_epoch(row["timestamp"]))
            values.append(float(row["value"]))
    return np.asarray(times), np.asarray(values)


def load_corpus(root: Path) -> list[NabFile]:
    """Every file the window labels name, in name order."""
    windows = json.loads((root / "labels" / "combined_windows.json").read_text())
    labels = json.loads((root / "labels" / "combined_labels.json").read_text())
    files = []
    for name in sorted(windows):
        times, values = read_series(root / "data" / name)
        files.append(NabFile(
            name=name, timestamps=times, values=values,
            windows=tuple((read_epoch(start), read_epoch(end)) for start, end in windows[name]),
            labels=tuple(read_epoch(label) for label in labels.get(name, [])),
        ))
    return files


def split_halves(files: list[NabFile]) -> tuple[list[NabFile], list[NabFile]]:
    """Half A and half B: alternate files of each category, in name order."""
    half_a: list[NabFile] = []
    half_b: list[NabFile] = []
    by_category: dict[str, list[NabFile]] = {}
    for nab_file in sorted(files, key=lambda f: f.name):
        by_category.setdefault(nab_file.category, []).append(nab_file)
    for members in by_category.values():
        for index, nab_file in enumerate(members):
            (half_a if index % 2 == 0 else half_b).append(nab_file)
    return half_a, half_b
