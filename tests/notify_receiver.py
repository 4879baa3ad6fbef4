"""A real ``NOTIFY_SOCKET``: an ``AF_UNIX`` datagram socket that records what a service sends, with times.

What systemd does with the datagrams is not imitated; the tests read the
messages themselves (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``...).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Message:
    at: float
    """``time.monotonic()`` when it was read."""
    fields: dict[str, str]

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)


class NotifyReceiver:
    """Binds ``path``; a reader thread stamps each datagram as it arrives, whatever the test is doing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-receiver", daemon=True)
        self._reader.start()

    def close(self) -> None:
        self._closed.set()
        self._reader.join(5)
        self.sock.close()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(Message(time.monotonic(), fields))

    def wait_for(self, check: Callable[[Message], bool], *, timeout: float = 30.0, after: int = 0,
                 what: str = "message") -> int:
        """Index of the first message from index ``after`` on that passes ``check``, waiting for it to come."""
        deadline = time.monotonic() + timeout
        index = after
        while True:
            while index < len(self.messages):
                if check(self.messages[index]):
                    return index
                index += 1
            if time.monotonic() > deadline:
                seen = [m.fields for m in self.messages[after:]][-12:]
                raise AssertionError(f"no {what} within {timeout}s; last messages: {seen}")
            time.sleep(0.02)

    def collect(self, seconds: float) -> list[Message]:
        """Everything that arrives in the next ``seconds``."""
        start = len(self.messages)
        time.sleep(seconds)
        return self.messages[start:]

    def pings(self, messages: list[Message] | None = None) -> list[float]:
        return [m.at for m in (self.messages if messages is None else messages) if m.get("WATCHDOG") == "1"]
