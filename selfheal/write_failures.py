"""Why an SQLite write failed, said so an operator can act on it, and logged without a flood.

The controller's state store and the agent's command ledger and digest cache keep SQLite files in a
state directory. When its filesystem fills up, SQLite answers "database or disk is full" (SQLITE_FULL:
``write`` said ENOSPC or EDQUOT) and keeps nothing of the transaction; once space returns, the same
connection writes again, so nothing needs reopening. ``failure_reason`` names a failure for a metric label
or a log field, ``explain`` says it with the file's path, and ``WriteFailures`` logs the first refused
write of each reason (then at most once a minute, with how many it kept quiet) and, when a write goes
through again, that writes work again and how many were refused meanwhile.
"""

from __future__ import annotations

import errno
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal, get_args

from selfheal.logs import RateLimiter

Reason = Literal["disk_full", "io_error", "busy", "other"]
REASONS: tuple[Reason, ...] = get_args(Reason)

_BY_CODE: dict[int, Reason] = {
    sqlite3.SQLITE_FULL: "disk_full",
    sqlite3.SQLITE_IOERR: "io_error",
    sqlite3.SQLITE_CANTOPEN: "io_error",
    sqlite3.SQLITE_READONLY: "io_error",
    sqlite3.SQLITE_BUSY: "busy",
    sqlite3.SQLITE_LOCKED: "busy",
}


def failure_reason(exc: BaseException) -> Reason:
    """``disk_full``, ``io_error``, ``busy`` (another connection holds the lock) or ``other``."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return _BY_CODE.get(code & 0xFF, "other") if isinstance(code, int) else "other"
    if isinstance(exc, OSError):
        return "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
    return "other"


def explain(exc: BaseException, path: Path) -> str:
    """What went wrong writing ``path``, with what SQLite or the OS said in parentheses."""
    reason = failure_reason(exc)
    if reason == "disk_full":
        return f"the filesystem holding {path} is full ({exc})"
    if reason == "io_error":
        return f"I/O error on {path} ({exc})"
    if reason == "busy":
        return f"{path} is locked by another connection ({exc})"
    return f"{path}: {exc}"


class WriteFailures:
    """Log lines for writes refused and for writes working again: ``<prefix>_failed``, ``<prefix>_recovered``.

    Thread-safe enough for its callers: each holds its own lock (or runs on one worker) around it.
    """

    def __init__(self, log: Any, prefix: str, path: Path, *, level: str = "error", period: float = 60.0) -> None:
        self.log = log
        self.events = (f"{prefix}_failed", f"{prefix}_recovered")
        self.path = path
        self.level = level
        self.refused = 0
        """Writes refused since the last one that went through."""
        self._since = 0.0
        self._limiter = RateLimiter(period=period)

    def failed(self, exc: BaseException, *, writes: int = 1, **fields: Any) -> Reason:
        """Note ``writes`` writes refused by ``exc``; returns its reason."""
        reason = failure_reason(exc)
        now = time.monotonic()
        if not self.refused:
            self._since = now
        self.refused += writes
        if self._limiter.allow("write", reason, now):
            getattr(self.log, self.level)(self.events[0], reason=reason, error=explain(exc, self.path),
                                          writes=writes, refused_so_far=self.refused,
                                          suppressed_so_far=self._limiter.suppressed, **fields)
        return reason

    def succeeded(self) -> None:
        """A write went through: say so once if writes were refused before it."""
        if self.refused:
            self.log.warning(self.events[1], path=str(self.path), refused=self.refused,
                             failing_for_s=round(time.monotonic() - self._since, 3))
            self.refused = 0
            self._limiter = RateLimiter(period=self._limiter.period)  # the next outage is told at once
