"""Streaming anomaly detectors: table-driven, time injected with each sample, no NAB data needed."""

from __future__ import annotations

import math
import pickle
import random
import statistics
import tracemalloc
from collections.abc import Iterable, Mapping

import pytest

from detectors.anomaly.calibration import PeakGate, TailCalibrated
from detectors.anomaly.ewma import EwmaZ
from detectors.anomaly.extremes import DecayingExtremes, RunningExtremes
from detectors.anomaly.forecast import ExhaustionForecast
from detectors.anomaly.model import OrderedInput, StreamingDetector, squash_z
from detectors.anomaly.policy import AlertPolicySpec
from detectors.anomaly.registry import build_detector, default_registry
from detectors.anomaly.robust import RobustZ
from detectors.anomaly.rolling import RollingWindow
from detectors.anomaly.seasonal import SeasonalResidual
from detectors.anomaly.smoothing import Resampled, RollingMean

STEP = 300.0
THRESHOLD = AlertPolicySpec().threshold  # the shipped alert threshold for fused
T0 = 1_700_000_000.0


def feed(detector: StreamingDetector, values: Iterable[float], step: float = STEP, start: float = T0) -> list[float]:
    return [detector.update(start + i * step, v) for i, v in enumerate(values)]


def noise(n: int, seed: int = 1, level: float = 10.0, spread: float = 1.0) -> list[float]:
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    return [level + rng.gauss(0.0, spread) for _ in range(n)]


# --- rolling window -----------------------------------------------------------------------------


def test_rolling_median_and_mad_match_a_brute_force_computation() -> None:
    rng = random.Random(3)  # noqa: S311 - test data, not secrets
    for _ in range(300):
        window = RollingWindow(horizon=1e9, max_samples=1000)
        values = [rng.choice([rng.random(), float(rng.randint(0, 3))]) for _ in range(rng.randint(1, 25))]
        for i, value in enumerate(values):
            window.add(float(i), value)
        median = statistics.median(values)
        assert window.median() == pytest.approx(median)
        assert window.mad() == pytest.approx(statistics.median(abs(v - median) for v in values))


def test_rolling_window_forgets_by_time_and_by_count() -> None:
    window = RollingWindow(horizon=10.0, max_samples=3)
    for ts, value in [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]:
        window.add(ts, value)
    assert len(window) == 3
    assert window.median() == 3.0
    window.expire(12.5)
    assert len(window) == 1  # only the sample at t=3 is younger than 10 s
    assert math.isnan(RollingWindow(1.0, 1).median())


# --- extremes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "expected"), [
    ([5, 6, 4, 5, 7], [0, 1, 1, 0, 1]),
    ([1, 1, 1], [0, 0, 0]),
    ([3, 2, 2.5, 2], [0, 1, 0, 0]),
])
def test_running_extremes_fire_on_new_highs_and_lows_only(values: list[float], expected: list[float]) -> None:
    assert feed(RunningExtremes(), values) == expected


def test_decaying_extremes_score_the_size_of_the_breakout() -> None:
    detector = DecayingExtremes(half_life=1e12)  # no decay: the range is the all-time range
    scores = feed(detector, [0.0, 10.0, 5.0, 11.0, 20.0, 15.0])
    assert scores[2] == 0.0
    assert scores[3] == pytest.approx(0.1 / 1.1)  # 1 over a range of 10
    assert scores[4] == pytest.approx((9 / 11) / (1 + 9 / 11))
    assert scores[5] == 0.0
    assert detector.evidence()["high"] == pytest.approx(20.0)


def test_decaying_extremes_forget_an_old_spike() -> None:
    day = 86400.0
    values = [*noise(100), 100.0, *noise(2000, seed=2)]  # a spike, then a week of quiet
    detector = DecayingExtremes(half_life=day)
    feed(detector, values)
    later = detector.update(T0 + len(values) * STEP, 30.0)
    masked = RunningExtremes()
    feed(masked, values)
    assert later > 0.3
    assert masked.update(T0 + len(values) * STEP, 30.0) == 0.0


def test_extremes_weigh_a_breakout_by_the_history_behind_the_range() -> None:
    day = 86400.0
    young, old = DecayingExtremes(0.0, mature=30 * day), DecayingExtremes(0.0, mature=30 * day)
    feed(young, [0.0, 10.0], step=day)  # a range of 10
    feed(old, [0.0, 10.0], step=30 * day)  # the same range, 30 days old
    # A whole range beyond (r = 1) on two days of history earns 2/30 of a mature range's credit.
    assert young.update(T0 + 2 * day, 20.0) == pytest.approx((2 / 30) / (1 + 2 / 30))
    assert old.update(T0 + 60 * day + 1, 20.0) == pytest.approx(0.5)  # a whole range beyond: r = 1
    assert young.evidence()["history_s"] == pytest.approx(2 * day)


def test_extremes_weight_and_a_flat_range() -> None:
    weighted = DecayingExtremes(0.0, weight=0.25)
    feed(weighted, [0.0, 10.0])
    assert weighted.update(T0 + 2 * STEP, 20.0) == pytest.approx(0.25 / 1.25)
    flat_range = DecayingExtremes(0.0, mature=10 * STEP)
    feed(flat_range, [5.0] * 5)  # a flat series for 4 steps of its 10-step maturity
    assert flat_range.update(T0 + 5 * STEP, 6.0) == pytest.approx(0.5)  # credit 5/10, no ratio to size
    with pytest.raises(ValueError, match="weight"):
        DecayingExtremes(0.0, weight=0.0)


# --- robust z and EWMA --------------------------------------------------------------------------


@pytest.mark.parametrize(("on", "tail", "expect_high"), [
    ("level", [30.0], True),            # a spike
    ("level", [10.5], False),           # ordinary noise
    ("diff", [10.0, 25.0], True),       # a sudden step
])
def test_robust_z_separates_outliers_from_noise(on: str, tail: list[float], expect_high: bool) -> None:
    detector = RobustZ(window=86400.0, on=on)  # type: ignore[arg-type]
    scores = feed(detector, [*noise(300), *tail])
    assert (scores[-1] > 0.6) is expect_high
    assert max(scores[:40]) < 1.0


def test_robust_z_on_a_flat_line_still_scores_a_change() -> None:
    scores = feed(RobustZ(min_samples=10), [5.0] * 50 + [5.5])
    assert scores[-1] > 0.99


def test_robust_z_with_recent_median_ignores_a_single_spike_but_sees_a_shift() -> None:
    spike = feed(RobustZ(recent=5), [*noise(300), 40.0, *noise(3, seed=9)])
    shift = feed(RobustZ(recent=5), [*noise(300), *noise(4, seed=9, level=40.0)])
    assert max(spike[-4:]) < 0.6
    assert shift[-1] > 0.8


def test_ewma_z_flags_a_jump_and_then_adapts() -> None:
    detector = EwmaZ(half_life=3600.0)
    scores = feed(detector, [*noise(300), *noise(300, seed=5, level=30.0)])
    assert scores[300] > 0.8
    assert scores[-1] < 0.6
    assert set(detector.evidence()) == {"z", "mean", "std"}


# --- seasonal, smoothing, calibration -----------------------------------------------------------


def cycle(periods: int, per: int = 10, bump: dict[int, float] | None = None) -> list[float]:
    values = [float(i % per) for i in range(periods * per)]
    for index, value in (bump or {}).items():
        values[index] = value
    return values


def test_seasonal_residual_is_silent_until_enough_periods_then_sees_a_break_in_the_cycle() -> None:
    inner = RunningExtremes()
    detector = SeasonalResidual(inner, period=10 * STEP, bins=10, keep=4, min_periods=2)
    normal = feed(detector, cycle(6), start=0.0)
    assert normal[:20] == [0.0] * 20  # not enough history yet
    assert max(normal) == 0.0  # the cycle itself is not anomalous
    broken = SeasonalResidual(RunningExtremes(), period=10 * STEP, bins=10, keep=4, min_periods=2)
    scores = feed(broken, cycle(6, bump={52: 9.0}), start=0.0)  # 9 where the cycle says 2: in range, off-cycle
    assert scores[52] == 1.0
    assert broken.evidence()["expected"] == 9.0 or scores[52] == 1.0


def test_rolling_mean_waits_for_a_full_span_and_averages() -> None:
    seen: list[float] = []

    class Spy:
        def update(self, ts: float, value: float) -> float:
            seen.append(value)
            return 0.0

        def evidence(self) -> dict[str, float | str]:
            return {}

    feed(RollingMean(Spy(), span=4 * STEP, buckets=4), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], start=0.0)
    assert seen == [3.5, 4.5]  # from t = span on: the mean of the 4 samples in (t - span, t]


def test_resampled_feeds_one_mean_per_step_at_the_end_of_its_bucket() -> None:
    seen: list[tuple[float, float]] = []

    class Spy:
        def update(self, ts: float, value: float) -> float:
            seen.append((ts, value))
            return value / 10

        def evidence(self) -> dict[str, float | str]:
            return {}

    scores = feed(Resampled(Spy(), step=60.0), [1.0, 3.0, 5.0, 7.0, 9.0], step=30.0, start=0.0)
    assert seen == [(60.0, 2.0), (120.0, 6.0)]
    assert scores == [0.0, 0.0, 0.2, 0.2, 0.6]


def test_peak_gate_reports_the_onset_and_escalations_only() -> None:
    class Replay:
        def __init__(self, scores: list[float]) -> None:
            self.scores = iter(scores)

        def update(self, ts: float, value: float) -> float:
            return next(self.scores)

        def evidence(self) -> dict[str, float | str]:
            return {}

    raw = [0.0, 0.6, 0.6, 0.5, 0.7, 0.0, 0.6]
    gated = feed(PeakGate(Replay(raw), hold=3 * STEP), [0.0] * len(raw))
    assert gated == [0.0, 0.6, 0.0, 0.0, 0.7, 0.0, 0.0]
    later = feed(PeakGate(Replay([0.6, 0.0, 0.0, 0.0, 0.6]), hold=3 * STEP), [0.0] * 5)
    assert later == [0.6, 0.0, 0.0, 0.0, 0.6]  # the first peak has left the hold window


def test_tail_calibration_maps_a_raw_score_to_its_rank_in_recent_history() -> None:
    detector = TailCalibrated(RobustZ(), history=200, min_history=100)
    scores = feed(detector, [*noise(400), 40.0])
    assert scores[:100] == [0.0] * 100  # silent until 100 raw scores are held
    assert scores[-1] == pytest.approx(1 - 1 / 201)
    assert statistics.mean(scores[200:400]) == pytest.approx(0.5, abs=0.1)


# --- forecast -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate_per_hour", "limit", "direction", "expected"), [
    (10.0, 120.0, "above", 0.5),      # at 60 after the hour: 60 to go at 10/h = 6 h = the horizon
    (10.0, 90.0, "above", 6 / 9),     # 30 to go: 3 h
    (10.0, 40.0, "above", 1.0),       # already past
    (-10.0, 110.0, "above", 0.0),     # moving away: never
    (-10.0, -20.0, "below", 0.5),     # at 40: 60 down to go at 10/h
])
def test_forecast_scores_time_to_exhaustion_against_the_horizon(
        rate_per_hour: float, limit: float, direction: str, expected: float) -> None:
    detector = ExhaustionForecast(limit, horizon=6 * 3600.0, window=3600.0, direction=direction)  # type: ignore[arg-type]
    values = [50.0 + rate_per_hour * (i * 60.0 / 3600.0) for i in range(61)]  # one hour, a sample a minute
    scores = feed(detector, values, step=60.0)
    assert scores[0] == 0.0  # too short a span to extrapolate
    assert scores[-1] == pytest.approx(expected, abs=1e-6)


def test_forecast_evidence_names_the_eta() -> None:
    detector = ExhaustionForecast(100.0, horizon=3600.0, window=600.0)
    feed(detector, [90.0 + i * 0.1 for i in range(20)], step=60.0)
    assert detector.evidence()["eta_s"] == pytest.approx((100.0 - 91.9) / (0.1 / 60.0))


# --- the shipped composite ----------------------------------------------------------------------

HOUR = 3600.0


def test_extremes_with_half_life_0_never_forget() -> None:
    values = [*noise(100), 100.0, *noise(2000, seed=2)]  # a spike, then a week of quiet
    detector = DecayingExtremes(half_life=0.0)
    feed(detector, values)
    assert detector.update(T0 + len(values) * STEP, 30.0) == 0.0  # still inside the all-time range
    assert detector.evidence()["high"] == 100.0


def flat(n: int, seed: int = 1, level: float = 10.0) -> list[float]:
    """Bounded noise (level ± 1): after warm-up it makes no new extremes worth a score."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    return [level + rng.uniform(-1.0, 1.0) for _ in range(n)]


@pytest.mark.parametrize(("tail", "alarms", "what"), [
    ([*flat(50, seed=3)], 0, "more of the same: quiet"),
    ([30.0, *flat(50, seed=3)], 1, "a spike: one alarm"),
    ([30.0, 30.0, 31.0, 30.0, *flat(50, seed=3)], 1, "a spike held for a while: still one (the gate)"),
    ([12.0, *flat(20, seed=3), 40.0], 2, "a far bigger breakout within the hold: an escalation, reported"),
    ([0.0, *flat(50, seed=3)], 1, "a new low: one alarm"),
])
def test_fused_alarms_once_per_onset(tail: list[float], alarms: int, what: str) -> None:
    detector = build_detector({"kind": "fused"})
    warm = feed(detector, flat(2000))  # a week of 5-minute samples
    scores = feed(detector, tail, start=T0 + 2000 * STEP)
    assert sum(1 for s in scores if s >= THRESHOLD) == alarms, what
    # On pure noise the 6 h mean's range is narrow and its own new records score a little (docs/DETECTORS.md).
    assert max(warm[300:]) < 0.1


def test_fused_is_quiet_while_it_warms_up() -> None:
    detector = build_detector({"kind": "fused"})
    first = feed(detector, [10.0, 50.0, 0.0, *flat(69)])  # 6 h of 5-minute samples, wild ones among them
    assert max(first) == 0.0
    # Then a breakout by twice the range, weighed by 6 h of history against the 60 days of a mature range.
    credit = 2.0 * 72 * STEP / (60 * 86400.0)
    assert detector.update(T0 + 72 * STEP, 150.0) == pytest.approx(credit / (credit + 1.0))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fused_makes_no_alarm_on_a_new_noisy_stream(seed: int) -> None:
    # A fresh stream (a new node, every stream after a controller restart): its first mean, its first
    # seasonal residual and its first few days of records must not read as breakouts.
    detector = build_detector({"kind": "fused"})
    scores = feed(detector, noise(3 * 288, seed=seed, spread=5.0))  # three days of 5-minute samples
    assert max(scores) < THRESHOLD


def test_fused_catches_a_level_shift_that_no_single_sample_does() -> None:
    history = [*flat(1000), 20.0, *flat(1000, seed=2)]  # one old spike sets the range of the values
    shifted = flat(200, seed=5, level=12.5)  # below the spike, above every 6-hour mean so far
    detector = build_detector({"kind": "fused"})
    feed(detector, history)
    onset, part = None, None
    for i, value in enumerate(shifted):
        if detector.update(T0 + (len(history) + i) * STEP, value) >= THRESHOLD:
            onset, part = i, detector.evidence()["part"]
            break
    assert onset is not None
    assert part == "mean"
    assert onset * STEP <= 6 * HOUR  # within one mean span of the shift
    assert max(shifted) < 20.0  # no single sample broke the range


def daily_cycle(days: int, seed: int = 1, quiet_hours: range = range(0)) -> list[float]:
    """5-minute samples of a busy day (peak 100 at 14:00 UTC, 20 at night) with noise; optionally quiet hours."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    values = []
    for i in range(days * 288):
        hour = (T0 + i * STEP) % 86400.0 / 3600.0
        busy = 20.0 + 80.0 * max(0.0, math.cos((hour - 14.0) / 24.0 * 2 * math.pi)) ** 2
        values.append(busy + rng.gauss(0.0, 3.0))
    for i in quiet_hours:
        values[i] = 20.0 + rng.gauss(0.0, 3.0)  # the busy hours of that day stay at the night level
    return values


@pytest.mark.parametrize(("seasons", "caught"), [("daily+weekly", True), ("none", False)])
def test_fused_catches_a_busy_day_gone_quiet_only_with_its_seasonal_parts(seasons: str, caught: bool) -> None:
    days = 28
    start = (days - 1) * 288
    quiet_day = daily_cycle(days, quiet_hours=range(start, start + 288))  # every value inside the usual range
    detector = build_detector({"kind": "fused", "seasons": seasons})
    onset, part = None, None
    for i, value in enumerate(quiet_day):
        if detector.update(T0 + i * STEP, value) >= THRESHOLD and onset is None:
            onset, part = i, detector.evidence()["part"]
    if caught:
        assert onset is not None
        assert onset >= start, "no alarm before the quiet day"
        assert part in {"daily", "weekly"}
    else:
        assert onset is None
    assert min(quiet_day[start:]) > min(quiet_day[:start]) - 5  # the quiet day never left the all-time range


def test_fused_is_quiet_on_a_steady_daily_cycle() -> None:
    scores = feed(build_detector({"kind": "fused"}), daily_cycle(28, seed=2))
    assert max(scores) < THRESHOLD


# --- shared properties of every kind ------------------------------------------------------------

SPECS: list[Mapping[str, object]] = [
    {"kind": "null"}, {"kind": "random"}, {"kind": "running_extremes"}, {"kind": "extremes"},
    {"kind": "robust_z"}, {"kind": "robust_z", "on": "diff", "calibrate": "tail"}, {"kind": "ewma_z"},
    {"kind": "forecast", "limit": 50.0}, {"kind": "fused"}, {"kind": "fused", "step": 600, "calibrate": "peak"},
]


def test_every_kind_is_covered_here() -> None:
    assert {str(spec["kind"]) for spec in SPECS} == set(default_registry())


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: "-".join(str(v) for v in spec.values()))
def test_scores_lie_in_0_1_and_never_depend_on_the_future(spec: Mapping[str, object]) -> None:
    values = [*noise(600), 50.0, *noise(50, seed=4, level=25.0)]
    past = feed(build_detector(spec), values[:620])
    full = feed(build_detector(spec), values)
    assert past == full[:620]
    assert all(0.0 <= s <= 1.0 for s in full)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: "-".join(str(v) for v in spec.values()))
def test_state_stays_bounded(spec: Mapping[str, object]) -> None:
    detector = build_detector(spec)
    feed(detector, noise(3000), step=60.0)
    early = len(pickle.dumps(detector))
    feed(detector, noise(12000, seed=2), step=60.0, start=T0 + 3000 * 60.0)
    assert len(pickle.dumps(detector)) < early * 1.5 + 2000



def test_fused_state_is_a_few_kilobytes() -> None:
    # The controller keeps one per (watch, node, unit), up to 50,000: the 192 seasonal slots of 4 periods
    # are flat arrays (6 KB), not a deque per slot (~120 KB).
    values = noise(15 * 1440, spread=5.0)  # 15 days of minutes: every slot filled
    tracemalloc.start()
    try:
        detector = build_detector({"kind": "fused", "step": 60})
        feed(detector, values, step=60.0)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 32_000


def test_ordered_input_drops_repeats_reversals_and_non_finite_values() -> None:
    detector = build_detector({"kind": "running_extremes"})
    assert detector.update(10.0, 1.0) == 0.0
    assert detector.update(11.0, 5.0) == 1.0
    assert detector.update(11.0, 9.0) == 0.0  # same time again
    assert detector.update(5.0, 9.0) == 0.0   # back in time
    assert detector.update(12.0, math.nan) == 0.0
    assert detector.dropped == 3
    assert detector.update(13.0, 9.0) == 1.0  # 9 never reached the detector, so it is still a new high


def test_squash_z_is_monotone_and_bounded() -> None:
    values = [squash_z(z) for z in (0.0, 1.0, 3.0, 9.0, 1e9, math.inf)]
    assert values == sorted(values)
    assert values[2] == 0.5
    assert values[3] == 0.75
    assert values[-1] == 1.0
    assert squash_z(math.nan) == 0.0


def test_ordered_input_clamps_a_misbehaving_detector() -> None:
    class Wild:
        def update(self, ts: float, value: float) -> float:
            return value

        def evidence(self) -> dict[str, float | str]:
            return {}

    detector = OrderedInput(Wild())
    assert [detector.update(float(i), v) for i, v in enumerate([-3.0, 0.5, 7.0])] == [0.0, 0.5, 1.0]
