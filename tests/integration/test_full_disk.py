"""Full disks: the controller's store and the agent's ledger and digest cache on a small tmpfs that fills up.

Each test mounts a tmpfs of its own (``mount -t tmpfs -o size=...``; skipped, with the reason, where this
machine cannot mount one), fills it with a file written until ``write`` says ENOSPC, and deletes the file
to give the space back. What must hold meanwhile: a write that cannot be kept is refused with a clear
error, logged and counted, and none of it is kept (a group commit keeps none of its batch, so every
audit chain still verifies); reads go on; a command is never published unless its record was written,
and never executed unless the agent's ledger recorded it; the digest cache degrades to no cache. Once
the space is back everything works again, without a restart.

The first tests drive the real classes (store, dispatcher, ledger, executor, digest scanner); the last
run a real controller and agent (``tests.e2e.conftest.Cluster``) with their state dirs on the tmpfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from agent.digests.cache import DigestCache
from agent.digests.hashing import DEFAULT
from agent.digests.scanner import DatasetScanner
from agent.digests.trees import scan_dataset
from agent.executor import CommandExecutor
from agent.ledger import Ledger
from controller.audit import verify_database
from controller.dispatcher import Dispatcher
from controller.fleet import Fleet
from controller.ownership import Sole
from controller.store import Incident, SqliteStore
from remediations.plans import Plan, RestartUnit
from selfheal.clocks import ManualClock, SystemClock
from selfheal.config import DatasetConfig
from selfheal.errors import StoreError
from selfheal.wire import Command, DatasetSummary, sign_command
from selfheal.wire import RestartUnit as WireRestart
from tests.conftest import eventually_sync, free_port, start_mosquitto
from tests.e2e.conftest import SELFHEAL, Cluster

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
NODE = "node-x"
KEY = bytes(range(32))
DISK_FULL = "filesystem holding .* is full"
"""What every StoreError of a full disk says (with the file's path before it)."""


# --- a small disk -------------------------------------------------------------------------------


@dataclass
class SmallDisk:
    """A tmpfs of ``size`` mounted at ``path``; ``fill`` takes all of its space, ``free`` gives it back."""

    path: Path
    filler: Path = field(init=False)

    def __post_init__(self) -> None:
        self.filler = self.path / "filler"

    def fill(self) -> None:
        """Append to the filler until not one more byte fits (halving the write on each ENOSPC)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = 1 << 20
            zeros = bytes(chunk)
            while chunk:
                try:
                    os.write(fd, zeros[:chunk])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[SmallDisk]:
    """Mount a tmpfs at ``path`` (created) for the block; skip the test where that is not possible."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (this suite runs as root in CI)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} on this machine: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with small_disk(tmp_path / "small") as mounted:
        yield mounted


# --- the controller's store ---------------------------------------------------------------------


@pytest.fixture
async def store(disk: SmallDisk) -> AsyncIterator[tuple[SqliteStore, list[str]]]:
    """A store on the small disk, and the reasons its refused writes were counted under."""
    refused: list[str] = []
    opened = await SqliteStore.open(disk.path / "selfheal.sqlite3", on_write_error=refused.append)
    yield opened, refused
    await opened.close()


async def open_incident(store: SqliteStore, node: str = "node-a") -> Incident:
    return await store.open_incident(key=f"unit_exited/{node}/web", kind="unit_exited", node=node, unit="web",
                                     severity="critical", summary=f"web on {node} exited", rule="restart",
                                     opened_at=T0, evidence={"exit_code": 1})


def chain_kinds(path: Path, incident_id: int) -> list[str]:
    import sqlite3  # noqa: PLC0415 - a read-only look beside the store

    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [kind for (kind,) in db.execute("SELECT kind FROM timeline WHERE incident_id = ? ORDER BY seq",
                                               (incident_id,))]


async def test_a_write_on_a_full_disk_is_refused_clearly_counted_and_logged_and_reads_go_on(
        disk: SmallDisk, store: tuple[SqliteStore, list[str]]) -> None:
    db, refused = store
    incident = await open_incident(db)
    await db.append_timeline(incident.id, at=T0 + 1, kind="held", data={"n": 1})

    disk.fill()
    with capture_logs() as logs, pytest.raises(StoreError, match=DISK_FULL) as failure:
        await db.append_timeline(incident.id, at=T0 + 2, kind="held", data={"n": 2})
    assert str(disk.path / "selfheal.sqlite3") in str(failure.value)
    assert "nothing of this write was kept" in str(failure.value)
    assert refused == ["disk_full"]
    (logged,) = [e for e in logs if e["event"] == "store.write_failed"]
    assert (logged["log_level"], logged["reason"], logged["writes"]) == ("error", "disk_full", 1)

    # Reads go on, and see what was committed before.
    detail = await db.get_incident(incident.id)
    assert detail is not None
    assert [e.kind for e in detail.timeline] == ["opened", "held"]
    assert [i.id for i in await db.unresolved_incidents()] == [incident.id]

    # More refusals are counted, but logged at most once a minute per reason.
    with capture_logs() as logs:
        for n in range(3):
            with pytest.raises(StoreError, match=DISK_FULL):
                await db.set_pause(True, f"attempt {n}")
    assert refused == ["disk_full"] * 4
    assert [e for e in logs if e["event"] == "store.write_failed"] == []
    assert await db.get_pause() == (False, "")

    disk.free()
    with capture_logs() as logs:
        await db.append_timeline(incident.id, at=T0 + 3, kind="held", data={"n": 3})
    (recovered,) = [e for e in logs if e["event"] == "store.write_recovered"]
    assert recovered["refused"] == 4
    assert refused == ["disk_full"] * 4  # nothing more
    assert chain_kinds(disk.path / "selfheal.sqlite3", incident.id) == ["opened", "held", "held"]
    assert verify_database(disk.path / "selfheal.sqlite3") == (1, [])


async def test_a_group_commit_on_a_full_disk_keeps_none_of_its_batch_and_every_chain_verifies(
        disk: SmallDisk, store: tuple[SqliteStore, list[str]]) -> None:
    db, refused = store
    first, second = await open_incident(db, "node-a"), await open_incident(db, "node-b")
    path = disk.path / "selfheal.sqlite3"

    async def writes(tag: str) -> list[Any]:
        """Eleven writes made together: queued behind the first, they share a transaction."""
        return await asyncio.gather(
            *(db.append_timeline(incident.id, at=T0 + n, kind=f"{tag}-{n}", data={"n": n})
              for n in range(4) for incident in (first, second)),
            open_incident(db, "node-c"),
            db.record_command(key=f"key-{tag}", command_id=f"cmd-{tag}", plan_id="1-1", node="node-a", epoch=1,
                              issued_at=T0, payload=b"{}"),
            db.set_incident_state(first.id, "failed", at=T0 + 9, reason=tag),
            return_exceptions=True)

    disk.fill()
    outcomes = await writes("full")
    assert all(isinstance(o, StoreError) for o in outcomes), outcomes
    assert all("is full" in str(o) for o in outcomes)
    assert refused == ["disk_full"] * len(outcomes)
    assert chain_kinds(path, first.id) == chain_kinds(path, second.id) == ["opened"]
    assert [i.node for i in await db.unresolved_incidents()] == ["node-a", "node-b"]
    assert await db.commands_live_after(T0, 60.0) == {}
    assert verify_database(path) == (2, [])

    disk.free()
    outcomes = await writes("later")
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    assert chain_kinds(path, first.id) == ["opened", *(f"later-{n}" for n in range(4)), "failed"]
    assert await db.commands_live_after(T0, 60.0) == {"1-1": T0 + 60.0}
    assert verify_database(path) == (3, [])


async def test_a_command_whose_record_cannot_be_written_is_never_published(
        disk: SmallDisk, store: tuple[SqliteStore, list[str]]) -> None:
    db, _ = store
    incident = await open_incident(db)
    published: list[tuple[str, bytes]] = []
    audit: list[tuple[str, dict[str, object]]] = []
    dispatcher = Dispatcher(
        fleet=Fleet(), store=db, link=SimpleNamespace(  # type: ignore[arg-type]
            publish=lambda t, p, qos=0: published.append((t, p))),
        keys={"node-a": KEY}.get, clock=ManualClock(T0), notifier=SimpleNamespace(),
        ownership=Sole(1), command_ttl=30.0, ack_timeout=0.01)

    async def record(kind: str, data: dict[str, object]) -> None:
        audit.append((kind, data))

    async def verifying() -> None:
        raise AssertionError("nothing was sent, so nothing is verified")

    def plan(attempt: int) -> Plan:
        return Plan(id=f"{incident.id}-{attempt}", incident_id=incident.id, rule="restart", rule_digest="", rung=0,
                    attempt=attempt, steps=(RestartUnit("node-a", "web"),), verification=None, cooldown_key="",
                    mode="auto", created_at=T0, deadline=T0 + 60)

    disk.fill()
    with capture_logs() as logs:
        outcome = await dispatcher.execute(plan(1), incident, recheck=lambda: True, audit=record,
                                           on_verifying=verifying)
    assert outcome.outcome == "failed"
    assert "not sent" in outcome.detail
    assert "is full" in outcome.detail
    assert published == []
    assert [kind for kind, _ in audit] == ["rechecked"]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["plan.step_failed"]

    disk.free()
    outcome = await dispatcher.execute(plan(2), incident, recheck=lambda: True, audit=record,
                                       on_verifying=verifying)
    assert len(published) == 1  # recorded, so sent (and, with no agent here, never acked)
    assert outcome.outcome == "failed"
    assert "no ack" in outcome.detail


# --- the agent's ledger and digest cache --------------------------------------------------------


@dataclass
class Units:
    """The executor's view of the supervisor: records what it was asked to run."""

    restarted: list[str] = field(default_factory=list)
    while_restarting: Any = None

    async def restart(self, name: str) -> object:
        self.restarted.append(name)
        if self.while_restarting is not None:
            self.while_restarting()
        return SimpleNamespace(pid=4242)

    async def stop(self, name: str) -> object:
        raise AssertionError("only restarts here")

    async def start(self, name: str) -> object:
        raise AssertionError("only restarts here")


def command(clock: ManualClock, key: str = "k1") -> Command:
    return sign_command(Command(id=f"cmd-{key}", key=key, node=NODE, epoch=1, issued_at=clock.wall(),
                                expires_at=clock.wall() + 60, step=WireRestart(unit="web")), KEY)


async def test_a_command_the_ledger_cannot_record_is_not_run_and_runs_once_space_returns(disk: SmallDisk) -> None:
    clock = ManualClock(T0)
    units = Units()
    with Ledger(disk.path / "ledger.sqlite3").open(clock.wall()) as ledger:
        executor = CommandExecutor(node_id=NODE, key=KEY, ledger=ledger, units=units, clock=clock)
        disk.fill()
        with capture_logs() as logs:
            refused = await executor.execute(command(clock))
        assert refused.status == "failed"
        assert refused.detail.startswith("not run: cannot write the command ledger: the filesystem holding")
        assert "is full" in refused.detail
        assert units.restarted == []
        (logged,) = [e for e in logs if e["event"] == "command.ledger_failed"]
        assert (logged["log_level"], logged["stage"], logged["reason"]) == ("error", "claim", "disk_full")
        assert ledger.get("k1") is None  # not half-claimed: nothing blocks the command later

        disk.free()
        ran = await executor.execute(command(clock))
        assert (ran.status, units.restarted) == ("done", ["web"])
        again = await executor.execute(command(clock))
        assert again.status == "duplicate"
        assert units.restarted == ["web"]


async def test_a_command_whose_outcome_cannot_be_recorded_never_runs_twice(disk: SmallDisk) -> None:
    clock = ManualClock(T0)
    units = Units(while_restarting=disk.fill)  # the disk fills while the command runs
    with Ledger(disk.path / "ledger.sqlite3").open(clock.wall()) as ledger:
        executor = CommandExecutor(node_id=NODE, key=KEY, ledger=ledger, units=units, clock=clock)
        with capture_logs() as logs:
            ran = await executor.execute(command(clock))
        assert ran.status == "done"  # it ran: the ack says so
        (logged,) = [e for e in logs if e["event"] == "command.ledger_failed"]
        assert (logged["stage"], logged["reason"]) == ("finish", "disk_full")

        disk.free()
        units.while_restarting = None
        redelivered = await executor.execute(command(clock))
        assert redelivered.status == "duplicate"
        assert "interrupted" in redelivered.detail
        assert units.restarted == ["web"]


def dataset(root: Path) -> Path:
    """Twenty files at rest (an mtime long past, so the cache may trust them)."""
    at_rest = int(T0) * 10**9
    for n in range(20):
        path = root / f"part-{n:02}"
        path.write_bytes(bytes([n]) * 5000)
        os.utime(path, ns=(at_rest, at_rest))
    return root


async def test_a_digest_cache_on_a_full_disk_degrades_to_no_cache_and_caches_again_later(
        tmp_path: Path, disk: SmallDisk) -> None:
    data = tmp_path / "data"
    data.mkdir()
    dataset(data)
    with DigestCache(tmp_path / "reference.sqlite3").open() as reference:
        expected = scan_dataset(str(data), name="ds", cache=reference, alg=DEFAULT, chunk_size=4096, workers=0)
    assert expected.tree is not None

    with DigestCache(disk.path / "digests.sqlite3").open(["ds"]) as cache:
        published: list[list[DatasetSummary]] = []
        scanner = DatasetScanner([DatasetConfig(name="ds", path=str(data), chunk_size=4096)], cache=cache,
                                 publish=published.append, clock=SystemClock())
        disk.fill()
        with capture_logs() as logs:
            summary = await scanner.scan("ds")
            again = await scanner.scan("ds")
        assert (summary.state, summary.root, summary.files) == ("ok", expected.tree.root_digest, 20)
        assert summary.generation == again.generation == 1  # kept in memory while it cannot be written
        assert again.root == summary.root
        assert len(published) == 2
        assert cache.count() == 0  # nothing cached: every scan reads every file
        warned = [e for e in logs if e["event"] == "digests.cache_write_failed"]
        assert len(warned) == 1, logs
        assert (warned[0]["log_level"], warned[0]["reason"]) == ("warning", "disk_full")
        assert not [e for e in logs if e["log_level"] == "error"]

        disk.free()
        with capture_logs() as logs:
            later = await scanner.scan("ds")
        assert (later.state, later.root, later.generation) == ("ok", summary.root, 1)
        assert cache.count() == 20
        assert cache.dataset("ds") is not None
        assert [e["event"] for e in logs if e["event"].startswith("digests.cache_")] == [
            "digests.cache_write_recovered"]
    with DigestCache(disk.path / "digests.sqlite3").open(["ds"]) as reopened:
        record = reopened.dataset("ds")
        assert record is not None
        assert (record.root, record.generation) == (summary.root, 1)


# --- real controller and agent processes --------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    broker = start_mosquitto(tmp_path)
    running = Cluster(root=tmp_path, broker=broker)
    try:
        yield running
    finally:
        running.stop_all()
        broker.stop()


def events(log: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
    return found


def incidents(cluster: Cluster, node: str, kind: str = "unit_exited") -> list[dict[str, Any]]:
    return [i for i in cluster.get("/api/v1/incidents")["items"] if i["node"] == node and i["kind"] == kind]


def metric(cluster: Cluster, sample: str) -> float:
    for line in cluster.get_text("/metrics").splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0


def test_a_controller_on_a_full_disk_serves_reads_acts_on_nothing_unrecorded_and_heals_once_space_returns(
        cluster: Cluster) -> None:
    log = cluster.root / "controller.log"
    with small_disk(cluster.root / "controller", "16m") as state:
        cluster.start("controller", "controller", cluster.write_controller())
        cluster.wait_ready()
        cluster.start("node-a", "agent", cluster.write_agent("node-a", cluster.http_unit()))
        before = cluster.wait_healthy("node-a")

        state.fill()
        os.kill(before["pid"], signal.SIGKILL)
        eventually_sync(lambda: bool(events(log, "store.write_failed")), timeout=30,
                        what="the controller saying it cannot write")
        (failed, *_) = events(log, "store.write_failed")
        assert failed["reason"] == "disk_full"
        assert str(cluster.root / "controller" / "selfheal.sqlite3") in failed["error"]
        assert metric(cluster, 'selfheal_store_write_errors_total{reason="disk_full"}') >= 1
        # Reads go on; nothing was done that could not be recorded: no incident, no restart.
        assert incidents(cluster, "node-a") == []
        unit = cluster.unit("node-a")
        assert unit is not None
        assert (unit["state"], unit["restarts"]) == ("exited", before["restarts"])
        assert cluster.procs["controller"].poll() is None
        # A human's change that cannot be recorded is refused, saying why; nothing of it takes effect.
        token = {"Authorization": f"Bearer {cluster.token_file.read_text().strip()}"}
        paused = httpx.post(cluster.api + "/api/v1/pause", json={"reason": "disk test"}, headers=token, timeout=5)
        assert paused.status_code == 503, paused.text
        assert "is full" in paused.json()["detail"]
        assert cluster.get("/api/v1/pause")["paused"] is False

        state.free()
        cluster.wait_healthy("node-a", restarts_above=before["restarts"], timeout=40)
        eventually_sync(lambda: any(i["state"] == "resolved" for i in incidents(cluster, "node-a")), timeout=40,
                        what="the incident opened once space returned, resolved")
        assert events(log, "store.write_recovered")
        assert cluster.procs["controller"].poll() is None
        verified = subprocess.run([*SELFHEAL, "audit", "verify", "--db",
                                   str(cluster.root / "controller" / "selfheal.sqlite3")],
                                  capture_output=True, text=True, timeout=30, check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "every chain intact" in verified.stdout
        cluster.stop_all()


RULES = """\
version: 1
rules:
  - name: restart-exited-unit
    match: {kind: unit_exited}
    ladder:
      - {action: restart, attempts: 3, backoff: {first: 0, base: 1, factor: 2, max: 5}}
    verify: {within: 30, stable_for: 3}
    cooldown: 1
    resolve_after: 1
"""


def test_a_disk_that_fills_while_a_plan_runs_leaves_the_controller_running_and_every_record_whole(
        cluster: Cluster) -> None:
    log = cluster.root / "controller.log"
    rules = cluster.root / "rules.yaml"
    rules.write_text(RULES)
    with small_disk(cluster.root / "controller", "16m") as state:
        cluster.start("controller", "controller", cluster.write_controller(f'rulebooks = ["{rules}"]\n'))
        cluster.wait_ready()
        cluster.start("node-a", "agent", cluster.write_agent("node-a", cluster.http_unit()))
        before = cluster.wait_healthy("node-a")

        os.kill(before["pid"], signal.SIGKILL)
        eventually_sync(lambda: len(incidents(cluster, "node-a")) == 1, timeout=30, what="an incident")
        (incident,) = incidents(cluster, "node-a")
        eventually_sync(lambda: any(e["kind"] == "verifying" for e in cluster.audit(incident["id"])), timeout=30,
                        what="the restart verifying")
        state.fill()  # the plan's outcome, and the incident's resolution, cannot be written now
        eventually_sync(lambda: bool(events(log, "engine.evaluate_failed")), timeout=30,
                        what="the engine still running passes after the plan ended")
        assert events(log, "store.write_failed")
        assert cluster.procs["controller"].poll() is None
        assert cluster.get(f"/api/v1/incidents/{incident['id']}")["state"] == "open"  # reads go on

        state.free()
        eventually_sync(lambda: incidents(cluster, "node-a")[0]["state"] == "resolved", timeout=30,
                        what="the incident resolved once space returned")
        eventually_sync(lambda: [p["state"] for p in cluster.plans(incident["id"])] == ["succeeded"], timeout=30,
                        what="the plan's outcome recorded once space returned")
        assert cluster.unit("node-a", "web")["restarts"] == before["restarts"] + 1  # type: ignore[index]
        assert cluster.procs["controller"].poll() is None
        verified = subprocess.run([*SELFHEAL, "audit", "verify", "--db",
                                   str(cluster.root / "controller" / "selfheal.sqlite3")],
                                  capture_output=True, text=True, timeout=30, check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        cluster.stop_all()


FLAKY_RULES = """\
version: 1
rules:
  - name: restart-exited-unit
    match: {kind: unit_exited}
    ladder:
      - {action: restart, attempts: 5, backoff: {first: 0, base: 8, factor: 1, max: 8, jitter: 0}}
    verify: {within: 3, stable_for: 1}
    cooldown: 0
    resolve_after: 1
"""


def test_a_plan_the_full_disk_kept_from_starting_starts_once_space_returns(cluster: Cluster) -> None:
    log = cluster.root / "controller.log"
    rules = cluster.root / "rules.yaml"
    rules.write_text(FLAKY_RULES)
    flag = cluster.root / "web-may-run"
    flag.touch()
    port = free_port()
    serve = f"test -f {flag} && exec {sys.executable} -m http.server {port} --bind 127.0.0.1"
    web = (f'[[agent.units]]\nname = "web"\nkind = "process"\ncommand = ["sh", "-c", {json.dumps(serve)}]\n'
           f'[agent.units.probe]\nkind = "http"\ntarget = "http://127.0.0.1:{port}/"\n'
           f"interval = 0.5\ntimeout = 0.5\nfailures = 3\nstart_period = 1.0\n")
    with small_disk(cluster.root / "controller", "16m") as state:
        cluster.start("controller", "controller", cluster.write_controller(f'rulebooks = ["{rules}"]\n'))
        cluster.wait_ready()
        cluster.start("node-a", "agent", cluster.write_agent("node-a", web))
        before = cluster.wait_healthy("node-a")

        flag.unlink()  # the restart will not hold: the first plan fails, the next waits out its backoff
        os.kill(before["pid"], signal.SIGKILL)
        eventually_sync(lambda: len(incidents(cluster, "node-a")) == 1, timeout=30, what="an incident")
        (incident,) = incidents(cluster, "node-a")

        def backing_off() -> bool:
            kinds = [(e["kind"], e["data"].get("event"), e["data"].get("blocking", {}).get("guard"))
                     for e in cluster.audit(incident["id"])]
            return (("plan_failed", None, None) in kinds and ("notice", "outcome", None) in kinds
                    and ("held", None, "backoff") in kinds)
        eventually_sync(backing_off, timeout=30, what="the first plan failed, the next backing off")
        flag.touch()
        state.fill()  # the next plan cannot be recorded: it must not start, nor block the ones after it
        eventually_sync(lambda: bool(events(log, "store.write_failed")), timeout=30,
                        what="the next plan refused for want of space")
        assert [p["attempt"] for p in cluster.plans(incident["id"])] == [1]
        assert cluster.unit("node-a", "web")["state"] == "exited"  # type: ignore[index]

        state.free()
        cluster.wait_healthy("node-a", restarts_above=before["restarts"], timeout=40)
        eventually_sync(lambda: incidents(cluster, "node-a")[0]["state"] == "resolved", timeout=30,
                        what="the incident resolved once space returned")
        assert cluster.procs["controller"].poll() is None
        verified = subprocess.run([*SELFHEAL, "audit", "verify", "--db",
                                   str(cluster.root / "controller" / "selfheal.sqlite3")],
                                  capture_output=True, text=True, timeout=30, check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        cluster.stop_all()


def test_an_agent_whose_ledger_disk_is_full_runs_no_command_and_heals_once_space_returns(cluster: Cluster) -> None:
    log = cluster.root / "node-a.log"
    cluster.start("controller", "controller", cluster.write_controller())
    cluster.wait_ready()
    with small_disk(cluster.root / "node-a", "8m") as state:
        cluster.start("node-a", "agent", cluster.write_agent("node-a", cluster.http_unit()))
        before = cluster.wait_healthy("node-a")

        state.fill()
        os.kill(before["pid"], signal.SIGKILL)
        eventually_sync(lambda: bool(events(log, "command.ledger_failed")), timeout=30,
                        what="the agent refusing a command its ledger cannot record")
        (refused, *_) = events(log, "command.ledger_failed")
        assert (refused["stage"], refused["reason"]) == ("claim", "disk_full")
        (incident,) = incidents(cluster, "node-a")
        eventually_sync(lambda: any(e["kind"] == "command_result" and "not run" in str(e["data"].get("detail"))
                                    for e in cluster.audit(incident["id"])), timeout=30,
                        what="the controller told the command was not run")
        unit = cluster.unit("node-a")
        assert unit is not None
        assert unit["restarts"] == before["restarts"]  # nothing ran

        state.free()
        cluster.wait_healthy("node-a", restarts_above=before["restarts"], timeout=60)
        eventually_sync(lambda: incidents(cluster, "node-a")[0]["state"] == "resolved", timeout=40,
                        what="the incident resolved once space returned")
        cluster.stop_all()
