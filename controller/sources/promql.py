"""Inbound Prometheus: evaluate configured PromQL queries on an interval; series above a threshold are findings.

Each ``[[controller.promql]]`` entry is queried (instant query, through
prometheus-api-client — the ``promquery`` extra — in a worker thread so the
loop never blocks). Every result series whose value is above ``above``
becomes an external alert (``source`` label ``promql``, ``alertname`` the
entry's name) attributed to the node in the ``for_node`` label (an
``instance``'s port stripped) and the unit in ``for_unit``; the engine turns
them into ``external_alert`` findings fed to the same rules. Each evaluation
replaces the entry's previous set, so a series that drops below the
threshold clears. When Prometheus cannot be reached the previous set is kept
until it goes stale (3 intervals), the failure is counted
(``selfheal_promql_evaluations_total{outcome="error"}``) and logged at most
once a minute per entry; the loop never stops for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

from controller.sources.alerts import ExternalAlert, ExternalAlerts, node_from_instance
from selfheal.clocks import Clock
from selfheal.config import PromQLConfig
from selfheal.logs import RateLimiter, get_logger

MAX_SERIES = 1000
"""Series taken from one evaluation at most (bounded state)."""

log = get_logger("promql")

Query = Callable[[PromQLConfig], list[dict[str, Any]]]
"""Blocking: run the entry's query, return Prometheus' ``result`` list (vector)."""


def query_prometheus(entry: PromQLConfig) -> list[dict[str, Any]]:
    from prometheus_api_client import PrometheusConnect  # noqa: PLC0415 - optional extra, imported when used
    from urllib3.util.retry import Retry  # noqa: PLC0415

    client = PrometheusConnect(url=entry.url, disable_ssl=False, retry=Retry(total=0), timeout=entry.timeout)
    return list(client.custom_query(entry.query))


def alerts_from_result(entry: PromQLConfig, result: list[dict[str, Any]]) -> list[ExternalAlert]:
    out = []
    for series in result[:MAX_SERIES]:
        labels = {str(k): str(v) for k, v in dict(series.get("metric") or {}).items()}
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isnan(value) or value <= entry.above:
            continue
        node = labels.get(entry.for_node, "")
        node = node_from_instance(node) if entry.for_node == "instance" else node
        unit = labels.get(entry.for_unit) if entry.for_unit else None
        out.append(ExternalAlert(
            source=f"promql:{entry.name}", name=entry.name, node=(node or "external")[:253], unit=unit or None,
            severity=entry.severity, value=value,
            summary=f"{entry.name}: {entry.query} = {value:g} (above {entry.above:g})"[:300],
            labels={**labels, "alertname": entry.name}))
    return out


class PromQLSource:
    def __init__(self, entries: list[PromQLConfig], *, alerts: ExternalAlerts, clock: Clock, metrics: Any,
                 wake: Callable[[], Awaitable[None]] | None = None, query: Query = query_prometheus) -> None:
        self.entries = entries
        self.alerts = alerts
        self.clock = clock
        self.metrics = metrics
        self.wake = wake
        self.query = query
        self.limiter = RateLimiter(period=60.0)

    async def run(self, *, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for entry in self.entries:
                tg.create_task(self._loop(entry, stop), name=f"promql-{entry.name}")

    async def _loop(self, entry: PromQLConfig, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.evaluate(entry)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), entry.interval)

    async def evaluate(self, entry: PromQLConfig) -> bool:
        started = self.clock.monotonic()
        try:
            result = await asyncio.wait_for(asyncio.to_thread(self.query, entry), entry.timeout + 1.0)
            alerts = alerts_from_result(entry, result)
        except Exception as exc:  # noqa: BLE001 - an unreachable or broken Prometheus must not stop the loop
            self.metrics.promql_evaluations.labels(entry.name, "error").inc()
            if self.limiter.allow(entry.name, "error", self.clock.monotonic()):
                log.warning("promql.failed", entry=entry.name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            return False
        self.metrics.promql_evaluations.labels(entry.name, "ok").inc()
        self.metrics.promql_seconds.labels(entry.name).observe(self.clock.monotonic() - started)
        self.alerts.replace(f"promql:{entry.name}", alerts, now=self.clock.wall(), ttl=3 * entry.interval)
        if self.wake is not None:
            await self.wake()
        return True
