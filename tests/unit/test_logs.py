"""Logging: JSON off a terminal, key=value on one; bad-input logs rate-limited per source and reason."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from selfheal.config import LogConfig
from selfheal.logs import RateLimiter, configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logging.basicConfig(force=True)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    configure_logging(LogConfig(), stream=out)
    get_logger("t", node="node-a").warning("message.rejected", reason="spoofed")
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["event"] == "message.rejected"
    assert line["node"] == "node-a"
    assert line["level"] == "warning"
    assert line["timestamp"].endswith("Z")


def test_key_value_on_a_terminal() -> None:
    out = _Tty()
    configure_logging(LogConfig(), stream=out)
    get_logger("t", node="node-a", unit="web").info("unit.started", pid=42)
    text = out.getvalue()
    assert "unit.started" in text
    assert "node=node-a" in text
    assert "pid=42" in text
    assert not text.lstrip().startswith("{")


def test_level_filters() -> None:
    out = io.StringIO()
    configure_logging(LogConfig(level="warning"), stream=out)
    get_logger("t").info("quiet")
    get_logger("t").error("loud")
    assert "quiet" not in out.getvalue()
    assert "loud" in out.getvalue()


def test_rate_limiter_allows_once_per_period_per_source_and_reason() -> None:
    limiter = RateLimiter(period=60.0)
    assert limiter.allow("node-a", "malformed", now=0.0)
    assert not limiter.allow("node-a", "malformed", now=30.0)
    assert limiter.allow("node-a", "spoofed", now=30.0)  # another reason
    assert limiter.allow("node-b", "malformed", now=30.0)  # another source
    assert limiter.allow("node-a", "malformed", now=60.0)  # a minute later
    assert limiter.suppressed == 1


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(period=60.0, max_keys=10)
    for i in range(1000):
        limiter.allow(f"node-{i}", "malformed", now=0.0)
    assert len(limiter._last) == 10
