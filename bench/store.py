"""SQLite group commit: many incidents opening at once, with batching on and off, on a real file.

A rack that loses power opens hundreds of ``node_offline`` incidents
together. Here each opening is what the engine writes for one: an
``open_incident``, three ``append_timeline`` and a ``save_plan``, made one
after another by its own coroutine, with all ``--incidents`` coroutines
started at once. The same workload runs against a fresh database file in a
temp dir twice per round: with the store's default ``max_batch`` (writes
queued while the worker is busy share one transaction) and with
``max_batch=1`` (every write its own transaction). Each figure is the
fastest of ``--repeat`` rounds (the machine is shared; the fastest round is
the least disturbed). A second, smaller workload opens incidents one at a
time, where nothing can be batched: it shows what group commit costs a lone
write. After every run each incident's hash chain is verified
(``controller.audit.verify_database``) and the rows are counted, so a fast
wrong answer fails the bench instead of being reported.

    .venv/bin/python bench/store.py [--incidents 500] [--sequential 100] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

from controller.audit import verify_database
from controller.store import MAX_BATCH, PlanRecord, SqliteStore

T0 = 1_700_000_000.0
APPENDS = 3
WRITES_PER_OPENING = 2 + APPENDS  # open_incident, the appends, save_plan


async def open_one(store: SqliteStore, i: int) -> None:
    """What the engine writes for one new node_offline incident."""
    incident = await store.open_incident(
        key=f"node_offline/rack-1-node-{i:05d}", kind="node_offline", node=f"rack-1-node-{i:05d}", unit=None,
        severity="critical", summary="node silent for 30s", rule="fence-offline-node", opened_at=T0 + i,
        evidence={"last_seen": T0 + i - 30, "offline_after": 30}, details={"labels": {"rack": "1"}})
    for step in range(APPENDS):
        await store.append_timeline(incident.id, at=T0 + i + step, kind="notice",
                                    data={"event": "opened", "step": step, "deliveries": []})
    await store.save_plan(PlanRecord(id=f"{incident.id}-1", incident_id=incident.id, rule="fence-offline-node",
                                     attempt=1, state="proposed", created_at=T0 + i, updated_at=T0 + i,
                                     detail={"steps": ["fence"]}, action="fence"))


async def run(path: Path, *, incidents: int, max_batch: int, concurrent: bool) -> float:
    """Seconds to write ``incidents`` openings into a fresh database at ``path``, checked afterwards."""
    store = await SqliteStore.open(path, max_batch=max_batch)
    try:
        started = time.perf_counter()
        if concurrent:
            await asyncio.gather(*(open_one(store, i) for i in range(incidents)))
        else:
            for i in range(incidents):
                await open_one(store, i)
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
    check(path, incidents)
    return elapsed


def check(path: Path, incidents: int) -> None:
    counted, problems = verify_database(path)
    with closing(sqlite3.connect(path)) as db:
        entries = db.execute("SELECT count(*) FROM timeline").fetchone()[0]
        plans = db.execute("SELECT count(*) FROM plans").fetchone()[0]
    expected = (incidents, incidents * (1 + APPENDS), incidents)
    if problems or (counted, entries, plans) != expected:
        sys.exit(f"wrong database after the run: {(counted, entries, plans)} rows, expected {expected}; "
                 f"chain problems: {problems[:3]}")


async def fastest(root: Path, name: str, *, incidents: int, max_batch: int, concurrent: bool,
                  repeat: int) -> float:
    times = []
    for round_ in range(repeat):
        path = root / f"{name}-{round_}.db"
        times.append(await run(path, incidents=incidents, max_batch=max_batch, concurrent=concurrent))
    return min(times)


async def measure(incidents: int, sequential: int, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="selfheal-store-bench-") as tmp:
        root = Path(tmp)
        figures: dict[str, float] = {}
        for concurrent, count in ((True, incidents), (False, sequential)):
            shape = "concurrent" if concurrent else "sequential"
            for label, max_batch in (("batched", MAX_BATCH), ("unbatched", 1)):
                figures[f"{shape}_{label}_s"] = await fastest(root, f"{shape}-{label}", incidents=count,
                                                              max_batch=max_batch, concurrent=concurrent,
                                                              repeat=repeat)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incidents", type=int, default=500, help="incidents opening at once (default 500)")
    parser.add_argument("--sequential", type=int, default=100,
                        help="incidents opened one at a time, the lone-write check (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the fastest counts (default 3)")
    parser.add_argument("--json", action="store_true", help="end with one line holding a JSON object of the figures")
    args = parser.parse_args()
    if min(args.incidents, args.sequential, args.repeat) < 1:
        parser.error("--incidents, --sequential and --repeat must be at least 1")

    figures = asyncio.run(measure(args.incidents, args.sequential, args.repeat))
    writes = args.incidents * WRITES_PER_OPENING
    batched, unbatched = figures["concurrent_batched_s"], figures["concurrent_unbatched_s"]
    lone_batched, lone_unbatched = figures["sequential_batched_s"], figures["sequential_unbatched_s"]
    result = {
        "incidents": args.incidents, "writes": writes, "max_batch": MAX_BATCH, "repeat": args.repeat,
        **{k: round(v, 4) for k, v in figures.items()},
        "concurrent_batched_writes_per_s": round(writes / batched),
        "concurrent_unbatched_writes_per_s": round(writes / unbatched),
        "speedup": round(unbatched / batched, 2),
        "sequential_incidents": args.sequential,
        "sequential_batched_ms_per_write": round(lone_batched / (args.sequential * WRITES_PER_OPENING) * 1000, 3),
        "sequential_unbatched_ms_per_write": round(lone_unbatched / (args.sequential * WRITES_PER_OPENING) * 1000,
                                                   3),
    }
    print(f"{args.incidents} incidents opening at once ({writes} writes: open + {APPENDS} timeline appends + "
          f"a plan each), fastest of {args.repeat}, real file, WAL, synchronous=NORMAL:")
    print(f"  group commit (max_batch={MAX_BATCH}): {batched:.3f} s  {result['concurrent_batched_writes_per_s']} "
          "writes/s")
    print(f"  one transaction per write (max_batch=1): {unbatched:.3f} s  "
          f"{result['concurrent_unbatched_writes_per_s']} writes/s")
    print(f"  ratio unbatched / batched: {result['speedup']}x")
    print(f"{args.sequential} incidents opened one at a time (nothing to batch): "
          f"{result['sequential_batched_ms_per_write']} ms per write with group commit, "
          f"{result['sequential_unbatched_ms_per_write']} ms without")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
