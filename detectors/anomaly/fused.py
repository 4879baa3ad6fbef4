"""The shipped anomaly detector: all-time breakouts of the value and of its 6-hour mean, one alarm per onset.

Built from the parts measured one by one in ``bench/nab.py`` (see
``docs/BENCHMARKS.md``):

    PeakGate(hold 12 h, WarmUp(6 h,
      MaxFusion(
        level: DecayingExtremes(never forget)                    — spikes, new highs/lows
        mean:  RollingMean(6 h) → DecayingExtremes(never forget)  — sustained shifts, slow leaks)))

Why this shape. The parameter-free running-extremes rule (1 on a new
all-time high or low) beat every earlier composite on NAB's held-out half,
for two reasons: its memory is the whole history, so after warm-up it is
quiet; and it has no scale to mis-tune. This detector keeps both and adds
what running extremes lacks: a size (excess over the all-time range, divided
by the range, so the alert threshold is a margin and near-ties stop
alarming), a slower view (the 6-hour mean breaks out when a level shift or a
leak has not yet made a new single-sample extreme), and an alarm hold (the
peak gate: a condition reports its onset, and again only if it escalates
within 12 hours; NAB credits only the earliest detection per window and
charges every false alarm, and here an alarm may be a restart). Decaying
ranges and a weekly seasonal baseline were measured and dropped: both fired
more on the held-out half than they caught (they stay available through
``half_life`` and ``season_period``).

Memory: a handful of floats and the rolling mean's 12 bucket sums (about 50
floats), plus the peak gate's short list of undominated peaks; with
``season_period`` set, ``season_bins * season_keep`` more.
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


def build_breakout(half_life: float, mean_span: float) -> MaxFusion:
    """Breakouts of the value itself and of its rolling mean over ``mean_span`` seconds."""
    return MaxFusion([
        ("level", DecayingExtremes(half_life)),
        ("mean", RollingMean(DecayingExtremes(half_life), mean_span)),
    ])


def build_fused(*, half_life: float = 0.0, mean_span: float = 6 * HOUR, season_period: float = 0.0,
                season_bins: int = 168, season_keep: int = 4, season_min_periods: int = 2,
                hold: float = 12 * HOUR, warmup: float = 6 * HOUR) -> StreamingDetector:
    """The composite above; every duration in seconds.

    ``half_life=0``: ranges are all-time. ``season_period > 0`` adds a breakout of the residual from the
    same slot of earlier periods (off by default: it lost on NAB's held-out half). Nothing scores during the
    first ``warmup`` seconds of a stream (shorter than NAB's probation on every file, so NAB's figures do not
    see it; live, a new stream would otherwise alarm on its second sample).
    """
    parts: list[tuple[str, StreamingDetector]] = [
        ("level", DecayingExtremes(half_life)),
        ("mean", RollingMean(DecayingExtremes(half_life), mean_span)),
    ]
    if season_period > 0:
        parts.append(("seasonal", SeasonalResidual(
            build_breakout(half_life, mean_span), period=season_period, bins=season_bins, keep=season_keep,
            min_periods=season_min_periods)))
    return PeakGate(WarmUp(MaxFusion(parts), warmup), hold)
