"""The ETL's cleaning logic on small in-memory frames, with real pyspark in ``local[2]``.

One Spark session for the module (starting one costs seconds); each test
builds the few rows it needs, as text columns the way ``load_raw`` reads
them, so every cleaning rule is checked against a row made to break it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.spark_support import LIGHT_CONF, require_spark

require_spark()  # fails the module naming what to install, before the imports below would

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402, N812

from workloads.cleaning import (  # noqa: E402
    RAW_SCHEMA,
    aggregate_features,
    count_missing,
    fill_missing,
    split_events,
    type_events,
    write_commit,
)
from workloads.telemetry import COLUMNS, make_batch  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder: Any = SparkSession.builder.master("local[2]").appName("selfheal-tests")
    for key, value in {**LIGHT_CONF, "spark.sql.session.timeZone": "UTC"}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


GOOD = {"event_id": "e1", "device_id": "dev-1", "ts": "2023-11-14T22:13:20.000Z", "temperature": "70.5",
        "vibration": "0.5", "pressure": "30", "rpm": "1500", "status": "ok", "failure": "0"}


def raw_frame(spark: Any, rows: list[dict[str, str | None]]) -> Any:
    data = [tuple(row.get(c) for c in (*COLUMNS, "_corrupt_record")) for row in rows]
    frame = spark.createDataFrame(data, schema=RAW_SCHEMA)
    return frame.withColumn("batch", F.lit("batch-000001.csv"))


def local(moment: datetime) -> datetime:
    """How pyspark hands a timestamp to Python: naive, in the process's local time zone."""
    return moment.astimezone().replace(tzinfo=None)


def row(**changes: str | None) -> dict[str, str | None]:
    return {**GOOD, **changes}


REASONS = [
    (row(), None),
    (row(temperature=None, status=None), None),  # missing values are filled, not quarantined
    (row(status=" "), None),
    (row(_corrupt_record="e1,dev-1"), "malformed line"),
    (row(event_id=None), "missing id"),
    (row(device_id=" "), "missing id"),
    (row(ts=None), "missing timestamp"),
    (row(ts="yesterday"), "bad timestamp"),
    (row(temperature="n/a"), "not a number"),
    (row(vibration="ERR"), "not a number"),
    (row(temperature="9999"), "out of range"),
    (row(rpm="-5"), "out of range"),
    (row(failure="maybe"), "bad label"),
    (row(failure="2"), "bad label"),
    (row(failure=None), "bad label"),
    (row(status="on fire"), "bad status"),
]


def test_every_unusable_row_gets_its_reason(spark: Any) -> None:
    rows = [{**r, "event_id": r["event_id"] and f"e{i}"} for i, (r, _) in enumerate(REASONS)]
    typed = type_events(raw_frame(spark, rows)).select("event_id", "device_id", "reason").collect()
    by_device_and_order = [t["reason"] for t in typed]
    assert by_device_and_order == [reason for _, reason in REASONS]


def test_split_drops_duplicates_and_keeps_raw_values_of_quarantined_rows(spark: Any) -> None:
    rows = [row(event_id="a"), row(event_id="a"), row(event_id="b", status=None), row(event_id="c", rpm="fast")]
    events, quarantine = split_events(type_events(raw_frame(spark, rows)))
    kept = {r["event_id"]: r for r in events.collect()}
    assert sorted(kept) == ["a", "b"]
    assert kept["b"]["status"] is None
    assert kept["a"]["ts"] == local(datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC))  # typed: a timestamp
    assert isinstance(kept["a"]["temperature"], float)
    (bad,) = quarantine.collect()
    assert (bad["event_id"], bad["rpm"], bad["reason"], bad["batch"]) == ("c", "fast", "not a number",
                                                                          "batch-000001.csv")


def test_missing_values_take_the_device_mean_then_the_overall_mean(spark: Any) -> None:
    rows = [row(event_id="1", device_id="d1", temperature="60"), row(event_id="2", device_id="d1", temperature="70"),
            row(event_id="3", device_id="d1", temperature=None, status=None),
            row(event_id="4", device_id="d2", temperature="90"),
            row(event_id="5", device_id="d3", temperature=None)]  # d3 has no temperature at all
    events, _ = split_events(type_events(raw_frame(spark, rows)))
    assert events.agg(count_missing(events).alias("m")).first()["m"] == 3
    filled = {r["event_id"]: r for r in fill_missing(events).collect()}
    assert filled["3"]["temperature"] == pytest.approx(65.0)  # d1's mean
    assert filled["5"]["temperature"] == pytest.approx(220 / 3)  # nothing from d3: the mean of all
    assert filled["3"]["status"] == "unknown"
    assert filled["1"]["temperature"] == 60.0


def test_features_aggregate_per_device_and_batch(spark: Any) -> None:
    rows = [row(event_id="1", temperature="60", vibration="0.2", status="ok", failure="0"),
            row(event_id="2", temperature="80", vibration="0.6", status="error", failure="1"),
            row(event_id="3", temperature="70", vibration="0.4", status="warn", failure="0",
                ts="2023-11-14T22:10:00Z"),
            row(event_id="4", device_id="dev-2")]
    events, _ = split_events(type_events(raw_frame(spark, rows)))
    features = {r["device_id"]: r for r in aggregate_features(fill_missing(events)).collect()}
    one = features["dev-1"]
    assert one["events"] == 3.0
    assert (one["temp_mean"], one["temp_max"]) == (pytest.approx(70.0), 80.0)
    assert (one["vib_mean"], one["vib_max"]) == (pytest.approx(0.4), 0.6)
    assert (one["error_share"], one["warn_share"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert one["failed"] == 1
    assert one["window_start"] == local(datetime(2023, 11, 14, 22, 10, tzinfo=UTC))
    assert features["dev-2"]["failed"] == 0


def test_a_generated_batch_is_cleaned_to_exactly_the_truth(spark: Any, tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    files, truth = [], []
    for number, fmt in ((1, "csv"), (2, "jsonl")):
        text, stats = make_batch(4, number, fmt, rows=300, devices=10)  # type: ignore[arg-type]
        path = landing / f"batch-{number:06d}.{fmt}"
        path.write_text(text)
        files.append(path)
        truth.append(stats)
    stats = write_commit(spark, files, tmp_path / "staging")
    assert stats.rows_in == sum(t.lines for t in truth)
    assert stats.rows_quarantined == sum(t.bad + t.malformed for t in truth)
    assert stats.duplicates_dropped == sum(t.duplicates for t in truth)
    assert stats.rows_clean == sum(t.events for t in truth)
    assert stats.missing_filled == sum(t.missing_cells for t in truth)
    assert stats.feature_rows == 20  # 10 devices x 2 batches
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == ["features", "quarantine"]
