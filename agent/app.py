"""The agent's composition root: wires supervisor, probes, executor and MQTT, start to stop.

``run_agent(config, stop=...)`` is the whole agent. At start it bumps the
session number in ``<state_dir>/session`` (so a late last will from an older
run never marks this one offline; a copy lives in the command ledger), opens
the command ledger and reads the node's key, then runs in one task group.
Everything it sends the controller — status, its precomputed last will,
reports, digests, events — is signed with that key (``wire.sign_node_message``);
without a key it goes out unsigned, and a controller with keys drops it. The
parts:

- the MQTT link (``selfheal.mqtt.MqttLink``) with a retained ``offline`` last
  will built per connection: each (re)connect gets the next connection number
  (``NodeStatus.conn``), shared by its will and its ``online`` birth, so a
  replayed will of an earlier connection cannot close the current one; on
  every connect it subscribes to its ``commands`` topic and the controller's
  status, and publishes its retained ``online`` birth, the same bytes again
  whenever a (new) controller comes online;
- the supervisor (units, their watchers and probes);
- the digester (``agent.digests``): a Merkle tree per dataset, scanned on
  schedule in a thread, its roots published retained on ``digests``;
- the HTTP server on ``agent.listen`` (``agent.peer_api``; ``/healthz`` only without datasets): dataset trees,
  chunk lists and chunks for the controller and peers, behind transfer
  tokens; its address goes out in every status message;
- the reporter: one ``Report`` per ``agent.interval`` while connected;
- fencing (``agent.fencing``): movable singletons stop themselves after
  ``stop_after_disconnect`` seconds without the broker;
- the fallback (``agent.fallback``): with no controller present for
  ``fallback_after``, crashed or hung units are restarted here, on a ladder
  with backoff, recorded in the ledger and reported once a controller is back;
- the command loop: commands are decoded at the edge (malformed ones are
  dropped, counted and logged, rate-limited), queued (bounded) and executed
  one at a time, each acked with a ``CommandResult`` event.

Events (unit changes, command results) go out with QoS 1 through the link's
outbox, held (``MqttLink.publish(held=True)``) until the controller listens:
they wait out a broker outage, and once the agent has heard of a controller,
every reconnect holds them until the controller's ``online`` status arrives
on the new connection — after a broker restart that lost its sessions, an
event sent before the controller subscribed again would be dropped by the
broker. A controller announced ``offline`` holds them too. An agent that
never heard of a controller (a broker without one yet) sends them at once.
Reports are not held: the next one says the same, and a full outbox drops
them first. Limit: a broker that keeps retained messages but not the
controller's subscriptions (persistence on, restarted) shows a stale
``online`` before the controller is back; events sent in that gap are lost
(the reports that follow still carry the units' state).

Shutdown is ordered: finish the command in hand, stop reporting, stop the
units, publish ``offline`` (a clean disconnect sends no will) — the last word,
after the units' exits, which would otherwise make the node look alive
again — then flush and disconnect.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Literal

import msgspec

from agent.collect import ProcessSampler, collect_host
from agent.digests.cache import DigestCache
from agent.digests.scanner import DatasetScanner
from agent.executor import CommandExecutor
from agent.fallback import Fallback, Policy
from agent.fencing import Contact, fence_after, run_fencing
from agent.http_server import bind_listen, peer_server
from agent.ledger import Ledger
from agent.lifecycle import agent_service
from agent.metrics import AgentMetrics, Figures
from agent.resync import DatasetResyncer
from agent.supervisor import DEFAULT_KINDS, Supervisor
from agent.units.base import UnitContext, UnitFactory
from selfheal import __version__, sdnotify
from selfheal.clocks import Clock, SystemClock
from selfheal.config import Config
from selfheal.errors import SelfhealError, WireError
from selfheal.keys import read_own_key
from selfheal.logs import RateLimiter, get_logger
from selfheal.mqtt import MqttLink, Outgoing
from selfheal.peer_tls import peer_ssl_context
from selfheal.wire import (
    CONTROLLER_STATUS_TOPIC,
    CONTROLLERS_STATUS_FILTER,
    Command,
    CommandResult,
    DatasetDigest,
    DatasetSummary,
    Event,
    EventBody,
    HostMetrics,
    NodeChannel,
    NodeStatus,
    Report,
    SignedNodeMessage,
    UnitReport,
    decode_controller_status,
    decode_node_message,
    encode,
    fit_event,
    fit_unit,
    is_controller_status,
    node_topic,
    sign_node_message,
)

COMMAND_QUEUE = 256
"""Commands waiting to execute at most; more are dropped (the controller's ack timeout retries)."""


def next_session(state_dir: Path, wall: float, saved: int = 0) -> int:
    """Read, increment and durably store the session number (blocking).

    ``saved``: the copy in the command ledger; the session is one more than the
    higher of the two, so a lost or corrupt file does not send it back (the
    controller takes a session far beyond the live one only from a node it
    has stopped hearing, ``controller.fleet``). An unreadable counter without
    a copy restarts from the wall clock in seconds, which is above any count a
    real node reaches, so sessions still only grow.
    """
    path = state_dir / "session"
    try:
        previous = int(path.read_text(encoding="ascii").strip() or "0")
    except FileNotFoundError:
        previous = 0
    except (ValueError, UnicodeDecodeError):
        previous = saved or int(wall)
    session = max(previous, saved) + 1
    tmp = path.with_name("session.tmp")
    with tmp.open("w", encoding="ascii") as out:
        out.write(f"{session}\n")
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    return session


class AgentApp:
    """One running agent; build it with ``AgentApp.open`` (it does the blocking reads)."""

    def __init__(self, config: Config, *, session: int, key: bytes | None, ledger: Ledger, cache: DigestCache,
                 http: tuple[socket.socket, str], clock: Clock,
                 kinds: Mapping[str, UnitFactory] | None = None) -> None:
        agent = config.agent
        self.config = config
        self.node_id = agent.node_id
        self.state_dir = Path(agent.state_dir)
        self.session = session
        self.conn = 0
        """The broker connection within this session, counted at each (re)connect (``NodeStatus.conn``)."""
        self._birth = b""
        """The current connection's signed ``online`` status (``_next_connection``)."""
        self.clock = clock
        self.ledger = ledger
        self.key = key
        """The node's key: signs commands to it (checked by the executor) and everything it sends."""
        self.seq = 0
        self.counts: Counter[str] = Counter()
        """events, reports, and dropped input by reason (malformed, oversized, spoofed, queue_full)."""
        self.limiter = RateLimiter(period=60.0)
        self.log = get_logger("agent", node=self.node_id)
        self.cache = cache
        http_socket, self.http_address = http
        self.topics = {channel: node_topic(self.node_id, channel)
                       for channel in ("status", "report", "digests", "events", "commands")}
        self.link = MqttLink.from_config(
            config.mqtt, client_id=f"selfheal-agent-{self.node_id}",
            will=self._next_connection,
            name="agent.mqtt",
        )
        ctx = UnitContext(node_id=self.node_id, state_dir=self.state_dir, emit=self.emit, clock=clock)
        self.contact = Contact(self.state_dir / "contact", clock)
        period = sdnotify.watchdog_period()
        watchdog = 2 * period if period is not None else None
        movable = {u.name: after for u in agent.units if (after := fence_after(
            u, keepalive=config.mqtt.keepalive, interval=agent.interval, watchdog=watchdog)) is not None}
        self.supervisor = Supervisor(agent.units, ctx, kinds=kinds or DEFAULT_KINDS, fence_after=movable)
        self.sampler = ProcessSampler()
        self.digests = DatasetScanner(agent.datasets, cache=cache, publish=self._publish_digests, clock=clock,
                                      node_id=self.node_id)
        self.resyncer = DatasetResyncer(scanner=self.digests, state_dir=self.state_dir, clock=clock,
                                        node_id=self.node_id, verify=peer_ssl_context(config.security.peer_tls_ca))
        self.executor = CommandExecutor(node_id=self.node_id, key=key, ledger=ledger,
                                        units=self.supervisor, clock=clock, limiter=self.limiter,
                                        datasets=self.resyncer)
        self.fallback = Fallback(node_id=self.node_id, session=session, policy=Policy.of(config),
                                 enabled=agent.fallback, units=self.supervisor, ledger=ledger, clock=clock,
                                 emit=self.emit, connected=self.link.connected.is_set, present=self._controller_present)
        self.refused: Counter[str] = Counter()
        """Requests the dataset peer API refused, by reason."""
        self.metrics = AgentMetrics(Figures(node=self.node_id, messages=lambda: self.counts,
                                            commands=lambda: self.executor.counts, refused=lambda: self.refused))
        self.http = peer_server(http_socket, node_id=self.node_id, key=key, datasets=self.digests.view, cache=cache,
                                clock=clock, serves_datasets=bool(agent.datasets), metrics=self.metrics.render,
                                refused=self.refused, tls_cert=agent.tls_cert, tls_key=agent.tls_key)
        self._commands: asyncio.Queue[Command | None] = asyncio.Queue(maxsize=COMMAND_QUEUE)
        self._controllers: dict[str, tuple[str, int]] = {}
        """Status topic → (session, broker connection ``link.connects`` it arrived on) of each controller whose
        last word was ``online``: the one controller, or each of several sharing a PostgreSQL store."""
        self._controller_heard = False
        """Whether any controller status reached this agent: from then on a reconnect holds events until
        the controller is seen online again (see the module docstring)."""
        self._host: HostMetrics | None = None
        self._report_round: float | None = None

    @classmethod
    async def open(cls, config: Config, *, clock: Clock | None = None,
                   kinds: Mapping[str, UnitFactory] | None = None) -> AgentApp:
        """Prepare the state dir, bump the session, open the ledger and digest cache, read the key, bind HTTP."""
        clock = clock or SystemClock()
        state_dir = Path(config.agent.state_dir)
        await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
        key = await asyncio.to_thread(read_own_key, config.security.key_dir, config.agent.node_id)
        ledger = await asyncio.to_thread(Ledger(state_dir / "ledger.sqlite3").open, clock.wall())
        try:
            session = await asyncio.to_thread(next_session, state_dir, clock.wall(), ledger.session)
            await asyncio.to_thread(ledger.save_session, session)
        except BaseException:
            await asyncio.to_thread(ledger.close)
            raise
        cache = await asyncio.to_thread(DigestCache(state_dir / "digests.sqlite3").open,
                                        [d.name for d in config.agent.datasets])
        try:
            http = bind_listen(config.agent.listen, broker_host=config.mqtt.host_port()[0],
                               tls=config.agent.tls_cert is not None)
        except OSError as exc:
            await asyncio.to_thread(ledger.close)
            await asyncio.to_thread(cache.close)
            raise SelfhealError(f"agent.listen {config.agent.listen}: cannot listen: {exc.strerror}") from None
        app = cls(config, session=session, key=key, ledger=ledger, cache=cache, http=http, clock=clock, kinds=kinds)
        if key is None:
            app.log.warning("agent.no_command_key", key_dir=config.security.key_dir,
                            consequence="every command will be rejected, and what this agent sends goes out "
                                        "unsigned: a controller with keys drops it")
        return app

    async def run(self, *, stop: asyncio.Event, ready: asyncio.Event | None = None,
                  source: Path | None = None) -> None:
        """``source``: the config file, re-read on SIGHUP (``agent.lifecycle``)."""
        units_stop, units_started, link_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
        service = agent_service(self.config, source=source, units=self.supervisor.reports,
                                connected=self.link.connected.is_set, held=lambda: self.link.holding,
                                report_round=lambda: self._report_round)
        self.log.info("agent.starting", session=self.session, units=self.supervisor.names,
                      datasets=list(self.digests.views), http=self.http_address,
                      broker=f"{self.link.host}:{self.link.port}")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(service.run(stop=stop), name="agent-service")
            tg.create_task(self.link.run(stop=link_stop, handle=self.handle, on_connect=self._on_connect),
                           name="agent-mqtt")
            await asyncio.to_thread(self.contact.load)
            units = tg.create_task(self.supervisor.run(stop=units_stop, started=units_started,
                                                       out_of_contact=self.contact.out_of_contact_for()),
                                   name="agent-supervisor")
            fencing = tg.create_task(run_fencing(
                self.contact, self.config.agent.units, connected=self.link.connected,
                is_running=self.supervisor.is_running, fence=self.supervisor.fence, stop=stop), name="agent-fencing")
            fallback = tg.create_task(self.fallback.run(stop=stop), name="agent-fallback")
            reporter = tg.create_task(self._report_loop(stop=stop), name="agent-report")
            digests = tg.create_task(self.digests.run(stop=stop), name="agent-digests")
            http = tg.create_task(self.http.run(stop=stop), name="agent-http")
            commands = tg.create_task(self._command_loop(), name="agent-commands")
            readiness = tg.create_task(self._signal_ready(units_started, ready, service.ready), name="agent-ready")
            await stop.wait()
            service.stopping()
            self.log.info("agent.stopping")
            readiness.cancel()
            self._end_commands()
            await commands
            await reporter
            await fencing
            await fallback
            await digests
            await http
            units_stop.set()
            await units
            self.link.publish(self.topics["status"], self._payload("status", self._status("offline")), qos=1,
                              retain=True)
            link_stop.set()
        self.log.info("agent.stopped", counts=dict(self.counts), commands=dict(self.executor.counts))

    def close(self) -> None:
        """Close the ledger and the digest cache (blocking)."""
        self.ledger.close()
        self.cache.close()

    def emit(self, body: EventBody) -> None:
        """Send one event (QoS 1); it waits in the outbox while the broker or the controller is away."""
        event = Event(node=self.node_id, session=self.session, ts=self.clock.wall(), body=fit_event(body))
        self.link.publish(self.topics["events"], self._payload("events", event), qos=1, held=True)
        self.counts["events"] += 1

    async def handle(self, topic: str, payload: bytes) -> None:
        """Every incoming MQTT message; never raises, never blocks."""
        if topic == self.topics["commands"]:
            try:
                message = decode_node_message(topic, payload)
            except WireError as exc:
                self._drop(exc.reason, str(exc), topic)
                return
            if not isinstance(message, Command):
                self._drop("malformed", f"{type(message).__name__} on the commands topic", topic)
                return
            try:
                self._commands.put_nowait(message)
            except asyncio.QueueFull:
                self._drop("queue_full", f"{COMMAND_QUEUE} commands already waiting", topic)
        elif is_controller_status(topic):
            self._controller_status(topic, payload)

    def _controller_status(self, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained status: one of several controllers stopped cleanly
            if topic != CONTROLLER_STATUS_TOPIC:
                self._controller_gone(topic)
            return
        try:
            status = decode_controller_status(payload)
        except WireError as exc:
            self._drop(exc.reason, str(exc), topic)
            return
        self._controller_heard = True
        if status.state != "online":
            self._controller_gone(topic)
            return
        known = self._controllers.get(topic)
        self._controllers[topic] = (status.session, self.link.connects)
        self.link.release()
        if known is None or known[0] != status.session:
            self.log.info("agent.controller_online", controller_session=status.session, topic=topic)
            self._announce()

    def _controller_gone(self, topic: str) -> None:
        gone = self._controllers.pop(topic, None)
        if gone is not None:
            self.log.info("agent.controller_offline", controller_session=gone[0], topic=topic,
                          effect="events wait until a controller is online" if not self._controller_present()
                          else "another controller listens")
        if not self._controller_present():
            self.link.hold()

    def _controller_present(self) -> bool:
        """A controller listens: its ``online`` arrived on the current broker connection and nothing since
        said ``offline`` (after a broker restart that lost the retained status, an old ``online`` is no proof).
        With several controllers, any one: the one holding this node's bucket, or the one taking it over."""
        return self.link.connected.is_set() and any(
            conn == self.link.connects for _, conn in self._controllers.values())

    async def _on_connect(self, link: MqttLink) -> None:
        if self._controller_heard:
            link.hold()  # until the controller's status on this connection says it listens
        await link.subscribe(self.topics["commands"], qos=1)
        await link.subscribe(CONTROLLER_STATUS_TOPIC, qos=1)
        await link.subscribe(CONTROLLERS_STATUS_FILTER, qos=1)
        self._announce()
        if summaries := self.digests.summaries():  # a broker restarted without persistence forgot them
            self._publish_digests(summaries)

    def _next_connection(self) -> Outgoing:
        """Before each (re)connect: count the connection, sign its ``online`` birth and return its ``offline``
        last will, both carrying its number (a will replayed from an earlier connection is then stale)."""
        self.conn += 1
        self._birth = self._payload("status", self._status("online"))
        return Outgoing(self.topics["status"], self._payload("status", self._status("offline")), qos=1, retain=True)

    def _announce(self) -> None:
        """The current connection's birth, the same bytes again when a (new) controller comes online."""
        if not self._birth:
            self._birth = self._payload("status", self._status("online"))
        self.link.publish(self.topics["status"], self._birth, qos=1, retain=True)

    def _status(self, state: Literal["online", "offline"]) -> NodeStatus:
        return NodeStatus(node=self.node_id, state=state,
                          session=self.session, version=__version__,
                          units=[unit.name for unit in self.config.agent.units],
                          labels=dict(self.config.agent.labels), http=self.http_address,
                          ts=self.clock.wall(), conn=self.conn)

    def _payload(self, channel: NodeChannel, message: SignedNodeMessage) -> bytes:
        """The bytes to publish: signed with the node's key (the controller drops unsigned traffic once it
        has keys); unsigned without a key, which ``open`` warned about."""
        if self.key is None:
            return encode(message)
        return encode(sign_node_message(message, channel, self.key))

    def _drop(self, reason: str, detail: str, topic: str) -> None:
        self.counts[reason] += 1
        if self.limiter.allow(topic, reason, self.clock.monotonic()):
            self.log.warning("agent.message_dropped", reason=reason, detail=detail[:300], topic=topic,
                             suppressed_so_far=self.limiter.suppressed)

    def _publish_digests(self, summaries: list[DatasetSummary]) -> None:
        """The node's dataset digests, retained: a (new) controller learns them on subscribing."""
        digest = DatasetDigest(node=self.node_id, session=self.session, ts=self.clock.wall(), datasets=summaries)
        self.link.publish(self.topics["digests"], self._payload("digests", digest), qos=1, retain=True)
        self.counts["digests"] += 1

    async def _signal_ready(self, units_started: asyncio.Event, ready: asyncio.Event | None,
                            notify_ready: Callable[[], None]) -> None:
        await units_started.wait()
        await self.link.connected.wait()
        while not self.http.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.02)
        self.log.info("agent.ready", session=self.session)
        if ready is not None:
            ready.set()
        notify_ready()

    async def _command_loop(self) -> None:
        while (command := await self._commands.get()) is not None:
            try:
                async with self.fallback.acting:  # never alongside a local restart (``agent.fallback``)
                    result = await self.executor.execute(command)
            except Exception as exc:  # one bad command must never take the agent (and its units) down
                self.counts["command_errors"] += 1
                self.log.exception("command.crashed", command_id=command.id[:64])
                result = CommandResult(command_id=command.id, key=command.key, status="failed",
                                       detail=f"internal error in the agent: {type(exc).__name__}: {exc}"[:500])
            self.emit(result)

    def _end_commands(self) -> None:
        """Drop what still waits (unacked: the controller times out and decides) and end the loop."""
        while not self._commands.empty():
            if self._commands.get_nowait() is not None:
                self.counts["dropped_at_shutdown"] += 1
        self._commands.put_nowait(None)

    async def _report_loop(self, *, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.agent.interval
        self._host = await asyncio.to_thread(collect_host)  # primes cpu_percent's first delta
        next_at = loop.time() + interval
        while not stop.is_set():
            self._report_round = loop.time()  # the watchdog's health check: this loop goes round
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            if stop.is_set():
                return
            next_at = max(next_at + interval, loop.time())  # a slow round skips ticks, never bursts
            if self.link.connected.is_set():
                report = await self._build_report()
                self.link.publish(self.topics["report"], self._payload("report", report), qos=0, current=True)
                self.counts["reports"] += 1
                await asyncio.to_thread(self.contact.seen)

    async def _build_report(self) -> Report:
        self._host = host = await asyncio.to_thread(collect_host, self._host)
        ts = self.clock.wall()  # before the units are read: every event older than the report is in it
        units = self.supervisor.reports()
        samples = await asyncio.to_thread(
            self.sampler.collect_many, [unit.pid for unit in units if unit.pid is not None])
        self.seq += 1
        return Report(node=self.node_id, session=self.session, seq=self.seq, ts=ts,
                      host=host, units=[fit_unit(_with_sample(unit, samples)) for unit in units])


def _with_sample(unit: UnitReport, samples: Mapping[int, tuple[float, int, int, int, str]]) -> UnitReport:
    sample = samples.get(unit.pid) if unit.pid is not None else None
    if sample is None:
        return unit
    cpu, rss, fds, threads, status = sample
    if unit.rss_bytes:  # the kind measured the whole unit (a container's or a service's cgroup): keep that
        cpu, rss = unit.cpu_percent, unit.rss_bytes
    return msgspec.structs.replace(unit, cpu_percent=cpu, rss_bytes=rss, num_fds=fds,
                                   num_threads=threads, proc_status=unit.proc_status or status)


async def run_agent(config: Config, *, stop: asyncio.Event, ready: asyncio.Event | None = None,
                    clock: Clock | None = None, source: Path | None = None) -> None:
    """Run the agent of ``config.agent.node_id`` until ``stop`` is set; ``ready`` once connected with units up."""
    app = await AgentApp.open(config, clock=clock)
    try:
        await app.run(stop=stop, ready=ready, source=source)
    finally:
        await asyncio.to_thread(app.close)
