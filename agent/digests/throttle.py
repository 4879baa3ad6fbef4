"""The read-bandwidth limit of one dataset: a token bucket that worker threads wait on.

Called from the hashing thread and the chunk-serving threads alike (one lock),
so scanning and serving together stay under ``read_bandwidth``. The bucket
holds at most one second of budget, so an idle period does not turn into a
burst. Waiting happens on an ``abort`` event, so stopping the agent never
waits out a throttle. Time is injected (``monotonic``) for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Throttle:
    def __init__(self, rate: int, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        """Bytes per second; 0 disables the limit."""
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._tokens = float(rate)
        self._at = monotonic()
        self.waited = 0.0
        """Seconds spent waiting, in total (for tests and logs)."""

    def consume(self, nbytes: int, abort: threading.Event | None = None) -> bool:
        """Account ``nbytes`` just read, waiting as long as the budget requires; False if aborted."""
        if self.rate <= 0:
            return True
        with self._lock:
            now = self._monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= nbytes
            debt = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if debt <= 0:
            return True
        self.waited += debt
        if abort is None:
            time.sleep(debt)
            return True
        return not abort.wait(debt)
