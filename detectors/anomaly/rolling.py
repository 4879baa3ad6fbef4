"""A time-based rolling window with order statistics: median, quantiles and MAD in O(log n).

Robust detectors compare each sample with the median and the median absolute
deviation (MAD) of the samples of the last ``horizon`` seconds. The window
keeps its values sorted (``bisect``), so the median is a lookup; the MAD is the
k-th smallest of two sorted deviation sequences (below and above the median),
found by binary search instead of a pass over the window. Memory is bounded
twice: by time (``horizon``) and by count (``max_samples``, oldest out first).
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from detectors.anomaly.state import RollingWindowState, check_length


class RollingWindow:
    """Samples of the last ``horizon`` seconds, at most ``max_samples`` of them."""

    __slots__ = ("_sorted", "_times", "_values", "horizon", "max_samples")

    def __init__(self, horizon: float, max_samples: int) -> None:
        if horizon <= 0 or max_samples < 1:
            raise ValueError("a rolling window needs a positive horizon and max_samples >= 1")
        self.horizon = horizon
        self.max_samples = max_samples
        self._times: deque[float] = deque()
        self._values: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._sorted)

    def span(self) -> float:
        """Seconds between the oldest and the newest sample held (0 with fewer than two)."""
        return self._times[-1] - self._times[0] if len(self._times) > 1 else 0.0

    def expire(self, now: float) -> None:
        """Forget samples older than ``now - horizon``."""
        cutoff = now - self.horizon
        while self._times and self._times[0] <= cutoff:
            self._drop_oldest()

    def add(self, ts: float, value: float) -> None:
        """Append a sample (``ts`` not before the newest held) and evict what falls out."""
        self.expire(ts)
        self._times.append(ts)
        self._values.append(value)
        bisect.insort(self._sorted, value)
        while len(self._sorted) > self.max_samples:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._times.popleft()
        old = self._values.popleft()
        del self._sorted[bisect.bisect_left(self._sorted, old)]

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile ``q`` in ``[0, 1]`` (NaN when empty)."""
        values = self._sorted
        if not values:
            return math.nan
        position = q * (len(values) - 1)
        low = int(position)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)

    def median(self) -> float:
        return self.quantile(0.5)

    def mad(self) -> float:
        """Median absolute deviation from the median (NaN when empty)."""
        values = self._sorted
        n = len(values)
        if n == 0:
            return math.nan
        centre = self.median()
        split = bisect.bisect_left(values, centre)
        if n % 2:
            return _kth_deviation(values, centre, split, n // 2)
        return 0.5 * (_kth_deviation(values, centre, split, n // 2 - 1)
                      + _kth_deviation(values, centre, split, n // 2))

    def rank_above(self, value: float) -> int:
        """How many held values are ``>= value``."""
        return len(self._sorted) - bisect.bisect_left(self._sorted, value)

    def to_state(self) -> RollingWindowState:
        return RollingWindowState(times=list(self._times), values=list(self._values))

    def load_state(self, state: RollingWindowState) -> None:
        """Take the samples (times in order, no more than ``max_samples``); the sorted view is rebuilt."""
        check_length("window times", state.times, exactly=len(state.values))
        check_length("window values", state.values, at_most=self.max_samples)
        if any(later < earlier for earlier, later in zip(state.times, state.times[1:], strict=False)):
            raise ValueError("window times are not in order")
        self._times, self._values = deque(state.times), deque(state.values)
        self._sorted = sorted(state.values)


def _kth_deviation(values: list[float], centre: float, split: int, k: int) -> float:
    """The k-th smallest (0-based) of ``|v - centre|`` over sorted ``values``.

    Deviations below the split, read leftwards, ascend; so do those from the
    split rightwards. The k-th of their union is found by binary search over how
    many come from the lower side (the classic "k-th of two sorted arrays").
    """
    lower_count, upper_count = split, len(values) - split

    def lower(i: int) -> float:  # i-th smallest deviation among values below the split
        return centre - values[split - 1 - i]

    def upper(j: int) -> float:
        return values[split + j] - centre

    take = k + 1
    lo, hi = max(0, take - upper_count), min(take, lower_count)
    while lo < hi:
        from_lower = (lo + hi) // 2
        from_upper = take - from_lower
        if from_upper > 0 and lower(from_lower) < upper(from_upper - 1):
            lo = from_lower + 1
        else:
            hi = from_lower
    from_upper = take - lo
    best = -math.inf
    if lo > 0:
        best = lower(lo - 1)
    if from_upper > 0:
        best = max(best, upper(from_upper - 1))
    return best
