"""The v1 wire edge: topics, buckets, round trips, rejections, command signatures."""

from __future__ import annotations

import contextlib
import json
import zlib

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from selfheal import wire
from selfheal.errors import MalformedMessage, OversizedMessage, SpoofedMessage, WireError

NODE = "node-a"
KEY = bytes(range(32))


def host() -> wire.HostMetrics:
    return wire.HostMetrics(cpu_percent=12.5, load1=0.5, load5=0.4, load15=0.3, mem_total_bytes=8 << 30,
                            mem_available_bytes=4 << 30, mem_percent=50.0, swap_percent=0.0,
                            disks=[wire.DiskUsage(mount="/", total_bytes=100, used_bytes=40, percent=40.0)])


def probe() -> wire.ProbeState:
    return wire.ProbeState(kind="http", healthy=False, consecutive_failures=3, failures_threshold=3,
                           last_error="connection refused", last_latency_s=0.01, checked_at=1000.0)


def command(**changes: object) -> wire.Command:
    base = wire.Command(id="c1", key="k" * 32, node=NODE, epoch=4, issued_at=1000.0, expires_at=1015.0,
                        step=wire.RestartUnit(unit="web"))
    return msgspec.structs.replace(base, **changes)


MESSAGES: list[tuple[wire.NodeChannel, wire.NodeMessage]] = [
    ("status", wire.NodeStatus(node=NODE, state="online", session=3, version="0.1.0", units=["web"],
                               http="127.0.0.1:8731", ts=1000.0)),
    ("status", wire.NodeStatus(node=NODE, state="offline", session=3)),
    ("report", wire.Report(node=NODE, session=3, seq=7, ts=1000.0, host=host(), units=[
        wire.UnitReport(name="web", kind="process", state="running", pid=42, restarts=1, started_at=990.0,
                        cpu_percent=3.0, rss_bytes=1 << 20, num_fds=9, num_threads=2, proc_status="sleeping",
                        probe=probe()),
        wire.UnitReport(name="etl", kind="process", state="exited", exit_code=2)])),
    ("events", wire.Event(node=NODE, session=3, ts=1000.0,
                          body=wire.UnitExited(unit="web", pid=42, exit_signal=9, expected=False))),
    ("events", wire.Event(node=NODE, session=3, ts=1000.0, body=wire.UnitStarted(unit="web", pid=43, restarts=2))),
    ("events", wire.Event(node=NODE, session=3, ts=1000.0, body=wire.ProbeChanged(unit="web", probe=probe()))),
    ("events", wire.Event(node=NODE, session=3, ts=1000.0,
                          body=wire.CommandResult(command_id="c1", key="k" * 32, status="done", detail="ok"))),
    ("commands", command()),
]


def status_payload(**fields: object) -> bytes:
    body: dict[str, object] = {"v": 1, "node": NODE, "state": "online", "session": 1}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


# --- topics and buckets ---------------------------------------------------------------------------


@pytest.mark.parametrize("node", ["node-a", "0", "gpu-worker-17", "a" * 63])
def test_bucket_is_crc32_mod_64(node: str) -> None:
    assert wire.bucket_of(node) == zlib.crc32(node.encode()) % 64
    assert 0 <= wire.bucket_of(node) < wire.BUCKETS == 64


def test_bucket_of_a_known_id() -> None:
    assert wire.bucket_of("node-a") == zlib.crc32(b"node-a") % 64 == 43


def test_node_topic_carries_the_bucket() -> None:
    assert wire.node_topic(NODE, "report") == f"selfheal/v1/p/{wire.bucket_of(NODE)}/nodes/{NODE}/report"
    assert wire.parse_node_topic(wire.node_topic(NODE, "events")) == (wire.bucket_of(NODE), NODE, "events")


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("channel", "message"), MESSAGES,
                         ids=[f"{c}-{type(getattr(m, 'body', m)).__name__}" for c, m in MESSAGES])
def test_every_message_type_round_trips(channel: wire.NodeChannel, message: wire.NodeMessage) -> None:
    payload = wire.encode(message)
    assert json.loads(payload)["v"] == 1
    decoded = wire.decode_node_message(wire.node_topic(NODE, channel), payload)
    assert decoded == message
    assert type(decoded) is type(message)


def test_event_bodies_are_tagged() -> None:
    payload = wire.encode(wire.Event(node=NODE, session=1, ts=1.0, body=wire.UnitStarted(unit="w", pid=1,
                                                                                          restarts=0)))
    assert json.loads(payload)["body"]["type"] == "unit_started"


def test_encoding_is_canonical() -> None:
    payload = wire.encode(wire.NodeStatus(node=NODE, state="online", session=1))
    assert b" " not in payload
    keys = list(json.loads(payload))
    assert keys == sorted(keys)


def test_controller_status_round_trips() -> None:
    status = wire.ControllerStatus(state="online", session="abc", ts=5.0)
    assert wire.decode_controller_status(wire.encode(status)) == status
    with pytest.raises(MalformedMessage):
        wire.decode_controller_status(b'{"v": 1, "state": "sleeping", "session": "x"}')
    with pytest.raises(OversizedMessage):
        wire.decode_controller_status(b" " * (wire.MAX_PAYLOAD + 1))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    message = wire.decode_node_message(wire.node_topic(NODE, "status"), status_payload(future_field=[1, 2]))
    assert isinstance(message, wire.NodeStatus)
    assert message.session == 1


# --- rejections -----------------------------------------------------------------------------------


STATUS_TOPIC = wire.node_topic(NODE, "status")


def test_malformed_json_is_rejected() -> None:
    with pytest.raises(MalformedMessage, match="JSON is malformed"):
        wire.decode_node_message(STATUS_TOPIC, b'{"v": 1,, "node": "node-a"}')
    with pytest.raises(MalformedMessage, match="truncated"):
        wire.decode_node_message(STATUS_TOPIC, b'{"v": 1, "node": ')


def test_non_object_json_is_rejected() -> None:
    with pytest.raises(MalformedMessage, match=r"not a JSON object.*array"):
        wire.decode_node_message(STATUS_TOPIC, b"[1, 2, 3]")


def test_a_wrong_schema_version_is_named() -> None:
    with pytest.raises(MalformedMessage, match="schema version 2 is not 1"):
        wire.decode_node_message(STATUS_TOPIC, status_payload(v=2))


def test_a_wrong_schema_version_with_another_shape_is_named() -> None:
    with pytest.raises(MalformedMessage, match="schema version 2 is not 1"):
        wire.decode_node_message(STATUS_TOPIC, b'{"v": 2, "node": "node-a", "presence": "up"}')


def test_a_missing_field_is_named() -> None:
    with pytest.raises(MalformedMessage, match="`session`"):
        wire.decode_node_message(STATUS_TOPIC, status_payload(session=None))


def test_a_missing_field_is_named_when_v_is_omitted() -> None:
    # ``v`` defaults to 1, so a payload without it is a v1 payload; the error must name what is missing,
    # not claim a schema version mismatch.
    payload = json.dumps({"node": NODE, "state": "online"}).encode()
    with pytest.raises(MalformedMessage) as info:
        wire.decode_node_message(STATUS_TOPIC, payload)
    assert "session" in str(info.value)


def test_a_wrong_field_type_is_named() -> None:
    with pytest.raises(MalformedMessage, match=r"\$\.session"):
        wire.decode_node_message(STATUS_TOPIC, status_payload(session="one"))


def test_an_oversized_payload_is_rejected_before_parsing() -> None:
    payload = status_payload(version="x" * wire.MAX_PAYLOAD)
    assert len(payload) > wire.MAX_PAYLOAD
    with pytest.raises(OversizedMessage, match=f"{len(payload)} bytes > {wire.MAX_PAYLOAD}"):
        wire.decode_node_message(STATUS_TOPIC, payload)


def test_a_payload_at_the_cap_is_accepted() -> None:
    small = status_payload(pad="")  # an unknown field (a newer agent's): ignored, but it counts toward the cap
    payload = status_payload(pad="x" * (wire.MAX_PAYLOAD - len(small)))
    assert len(payload) == wire.MAX_PAYLOAD
    assert isinstance(wire.decode_node_message(STATUS_TOPIC, payload), wire.NodeStatus)


def test_a_payload_node_other_than_the_topic_node_is_spoofed() -> None:
    with pytest.raises(SpoofedMessage, match="payload node 'node-b' does not match topic node 'node-a'"):
        wire.decode_node_message(STATUS_TOPIC, status_payload(node="node-b"))


def test_a_command_for_another_node_is_spoofed() -> None:
    with pytest.raises(SpoofedMessage):
        wire.decode_node_message(wire.node_topic("node-b", "commands"), wire.encode(command()))


def test_a_wrong_bucket_is_spoofed() -> None:
    wrong = (wire.bucket_of(NODE) + 1) % 64
    with pytest.raises(SpoofedMessage, match=f"bucket {wrong} does not match node 'node-a'"):
        wire.decode_node_message(f"selfheal/v1/p/{wrong}/nodes/{NODE}/status", status_payload())


def test_an_unknown_channel_is_malformed() -> None:
    topic = f"selfheal/v1/p/{wire.bucket_of(NODE)}/nodes/{NODE}/gossip"
    with pytest.raises(MalformedMessage, match="unknown channel 'gossip'"):
        wire.decode_node_message(topic, status_payload())


@pytest.mark.parametrize("topic", [
    f"selfheal/v2/p/43/nodes/{NODE}/status",
    f"selfheal/v1/q/43/nodes/{NODE}/status",
    f"selfheal/v1/p/43/hosts/{NODE}/status",
    f"selfheal/v1/p/43/nodes/{NODE}",
    f"selfheal/v1/p/43/nodes/{NODE}/status/extra",
    "selfheal/v1/controller/status",
    "",
])
def test_a_non_v1_node_topic_is_malformed(topic: str) -> None:
    with pytest.raises(MalformedMessage, match="not a v1 node topic"):
        wire.decode_node_message(topic, status_payload())


def test_a_non_numeric_bucket_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match="bucket is not a number"):
        wire.decode_node_message(f"selfheal/v1/p/x/nodes/{NODE}/status", status_payload())


def test_a_superscript_digit_bucket_is_malformed() -> None:
    # str.isdigit() accepts '²' but int() does not: this must still be a WireError, not a ValueError.
    with pytest.raises(MalformedMessage):
        wire.decode_node_message(f"selfheal/v1/p/\u00b2/nodes/{NODE}/status", status_payload())


def test_every_wire_error_carries_its_metric_reason() -> None:
    assert (MalformedMessage.reason, OversizedMessage.reason, SpoofedMessage.reason) == (
        "malformed", "oversized", "spoofed")
    assert all(issubclass(c, WireError) for c in (MalformedMessage, OversizedMessage, SpoofedMessage))


# --- properties -----------------------------------------------------------------------------------


CHANNELS = ["status", "report", "events", "commands", "digests"]


@settings(max_examples=300, deadline=None)
@given(channel=st.sampled_from(CHANNELS), payload=st.binary(max_size=512))
@example(channel="status", payload=b"")
@example(channel="report", payload=b"null")
@example(channel="events", payload=b'{"v": 1, "node": "node-a", "session": 1, "ts": 1, "body": {"type": "x"}}')
@example(channel="status", payload=b"[" * 10_000 + b"]" * 10_000)
@example(channel="status", payload=b'{"v": 1e400, "node": "node-a"}')
def test_arbitrary_payloads_only_raise_wire_errors(channel: wire.NodeChannel, payload: bytes) -> None:
    try:
        message = wire.decode_node_message(wire.node_topic(NODE, channel), payload)
    except WireError:
        return
    assert message.node == NODE


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(channel=st.sampled_from(CHANNELS),
       fields=st.dictionaries(st.sampled_from(["v", "node", "state", "session", "seq", "ts", "host", "units",
                                               "body", "id", "key", "epoch", "step", "sig"]), JSONISH))
def test_arbitrary_json_objects_only_raise_wire_errors(channel: wire.NodeChannel, fields: dict[str, object]) -> None:
    with contextlib.suppress(WireError):
        wire.decode_node_message(wire.node_topic(NODE, channel), json.dumps(fields).encode())


@settings(max_examples=300, deadline=None)
@given(bucket=st.text(max_size=4), node=st.text(max_size=8), channel=st.sampled_from([*CHANNELS, "x", ""]),
       payload=st.binary(max_size=64))
@example(bucket="\u00b2", node=NODE, channel="status", payload=b"{}")
def test_arbitrary_topics_only_raise_wire_errors(bucket: str, node: str, channel: str, payload: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.decode_node_message(f"selfheal/v1/p/{bucket}/nodes/{node}/{channel}", payload)


# --- command signatures ---------------------------------------------------------------------------


def test_a_signed_command_verifies() -> None:
    signed = wire.sign_command(command(), KEY)
    assert len(signed.sig) == 64
    assert wire.verify_command(signed, KEY)
    assert wire.sign_command(command(), KEY).sig == signed.sig  # deterministic


def test_a_signature_survives_the_wire() -> None:
    signed = wire.sign_command(command(), KEY)
    decoded = wire.decode_node_message(wire.node_topic(NODE, "commands"), wire.encode(signed))
    assert isinstance(decoded, wire.Command)
    assert wire.verify_command(decoded, KEY)


@pytest.mark.parametrize("change", [
    {"epoch": 5}, {"expires_at": 99999.0}, {"key": "other"}, {"step": wire.RestartUnit(unit="db")},
    {"node": "node-b"}, {"id": "c2"},
])
def test_a_tampered_command_does_not_verify(change: dict[str, object]) -> None:
    signed = wire.sign_command(command(), KEY)
    assert not wire.verify_command(msgspec.structs.replace(signed, **change), KEY)


def test_a_command_signed_with_another_key_does_not_verify() -> None:
    signed = wire.sign_command(command(), KEY)
    assert not wire.verify_command(signed, bytes(32))


@pytest.mark.parametrize("sig", ["", "0" * 64, "not-hex", "\u00e9" * 64])
def test_an_empty_or_forged_signature_does_not_verify(sig: str) -> None:
    assert not wire.verify_command(command(sig=sig), KEY)
