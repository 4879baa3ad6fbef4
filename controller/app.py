"""The controller's composition root: build every part from the config and run them together.

One ``asyncio.TaskGroup`` with named tasks: the MQTT link (ingest), the
engine, the HTTP server, and the chat notification router when
``controller.notify`` lists destinations, and the PromQL finding source when
``controller.promql`` lists queries. SIGTERM (handled by the CLI) sets ``stop``;
each part winds down on it. The store is opened first and closed last.

Ingest (``Controller._ingest``) is where node traffic is trusted or not: a
message is decoded at the edge (``wire.decode_node_message``), then — when
``security.key_dir`` holds keys (``controller.keyring``) — its signature is
checked against its node's key, then its session (``Fleet.refuses_jump``),
and only then folded into the fleet. Whatever fails is dropped, counted in
``selfheal_messages_rejected_total{reason}`` (``unsigned``, ``bad_signature``,
``unknown_node``, ``session_jump``, and the decoder's reasons) and logged at
most once a minute per (node, reason); node ids heard without a key are kept
in a bounded list (``unknown_nodes``) the API shows, and never acted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import uvicorn

from controller.anomaly_state import load_watch_state, save_watch_state
from controller.api import ApiContext, create_api, datasets_view
from controller.broker import embedded_broker
from controller.dispatcher import Dispatcher
from controller.elsewhere import PeerCopies
from controller.engine import Engine
from controller.fleet import Fleet
from controller.fleet_index import FleetIndex
from controller.host_models import build_host_watch, run_host_models
from controller.instrument import MeteredDispatcher, MeteredWatch
from controller.keyring import KeyRing
from controller.lifecycle import Routes, controller_service
from controller.metrics import ControllerMetrics
from controller.notify import FanoutNotifier, LogNotifier, Notifier
from controller.notify.registry import default_formatters
from controller.notify.router import Destination, Router
from controller.ownership import Leased, Ownership, Sole
from controller.peers import Peers
from controller.shared_replicas import SharedReplicas
from controller.sources.alerts import ExternalAlerts
from controller.sources.promql import PromQLSource
from controller.store import Store
from controller.stores import open_store, ownership
from detectors.anomaly.policy import AlertPolicySpec
from detectors.anomaly.watch import AnomalyWatch, WatchSpec
from detectors.model import DetectorSettings, Finding, Threshold
from remediations.state import Budget
from rules.loader import load_rulebooks
from rules.model import Rulebook
from selfheal import wire
from selfheal.clocks import Clock, SystemClock
from selfheal.config import Config, NotifyConfig
from selfheal.config_checks import split_host_port
from selfheal.errors import RulebookError, SelfhealError, StoreError, WireError
from selfheal.keys import read_key
from selfheal.logs import RateLimiter, get_logger
from selfheal.mqtt import MqttLink, Outgoing
from selfheal.peer_tls import peer_ssl_context

if TYPE_CHECKING:
    from controller.leases import LeaseChange, LeaseKeeper

log = get_logger("controller")
SHARED_EVERY = 1.0
"""Seconds between two reads of the pause and silences from a store shared with other controllers."""
MAX_UNKNOWN_NODES = 256
"""Node ids without a key remembered for the API at most; the longest silent is forgotten first."""


@dataclass
class UnknownNode:
    """A node id heard on the broker with no key for it in ``security.key_dir``: listed, never acted on."""

    first_seen: float
    last_seen: float
    messages: int = 0


class Controller:
    def __init__(self, config: Config, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.rulebook: Rulebook = load_rulebooks(config.controller.rulebooks)
        self.metrics = ControllerMetrics()
        self.anomalies = build_watch(self.rulebook, self.metrics)
        self.alerts = ExternalAlerts(max_alerts=config.controller.alerts.max_alerts)
        """External alerts (POST /api/v1/alerts, PromQL queries) the engine sees as findings."""
        self.fleet = Fleet(history=config.controller.history, max_nodes=config.controller.max_nodes,
                           state_bytes=config.controller.node_state_bytes)
        self.index = FleetIndex(self.fleet, offline_after=config.controller.offline_after)
        """Fleet-wide counts kept up to date as messages are applied: the API, the page and /metrics read them."""
        self.session = uuid.uuid4().hex[:12]
        self.rate_limit = RateLimiter(period=60.0)
        self.keys = KeyRing(config.security.key_dir)
        """Node keys, loaded at start, reloaded on SIGHUP and when the key directory changes."""
        self.unknown_nodes: OrderedDict[str, UnknownNode] = OrderedDict()
        offline = wire.encode(wire.ControllerStatus(state="offline", session=self.session))
        self.status_topic = wire.controller_status_topic(config.controller.id) if config.store.url \
            else wire.CONTROLLER_STATUS_TOPIC
        """Where this controller says it listens: its own topic when several share a PostgreSQL store."""
        self.link = MqttLink.from_config(config.mqtt, client_id=f"selfheal-controller-{self.session}",
                                         will=Outgoing(self.status_topic, offline, 1, True),
                                         name="controller.mqtt")
        self.api_port: int | None = None
        self.notifier = LogNotifier()
        self.routes = Routes(None)
        """Chat destinations (``controller.notify``); a SIGHUP reload may replace them."""
        self.engine: Engine | None = None
        self.ownership: Ownership = Sole(0)
        """Which nodes this controller acts on (set at start: ``controller.stores.ownership``)."""

    def settings(self) -> DetectorSettings:
        return DetectorSettings(
            offline_after=self.config.controller.offline_after,
            thresholds=tuple(Threshold(name=t.name, metric=t.metric, above=t.above, samples=t.samples,
                                       severity=t.severity) for t in self.rulebook.thresholds))

    def key_for(self, node: str) -> bytes | None:
        return read_key(self.config.security.key_dir, node)

    async def run(self, *, stop: asyncio.Event, ready: asyncio.Event | None = None,
                  source: Path | None = None) -> None:
        """``source``: the config file, re-read on SIGHUP (``controller.lifecycle``)."""
        async with contextlib.AsyncExitStack() as stack:
            if self.config.mqtt.url == "embedded":
                host, port = split_host_port(self.config.mqtt.embedded_listen, what="mqtt.embedded_listen")
                await stack.enter_async_context(
                    embedded_broker(host, port, password_file=self.config.mqtt.embedded_password_file))
            state_dir = Path(self.config.controller.state_dir)
            store = await open_store(  # [store] url: PostgreSQL; else SQLite in state_dir
                self.config, on_write_error=lambda reason: self.metrics.store_write_errors.labels(reason).inc())
            stack.push_async_callback(store.close)
            load_watch_state(self.anomalies, state_dir, lambda why: self.metrics.state_rejected.labels(why).inc())
            stack.callback(lambda: save_watch_state(self.anomalies, state_dir))  # the watch a reload left
            self.ownership, keeper = await ownership(self.config, store)
            await asyncio.to_thread(self.keys.load, self.clock.wall())
            link_base = self.config.controller.public_url or f"http://{self.config.controller.listen}"
            self.routes.replace(self._router(link_base, self.config.controller.notify, store))
            engine = self.engine = self._engine(store, link_base, several=keeper is not None)
            dispatcher = engine.dispatcher
            await engine.recover(self.ownership.owns)  # with leases: nothing yet, buckets come as they are granted
            self._engine_metrics(engine)
            api_ctx = self._api_context(store, engine, self._peers(keeper, stack))
            self.metrics.add_dataset_collector(lambda: datasets_view(api_ctx))
            self._bounds_metrics()
            api = create_api(api_ctx)
            server, sock = self._http_server(api)
            stack.callback(sock.close)
            who = {"epoch": self.ownership.epoch} if isinstance(self.ownership, Sole) else \
                {"id": self.config.controller.id, "store": self.config.store.url and "postgresql"}
            log.info("controller.starting", **who, session=self.session, api=f"http://{self.api_address}/",
                     mqtt=self.config.mqtt.url, rules=[r.name for r in self.rulebook.rules])

            async def handle(topic: str, payload: bytes) -> None:
                await self._ingest(topic, payload, dispatcher)

            tasks: dict[str, asyncio.Task[None]] = {}
            service = controller_service(self, engine, source=source, routes=self.routes, tasks=tasks,
                                         build_router=lambda notify: self._router(link_base, notify, store))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(service.run(stop=stop), name="service")
                link_stop = asyncio.Event()  # after the last word below
                tasks["mqtt"] = tg.create_task(self.link.run(stop=link_stop, handle=handle,
                                                             on_connect=self._on_connect), name="mqtt")
                tasks["engine"] = tg.create_task(engine.run(stop=stop), name="engine")
                tasks["http"] = tg.create_task(server.serve(sockets=[sock]), name="http")
                tg.create_task(self._announce_ready(server, ready, service.ready), name="ready")
                tasks["notify"] = tg.create_task(self.routes.run(stop=stop), name="notify")
                if keeper is not None:
                    tasks["leases"], tasks["buckets"], tasks["shared"] = self._start_leases(tg, keeper, engine, stop)
                tasks["host-models"] = tg.create_task(run_host_models(lambda: self.anomalies, stop=stop,
                                                                      scored=self._look_again), name="host-models")
                if self.config.controller.promql:
                    promql = PromQLSource(self.config.controller.promql, alerts=self.alerts, clock=self.clock,
                                          metrics=self.metrics, wake=self.fleet.notify)
                    tg.create_task(promql.run(stop=stop), name="promql")
                await stop.wait()
                service.stopping()
                server.should_exit = True
                self._say_offline()
                link_stop.set()
                await self.fleet.notify()

    def _engine(self, store: Store, link_base: str, *, several: bool) -> Engine:
        """``several``: controllers share the fleet, and compare their dataset replicas through the store."""
        notifier: Notifier = FanoutNotifier(self.notifier, self.routes)
        shared = self.index.shared = SharedReplicas(self.ownership.epoch_of) if several else None
        config = self.config.controller
        dispatcher = MeteredDispatcher(metrics=self.metrics, fleet=self.fleet, store=store, link=self.link,
                                       keys=self.key_for, clock=self.clock, notifier=notifier,
                                       ownership=self.ownership, command_ttl=config.command_ttl,
                                       ack_timeout=config.ack_timeout, offline_after=config.offline_after,
                                       fence_floor=config.fence_floor,
                                       peer_tls=peer_ssl_context(self.config.security.peer_tls_ca))
        budget = config.budget
        return Engine(fleet=self.fleet, store=store, rulebook=self.rulebook, dispatcher=dispatcher,
                      clock=self.clock, settings=self.settings(), metrics=self.metrics, notifier=notifier,
                      budget=Budget(max_concurrent=budget.max_concurrent, max_node_share=budget.max_node_share,
                                    max_replica_share=budget.max_replica_share, group_label=budget.group_label),
                      command_ttl=config.command_ttl, link_base=link_base, anomalies=self.anomalies,
                      external=self._external_findings, listening=self.link.connected.is_set, shared=shared)

    def _router(self, external_url: str, notify: Sequence[NotifyConfig], store: Store) -> Router | None:
        """Chat notifications: grouped, rate-limited, retried; deliveries go into the incidents' audit trails."""
        destinations = [Destination.from_config(c, i) for i, c in enumerate(notify)]
        if not destinations:
            return None

        async def record(incident_id: int, kind: str, data: dict[str, object]) -> None:
            if self.engine is not None:
                await self.engine.effects.audit(incident_id, kind, data)

        def silenced(labels: Mapping[str, str]) -> bool:
            now = self.clock.wall()
            return self.engine is not None and any(
                s.active(now) and s.matches(dict(labels)) for s in self.engine.reconciler.silences)

        return Router(destinations, formatters=default_formatters(), metrics=self.metrics, clock=self.clock,
                      record=record, silenced=silenced, external_url=external_url, claims=store)

    def _api_token(self) -> str | None:
        path = Path(self.config.security.api_token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            log.warning("api.token_missing", path=str(path), error=exc.strerror,
                        effect="mutating endpoints (approve, cancel, pause, silences) answer 503")
            return None
        return token or None

    @property
    def api_address(self) -> str:
        host, _ = split_host_port(self.config.controller.listen, what="controller.listen")
        return f"{host}:{self.api_port}"

    def _api_context(self, store: Store, engine: Engine, peers: Peers | None) -> ApiContext:
        """The API's context; with peers and a token, the dispatcher's way to migrate across buckets too."""
        token = self._api_token()
        if peers is not None and token is not None:
            engine.dispatcher.elsewhere = PeerCopies(peers, token)
        return ApiContext(fleet=self.fleet, store=store, engine=engine, metrics=self.metrics,
                          clock=self.clock, offline_after=self.config.controller.offline_after,
                          broker_connected=self.link.connected, api_token=token,
                          read_token_file=self.config.security.api_read_token_file,
                          alerts=self.alerts, alerts_ttl=self.config.controller.alerts.ttl,
                          unknown_nodes=self.unknown_nodes, index=self.index, peers=peers)

    @property
    def peer_url(self) -> str:
        """Where other controllers reach this one's API (``controller.peer_url``)."""
        config = self.config.controller
        if config.peer_url or config.public_url:
            return (config.peer_url or config.public_url).rstrip("/")
        host, _ = split_host_port(config.listen, what="controller.listen")
        if host in {"0.0.0.0", "::", ""}:  # noqa: S104 - a wildcard bind, named to be replaced
            host = socket.gethostname()
        return f"http://{f'[{host}]' if ':' in host else host}:{self.api_port}"

    async def _follow_shared(self, engine: Engine, stop: asyncio.Event) -> None:
        """Every second, take up the pause, silences, placements and dataset replicas other controllers wrote to the
        shared store, and write the replicas this one heard."""
        shared = engine.observer.shared
        while not stop.is_set():
            try:
                await engine.operations.sync_shared()
                moved = await engine.placements.sync(engine.store)
                if shared is not None:
                    await shared.save(engine.store)
                    changed = await shared.sync(engine.store)
                    engine.observer.shared_changed(changed)
                    moved = moved or bool(changed)
                if moved:
                    await self.fleet.notify()
            except StoreError as exc:
                log.warning("controller.shared_unread", error=str(exc)[:300])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SHARED_EVERY)

    def _http_server(self, api: object) -> tuple[uvicorn.Server, socket.socket]:
        host, port = split_host_port(self.config.controller.listen, what="controller.listen")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.api_port = int(sock.getsockname()[1])
        server = _Server(uvicorn.Config(api, log_level="warning", access_log=False, lifespan="off"))  # type: ignore[arg-type]
        return server, sock

    async def _announce_ready(self, server: uvicorn.Server, ready: asyncio.Event | None,
                              notify_ready: Callable[[], None]) -> None:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.02)
        await self.link.connected.wait()
        log.info("controller.ready", api=f"http://{self.api_address}/")
        notify_ready()
        if ready is not None:
            ready.set()

    def _engine_metrics(self, engine: Engine) -> None:
        self.metrics.add_fleet_collector(lambda: self._fleet_gauges(engine))
        self.metrics.add_stats_collector(engine.stats)
        self.metrics.add_state_collector(lambda: self._state_gauges(engine))

    async def _look_again(self, nodes: set[str]) -> None:
        """Their findings changed with no message (a host model scored them): the engine looks again."""
        self.fleet.dirty.update(n for n in nodes if n in self.fleet.nodes)
        await self.fleet.notify()

    def _say_offline(self) -> None:
        """The last word: a clean disconnect sends no will, so agents would trust the retained ``online`` and
        never start their fallback (``agent.fallback``). One of several controllers clears its own status
        instead (agents take that as gone), so stopped controllers leave no retained message behind."""
        offline = wire.ControllerStatus(state="offline", session=self.session, ts=self.clock.wall())
        last_word = b"" if self.status_topic != wire.CONTROLLER_STATUS_TOPIC else wire.encode(offline)
        self.link.publish(self.status_topic, last_word, qos=1, retain=True)

    async def _on_connect(self, link: MqttLink) -> None:
        self.fleet.listening_since = self.clock.wall()  # silence counts from now: before, we could not hear
        buckets = tuple(str(b) for b in sorted(self.ownership.keeper.owned())) \
            if isinstance(self.ownership, Leased) else ("+",)
        for bucket in buckets:
            await self._subscribe(link, bucket, on=True)
        online = wire.ControllerStatus(state="online", session=self.session, ts=self.clock.wall())
        link.publish(self.status_topic, wire.encode(online), qos=1, retain=True)

    @staticmethod
    async def _subscribe(link: MqttLink, bucket: str, *, on: bool) -> None:
        """(Un)subscribe a bucket's node topics (``+``: every bucket). A plain clean-session subscription: the
        broker replays the bucket's retained statuses and digests, which rebuilds presence at takeover."""
        for channel in ("status", "report", "digests", "events"):
            topic_filter = f"{wire.PREFIX}/p/{bucket}/nodes/+/{channel}"
            await (link.subscribe(topic_filter, qos=1) if on else link.unsubscribe(topic_filter))

    def _start_leases(self, tg: asyncio.TaskGroup, keeper: LeaseKeeper, engine: Engine,
                      stop: asyncio.Event) -> tuple[asyncio.Task[None], ...]:
        """Several controllers: keep the leases (and this API's address in the membership), follow the
        buckets they bring and take away, and the pause and silences other controllers write."""
        changes: asyncio.Queue[LeaseChange] = asyncio.Queue()
        keeper.subscribe(lambda change: self._lease_changed(change, engine, changes))
        keeper.api = self.peer_url  # the API is bound by now
        return (tg.create_task(keeper.run(stop=stop), name="leases"),
                tg.create_task(self._follow_leases(changes, engine, stop), name="buckets"),
                tg.create_task(self._follow_shared(engine, stop), name="shared"))

    def _peers(self, keeper: LeaseKeeper | None, stack: contextlib.AsyncExitStack) -> Peers | None:
        """Several controllers: the others, asked for their part of the fleet view (``controller.peers``)."""
        if keeper is None:
            return None
        peers = Peers(self.config.controller.id, lambda: keeper.peers,
                      tls=peer_ssl_context(self.config.security.peer_tls_ca),
                      on_failure=lambda peer: self.metrics.peer_failures.labels(peer[:63]).inc())
        stack.push_async_callback(peers.close)
        return peers

    def _lease_changed(self, change: LeaseChange, engine: Engine, changes: asyncio.Queue[LeaseChange]) -> None:
        """In the lease keeper's task, at once: stop acting on the nodes of lost buckets before anything else
        runs (their plans are cancelled, their state dropped); the rest (topics, takeover) follows in order."""
        if change.lost:
            lost = in_buckets(change.lost)
            engine.release(lost)
            for node in [n for n in self.fleet.nodes if lost(n)]:
                self.fleet.forget(node)
        changes.put_nowait(change)

    async def _follow_leases(self, changes: asyncio.Queue[LeaseChange], engine: Engine, stop: asyncio.Event) -> None:
        """Subscribe gained buckets' topics and take up their work from the store; unsubscribe lost ones."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                getting = asyncio.ensure_future(changes.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    return
                await self._follow(getting.result(), engine)
        finally:
            stopping.cancel()

    async def _follow(self, change: LeaseChange, engine: Engine) -> None:
        for buckets, on in ((change.lost, False), (change.gained, True)):
            for bucket in sorted(buckets):
                with contextlib.suppress(aiomqtt.MqttError):  # not connected: the next connection subscribes
                    await self._subscribe(self.link, str(bucket), on=on)
        if change.gained:
            gained = in_buckets(change.gained)
            try:
                await engine.adopt(lambda node: gained(node) and self.ownership.owns(node))
            except SelfhealError as exc:
                log.error("controller.takeover_failed", buckets=sorted(change.gained),  # noqa: TRY400
                          error=str(exc))  # the store said why
            await self.fleet.notify()
        log.info("controller.buckets", owned=len(change.owned), gained=sorted(change.gained),
                 lost=sorted(change.lost))

    def _external_findings(self, now: float) -> list[Finding]:
        """External alerts (Alertmanager, PromQL) about the nodes this controller acts on."""
        return [f for f in self.alerts.findings(now) if self.ownership.owns(f.node)]

    async def _ingest(self, topic: str, payload: bytes, dispatcher: Dispatcher) -> None:
        try:
            message = wire.decode_node_message(topic, payload)
        except WireError as exc:
            self._reject(topic, exc.reason, str(exc))
            return
        if not self.ownership.owns(message.node):
            return  # its bucket went to another controller; the message was on its way before we unsubscribed
        if isinstance(message, wire.Command):  # never subscribed to; a command is not node traffic
            self._reject(topic, "malformed", "a command where node traffic belongs")
            return
        channel = topic.rsplit("/", 1)[-1]
        if self.keys.changed(self.clock.monotonic()):
            await asyncio.to_thread(self.keys.load, self.clock.wall())
        if self.keys.configured:
            refusal = self._authenticate(message, channel, payload)
            if refusal is not None:
                self._reject(topic, *refusal)
                return
        now = self.clock.wall()
        if self.fleet.refuses_jump(message, now, self.config.controller.offline_after):
            live = self.fleet.nodes[message.node].session
            self._reject(topic, "session_jump", f"session {message.session} leaps beyond the live session {live} "
                                                "of a node still heard")
            return
        self.metrics.messages.labels(channel).inc()
        result = self.fleet.apply(message, now)
        if result is not None:
            dispatcher.on_result(message.node, result)
        await self.fleet.notify()

    def _authenticate(self, message: wire.SignedNodeMessage, channel: str,
                      payload: bytes) -> tuple[str, str] | None:
        """Why ``message`` is not genuine traffic of its node (reason, detail), or None."""
        key = self.keys.get(message.node)
        if key is None:
            self._note_unknown(message.node)
            return "unknown_node", f"no key for node {message.node!r} in security.key_dir: not acted on"
        if not message.sig:
            return "unsigned", "unsigned node message"
        if not wire.verify_node_message(message, channel, key, payload):
            return "bad_signature", "bad signature"
        return None

    def _note_unknown(self, node: str) -> None:
        now = self.clock.wall()
        entry = self.unknown_nodes.get(node)
        if entry is None:
            entry = self.unknown_nodes[node] = UnknownNode(first_seen=now, last_seen=now)
            while len(self.unknown_nodes) > MAX_UNKNOWN_NODES:
                self.unknown_nodes.popitem(last=False)
        self.unknown_nodes.move_to_end(node)
        entry.last_seen = now
        entry.messages += 1

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        node = topic.split("/")[5] if topic.count("/") >= 6 else ""
        # Rate-limited per known node; junk under made-up names shares one budget, so it cannot flood the log.
        source = node if node in self.fleet.nodes else "*"
        if self.rate_limit.allow(source, reason, self.clock.monotonic()):
            log.warning("message.rejected", topic=topic[:200], reason=reason, error=detail[:300],
                        suppressed_so_far=self.rate_limit.suppressed)

    def _bounds_metrics(self) -> None:
        """What a flood is held to: the MQTT inbox's drops and the fleet's report history in bytes."""
        inbox = self.link.inbox
        self.metrics.add_inbox_collector(lambda: inbox)
        self.metrics.add_history_collector(self.fleet.history_bytes)

    def _fleet_gauges(self, engine: Engine) -> tuple[dict[str, int], int]:
        """Nodes online and offline (``is_offline``: silent ones too), from the counts the index keeps."""
        counts = self.index.counts(self.clock.wall())
        return {"online": counts.online, "offline": counts.offline}, engine.open_count()

    def _state_gauges(self, engine: Engine) -> tuple[dict[str, int], dict[str, int], int]:
        """Units by state from the index; findings from the reconciler's incidents (as many as there are
        problems, not nodes)."""
        units = dict(self.index.counts(self.clock.wall()).unit_states)
        findings: dict[str, int] = {}
        for state in engine.reconciler.incidents.values():
            if state.cleared_since is None:  # the finding holds now (cleared ones await resolve_after)
                findings[state.symptom.kind] = findings.get(state.symptom.kind, 0) + 1
        return units, findings, len(self.alerts)


class _Server(uvicorn.Server):
    """uvicorn inside our task group: signals belong to the process, not to the HTTP server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_watch(rulebook: Rulebook, metrics: ControllerMetrics | None = None) -> AnomalyWatch | None:
    """The rulebook's anomaly watches as one live watcher; a bad detector spec is a rulebook error."""
    if not rulebook.anomalies and not rulebook.host_models:
        return None
    specs = [WatchSpec(name=a.name, metric=a.metric, detector=dict(a.detector), severity=a.severity,
                       policy=AlertPolicySpec(threshold=a.threshold, persistence=a.persistence, window=a.window,
                                              hold=a.hold)) for a in rulebook.anomalies]
    try:
        hosts = build_host_watch(rulebook)
        return (MeteredWatch(specs, metrics=metrics, hosts=hosts) if metrics is not None
                else AnomalyWatch(specs, hosts=hosts))
    except ValueError as exc:
        raise RulebookError(str(exc)) from None


async def run_controller(config: Config, *, stop: asyncio.Event, ready: asyncio.Event | None = None,
                         source: Path | None = None) -> None:
    await Controller(config).run(stop=stop, ready=ready, source=source)


@contextlib.asynccontextmanager
async def running_controller(config: Config) -> AsyncIterator[Controller]:
    """Run a controller in the background of a test or the demo; stopped on exit."""
    controller = Controller(config)
    stop, ready = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(controller.run(stop=stop, ready=ready), name="controller")
        await ready.wait()
        try:
            yield controller
        finally:
            stop.set()


def in_buckets(buckets: Iterable[int]) -> Callable[[str], bool]:
    """Whether a node id falls in one of ``buckets``."""
    chosen = frozenset(buckets)
    return lambda node: wire.bucket_of(node) in chosen
