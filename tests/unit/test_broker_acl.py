"""The embedded broker's ACL as pure functions: the same grants ``selfheal broker init`` writes for Mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.broker import (
    client_id_allowed,
    filter_within,
    may_publish,
    may_read,
    may_subscribe,
    read_password_file,
    topic_matches,
)
from selfheal import wire
from selfheal.broker_setup import hash_password
from selfheal.errors import ConfigError

A, B = "node-a", "node-b"
P = wire.PREFIX


def test_topic_matching() -> None:
    assert topic_matches("a/b/c", "a/+/c")
    assert topic_matches("a/b/c", "a/#")
    assert topic_matches("a/b/c", "#")
    assert not topic_matches("a/b", "a/+/c")
    assert not topic_matches("a/b/c/d", "a/+/c")
    assert not topic_matches("a/x/c", "a/b/c")


def test_filter_within() -> None:
    allowed = f"{P}/p/+/nodes/+/report"
    assert filter_within(f"{P}/p/+/nodes/+/report", allowed)
    assert filter_within(f"{P}/p/3/nodes/{A}/report", allowed)
    assert not filter_within(f"{P}/p/+/nodes/+/#", allowed)
    assert not filter_within(f"{P}/p/+/nodes/+/+", allowed)
    assert not filter_within(f"{P}/#", allowed)
    assert not filter_within("#", allowed)


def test_a_node_publishes_only_its_own_topics() -> None:
    for channel in ("status", "report", "digests", "events"):
        assert may_publish(A, wire.node_topic(A, channel))
        assert not may_publish(A, wire.node_topic(B, channel))
    assert not may_publish(A, wire.node_topic(A, "commands"))
    assert not may_publish(A, wire.CONTROLLER_STATUS_TOPIC)
    wrong_bucket = f"{P}/p/{(wire.bucket_of(A) + 1) % wire.BUCKETS}/nodes/{A}/report"
    assert not may_publish(A, wrong_bucket)
    assert not may_publish("+", f"{P}/p/0/nodes/+/report")
    assert not may_publish(None, wire.node_topic(A, "report"))
    assert not may_publish("", wire.node_topic(A, "report"))


def test_a_node_reads_only_its_commands_and_the_controller() -> None:
    assert may_subscribe(A, wire.node_topic(A, "commands"))
    assert may_subscribe(A, wire.CONTROLLER_STATUS_TOPIC)
    for bad in (wire.node_topic(B, "commands"), f"{P}/p/+/nodes/+/commands", f"{P}/p/+/nodes/{A}/commands",
                "#", f"{P}/#", wire.node_topic(A, "report")):
        assert not may_subscribe(A, bad), bad
    assert may_read(A, wire.node_topic(A, "commands"))
    assert not may_read(A, wire.node_topic(B, "commands"))
    assert not may_read(A, wire.node_topic(B, "status"))


def test_the_controller_reads_nodes_and_sends_commands() -> None:
    for channel in ("status", "report", "digests", "events"):
        assert may_subscribe("controller", f"{P}/p/+/nodes/+/{channel}")
        assert may_read("controller", wire.node_topic(A, channel))
        assert not may_publish("controller", wire.node_topic(A, channel))
    assert may_publish("controller", wire.node_topic(A, "commands"))
    assert may_publish("controller", wire.CONTROLLER_STATUS_TOPIC)
    assert not may_subscribe("controller", f"{P}/p/+/nodes/+/commands")
    assert not may_subscribe("controller", f"{P}/p/+/nodes/+/#")
    assert not may_read("controller", wire.node_topic(A, "commands"))
    assert not may_publish("controller", "elsewhere/topic")


def test_client_ids_belong_to_their_node() -> None:
    assert client_id_allowed(A, f"selfheal-agent-{A}")
    assert not client_id_allowed(A, f"selfheal-agent-{B}")
    assert not client_id_allowed(A, "anything-else")
    assert client_id_allowed("controller", "selfheal-controller-1234")
    assert not client_id_allowed("controller", f"selfheal-agent-{A}")


def test_password_file(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    path.write_text(f"# comment\n\ncontroller:{hash_password('x')}\n{A}:{hash_password('y')}\n")
    assert sorted(read_password_file(path)) == ["controller", A]
    for text in ("", "# only a comment\n", "controller:plaintext\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="embedded_password_file"):
            read_password_file(path)
    with pytest.raises(ConfigError, match="embedded_password_file"):
        read_password_file(tmp_path / "missing")
