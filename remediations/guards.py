"""Guards: pure checks that say whether a plan may run now, and if not, why and until when."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hold:
    """Not now: try again at ``until`` (wall time)."""

    guard: str
    reason: str
    until: float


@dataclass(frozen=True, slots=True)
class Refuse:
    """Not for this incident, ever: it is handed to a human."""

    guard: str
    reason: str


def check_cooldown(last_attempt_at: float | None, min_interval: float, now: float) -> Hold | None:
    """At most one attempt per ``min_interval`` seconds on the same target."""
    if last_attempt_at is None:
        return None
    ready_at = last_attempt_at + min_interval
    if now >= ready_at:
        return None
    return Hold("cooldown", f"last attempt {now - last_attempt_at:.1f}s ago, minimum interval "
                            f"{min_interval:g}s", ready_at)


def check_max_attempts(attempts: Sequence[float], max_attempts: int) -> Refuse | None:
    """No more than ``max_attempts`` attempts per incident."""
    if len(attempts) < max_attempts:
        return None
    return Refuse("max_attempts", f"{len(attempts)} attempts made, the rule allows {max_attempts}")
