"""Dataset replicas shared across controllers (``controller.shared_replicas``) on PostgreSQL: what a takeover's
records cost to write, and what the once-a-second exchange costs as the fleet grows.

Per fleet size (one dataset replica per node), in a database the bench creates and drops on the server of
``--postgres``: controller ``c1`` holds the 64 bucket leases (real ``claim``, so every record is written
through the store's epoch fence) and ``c2`` reads. Measured:

- **takeover**: ``c1`` hears every node's replica at once and writes them all (``SharedReplicas.save``);
- **exchange**, once the takeover's records are older than the overlap, ``--rounds`` rounds one second apart
  (the controllers' pace): ``--changes`` nodes report a new root, ``c1`` writes their records, ``c2`` reads
  what changed (``SharedReplicas.sync``: by sequence, plus the last ``OVERLAP`` seconds again) — median and
  95th percentile of each, and the records a read returned;
- **anchor**, in the same run: ``c2`` reading the whole table, what an exchange without change tracking would
  do every second.

The goal is the product's: cost does not grow with the fleet — the exchange at 10,000 nodes within 1.5 times its
cost at 1,000, while the whole-table read grows with the fleet.

    .venv/bin/python bench/shared_replicas.py --postgres postgresql://postgres@127.0.0.1/postgres
        [--fleets 1000,10000] [--changes 100] [--rounds 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.store import database
from controller.leases import claim
from controller.pgstore import PostgresStore, migrate
from controller.shared_replicas import OVERLAP, SharedReplicas
from selfheal.wire import BUCKETS, DatasetSummary, bucket_of


def summary(node: int, generation: int) -> dict[str, DatasetSummary]:
    root = f"blake3:{node:08x}{generation:056x}"
    return {"train": DatasetSummary(name="train", root=root, files=1000, bytes=1 << 30, generation=generation,
                                    state="ok", chunk_size=1 << 22, scanned_at=time.time())}


def ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered) * 1000, 2),
            "p95_ms": round(ordered[max(0, round(0.95 * len(ordered)) - 1)] * 1000, 2)}


async def fleet(url: str, nodes: int, *, changes: int, rounds: int) -> dict[str, Any]:
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url)
    await migrate(conn)
    epochs = await claim(conn, "c1", range(BUCKETS), 3600.0)
    await conn.close()
    writer_store, reader_store = await PostgresStore.open(url), await PostgresStore.open(url)
    writer_store.fence_commands = True
    try:
        writer = SharedReplicas(lambda node: epochs.get(bucket_of(node)))
        reader = SharedReplicas(lambda node: None)
        names = [f"node-{i:05}" for i in range(nodes)]
        for i, node in enumerate(names):
            writer.heard(node, summary(i, 1), online=True, http=f"10.0.{i // 250}.{i % 250}:8731")
        started = time.perf_counter()
        await writer.save(writer_store)
        takeover = time.perf_counter() - started
        await reader.sync(reader_store)  # the first read: everything
        assert sum(len(r) for r in reader.elsewhere.values()) == nodes, "a record was not written"
        first, since = await reader_store.replicas_changed(after=0, since=None)  # the bench's own cursor, to count
        after = max(r.seq for r in first)  # what each read returns (not timed)
        await asyncio.sleep(OVERLAP + 1)  # the steady state: the takeover's records out of the overlap
        await reader.sync(reader_store)
        _, since = await reader_store.replicas_changed(after=after, since=since - OVERLAP)
        saves, syncs, reads, full = [], [], [], []
        for round_ in range(rounds):
            begun = time.perf_counter()
            for k in range(changes):
                i = (round_ * changes + k) % nodes
                writer.heard(names[i], summary(i, 2 + round_), online=True, http=f"10.0.{i // 250}.{i % 250}:8731")
            t0 = time.perf_counter()
            await writer.save(writer_store)
            t1 = time.perf_counter()
            changed = await reader.sync(reader_store)
            t2 = time.perf_counter()
            records, since = await reader_store.replicas_changed(after=after, since=since - OVERLAP)  # counted only
            after = max([after, *(r.seq for r in records)])
            t3 = time.perf_counter()
            await reader_store.replicas_changed(after=0, since=None)
            t4 = time.perf_counter()
            assert len(changed) == 1, changed
            saves.append(t1 - t0)
            syncs.append(t2 - t1)
            reads.append(len(records))
            full.append(t4 - t3)
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - begun)))
        return {"nodes": nodes, "takeover_s": round(takeover, 3), "takeover_records_per_s": round(nodes / takeover),
                "save": ms(saves), "sync": ms(syncs), "records_read_median": statistics.median(reads),
                "whole_table_read": ms(full)}
    finally:
        await writer_store.close()
        await reader_store.close()


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for nodes in args.fleets:
        async with database(args.postgres) as url:
            results.append(await fleet(url, nodes, changes=args.changes, rounds=args.rounds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", required=True, help="a server URL whose user may create databases")
    parser.add_argument("--fleets", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000])
    parser.add_argument("--changes", type=int, default=100, help="replicas changed per second (default 100)")
    parser.add_argument("--rounds", type=int, default=20, help="one-second rounds per fleet (default 20)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(measure(args))
    for r in results:
        print(f"{r['nodes']:>6} nodes: takeover {r['takeover_s']:.2f} s ({r['takeover_records_per_s']}/s); "
              f"per second: save {r['save']['median_ms']} ms (p95 {r['save']['p95_ms']}), "
              f"sync {r['sync']['median_ms']} ms (p95 {r['sync']['p95_ms']}, {r['records_read_median']} records); "
              f"anchor, the whole table read: {r['whole_table_read']['median_ms']} ms")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        ratio = large["sync"]["median_ms"] / max(small["sync"]["median_ms"], 1e-9)
        anchor = large["whole_table_read"]["median_ms"] / max(small["whole_table_read"]["median_ms"], 1e-9)
        print(f"sync {large['nodes']} / {small['nodes']} nodes: {ratio:.2f} (goal <= 1.5); "
              f"the whole-table read: {anchor:.2f}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
