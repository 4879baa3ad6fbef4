"""Test helpers for the workloads: feature sets written the way the ETL commits them, without Spark,
and undoing the logging set-up a workload's ``main`` does when a test calls it in-process."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from workloads.manifests import ETL_MANIFEST, EtlCommit, EtlManifest, digest_files, root_digest, write_json_atomic
from workloads.telemetry import LABEL


def feature_rows(seed: int, rows: int) -> dict[str, np.ndarray]:
    """Feature columns where hot, shaky devices fail: a forest learns it well, a stump less so."""
    rng = np.random.default_rng(seed)
    wear = rng.uniform(0, 1, rows)
    columns = {
        "events": rng.integers(15, 25, rows).astype(float),
        "temp_mean": 55 + 35 * wear + rng.normal(0, 4, rows),
        "temp_max": 60 + 35 * wear + rng.normal(0, 4, rows),
        "vib_mean": 0.2 + 1.5 * wear**2 + rng.normal(0, 0.15, rows),
        "vib_max": 0.4 + 1.5 * wear**2 + rng.normal(0, 0.15, rows),
        "pressure_mean": 30 - 5 * wear + rng.normal(0, 2, rows),
        "rpm_mean": 1500 - 300 * wear + rng.normal(0, 50, rows),
        "error_share": np.clip(0.01 + 0.3 * wear**3 + rng.normal(0, 0.03, rows), 0, 1),
        "warn_share": np.clip(0.05 + 0.3 * wear**2 + rng.normal(0, 0.03, rows), 0, 1),
    }
    columns[LABEL] = (rng.uniform(0, 1, rows) < 0.05 + 0.9 * wear**3).astype(np.int32)
    return columns


def write_features(output: Path, *, seed: int = 0, rows: int = 300, commits: int = 2) -> EtlManifest:
    """An ETL output directory (commits of Parquet features plus the manifest) holding ``rows`` rows."""
    manifest = EtlManifest()
    data = feature_rows(seed, rows)
    bounds = np.linspace(0, rows, commits + 1).astype(int)
    for seq in range(1, commits + 1):
        name = f"commits/commit-{seq:06d}"
        directory = output / name / "features"
        directory.mkdir(parents=True)
        part = slice(bounds[seq - 1], bounds[seq])
        table = pa.table({k: v[part] for k, v in data.items()})
        pq.write_table(table, directory / "part-00000.parquet")
        files = digest_files(output, [directory / "part-00000.parquet"])
        manifest.commits.append(EtlCommit(
            seq=seq, path=name, batches=[], rows_in=0, rows_clean=0, rows_quarantined=0, duplicates_dropped=0,
            missing_filled=0, feature_rows=table.num_rows, committed_at=time.time(), files=files))
    manifest.root = root_digest(f for c in manifest.commits for f in c.files)
    write_json_atomic(output / ETL_MANIFEST, manifest)
    return manifest


def instance(hot: bool) -> dict[str, float]:
    """One feature row for ``POST /predict``: a worn, hot device or a fresh one."""
    wear = 1.0 if hot else 0.0
    return {"events": 20.0, "temp_mean": 55 + 35 * wear, "temp_max": 60 + 35 * wear, "vib_mean": 0.2 + 1.5 * wear,
            "vib_max": 0.4 + 1.5 * wear, "pressure_mean": 30 - 5 * wear, "rpm_mean": 1500 - 300 * wear,
            "error_share": 0.01 + 0.3 * wear, "warn_share": 0.05 + 0.3 * wear}



@contextmanager
def restored_logging() -> Iterator[None]:
    """A workload's ``main`` points logging at the stderr of the moment (pytest's capture, closed after the
    test); put back what was there, so later tests do not log into a closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
