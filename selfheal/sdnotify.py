"""sd_notify: tell systemd we are ready, stopping, or alive (watchdog).

A no-op when ``NOTIFY_SOCKET`` is unset, so the same code runs under systemd,
in a terminal and in tests (which bind a real datagram socket and set it).
"""

from __future__ import annotations

import os
import socket


def notify(state: str, *, env: dict[str, str] | None = None) -> bool:
    """Send one state string (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``...); True if sent."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True
