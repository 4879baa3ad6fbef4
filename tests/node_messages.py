"""Hand-made node messages for tests that speak the wire protocol in an agent's place.

With keys in ``security.key_dir`` the controller drops node traffic that is not signed with the node's
key, so a scripted agent signs what it publishes the way ``agent.app`` does: ``signed(message, channel,
key)`` gives the payload bytes (unsigned when ``key`` is None, for a controller without keys).
"""

from __future__ import annotations

from pathlib import Path

from selfheal import wire
from selfheal.keys import read_key


def host_metrics() -> wire.HostMetrics:
    return wire.HostMetrics(cpu_percent=1.0, load1=0.0, load5=0.0, load15=0.0, mem_total_bytes=1,
                            mem_available_bytes=1, mem_percent=1.0, swap_percent=0.0)


def signed(message: wire.SignedNodeMessage, channel: wire.NodeChannel, key: bytes | None) -> bytes:
    """The payload of ``message`` as the node holding ``key`` publishes it on ``channel``."""
    if key is None:
        return wire.encode(message)
    return wire.encode(wire.sign_node_message(message, channel, key))


def key_of(key_dir: Path | str, node: str) -> bytes | None:
    """The node's key from ``key_dir``, if it has one."""
    return read_key(key_dir, node)
