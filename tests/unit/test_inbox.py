"""The MQTT inbox under overload (``selfheal.inbox``): what waits, what is shed, what is never dropped.

Budgets are explicit and small: every message here costs exactly ``COST`` bytes against them (payload,
topic and ``OVERHEAD``), so a budget reads as a number of messages. Complexity is checked by counting
the slots the inbox visits (``Inbox.steps``), never by timing.
"""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import ControllerMetrics
from selfheal.inbox import CHANNELS, COMPACT_SLACK, OVERHEAD, Inbox, InboxStats, inbox_type

COST = 1000


def topic(node: str, channel: str) -> str:
    return f"selfheal/v1/p/1/nodes/{node}/{channel}"


def msg(node: str, channel: str, tag: str, cost: int = COST) -> aiomqtt.Message:
    """A message on ``node``'s ``channel`` costing exactly ``cost``; its payload starts with ``tag``."""
    name = topic(node, channel)
    return aiomqtt.Message(name, tag.encode().ljust(cost - OVERHEAD - len(name), b" "), 1, False, 1, None)


def inbox(soft: int, hard: int | None = None, node: int | None = None) -> Inbox:
    """Budgets in messages: reports ``soft``, everything ``hard``, one node's non-reports ``node`` (no limit)."""
    return Inbox(max_bytes=soft * COST, hard_max_bytes=(hard or soft) * COST, node_max_bytes=(node or 10**6) * COST,
                 coalesce_bytes=0)


def drain(queue: Inbox) -> list[tuple[str, str]]:
    """(topic, tag) of everything waiting, in the order the reader gets it."""
    out = []
    while not queue.empty():
        message = queue.get_nowait()
        assert isinstance(message.payload, bytes)
        out.append((str(message.topic), message.payload.decode().strip()))
    return out


def test_a_newer_report_replaces_the_waiting_one_of_its_node_in_place() -> None:
    queue = inbox(soft=10)
    for item in (msg("n1", "report", "r1a"), msg("n2", "report", "r2a"), msg("n1", "events", "e1"),
                 msg("n1", "report", "r1b"), msg("n1", "report", "r1c")):
        queue.put_nowait(item)
    assert queue.qsize() == 3  # one report per node waits
    # n1's slot kept its place (ahead of n2's) and holds its newest report.
    assert drain(queue) == [(topic("n1", "report"), "r1c"), (topic("n2", "report"), "r2a"),
                            (topic("n1", "events"), "e1")]
    assert queue.stats.superseded == 2
    assert queue.stats.by_reason == {("report", "superseded"): 2}
    assert (queue.stats.dropped, queue.stats.dropped_bytes) == (2, 2 * COST)
    assert (queue.stats.queued_bytes, queue.stats.queued_messages) == (0, 0)


def test_a_report_arriving_after_its_nodes_report_was_taken_waits_again() -> None:
    queue = inbox(soft=10)
    queue.put_nowait(msg("n1", "report", "a"))
    assert drain(queue) == [(topic("n1", "report"), "a")]
    queue.put_nowait(msg("n1", "report", "b"))
    assert drain(queue) == [(topic("n1", "report"), "b")]
    assert queue.stats.dropped == 0


def test_over_budget_the_report_with_the_oldest_content_is_shed_first() -> None:
    queue = inbox(soft=3)
    for node in ("n1", "n2", "n3"):
        queue.put_nowait(msg(node, "report", f"{node}-1"))
    queue.put_nowait(msg("n4", "report", "n4-1"))  # over budget: n1's is the oldest
    queue.put_nowait(msg("n2", "report", "n2-2"))  # n2's content is now the newest (same place)
    queue.put_nowait(msg("n5", "report", "n5-1"))  # sheds n3's, not n2's
    assert drain(queue) == [(topic("n2", "report"), "n2-2"), (topic("n4", "report"), "n4-1"),
                            (topic("n5", "report"), "n5-1")]
    assert queue.stats.shed == 2
    assert queue.stats.by_reason == {("report", "shed"): 2, ("report", "superseded"): 1}


@pytest.mark.parametrize("channel", ["events", "status", "digests", "commands"])
def test_events_statuses_digests_and_commands_shed_reports_and_are_dropped_only_beyond_the_hard_cap(
        channel: str) -> None:
    queue = inbox(soft=3, hard=6)
    for node in ("n1", "n2", "n3"):
        queue.put_nowait(msg(node, "report", node))
    for i in range(8):
        queue.put_nowait(msg("n9", channel, str(i)))
    # Three reports shed for the first three, then three more beyond the report budget, two over the hard cap.
    assert queue.stats.by_reason == {("report", "shed"): 3, (channel, "full"): 2}
    assert drain(queue) == [(topic("n9", channel), str(i)) for i in range(6)]


def test_a_report_does_not_push_out_an_event_and_is_shed_itself_when_events_fill_its_budget() -> None:
    queue = inbox(soft=2, hard=4)
    for i in range(3):
        queue.put_nowait(msg("n1", "events", str(i)))
    queue.put_nowait(msg("n2", "report", "r"))
    assert queue.stats.by_reason == {("report", "shed"): 1}
    assert drain(queue) == [(topic("n1", "events"), str(i)) for i in range(3)]


def test_a_larger_superseding_report_sheds_the_oldest_other_report_not_itself() -> None:
    queue = inbox(soft=3, hard=4)
    for node in ("n1", "n2", "n3"):
        queue.put_nowait(msg(node, "report", f"{node}-1"))
    queue.put_nowait(msg("n2", "report", "n2-2", cost=COST + 1))  # one byte over: the oldest goes
    assert queue.stats.by_reason == {("report", "shed"): 1, ("report", "superseded"): 1}
    assert drain(queue) == [(topic("n2", "report"), "n2-2"), (topic("n3", "report"), "n3-1")]


def test_when_events_fill_the_report_budget_a_superseding_report_is_shed_too() -> None:
    queue = inbox(soft=2, hard=4)
    queue.put_nowait(msg("n1", "report", "a1"))
    queue.put_nowait(msg("n3", "events", "e1"))
    queue.put_nowait(msg("n1", "report", "a2", cost=COST + 1))  # over the report budget: only reports can go
    assert queue.stats.by_reason == {("report", "shed"): 1, ("report", "superseded"): 1}
    assert drain(queue) == [(topic("n3", "events"), "e1")]


def test_messages_on_unknown_topics_are_held_within_the_report_budget_only() -> None:
    queue = inbox(soft=2, hard=10)
    junk = aiomqtt.Message("junk/" + "x" * 20, b"x" * (COST - OVERHEAD - 25), 0, False, 1, None)
    for _ in range(4):
        queue.put_nowait(junk)
    assert queue.stats.by_reason == {("other", "full"): 2}
    assert queue.qsize() == 2
    for i in range(8):  # real events still fit, up to the hard cap
        queue.put_nowait(msg("n1", "events", str(i)))
    assert queue.qsize() == 10
    assert queue.stats.by_reason == {("other", "full"): 2}


def test_a_node_flooding_events_loses_its_own_beyond_its_share_never_another_nodes() -> None:
    queue = inbox(soft=6, hard=20, node=3)
    queue.put_nowait(msg("real", "report", "r"))
    for i in range(10):
        queue.put_nowait(msg("flood", "events", str(i)))
    queue.put_nowait(msg("real", "events", "e"))
    queue.put_nowait(msg("real", "status", "s"))
    assert queue.stats.by_reason == {("events", "node_full"): 7}
    assert drain(queue) == [(topic("real", "report"), "r"), *((topic("flood", "events"), str(i)) for i in range(3)),
                            (topic("real", "events"), "e"), (topic("real", "status"), "s")]
    assert queue._node_bytes == {}
    for i in range(3):  # its share is free again once taken
        queue.put_nowait(msg("flood", "events", str(i)))
    assert queue.qsize() == 3


def test_the_controllers_status_is_never_shed() -> None:
    queue = inbox(soft=1, hard=3)
    status = aiomqtt.Message("selfheal/v1/controller/status", b"{}", 1, True, 1, None)
    queue.put_nowait(msg("n1", "report", "r"))
    queue.put_nowait(status)
    assert queue.stats.by_reason == {("report", "shed"): 1}
    assert queue.get_nowait().topic.value == "selfheal/v1/controller/status"


def test_non_reports_keep_their_arrival_order_among_interleaved_reports() -> None:
    queue = inbox(soft=1000)
    sent = []
    for i in range(200):
        node = f"n{i % 7}"
        queue.put_nowait(msg(node, "report", f"r{i}"))
        channel = ("events", "status", "digests")[i % 3]
        queue.put_nowait(msg(node, channel, f"x{i}"))
        sent.append((topic(node, channel), f"x{i}"))
    got = drain(queue)
    assert [item for item in got if not item[0].endswith("/report")] == sent
    reports = [item for item in got if item[0].endswith("/report")]
    assert len(reports) == 7  # nobody took any: one per node, each its newest
    assert dict(reports) == {topic(f"n{i % 7}", "report"): f"r{i}" for i in range(193, 200)}


async def test_a_waiting_reader_is_woken_and_join_does_not_wait_for_shed_reports() -> None:
    queue = inbox(soft=1, hard=4)
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(msg("n1", "events", "e"))
    assert (await asyncio.wait_for(reader, 5)).topic.value == topic("n1", "events")
    queue.task_done()
    queue.put_nowait(msg("n1", "report", "a"))
    queue.put_nowait(msg("n2", "report", "b"))  # sheds n1's
    queue.put_nowait(msg("n2", "report", "c"))  # supersedes: nothing new to finish
    await queue.get()
    queue.task_done()
    await asyncio.wait_for(queue.join(), 5)


async def test_inbox_type_is_what_aiomqtt_instantiates() -> None:
    stats = InboxStats()
    client = aiomqtt.Client("127.0.0.1", 1, queue_type=inbox_type(stats, max_bytes=2 * COST, hard_max_bytes=3 * COST,
                                                                         coalesce_bytes=0))
    queue = client._queue
    assert isinstance(queue, Inbox)
    assert (queue.max_bytes, queue.hard_max_bytes, queue.stats) == (2 * COST, 3 * COST, stats)


@pytest.mark.parametrize("nodes", [100, 10_000])
def test_work_per_message_does_not_grow_with_the_backlog(nodes: int) -> None:
    """Reports of ``nodes`` nodes (coalesced, then shed over a budget of half the fleet), events, reads:
    the slots visited stay within a constant per message, and tombstones within the live slots."""
    queue = inbox(soft=nodes // 2, hard=nodes)
    messages = 0
    for round_ in range(6):
        for n in range(nodes):
            queue.put_nowait(msg(f"n{n}", "report", str(round_)))
            queue.put_nowait(msg(f"n{n % 10}", "report", f"hot{round_}"))  # ten nodes report far more often
            messages += 2
            if n % 10 == 0:
                queue.put_nowait(msg(f"n{n}", "events", str(round_)))
                messages += 1
            if n % 3 == 0 and not queue.empty():
                queue.get_nowait()
        assert len(queue._slots) <= 2 * queue.qsize() + COMPACT_SLACK + 1
        assert len(queue._reports) <= 2 * queue._live_reports + COMPACT_SLACK + 1
    drain(queue)
    assert queue.stats.shed > 0
    assert queue.stats.superseded > 0
    assert queue.steps <= 3 * messages  # measured: 1.4-1.5 per message at 100 to 50,000 nodes


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["report", "events", "status", "take"]), st.integers(0, 4)),
                max_size=80),
       st.integers(1, 6), st.integers(0, 6), st.integers(1, 8))
def test_whatever_arrives_the_bounds_and_orders_hold(ops: list[tuple[str, int]], soft: int, extra: int,
                                                     node: int) -> None:
    queue = inbox(soft=soft, hard=soft + extra, node=node)
    sent: list[tuple[str, str]] = []
    got: list[tuple[str, str]] = []
    newest: dict[str, str] = {}
    for i, (op, n) in enumerate(ops):
        if op == "take":
            if not queue.empty():
                got.append(_take(queue))
            continue
        item = msg(f"n{n}", op, str(i))
        sent.append((topic(f"n{n}", op), str(i)))
        if op == "report":
            newest[topic(f"n{n}", op)] = str(i)
        queue.put_nowait(item)
        assert queue.stats.queued_bytes <= queue.hard_max_bytes
        assert queue.stats.queued_bytes <= queue.max_bytes or queue._live_reports == 0  # reports go first
        assert queue.stats.queued_bytes == queue.qsize() * COST == queue.stats.queued_messages * COST
        waiting = [slot.key for slot in queue._slots if slot.message is not None and slot.key]
        assert len(waiting) == len(set(waiting))  # at most one report per node
        assert all(0 < held <= queue.node_max_bytes for held in queue._node_bytes.values())
    got.extend(drain(queue))
    # What arrived is a permutation-free selection: non-reports in order, none dropped unless over the hard cap.
    non_reports = [item for item in got if not item[0].endswith("/report")]
    sent_non_reports = [item for item in sent if not item[0].endswith("/report")]
    assert non_reports == [item for item in sent_non_reports if item in set(non_reports)]
    full = sum(count for (_, reason), count in queue.stats.by_reason.items() if reason in {"full", "node_full"})
    assert len(non_reports) + full == len(sent_non_reports)
    # Every message is either delivered or counted once.
    assert len(got) + queue.stats.dropped == len(sent)
    # A report is delivered only if nothing newer of its node had arrived by the time it was taken, and the
    # last report of a node that was never shed is delivered.
    if queue.stats.shed == 0:
        for name, tag in newest.items():
            assert (name, tag) in got


def _take(queue: Inbox) -> tuple[str, str]:
    message = queue.get_nowait()
    assert isinstance(message.payload, bytes)
    return str(message.topic), message.payload.decode().strip()


def test_the_controller_exports_the_counts_with_fixed_labels() -> None:
    metrics = ControllerMetrics()
    queue = inbox(soft=2, hard=3)
    metrics.add_inbox_collector(lambda: queue.stats)
    for item in (msg("n1", "report", "a"), msg("n1", "report", "b"), msg("n2", "report", "c"),
                 msg("n3", "events", "1"), msg("n3", "events", "2"), msg("n3", "events", "3"),
                 msg("n3", "events", "4")):
        queue.put_nowait(item)
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for sample in family.samples}
    dropped = {dict(labels)["channel"] + "/" + dict(labels)["reason"]: value
               for (name, labels), value in samples.items() if name == "selfheal_mqtt_inbox_dropped_total"}
    assert {key for key, value in dropped.items() if value} == {"report/superseded", "report/shed", "events/full"}
    assert (dropped["report/superseded"], dropped["report/shed"], dropped["events/full"]) == (1, 2, 1)
    assert set(dropped) == {"report/superseded", "report/shed", *(f"{c}/full" for c in CHANNELS),
                            *(f"{c}/node_full" for c in ("status", "digests", "events", "commands"))}
    assert samples["selfheal_mqtt_inbox_dropped_bytes_total", ()] == 4 * COST
    assert samples["selfheal_mqtt_inbox_messages", ()] == 3
    assert samples["selfheal_mqtt_inbox_bytes", ()] == 3 * COST


def test_a_message_that_cannot_fit_even_with_every_report_shed_sheds_none() -> None:
    queue = inbox(soft=3, hard=4)
    queue.put_nowait(msg("n1", "report", "r"))
    queue.put_nowait(msg("n2", "events", "big", cost=4 * COST + 1))  # over the hard cap even alone
    queue.put_nowait(msg("n3", "events", "e1"))
    queue.put_nowait(msg("n3", "events", "e2"))
    queue.put_nowait(msg("n3", "report", "r3", cost=2 * COST))  # 2 events + it > the report budget
    assert queue.stats.by_reason == {("events", "full"): 1, ("report", "shed"): 1}
    assert drain(queue) == [(topic("n1", "report"), "r"), (topic("n3", "events"), "e1"),
                            (topic("n3", "events"), "e2")]


def test_below_its_coalescing_mark_every_report_is_kept() -> None:
    """A short burst (an agent's backlog after a reconnect, a test's scripted reports) reaches the detectors
    whole; only once ``coalesce_bytes`` wait does a node's newer report replace its waiting one."""
    queue = Inbox(max_bytes=100 * COST, hard_max_bytes=100 * COST, coalesce_bytes=4 * COST)
    for i in range(4):
        queue.put_nowait(msg("n1", "report", f"r{i}"))
    assert queue.stats.superseded == 0
    queue.put_nowait(msg("n1", "report", "r4"))  # 4 waiting: behind, so this one replaces the newest
    assert queue.stats.superseded == 1
    assert [tag for _, tag in drain(queue)] == ["r0", "r1", "r2", "r4"]
    assert queue.stats.queued_messages == 0
