"""The ETL job's Spark transformations: raw landing lines in, clean events, quarantine and features out.

Each step is a function from DataFrame to DataFrame, with no I/O of its own
besides ``load_raw`` and ``write_commit``, so tests drive them on small
in-memory frames in ``local[2]``:

- ``load_raw``: every landing file read as text columns (no inference: a bad
  value must not turn a whole column into strings or nulls), malformed lines
  kept in ``_corrupt_record``, the file name in ``batch``;
- ``type_events``: typed columns (``try_cast``: a value that does not parse
  is null, never an error, also under ANSI mode) and ``reason``, why a row is
  unusable (malformed line, missing id, bad timestamp, not a number, out of
  range, bad label, bad status) or null;
- ``split_events``: usable rows, duplicates dropped (same event id: at-least-
  once delivery), and the quarantine (raw values plus the reason);
- ``fill_missing``: an empty sensor value takes its device's mean in that
  batch, else the mean over all devices; an empty status is ``unknown``;
- ``aggregate_features``: one row per device and batch: ``telemetry.FEATURES``
  and the label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

from pyspark.sql import Column, DataFrame, DataFrameReader, SparkSession, Window
from pyspark.sql import functions as F  # noqa: N812 - Spark's own convention
from pyspark.sql.types import StringType, StructField, StructType

from workloads.telemetry import COLUMNS, LABEL, NUMERIC, RANGES, STATUSES

CORRUPT = "_corrupt_record"
RAW_SCHEMA = StructType([StructField(name, StringType()) for name in (*COLUMNS, CORRUPT)])


@dataclass(frozen=True, slots=True)
class CommitStats:
    rows_in: int
    rows_quarantined: int
    duplicates_dropped: int
    rows_clean: int
    missing_filled: int
    feature_rows: int


def load_raw(spark: SparkSession, files: list[Path]) -> DataFrame:
    """All ``files`` (``.csv`` with a header, ``.jsonl``) as text columns plus ``batch`` (the file name)."""
    def reader() -> DataFrameReader:
        return spark.read.schema(RAW_SCHEMA).option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT)

    frames = []
    csvs = [str(f) for f in files if f.suffix == ".csv"]
    jsons = [str(f) for f in files if f.suffix == ".jsonl"]
    if csvs:
        frames.append(reader().option("header", "true").csv(csvs))
    if jsons:
        frames.append(reader().json(jsons))
    if not frames:
        raise ValueError("no .csv or .jsonl files to read")
    # The hidden _metadata column exists on a file source only, so it is taken before the union.
    return reduce(DataFrame.unionByName, [f.withColumn("batch", F.col("_metadata.file_name")) for f in frames])


def _blank(column: str) -> Column:
    return F.col(column).isNull() | (F.trim(F.col(column)) == "")


def type_events(raw: DataFrame) -> DataFrame:
    """Typed copies of the raw columns (``<name>_v``) and ``reason`` (null for a usable row)."""
    typed = raw
    for name in NUMERIC:
        typed = typed.withColumn(f"{name}_v", F.expr(f"try_cast(`{name}` AS DOUBLE)"))
    typed = (typed.withColumn("ts_v", F.expr("try_cast(`ts` AS TIMESTAMP)"))
             .withColumn("failure_v", F.expr("try_cast(`failure` AS INT)")))
    not_a_number = reduce(lambda a, b: a | b,
                          [~_blank(n) & F.col(f"{n}_v").isNull() for n in NUMERIC])
    out_of_range = reduce(lambda a, b: a | b,
                          [(F.col(f"{n}_v") < low) | (F.col(f"{n}_v") > high) for n, (low, high) in RANGES.items()])
    reason = (F.when(F.col(CORRUPT).isNotNull(), "malformed line")
              .when(_blank("event_id") | _blank("device_id"), "missing id")
              .when(_blank("ts"), "missing timestamp")
              .when(F.col("ts_v").isNull(), "bad timestamp")
              .when(not_a_number, "not a number")
              .when(out_of_range, "out of range")
              .when(F.col("failure_v").isNull() | ~F.col("failure_v").isin(0, 1), "bad label")
              .when(~_blank("status") & ~F.col("status").isin(*STATUSES), "bad status"))
    return typed.withColumn("reason", reason)


def split_events(typed: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(usable events with duplicates dropped, quarantined rows with their raw values and reason)."""
    quarantine = typed.where(F.col("reason").isNotNull()).select(*COLUMNS, CORRUPT, "batch", "reason")
    usable = typed.where(F.col("reason").isNull()).dropDuplicates(["event_id"])
    events = usable.select(
        "event_id", "device_id", F.col("ts_v").alias("ts"), *(F.col(f"{n}_v").alias(n) for n in NUMERIC),
        F.when(_blank("status"), None).otherwise(F.col("status")).alias("status"),
        F.col("failure_v").alias("failure"), "batch")
    return events, quarantine


def count_missing(events: DataFrame) -> Column:
    """An aggregate: empty sensor and status cells of ``events``."""
    return reduce(lambda a, b: a + b, [F.sum(F.col(n).isNull().cast("int")) for n in (*NUMERIC, "status")])


def fill_missing(events: DataFrame) -> DataFrame:
    """Empty sensor values: the device's mean in that batch, else the mean of the whole frame; status: unknown."""
    by_device = Window.partitionBy("device_id", "batch")
    means = events.agg(*(F.avg(n).alias(n) for n in NUMERIC)).first()
    filled = events
    for name in NUMERIC:
        overall = means[name] if means is not None and means[name] is not None else 0.0
        filled = filled.withColumn(name, F.coalesce(F.col(name), F.avg(name).over(by_device), F.lit(float(overall))))
    return filled.withColumn("status", F.coalesce(F.col("status"), F.lit("unknown")))


def aggregate_features(events: DataFrame) -> DataFrame:
    """One row per (device, batch): ``telemetry.FEATURES``, ``window_start`` and the label ``failed``."""
    def share(status: str) -> Column:
        return F.avg((F.col("status") == status).cast("double"))

    return (events.groupBy("device_id", "batch").agg(
        F.min("ts").alias("window_start"),
        F.count(F.lit(1)).cast("double").alias("events"),
        F.avg("temperature").alias("temp_mean"), F.max("temperature").alias("temp_max"),
        F.avg("vibration").alias("vib_mean"), F.max("vibration").alias("vib_max"),
        F.avg("pressure").alias("pressure_mean"), F.avg("rpm").alias("rpm_mean"),
        share("error").alias("error_share"), share("warn").alias("warn_share"),
        F.max("failure").alias(LABEL),
    ).orderBy("batch", "device_id"))


def write_commit(spark: SparkSession, files: list[Path], staging: Path,
                 stage: Callable[[str], None] = lambda _: None) -> CommitStats:
    """Clean ``files`` and write ``features/`` and ``quarantine/`` Parquet under ``staging``.

    ``stage`` is told before each Spark job, so the job's progress moves with its work.
    """
    typed = type_events(load_raw(spark, files)).cache()
    try:
        stage("reading")
        totals = typed.agg(F.count(F.lit(1)).alias("rows"), F.count("reason").alias("bad")).first()
        assert totals is not None  # noqa: S101 - an aggregate without grouping has one row
        events, quarantine = split_events(typed)
        events = events.cache()
        stage("deduplicating")
        kept = events.agg(F.count(F.lit(1)).alias("rows"), count_missing(events).alias("missing")).first()
        assert kept is not None  # noqa: S101 - as above
        stage("filling missing values")
        features = aggregate_features(fill_missing(events))
        stage("writing features")
        features.coalesce(1).write.parquet(str(staging / "features"))
        stage("writing quarantine")
        quarantine.coalesce(1).write.parquet(str(staging / "quarantine"))
        feature_rows = spark.read.parquet(str(staging / "features")).count()
        events.unpersist()
    finally:
        typed.unpersist()
    usable = int(totals["rows"]) - int(totals["bad"])
    return CommitStats(rows_in=int(totals["rows"]), rows_quarantined=int(totals["bad"]),
                       duplicates_dropped=usable - int(kept["rows"]), rows_clean=int(kept["rows"]),
                       missing_filled=int(kept["missing"] or 0), feature_rows=feature_rows)
