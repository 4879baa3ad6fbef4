"""The agent's own figures: ``GET /metrics`` (Prometheus text) on ``agent.listen``, beside ``/healthz``.

What shows an agent growing or misbehaving over days: the tasks alive on its
event loop (``selfheal_agent_asyncio_tasks``: one per unit, probe and loop, so
a leak shows as growth), its memory, open fds and threads (the standard
``process_*`` series), what it sent and what it dropped by reason
(``selfheal_agent_messages_total{kind}``: reports, events, digests, and
malformed, oversized, spoofed, queue_full...), the commands it answered by
status (``selfheal_agent_commands_total{status}``) and the requests its
dataset peer API refused (``selfheal_agent_peer_refused_total{reason}``).
``bench/soak.py`` samples it.

Rendered on the event loop's own thread (both HTTP servers answer there), so
``asyncio.all_tasks`` is read where it is safe. ``prometheus_client`` is
imported at the first scrape: an agent nobody scrapes stays lean
(``tests/unit/test_agent_lean.py``). Like ``/healthz``, it needs no token: it
holds counts, never names of datasets, keys or commands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Figures:
    """What the agent counts, read at each scrape."""

    node: str
    messages: Callable[[], Mapping[str, int]]
    commands: Callable[[], Mapping[str, int]]
    refused: Callable[[], Mapping[str, int]]
    """Requests the peer API refused, by reason (token, scope, body)."""


class AgentMetrics:
    """Renders ``/metrics`` for one agent; the registry is built at the first scrape."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures
        self._registry: Any = None

    def render(self) -> tuple[bytes, str]:
        """The exposition and its content type; call it on the agent's event loop."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415 - at the first scrape

        if self._registry is None:
            self._registry = _registry(self.figures)
        return generate_latest(self._registry), CONTENT_TYPE_LATEST


def _registry(figures: Figures) -> Any:
    from prometheus_client import CollectorRegistry, ProcessCollector  # noqa: PLC0415
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415
    from prometheus_client.registry import Collector  # noqa: PLC0415

    class AgentCollector(Collector):
        def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
            try:
                tasks = len(asyncio.all_tasks(asyncio.get_running_loop()))
            except RuntimeError:  # collected off the loop (a test calling it directly): no tasks to count
                tasks = 0
            yield GaugeMetricFamily("selfheal_agent_asyncio_tasks", "Tasks alive on the agent's event loop",
                                    value=tasks)
            messages = CounterMetricFamily("selfheal_agent_messages", "Messages the agent sent (reports, events, "
                                           "digests) and input it dropped, by kind", labels=["kind"])
            for kind, n in sorted(figures.messages().items()):
                messages.add_metric([kind], n)
            yield messages
            commands = CounterMetricFamily("selfheal_agent_commands", "Commands the agent answered, by status",
                                           labels=["status"])
            for status, n in sorted(figures.commands().items()):
                commands.add_metric([status], n)
            yield commands
            refused = CounterMetricFamily("selfheal_agent_peer_refused", "Requests the dataset peer API refused, "
                                          "by reason", labels=["reason"])
            for reason, n in sorted(figures.refused().items()):
                refused.add_metric([reason], n)
            yield refused
            info = GaugeMetricFamily("selfheal_agent_info", "The node this agent speaks for", labels=["node"])
            info.add_metric([figures.node], 1)
            yield info

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector())
    ProcessCollector(registry=registry)
    return registry
