"""Health probes of units: http, tcp and exec checks, each on its own interval.

Two halves. ``ProbeTracker`` is the pure state machine: it takes each check's
result and the loop time, counts consecutive failures, ignores failures during
the ``start_period`` after a (re)start (a success ends the start period early,
like Docker's health checks), and says when the verdict changed. A unit is
unhealthy once ``consecutive_failures >= failures``. No verdict exists until the
first success or the first full run of failures, so a unit that just started
is never called unhealthy (or healthy) on one sample.

``ProbeRunner`` is the thin edge: it runs the checks with their timeout and
emits ``ProbeChanged`` on the first verdict and on every healthy<->unhealthy
flip. During the start period after a (re)start it probes at a fast cadence
(``min(interval, 0.2s)``) until the first success, so a recovery is seen within
a fraction of a second instead of a whole interval; failures are then counted
at the configured interval.

An ``exec`` check runs with the agent's environment minus its secrets
(``agent.workload.unit_environment``: no ``SELFHEAL_*``, no
``CREDENTIALS_DIRECTORY``, no ``NOTIFY_SOCKET``) and, for a unit with a
``user``, as that user: a script the workload can write must not run with the
agent's rights.

An ``http`` check of a plain ``http://`` URL is one short HTTP/1.1 GET on its
own connection (``Connection: close``, like Kubernetes' probes), read up to
its status line, headers and a small body: httpx (a connection pool, an SSL
context with the CA bundle, h11 and anyio, ~6 MiB resident) loads only for an
``https://`` target or a URL the short path does not take (user info,
non-ASCII).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack, suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent.workload import Account, resolve_user, switch_args, unit_environment
from selfheal.clocks import Clock
from selfheal.config import ProbeConfig
from selfheal.config_checks import split_host_port
from selfheal.errors import SelfhealError
from selfheal.logs import get_logger
from selfheal.wire import EventBody, ProbeChanged, ProbeState

if TYPE_CHECKING:
    import httpx

MAX_HEAD = 64 * 1024
"""Bytes of status line and headers a plain HTTP check reads at most."""
MAX_DRAINED = 64 * 1024
"""A body up to this size (by ``Content-Length``) is read before closing; a longer one is not waited for."""

FAST_CADENCE = 0.2
"""Seconds between probes right after a (re)start, until the first verdict."""
MAX_ERROR_CHARS = 200


class ProbeTracker:
    """Pure probe state: feed it results with the loop time; it says when the verdict changes."""

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self.consecutive_failures = 0
        self.state: ProbeState | None = None
        self._start_until = 0.0
        self._proven = False

    def restarted(self, now: float) -> None:
        """The unit (re)started at loop time ``now``: a new start period, failures forgotten.

        The last verdict stays until a new one is reached, so a flip is still a flip.
        """
        self._start_until = now + self.config.start_period
        self._proven = False
        self.consecutive_failures = 0

    def in_start_period(self, now: float) -> bool:
        return not self._proven and now < self._start_until


    def record(self, *, ok: bool, now: float, wall: float, error: str = "",
               latency: float = 0.0) -> ProbeState | None:
        """Take one check result; returns the new state when the verdict appeared or flipped."""
        previous = self.state
        if ok:
            self._proven = True
            self.consecutive_failures = 0
            healthy: bool | None = True
        elif self.in_start_period(now):
            healthy = previous.healthy if previous is not None else None
        else:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.config.failures:
                healthy = False
            else:
                healthy = previous.healthy if previous is not None else None
        if healthy is None:
            return None
        self.state = ProbeState(
            kind=self.config.kind, healthy=healthy, consecutive_failures=self.consecutive_failures,
            failures_threshold=self.config.failures, last_error="" if ok else error[:MAX_ERROR_CHARS],
            last_latency_s=round(latency, 6), checked_at=wall,
        )
        if previous is None or previous.healthy != healthy:
            return self.state
        return None


class ProbeRunner:
    """Runs one unit's probe until stopped; ``unit_started`` restarts its start period."""

    def __init__(self, unit: str, config: ProbeConfig, *, emit: Callable[[EventBody], None],
                 clock: Clock, node_id: str = "", active: Callable[[], bool] | None = None,
                 user: str | None = None) -> None:
        self.unit = unit
        self.user = user
        """Kind ``exec``: the unit's ``user``, whom the check runs as."""
        self.active = active
        """Whether the unit runs now; no checks while it does not (a standby copy, a stopped unit)."""
        self.config = config
        self.emit = emit
        self.clock = clock
        self.tracker = ProbeTracker(config)
        self.checks = 0
        self._restarted = asyncio.Event()
        self.log = get_logger("agent.probe", node=node_id, unit=unit)

    @property
    def state(self) -> ProbeState | None:
        return self.tracker.state

    def unit_started(self) -> None:
        self._restarted.set()

    async def run(self, *, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        fast = min(self.config.interval, FAST_CADENCE)
        async with AsyncExitStack() as stack:
            client = None
            if self.config.kind == "http" and _plain_http(str(self.config.target)) is None:
                import httpx  # noqa: PLC0415 - only an https (or unusual) target needs it

                # trust_env=False: a proxy from the environment must not sit between us and a local unit.
                client = await stack.enter_async_context(
                    httpx.AsyncClient(trust_env=False, follow_redirects=False))
            next_at = loop.time() + fast
            while not stop.is_set():
                await _wait_any((stop, self._restarted), max(0.0, next_at - loop.time()))
                if stop.is_set():
                    return
                if self._restarted.is_set():
                    self._restarted.clear()
                    self.tracker.restarted(loop.time())
                    next_at = loop.time() + fast
                    continue
                if loop.time() < next_at:
                    continue
                if self.active is not None and not self.active():
                    next_at = loop.time() + fast
                    continue
                began = loop.time()
                ok, error, latency = await self.check(client)
                self.checks += 1
                now = loop.time()
                changed = self.tracker.record(ok=ok, now=now, wall=self.clock.wall(), error=error,
                                              latency=latency)
                if changed is not None:
                    self.log.info("probe.changed", healthy=changed.healthy, error=changed.last_error,
                                  consecutive_failures=changed.consecutive_failures)
                    self.emit(ProbeChanged(unit=self.unit, probe=changed))
                # A fixed cadence from the start of each check, like Kubernetes' periodSeconds: a probe
                # that times out does not stretch the period, so a hang is confirmed in about
                # interval x failures, not (interval + timeout) x failures.
                period = fast if self.tracker.in_start_period(now) else self.config.interval
                next_at = max(now, began + period)

    async def check(self, client: httpx.AsyncClient | None = None) -> tuple[bool, str, float]:
        """Run the check once: (ok, error, latency seconds). Never raises."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            async with asyncio.timeout(self.config.timeout):
                ok, error = await self._check(client)
        except TimeoutError:
            ok, error = False, f"timeout after {self.config.timeout}s"
        except _check_errors() as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        return ok, error, loop.time() - began

    async def _check(self, client: httpx.AsyncClient | None) -> tuple[bool, str]:
        target = self.config.target
        if self.config.kind == "http":
            if (plain := _plain_http(str(target))) is not None:
                return await _check_plain_http(*plain)
            if client is None:
                import httpx  # noqa: PLC0415

                async with httpx.AsyncClient(trust_env=False) as own:
                    return await _check_http(own, str(target))
            return await _check_http(client, str(target))
        if self.config.kind == "tcp":
            return await _check_tcp(str(target))
        argv = target if isinstance(target, list) else [target]
        account = None if self.user is None else await asyncio.to_thread(resolve_user, self.user)
        return await _check_exec(argv, account)


async def _check_http(client: httpx.AsyncClient, url: str) -> tuple[bool, str]:
    response = await client.get(url)
    if response.status_code < 400:
        return True, ""
    return False, f"HTTP {response.status_code}"


def _check_errors() -> tuple[type[Exception], ...]:
    """What a failed check raises: httpx's errors too once it is loaded (an https target)."""
    httpx: Any = sys.modules.get("httpx")
    base: tuple[type[Exception], ...] = (OSError, ValueError, SelfhealError)
    return base if httpx is None else (*base, httpx.HTTPError, httpx.InvalidURL)


def _plain_http(url: str) -> tuple[str, int, str, str] | None:
    """(host, port, Host header, request target) of a plain ``http://`` URL the short path takes, else None."""
    if not url.isascii() or any(c in url for c in " \r\n\t"):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() != "http" or not parts.hostname or "@" in parts.netloc:
        return None
    host = parts.hostname
    header = f"[{host}]" if ":" in host else host
    if port is not None:
        header = f"{header}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port if port is not None else 80, header, path


class ConnectError(OSError):
    """No connection to an http target (named like httpx's, so the probe's ``last_error`` reads the same)."""


async def _check_plain_http(host: str, port: int, header: str, path: str) -> tuple[bool, str]:
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
    except OSError as exc:
        raise ConnectError(str(exc) or type(exc).__name__) from exc
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {header}\r\nAccept: */*\r\nUser-Agent: selfheal-probe\r\n"
                     f"Connection: close\r\n\r\n".encode("ascii"))
        await writer.drain()
        while True:
            status = await reader.readline()
            version, _, rest = status.partition(b" ")
            code = rest[:3]
            if not version.startswith(b"HTTP/") or not code.isdigit():
                raise ConnectionError(f"not an HTTP response: {status[:80]!r}")
            length = await _skip_headers(reader)
            if not 100 <= int(code) < 200:
                break
        if 0 < length <= MAX_DRAINED:
            await reader.readexactly(length)
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    if int(code) < 400:
        return True, ""
    return False, f"HTTP {int(code)}"


async def _skip_headers(reader: asyncio.StreamReader) -> int:
    """Read the headers up to the blank line; the ``Content-Length`` (0 when absent or unreadable)."""
    length, read = 0, 0
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        read += len(line)
        if read > MAX_HEAD:
            raise ConnectionError("response headers too long")
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    return length


async def _check_tcp(target: str) -> tuple[bool, str]:
    host, port = split_host_port(target, what="probe.target")
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    await writer.wait_closed()
    return True, ""


async def _check_exec(argv: list[str], account: Account | None = None) -> tuple[bool, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=unit_environment(os.environ, account=account), **switch_args(account))
    try:
        returncode = await proc.wait()
    except asyncio.CancelledError:  # the timeout: do not leave the check running
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        raise
    if returncode == 0:
        return True, ""
    return False, f"exit code {returncode}" if returncode > 0 else f"killed by signal {-returncode}"


async def _wait_any(events: tuple[asyncio.Event, ...], seconds: float) -> None:
    """Return when any event is set or after ``seconds``."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
