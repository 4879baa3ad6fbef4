"""``python -m workloads.generate``: land telemetry batches in a landing directory on a schedule.

The demo's data source, also usable against a real directory. Each batch is
one file, ``batch-NNNNNN.csv`` or ``.jsonl``, holding one time window of
events from every device with realistic dirt (``workloads.telemetry``):
missing values, duplicate deliveries, bad values and malformed lines. Files
are written to a dot-named temp file and renamed, so a reader never sees half
a batch. Numbering continues after the highest batch already landed, so a
restarted generator never overwrites one.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from workloads.jobs import JobParser, Progress, fail, run, setup
from workloads.telemetry import BATCH_NAME, Dirt, Format, batch_file_name, make_batch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = JobParser("generate", "Land telemetry batches (CSV / JSON lines, with realistic dirt) in a "
                                   "landing directory on a schedule.")
    dirt = Dirt()
    parser.option("--landing", type=Path, help="directory the batches land in")
    parser.option("--batches", type=int, default=1, help="batches to land, then exit; 0: forever")
    parser.option("--every", type=float, default=0.0, help="seconds between batches")
    parser.option("--rows", type=int, default=400, help="events per batch")
    parser.option("--devices", type=int, default=20, help="devices reporting")
    parser.option("--format", default="mixed", choices=["csv", "jsonl", "mixed"],
                  help="file format; mixed alternates by batch number")
    parser.option("--seed", type=int, default=1, help="random seed: the same seed lands the same data")
    parser.option("--start", type=float, default=1_700_000_000.0, help="epoch seconds of batch 0's window")
    parser.option("--span", type=float, default=600.0, help="seconds of events each batch covers")
    parser.option("--missing", type=float, default=dirt.missing, help="share of sensor cells left empty")
    parser.option("--duplicates", type=float, default=dirt.duplicates, help="share of events delivered twice")
    parser.option("--bad", type=float, default=dirt.bad, help="share of events with an unusable value")
    parser.option("--malformed", type=float, default=dirt.malformed, help="share of extra malformed lines")
    return parser.parse_args(argv)


def next_batch_number(landing: Path) -> int:
    """One past the highest batch already in ``landing`` (1 for an empty one)."""
    numbers = [int(m.group(1)) for p in landing.iterdir() if (m := BATCH_NAME.match(p.name))]
    return max(numbers, default=0) + 1


def land(landing: Path, number: int, text: str, fmt: Format) -> Path:
    """Write one batch atomically: a dot-named temp file in the same directory, then rename."""
    final = landing / batch_file_name(number, fmt)
    tmp = landing / f".{final.name}.tmp"
    with tmp.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(final)
    return final


def main(argv: list[str] | None = None) -> int:
    args = vars(parse_args(argv))
    log = setup("generate", args["log_level"])
    if args["landing"] is None:
        return fail("--landing (or SELFHEAL_GENERATE_LANDING) is required")
    if args["batches"] < 0 or args["every"] < 0 or args["rows"] < 1 or args["devices"] < 1:
        return fail("--batches and --every must be >= 0, --rows and --devices >= 1")
    landing: Path = args["landing"]
    landing.mkdir(parents=True, exist_ok=True)
    total = args["batches"] or None
    progress = Progress(args["progress"], total=total)
    dirt = Dirt(missing=args["missing"], duplicates=args["duplicates"], bad=args["bad"], malformed=args["malformed"])
    progress.update(0, stage="landing")
    landed = 0
    while total is None or landed < total:
        if landed and args["every"]:
            time.sleep(args["every"])
        number = next_batch_number(landing)
        fmt: Format = args["format"] if args["format"] != "mixed" else ("csv" if number % 2 else "jsonl")
        text, stats = make_batch(args["seed"], number, fmt, rows=args["rows"], devices=args["devices"],
                                 start=args["start"], span=args["span"], dirt=dirt)
        path = land(landing, number, text, fmt)
        landed += 1
        progress.update(landed, stage="landing")
        log.info("batch.landed", path=str(path), lines=stats.lines, events=stats.events,
                 duplicates=stats.duplicates, bad=stats.bad, malformed=stats.malformed,
                 missing_cells=stats.missing_cells)
    progress.update(landed, stage="done")
    return 0


if __name__ == "__main__":
    run(main)
