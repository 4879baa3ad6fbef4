"""Shared fixtures: free ports, a real Mosquitto per test session, deadline polling.

A component a test needs is started by the test itself on a free loopback port.
When it is missing the test fails with the Debian package to install; `.ci/run`
installs them, so CI never skips.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.podman_support import PodmanEngine

ASYNC_DUMP_BEFORE_TIMEOUT = 10.0  # seconds before pytest-timeout fires


def _dump_asyncio_tasks(name: str) -> None:
    """Print every task of every running event loop, with where it waits.

    pytest-timeout dumps thread stacks only, which for an async test shows the loop in ``select``
    and nothing of the coroutine that hangs; this names it.
    """
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
    out = [f"\n==== {name}: asyncio tasks {ASYNC_DUMP_BEFORE_TIMEOUT:.0f} s before the timeout ===="]
    for loop in loops:
        for task in asyncio.all_tasks(loop):
            out.append(f"-- {task.get_name()}: {task.get_coro()!r}")
            out.extend(f"     {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
                       for frame in task.get_stack(limit=20))
    print("\n".join(out), file=sys.stderr, flush=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Just before a test would time out, name the coroutines it is stuck in (see ``_dump_asyncio_tasks``)."""
    marker = item.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    timer = None
    if timeout > 2 * ASYNC_DUMP_BEFORE_TIMEOUT:
        timer = threading.Timer(timeout - ASYNC_DUMP_BEFORE_TIMEOUT, _dump_asyncio_tasks, args=(item.nodeid,))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package {package!r} (apt-get install -y {package})")
    return path


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    config: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def start(self) -> None:
        """(Re)start on the same port, e.g. after ``stop`` in a broker-outage test."""
        exe = require_binary("mosquitto", "mosquitto")
        self.process = subprocess.Popen([exe, "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)


def start_mosquitto(directory: Path, *, also_on: Sequence[str] = ()) -> Broker:
    """``also_on``: more addresses it listens on, on the same port (e.g. the host end of a test's veth pair)."""
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        "".join(f"listener {port} {host}\n" for host in ("127.0.0.1", *also_on))
        + "allow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
    )
    broker = Broker("127.0.0.1", port, None, config)  # type: ignore[arg-type]
    broker.start()
    return broker


def controller_config_with_rules(tmp_path: Path, broker: Broker, rules: str) -> Path:
    """A controller config on ``broker`` whose one rulebook is ``rules``, its state under ``tmp_path``."""
    rulebook = tmp_path / "rules.yaml"
    rulebook.write_text(rules)
    path = tmp_path / "controller.toml"
    path.write_text(
        f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\n'
        f'[controller]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'offline_after = 60.0\nrulebooks = ["{rulebook}"]\n'
        f'[security]\nkey_dir = "{tmp_path / "keys"}"\n')
    return path


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One real Mosquitto for the test session; tests use unique node ids and topics."""
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def podman_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanEngine]:
    """One Podman Docker-API service for the test session (``tests.podman_support``); tests use unique
    container names."""
    from tests.podman_support import start_podman_engine  # noqa: PLC0415 - only tests that use it need docker

    engine = start_podman_engine(tmp_path_factory.mktemp("podman"))
    yield engine
    engine.stop()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of the test's own, for tests that stop and restart the broker."""
    broker = start_mosquitto(tmp_path)
    yield broker
    broker.stop()


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 20.0,
                     interval: float = 0.05, what: str = "condition") -> None:
    """Poll ``check`` until it is true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def eventually_sync(check: Callable[[], bool], *, timeout: float = 30.0, interval: float = 0.1,
                    what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
