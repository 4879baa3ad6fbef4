"""sd_notify: the datagrams a service sends systemd (``READY=1``, ``STATUS=``, ``WATCHDOG=1``...).

The protocol is one ``AF_UNIX`` datagram of ``KEY=VALUE`` lines to the socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace);
no C library is needed. Everything here is a no-op when ``NOTIFY_SOCKET`` is
unset, so the same code runs under systemd, in a terminal and in tests (which
bind a real datagram socket and set it).

``watchdog_period`` reads ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, which
names the one process the watchdog is meant for) and answers how often to
ping: half the watchdog timeout, as sd_watchdog_enabled(3) recommends. Who
pings, and only while healthy, is ``selfheal.service``'s business.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

MAX_STATUS = 400
"""Characters of a ``STATUS=`` line kept; systemctl shows one line, and a datagram must stay small."""


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send one state string (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``...); True if sent."""
    return Notifier.from_env(env).send_raw(state)


class Notifier:
    """Sends to one ``NOTIFY_SOCKET`` address, or nowhere (``address`` empty)."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        return cls((os.environ if env is None else env).get("NOTIFY_SOCKET", ""))

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str | int) -> bool:
        """``send(READY=1, STATUS="...")``: one datagram; fields go in the order given."""
        return self.send_raw("\n".join(f"{key}={_clean(str(value))}" for key, value in fields.items()))

    def send_raw(self, state: str) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self.address)
                sock.sendall(state.encode())
            except OSError:  # systemd gone or the socket full: the next message tries again
                self.failed += 1
                return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def reloading(self, status: str) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this to its own SIGHUP; older ones ignore it.
        return self.send(RELOADING=1, STATUS=status, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.send_raw("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start (or stop) time: the service is alive and making progress, just not ready yet."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))


def watchdog_period(env: Mapping[str, str] | None = None, *, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None without a watchdog.

    None too when ``$WATCHDOG_PID`` names another process: the variables were
    inherited, and the watchdog belongs to our parent.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2_000_000


def _clean(value: str) -> str:
    """One line, bounded: a newline would start another (bogus) field."""
    line = " ".join(value.split())
    return line if len(line) <= MAX_STATUS else line[: MAX_STATUS - 1] + "…"
