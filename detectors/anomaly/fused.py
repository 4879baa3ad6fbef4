"""The shipped anomaly detector: decaying extremes of the value, its hourly mean and its weekly residual.

Built from the parts measured one by one in ``bench/nab.py`` (see
``docs/BENCHMARKS.md``), in the configuration chosen on NAB half A only:

    PeakGate(hold 6 h,
      MaxFusion(
        level:    DecayingExtremes(half-life 7 d)                       — spikes, new highs/lows
        mean:     RollingMean(1 h) → DecayingExtremes(7 d)              — sustained shifts
        seasonal: SeasonalResidual(week, 168 hourly slots, 4 weeks) →   — breaks of the weekly cycle
                    max(DecayingExtremes(7 d), RollingMean(1 h) → DecayingExtremes(7 d))))

Every part scores a breakout the same way (excess over the recent range,
divided by the range), so their maximum is a fair fusion. The peak gate
reports the onset of a condition, not every sample of it. State per series:
about 700 floats, dominated by the weekly slots; the detector never grows.
"""

from __future__ import annotations

from detectors.anomaly.calibration import PeakGate
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


def build_fused(*, half_life: float = 7 * DAY, mean_span: float = HOUR, season_period: float = 7 * DAY,
                season_bins: int = 168, season_keep: int = 4, season_min_periods: int = 2,
                hold: float = 6 * HOUR) -> StreamingDetector:
    """The composite above; every duration in seconds. ``season_period=0`` drops the seasonal part."""
    parts: list[tuple[str, StreamingDetector]] = [
        ("level", DecayingExtremes(half_life)),
        ("mean", RollingMean(DecayingExtremes(half_life), mean_span)),
    ]
    if season_period > 0:
        parts.append(("seasonal", SeasonalResidual(
            build_breakout(half_life, mean_span), period=season_period, bins=season_bins, keep=season_keep,
            min_periods=season_min_periods)))
    return PeakGate(MaxFusion(parts), hold)
