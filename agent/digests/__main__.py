"""Print a directory's dataset root digest: what a manifest file holds.

    python -m agent.digests PATH [--chunk-size BYTES] [--include GLOB ...] [--exclude GLOB ...]

Use the same chunk size and globs as the agents' ``[[agent.datasets]]``
entry, or the roots will not match. Exit code 0 with the digest on stdout;
1 when the tree changed while it was read or could not be read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from agent.digests.cache import DigestCache
from agent.digests.hashing import DEFAULT
from agent.digests.selection import Selection
from agent.digests.trees import scan_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.digests", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--chunk-size", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--include", action="append", default=[])
    parser.add_argument("--exclude", action="append", default=[])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="selfheal-digest-") as tmp, \
            DigestCache(Path(tmp) / "cache.sqlite3").open() as cache:
        outcome = scan_dataset(str(args.path), name="manifest", cache=cache, alg=DEFAULT,
                               chunk_size=args.chunk_size, selection=Selection.of(args.include, args.exclude))
    if outcome.tree is None:
        print(f"{outcome.state}: {outcome.error}", file=sys.stderr)
        return 1
    print(outcome.tree.root_digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
