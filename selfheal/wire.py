"""The MQTT wire protocol, version 1: topics, message types, and the one edge
where bytes become typed objects.

Every payload is a JSON object with a ``v`` schema version. ``decode_node_message``
is the only place node traffic is parsed: it caps the size, validates the
shape with msgspec, and checks that the node id in the payload matches the
topic and that the topic's bucket matches the id. Whatever it returns is a
frozen Struct the rest of the controller can trust; whatever it rejects raises
a ``WireError`` whose ``reason`` labels a metric.

Commands are signed with HMAC-SHA256 over their canonical encoding (sorted
keys, no whitespace, the ``sig`` field empty), with a per-node key.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib
from typing import Literal

import msgspec

from selfheal.errors import MalformedMessage, OversizedMessage, SpoofedMessage

VERSION = 1
PREFIX = "selfheal/v1"
BUCKETS = 64
MAX_PAYLOAD = 256 * 1024
CONTROLLER_STATUS_TOPIC = f"{PREFIX}/controller/status"
NodeChannel = Literal["status", "report", "digests", "events", "commands"]


def bucket_of(node_id: str) -> int:
    """The fixed v1 bucket of a node: crc32(node_id) % 64."""
    return zlib.crc32(node_id.encode()) % BUCKETS


def node_topic(node_id: str, channel: NodeChannel) -> str:
    return f"{PREFIX}/p/{bucket_of(node_id)}/nodes/{node_id}/{channel}"


class _Msg(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    pass


# --- presence -----------------------------------------------------------------------------------


class NodeStatus(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    node: str
    state: Literal["online", "offline"]
    session: int
    """Increments each agent start; a will from an older session never closes a newer one."""
    version: str = ""
    units: list[str] = msgspec.field(default_factory=list)
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    http: str = ""
    ts: float = 0.0


class ControllerStatus(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    state: Literal["online", "offline"]
    session: str
    ts: float = 0.0


# --- reports ------------------------------------------------------------------------------------


class DiskUsage(_Msg, frozen=True, kw_only=True):
    mount: str
    total_bytes: int
    used_bytes: int
    percent: float


class HostMetrics(_Msg, frozen=True, kw_only=True):
    cpu_percent: float
    load1: float
    load5: float
    load15: float
    mem_total_bytes: int
    mem_available_bytes: int
    mem_percent: float
    swap_percent: float
    disks: list[DiskUsage] = msgspec.field(default_factory=list)
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    net_sent_bytes: int = 0
    net_recv_bytes: int = 0


class ProbeState(_Msg, frozen=True, kw_only=True):
    kind: str
    healthy: bool
    consecutive_failures: int
    failures_threshold: int
    last_error: str = ""
    last_latency_s: float = 0.0
    checked_at: float = 0.0


class UnitProgress(_Msg, frozen=True, kw_only=True):
    """How far a unit's job has come, as the job itself says (its progress file) or Spark counts it."""

    done: float = 0.0
    total: float | None = None
    stage: str = ""
    updated_at: float = 0.0
    """Wall time the job last wrote it (its own clock); 0 when unknown."""


class SparkStatus(_Msg, frozen=True, kw_only=True):
    """A Spark application as its driver's REST API (``/api/v1``) describes it."""

    app_id: str = ""
    jobs_running: int = 0
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    tasks_total: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    """Failed task attempts: Spark retries them itself (``spark.task.maxFailures``); reported, not acted on."""
    checked_at: float = 0.0


UnitStateName = Literal["starting", "running", "exited", "stopped", "failed", "completed"]
"""``completed``: a scheduled batch job (``every``) whose last run exited 0 and that waits for its next
run — not a crash. ``exited``: ended on its own otherwise; ``stopped``: stopped on purpose."""


class UnitReport(_Msg, frozen=True, kw_only=True):
    name: str
    kind: str
    state: UnitStateName
    pid: int | None = None
    restarts: int = 0
    started_at: float = 0.0
    exit_code: int | None = None
    exit_signal: int | None = None
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    num_fds: int = 0
    num_threads: int = 0
    proc_status: str = ""
    """psutil status: running, sleeping, stopped (SIGSTOP), zombie..."""
    probe: ProbeState | None = None
    error: str = ""
    """Why the last start failed (state ``failed``), e.g. ``Java 17+ not found``."""
    every: float | None = None
    """A scheduled batch job: seconds between runs (None: a long-running service)."""
    next_run_at: float | None = None
    """Scheduled jobs: wall time of the next run, while one is due."""
    runs: int = 0
    """Scheduled jobs: runs that completed (exit 0) since the agent started."""
    progress: UnitProgress | None = None
    progress_at: float | None = None
    """Wall time (agent clock) the progress last moved, or the current run started if later."""
    stall_after: float | None = None
    """Seconds without progress while alive before the unit counts as stalled (from its config)."""
    spark: SparkStatus | None = None
    fence_after: float | None = None
    """A movable singleton: seconds after this node was last heard by which the unit is surely stopped if
    the node lost contact (its agent stops it, or it died with the agent). None: never moved while unreachable."""
    fenced: bool = False
    """Stopped by its own agent after losing contact; it waits for a ``start_unit`` command."""


class Report(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    node: str
    session: int
    seq: int
    ts: float
    host: HostMetrics
    units: list[UnitReport] = msgspec.field(default_factory=list)


# --- digests ------------------------------------------------------------------------------------


class DatasetSummary(_Msg, frozen=True, kw_only=True):
    """One dataset replica as its agent last scanned it."""

    name: str
    root: str = ""
    """``blake3:<hex>`` (or ``sha256:<hex>``) Merkle root; empty unless ``state`` is ``ok``."""
    files: int = 0
    bytes: int = 0
    generation: int = 0
    """Grows by one whenever the root changes (kept across agent restarts)."""
    state: Literal["ok", "settling", "error"]
    """``settling``: the tree changed while it was being read (no digest this round); ``error``: unreadable."""
    error: str = ""
    scanned_at: float = 0.0
    """Wall time the scan ended."""
    deep_scanned_at: float = 0.0
    """Wall time the last deep scan (every file re-read) ended."""
    chunk_size: int = 0
    """Bytes per chunk: replicas with different chunk sizes never match."""
    manifest_root: str | None = None
    """The published root from the dataset's manifest file, when it has one: the authority."""


class DatasetDigest(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    node: str
    session: int
    ts: float = 0.0
    datasets: list[DatasetSummary] = msgspec.field(default_factory=list)


# --- events -------------------------------------------------------------------------------------


class UnitExited(_Msg, tag="unit_exited", frozen=True, kw_only=True):
    unit: str
    pid: int
    exit_code: int | None = None
    exit_signal: int | None = None
    expected: bool = False
    """True when the agent stopped it itself (stop or restart), so no one should heal it."""
    reason: str = ""
    """How the run ended in its manager's own words, for kinds another manager runs: systemd's ``Result``
    (``exit-code``, ``signal``, ``core-dump``, ``watchdog``, ``timeout``, ``oom-kill``...), the container
    engine's ``oom-killed``; empty for plain processes and when nothing more is known."""


class UnitStarted(_Msg, tag="unit_started", frozen=True, kw_only=True):
    unit: str
    pid: int
    restarts: int


class ProbeChanged(_Msg, tag="probe_changed", frozen=True, kw_only=True):
    unit: str
    probe: ProbeState


class CommandResult(_Msg, tag="command_result", frozen=True, kw_only=True):
    command_id: str
    key: str
    status: Literal["done", "failed", "rejected", "duplicate"]
    detail: str = ""


EventBody = UnitExited | UnitStarted | ProbeChanged | CommandResult


class Event(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    node: str
    session: int
    ts: float
    body: EventBody


# --- commands -----------------------------------------------------------------------------------


class RestartUnit(_Msg, tag="restart_unit", frozen=True, kw_only=True):
    unit: str


class StopUnit(_Msg, tag="stop_unit", frozen=True, kw_only=True):
    unit: str


class StartUnit(_Msg, tag="start_unit", frozen=True, kw_only=True):
    unit: str


class ResyncFile(_Msg, frozen=True, kw_only=True):
    """One path of a dataset replica to repair, relative to the dataset root.

    ``fetch``: rebuild the file from the source — pull ``chunks`` (indexes), reuse the other chunks
    from the local copy, check every chunk against ``chunk_hashes`` (the authority's whole list, in
    order) and the whole file against ``size`` and those hashes before it replaces the old one;
    ``delete``: move the path (file, link or directory) to quarantine; ``mkdir``: create a directory;
    ``chmod``: set ``mode`` only."""

    path: str
    action: Literal["fetch", "delete", "mkdir", "chmod"]
    mode: int = 0o644
    size: int = 0
    chunks: list[int] = msgspec.field(default_factory=list)
    chunk_hashes: list[str] = msgspec.field(default_factory=list)


MAX_RESYNC_FILES = 64
"""Paths per ``ResyncDataset`` command: with 4 MiB chunks a 16 GiB file lists 4096 hashes (~300 KiB),
so the controller also splits by encoded size to stay under ``MAX_PAYLOAD``; more paths, more commands."""


class ResyncDataset(_Msg, tag="resync_dataset", frozen=True, kw_only=True):
    """Repair a dataset replica from a peer: pull only the listed chunks over its HTTP, verify, swap in."""

    dataset: str
    source_url: str
    """``http://host:port`` of the serving peer agent."""
    token: str
    """Transfer token (``selfheal.transfer_tokens``) signed with the serving node's key."""
    expected_root: str
    """The authority's root: what the replica should digest to once every command of the plan ran."""
    chunk_size: int
    files: list[ResyncFile] = msgspec.field(default_factory=list)


CommandStep = RestartUnit | StopUnit | StartUnit | ResyncDataset


class Command(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    id: str
    key: str
    """Idempotency key: derived from (node, incident, step, attempt); agents execute it at most once."""
    node: str
    epoch: int
    issued_at: float
    expires_at: float
    step: CommandStep
    sig: str = ""


# --- encode / decode ----------------------------------------------------------------------------

_encoder = msgspec.json.Encoder(order="sorted")
NodeMessage = NodeStatus | Report | DatasetDigest | Event | Command
_decoders: dict[str, msgspec.json.Decoder[NodeMessage]] = {
    "status": msgspec.json.Decoder(NodeStatus),
    "report": msgspec.json.Decoder(Report),
    "digests": msgspec.json.Decoder(DatasetDigest),
    "events": msgspec.json.Decoder(Event),
    "commands": msgspec.json.Decoder(Command),
}
_controller_decoder = msgspec.json.Decoder(ControllerStatus)
_version_probe = msgspec.json.Decoder(dict[str, object])


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def parse_node_topic(topic: str) -> tuple[int, str, str]:
    """``selfheal/v1/p/{b}/nodes/{node}/{channel}`` → (bucket, node, channel)."""
    parts = topic.split("/")
    if len(parts) != 7 or parts[:3] != ["selfheal", "v1", "p"] or parts[4] != "nodes":
        raise MalformedMessage(f"not a v1 node topic: {topic[:120]!r}")
    if not (parts[3].isascii() and parts[3].isdigit()):
        raise MalformedMessage(f"bucket is not a number in {topic[:120]!r}")
    return int(parts[3]), parts[5], parts[6]


def decode_node_message(topic: str, payload: bytes) -> NodeMessage:
    """Validate one node message at the edge; raises ``WireError``."""
    if len(payload) > MAX_PAYLOAD:
        raise OversizedMessage(f"{len(payload)} bytes > {MAX_PAYLOAD}")
    bucket, node, channel = parse_node_topic(topic)
    if bucket != bucket_of(node):
        raise SpoofedMessage(f"bucket {bucket} does not match node {node!r} (expected {bucket_of(node)})")
    decoder = _decoders.get(channel)
    if decoder is None:
        raise MalformedMessage(f"unknown channel {channel!r}")
    try:
        message = decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(_explain(payload, exc)) from None
    if message.v != VERSION:
        raise MalformedMessage(f"schema version {message.v} is not {VERSION}")
    if message.node != node:
        raise SpoofedMessage(f"payload node {message.node[:64]!r} does not match topic node {node!r}")
    return message


def decode_controller_status(payload: bytes) -> ControllerStatus:
    if len(payload) > MAX_PAYLOAD:
        raise OversizedMessage(f"{len(payload)} bytes > {MAX_PAYLOAD}")
    try:
        return _controller_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(_explain(payload, exc)) from None


def _explain(payload: bytes, exc: msgspec.DecodeError) -> str:
    try:
        version = _version_probe.decode(payload).get("v")
    except msgspec.DecodeError:
        return f"not a JSON object: {exc}"
    if version is not None and version != VERSION:
        return f"schema version {version!r} is not {VERSION}"
    return str(exc)


def sign_command(command: Command, key: bytes) -> Command:
    return msgspec.structs.replace(command, sig=_mac(command, key))


def verify_command(command: Command, key: bytes) -> bool:
    # Compare bytes: compare_digest raises TypeError on non-ASCII str, which a forged sig may hold.
    return bool(command.sig) and hmac.compare_digest(command.sig.encode(), _mac(command, key).encode())


def _mac(command: Command, key: bytes) -> str:
    canonical = encode(msgspec.structs.replace(command, sig=""))
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()
