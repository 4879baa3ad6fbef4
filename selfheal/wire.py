"""The MQTT wire protocol, version 1: topics, message types, and the one edge
where bytes become typed objects.

Every payload is a JSON object with a ``v`` schema version. ``decode_node_message``
is the only place node traffic is parsed: it caps the size, validates the
shape with msgspec, and checks that the node id in the payload matches the
topic and that the topic's bucket matches the id. Whatever it returns is a
frozen Struct the rest of the controller can trust; whatever it rejects raises
a ``WireError`` whose ``reason`` labels a metric.

Commands are signed with HMAC-SHA256 over their canonical encoding (sorted
keys, no whitespace, the ``sig`` field empty), with a per-node key. Node
traffic (status, report, digests, events) is signed the same way with the
same key, under a different domain tag that also names the channel
(``selfheal-node-v1\n<channel>\n`` + canonical encoding), so a node message
never verifies as a command, nor as a message of another channel. The
controller checks that MAC over the payload as received, the signature's
value taken out (``verify_node_message(..., payload=)``), not over a
re-encoding: cheaper, and a field a newer agent adds is still covered.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import signal
import zlib
from typing import Annotated, Literal, TypeVar

import msgspec

from selfheal.errors import MalformedMessage, OversizedMessage, SpoofedMessage

VERSION = 1
PREFIX = "selfheal/v1"
BUCKETS = 64
MAX_PAYLOAD = 256 * 1024
CONTROLLER_STATUS_TOPIC = f"{PREFIX}/controller/status"
"""The presence of the one controller (SQLite): birth, last will, and ``offline`` when it stops."""
CONTROLLERS_STATUS_FILTER = f"{PREFIX}/controllers/+/status"
"""The presence of each of several controllers sharing a PostgreSQL store, one topic per ``controller.id``
(birth and last will; cleared when it stops cleanly): a node's controller listens while any of them does."""


def controller_status_topic(controller_id: str) -> str:
    """Where the controller ``controller_id`` (one of several) says it is online."""
    return f"{PREFIX}/controllers/{controller_id}/status"


def is_controller_status(topic: str) -> bool:
    """The one controller's status topic, or one of several controllers'."""
    if topic == CONTROLLER_STATUS_TOPIC:
        return True
    parts = topic.split("/")
    return len(parts) == 5 and "/".join(parts[:3]) == f"{PREFIX}/controllers" and parts[4] == "status" \
        and bool(parts[3])
NodeChannel = Literal["status", "report", "digests", "events", "commands"]

# --- decode-time caps ---------------------------------------------------------------------------
# The decoder rejects a message that breaks one of these before any of it is kept: a flood of
# junk costs the controller one failed decode each, never memory. Names have the shape config
# requires of node, unit and dataset names; free text is capped so no string outgrows its purpose.

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
"""Node, unit and dataset names (``config_checks.NODE_ID_RE``); also kinds (``process``, ``docker-health``)."""
MAX_UNITS = 256
"""Units per report or status (``config_checks`` holds an agent to it)."""
MAX_DISKS = 64
"""Mounts per report: the agent skips pseudo filesystems, so a host has a few."""
MAX_DATASETS = 200
"""Datasets per digest: the agent's own limit (``agent.datasets``)."""
MAX_LABELS = 32
"""Labels per node status."""
MAX_TEXT = 4096
"""Free text a node writes (errors, details): enough to say what went wrong (the agent cuts longer ones,
``fit_unit``/``fit_event``)."""
_SHORT = 128

_NAME = re.compile(NAME_PATTERN)
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Short = Annotated[str, msgspec.Meta(max_length=_SHORT)]
"""Versions, stages, process states, ids, roots and keys: short machine words."""
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
PathText = Annotated[str, msgspec.Meta(max_length=4096)]
"""A mount point, a file path relative to a dataset root, or a URL (PATH_MAX)."""
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]


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
    node: Name
    state: Literal["online", "offline"]
    session: int
    """Increments each agent start; a will from an older session never closes a newer one."""
    version: Short = ""
    units: Annotated[list[Name], msgspec.Meta(max_length=MAX_UNITS)] = msgspec.field(default_factory=list)
    labels: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_LABELS)] = msgspec.field(
        default_factory=dict)
    http: PathText = ""
    ts: float = 0.0
    conn: int = 0
    """The agent's connection to the broker within its session, counted from 1 at each (re)connect: its
    ``online`` birth and its ``offline`` last will carry the same number, so a replayed will or birth of an
    earlier connection is told from the current one (``controller.fleet``)."""

    sig: Short = ""
    """HMAC of the node's key over the message (``sign_node_message``); empty when the node has no key."""


class ControllerStatus(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    state: Literal["online", "offline"]
    session: Short
    ts: float = 0.0


# --- reports ------------------------------------------------------------------------------------


class DiskUsage(_Msg, frozen=True, kw_only=True):
    mount: PathText
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
    disks: Annotated[list[DiskUsage], msgspec.Meta(max_length=MAX_DISKS)] = msgspec.field(default_factory=list)
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    net_sent_bytes: int = 0
    net_recv_bytes: int = 0


class ProbeState(_Msg, frozen=True, kw_only=True):
    kind: Name
    healthy: bool
    consecutive_failures: int
    failures_threshold: int
    last_error: Text = ""
    last_latency_s: float = 0.0
    checked_at: float = 0.0


class UnitProgress(_Msg, frozen=True, kw_only=True):
    """How far a unit's job has come, as the job itself says (its progress file) or Spark counts it."""

    done: float = 0.0
    total: float | None = None
    stage: Short = ""
    updated_at: float = 0.0
    """Wall time the job last wrote it (its own clock); 0 when unknown."""


class SparkStatus(_Msg, frozen=True, kw_only=True):
    """A Spark application as its driver's REST API (``/api/v1``) describes it."""

    app_id: Short = ""
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
    name: Name
    kind: Name
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
    proc_status: Short = ""
    """psutil status: running, sleeping, stopped (SIGSTOP), zombie..."""
    probe: ProbeState | None = None
    error: Text = ""
    """Why the last start failed (state ``failed``), e.g. ``Java 17+ not found``."""
    every: float | None = None
    """A scheduled batch job: seconds between runs (None: a long-running service)."""
    next_run_at: float | None = None
    """Scheduled jobs: wall time of the next run, while one is due."""
    runs: int = 0
    """Scheduled jobs: runs that completed (exit 0) since the agent started."""
    progress: UnitProgress | None = None
    progress_at: float | None = None
    """Wall time (agent clock) the progress last moved during the current run; None until it first moves.
    An agent that sends no ``start_timeout`` predates that: it reports the run's start until then."""
    stall_after: float | None = None
    """Seconds without progress while alive before the unit counts as stalled (from its config), counted
    from the run's first progress."""
    start_timeout: float | None = None
    """Seconds from the run's start to its first progress while alive before the unit counts as not started
    (the limit in force on the agent). None: no limit, or an agent that predates it, whose stalls count from
    the run's start as they always did."""
    spark: SparkStatus | None = None
    fence_after: float | None = None
    """A movable singleton: seconds after this node was last heard by which the unit is surely stopped if
    the node lost contact (its agent stops it, or it died with the agent). None: never moved while unreachable."""
    fenced: bool = False
    """Stopped by its own agent after losing contact; it waits for a ``start_unit`` command."""


class Report(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    node: Name
    session: int
    seq: int
    ts: float
    host: HostMetrics
    units: Annotated[list[UnitReport], msgspec.Meta(max_length=MAX_UNITS)] = msgspec.field(default_factory=list)

    sig: Short = ""
    """HMAC of the node's key over the message (``sign_node_message``); empty when the node has no key."""


def crash_of(unit: UnitReport) -> str | None:
    """How ``unit`` crashed (``killed by SIGKILL``, ``exited with code 3``, ``could not be started: ...``), or
    None when it did not: not exited or failed, or a scheduled run (``every``) that finished with exit 0. The
    one rule the controller's detector and the agent's fallback share."""
    if unit.state not in ("exited", "failed"):
        return None
    if unit.state == "exited" and unit.every is not None and unit.exit_code == 0 and unit.exit_signal is None:
        return None  # a scheduled run that finished: completed, not crashed
    if unit.exit_signal is not None:
        try:
            return f"killed by {signal.Signals(unit.exit_signal).name}"
        except ValueError:
            return f"killed by signal {unit.exit_signal}"
    if unit.exit_code is not None:
        return f"exited with code {unit.exit_code}"
    return f"could not be started: {unit.error}" if unit.error else "could not be started"


# --- digests ------------------------------------------------------------------------------------


class DatasetSummary(_Msg, frozen=True, kw_only=True):
    """One dataset replica as its agent last scanned it."""

    name: Name
    root: Short = ""
    """``blake3:<hex>`` (or ``sha256:<hex>``) Merkle root; empty unless ``state`` is ``ok``."""
    files: int = 0
    bytes: int = 0
    generation: int = 0
    """Grows by one whenever the root changes (kept across agent restarts)."""
    state: Literal["ok", "settling", "error"]
    """``settling``: the tree changed while it was being read (no digest this round); ``error``: unreadable."""
    error: Text = ""
    scanned_at: float = 0.0
    """Wall time the scan ended."""
    deep_scanned_at: float = 0.0
    """Wall time the last deep scan (every file re-read) ended."""
    chunk_size: int = 0
    """Bytes per chunk: replicas with different chunk sizes never match."""
    manifest_root: Short | None = None
    """The published root from the dataset's manifest file, when it has one: the authority."""


class DatasetDigest(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    node: Name
    session: int
    ts: float = 0.0
    datasets: Annotated[list[DatasetSummary], msgspec.Meta(max_length=MAX_DATASETS)] = msgspec.field(
        default_factory=list)

    sig: Short = ""
    """HMAC of the node's key over the message (``sign_node_message``); empty when the node has no key."""


# --- events -------------------------------------------------------------------------------------


class UnitExited(_Msg, tag="unit_exited", frozen=True, kw_only=True):
    unit: Name
    pid: int
    exit_code: int | None = None
    exit_signal: int | None = None
    expected: bool = False
    """True when the agent stopped it itself (stop or restart), so no one should heal it."""
    reason: Short = ""
    """How the run ended in its manager's own words, for kinds another manager runs: systemd's ``Result``
    (``exit-code``, ``signal``, ``core-dump``, ``watchdog``, ``timeout``, ``oom-kill``...), the container
    engine's ``oom-killed``; empty for plain processes and when nothing more is known."""


class UnitStarted(_Msg, tag="unit_started", frozen=True, kw_only=True):
    unit: Name
    pid: int
    restarts: int


class ProbeChanged(_Msg, tag="probe_changed", frozen=True, kw_only=True):
    unit: Name
    probe: ProbeState


class CommandResult(_Msg, tag="command_result", frozen=True, kw_only=True):
    command_id: Short
    key: Short
    status: Literal["done", "failed", "rejected", "duplicate"]
    detail: Text = ""


LOCAL_KEY_PATTERN = r"^[0-9a-f]{16,64}$"


class LocalAction(_Msg, tag="local_action", frozen=True, kw_only=True):
    """What an agent did on its own while no controller listened (``agent.fallback``): a restart of a unit
    that crashed or hung. Sent once a controller is back, which adopts it into the unit's incident and counts
    it as an attempt (``controller.effects``). Every field but ``unit`` and ``key`` has a default."""

    unit: Name
    key: Annotated[str, msgspec.Meta(pattern=LOCAL_KEY_PATTERN)]
    """Names this action (the agent's ledger key): the controller adopts each key once."""
    action: Literal["restart"] = "restart"
    """The only thing an agent does on its own: never a migration, a resync or a start of a stopped copy."""
    attempt: int = 1
    """The how-manyth local restart of the unit within the agent's window (``agent.fallback_window``)."""
    reason: Short = "unit_exited"
    """What the agent saw, as the controller's finding kind: ``unit_exited`` (crashed, or could not start)
    or ``probe_failing`` (hung)."""
    status: Literal["done", "failed"] = "done"
    """``failed``: the restart did not start the unit."""
    detail: Text = ""
    ts: float = 0.0
    """Agent wall time of the action (the event's own ``ts`` is when it was sent)."""


EventBody = UnitExited | UnitStarted | ProbeChanged | CommandResult | LocalAction


class Event(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    node: Name
    session: int
    ts: float
    body: EventBody

    sig: Short = ""
    """HMAC of the node's key over the message (``sign_node_message``); empty when the node has no key."""


# --- commands -----------------------------------------------------------------------------------


class RestartUnit(_Msg, tag="restart_unit", frozen=True, kw_only=True):
    unit: Name


class StopUnit(_Msg, tag="stop_unit", frozen=True, kw_only=True):
    unit: Name


class StartUnit(_Msg, tag="start_unit", frozen=True, kw_only=True):
    unit: Name


class ResyncFile(_Msg, frozen=True, kw_only=True):
    """One path of a dataset replica to repair, relative to the dataset root.

    ``fetch``: rebuild the file from the source — pull ``chunks`` (indexes), reuse the other chunks
    from the local copy, check every chunk against ``chunk_hashes`` (the authority's whole list, in
    order) and the whole file against ``size`` and those hashes before it replaces the old one;
    ``delete``: move the path (file, link or directory) to quarantine; ``mkdir``: create a directory;
    ``chmod``: set ``mode`` only."""

    path: PathText
    action: Literal["fetch", "delete", "mkdir", "chmod"]
    mode: int = 0o644
    size: int = 0
    chunks: list[int] = msgspec.field(default_factory=list)
    chunk_hashes: list[Short] = msgspec.field(default_factory=list)


MAX_RESYNC_FILES = 64
"""Paths per ``ResyncDataset`` command: with 4 MiB chunks a 16 GiB file lists 4096 hashes (~300 KiB),
so the controller also splits by encoded size to stay under ``MAX_PAYLOAD``; more paths, more commands."""


class ResyncDataset(_Msg, tag="resync_dataset", frozen=True, kw_only=True):
    """Repair a dataset replica from a peer: pull only the listed chunks over its HTTP, verify, swap in."""

    dataset: Name
    source_url: PathText
    """``http://host:port`` of the serving peer agent."""
    token: Annotated[str, msgspec.Meta(max_length=16384)]
    """Transfer token (``selfheal.transfer_tokens``) signed with the serving node's key."""
    expected_root: Short
    """The authority's root: what the replica should digest to once every command of the plan ran."""
    chunk_size: int
    files: Annotated[list[ResyncFile], msgspec.Meta(max_length=MAX_RESYNC_FILES)] = msgspec.field(
        default_factory=list)


CommandStep = RestartUnit | StopUnit | StartUnit | ResyncDataset
"""The closed set of commands an agent runs, told apart by their tags (``restart_unit``...), which are the
wire format: never renamed. ``agent.executor`` has a branch for each (mypy checks none is missing);
``remediations.actions`` says which remediation action sends which."""


class Command(_Msg, frozen=True, kw_only=True):
    v: int = VERSION
    id: Short
    key: Short
    """Idempotency key: derived from (node, incident, step, attempt); agents execute it at most once."""
    node: Name
    epoch: int
    issued_at: float
    expires_at: float
    step: CommandStep
    sig: Short = ""


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


def fit_unit(unit: UnitReport) -> UnitReport:
    """``unit`` with its free text cut to the decode-time caps: an error message too long for the wire
    must not cost the controller the whole report (it would refuse it)."""
    probe, progress, spark = unit.probe, unit.progress, unit.spark
    if (len(unit.error) <= MAX_TEXT and len(unit.proc_status) <= _SHORT
            and (probe is None or len(probe.last_error) <= MAX_TEXT)
            and (progress is None or len(progress.stage) <= _SHORT)
            and (spark is None or len(spark.app_id) <= _SHORT)):
        return unit
    return msgspec.structs.replace(
        unit, error=unit.error[:MAX_TEXT], proc_status=unit.proc_status[:_SHORT],
        probe=probe and msgspec.structs.replace(probe, last_error=probe.last_error[:MAX_TEXT]),
        progress=progress and msgspec.structs.replace(progress, stage=progress.stage[:_SHORT]),
        spark=spark and msgspec.structs.replace(spark, app_id=spark.app_id[:_SHORT]))


def fit_event(body: EventBody) -> EventBody:
    """``body`` with its free text cut to the decode-time caps (see ``fit_unit``)."""
    if isinstance(body, CommandResult | LocalAction) and len(body.detail) > MAX_TEXT:
        return msgspec.structs.replace(body, detail=body.detail[:MAX_TEXT])
    if isinstance(body, UnitExited) and len(body.reason) > _SHORT:
        return msgspec.structs.replace(body, reason=body.reason[:_SHORT])
    if isinstance(body, ProbeChanged) and len(body.probe.last_error) > MAX_TEXT:
        return msgspec.structs.replace(body, probe=msgspec.structs.replace(
            body.probe, last_error=body.probe.last_error[:MAX_TEXT]))
    return body


def parse_node_topic(topic: str) -> tuple[int, str, str]:
    """``selfheal/v1/p/{b}/nodes/{node}/{channel}`` → (bucket, node, channel)."""
    parts = topic.split("/")
    if len(parts) != 7 or parts[:3] != ["selfheal", "v1", "p"] or parts[4] != "nodes":
        raise MalformedMessage(f"not a v1 node topic: {topic[:120]!r}")
    if not (parts[3].isascii() and parts[3].isdigit() and len(parts[3]) <= 2):
        raise MalformedMessage(f"bucket is not a number below {BUCKETS} in {topic[:120]!r}")
    if not _NAME.match(parts[5]):
        raise MalformedMessage(f"node name {parts[5][:64]!r} does not match {NAME_PATTERN}")
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


SignedNodeMessage = NodeStatus | Report | DatasetDigest | Event
"""What an agent sends the controller: each carries ``sig``."""
_Signed = TypeVar("_Signed", bound=SignedNodeMessage)
_NODE_DOMAIN = b"selfheal-node-v1\n"


def sign_node_message(message: _Signed, channel: NodeChannel, key: bytes) -> _Signed:
    """``message`` with ``sig`` set: HMAC-SHA256, under the node domain tag and ``channel``, of its canonical
    encoding with ``sig`` empty — the very bytes it is published as, but for the signature's value."""
    return msgspec.structs.replace(message, sig=_node_mac(encode(msgspec.structs.replace(message, sig="")),
                                                           channel, key).hex())


def verify_node_message(message: SignedNodeMessage, channel: str, key: bytes, payload: bytes | None = None) -> bool:
    """True when ``message.sig`` is ``key``'s signature of it on ``channel`` (constant-time compare on bytes).

    ``payload``: the bytes ``message`` was decoded from. The MAC is then checked over them with the
    signature's value taken out: no re-encoding (the cost ingest cares about), and exact — fields this
    version does not know and numbers as the sender wrote them are covered as sent. Only the first
    ``"sig":"<mac>"`` is taken out, so a forger cannot move the signature elsewhere in a signed payload:
    any other change leaves bytes the MAC does not cover. Without ``payload``, the check runs over
    ``message`` encoded again, which is the signed payload for every message this version encoded.
    (One-shot ``hmac.digest`` over plain bytes: nothing here allocates objects the garbage collector
    tracks, whose collections cost more at ingest rates than the copies.)"""
    sig = message.sig
    if len(sig) != 64:  # a hex SHA-256
        return False
    try:
        expected = bytes.fromhex(sig)
    except ValueError:
        return False
    if payload is None:
        unsigned = encode(msgspec.structs.replace(message, sig=""))
    else:
        needle = b'"sig":"' + sig.encode() + b'"'
        at = payload.find(needle)
        if at < 0:
            return False
        unsigned = payload[:at] + b'"sig":""' + payload[at + len(needle):]
    return hmac.compare_digest(_node_mac(unsigned, channel, key), expected)


def _node_mac(unsigned: bytes, channel: str, key: bytes) -> bytes:
    return hmac.digest(key, _NODE_DOMAIN + channel.encode() + b"\n" + unsigned, "sha256")
