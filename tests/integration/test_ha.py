"""Several controllers, one fleet, on a real PostgreSQL (issue 16): ``selfheal controller`` and ``selfheal agent``
as real processes, on a Mosquitto of the test's own.

Each test starts controllers ``c1``, ``c2``, ... (``[controller] id``), each with its own API port and state dir,
all on one PostgreSQL database: a throwaway one on the session's server, or, for the tests that restart the
server, a cluster of their own. Leases are short (``TTL``, ``RENEW``). Which controller should own a bucket is
known beforehand — rendezvous hashing over the member ids (``controller.leases.assign``) — so each test picks
node ids whose buckets fall where it needs them.

What the tests read (every wait is on one of these, never a fixed sleep):
- the controllers' JSON logs: ``lease.gained``/``lease.lost`` (who held which bucket under which epoch, and why
  it was lost), ``incident.opened`` (who acted on a node);
- the database's ``bucket_leases`` table;
- every command on the wire (``mosquitto_sub`` on the node command topics): its node, epoch and time;
- the agents' logs (``command.result``, ``command.rejected``) and each unit's own count of its starts (a file
  it appends its pid to), so "restarted exactly once" is read from the unit itself;
- incidents, plans and timelines from any controller's API, and ``selfheal audit verify --store``.

The one-controller-per-bucket property is checked on epochs, which are what fences: every grant a controller
logged for a bucket has an epoch no other controller was granted for it, and a bucket's epochs only grow.
Log timestamps of different processes are not compared for it (a loaded machine may log a loss late, while
the process already stopped acting on its deadline); the times asserted are a process's own against the test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import count, pairwise
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from controller.leases import assign
from selfheal.wire import BUCKETS, bucket_of
from tests.conftest import eventually_sync, free_port, start_mosquitto
from tests.e2e.conftest import SELFHEAL, Cluster
from tests.e2e.test_datasets import CHUNK, dataset_toml, flip, make_dataset
from tests.integration.postgres import Cluster as Postgres
from tests.integration.postgres import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TTL = 3.0
"""``controller.lease_ttl``: seconds a lease lasts by the database's clock."""
RENEW = 0.5
"""``controller.lease_renew``: seconds between two lease rounds."""
COMMAND_TTL = 6.0
"""``controller.command_ttl``: a takeover holds an incident until its last command expired, so keep it short."""
SETTLE = 60.0
"""Seconds leases may take to settle, or a takeover to happen, on a loaded machine (normally a few rounds)."""
HEAL = 90.0
"""Seconds a crash may take to be healed and its incident resolved, on a loaded machine."""
RULES = """version: 1
rules:
  - name: restart-exited-unit
    match: {{kind: unit_exited}}
    ladder: [{{action: restart, attempts: 3, backoff: {{first: 0, base: 1, factor: 2, max: 5, jitter: 0}}}}]
    verify: {{within: 20, stable_for: {stable_for}}}
    cooldown: 1
    resolve_after: 2
    max_attempts: 5
"""
"""One restart rung; ``stable_for`` long keeps a plan running (verifying) for a test that needs it so."""


def expected_owners(members: Sequence[str]) -> dict[int, str]:
    return assign(range(BUCKETS), members)


def pick_nodes(*wanted: Callable[[int], bool]) -> list[str]:
    """Node ids ``node-<i>``, one per predicate on its bucket, each in a bucket of its own."""
    nodes: list[str] = []
    taken: set[int] = set()
    for predicate in wanted:
        for i in count():
            node = f"node-{i}"
            bucket = bucket_of(node)
            if bucket not in taken and predicate(bucket):
                nodes.append(node)
                taken.add(bucket)
                break
    return nodes


def counted_unit(starts: Path) -> str:
    """A unit that appends its pid to ``starts`` each time it starts, then sleeps."""
    code = f"import os, time; open({str(starts)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(3600)"
    return (f'[[agent.units]]\nname = "web"\nkind = "process"\nstop_grace = 1.0\n'
            f"command = [{json.dumps(sys.executable)}, \"-c\", {json.dumps(code)}]\n")


def started(starts: Path) -> list[int]:
    return [int(line) for line in starts.read_text().split()] if starts.exists() else []


def unix(iso: str) -> float:
    """An ISO 8601 UTC time (a log line's ``timestamp``, a timeline entry's ``at``) as a Unix time."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def wall(line: dict[str, Any]) -> float:
    return unix(str(line["timestamp"]))


def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(url, timeout=10)
        try:
            return list(await conn.fetch(sql, *args, timeout=10))
        finally:
            await conn.close(timeout=5)
    return asyncio.run(run())


def create_database(server: Postgres) -> str:
    name = f"selfheal_ha_{os.getpid()}_{time.monotonic_ns()}"
    query(server.url(), f'CREATE DATABASE "{name}"')
    return name


@dataclass
class LeaseLine:
    at: float
    member: str
    gained: dict[int, int]
    lost: list[int]
    reason: str


@dataclass
class HA(Cluster):
    """A ``Cluster`` with several controllers on one PostgreSQL store: ``c1``'s API is ``api``."""

    store_url: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    rules: Path | None = None
    _parsed: dict[str, tuple[int, list[dict[str, Any]]]] = field(default_factory=dict)

    # --- processes --------------------------------------------------------------------------------

    def write_rules(self, *, stable_for: float = 1.0) -> Path:
        self.rules = self.root / "rules.yaml"
        self.rules.write_text(RULES.format(stable_for=stable_for))
        return self.rules

    def controller_config(self, cid: str, *, store_url: str | None = None, extra: str = "") -> Path:
        """``extra``: more lines of its ``[controller]`` section."""
        port = self.ports.setdefault(cid, free_port())
        rules = self.rules or self.write_rules()
        path = self.root / f"{cid}.toml"
        path.write_text(
            f'[mqtt]\nurl = "{self.broker.url}"\nkeepalive = 2.0\nreconnect_max = 1.0\n'
            f'[controller]\nid = "{cid}"\nlisten = "127.0.0.1:{port}"\nstate_dir = "{self.root / cid}"\n'
            f"offline_after = 4.0\nlease_ttl = {TTL}\nlease_renew = {RENEW}\ncommand_ttl = {COMMAND_TTL}\n"
            f'ack_timeout = 5.0\nrulebooks = ["{rules}"]\n{extra}'
            f'[store]\nurl = "{store_url or self.store_url}"\n'
            f'[security]\nkey_dir = "{self.root / "keys"}"\napi_token_file = "{self.token_file}"\n')
        self.token_file.write_text("ha-token-" + self.root.name + "\n")
        return path

    def start_controllers(self, *cids: str, store_url: str | None = None, extra: str = "") -> None:
        """Start them all, then wait until each answers ``/readyz``."""
        for cid in cids:
            if not self.ports:
                self.api_port = self.ports.setdefault(cid, free_port())
            self.start(cid, "controller", self.controller_config(cid, store_url=store_url, extra=extra))
        for cid in cids:
            self.wait_ready_at(cid)

    def wait_ready_at(self, cid: str, timeout: float = 60) -> None:
        def ready() -> bool:
            try:
                return httpx.get(self.api_of(cid) + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        eventually_sync(ready, timeout=timeout, what=f"{cid} ready")

    def start_nodes(self, *nodes: str) -> dict[str, Path]:
        """An agent on each node with one counted unit ``web``; node → the unit's starts file, once all started."""
        units = {node: self.root / f"{node}.starts" for node in nodes}
        for node, starts in units.items():
            self.start(node, "agent", self.write_agent(node, counted_unit(starts)))
        eventually_sync(lambda: all(len(started(starts)) == 1 for starts in units.values()), timeout=60,
                        what=f"web started on {', '.join(nodes)}")
        return units

    def crash(self, starts: Path) -> int:
        pid = started(starts)[-1]
        self.unit_pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        return pid

    def watch_commands(self) -> None:
        """Every command any controller publishes, with the time it crossed the broker (``commands``)."""
        out = (self.root / "commands.out").open("ab")
        self.procs["mqtt-commands"] = subprocess.Popen(
            ["mosquitto_sub", "-h", self.broker.host, "-p", str(self.broker.port), "-q", "1",
             "-t", "selfheal/v1/p/+/nodes/+/commands", "-F", "%U %t %p"], stdout=out, stderr=subprocess.STDOUT)
        out.close()

    def commands(self, node: str | None = None) -> list[dict[str, Any]]:
        """Commands seen on the wire (``at``: when), oldest first."""
        path = self.root / "commands.out"
        found = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            parts = line.split(" ", 2)
            if len(parts) != 3:
                continue
            with contextlib.suppress(ValueError):
                command = json.loads(parts[2])
                if isinstance(command, dict) and (node is None or command.get("node") == node):
                    found.append({**command, "at": float(parts[0])})
        return found

    # --- the API ----------------------------------------------------------------------------------

    def check_running(self, names: Sequence[str]) -> None:
        """Fail at once, not at a deadline, when one of them has exited."""
        for name in names:
            code = self.procs[name].poll()
            assert code is None, f"{name} exited with {code}: see its log"

    def api_of(self, cid: str) -> str:
        return f"http://127.0.0.1:{self.ports[cid]}"

    def get_from(self, cid: str, path: str, **params: Any) -> Any:
        response = httpx.get(self.api_of(cid) + path, params=params, timeout=5)
        response.raise_for_status()
        return response.json()

    def incidents(self, via: str, node: str) -> list[dict[str, Any]]:
        """The node's incidents, oldest first, as ``via``'s API lists them."""
        items = self.get_from(via, "/api/v1/incidents", limit=1000)["items"]
        return sorted((i for i in items if i["node"] == node), key=lambda i: i["id"])

    def detail(self, via: str, incident_id: int) -> dict[str, Any]:
        return dict(self.get_from(via, f"/api/v1/incidents/{incident_id}"))

    def wait_resolved(self, via: str, nodes: Sequence[str], *,
                      timeout: float = HEAL) -> dict[str, list[dict[str, Any]]]:
        """Until each node has incidents, all resolved; their details, oldest first."""
        def resolved() -> bool:
            self.check_running([via])
            try:
                found = [self.incidents(via, node) for node in nodes]
            except httpx.HTTPError:
                return False
            return all(found) and all(i["state"] == "resolved" for f in found for i in f)
        eventually_sync(resolved, timeout=timeout, interval=0.25, what=f"the incidents of {', '.join(nodes)} "
                                                                       f"resolved (via {via})")
        return {node: [self.detail(via, i["id"]) for i in self.incidents(via, node)] for node in nodes}

    def wait_unit_seen(self, cid: str, node: str, pid: int, *, timeout: float = SETTLE) -> None:
        """Until ``cid`` knows ``node``'s unit runs as ``pid``: a crash after that is news to it."""
        def seen() -> bool:
            try:
                items = self.get_from(cid, "/api/v1/units", node=node, scope="local")["items"]
            except httpx.HTTPError:
                return False
            return any(u["node"] == node and u["name"] == "web" and u["state"] == "running" and u["pid"] == pid
                       for u in items)
        eventually_sync(seen, timeout=timeout, interval=0.2, what=f"{cid} seeing {node}/web running as {pid}")

    def audit_verify(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SELFHEAL, "audit", "verify", "--store", self.store_url], capture_output=True,
                              text=True, timeout=60, check=False)

    # --- logs -------------------------------------------------------------------------------------

    def events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        """``name``'s JSON log lines (of ``event``), read incrementally: the logs are long at debug level."""
        path = self.root / f"{name}.log"
        offset, lines = self._parsed.get(name, (0, []))
        if path.exists():
            with path.open("rb") as log:
                log.seek(offset)
                chunk = log.read()
            complete = chunk.rfind(b"\n") + 1
            for raw in chunk[:complete].splitlines():
                with contextlib.suppress(ValueError):
                    line = json.loads(raw)
                    if isinstance(line, dict):
                        lines.append(line)
            self._parsed[name] = (offset + complete, lines)
        return [line for line in lines if event is None or line.get("event") == event]

    def lease_lines(self, cid: str) -> list[LeaseLine]:
        found = []
        for line in self.events(cid):
            if line.get("event") == "lease.gained":
                found.append(LeaseLine(wall(line), str(line.get("member")),
                                       {int(b): int(e) for b, e in line["epochs"].items()}, [], ""))
            elif line.get("event") == "lease.lost":
                found.append(LeaseLine(wall(line), str(line.get("member")), {}, [int(b) for b in line["buckets"]],
                                       str(line["reason"])))
        return found

    def owned(self, cid: str) -> dict[int, int]:
        """bucket → epoch ``cid`` holds, by its own log."""
        held: dict[int, int] = {}
        for line in self.lease_lines(cid):
            for bucket in line.lost:
                held.pop(bucket, None)
            held.update(line.gained)
        return held

    def grants(self, cid: str, bucket: int) -> list[int]:
        """Every epoch ``cid`` logged gaining ``bucket`` under, in order."""
        return [line.gained[bucket] for line in self.lease_lines(cid) if bucket in line.gained]

    def losses(self, cid: str, bucket: int, reason: str | None = None) -> list[LeaseLine]:
        return [line for line in self.lease_lines(cid)
                if bucket in line.lost and (reason is None or line.reason == reason)]

    def check_epochs(self, cids: Sequence[str]) -> None:
        """No two controllers were ever granted one bucket under one epoch, and a bucket's epochs never went back.

        One controller may gain a bucket again under the epoch it had: it stopped acting when its own deadline
        passed (the database unreachable), but the database's lease had not run out when it renewed it, so
        nobody else could have held the bucket meanwhile."""
        holder: dict[tuple[int, int], str] = {}
        gains: dict[int, list[tuple[float, int, str]]] = {}
        for cid in cids:
            for line in self.lease_lines(cid):
                assert line.member == cid, line
                for bucket, epoch in line.gained.items():
                    other = holder.setdefault((bucket, epoch), cid)
                    assert other == cid, f"bucket {bucket} epoch {epoch} granted to both {other} and {cid}"
                    gains.setdefault(bucket, []).append((line.at, epoch, cid))
        for bucket, history in gains.items():
            epochs = [epoch for _, epoch, _ in sorted(history)]
            assert epochs == sorted(epochs), f"bucket {bucket}'s epochs went back: {sorted(history)}"

    def leases(self) -> dict[int, tuple[str | None, int, bool]]:
        """bucket → (owner, epoch, live by the database's clock), from ``bucket_leases``."""
        rows = query(self.store_url, "SELECT bucket, owner, epoch, expires_at > now() AS live FROM bucket_leases")
        return {int(r["bucket"]): (r["owner"], int(r["epoch"]), bool(r["live"])) for r in rows}

    def wait_settled(self, members: Sequence[str], *, timeout: float = SETTLE) -> dict[int, tuple[str, int]]:
        """Until every bucket is held by the member rendezvous hashing gives it, by that member's log and by
        the database alike, and by no other member's log; bucket → (owner, epoch)."""
        expected = expected_owners(members)

        def settled() -> bool:
            self.check_running(members)
            held = {cid: self.owned(cid) for cid in members}
            if any(set(held[cid]) != {b for b, o in expected.items() if o == cid} for cid in members):
                return False
            try:
                rows = self.leases()
            except (OSError, asyncpg.PostgresError):
                return False
            return all(rows[b][0] == o and rows[b][2] and rows[b][1] == held[o][b] for b, o in expected.items())
        eventually_sync(settled, timeout=timeout, interval=0.2,
                        what=f"the 64 buckets settled over {', '.join(members)} as rendezvous hashing assigns them")
        self.check_epochs(members)
        return {bucket: (owner, self.owned(owner)[bucket]) for bucket, owner in expected.items()}

    def wait_gained(self, cids: Sequence[str], bucket: int, *, after: float = 0.0,
                    timeout: float = SETTLE) -> tuple[str, int]:
        """Until one of ``cids`` logs gaining ``bucket`` at or after ``after`` (a Unix time): (who, epoch)."""
        found: list[tuple[str, int]] = []

        def gained() -> bool:
            found[:] = [(cid, line.gained[bucket]) for cid in cids for line in self.lease_lines(cid)
                        if bucket in line.gained and line.at >= after]
            return bool(found)
        eventually_sync(gained, timeout=timeout, interval=0.1, what=f"one of {', '.join(cids)} gaining bucket {bucket}")
        return found[0]

    def executed(self, node: str) -> list[dict[str, Any]]:
        """The commands ``node``'s agent ran (``command.result`` done)."""
        return [line for line in self.events(node, "command.result") if line.get("status") == "done"]

    def opened_by(self, cids: Sequence[str], node: str) -> list[str]:
        """The controllers that logged opening an incident for ``node``."""
        return [cid for cid in cids if any(line.get("node") == node for line in self.events(cid, "incident.opened"))]

    def logs(self) -> str:
        """The lease history of each controller, then the tail of every log (longer than ``Cluster``'s)."""
        out = []
        for cid in self.ports:
            out.append(f"--- lease history of {cid}")
            out.extend(f"  {line.at:.3f} gained {line.gained}" if line.gained else
                       f"  {line.at:.3f} lost {line.lost} ({line.reason})" for line in self.lease_lines(cid))
        out.extend(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-120:])
                   for path in sorted(self.root.glob("*.log")))
        commands = self.commands()
        out.append("--- commands on the wire\n" + "\n".join(
            f"  {c['at']:.3f} {c.get('node')} epoch={c.get('epoch')} key={c.get('key')} id={c.get('id')}"
            for c in commands))
        return "\n".join(out)


@contextlib.contextmanager
def ha_cluster(root: Path, request: pytest.FixtureRequest, server: Postgres) -> Iterator[HA]:
    """Mosquitto of the test's own and a new database on ``server``; the logs are printed when the test failed."""
    broker = start_mosquitto(root)
    database = create_database(server)
    ha = HA(root=root, broker=broker, store_url=server.url(database))
    failed = request.session.testsfailed
    try:
        yield ha
    finally:
        for proc in ha.procs.values():  # a paused one would not hear SIGTERM
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
        ha.stop_all()
        broker.stop()
        if request.session.testsfailed > failed:
            print(ha.logs())
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            query(server.url(), f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture
def ha(tmp_path: Path, request: pytest.FixtureRequest, postgres_cluster: Postgres) -> Iterator[HA]:
    """Controllers on the session's PostgreSQL server, a database of the test's own."""
    with ha_cluster(tmp_path, request, postgres_cluster) as cluster:
        yield cluster


@pytest.fixture
def own_server() -> Iterator[Postgres]:
    """A PostgreSQL server of the test's own, to restart."""
    with running_cluster() as server:
        yield server


@pytest.fixture
def ha_own(tmp_path: Path, request: pytest.FixtureRequest, own_server: Postgres) -> Iterator[HA]:
    with ha_cluster(tmp_path, request, own_server) as cluster:
        yield cluster


class Cut:
    """A TCP relay between one controller and PostgreSQL that the test can cut and mend.

    Cut: the relay closes its connections to the server (so the server ends their sessions and releases their
    row locks, as it would once it noticed the peer gone) but leaves the controller's side open and silent:
    what the controller sends is dropped, nothing is answered, no reset tells it — its timeouts and lease
    deadlines must. Connections made while cut hang the same way. Mended: those hung connections are closed,
    new ones pass again.
    """

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.port = free_port()
        self._cut = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._links: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}
        self._hung: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._thread = threading.Thread(target=self._run, name="pg-cut", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the relay did not start")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def cut(self) -> float:
        """Cut now; returns when (a Unix time)."""
        at = time.time()
        self._cut.set()
        asyncio.run_coroutine_threadsafe(self._drop_server_side(), self._loop).result(10)
        return at

    def mend(self) -> None:
        self._cut.clear()
        asyncio.run_coroutine_threadsafe(self._close_hung(), self._loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self._cut.is_set():
                self._hung.add(client_w)
                await self._pump(client_r, None)
                return
            try:
                server_r, server_w = await asyncio.open_connection("127.0.0.1", self.server_port)
            except OSError:
                return
            self._links[client_w] = server_w
            try:
                await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w))
            finally:
                self._links.pop(client_w, None)
                server_w.close()
        finally:
            if client_w not in self._hung:
                client_w.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
        """Copy until end of stream, then close the other side too (unless it is to hang)."""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if writer is None or self._cut.is_set():
                    continue  # dropped: nothing crosses while cut
                writer.write(data)
                await writer.drain()
        if writer is not None and writer not in self._hung:
            writer.close()

    async def _drop_server_side(self) -> None:
        for client_w, server_w in list(self._links.items()):
            self._hung.add(client_w)
            server_w.close()

    async def _close_hung(self) -> None:
        hung, self._hung = self._hung, set()
        for writer in hung:
            writer.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._cut.set()
        await self._drop_server_side()
        await self._close_hung()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)


# --- 1. the buckets split, each node healed by its bucket's owner --------------------------------


def test_three_controllers_split_the_buckets_and_each_heals_the_nodes_of_its_own_once(ha: HA) -> None:
    members = ["c1", "c2", "c3"]
    owners = expected_owners(members)
    nodes = dict(zip(members, pick_nodes(*(lambda b, c=cid: owners[b] == c for cid in members)), strict=True))
    ha.watch_commands()
    ha.start_controllers(*members)
    units = ha.start_nodes(*nodes.values())
    ha.wait_settled(members)
    leases = ha.leases()
    assert {owner for owner, _, live in leases.values() if live} == set(members)
    assert all(leases[b][0] == owners[b] and leases[b][2] for b in range(BUCKETS))

    for cid, node in nodes.items():
        ha.wait_unit_seen(cid, node, started(units[node])[-1])
    for node in nodes.values():
        ha.crash(units[node])
    done = ha.wait_resolved("c2", list(nodes.values()))

    for cid, node in nodes.items():
        bucket = bucket_of(node)
        assert len(started(units[node])) == 2, f"{node}/web started {started(units[node])}"
        assert len(done[node]) == 1, f"{node}: {done[node]}"
        [incident] = done[node]
        sent = [e["data"] for e in incident["timeline"] if e["kind"] == "command_sent"]
        assert [s["node"] for s in sent] == [node]
        assert sent[0]["epoch"] in ha.grants(cid, bucket), (cid, sent, ha.grants(cid, bucket))
        assert ha.opened_by(members, node) == [cid]
        assert len(ha.executed(node)) == 1
        wire = ha.commands(node)
        assert [c["id"] for c in wire] == [sent[0]["command"]]
        assert wire[0]["epoch"] == sent[0]["epoch"]
    # One fleet view: every controller lists the same incidents.
    ids = {cid: sorted(i["id"] for i in ha.get_from(cid, "/api/v1/incidents")["items"]) for cid in members}
    assert ids["c1"] == ids["c2"] == ids["c3"], ids
    ha.check_epochs(members)
    ha.check_running(members)


# --- 2. the owner killed while its plan runs ------------------------------------------------------


def test_a_plan_running_when_its_owner_is_killed_is_finished_or_expired_by_the_next_owner_once(ha: HA) -> None:
    """The plan verifies for 30 s, so it surely runs when the owner dies: at the first ``command_sent``."""
    members = ["c1", "c2", "c3"]
    owners = expected_owners(members)
    [node] = pick_nodes(lambda b: owners[b] == "c1")
    bucket = bucket_of(node)
    ha.write_rules(stable_for=30)
    ha.watch_commands()
    ha.start_controllers(*members)
    [starts] = ha.start_nodes(node).values()
    ha.wait_settled(members)
    ha.wait_unit_seen("c1", node, started(starts)[-1])

    ha.crash(starts)
    sent: list[dict[str, Any]] = []

    def command_sent() -> bool:
        try:
            found = ha.incidents("c2", node)
            timeline = ha.detail("c2", found[0]["id"])["timeline"] if found else []
        except httpx.HTTPError:
            return False
        sent[:] = [e for e in timeline if e["kind"] == "command_sent"]
        return bool(sent)
    eventually_sync(command_sent, timeout=HEAL, interval=0.05, what=f"c1 sending the restart of {node}/web")
    victim = ha.procs["c1"]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    victim.wait(10)
    first = sent[0]["data"]
    assert first["epoch"] in ha.grants("c1", bucket)

    successor, epoch = ha.wait_gained(["c2", "c3"], bucket, after=killed_at)
    assert successor == owners_after_leaving(members, "c1")[bucket]
    assert epoch > first["epoch"]
    [incident] = ha.wait_resolved(successor, [node])[node]

    assert len(started(starts)) == 2, f"{node}/web started {started(starts)}: restarted more than once"
    assert len(ha.executed(node)) == 1
    assert len(ha.incidents("c3", node)) == 1
    states = [p["state"] for p in incident["plans"]]
    assert states[0] in {"expired", "succeeded"}, incident["plans"]
    assert all(state == "succeeded" for state in states[1:]), incident["plans"]
    commands = [e for e in incident["timeline"] if e["kind"] == "command_sent"]
    for earlier, later in pairwise(commands):
        # a re-planned restart waited until the command the dead owner sent could no longer run
        assert unix(later["at"]) >= earlier["data"]["expires_at"], commands
        assert later["data"]["epoch"] == epoch
    kinds = [e["kind"] for e in incident["timeline"]]
    assert kinds[0] == "opened"
    assert [k for k in kinds if k != "notice"][-1] == "resolved"
    assert any(unix(e["at"]) > killed_at for e in incident["timeline"])  # the successor wrote on, into one chain
    verified = ha.audit_verify()
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "every chain intact" in verified.stdout
    ha.check_epochs(["c2", "c3"])
    ha.check_running(["c2", "c3"])


def owners_after_leaving(members: Sequence[str], gone: str) -> dict[int, str]:
    return expected_owners([m for m in members if m != gone])


# --- 3. a paused controller wakes up fenced off -----------------------------------------------------


def test_a_controller_paused_past_its_lease_is_refused_by_epoch_when_it_wakes(ha: HA) -> None:
    """SIGSTOP ``c1``, then crash a unit of its bucket: the crash reaches only c1's socket buffer, so when it wakes
    it has news to act on, under an epoch that moved on meanwhile."""
    members = ["c1", "c2", "c3"]
    owners = expected_owners(members)
    [node] = pick_nodes(lambda b: owners[b] == "c1")
    bucket = bucket_of(node)
    ha.watch_commands()
    ha.start_controllers(*members)
    [starts] = ha.start_nodes(node).values()
    held = ha.wait_settled(members)
    old_epoch = held[bucket][1]
    ha.wait_unit_seen("c1", node, started(starts)[-1])

    paused = ha.procs["c1"]
    paused.send_signal(signal.SIGSTOP)
    try:
        stopped_at = time.time()
        ha.crash(starts)
        successor, epoch = ha.wait_gained(["c2", "c3"], bucket, after=stopped_at)
        assert epoch > old_epoch
        eventually_sync(lambda: len(started(starts)) == 2, timeout=HEAL, what=f"{successor} restarting {node}/web")
    finally:
        paused.send_signal(signal.SIGCONT)
    woke_at = time.time()

    eventually_sync(lambda: bool(ha.losses("c1", bucket, "not renewed in time")), timeout=SETTLE,
                    what="c1 logging lease.lost 'not renewed in time' once awake")
    # Awake, it rejoins: its buckets come back to it, under new epochs.
    _, back_epoch = ha.wait_gained(["c1"], bucket, after=woke_at)
    assert back_epoch > epoch
    [incident] = ha.wait_resolved("c2", [node])[node]

    # Whatever c1 sent under its old epoch was not executed: the agent ran exactly one restart, the successor's.
    executed = {line["command_id"] for line in ha.executed(node)}
    assert len(executed) == 1
    for command in ha.commands(node):
        if command["epoch"] <= old_epoch:
            assert command["id"] not in executed, command
            if command["at"] >= stopped_at:
                rejected = {(r["command_id"], r["reason"]) for r in ha.events(node, "command.rejected")}
                assert (command["id"], "stale_epoch") in rejected, command
    assert len(started(starts)) == 2, f"{node}/web started {started(starts)}"
    sent = [e["data"] for e in incident["timeline"] if e["kind"] == "command_sent"]
    assert all(s["epoch"] > old_epoch for s in sent), sent
    assert len(ha.incidents("c1", node)) == 1
    ha.check_epochs(members)
    ha.check_running(members)


# --- 4. PostgreSQL restarted under load ------------------------------------------------------------


def test_postgres_restarted_while_units_crash_loses_nothing_and_doubles_nothing(
        ha_own: HA, own_server: Postgres) -> None:
    """The server is down for longer than the leases: two units crash just before it goes down (their plans run
    into the outage), one while the controllers still hold their leases but cannot write, one after the leases
    lapsed. Once it is back, each is restarted exactly once and has one incident."""
    ha = ha_own
    members = ["c1", "c2"]
    owners = expected_owners(members)
    nodes = pick_nodes(*(lambda b, c=cid: owners[b] == c for cid in ("c1", "c2", "c1", "c2")))
    ha.start_controllers(*members)
    units = ha.start_nodes(*nodes)
    ha.wait_settled(members)
    for node in nodes:
        ha.wait_unit_seen(owners[bucket_of(node)], node, started(units[node])[-1])

    ha.crash(units[nodes[0]])
    ha.crash(units[nodes[1]])
    own_server.stop("immediate")
    try:
        ha.crash(units[nodes[2]])
        eventually_sync(lambda: all(ha.losses(cid, bucket_of(nodes[0]) if cid == "c1" else bucket_of(nodes[1]),
                                              "not renewed in time") for cid in members),
                        timeout=SETTLE, what="both controllers' leases lapsing with the server down")
        ha.crash(units[nodes[3]])
    finally:
        own_server.start()

    done = ha.wait_resolved("c1", nodes, timeout=2 * HEAL)
    for node in nodes:
        assert len(started(units[node])) == 2, f"{node}/web started {started(units[node])}"
        assert len(done[node]) == 1, f"{node}: {[(i['id'], i['state']) for i in done[node]]}"
        assert len(ha.executed(node)) == 1
    ha.wait_settled(members)  # reconnected, every bucket held again
    verified = ha.audit_verify()
    assert verified.returncode == 0, verified.stdout + verified.stderr
    ha.check_epochs(members)
    ha.check_running(members)


# --- 5. a controller cut off from PostgreSQL --------------------------------------------------------


def test_a_controller_cut_off_from_postgres_stops_acting_within_the_lease_time(
        ha: HA, postgres_cluster: Postgres) -> None:
    """``c1`` reaches the database through a relay the test cuts; MQTT still reaches it, so it hears the crash
    of a unit in its bucket, and must leave it to ``c2``."""
    members = ["c1", "c2"]
    owners = expected_owners(members)
    [node] = pick_nodes(lambda b: owners[b] == "c1")
    bucket = bucket_of(node)
    relay = Cut(postgres_cluster.port)
    try:
        ha.watch_commands()
        ha.start_controllers("c1", store_url=relay.url(ha.store_url.rsplit("/", 1)[1]))
        ha.start_controllers("c2")
        [starts] = ha.start_nodes(node).values()
        held = ha.wait_settled(members)
        old_epochs = ha.owned("c1")
        ha.wait_unit_seen("c1", node, started(starts)[-1])

        cut_at = relay.cut()
        ha.crash(starts)
        eventually_sync(lambda: bool(ha.losses("c1", bucket, "not renewed in time")), timeout=SETTLE,
                        what="c1 logging lease.lost 'not renewed in time'")
        [lost] = ha.losses("c1", bucket, "not renewed in time")
        # Its local deadline passes within TTL of the cut (what it may act on reads the deadline); the log
        # line comes when its event loop next runs, which a loaded machine may delay by a second or two.
        assert lost.at - cut_at <= TTL + 2.0, f"c1 logged the loss {lost.at - cut_at:.2f}s after the cut"
        assert set(lost.lost) == set(old_epochs), "every bucket of c1's is lost at once"
        _, epoch = ha.wait_gained(["c2"], bucket, after=cut_at)
        assert epoch > held[bucket][1]
        eventually_sync(lambda: len(started(starts)) == 2, timeout=HEAL, what=f"c2 restarting {node}/web")

        # Nothing went out under c1's epochs after it lost them.
        for command in ha.commands():
            if command["at"] > lost.at:
                assert old_epochs.get(bucket_of(command["node"])) != command["epoch"], command

        relay.mend()
        ha.wait_settled(members)  # c1 is back: its buckets return to it under new epochs
        assert ha.owned("c1")[bucket] > epoch
        [incident] = ha.wait_resolved("c2", [node])[node]
        assert len(started(starts)) == 2, f"{node}/web started {started(starts)}"
        assert len(ha.executed(node)) == 1
        assert ha.opened_by(members, node) == ["c2"]
        assert all(e["data"]["epoch"] == epoch for e in incident["timeline"] if e["kind"] == "command_sent")
        ha.check_epochs(members)
        ha.check_running(members)
    finally:
        relay.close()


# --- 6. a controller joins ------------------------------------------------------------------------


def test_buckets_rebalance_when_a_controller_joins_and_the_newcomer_heals_what_moved_to_it(ha: HA) -> None:
    two = expected_owners(["c1", "c2"])
    three = expected_owners(["c1", "c2", "c3"])
    moving = {b for b in range(BUCKETS) if three[b] == "c3"}
    assert all(two[b] != "c3" for b in moving)
    assert all(two[b] == three[b] for b in set(range(BUCKETS)) - moving)
    [node] = pick_nodes(lambda b: b in moving)
    bucket = bucket_of(node)
    ha.watch_commands()
    ha.start_controllers("c1", "c2")
    [starts] = ha.start_nodes(node).values()
    ha.wait_settled(["c1", "c2"])

    joined_at = time.time()
    ha.start_controllers("c3")
    ha.wait_settled(["c1", "c2", "c3"])
    assert set(ha.owned("c3")) == moving
    assert 12 <= len(moving) <= 30  # about a third
    for cid in ("c1", "c2"):
        rebalanced = [b for line in ha.lease_lines(cid) if line.at >= joined_at and line.lost for b in line.lost]
        reasons = {line.reason for line in ha.lease_lines(cid) if line.at >= joined_at and line.lost}
        assert sorted(rebalanced) == sorted(b for b in moving if two[b] == cid), (cid, rebalanced)
        assert reasons == {"rebalanced"}, (cid, reasons)
    ha.check_epochs(["c1", "c2", "c3"])

    ha.wait_unit_seen("c3", node, started(starts)[-1])
    ha.crash(starts)
    [incident] = ha.wait_resolved("c3", [node])[node]
    assert len(started(starts)) == 2
    assert ha.opened_by(["c1", "c2", "c3"], node) == ["c3"]
    sent = [e["data"] for e in incident["timeline"] if e["kind"] == "command_sent"]
    assert len(sent) == 1
    assert sent[0]["epoch"] in ha.grants("c3", bucket)
    ha.check_running(["c1", "c2", "c3"])


# --- 7. one fleet view, and humans heard by any controller -----------------------------------------

APPROVE_RULES = """version: 1
rules:
  - name: restart-exited-unit
    match: {kind: unit_exited}
    mode: approve
    ladder: [{action: restart, attempts: 1}]
    verify: {within: 20, stable_for: 1}
    resolve_after: 2
"""


def test_any_controller_shows_the_whole_fleet_and_takes_approvals_pauses_and_silences_for_it(ha: HA) -> None:
    members = ["c1", "c2"]
    owners = expected_owners(members)
    mine, theirs = pick_nodes(lambda b: owners[b] == "c1", lambda b: owners[b] == "c2")
    ha.rules = ha.root / "approve.yaml"
    ha.rules.write_text(APPROVE_RULES)
    ha.start_controllers(*members)
    units = ha.start_nodes(mine, theirs)
    ha.wait_settled(members)
    for cid, node in (("c1", mine), ("c2", theirs)):
        ha.wait_unit_seen(cid, node, started(units[node])[-1])

    # Reads: each controller lists both nodes, the other's fetched from it; its own part alone with scope=local.
    for cid in members:
        nodes = ha.get_from(cid, "/api/v1/nodes")
        assert ([n["id"] for n in nodes["items"]], nodes["total"], nodes["missing"]) == \
            (sorted([mine, theirs]), 2, [])
        first = ha.get_from(cid, "/api/v1/nodes", limit=1)
        second = ha.get_from(cid, "/api/v1/nodes", limit=1, after=first["next"])
        assert [n["id"] for n in first["items"] + second["items"]] == sorted([mine, theirs])
        assert second["next"] is None
        units_seen = ha.get_from(cid, "/api/v1/units")["items"]
        assert sorted((u["node"], u["name"], u["state"]) for u in units_seen) == \
            sorted([(mine, "web", "running"), (theirs, "web", "running")])
        page = httpx.get(ha.api_of(cid) + "/", timeout=5).text
        assert mine in page
        assert theirs in page
    assert [n["id"] for n in ha.get_from("c1", "/api/v1/nodes", scope="local")["items"]] == [mine]

    # A crash on c2's node: its plan waits for approval, given on c1, which forwards it to c2.
    ha.crash(units[theirs])
    token = ha.token_file.read_text().strip()

    def waiting() -> list[dict[str, Any]]:
        return [p for p in ha.get_from("c1", "/api/v1/plans")["items"] if p["state"] == "awaiting_approval"]
    eventually_sync(lambda: bool(waiting()), timeout=HEAL, what="a plan awaiting approval")
    [plan] = waiting()
    answer = httpx.post(f"{ha.api_of('c1')}/api/v1/plans/{plan['id']}/approve", timeout=10,
                        headers={"Authorization": f"Bearer {token}", "X-Selfheal-Actor": "alice"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "running"
    done = ha.wait_resolved("c1", [theirs])
    assert len(started(units[theirs])) == 2
    [incident] = done[theirs]
    approved = [e["data"] for e in incident["timeline"] if e["kind"] == "approved"]
    assert approved == [{"plan": plan["id"], "by": "alice"}]
    assert ha.opened_by(members, theirs) == ["c2"]
    # The incident page on c1 plots the unit's history, which c2 keeps (c1 never heard the node).
    def page() -> str:
        return httpx.get(f"{ha.api_of('c1')}/incidents/{incident['id']}", timeout=10).text
    assert f"CPU of {theirs}/web around the incident" in page()
    # c2 answers c1 within the peers' timeout: a loaded machine may miss one, so the page is asked again.
    eventually_sync(lambda: "no data yet" not in page(), timeout=HEAL, what="c1's incident page plotting c2's series")
    # Not forwarded again: a controller asked on another's behalf answers for itself only.
    misdirected = httpx.post(f"{ha.api_of('c1')}/api/v1/plans/{plan['id']}/cancel", timeout=10,
                             headers={"Authorization": f"Bearer {token}", "X-Selfheal-Forwarded": "c2"})
    assert misdirected.status_code == 421, misdirected.text

    # The pause, set on c2, holds on c1 too; so does a silence set on c1, on c2.
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.post(ha.api_of("c2") + "/api/v1/pause", json={"reason": "maintenance"}, headers=auth,
                      timeout=10).status_code == 200
    eventually_sync(lambda: ha.get_from("c1", "/api/v1/pause")["paused"], timeout=SETTLE, what="c1 paused")
    assert ha.get_from("c1", "/api/v1/pause")["reason"] == "maintenance"
    assert any(e.get("by") == "another controller" for e in ha.events("c1", "engine.paused"))
    assert httpx.post(ha.api_of("c1") + "/api/v1/resume", headers=auth, timeout=10).status_code == 200
    eventually_sync(lambda: not ha.get_from("c2", "/api/v1/pause")["paused"], timeout=SETTLE, what="c2 resumed")

    silence = {"matchers": [{"name": "node", "value": mine}], "duration_s": 600, "comment": "disk swap",
               "author": "alice"}
    assert httpx.post(ha.api_of("c2") + "/api/v1/silences", json=silence, headers=auth,
                      timeout=10).status_code == 201
    made = httpx.get(ha.api_of("c1") + "/api/v1/silences", timeout=10).json()["items"]
    assert [x["comment"] for x in made] == ["disk swap"]
    eventually_sync(lambda: any(made[0]["id"] in e["silences"]
                                for e in ha.events("c1", "engine.silences_loaded")),
                    timeout=SETTLE, what="c1 taking up the silence set on c2")
    ha.crash(units[mine])

    def silenced() -> bool:
        found = ha.incidents("c1", mine)
        return bool(found) and any(e["kind"] == "held" and e["data"]["blocking"]["guard"] == "silence"
                                   for e in ha.detail("c1", found[-1]["id"])["timeline"])
    eventually_sync(silenced, timeout=HEAL, what=f"the crash on {mine} silenced by c1")
    assert not [p for p in ha.get_from("c1", "/api/v1/plans")["items"] if p["state"] == "awaiting_approval"
                and p["incident_id"] == ha.incidents("c1", mine)[-1]["id"]]

    # A live member whose API does not answer (here: it advertises a port nobody listens on) is named, and
    # the nodes it acts on are left out rather than guessed.
    ha.start_controllers("c3", extra=f'peer_url = "http://127.0.0.1:{free_port()}"\n')
    owners = ha.wait_settled([*members, "c3"])
    nodes = ha.get_from("c1", "/api/v1/nodes")
    assert nodes["missing"] == ["c3"]
    assert [n["id"] for n in nodes["items"]] == sorted(n for n in (mine, theirs) if owners[bucket_of(n)][0] != "c3")
    assert "Controller(s) c3 did not answer" in httpx.get(ha.api_of("c1") + "/", timeout=10).text
    scraped = httpx.get(ha.api_of("c1") + "/metrics", timeout=10).text
    assert 'selfheal_peer_requests_failed_total{peer="c3"} 2.0' in scraped
    ha.check_running([*members, "c3"])


# --- 7. a migration across two controllers' buckets ----------------------------------------------------

MIGRATE_RULES = """version: 1
rules:
  - name: migrate-lost-unit
    match: {kind: unit_lost}
    # Attempts spread over ~11 s: one refused while a controller (re)gained a bucket in the last offline_after,
    # or while c2 answered late on a loaded machine, is tried again rather than handed to a human.
    ladder: [{action: migrate, attempts: 4, backoff: {first: 0, base: 2, factor: 2, max: 5, jitter: 0}},
             {action: notify}]
    verify: {within: 30, stable_for: 1}
    cooldown: 1
    resolve_after: 2
"""


def solo_unit(starts: Path, *, autostart: bool) -> str:
    """A movable singleton that counts its starts; ``autostart = false``: a standby copy."""
    code = f"import os, time; open({str(starts)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(3600)"
    return (f'[[agent.units]]\nname = "solo"\nkind = "process"\nstop_grace = 1.0\nstop_after_disconnect = 1.0\n'
            f"autostart = {'true' if autostart else 'false'}\n"
            f"command = [{json.dumps(sys.executable)}, \"-c\", {json.dumps(code)}]\n")


def test_a_unit_lost_with_its_node_moves_to_a_standby_copy_on_a_node_another_controller_acts_on(ha: HA) -> None:
    """node-a (c1's) runs ``solo``; its only standby copy is on node-b (c2's). node-a's agent is killed: c1
    finds solo lost, waits out the fence, asks c2, which starts the copy on node-b under its own epoch —
    once. One incident, one audit chain; c1 then reads the new placement and finds nothing lost on node-b."""
    members = ["c1", "c2"]
    owners = expected_owners(members)
    node_a, node_b = pick_nodes(lambda b: owners[b] == "c1", lambda b: owners[b] == "c2")
    ha.rules = ha.root / "rules.yaml"
    ha.rules.write_text(MIGRATE_RULES)
    ha.watch_commands()
    ha.start_controllers(*members, extra="fence_floor = 2.0\n")
    ha.wait_settled(members)
    starts = {node: ha.root / f"{node}.starts" for node in (node_a, node_b)}
    agent_a = ha.start(node_a, "agent", ha.write_agent(node_a, solo_unit(starts[node_a], autostart=True)))
    ha.start(node_b, "agent", ha.write_agent(node_b, solo_unit(starts[node_b], autostart=False)))
    eventually_sync(lambda: len(started(starts[node_a])) == 1, timeout=60, what=f"solo started on {node_a}")

    def placed_and_ready() -> bool:  # c1 recorded solo on node-a, and c2 offers node-b's copy as a target
        try:
            units = ha.get_from("c1", "/api/v1/units", node=node_a, scope="local")["items"]
            copies = ha.get_from("c2", "/api/v1/copies/solo")
        except httpx.HTTPError:
            return False
        return any(u["name"] == "solo" and u["state"] == "running" for u in units) and \
            (copies["runners"], copies["standby"]) == ([], [node_b]) and \
            set(copies["buckets"]) == {b for b, o in owners.items() if o == "c2"} and \
            bool(ha.events("c1", "placement.recorded"))
    eventually_sync(placed_and_ready, timeout=SETTLE, what=f"c1 placing solo on {node_a}, c2 offering {node_b}")

    # A start nobody's migration asked for is refused, with the token and without.
    forged = {"node": node_b, "plan": "1-1", "incident": 1, "step": 100, "epoch": 1, "not_after": time.time() + 60,
              "expires_at": time.time() + 120}
    response = httpx.post(ha.api_of("c2") + "/api/v1/copies/solo/start", json=forged, timeout=10,
                          headers={"authorization": f"Bearer {ha.token_file.read_text().strip()}"})
    assert response.status_code == 409, response.text
    assert httpx.post(ha.api_of("c2") + "/api/v1/copies/solo/start", json=forged, timeout=10).status_code == 401

    agent_a.kill()
    agent_a.wait()
    eventually_sync(lambda: len(started(starts[node_b])) == 1, timeout=HEAL, what=f"solo started on {node_b}")

    def lost() -> list[dict[str, Any]]:  # node-a stays offline: its node_offline incident stays open
        return [i for i in ha.incidents("c2", node_a) if i["kind"] == "unit_lost"]
    eventually_sync(lambda: [i["state"] for i in lost()] == ["resolved"], timeout=HEAL,
                    what=f"solo's unit_lost incident on {node_a} resolved")
    [incident] = lost()
    assert incident["unit"] == "solo"
    timeline = ha.detail("c2", incident["id"])["timeline"]
    kinds = [e["kind"] for e in timeline]
    assert {"fence_wait", "fenced", "start_asked"} <= set(kinds), kinds
    sent = [e["data"] for e in timeline if e["kind"] == "command_sent"]
    assert [(s["node"], s["step"], s["controller"]) for s in sent] == [(node_b, "StartUnit", "c2")], sent
    assert sent[0]["epoch"] in ha.grants("c2", bucket_of(node_b))
    wire = ha.commands(node_b)
    assert [(c["id"], c["epoch"]) for c in wire] == [(sent[0]["command"], sent[0]["epoch"])]
    assert len(ha.executed(node_b)) == 1
    assert ha.opened_by(members, node_a) == ["c1"]

    # c1 took up where solo runs now: nothing is lost on node-b, for either controller.
    eventually_sync(lambda: any(line.get("unit") == "solo" and line.get("node") == node_b
                                for line in ha.events("c1", "placement.synced")),
                    timeout=SETTLE, what="c1 reading solo's placement on node-b")
    assert ha.incidents("c1", node_b) == []
    assert ha.opened_by(members, node_b) == []
    assert started(starts[node_b]) == started(starts[node_b])[:1]
    verified = ha.audit_verify()
    assert verified.returncode == 0, verified.stdout + verified.stderr
    ha.check_epochs(members)
    ha.check_running(members)


# --- 9. dataset replicas compared and repaired across controllers ----------------------------------

DATASET_RULES = """version: 1
rules:
  - name: resync-divergent-replica
    match: {kind: dataset_divergent}
    ladder: [{action: resync, attempts: 3, backoff: {first: 0, base: 1, factor: 2, max: 5, jitter: 0}}]
    verify: {kind: cleared, within: 60, stable_for: 1}
    cooldown: 1
    resolve_after: 2
  - name: report-dataset-without-authority
    match: {kind: dataset_no_authority}
    ladder: [{action: notify}]
    verify: {kind: cleared}
"""


def test_replicas_on_nodes_of_different_controllers_are_compared_and_repaired_across_them(ha: HA) -> None:
    """node-a (c1's), node-b and node-c (c2's) hold a replica of ``train``; node-a's is then corrupted. Alone, c1
    would have nothing to compare it with and c2 would see agreement: the divergence would go unseen. c1 reads
    c2's replicas from the store, finds node-a divergent from the majority and repairs it from a replica on
    a node of c2 (each listing verified against the root that node's record holds, the transfer token signed
    with that node's key), once; nobody else opens an incident, and either controller shows all three."""
    members = ["c1", "c2"]
    owners = expected_owners(members)
    node_a, node_b, node_c = pick_nodes(lambda b: owners[b] == "c1", lambda b: owners[b] == "c2",
                                        lambda b: owners[b] == "c2")
    ha.rules = ha.root / "rules.yaml"
    ha.rules.write_text(DATASET_RULES)
    ha.start_controllers(*members)
    ha.wait_settled(members)
    paths = {node: ha.root / f"data-{node}" for node in (node_a, node_b, node_c)}
    make_dataset(paths[node_a])
    for node in (node_b, node_c):
        shutil.copytree(paths[node_a], paths[node])
    original = (paths[node_a] / "shards/part-1.bin").read_bytes()
    for node, path in paths.items():
        ha.start(node, "agent", ha.write_agent(node, dataset_toml(path)))

    def train(cid: str) -> dict[str, Any] | None:
        try:
            items = ha.get_from(cid, "/api/v1/datasets")["items"]
        except httpx.HTTPError:
            return None
        return next((d for d in items if d["name"] == "train"), None)

    def agreed(cid: str) -> bool:
        found = train(cid)
        return found is not None and [r["node"] for r in found["replicas"]] == sorted(paths) and \
            found["agreement"]["replicas"] == 1.0 and all(r["online"] for r in found["replicas"])
    eventually_sync(lambda: agreed("c1") and agreed("c2"), timeout=SETTLE,
                    what="both controllers showing the three replicas in agreement")

    flip(paths[node_a] / "shards/part-1.bin", CHUNK + 3)
    resolved = ha.wait_resolved("c1", [node_a])[node_a]
    assert [i["kind"] for i in resolved] == ["dataset_divergent"]
    assert (paths[node_a] / "shards/part-1.bin").read_bytes() == original
    timeline = resolved[0]["timeline"]
    [localised] = [e["data"] for e in timeline if e["kind"] == "localised"]
    assert localised["source"] in (node_b, node_c)
    assert localised["files"] == ["shards/part-1.bin"]
    assert [e["data"]["status"] for e in timeline if e["kind"] == "command_result"] == ["done"]
    assert ha.opened_by(members, node_a) == ["c1"]
    assert ha.opened_by(members, node_b) == ha.opened_by(members, node_c) == []
    assert not [line for cid in members for line in ha.events(cid, "incident.opened")
                if line.get("kind") == "dataset_no_authority"]
    eventually_sync(lambda: agreed("c1") and agreed("c2"), timeout=SETTLE, what="agreement again, on both")
    verified = ha.audit_verify()
    assert verified.returncode == 0, verified.stdout + verified.stderr
    ha.check_epochs(members)
    ha.check_running(members)
