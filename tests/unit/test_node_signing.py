"""Signed node traffic (pure parts): the MAC, sessions that only grow, replays, the persisted epoch."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import msgspec
import pytest

from agent.app import next_session
from agent.ledger import Ledger
from controller.fleet import MAX_SESSION_JUMP, Fleet
from controller.keyring import KeyRing
from selfheal import wire
from tests.node_messages import host_metrics, signed

NODE = "node-a"
KEY = bytes(range(32))
T0 = 1_700_000_000.0
OFFLINE_AFTER = 5.0


def status(session: int, *, state: str = "online", http: str = "http://127.0.0.1:8731") -> wire.NodeStatus:
    return wire.NodeStatus(node=NODE, state=state, session=session, http=http, ts=T0)  # type: ignore[arg-type]


def report(session: int, seq: int) -> wire.Report:
    return wire.Report(node=NODE, session=session, seq=seq, ts=T0 + seq, host=host_metrics(),
                       units=[wire.UnitReport(name="web", kind="process", state="running", pid=1)])


def received(message: wire.SignedNodeMessage, channel: wire.NodeChannel, key: bytes = KEY) -> wire.NodeMessage:
    return wire.decode_node_message(wire.node_topic(NODE, channel), signed(message, channel, key))


def verifies(payload: bytes, channel: wire.NodeChannel, key: bytes = KEY) -> bool:
    """The controller's check: decoded at the edge, then the MAC over the payload as received."""
    message = wire.decode_node_message(wire.node_topic(NODE, channel), payload)
    assert isinstance(message, wire.NodeStatus | wire.Report | wire.DatasetDigest | wire.Event)
    return wire.verify_node_message(message, channel, key, payload)


# --- the MAC ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "channel"), [
    (status(3), "status"), (report(3, 1), "report"),
    (wire.DatasetDigest(node=NODE, session=3, ts=T0), "digests"),
    (wire.Event(node=NODE, session=3, ts=T0, body=wire.UnitExited(unit="web", pid=1)), "events"),
])
def test_a_signed_message_verifies_on_its_channel_only(message: wire.SignedNodeMessage,
                                                       channel: wire.NodeChannel) -> None:
    decoded = received(message, channel)
    assert isinstance(decoded, wire.NodeStatus | wire.Report | wire.DatasetDigest | wire.Event)
    assert len(decoded.sig) == 64
    assert wire.verify_node_message(decoded, channel, KEY)
    payload = signed(message, channel, KEY)
    assert verifies(payload, channel)
    other = "report" if channel != "report" else "status"
    assert not wire.verify_node_message(decoded, other, KEY)
    assert not wire.verify_node_message(decoded, other, KEY, payload)
    assert not wire.verify_node_message(decoded, channel, bytes(32))
    assert not verifies(payload, channel, bytes(32))


def test_a_changed_field_breaks_the_signature() -> None:
    decoded = received(status(3), "status")
    assert isinstance(decoded, wire.NodeStatus)
    moved = msgspec.structs.replace(decoded, http="http://203.0.113.7:8731")
    assert not wire.verify_node_message(moved, "status", KEY)
    payload = signed(status(3), "status", KEY)
    assert not verifies(payload.replace(b"127.0.0.1:8731", b"203.0.113.7:8731"), "status")
    assert not verifies(payload.replace(b'"session":3', b'"session":4'), "status")


def test_a_signature_moved_or_doubled_in_the_payload_does_not_verify() -> None:
    """Only the first ``"sig":"<mac>"`` is taken out: a label holding the MAC leaves the real one covered."""
    message = wire.NodeStatus(node=NODE, state="online", session=3, labels={"sig": ""}, ts=T0)
    payload = signed(message, "status", KEY)
    assert verifies(payload, "status")
    sig = wire.decode_node_message(wire.node_topic(NODE, "status"), payload).sig
    mac = sig.encode()
    moved = payload.replace(b'"sig":"' + mac + b'","state"', b'"sig":"","state"').replace(
        b'"labels":{"sig":""}', b'"labels":{"sig":"' + mac + b'"}')
    assert moved.count(mac) == 1
    assert moved != payload
    assert not verifies(moved, "status")  # the top-level sig is now empty: unsigned
    doubled = payload.replace(b'"sig":""', b'"sig":"' + sig.encode() + b'"', 1)
    assert not verifies(doubled, "status")


def test_a_field_this_version_does_not_know_is_still_covered() -> None:
    """A newer agent's extra field: verified over the bytes as sent, and tampering with it is caught."""
    payload = signed(status(3), "status", KEY)
    mac = hmac.new(KEY, b"selfheal-node-v1\nstatus\n", hashlib.sha256)
    sig = wire.decode_node_message(wire.node_topic(NODE, "status"), payload).sig
    unsigned = payload.replace(sig.encode(), b"").replace(b'"http"', b'"future":1,"http"')
    mac.update(unsigned)
    newer = unsigned.replace(b'"sig":""', b'"sig":"' + mac.hexdigest().encode() + b'"')
    assert verifies(newer, "status")
    assert not verifies(newer.replace(b'"future":1', b'"future":2'), "status")


def test_unsigned_and_garbage_signatures_do_not_verify() -> None:
    assert not wire.verify_node_message(status(3), "status", KEY)
    for sig in ("0" * 64, "é" * 64, "x"):
        assert not wire.verify_node_message(msgspec.structs.replace(status(3), sig=sig), "status", KEY)


def test_a_node_signature_is_not_a_command_signature() -> None:
    """Same key, same HMAC: the domain tag keeps one kind of message from standing for the other."""
    command = wire.Command(id="c", key="k", node=NODE, epoch=1, issued_at=T0, expires_at=T0 + 1,
                           step=wire.RestartUnit(unit="web"))
    canonical = wire.encode(command)
    assert wire.sign_command(command, KEY).sig == hmac.new(KEY, canonical, hashlib.sha256).hexdigest()
    assert wire._node_mac(canonical, "commands", KEY).hex() != wire.sign_command(command, KEY).sig


def test_ints_in_float_fields_verify_over_the_payload() -> None:
    """A Struct built in Python may hold 1 where a float is declared: sent as 1, decoded as 1.0 (so a
    re-encoding would differ); the controller checks the bytes as sent."""
    host = wire.HostMetrics(cpu_percent=1, load1=0, load5=0, load15=0, mem_total_bytes=1, mem_available_bytes=1,
                            mem_percent=1, swap_percent=0)
    message = wire.Report(node=NODE, session=1, seq=1, ts=1, host=host)  # floats given as ints
    assert verifies(signed(message, "report", KEY), "report")


# --- sessions only grow -------------------------------------------------------------------------


def live_fleet(session: int = 3) -> Fleet:
    fleet = Fleet()
    fleet.apply(status(session), T0)
    fleet.apply(report(session, 1), T0 + 1)
    return fleet


def test_a_jump_far_beyond_the_live_session_is_refused_while_the_node_is_heard() -> None:
    fleet = live_fleet()
    assert fleet.refuses_jump(report(3 + MAX_SESSION_JUMP + 1, 1), T0 + 2, OFFLINE_AFTER)
    assert fleet.refuses_jump(status(10**9, state="offline"), T0 + 2, OFFLINE_AFTER)
    assert not fleet.refuses_jump(report(3 + MAX_SESSION_JUMP, 1), T0 + 2, OFFLINE_AFTER)
    assert not fleet.refuses_jump(report(4, 1), T0 + 2, OFFLINE_AFTER)
    assert fleet.jumps == 2


def test_a_jump_is_taken_from_a_node_first_seen_offline_or_quiet() -> None:
    assert not Fleet().refuses_jump(report(10**9, 1), T0, OFFLINE_AFTER)  # first seen
    quiet = live_fleet()
    assert not quiet.refuses_jump(report(10**9, 1), T0 + 1 + OFFLINE_AFTER + 0.1, OFFLINE_AFTER)
    gone = live_fleet()
    gone.apply(status(3, state="offline"), T0 + 2)  # its last will
    assert not gone.refuses_jump(report(10**9, 1), T0 + 2.1, OFFLINE_AFTER)


def test_an_agent_that_lost_its_counter_comes_back_with_the_status_it_announced() -> None:
    """Counter unreadable, no copy: the agent restarts from the wall clock; its birth is held, not lost."""
    fleet = live_fleet()
    wall = int(T0)
    birth = status(wall, http="http://127.0.0.1:9999")
    assert fleet.refuses_jump(birth, T0 + 2, OFFLINE_AFTER)  # the old session still looks live
    assert fleet.nodes[NODE].session == 3
    later = T0 + 2 + OFFLINE_AFTER  # the old session fell silent
    assert not fleet.refuses_jump(report(wall, 1), later, OFFLINE_AFTER)
    fleet.apply(report(wall, 1), later)
    node = fleet.nodes[NODE]
    assert (node.session, node.online, node.http, node.held) == (wall, True, "http://127.0.0.1:9999", None)


def test_a_replayed_report_refreshes_nothing() -> None:
    fleet = live_fleet()
    fleet.apply(report(3, 2), T0 + 2)
    fleet.apply(report(3, 1), T0 + 60)  # replayed long after the node went quiet
    assert fleet.nodes[NODE].last_seen == T0 + 2


def test_a_replayed_older_unit_event_is_stale() -> None:
    fleet = live_fleet()
    exited = wire.Event(node=NODE, session=3, ts=T0 + 10, body=wire.UnitExited(unit="web", pid=1, exit_code=1))
    started = wire.Event(node=NODE, session=3, ts=T0 + 11, body=wire.UnitStarted(unit="web", pid=2, restarts=1))
    fleet.apply(exited, T0 + 10)
    fleet.apply(started, T0 + 11)
    stale = fleet.stale
    fleet.apply(exited, T0 + 30)  # the attacker replays the genuine exit
    assert fleet.stale == stale + 1
    unit = fleet.unit(NODE, "web")
    assert unit is not None
    assert (unit.state, unit.pid) == ("running", 2)


# --- the agent's counters -----------------------------------------------------------------------


def test_the_session_falls_back_to_the_ledger_copy_then_the_wall_clock(tmp_path: Path) -> None:
    assert next_session(tmp_path, T0) == 1
    assert next_session(tmp_path, T0, saved=1) == 2
    (tmp_path / "session").write_bytes(b"\xff\xfe")
    assert next_session(tmp_path, T0, saved=2) == 3  # corrupt file: the copy holds
    (tmp_path / "session").unlink()
    assert next_session(tmp_path, T0, saved=3) == 4  # lost file: the copy holds
    (tmp_path / "session").write_text("garbage")
    assert next_session(tmp_path, T0, saved=0) == int(T0) + 1  # nothing left: the wall clock


def test_the_highest_epoch_and_the_session_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path).open(T0) as ledger:
        assert (ledger.highest_epoch, ledger.session) == (0, 0)
        assert ledger.claim("k1", "c1", T0, epoch=7) is None
        assert ledger.claim("k2", "c2", T0, epoch=5) is None  # lower: not a new highest
        assert ledger.claim("k1", "c3", T0, epoch=9) is not None  # a duplicate raises nothing
        ledger.save_session(42)
    with Ledger(path).open(T0) as ledger:
        assert (ledger.highest_epoch, ledger.session) == (7, 42)


# --- the key ring -------------------------------------------------------------------------------


def test_the_key_ring_sees_added_and_broken_keys(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys", check_every=0.0)
    ring.load(T0)
    assert not ring.configured
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "node-a.key").write_text(KEY.hex())
    (tmp_path / "keys" / "node-b.key").write_text("not hex")
    (tmp_path / "keys" / "README").write_text("not a key")
    assert ring.changed(1.0)
    ring.load(T0)
    assert ring.configured
    assert ring.get("node-a") == KEY
    assert ring.get("node-b") is None  # broken: its node is refused, signing stays on
    assert ring.files == 2
