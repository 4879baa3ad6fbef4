"""``selfheal_asyncio_tasks``: the controller's task count, read on the loop that serves the scrape."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import ControllerMetrics


def _tasks(metrics: ControllerMetrics) -> list[float]:
    return [sample.value for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
            for sample in family.samples if sample.name == "selfheal_asyncio_tasks"]


async def test_the_gauge_counts_the_tasks_alive_on_the_scraping_loop() -> None:
    metrics = ControllerMetrics()
    before = _tasks(metrics)
    assert before == [len(asyncio.all_tasks())]
    idle = [asyncio.create_task(asyncio.sleep(3600)) for _ in range(5)]
    try:
        assert _tasks(metrics) == [before[0] + 5]
    finally:
        for task in idle:
            task.cancel()
        await asyncio.gather(*idle, return_exceptions=True)
    assert _tasks(metrics) == before


def test_off_any_loop_the_gauge_is_left_out() -> None:
    assert _tasks(ControllerMetrics()) == []
