"""Bounded state against a flood: decode-time caps on the wire, a slim byte-budgeted report history
per node, and no metric series from names a sender makes up."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.datasets import held_by_dataset
from controller.fleet import MAX_UNITS_PER_NODE, Fleet
from controller.metrics import MAX_DATASET_SERIES, ControllerMetrics
from detectors.model import HostSample, ReportSample, UnitSample
from detectors.thresholds import read_host_metric, read_unit_metric
from rules.loader import METRICS
from selfheal import wire
from selfheal.config import load_config
from selfheal.errors import ConfigError, MalformedMessage
from selfheal.inbox import OVERHEAD, InboxStats, inbox_type

NODE = "node-a"
T0 = 1_700_000_000.0


def host(rnd: random.Random | None = None, *, disks: int = 2) -> wire.HostMetrics:
    r = rnd or random.Random(0)  # noqa: S311 - test data
    return wire.HostMetrics(
        cpu_percent=r.random() * 100, load1=r.random(), load5=r.random(), load15=r.random(),
        mem_total_bytes=8 << 30, mem_available_bytes=r.randrange(1 << 32), mem_percent=r.random() * 100,
        swap_percent=r.random(), disk_read_bytes=r.randrange(1 << 40), disk_write_bytes=r.randrange(1 << 40),
        net_sent_bytes=r.randrange(1 << 40), net_recv_bytes=r.randrange(1 << 40),
        disks=[wire.DiskUsage(mount=f"/m{i}", total_bytes=1 << 40, used_bytes=r.randrange(1 << 40),
                              percent=r.random() * 100) for i in range(disks)])


def unit(name: str, rnd: random.Random | None = None, *, steady: bool = False, **changes: Any) -> wire.UnitReport:
    r = rnd or random.Random(0)  # noqa: S311 - test data

    def n() -> int:
        return 7 if steady else r.randrange(300, 100_000)  # small ints (up to 256) are shared by CPython

    fields: dict[str, Any] = {
        "name": name, "kind": "process", "state": "running", "pid": 4242, "restarts": n(),
        "started_at": T0 if steady else T0 + r.random(), "cpu_percent": r.random() * 100,
        "rss_bytes": r.randrange(1 << 33), "num_fds": n(), "num_threads": n(), "runs": n(),
        "error": "x" * 100, "proc_status": "sleeping",
        "probe": wire.ProbeState(kind="http", healthy=True, consecutive_failures=0, failures_threshold=3,
                                 last_error="e" * 200, checked_at=T0)}
    fields.update(changes)
    return wire.UnitReport(**fields)


def report(seq: int, units: int = 3, *, node: str = NODE, steady: bool = False, rnd: random.Random | None = None,
           session: int = 1) -> wire.Report:
    r = rnd or random.Random(seq)  # noqa: S311 - test data
    return wire.Report(node=node, session=session, seq=seq, ts=T0 + seq, host=host(r),
                       units=[unit(f"unit-{i}", r, steady=steady) for i in range(units)])


def decode(channel: wire.NodeChannel, message: msgspec.Struct | dict[str, Any], node: str = NODE) -> object:
    payload = json.dumps(message).encode() if isinstance(message, dict) else wire.encode(message)
    return wire.decode_node_message(wire.node_topic(node, channel), payload)


def as_dict(message: msgspec.Struct) -> dict[str, Any]:
    return json.loads(wire.encode(message))  # type: ignore[no-any-return]


# --- decode-time caps ---------------------------------------------------------------------------


def test_real_shaped_traffic_decodes() -> None:
    assert isinstance(decode("report", report(1, units=wire.MAX_UNITS)), wire.Report)
    docker = unit("web", kind="docker", probe=wire.ProbeState(kind="docker-health", healthy=True,
                                                             consecutive_failures=0, failures_threshold=1))
    assert isinstance(decode("report", wire.Report(node=NODE, session=1, seq=1, ts=T0, host=host(disks=64),
                                                   units=[docker])), wire.Report)
    status = wire.NodeStatus(node=NODE, state="online", session=3, version="0.13.0.dev4+gdeadbee",
                             units=[f"u{i}" for i in range(wire.MAX_UNITS)],
                             labels={f"k{i}": "v" * 256 for i in range(wire.MAX_LABELS)}, http="http://10.0.0.1:8731")
    assert decode("status", status) == status
    datasets = [wire.DatasetSummary(name=f"d-{i}", state="ok", root="blake3:" + "ab" * 32)
                for i in range(wire.MAX_DATASETS)]
    assert isinstance(decode("digests", wire.DatasetDigest(node=NODE, session=1, datasets=datasets)),
                      wire.DatasetDigest)


def _too_many_units() -> dict[str, Any]:
    body = as_dict(report(1, units=1))
    body["units"] = body["units"] * (wire.MAX_UNITS + 1)
    return body


def _with(message: msgspec.Struct, path: str, value: object) -> dict[str, Any]:
    body = as_dict(message)
    *parents, last = path.split(".")
    target: Any = body
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = value
    return body


STATUS = wire.NodeStatus(node=NODE, state="online", session=1)
EVENT = wire.Event(node=NODE, session=1, ts=T0, body=wire.UnitExited(unit="web", pid=1))
RESULT = wire.Event(node=NODE, session=1, ts=T0, body=wire.CommandResult(command_id="c", key="k", status="done"))
DIGEST = wire.DatasetDigest(node=NODE, session=1, datasets=[wire.DatasetSummary(name="model", state="ok")])


@pytest.mark.parametrize(("channel", "body"), [
    pytest.param("report", _too_many_units(), id="units per report"),
    pytest.param("report", _with(report(1), "host.disks", [as_dict(host())["disks"][0]] * (wire.MAX_DISKS + 1)),
                 id="disks per report"),
    pytest.param("report", _with(report(1), "units.0.name", "a" * 64), id="unit name too long"),
    pytest.param("report", _with(report(1), "units.0.name", "Web"), id="unit name upper case"),
    pytest.param("report", _with(report(1), "units.0.name", "../etc"), id="unit name with a path"),
    pytest.param("report", _with(report(1), "units.0.kind", "x" * 200), id="unit kind"),
    pytest.param("report", _with(report(1), "units.0.error", "e" * (wire.MAX_TEXT + 1)), id="unit error"),
    pytest.param("report", _with(report(1), "units.0.proc_status", "s" * 129), id="proc status"),
    pytest.param("report", _with(report(1), "units.0.probe.last_error", "e" * (wire.MAX_TEXT + 1)),
                 id="probe error"),
    pytest.param("report", _with(report(1), "host.disks.0.mount", "/" * 4097), id="mount"),
    pytest.param("status", _with(STATUS, "units", [f"u{i}" for i in range(wire.MAX_UNITS + 1)]),
                 id="units per status"),
    pytest.param("status", _with(STATUS, "labels", {f"k{i}": "v" for i in range(wire.MAX_LABELS + 1)}),
                 id="labels per status"),
    pytest.param("status", _with(STATUS, "labels", {"k" * 65: "v"}), id="label key"),
    pytest.param("status", _with(STATUS, "labels", {"k": "v" * 257}), id="label value"),
    pytest.param("status", _with(STATUS, "version", "v" * 129), id="version"),
    pytest.param("status", _with(STATUS, "units", ["UPPER"]), id="status unit name"),
    pytest.param("digests", _with(DIGEST, "datasets", [as_dict(DIGEST)["datasets"][0]] * (wire.MAX_DATASETS + 1)),
                 id="datasets per digest"),
    pytest.param("digests", _with(DIGEST, "datasets.0.name", "made_up.name"), id="dataset name"),
    pytest.param("digests", _with(DIGEST, "datasets.0.root", "r" * 129), id="dataset root"),
    pytest.param("events", _with(EVENT, "body.unit", "x" * 100), id="event unit"),
    pytest.param("events", _with(EVENT, "body.reason", "r" * 129), id="exit reason"),
    pytest.param("events", _with(RESULT, "body.detail", "d" * (wire.MAX_TEXT + 1)), id="result detail"),
])
def test_a_message_beyond_a_cap_is_malformed(channel: wire.NodeChannel, body: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        decode(channel, body)


def test_a_node_name_of_another_shape_is_malformed_even_when_topic_and_bucket_agree() -> None:
    for node in ("Node-A", "a" * 64, "node_a"):
        body = {"v": 1, "node": node, "state": "online", "session": 1}
        with pytest.raises(MalformedMessage):
            decode("status", body, node=node)


@pytest.mark.parametrize("topic", [
    "selfheal/v1/p/" + "1" * 5000 + "/nodes/node-a/status",  # int() of it raises ValueError, not a WireError
    "selfheal/v1/p/064/nodes/node-a/status",
    f"selfheal/v1/p/{wire.bucket_of('x' * 60_000)}/nodes/{'x' * 60_000}/status",  # a 60 KB topic level
    f"selfheal/v1/p/{wire.bucket_of('Node_A')}/nodes/Node_A/status",
])
def test_a_topic_of_another_shape_is_malformed(topic: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        wire.decode_node_message(topic, b'{"v": 1, "node": "node-a", "state": "online", "session": 1}')
    assert len(str(caught.value)) < 300


def test_commands_are_capped_where_the_agent_decodes_them() -> None:
    def command(step: wire.CommandStep) -> wire.Command:
        return wire.Command(id="c1", key="k1", node=NODE, epoch=1, issued_at=T0, expires_at=T0 + 60, step=step)

    ok = command(wire.ResyncDataset(dataset="model", source_url="http://10.0.0.2:8731", token="t",  # noqa: S106
                                    expected_root="r",
                                    chunk_size=1 << 22, files=[wire.ResyncFile(path=f"f{i}", action="fetch")
                                                               for i in range(wire.MAX_RESYNC_FILES)]))
    assert decode("commands", ok) == ok
    body = as_dict(ok)
    body["step"]["files"] *= 2
    with pytest.raises(MalformedMessage):
        decode("commands", body)
    for bad in (_with(command(wire.RestartUnit(unit="web")), "step.unit", "../../x"),
                _with(ok, "step.dataset", "x" * 64), _with(ok, "id", "i" * 129)):
        with pytest.raises(MalformedMessage):
            decode("commands", bad)


def test_the_agent_cuts_its_own_free_text_to_the_caps() -> None:
    long = unit("web", error="e" * 10_000, proc_status="p" * 500,
                probe=wire.ProbeState(kind="http", healthy=False, consecutive_failures=1, failures_threshold=3,
                                      last_error="x" * 10_000),
                progress=wire.UnitProgress(stage="s" * 500))
    fitted = wire.fit_unit(long)
    message = wire.Report(node=NODE, session=1, seq=1, ts=T0, host=host(), units=[fitted])
    decoded = decode("report", message)
    assert isinstance(decoded, wire.Report)
    assert len(decoded.units[0].error) == wire.MAX_TEXT
    normal = unit("web")
    assert wire.fit_unit(normal) is normal
    result = wire.fit_event(wire.CommandResult(command_id="c", key="k", status="failed", detail="d" * 10_000))
    assert isinstance(decode("events", wire.Event(node=NODE, session=1, ts=T0, body=result)), wire.Event)


# --- the report history: samples -----------------------------------------------------------------


def test_a_sample_reads_every_metric_a_rule_may_name_as_the_report_does() -> None:
    message = report(7, units=3)
    sample = ReportSample.of(message)
    for metric in METRICS:
        scope, _, field = metric.partition(".")
        if scope == "host":
            assert read_host_metric(sample.host, field) == read_host_metric(message.host, field), metric
        else:
            for whole, slim in zip(message.units, sample.units, strict=True):
                assert (slim.name, slim.state) == (whole.name, whole.state)
                assert read_unit_metric(slim, field) == read_unit_metric(whole, field), metric
    assert (sample.node, sample.session, sample.seq, sample.ts) == (NODE, 1, 7, T0 + 7)
    assert read_host_metric(ReportSample.of(wire.Report(node=NODE, session=1, seq=1, ts=T0, host=host(disks=0))).host,
                            "disk_max_percent") is None


def test_a_sample_shares_what_did_not_change_with_the_previous_one() -> None:
    first = ReportSample.of(report(1, steady=True))
    second = ReportSample.of(report(2, steady=True), first)
    assert second.units[0].started_at is first.units[0].started_at
    assert second.units[0].name is first.units[0].name
    assert second.host.mem_total_bytes is first.host.mem_total_bytes
    assert second.nbytes(first) < first.nbytes()


def _measure(reports: list[wire.Report]) -> tuple[int, int]:
    """(bytes the samples hold as tracemalloc sees them, bytes ``nbytes`` estimates)."""
    payloads = [wire.encode(r) for r in reports]
    decoder = msgspec.json.Decoder(wire.Report)
    estimate = 0
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept: list[ReportSample] = []
        for payload in payloads:
            previous = kept[-1] if kept else None
            kept.append(ReportSample.of(decoder.decode(payload), previous))
            estimate += kept[-1].nbytes(previous)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return held, estimate


@pytest.mark.parametrize("units", [0, 3, 50])
@pytest.mark.parametrize("steady", [True, False])
def test_the_size_estimate_is_not_below_what_a_sample_holds(units: int, steady: bool) -> None:
    rnd = random.Random(units)  # noqa: S311 - test data
    held, estimate = _measure([report(i, units, steady=steady, rnd=rnd) for i in range(120)])
    once = 8192  # allocated once, whatever the count: the interned names, the decoder's caches, the list
    assert held <= estimate + once, (held, estimate)
    assert estimate <= held * 1.5 + once, (held, estimate)


# --- the fleet: history within a byte budget per node ---------------------------------------------


def test_history_is_bounded_by_count_and_by_bytes() -> None:
    fleet = Fleet(history=120, state_bytes=64 * 1024)
    for seq in range(1, 200):
        fleet.apply(report(seq, units=50), now=T0 + seq)
    node = fleet.nodes[NODE]
    assert 1 <= len(node.reports) < 120
    assert node.history_bytes <= 64 * 1024
    assert node.history_bytes == sum(node.report_bytes) == fleet.history_bytes()
    assert [s.seq for s in node.reports] == list(range(200 - len(node.reports), 200))  # the newest, in order
    small = Fleet(history=5, state_bytes=1 << 30)
    for seq in range(1, 20):
        small.apply(report(seq, units=1), now=T0 + seq)
    assert [s.seq for s in small.nodes[NODE].reports] == [15, 16, 17, 18, 19]


def test_the_newest_sample_is_kept_even_alone_over_the_budget() -> None:
    fleet = Fleet(history=120, state_bytes=4096)
    fleet.apply(report(1, units=wire.MAX_UNITS), now=T0)
    fleet.apply(report(2, units=wire.MAX_UNITS), now=T0 + 1)
    snapshot = fleet.snapshot(NODE)
    assert snapshot is not None
    assert [s.seq for s in snapshot.reports] == [2]


def test_a_snapshot_holds_samples_not_reports() -> None:
    fleet = Fleet()
    fleet.apply(report(1), now=T0)
    snapshot = fleet.snapshot(NODE)
    assert snapshot is not None
    assert all(isinstance(s, ReportSample) and isinstance(s.host, HostSample) for s in snapshot.reports)
    assert all(isinstance(u, UnitSample) for u in snapshot.reports[0].units)
    assert snapshot.units[0].error == "x" * 100  # the current state of units keeps what the API shows


def test_events_and_statuses_cannot_grow_a_nodes_units_without_bound() -> None:
    fleet = Fleet()
    fleet.apply(report(1, units=2), now=T0)
    for i in range(MAX_UNITS_PER_NODE + 100):
        fleet.apply(wire.Event(node=NODE, session=1, ts=T0 + 1 + i, body=wire.UnitExited(unit=f"x{i}", pid=1)),
                    now=T0 + 1)
    for i in range(5):
        fleet.apply(wire.NodeStatus(node=NODE, state="online", session=1,
                                    units=[f"s{i}-{j}" for j in range(wire.MAX_UNITS)]), now=T0 + 2)
    node = fleet.nodes[NODE]
    assert len(node.units) == MAX_UNITS_PER_NODE
    assert len(node.event_ts) <= MAX_UNITS_PER_NODE
    fleet.apply(report(2, units=2), now=T0 + 3)  # the next report says which units there are
    assert sorted(node.units) == ["unit-0", "unit-1"]
    assert len(node.event_ts) <= 2


# --- metric label values ------------------------------------------------------------------------


def _series(metrics: ControllerMetrics) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def test_made_up_dataset_names_add_no_series_beyond_the_bound() -> None:
    fleet = Fleet()
    metrics = ControllerMetrics()

    def view() -> list[dict[str, Any]]:
        return [{"name": name, "replicas": [{"node": r.node} for r in held],
                 "agreement": {"replicas": 1.0, "files": None}}
                for name, held in held_by_dataset(fleet.nodes.values()).items()]

    metrics.add_dataset_collector(view)
    fleet.apply(wire.DatasetDigest(node="real-1", session=1, ts=T0, datasets=[
        wire.DatasetSummary(name="model", state="ok")]), now=T0)
    fleet.apply(wire.DatasetDigest(node="real-2", session=1, ts=T0, datasets=[
        wire.DatasetSummary(name="model", state="ok")]), now=T0)
    for fake in range(5):  # 5 messages from 5 made-up nodes, 200 made-up names each
        fleet.apply(wire.DatasetDigest(node=f"fake-{fake}", session=1, ts=T0, datasets=[
            wire.DatasetSummary(name=f"junk-{fake}-{i}", state="ok") for i in range(wire.MAX_DATASETS)]), now=T0)
    series = _series(metrics)
    names = [s["dataset"] for s in series["selfheal_dataset_agreement_ratio"]]
    assert len(names) == MAX_DATASET_SERIES
    assert "model" in names  # the most replicated first: what two real nodes hold stays in
    assert series["selfheal_datasets_unexported"] == [{}]
    value = next(f for f in text_string_to_metric_families(_text(metrics)) if f.name == "selfheal_datasets_unexported")
    assert value.samples[0].value == 5 * wire.MAX_DATASETS + 1 - MAX_DATASET_SERIES


def _text(metrics: ControllerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


# --- the MQTT inbox -----------------------------------------------------------------------------


def _message(size: int) -> aiomqtt.Message:
    return aiomqtt.Message("selfheal/v1/p/1/nodes/n/events", b"x" * size, 1, False, 1, None)  # reports: test_inbox.py


async def test_the_inbox_drops_what_arrives_beyond_its_byte_budget_and_counts_it() -> None:
    stats = InboxStats()
    budget = 10 * (1000 + OVERHEAD + 30)
    inbox = inbox_type(stats, max_bytes=budget, hard_max_bytes=budget)(maxsize=0)
    for _ in range(25):
        inbox.put_nowait(_message(1000))  # aiomqtt's on_message: never raises, so it logs nothing per drop
    assert inbox.qsize() == 10
    assert (stats.dropped, stats.dropped_bytes) == (15, 15 * (1000 + OVERHEAD + 30))
    await inbox.get()
    assert stats.queued_bytes == 9 * (1000 + OVERHEAD + 30)
    inbox.put_nowait(_message(1000))  # room again
    assert inbox.qsize() == 10
    while not inbox.empty():
        inbox.get_nowait()
    assert stats.queued_bytes == 0
    inbox.put_nowait(_message(wire.MAX_PAYLOAD * 100))  # larger than the whole budget: dropped, not queued
    assert inbox.empty()


# --- config holds an agent to the caps ----------------------------------------------------------


@pytest.mark.parametrize(("text", "path"), [
    ("".join(f'[[agent.units]]\nname = "u{i}"\ncommand = ["true"]\n' for i in range(wire.MAX_UNITS + 1)),
     "agent.units"),
    ("[agent.labels]\n" + "".join(f'k{i} = "v"\n' for i in range(wire.MAX_LABELS + 1)), "agent.labels"),
    (f'[agent.labels]\ngroup = "{"v" * 257}"\n', "agent.labels"),
])
def test_an_agent_config_beyond_the_wire_caps_is_refused(tmp_path: Path, text: str, path: str) -> None:
    config = tmp_path / "selfheal.toml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(config, env={}, role="any")
    assert info.value.path == path
