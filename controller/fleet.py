"""Fleet state: what the controller knows of every node, in memory, bounded.

``Fleet.apply`` folds one validated wire message into the state; detectors
read frozen ``NodeSnapshot``s of it. Presence follows session numbers: a
status or will from an older agent session never overrides a newer one, and
handlers are idempotent (the embedded broker may deliver a retained message
twice).

Sessions only grow, and not by leaps: a message whose session is more than
``MAX_SESSION_JUMP`` beyond the live session of a node that is online and was
heard within ``offline_after`` is refused (``refuses_jump``, which the
controller asks before ``apply``; counted ``session_jump``) — a real agent
bumps its session by one per start, and one that restarts has stopped talking
in its old session. An agent that lost its counter starts from the wall clock
(``agent.app.next_session``): that leap is taken once the node has gone
offline or quiet, and the status it announced meanwhile is held (one per
node) and applied when its session begins.

Replays of a node's own genuine signed messages change nothing:

- presence comes only from new messages: a report at or below the last
  sequence number of its session, an event no newer (agent ``ts``) than the
  newest event of the session, a status no newer than the last one of its
  connection refresh neither ``online`` nor ``last_seen`` (a replayed
  ``CommandResult`` still goes to the dispatcher, which takes an ack once,
  and a replayed ``LocalAction`` to the engine, which adopts a key once);
- unit events wait for a report: until this controller has seen a report of
  the node's current session (e.g. just after it started), its unit events are
  held (``MAX_HELD_EVENTS`` per node); the report reflects everything before
  its ``ts``, so only newer held events apply, and from then on an event no
  newer than the latest report, or older than the unit's last event, is stale;
- statuses follow the agent's broker connections (``NodeStatus.conn``): a
  status of a connection older than the last applied is stale, the
  ``offline`` (last will) of a connection applies once, and an ``online`` of
  a connection whose ``offline`` was applied is stale.

Beyond ``max_nodes`` the longest-silent node is evicted.

Bounded against a flood: of each report a node keeps only what detectors read
(a ``ReportSample``: the numbers, no strings), at most ``history`` of them and
``state_bytes`` bytes; its current state holds at most ``MAX_UNITS_PER_NODE``
units, ``MAX_DATASETS_PER_NODE`` datasets and 32 labels, each string of them
capped by the wire's decode-time limits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from detectors.model import NodeSnapshot, ReportSample
from detectors.presence import is_offline
from selfheal.wire import (
    CommandResult,
    DatasetDigest,
    DatasetSummary,
    Event,
    LocalAction,
    NodeMessage,
    NodeStatus,
    ProbeChanged,
    ProbeState,
    Report,
    UnitExited,
    UnitReport,
    UnitStarted,
)

MAX_UNITS_PER_NODE = 256
"""Units kept per node (``wire.MAX_UNITS``: no report or status names more); an event naming one more is ignored."""
MAX_SESSION_JUMP = 1000
"""Sessions a live node may skip at once (agents count one per start)."""
MAX_HELD_EVENTS = 64
"""Unit events held per node until a report of its session arrives; beyond, the oldest is dropped."""
MAX_DATASETS_PER_NODE = 200
"""Datasets kept per node (the agent's config allows no more); beyond, the rest of a digest is ignored."""
MAX_LOCAL_ACTIONS = 4096
"""Agents' local actions waiting for the engine to adopt them; beyond, the oldest is dropped (counted stale)."""


@dataclass
class NodeState:
    id: str
    online: bool = False
    session: int = 0
    version: str = ""
    http: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    last_seen: float = 0.0
    units: dict[str, UnitReport] = field(default_factory=dict)
    reports: deque[ReportSample] = field(default_factory=deque)
    """What detectors read of recent reports, oldest first: at most ``Fleet.history`` of them and
    ``Fleet.state_bytes`` bytes (``ReportSample.nbytes``), the newest always kept."""
    report_bytes: deque[int] = field(default_factory=deque)
    """``nbytes`` of each sample in ``reports``, in the same order."""
    history_bytes: int = 0
    """Their sum."""
    last_seq: int = -1
    event_ts: dict[str, float] = field(default_factory=dict)
    """Agent time of the last event per unit: an older report does not undo it."""
    datasets: dict[str, DatasetSummary] = field(default_factory=dict)
    """The latest ``DatasetDigest``: each dataset replica this node holds, by name (bounded)."""
    digests_ts: float = 0.0
    """Agent time of that digest: an older one (a redelivered retained message) does not undo it."""
    held: NodeStatus | None = None
    """The last status refused as a session jump: applied if that session begins (``Fleet.refuses_jump``)."""
    status_ts: float = -1.0
    """Agent time of the last status applied in this session (-1: none yet): one no newer refreshes nothing."""
    conn: int = 0
    """The broker connection (``NodeStatus.conn``) of the last status applied in this session."""
    closed_conn: int = -1
    """The highest connection whose ``offline`` was applied: it and older ones are over."""
    event_clock: float = 0.0
    """Agent time of the newest event of this session: only a newer one refreshes presence."""
    report_ts: float | None = None
    """Agent time of the newest report of this session seen by this controller (None: none yet)."""
    born_ts: float = -1.0
    """Agent time of the ``online`` that began the node's current broker connection."""
    held_events: deque[Event] = field(default_factory=deque)
    """Unit events that came before any report of this session, bounded (``MAX_HELD_EVENTS``)."""

    @property
    def confirmed(self) -> bool:
        """Its unit states come from a report sent on its current connection. Until then they are what it said
        before (it was cut off and may have fenced or lost units meanwhile; this controller only has its birth
        message's placeholders), or its connection's last will came since: nothing may be concluded from them."""
        return self.report_ts is not None and self.report_ts >= self.born_ts and self.closed_conn < self.conn


class Fleet:
    def __init__(self, *, history: int = 120, max_nodes: int = 10_000, state_bytes: int = 256 * 1024) -> None:
        self.history = history
        self.state_bytes = state_bytes
        """Bytes of report history per node (``controller.node_state_bytes``)."""
        self.max_nodes = max_nodes
        self.nodes: dict[str, NodeState] = {}
        self.changed = asyncio.Condition()
        self.dirty: set[str] = set()
        self.evicted = 0
        self.on_evict: Callable[[str], None] | None = None
        """Told the id of each node evicted, so per-node state elsewhere is dropped with it."""
        self.watchers: list[Callable[[str], None]] = []
        """Told the id of the node each message concerned, once applied, and of each node evicted (then gone
        from ``nodes``): views kept up to date one node at a time (``controller.fleet_index``)."""
        self.local_actions: deque[tuple[str, float, LocalAction]] = deque()
        """(node, the event's agent ``ts``, action): what agents did on their own while no controller listened
        (``agent.fallback``), in arrival order, until the engine adopts them (``controller.effects``)."""
        self.listening_since = 0.0
        """Wall time the controller's broker connection last came up. Nobody's silence counts from before it: a
        controller cut off from the broker heard nothing, it did not hear the fleet go silent."""
        self.stale = 0
        self.jumps = 0
        """Messages refused as a session jump."""

    def refuses_jump(self, message: NodeStatus | Report | DatasetDigest | Event, now: float,
                     offline_after: float) -> bool:
        """Whether ``message`` leaps far beyond the live session of a node heard within ``offline_after``
        (see the module docstring); a refused status is held for when its session begins."""
        node = self.nodes.get(message.node)
        if node is None or not session_jump(node, message.session, now, offline_after):
            return False
        self.jumps += 1
        if isinstance(message, NodeStatus) and message.state == "online":
            node.held = message
        return True

    def apply(self, message: NodeMessage, now: float) -> CommandResult | None:
        """Fold a message in; returns a command result for the dispatcher, if it was one."""
        try:
            return self._fold(message, now)
        finally:
            for watch in self.watchers:
                watch(message.node)

    def _fold(self, message: NodeMessage, now: float) -> CommandResult | None:
        if isinstance(message, NodeStatus):
            self._apply_status(message, now)
            return None
        node = self._node(message.node)
        if isinstance(message, DatasetDigest):
            self._apply_digest(node, message, now)
            return None
        if isinstance(message, Report):
            if message.session < node.session:
                self.stale += 1
                return None
            if message.session == node.session and message.seq <= node.last_seq:
                return None  # duplicate, reordered or replayed report: it says nothing about now
            if message.session == node.session and node.closed_conn >= node.conn:
                # After its connection's last will and before a newer birth: queued by an agent that was cut
                # off, it describes units as they were before (an agent fences them meanwhile). Not believed.
                self.stale += 1
                return None
            self._enter_session(node, message.session, now)
            node.last_seen = now
            node.online = True
            node.last_seq = message.seq
            self._keep(node, message)
            node.units = {
                u.name: node.units.get(u.name, u) if node.event_ts.get(u.name, 0.0) > message.ts else u
                for u in message.units[:MAX_UNITS_PER_NODE]
            }
            if len(node.event_ts) > len(node.units):  # units the node no longer reports: forget their events
                node.event_ts = {name: ts for name, ts in node.event_ts.items() if name in node.units}
            node.report_ts = message.ts if node.report_ts is None else max(node.report_ts, message.ts)
            held, node.held_events = node.held_events, deque()
            for event in held:  # what came before this report is in it; only what is newer still applies
                self._unit_event(node, event)
            self._touch(node.id)
            return None
        if isinstance(message, Event):
            if message.session < node.session:
                self.stale += 1
                return None
            self._enter_session(node, message.session, now)
            if message.ts > node.event_clock:  # a replayed (older) event says nothing about now
                node.event_clock = message.ts
                node.last_seen = now
                if node.closed_conn < node.conn:  # not after its connection's last will: a late event
                    node.online = True  # it is talking, even if its birth message is still on the way
            body = message.body
            if isinstance(body, CommandResult):
                return body  # the dispatcher takes each command's first ack only
            if isinstance(body, LocalAction):  # not unit state: never held, adopted by the engine (once per key)
                if len(self.local_actions) >= MAX_LOCAL_ACTIONS:
                    self.local_actions.popleft()
                    self.stale += 1
                self.local_actions.append((node.id, message.ts, body))
                return None
            if node.report_ts is None:
                # Nothing of this session seen yet (e.g. this controller just started): the event may be a
                # replay the node's state has long moved past. Held until a report says where it stands.
                if len(node.held_events) >= MAX_HELD_EVENTS:
                    node.held_events.popleft()
                    self.stale += 1
                node.held_events.append(message)
                return None
            self._unit_event(node, message)
        return None

    def _unit_event(self, node: NodeState, message: Event) -> None:
        """Apply a unit event unless a report or a later event of its unit already covers it."""
        body = message.body
        assert not isinstance(body, CommandResult | LocalAction)  # noqa: S101 - callers route these elsewhere
        if (node.report_ts is not None and message.ts <= node.report_ts) or \
                message.ts < node.event_ts.get(body.unit, message.ts):
            self.stale += 1  # older than a report or the unit's last event: a replay (or a very late duplicate)
            return
        if body.unit not in node.units and len(node.units) >= MAX_UNITS_PER_NODE:
            self.stale += 1  # no agent runs more units: the state of a node stays bounded
            return
        self._apply_unit_event(node, body)
        node.event_ts[body.unit] = message.ts
        self._touch(node.id)

    def _apply_status(self, status: NodeStatus, now: float) -> None:
        node = self._node(status.node)
        if status.session < node.session:
            self.stale += 1  # a will or birth from an older agent session
            return
        self._enter_session(node, status.session, now, held=False)
        if node.held is not None and node.held.session <= status.session:
            node.held = None
        if status.conn < node.conn or status.conn <= node.closed_conn:
            self.stale += 1  # a will or birth of a connection already over: a replay
            return
        if status.state == "online" and status.conn == node.conn and status.ts <= node.status_ts:
            return  # this connection's birth again (a retained redelivery, a re-announce or a replay): nothing new
        if status.state == "online" and status.conn > node.conn:
            node.born_ts = status.ts  # a new connection: what it said of its units before is unconfirmed
        node.conn = status.conn
        node.status_ts = max(node.status_ts, status.ts)
        if status.state == "offline":
            node.closed_conn = status.conn  # applied once
        node.online = status.state == "online"
        node.version = status.version
        node.http = status.http
        node.labels = dict(list(status.labels.items())[:32])  # bounded: a node's labels are few
        node.last_seen = now
        for name in status.units:
            if name in node.units or len(node.units) < MAX_UNITS_PER_NODE:
                node.units.setdefault(name, UnitReport(name=name, kind="process", state="starting"))
        self._touch(node.id)

    def _apply_digest(self, node: NodeState, digest: DatasetDigest, now: float) -> None:
        if digest.session < node.session or (digest.session == node.session and digest.ts < node.digests_ts):
            self.stale += 1
            return
        self._enter_session(node, digest.session, now)
        node.digests_ts = digest.ts
        node.datasets = {d.name: d for d in digest.datasets[:MAX_DATASETS_PER_NODE]}
        self._touch(node.id)

    def _enter_session(self, node: NodeState, session: int, now: float, *, held: bool = True) -> None:
        """A newer agent session starts its sequence numbers and clock afresh; a status held back for it
        (a session jump, refused while the old session was live) applies now."""
        if session > node.session:
            node.session = session
            node.last_seq = -1
            node.event_ts.clear()
            node.status_ts, node.conn, node.closed_conn, node.event_clock = -1.0, 0, -1, 0.0
            node.report_ts, node.born_ts = None, -1.0
            node.held_events.clear()
        if held and node.held is not None and node.held.session <= session:
            status, node.held = node.held, None
            if status.session == session:
                self._apply_status(status, now)

    def _apply_unit_event(self, node: NodeState, body: UnitExited | UnitStarted | ProbeChanged) -> None:
        unit = node.units.get(body.unit) or UnitReport(name=body.unit, kind="process", state="starting")
        if isinstance(body, UnitExited):
            unit = msgspec.structs.replace(
                unit, state="stopped" if body.expected else "exited", pid=body.pid,
                exit_code=body.exit_code, exit_signal=body.exit_signal, probe=_pending(unit.probe))
        elif isinstance(body, UnitStarted):
            unit = msgspec.structs.replace(unit, state="running", pid=body.pid, restarts=body.restarts,
                                           exit_code=None, exit_signal=None, probe=_pending(unit.probe),
                                           proc_status="")
        else:
            unit = msgspec.structs.replace(unit, probe=body.probe)
        node.units[body.unit] = unit

    def _keep(self, node: NodeState, report: Report) -> None:
        """Add a report's sample to the node's history; drop the oldest beyond ``history`` or ``state_bytes``.

        A value a sample shares with the next (``ReportSample.of``) is counted once, in the older; dropping
        that one leaves it alive in the next, so a node may hold up to one sample's worth beyond its budget."""
        previous = node.reports[-1] if node.reports else None
        sample = ReportSample.of(report, previous)
        size = sample.nbytes(previous)
        node.reports.append(sample)
        node.report_bytes.append(size)
        node.history_bytes += size
        while len(node.reports) > 1 and (len(node.reports) > self.history or node.history_bytes > self.state_bytes):
            node.reports.popleft()
            node.history_bytes -= node.report_bytes.popleft()

    def history_bytes(self) -> int:
        """Bytes of report history the fleet holds (``ReportSample.nbytes``), every node's together."""
        return sum(node.history_bytes for node in self.nodes.values())

    def _node(self, node_id: str) -> NodeState:
        node = self.nodes.get(node_id)
        if node is None:
            if len(self.nodes) >= self.max_nodes:
                victim = min(self.nodes.values(), key=lambda n: (n.online, n.last_seen))
                self.evicted += 1
                self.forget(victim.id)
            node = self.nodes[node_id] = NodeState(id=node_id, reports=deque())
        return node

    def forget(self, node_id: str) -> None:
        """Drop a node, and what is kept about it elsewhere (``on_evict``, watchers): evicted, or another
        controller watches it now (its bucket moved)."""
        if self.nodes.pop(node_id, None) is None:
            return
        self.dirty.discard(node_id)
        if self.on_evict is not None:
            self.on_evict(node_id)
        for watch in self.watchers:
            watch(node_id)

    def _touch(self, node_id: str) -> None:
        self.dirty.add(node_id)

    async def notify(self) -> None:
        """Wake whoever waits on a change (the engine, verifications)."""
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some change, or ``timeout`` seconds; True if it held."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout)
            except TimeoutError:
                return predicate()
        return True

    def snapshot(self, node_id: str) -> NodeSnapshot | None:
        node = self.nodes.get(node_id)
        if node is None:
            return None
        last_seen = max(node.last_seen, self.listening_since) if node.last_seen else 0.0
        return NodeSnapshot(node=node.id, online=node.online, last_seen=last_seen, confirmed=node.confirmed,
                            units=tuple(node.units.values()), reports=tuple(node.reports))

    def snapshots(self, now: float, offline_after: float) -> tuple[dict[str, NodeSnapshot], set[str]]:
        """Every node's snapshot, and which of them are offline at ``now``."""
        snapshots = {n: s for n in list(self.nodes) if (s := self.snapshot(n)) is not None}
        return snapshots, {n for n, s in snapshots.items() if is_offline(s, now, offline_after)}

    def unit(self, node_id: str, unit: str) -> UnitReport | None:
        node = self.nodes.get(node_id)
        return node.units.get(unit) if node else None


def session_jump(node: NodeState, session: int, now: float, offline_after: float) -> bool:
    """``session`` leaps more than ``MAX_SESSION_JUMP`` beyond ``node``'s live session while the node is
    online and was heard within ``offline_after`` seconds (pure)."""
    return node.online and now - node.last_seen <= offline_after and session > node.session + MAX_SESSION_JUMP


def _pending(probe: ProbeState | None) -> ProbeState | None:
    """A probe whose verdict on a new incarnation of the unit is not in yet."""
    if probe is None:
        return None
    return msgspec.structs.replace(probe, healthy=False, consecutive_failures=0, last_error="pending")


def unit_is_healthy(unit: UnitReport | None) -> bool:
    """Running, and its probe (if it has one) says healthy; a scheduled job whose run completed is healthy too."""
    if unit is not None and unit.state == "completed":
        return True
    if unit is None or unit.state != "running":
        return False
    return unit.probe is None or unit.probe.healthy
