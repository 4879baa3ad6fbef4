"""Logging setup: structlog everywhere, JSON when not on a terminal, key=value on one.

Also the rate limiter that keeps a flood of bad input from becoming a flood of
log lines: ``RateLimiter.allow(source, reason)`` says yes at most once per
``period`` per (source, reason) and counts what it suppressed.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import Any

if "rich" not in sys.modules:
    # structlog.dev imports rich (and pygments) when installed, only for pretty tracebacks on a terminal:
    # ~5 MiB resident in every process (a fifth of a lean agent). Without it, console logs show plain
    # tracebacks (JSON logs are unchanged); the None entry is removed again, so rich stays importable.
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog
    finally:
        del sys.modules["rich"]
else:
    import structlog

from selfheal.config import LogConfig


def configure_logging(config: LogConfig, *, stream: Any = None) -> None:
    """Route structlog (and stdlib logging of libraries) to one stream."""
    out = stream if stream is not None else sys.stderr
    level = getattr(logging, config.level.upper())
    console = config.format == "console" or (config.format == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=out, force=True,
                        format="%(levelname)s %(name)s: %(message)s")


def get_logger(name: str, **bound: Any) -> Any:
    """A lazy logger: it takes the configuration in force when it first logs, not when it is created
    (module-level loggers are created at import, before ``configure_logging`` runs)."""
    return structlog.get_logger(name, **bound)


class RateLimiter:
    """At most one ``allow`` per (source, reason) per ``period`` seconds; bounded memory."""

    def __init__(self, period: float = 60.0, max_keys: int = 4096) -> None:
        self.period = period
        self.max_keys = max_keys
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.suppressed = 0

    def allow(self, source: str, reason: str, now: float) -> bool:
        key = (source, reason)
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self.suppressed += 1
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True
