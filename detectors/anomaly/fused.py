"""The shipped anomaly detector: all-time breakouts, weighed by the history behind them, one alarm per onset.

Built from the parts measured one by one in ``bench/nab.py`` (see
``docs/BENCHMARKS.md``):

    PeakGate(hold 12 h, WarmUp(6 h,
      MaxFusion(
        level:  Breakout                                  — spikes, new highs and lows
        mean:   RollingMean(6 h) → Breakout               — sustained shifts, slow leaks
        daily:  SeasonalResidual(1 d, hourly slots) → Breakout + mean, at 1/8 weight
        weekly: SeasonalResidual(7 d, hourly slots) → Breakout + mean, at 1/8 weight)))

    Breakout = DecayingExtremes(never forget, mature 60 d)

Why this shape. The parameter-free running-extremes rule (1 on a new
all-time high or low) beats most tuned detectors on NAB's held-out files: its
memory is the whole history, so it is quiet once warmed up, and it has no
scale to mis-tune. This detector keeps both and adds:

- a size: the excess over the all-time range divided by the range, so the
  alert threshold is a margin and near-ties stop alarming;
- maturity: that ratio is weighed by ``min(1, history / mature)``. A new
  record on a day of history is ordinary (on a stationary series the n-th
  sample is a record with probability about 2/n); on a month it is news.
  This removed most false alarms early in a stream and made a fresh stream
  quiet without a long warm-up;
- a slower view: the 6-hour mean breaks out when a level shift or a leak
  has not yet made a new single-sample extreme;
- daily and weekly baselines: the residual from the same hour of earlier
  days (weeks) breaks out when the shape of a cycle changes (a busy hour gone
  quiet) while every value stays inside the all-time range. Residuals are
  noisy, so their breakouts count at ``season_weight`` (1/8) of a level
  breakout: only a large change of shape alarms;
- an alarm hold (the peak gate): a condition reports its onset, and again
  only if it escalates within 12 hours. NAB credits only the earliest
  detection per window and charges every false alarm; here an alarm may be a
  restart.

Decaying ranges were measured and dropped (they fired more on held-out files
than they caught); ``half_life`` keeps them available.

Memory: a few dozen floats, the rolling means' 12 bucket sums each, and the
seasonal slots ((24 + 168) hourly slots for ``season_keep`` periods: 768 floats
with the defaults), whatever the sampling rate; plus the peak gate's short
list of undominated peaks.
"""

from __future__ import annotations

from detectors.anomaly.calibration import PeakGate, WarmUp
from detectors.anomaly.extremes import DecayingExtremes
from detectors.anomaly.fusion import MaxFusion
from detectors.anomaly.model import StreamingDetector
from detectors.anomaly.seasonal import SeasonalResidual
from detectors.anomaly.smoothing import RollingMean

DAY = 86400.0
HOUR = 3600.0
SEASONS = {"none": (), "daily": (DAY,), "weekly": (7 * DAY,), "daily+weekly": (DAY, 7 * DAY)}
"""The ``seasons`` choices: which cycle lengths get a seasonal part (slots are one hour wide)."""
SLOT = HOUR


def build_breakout(half_life: float, mean_span: float, mature: float, weight: float = 1.0) -> MaxFusion:
    """Breakouts of the value itself and of its rolling mean over ``mean_span`` seconds."""
    return MaxFusion([
        ("level", DecayingExtremes(half_life, mature=mature, weight=weight)),
        ("mean", RollingMean(DecayingExtremes(half_life, mature=mature, weight=weight), mean_span)),
    ])


def build_fused(*, half_life: float = 0.0, mean_span: float = 6 * HOUR, mature: float = 60 * DAY,
                seasons: str = "daily+weekly", season_weight: float = 1 / 8, season_keep: int = 4,
                season_min_periods: int = 2, hold: float = 12 * HOUR, warmup: float = 6 * HOUR) -> StreamingDetector:
    """The composite above; every duration in seconds.

    ``half_life=0``: ranges are all-time. ``mature=0`` counts every breakout in full however young the
    range. A seasonal part stays silent until a slot has ``season_min_periods`` periods of history, and
    its own maturity counts from then. Nothing scores during the first ``warmup`` seconds of a stream.
    """
    if seasons not in SEASONS:
        raise ValueError(f"seasons: {seasons!r} is not one of {sorted(SEASONS)}")
    parts: list[tuple[str, StreamingDetector]] = [
        ("level", DecayingExtremes(half_life, mature=mature)),
        ("mean", RollingMean(DecayingExtremes(half_life, mature=mature), mean_span)),
    ]
    parts.extend(("daily" if period == DAY else "weekly", SeasonalResidual(
        build_breakout(half_life, mean_span, mature, season_weight), period=period, bins=round(period / SLOT),
        keep=season_keep, min_periods=season_min_periods)) for period in SEASONS[seasons])
    return PeakGate(WarmUp(MaxFusion(parts), warmup), hold)
