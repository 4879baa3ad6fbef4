"""``python -m workloads.etl``: the Spark ETL job — landing batches in, clean features out, committed atomically.

Each run reads the output's ``manifest.json`` (the commit record, see
``workloads.manifests``), throws away whatever a killed run left uncommitted
(``_staging/``, commit directories the manifest does not name), and takes the
landing batches the manifest does not list yet, ``--batches-per-commit`` at a
time. For each group it cleans and aggregates with Spark
(``workloads.cleaning``) into ``_staging/commit-NNNNNN.<pid>/``, renames that
to ``commits/commit-NNNNNN/`` and then replaces the manifest, which adds the
commit: its batches (name, sha256, size), counts (rows in, quarantined,
duplicates dropped, missing values filled, feature rows) and a sha256 of
every file written, with a root digest over all committed files. A restart
therefore resumes from the last commit and never writes a batch twice; a
reader that goes by the manifest never sees half a commit.

The master is ``--master`` (``SELFHEAL_ETL_MASTER``), else the one
``spark-submit`` or ``PYSPARK_SUBMIT_ARGS`` gives (the ``spark`` unit kind
passes its own that way), else ``local[*]``: the same job runs unchanged
against ``spark://host:port``, YARN or Kubernetes, as long as the landing and
output paths are visible to the driver and every executor (a shared mount).

``--hold-file PATH`` is fault injection for tests and the demo: while the file
exists, the job waits, without progress, before each commit of a run but its
first — a stalled job with committed output behind it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import time
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workloads.jobs import EX_TEMPFAIL, JobParser, Progress, fail, hold, hold_exclusive, run, setup
from workloads.manifests import (
    ETL_MANIFEST,
    BatchInput,
    EtlCommit,
    EtlManifest,
    FileDigest,
    digest_files,
    fsync_dir,
    read_etl_manifest,
    root_digest,
    sha256_file,
    write_json_atomic,
)
from workloads.telemetry import BATCH_NAME

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

NO_PYSPARK = ("pyspark is not installed: install selfheal with its `spark` extra "
              "(pip install 'selfheal[spark]') — the ETL job needs Spark")
NO_JAVA = ("Java 17+ not found: Spark needs a Java 17+ runtime (Debian: openjdk-17-jre-headless); "
           "put java on PATH or set JAVA_HOME")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = JobParser("etl", "Spark ETL: clean landing batches, aggregate features, commit Parquet atomically "
                              "with a manifest; restartable from the last commit.")
    parser.option("--landing", type=Path, help="directory the generator lands batches in")
    parser.option("--output", type=Path, help="output directory: manifest.json and commits/")
    parser.option("--master", help="Spark master URL (default: spark-submit's, else local[*])")
    parser.option("--app-name", help="Spark application name (default: spark-submit's --name, else selfheal-etl)")
    parser.option("--batches-per-commit", type=int, default=4, help="landing batches cleaned into one commit")
    parser.option("--shuffle-partitions", type=int, default=8, help="spark.sql.shuffle.partitions")
    parser.option("--hold-file", type=Path, help="fault injection: wait before later commits while it exists")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark property (repeatable)")
    return parser.parse_args(argv)


def pending_batches(landing: Path, manifest: EtlManifest) -> list[Path]:
    """Landing batches the manifest does not list, in batch order."""
    done = manifest.batches()
    found = [(int(m.group(1)), p) for p in landing.iterdir() if (m := BATCH_NAME.match(p.name))]
    return [p for _, p in sorted(found) if p.name not in done]


def discard_uncommitted(output: Path, manifest: EtlManifest, log: Any) -> None:
    """Remove what a killed run left: staging directories and commit directories the manifest does not name."""
    committed = {c.path for c in manifest.commits}
    shutil.rmtree(output / "_staging", ignore_errors=True)
    commits = output / "commits"
    if commits.is_dir():
        for path in sorted(commits.iterdir()):
            if f"commits/{path.name}" not in committed:
                log.warning("etl.discarding_uncommitted", path=str(path))
                shutil.rmtree(path, ignore_errors=True)


def tidy(staging: Path) -> list[Path]:
    """Drop Hadoop's checksum and marker files from a staging commit; the data files that remain."""
    for path in list(staging.rglob("*")):
        if path.is_file() and (path.name.endswith(".crc") or path.name.startswith("_")):
            path.unlink()
    return sorted(p for p in staging.rglob("*") if p.is_file())


def commit(output: Path, manifest: EtlManifest, staging: Path, batches: list[Path], stats: Any) -> EtlCommit:
    """Rename ``staging`` into ``commits/`` and add it to the manifest (replaced atomically)."""
    seq = len(manifest.commits) + 1
    name = f"commit-{seq:06d}"
    final = output / "commits" / name
    files = digest_files(staging, tidy(staging))
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    fsync_dir(final.parent)
    entry = EtlCommit(
        seq=seq, path=f"commits/{name}",
        batches=[BatchInput(name=b.name, sha256=sha256_file(b), bytes=b.stat().st_size) for b in batches],
        rows_in=stats.rows_in, rows_clean=stats.rows_clean, rows_quarantined=stats.rows_quarantined,
        duplicates_dropped=stats.duplicates_dropped, missing_filled=stats.missing_filled,
        feature_rows=stats.feature_rows, committed_at=time.time(),
        files=[FileDigest(path=f"commits/{name}/{f.path}", sha256=f.sha256, bytes=f.bytes) for f in files],
    )
    manifest.commits.append(entry)
    manifest.root = root_digest(f for c in manifest.commits for f in c.files)
    manifest.updated_at = entry.committed_at
    write_json_atomic(output / ETL_MANIFEST, manifest)
    return entry


def java_found() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        return os.access(Path(java_home) / "bin" / "java", os.X_OK)
    return shutil.which("java") is not None


def build_session(args: argparse.Namespace) -> SparkSession:
    from pyspark.sql import SparkSession  # noqa: PLC0415 - pyspark is an optional extra, checked first

    builder: Any = SparkSession.builder
    # spark-submit (and the spark unit kind, through PYSPARK_SUBMIT_ARGS) names the application already.
    named = "PYSPARK_GATEWAY_PORT" in os.environ or "--name" in os.environ.get("PYSPARK_SUBMIT_ARGS", "")
    if args.app_name or not named:
        builder = builder.appName(args.app_name or "selfheal-etl")
    if args.master:
        builder = builder.master(args.master)
    settings = {
        "spark.sql.shuffle.partitions": str(args.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.showConsoleProgress": "false",
        "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
    }
    for item in args.conf:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(fail(f"--conf {item!r} is not KEY=VALUE"))
        settings[key] = value
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark: SparkSession = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _stage(progress: Progress, commit: str, step: str) -> None:
    progress.update(stage=f"{commit}: {step}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = setup("etl", args.log_level)
    if args.landing is None or args.output is None:
        return fail("--landing and --output (or SELFHEAL_ETL_LANDING / SELFHEAL_ETL_OUTPUT) are required")
    if args.batches_per_commit < 1:
        return fail("--batches-per-commit must be >= 1")
    progress = Progress(args.progress)
    if importlib.util.find_spec("pyspark") is None:
        return fail(NO_PYSPARK)
    if not java_found():
        return fail(NO_JAVA)
    from workloads.cleaning import write_commit  # noqa: PLC0415 - imports pyspark, checked just above

    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    args.landing.mkdir(parents=True, exist_ok=True)
    if not hold_exclusive(output):
        return fail(f"another etl run holds {output}; not running a second copy", EX_TEMPFAIL)
    manifest = read_etl_manifest(output)
    discard_uncommitted(output, manifest, log)
    pending = pending_batches(args.landing, manifest)
    done = len(manifest.batches())
    log.info("etl.planned", committed_batches=done, pending_batches=len(pending), commits=len(manifest.commits))
    if not pending:
        progress.update(done, total=done, stage="done")
        return 0
    spark = build_session(args)
    # The run's first progress once Spark is up: a slow JVM start is start_timeout's to judge, not a stall.
    progress.update(done, total=done + len(pending), stage="planned")
    try:
        groups = [pending[i:i + args.batches_per_commit] for i in range(0, len(pending), args.batches_per_commit)]
        for index, group in enumerate(groups):
            seq = len(manifest.commits) + 1
            staging = output / "_staging" / f"commit-{seq:06d}.{os.getpid()}"
            started = time.monotonic()
            stats = write_commit(spark, group, staging, partial(_stage, progress, f"commit-{seq:06d}"))
            if index > 0:
                hold(args.hold_file, progress, log)
            entry = commit(output, manifest, staging, group, stats)
            done += len(group)
            progress.update(done, stage=f"committed commit-{seq:06d}")
            log.info("etl.committed", commit=entry.path, batches=[b.name for b in entry.batches],
                     rows_in=entry.rows_in, rows_clean=entry.rows_clean, quarantined=entry.rows_quarantined,
                     duplicates=entry.duplicates_dropped, missing_filled=entry.missing_filled,
                     feature_rows=entry.feature_rows, seconds=round(time.monotonic() - started, 2),
                     root=manifest.root)
    finally:
        # Stopped by SIGTERM, the JVM (same process group) may be gone already: nothing left to stop then.
        with suppress(Exception):  # py4j raises whatever the dead gateway gives
            spark.stop()
    shutil.rmtree(output / "_staging", ignore_errors=True)
    progress.update(stage="done")
    return 0


if __name__ == "__main__":
    run(main)
