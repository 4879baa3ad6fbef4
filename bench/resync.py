"""Resync efficiency: bytes transferred per byte actually changed, and time from corruption to verified repair.

Two replicas of a dataset on this host, each with its own digest cache and
its own peer API on a loopback port (real uvicorn, real HTTP), plus a third
replica digest like the source's in the controller's fleet (the majority).
The controller side (``controller.resync.ResyncPlanner``) localises the
divergent replica against the source over HTTP, and the agent side
(``agent.resync.DatasetResyncer``) pulls and verifies. Counting transports
under both measure every byte of every HTTP response body: chunk bytes
(payload) and listings (metadata).

1. One big file (``--size``, default 1 GiB) with one chunk-aligned 4 MiB
   chunk overwritten with random bytes: changed = 4 MiB.
2. ``--files`` files of 256 KiB (default 2,000: 500 MiB), 1 % of them
   rewritten with random bytes: changed = their size.

For each: transferred ÷ changed (payload only, and with metadata; goal
≤ 1.1 plus metadata), and the time from the corruption to a verified repair:
the replica's rescan that notices it, the localisation, the pull with every
chunk and the whole file verified, the rescan that shows the authority's
root again. MQTT and the scan interval (the agent notices a change within
``scan_interval``, default 60 s) are not in it. Run:

    .venv/bin/python bench/resync.py [--size 1G] [--files 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx

from agent.digests.cache import DigestCache
from agent.digests.scanner import DatasetScanner
from agent.http_server import HttpServer, bind_listen
from agent.peer_api import PeerApiContext, create_peer_api
from agent.resync import DatasetResyncer
from controller.datasets import Localisations
from controller.fleet import Fleet
from controller.resync import ResyncPlanner
from remediations.plans import ResyncDataset
from selfheal import wire
from selfheal.clocks import SystemClock
from selfheal.config import DatasetConfig

MIB = 1024 * 1024
CHUNK = 4 * MIB
KEYS = {"node-a": bytes(range(32)), "node-b": bytes(range(1, 33))}
ANCHORS = ("Anchors (issue 5): bytes transferred / bytes changed <= 1.1 plus metadata (Cassandra's Merkle repair "
           "over-streams whole token ranges; rsync sends only changed blocks).")


class Counting(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.payload = 0
        self.metadata = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        if "/chunk" in request.url.path:
            self.payload += len(body)
        else:
            self.metadata += len(body)
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def scenario(root: Path, build: Any, corrupt: Any) -> dict[str, float]:
    build(root / "a")
    shutil.copytree(root / "a", root / "b")
    stop = asyncio.Event()
    async with AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
        scanners = {}
        addresses = {}
        for node, folder in (("node-a", "a"), ("node-b", "b")):
            cache = stack.enter_context(DigestCache(root / f"state-{node}/digests.sqlite3").open())
            config = DatasetConfig(name="ds", path=str(root / folder), chunk_size=CHUNK, scan_interval=3600)
            scanners[node] = DatasetScanner([config], cache=cache, publish=lambda _: None, clock=SystemClock(),
                                            node_id=node)
            await scanners[node].scan("ds", deep=True)
            sock, addresses[node] = bind_listen("127.0.0.1:0", broker_host="127.0.0.1")
            server = HttpServer(create_peer_api(PeerApiContext(node_id=node, key=KEYS[node],
                                                               datasets=scanners[node].view, cache=cache,
                                                               clock=SystemClock())), sock)
            tg.create_task(server.run(stop=stop))
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await asyncio.sleep(0.01)  # a benchmark, not a test: no deadline helper here
        try:
            changed = corrupt(root / "b")
            began = time.perf_counter()
            await scanners["node-b"].scan("ds")
            fleet = Fleet()
            for n, (node, source) in enumerate((("node-a", "node-a"), ("node-b", "node-b"), ("node-c", "node-a"))):
                fleet.apply(wire.NodeStatus(node=node, state="online", session=1, http=addresses[source]), 0.0)
                fleet.apply(wire.DatasetDigest(node=node, session=1, ts=float(n + 1),
                                               datasets=scanners[source].summaries()), 0.0)
            control, pull = Counting(), Counting()

            async def audit(kind: str, data: dict[str, object]) -> None:
                pass

            planner = ResyncPlanner(fleet=fleet, keys=KEYS.get, clock=SystemClock(), localisations=Localisations(),
                                    transport=control)
            prepared = await planner.prepare(ResyncDataset("node-b", "ds", "node-a"), audit)
            localised = time.perf_counter()
            resyncer = DatasetResyncer(scanner=scanners["node-b"], state_dir=root / "state-node-b",
                                       clock=SystemClock(), node_id="node-b", transport=pull)
            for command in prepared.commands:
                status, detail = await resyncer.resync(command)
                if status != "done":
                    raise SystemExit(f"resync failed: {detail}")
            repaired = time.perf_counter()
            after = scanners["node-b"].view("ds").summary  # type: ignore[union-attr]
            reference = scanners["node-a"].view("ds").summary  # type: ignore[union-attr]
            if after is None or reference is None or after.root != reference.root:
                raise SystemExit("the repaired replica does not match the source")
        finally:
            stop.set()
    metadata = control.metadata + pull.metadata
    return {"changed_bytes": changed, "payload_bytes": pull.payload, "metadata_bytes": metadata,
            "ratio_payload": pull.payload / changed, "ratio_total": (pull.payload + metadata) / changed,
            "rounds": prepared.localisation.rounds, "commands": len(prepared.commands),
            "localise_s": localised - began, "repair_s": repaired - began}


def big_file(size: int) -> tuple[Any, Any]:
    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        with (folder / "big.bin").open("wb") as out:
            left = size
            while left > 0:
                block = os.urandom(min(64 * MIB, left))
                out.write(block)
                left -= len(block)

    def corrupt(folder: Path) -> int:
        chunks = max(1, size // CHUNK)
        with (folder / "big.bin").open("r+b") as out:
            out.seek((chunks // 2) * CHUNK)
            length = min(CHUNK, size - (chunks // 2) * CHUNK)
            out.write(os.urandom(length))
        return length

    return build, corrupt


def many_files(count: int, size: int = 256 * 1024) -> tuple[Any, Any]:
    def build(folder: Path) -> None:
        for d in range(max(1, count // 100)):
            (folder / f"d{d:03d}").mkdir(parents=True)
        for i in range(count):
            (folder / f"d{i % max(1, count // 100):03d}" / f"f{i:05d}.bin").write_bytes(os.urandom(size))

    def corrupt(folder: Path) -> int:
        picked = range(0, count, 100)  # 1 %
        for i in picked:
            (folder / f"d{i % max(1, count // 100):03d}" / f"f{i:05d}.bin").write_bytes(os.urandom(size))
        return len(picked) * size

    return build, corrupt


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": 1024 * MIB}
    text = text.strip().upper().removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="size of the big file (default 1G)")
    parser.add_argument("--files", type=int, default=2000, help="files of 256 KiB in the many-files case")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    size = parse_size(args.size)
    figures: dict[str, Any] = {"size": size, "files": args.files, "chunk_size": CHUNK}
    with tempfile.TemporaryDirectory(prefix="selfheal-bench-resync-") as tmp:
        figures["one_chunk"] = asyncio.run(scenario(Path(tmp) / "one", *big_file(size)))
        figures["one_percent"] = asyncio.run(scenario(Path(tmp) / "many", *many_files(args.files)))
    for name, label in (("one_chunk", f"{size / MIB:.0f} MiB file, one 4 MiB chunk corrupted"),
                        ("one_percent", f"{args.files} files of 256 KiB, 1 % rewritten")):
        f = figures[name]
        print(f"{label}: changed {f['changed_bytes']} B, pulled {f['payload_bytes']} B + {f['metadata_bytes']} B "
              f"listings in {f['rounds']} rounds, {f['commands']} command(s)")
        print(f"  transferred / changed: {f['ratio_payload']:.3f} payload, {f['ratio_total']:.3f} with metadata; "
              f"corruption -> localised {f['localise_s']:.2f} s, -> verified repair {f['repair_s']:.2f} s")
    print(ANCHORS)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
