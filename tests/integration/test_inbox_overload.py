"""The MQTT inbox behind a real aiomqtt client and a real Mosquitto: a reader that falls behind.

A burst of reports from a few nodes, interleaved with their events, arrives while the reader is paused
(nothing takes from ``client.messages``). Then the reader drains it: every event arrives, in the order
it was published, and each node's last report arrives; the reports in between were coalesced and
counted as superseded, never queued one per message.
"""

from __future__ import annotations

import uuid

import aiomqtt
import pytest

from selfheal.inbox import Inbox, InboxStats, inbox_type
from tests.conftest import Broker, eventually

pytestmark = pytest.mark.integration

NODES = 3
REPORTS = 40
"""Reports per node in the burst."""


def _topic(node: str, channel: str) -> str:
    return f"selfheal/v1/p/1/nodes/{node}/{channel}"


async def test_a_paused_reader_gets_every_event_in_order_and_each_nodes_last_report(mosquitto: Broker) -> None:
    run = uuid.uuid4().hex[:8]
    nodes = [f"inbox-{run}-{i}" for i in range(NODES)]
    stats = InboxStats()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"reader-{run}",
                              queue_type=inbox_type(stats, max_bytes=1 << 20, hard_max_bytes=4 << 20,
                                                                   coalesce_bytes=0)) as reader:
        assert isinstance(reader._queue, Inbox)
        for node in nodes:
            await reader.subscribe(_topic(node, "+"), qos=1)
        events: list[tuple[str, bytes]] = []
        last_report: dict[str, bytes] = {}
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"fleet-{run}") as fleet:
            for seq in range(REPORTS):
                for node in nodes:
                    report = f"report {seq} ".encode() + b"r" * 1500
                    await fleet.publish(_topic(node, "report"), report, qos=1)
                    last_report[_topic(node, "report")] = report
                    if seq % 4 == 0:
                        event = f"event {seq}".encode()
                        await fleet.publish(_topic(node, "events"), event, qos=1)
                        events.append((_topic(node, "events"), event))
        sent = NODES * REPORTS + len(events)
        await eventually(lambda: stats.queued_messages + stats.dropped >= sent, timeout=30,
                         what=f"the inbox to hold or count all {sent} messages")
        assert stats.queued_messages == NODES + len(events)  # one report per node waits
        assert stats.superseded == NODES * (REPORTS - 1)
        assert stats.by_reason == {("report", "superseded"): NODES * (REPORTS - 1)}

        got: list[tuple[str, bytes]] = []
        async for message in reader.messages:
            assert isinstance(message.payload, bytes)
            got.append((message.topic.value, message.payload))
            if len(reader.messages) == 0:
                break
    assert [item for item in got if item[0].endswith("/events")] == events
    assert {t: payload for t, payload in got if t.endswith("/report")} == last_report
    assert len(got) == NODES + len(events)
    assert (stats.queued_messages, stats.queued_bytes) == (0, 0)
