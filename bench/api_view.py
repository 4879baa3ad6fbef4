"""What the API, the status page and /metrics cost at fleet scale, in process (a timing script, not a test).

Builds a ``Fleet`` of ``--nodes`` simulated nodes from the real wire format
(each node's retained status, then ``--reports`` reports, as
``bench/ingest.py`` builds them, every one decoded at the wire edge), a
controller's metrics with its collectors, and the real FastAPI app; then
times each read the ingest benchmark's poller and Prometheus make, through
the ASGI interface (routing, handler, serialisation: no socket), and one
``Fleet.apply`` of a report (what the views add to the ingest path). Prints
the median and the worst of ``--repeat`` calls per request.

    .venv/bin/python bench/api_view.py [--nodes 10000] [--reports 5] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.simulated import SimNode, node_name
from controller.api import ApiContext, create_api
from controller.app import Controller
from controller.datasets import Localisations
from controller.store import SqliteStore
from selfheal import wire
from selfheal.clocks import SystemClock
from selfheal.config import Config

PATHS = ("/api/v1/nodes", "/api/v1/nodes?limit=5000", "/api/v1/units", "/api/v1/datasets", "/", "/metrics")


class Engine:
    """What the API and the collectors read of the engine."""

    def __init__(self) -> None:
        self.dispatcher = SimpleNamespace(localisations=Localisations())
        self.reconciler = SimpleNamespace(incidents={})

    def open_count(self) -> int:
        return 0

    def stats(self) -> list[dict[str, object]]:
        return []


def build(controller: Controller, nodes: int, reports: int) -> tuple[float, list[tuple[str, bytes]]]:
    """Fill the controller's fleet; returns the seconds it took and one more report per node, encoded."""
    import random  # noqa: PLC0415 - only here

    now = time.time()
    rng = random.Random(1)
    sims = [SimNode(node_name(i), None, now, rng) for i in range(nodes)]
    started = time.perf_counter()
    for sim in sims:
        apply(controller, wire.node_topic(sim.node, "status"), sim.status_payload(now))
    for _ in range(reports):
        for sim in sims:
            apply(controller, sim.topic, sim.next_report(time.time()))
    return time.perf_counter() - started, [(sim.topic, sim.next_report(time.time())) for sim in sims]


def apply(controller: Controller, topic: str, payload: bytes) -> None:
    controller.fleet.apply(wire.decode_node_message(topic, payload), time.time())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--reports", type=int, default=5, help="reports per node before timing")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    controller = Controller(Config())
    engine = Engine()
    took, more = build(controller, args.nodes, args.reports)
    print(f"fleet: {args.nodes} nodes, {args.reports} reports each, built in {took:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        store = await SqliteStore.open(Path(tmp) / "selfheal.sqlite3")
        ctx = ApiContext(fleet=controller.fleet, store=store, engine=engine, metrics=controller.metrics,  # type: ignore[arg-type]
                         clock=SystemClock(), offline_after=3600.0, broker_connected=asyncio.Event())
        register_collectors(controller, engine, ctx)
        app = create_api(ctx)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            for path in PATHS:
                times, size = [], 0
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    response = await client.get(path)
                    times.append(time.perf_counter() - started)
                    response.raise_for_status()
                    size = len(response.content)
                print(f"GET {path:<25} median {statistics.median(times) * 1000:8.1f} ms   "
                      f"max {max(times) * 1000:8.1f} ms   {size / 1024:9.1f} KiB")
        await store.close()
    started = time.perf_counter()
    for topic, payload in more:
        apply(controller, topic, payload)
    per = (time.perf_counter() - started) / len(more)
    print(f"decode + Fleet.apply of one report: {per * 1e6:.0f} us (mean of {len(more)})")


def register_collectors(controller: Controller, engine: Any, ctx: ApiContext) -> None:
    """The collectors ``Controller.run`` registers, on the same methods."""
    from controller.api import datasets_view  # noqa: PLC0415 - the view the dataset collector reads

    controller.metrics.add_fleet_collector(lambda: controller._fleet_gauges(engine))
    controller.metrics.add_state_collector(lambda: controller._state_gauges(engine))
    controller.metrics.add_dataset_collector(lambda: datasets_view(ctx))


if __name__ == "__main__":
    asyncio.run(main())
