"""One webhook delivery: rate limit, POST, retry what may succeed later, give up on what will not.

Retried (exponential backoff with jitter, through tenacity): 408, 429, 5xx,
timeouts and connection errors; a ``Retry-After`` header (seconds or an HTTP
date) or a formatter-specific hint (Discord's ``retry_after`` body field) sets
the wait instead of the backoff. Any other 4xx (and 3xx) is final: the reason is
returned and logged, never retried. Every attempt is reported to ``on_attempt``
so the router can write it into the audit trail.

Webhook URLs are secrets. Nothing here puts a URL in a log line, a reason or
an exception text: reasons are built from the status and a scrubbed excerpt of
the response body, logs show ``redact(url)`` (scheme and host only), and
httpx's own request log lines are rewritten by ``RedactingFilter``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from controller.notify.model import Formatter
from selfheal.clocks import Clock

Sleep = Callable[[float], Awaitable[None]]


def redact(url: str) -> str:
    """``https://hooks.slack.com/…``: enough to tell destinations apart in a log, nothing secret."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}/…"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret URL redacted, and any stray copy of its path or query replaced by ``…``."""
    for secret in secrets:
        parsed = httpx.URL(secret)
        text = text.replace(secret, redact(secret))
        for part in (parsed.raw_path.decode("ascii", "replace"), parsed.query.decode("ascii", "replace")):
            if len(part) > 1:
                text = text.replace(part, "…")
    return text


class RedactingFilter(logging.Filter):
    """Rewrites log records (httpx logs every request with its full URL at INFO) to hide webhook URLs."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After``: delta seconds or an HTTP date (RFC 9110 §10.2.3); ``now`` is wall time."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def header_retry_after(response: httpx.Response, now: float) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"), now)


class TokenBucket:
    """``per_minute`` messages on average, ``burst`` at once; ``reserve`` takes a token and says how long to wait."""

    def __init__(self, per_minute: float, burst: int, now: float) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def reserve(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int
    result: Literal["sent", "retry", "rejected", "failed"]
    status: int | None
    reason: str
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Literal["sent", "rejected", "failed"]
    """``sent`` (2xx), ``rejected`` (a final 3xx/4xx: retrying will not help), ``failed`` (retries spent)."""
    attempts: int
    status: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_initial: float = 1.0
    """Seconds before the first retry; doubles each time, plus up to ``jitter`` seconds."""
    backoff_max: float = 60.0
    jitter: float = 1.0
    max_retry_after: float = 300.0
    """A service asking for a longer wait gets this much."""


class _Retryable(Exception):
    def __init__(self, status: int | None, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.retry_after = status, reason, retry_after


class _Final(Exception):
    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


async def deliver(client: httpx.AsyncClient, url: str, body: bytes, *, formatter: Formatter, bucket: TokenBucket,
                  clock: Clock, policy: RetryPolicy, timeout: float, sleep: Sleep,
                  on_attempt: Callable[[Attempt], Awaitable[None]]) -> Result:
    """POST ``body`` to ``url`` until it is accepted, refused for good, or the attempts are spent."""
    backoff = (wait_exponential(multiplier=policy.backoff_initial, max=policy.backoff_max)
               + wait_random(0, policy.jitter))

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, _Retryable) and error.retry_after is not None:
            return min(error.retry_after, policy.max_retry_after)
        return float(backoff(state))

    async def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        assert isinstance(error, _Retryable)  # noqa: S101 - only _Retryable is retried
        retry_in = state.next_action.sleep if state.next_action is not None else None
        await on_attempt(Attempt(state.attempt_number, "retry", error.status, error.reason, retry_in))

    async def post_once() -> int:
        delay = bucket.reserve(clock.monotonic())
        if delay > 0:
            await sleep(delay)
        try:
            response = await client.post(url, content=body, timeout=timeout,
                                         headers={"content-type": "application/json"})
        except httpx.TimeoutException as exc:
            raise _Retryable(None, f"timed out ({type(exc).__name__})") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Retryable(None, f"connection error ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise _Final(None, f"request error ({type(exc).__name__})") from None
        status = response.status_code
        if 200 <= status < 300:
            return status
        excerpt = " ".join(scrub(response.text, [url]).split())[:200]
        reason = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
        if status in (408, 429) or status >= 500:
            raise _Retryable(status, reason, formatter.retry_after(response, clock.wall()))
        raise _Final(status, reason)

    retrying = AsyncRetrying(stop=stop_after_attempt(policy.max_attempts), wait=wait, sleep=sleep,
                             retry=retry_if_exception_type(_Retryable), before_sleep=before_sleep, reraise=True)
    number = 0
    try:
        async for attempt in retrying:
            number = attempt.retry_state.attempt_number
            with attempt:
                status = await post_once()
    except _Retryable as exc:
        await on_attempt(Attempt(number, "failed", exc.status, exc.reason))
        return Result("failed", number, exc.status, f"gave up after {number} attempts: {exc.reason}")
    except _Final as exc:
        await on_attempt(Attempt(number, "rejected", exc.status, exc.reason))
        return Result("rejected", number, exc.status, exc.reason)
    await on_attempt(Attempt(number, "sent", status, f"HTTP {status}"))
    return Result("sent", number, status, f"HTTP {status}")
