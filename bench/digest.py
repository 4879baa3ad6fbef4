"""Dataset digest throughput, against raw single-thread hashing of the same bytes in the same run.

1. Fresh scan: a generated dataset of mixed file sizes (default 2 GB: a few
   256 MiB files, many 16 MiB and 1 MiB files, thousands of 64 KiB ones, each
   class about a quarter of the bytes) is scanned with an empty cache by
   ``agent.digests.trees.scan_dataset`` (4 MiB chunks), the agent's code
   path: the walking thread hashes files up to 256 KiB itself and
   ``pool.HASH_WORKERS`` threads (2 here) hash larger ones in spans, so the
   scan may use more than one core. It is also measured with the walking
   thread alone (``workers=0``). The anchors are measured in the same run
   over the same bytes and stay single-thread: raw single-thread BLAKE3 and
   SHA-256 of each file's bytes already in memory (hashing only, no
   reading), and a plain read-and-hash loop (what ``b3sum --num-threads 1``
   does). Every figure reads from the page cache:
   the files are read once before any timing, so the comparison is of CPU
   work, not of the disk. Each figure is the fastest of ``--repeat`` runs
   (default 3): the machine is shared, and the fastest run is the one least
   disturbed. Each size class is also measured alone, which shows where the
   per-file cost lies.
2. Incremental rescan: 10,000 small files (1 KiB, 100 directories), at rest
   (mtimes in the past), scanned once to fill the cache, then again: the
   time of the second scan and how many files it read (goal: 0, well under
   a second). Median of three.

The generated data lives in a temp dir and is deleted at the end. Run:

    .venv/bin/python bench/digest.py [--size 2G] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.digests.cache import DigestCache
from agent.digests.hashing import BLAKE3, DEFAULT, SHA256, Algorithm
from agent.digests.pool import HASH_WORKERS
from agent.digests.trees import scan_dataset

MIB = 1024 * 1024
CHUNK = 4 * MIB
CLASSES = (256 * MIB, 16 * MIB, MIB, 64 * 1024)
PAST_NS = 1_600_000_000 * 10**9
ANCHORS = (
    "Anchors (issue 5, this machine kind): ~2.7 GB/s BLAKE3 and ~1.4 GB/s SHA-256 single-thread in Python; "
    "goal: fresh scan >= 0.8 x raw single-thread BLAKE3 over the same bytes; incremental rescan of 10,000 "
    "unchanged files: 0 re-read, well under a second. The raw figures above were measured in this run; "
    "they stay single-thread, while the scan hashes large files on its worker threads."
)


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": 1024 * MIB}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def generate(root: Path, total: int) -> list[Path]:
    """Files of each size class, about a quarter of ``total`` bytes per class (at least one file each)."""
    pool = os.urandom(32 * MIB)
    files: list[Path] = []
    for size in CLASSES:
        count = max(1, total // 4 // size)
        folder = root / f"class-{size // 1024}k"
        for i in range(count):
            sub = folder / f"d{i // 200:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"f{i:05d}.bin"
            with path.open("wb") as out:
                written = 0
                while written < size:
                    start = (i * 7919 + written) % (len(pool) - MIB)
                    piece = pool[start:start + min(size - written, MIB)]
                    out.write(piece)
                    written += len(piece)
            files.append(path)
    return files


def read_all(files: list[Path]) -> int:
    return sum(len(path.read_bytes()) for path in files)


def raw_in_memory(files: list[Path], new: Callable[[], object]) -> tuple[float, int]:
    """Seconds spent hashing each file's bytes (already read into memory), and the bytes."""
    spent, total = 0.0, 0
    for path in files:
        data = path.read_bytes()
        began = time.perf_counter()
        hasher = new()
        hasher.update(data)  # type: ignore[attr-defined]
        hasher.digest()  # type: ignore[attr-defined]
        spent += time.perf_counter() - began
        total += len(data)
    return spent, total


def read_and_hash(files: list[Path], new: Callable[[], object]) -> float:
    """A plain single-thread read-and-hash loop over the files (b3sum --num-threads 1)."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    began = time.perf_counter()
    for path in files:
        hasher = new()
        with path.open("rb", buffering=0) as stream:
            while got := stream.readinto(buffer):
                hasher.update(view[:got])  # type: ignore[attr-defined]
        hasher.digest()  # type: ignore[attr-defined]
    return time.perf_counter() - began


def fresh_scan(root: Path, state: Path, alg: Algorithm, workers: int = HASH_WORKERS) -> tuple[float, int]:
    """One scan with an empty cache (a new cache file each time)."""
    fresh_scan.runs += 1  # type: ignore[attr-defined]
    with DigestCache(state / f"fresh-{alg.name}-{fresh_scan.runs}.sqlite3").open() as cache:  # type: ignore[attr-defined]
        began = time.perf_counter()
        outcome = scan_dataset(str(root), name="bench", cache=cache, alg=alg, chunk_size=CHUNK, workers=workers)
        seconds = time.perf_counter() - began
    assert outcome.state == "ok", outcome.error
    return seconds, outcome.stats.bytes_read


fresh_scan.runs = 0  # type: ignore[attr-defined]


def best_of(repeat: int, run: Callable[[], float]) -> float:
    """The fastest of ``repeat`` runs: on a shared machine, the run least disturbed by others."""
    return min(run() for _ in range(repeat))


def by_class(root: Path, files: list[Path], repeat: int) -> dict[str, dict[str, float]]:
    """Each size class scanned alone with the default algorithm: where the per-file cost shows."""
    new = (lambda: BLAKE3.new(b"")) if BLAKE3 is not None else hashlib.sha256  # type: ignore[union-attr]
    out: dict[str, dict[str, float]] = {}
    for size in CLASSES:
        folder = root / f"class-{size // 1024}k"
        members = [f for f in files if f.is_relative_to(folder)]
        raw_bytes = sum(f.stat().st_size for f in members)
        raw_s = best_of(repeat, lambda members=members: raw_in_memory(members, new)[0])
        scan_s = best_of(repeat, lambda folder=folder: fresh_scan(folder, root.parent / "state", DEFAULT)[0])
        out[f"{size // 1024} KiB"] = {"files": len(members), "bytes": raw_bytes, "scan_over_raw": raw_s / scan_s,
                                      "overhead_us_per_file": (scan_s - raw_s) / len(members) * 1e6}
    return out


def incremental(root: Path, state: Path, count: int) -> dict[str, float]:
    for i in range(count):
        folder = root / f"d{i % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"f{i:05d}"
        path.write_bytes(i.to_bytes(4, "big") * 256)
        os.utime(path, ns=(PAST_NS, PAST_NS))  # at rest: not "racily clean"
    with DigestCache(state / "incremental.sqlite3").open() as cache:
        began = time.perf_counter()
        first = scan_dataset(str(root), name="small", cache=cache, alg=DEFAULT, chunk_size=CHUNK)
        first_s = time.perf_counter() - began
        runs: list[tuple[float, int]] = []
        for _ in range(3):
            began = time.perf_counter()
            again = scan_dataset(str(root), name="small", cache=cache, alg=DEFAULT, chunk_size=CHUNK)
            runs.append((time.perf_counter() - began, again.stats.files_read))
            assert again.state == "ok"
            assert again.tree is not None
            assert first.tree is not None
            assert again.tree.root == first.tree.root
    return {"files": count, "first_scan_s": first_s, "rescan_s": statistics.median(s for s, _ in runs),
            "rescan_files_read": max(n for _, n in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="fresh-scan dataset size (e.g. 2G, 200M)")
    parser.add_argument("--small-files", type=int, default=10_000, help="files in the incremental rescan")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the fastest is kept")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON figures")
    args = parser.parse_args(argv)
    if BLAKE3 is None:
        print("blake3 is not installed: figures are for the SHA-256 fallback only", file=sys.stderr)
    total = parse_size(args.size)
    figures: dict[str, object] = {"algorithm": DEFAULT.name, "chunk_size": CHUNK}
    with tempfile.TemporaryDirectory(prefix="selfheal-bench-digest-") as tmp:
        base = Path(tmp)
        files = generate(base / "dataset", total)
        size = read_all(files)  # warm the page cache: every timing below hashes, none waits for the disk
        read_all(files)
        figures.update(bytes=size, files=len(files))
        classes = ", ".join(f"{c // 1024} KiB" for c in CLASSES)
        print(f"dataset: {len(files)} files, {size / 1e9:.2f} GB, about a quarter of the bytes in each of {classes}")

        algs: list[Algorithm] = [a for a in (BLAKE3, SHA256) if a is not None]
        for alg in algs:
            hasher = (lambda: BLAKE3.new(b"")) if alg is BLAKE3 else hashlib.sha256  # type: ignore[union-attr]
            _, raw_bytes = raw_in_memory(files, hasher)
            _, scanned = fresh_scan(base / "dataset", base / "state", alg)
            assert scanned == raw_bytes == size
            raw_s = best_of(args.repeat, lambda hasher=hasher: raw_in_memory(files, hasher)[0])
            loop_s = best_of(args.repeat, lambda hasher=hasher: read_and_hash(files, hasher))
            scan_s = best_of(args.repeat, lambda alg=alg: fresh_scan(base / "dataset", base / "state", alg)[0])
            alone_s = best_of(args.repeat, lambda alg=alg: fresh_scan(base / "dataset", base / "state", alg, 0)[0])
            raw, loop, scan, alone = size / raw_s, size / loop_s, size / scan_s, size / alone_s
            figures[alg.name] = {"raw_gbps": raw / 1e9, "read_and_hash_gbps": loop / 1e9, "scan_gbps": scan / 1e9,
                                 "scan_over_raw": scan / raw, "scan_over_read_and_hash": scan / loop,
                                 "scan_one_thread_gbps": alone / 1e9, "scan_one_thread_over_raw": alone / raw}
            print(f"{alg.name:>7}: raw in-memory {raw / 1e9:.2f} GB/s | read+hash loop {loop / 1e9:.2f} GB/s | "
                  f"fresh scan {scan / 1e9:.2f} GB/s = {scan / raw:.2f} x raw, {scan / loop:.2f} x read+hash loop "
                  f"({HASH_WORKERS} hashing threads) | walking thread alone {alone / 1e9:.2f} GB/s = "
                  f"{alone / raw:.2f} x raw")

        per_class = by_class(base / "dataset", files, args.repeat)
        figures["per_class"] = per_class
        for name, row in per_class.items():
            print(f"  {name:>10} files ({row['files']:.0f}): fresh scan {row['scan_over_raw']:.2f} x raw "
                  f"{DEFAULT.name}, {row['overhead_us_per_file']:.0f} us per file beyond hashing")

        small = incremental(base / "small", base / "state", args.small_files)
        figures["incremental"] = small
        print(f"incremental: {small['files']:.0f} unchanged files rescanned in {small['rescan_s'] * 1000:.0f} ms "
              f"(median of 3), {small['rescan_files_read']:.0f} re-read; first scan {small['first_scan_s']:.2f} s")
    print(ANCHORS)
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
