"""sd_notify from real ``selfheal agent`` / ``selfheal controller`` processes to a real ``NOTIFY_SOCKET``.

Readiness waits for the broker; watchdog pings come every ``WATCHDOG_USEC/2``
and stop while the event loop is blocked (the ``SELFHEAL_DEBUG_LOOP_STALL``
hook blocks the loop from a SIGUSR2 handler, threads keep running — so a
pinger thread would be caught); SIGHUP reloads through RELOADING/READY and
says what applied and what needs a restart; SIGTERM sends STOPPING.
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker, free_port
from tests.notify_receiver import NotifyReceiver

pytestmark = pytest.mark.integration

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
STALL = 3.0


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


def start(role: str, config: Path, receiver: NotifyReceiver, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": str(receiver.path), "WATCHDOG_USEC": str(WATCHDOG_USEC),
           "SELFHEAL_DEBUG_LOOP_STALL": str(STALL), "SELFHEAL_LOG__FORMAT": "json"}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "selfheal", role, "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def agent_config(path: Path, broker: Broker, *, interval: float = 0.5, level: str = "info") -> Path:
    path.write_text(f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\nreconnect_max = 0.5\n'
                    f'[agent]\nnode_id = "notify-{zlib.crc32(str(path).encode()):x}"\n'
                    f'interval = {interval}\nstate_dir = "{path.parent / "agent"}"\nlisten = "127.0.0.1:0"\n'
                    f'[security]\nkey_dir = "{path.parent / "keys"}"\n[log]\nlevel = "{level}"\n')
    return path


def controller_config(path: Path, broker: Broker, *, rulebooks: list[Path], notify: str = "") -> Path:
    books = ", ".join(f'"{book}"' for book in rulebooks)
    path.write_text(f'[mqtt]\nurl = "{broker.url}"\nkeepalive = 2.0\nreconnect_max = 0.5\n'
                    f'[controller]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{path.parent / "ctl"}"\n'
                    f"rulebooks = [{books}]\n{notify}"
                    f'[security]\nkey_dir = "{path.parent / "keys"}"\napi_token_file = "{path.parent / "token"}"\n')
    return path


def is_ready(m: object) -> bool:
    return getattr(m, "get", lambda _k: "")("READY") == "1"


def check_watchdog(receiver: NotifyReceiver, proc: subprocess.Popen[bytes]) -> None:
    """Pings every 0.5 s; none while the loop is blocked; they come back after."""
    pings = receiver.pings(receiver.collect(3.0))
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(gaps) >= 4, pings
    assert 0.4 <= statistics.median(gaps) <= 0.65, gaps

    sent = time.monotonic()
    proc.send_signal(signal.SIGUSR2)  # the loop sleeps STALL seconds on a signal handler
    during = [at - sent for at in receiver.pings(receiver.collect(STALL + 2.0))]
    # One ping may already have been on its way when the signal landed; none after, until the loop is back.
    assert not [at for at in during if 0.1 < at < STALL - 0.2], f"pings while the loop was blocked: {during}"
    assert len([at for at in during if at > STALL - 0.2]) >= 3, f"pings did not come back: {during}"


def check_stopping(receiver: NotifyReceiver, proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    receiver.wait_for(lambda m: m.get("STOPPING") == "1", timeout=15, after=len(receiver.messages),
                      what="STOPPING=1")
    assert proc.wait(25) == 0


def test_agent_notify_lifecycle(tmp_path: Path, own_mosquitto: Broker, receiver: NotifyReceiver) -> None:
    config = agent_config(tmp_path / "agent.toml", own_mosquitto)
    own_mosquitto.stop()
    proc = start("agent", config, receiver, tmp_path / "agent.log")
    try:
        # Broker down: alive, says so, asks for more start time, not READY.
        waiting = receiver.wait_for(lambda m: "waiting for the broker" in m.get("STATUS"), what="waiting status")
        receiver.wait_for(lambda m: "EXTEND_TIMEOUT_USEC" in m, what="EXTEND_TIMEOUT_USEC")
        receiver.collect(1.5)
        assert not any(is_ready(m) for m in receiver.messages), "READY=1 before the broker was up"
        own_mosquitto.start()
        ready = receiver.wait_for(is_ready, after=waiting, what="READY=1")
        assert receiver.messages[ready].get("STATUS").startswith("online: node notify-"), receiver.messages[ready]

        check_watchdog(receiver, proc)

        # SIGHUP with a changed log level (live) and interval (needs a restart).
        agent_config(config, own_mosquitto, interval=0.7, level="debug")
        mark = len(receiver.messages)
        proc.send_signal(signal.SIGHUP)
        reloading = receiver.wait_for(lambda m: m.get("RELOADING") == "1", after=mark, what="RELOADING=1")
        done = receiver.wait_for(is_ready, after=reloading, what="READY=1 after reload")
        status = receiver.messages[done].get("STATUS")
        assert "config reloaded: applied log" in status, status
        assert "restart needed for agent.interval" in status, status

        # A bad file keeps the running config and says so.
        config.write_text(config.read_text() + "\n[agent.bogus]\n")
        mark = len(receiver.messages)
        proc.send_signal(signal.SIGHUP)
        reloading = receiver.wait_for(lambda m: m.get("RELOADING") == "1", after=mark, what="RELOADING=1")
        done = receiver.wait_for(is_ready, after=reloading, what="READY=1 after a failed reload")
        status = receiver.messages[done].get("STATUS")
        assert "config reload failed, still running the previous config" in status, status
        assert "agent.bogus" in status, status
        assert proc.poll() is None
        assert receiver.pings(receiver.collect(1.2)), "no pings after a failed reload"

        check_stopping(receiver, proc)
    finally:
        stop(proc)
        own_mosquitto.stop()


RULEBOOK = """\
version: 1
rules:
  - name: {name}
    match: {{kind: unit_exited}}
    ladder:
      - {{action: restart, attempts: 1}}
"""


def test_controller_notify_lifecycle(tmp_path: Path, own_mosquitto: Broker, receiver: NotifyReceiver) -> None:
    book = tmp_path / "rules.yaml"
    book.write_text(RULEBOOK.format(name="restart-first"))
    config = controller_config(tmp_path / "controller.toml", own_mosquitto, rulebooks=[book])
    own_mosquitto.stop()
    proc = start("controller", config, receiver, tmp_path / "controller.log")
    try:
        waiting = receiver.wait_for(lambda m: "waiting for the broker" in m.get("STATUS"), what="waiting status")
        receiver.collect(1.5)
        assert not any(is_ready(m) for m in receiver.messages), "READY=1 before the broker was up"
        own_mosquitto.start()
        ready = receiver.wait_for(is_ready, after=waiting, what="READY=1")
        assert receiver.messages[ready].get("STATUS").startswith("online: 0/0 nodes online"), receiver.messages[ready]

        check_watchdog(receiver, proc)

        # A broken rulebook: the reload fails whole, the old rules stay.
        book.write_text("rules: [{name: broken}]\n")
        mark = len(receiver.messages)
        proc.send_signal(signal.SIGHUP)
        done = receiver.wait_for(is_ready, after=receiver.wait_for(lambda m: m.get("RELOADING") == "1", after=mark),
                                 what="READY=1 after a failed reload")
        assert "config reload failed" in receiver.messages[done].get("STATUS")

        # A good rulebook and a new chat route apply live; the listen address needs a restart.
        book.write_text(RULEBOOK.format(name="restart-second"))
        notify = '[[controller.notify]]\nkind = "slack"\nurl = "http://127.0.0.1:9/hook"\n'
        text = controller_config(tmp_path / "new.toml", own_mosquitto, rulebooks=[book], notify=notify).read_text()
        config.write_text(text)
        mark = len(receiver.messages)
        proc.send_signal(signal.SIGHUP)
        done = receiver.wait_for(is_ready, after=receiver.wait_for(lambda m: m.get("RELOADING") == "1", after=mark),
                                 what="READY=1 after reload")
        status = receiver.messages[done].get("STATUS")
        assert "applied controller.rulebooks, node keys, controller.notify" in status, status
        assert "restart needed for controller.listen" in status, status
        assert "hook" not in status  # a webhook URL is a secret
        log = (tmp_path / "controller.log").read_text()
        assert '"rules": ["restart-second"]' in log, log[-2000:]

        check_stopping(receiver, proc)
    finally:
        stop(proc)
        own_mosquitto.stop()
