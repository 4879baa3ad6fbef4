"""Build a streaming detector from a plain config mapping — the one entry point the controller needs.

    detector = build_detector({"kind": "fused"})                      # the shipped default
    detector = build_detector({"kind": "forecast", "limit": 95, "horizon": 21600, "step": 60})
    detector = build_detector({"kind": "robust_z", "window": 3600, "calibrate": "tail"})

A spec is ``kind`` plus that kind's parameters (each with a default, listed
in ``KINDS`` and in ``docs/DETECTORS.md``) plus three keys every kind takes:

- ``step`` (seconds, default 0 = off): resample to one mean per step first
  (``smoothing.Resampled``) — use it for 1 s agent reports;
- ``calibrate``: ``none`` (default), ``tail`` (tail probability over the
  detector's last ``calibration_history`` scores) or ``peak`` (pass only
  scores above every score of the last ``peak_hold`` seconds);
- ``calibration_history`` (default 2048), ``peak_hold`` (seconds, default 21600).

Unknown kinds and keys, wrong types and bad choices raise ``ValueError``
naming the key. Every built detector sits behind ``OrderedInput`` (drops
non-finite values and out-of-order times). The registry is a dict passed in —
``default_registry()`` builds it; nothing registers itself at import.
``spec_json_schema()`` gives the JSON Schema a rulebook loader can embed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from detectors.anomaly.calibration import PeakGate, TailCalibrated
from detectors.anomaly.ewma import EwmaZ
from detectors.anomaly.extremes import DecayingExtremes, RunningExtremes
from detectors.anomaly.forecast import ExhaustionForecast
from detectors.anomaly.fused import DAY, HOUR, SEASONS, build_fused
from detectors.anomaly.model import OrderedInput, StreamingDetector
from detectors.anomaly.null import NullDetector
from detectors.anomaly.random_scores import RandomDetector
from detectors.anomaly.robust import RobustZ
from detectors.anomaly.smoothing import Resampled

ParamValue = float | int | str


@dataclass(frozen=True, slots=True)
class Param:
    default: ParamValue | None
    """``None``: required."""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    positive: bool = False
    """Must be strictly above 0 (durations that would divide by zero or mean nothing)."""


@dataclass(frozen=True, slots=True)
class Kind:
    """How to build one kind of detector from its (validated, defaulted) parameters."""

    build: Callable[..., StreamingDetector]
    params: Mapping[str, Param] = field(default_factory=dict)
    summary: str = ""


COMMON: dict[str, Param] = {
    "step": Param(0.0, minimum=0.0),
    "calibrate": Param("none", choices=("none", "tail", "peak")),
    "calibration_history": Param(2048, minimum=2),
    "peak_hold": Param(6 * HOUR, minimum=0.0),
}


def default_registry() -> dict[str, Kind]:
    """Every detector kind selfheal ships, by name."""
    return {
        "null": Kind(NullDetector, {"level": Param(0.5, minimum=0.0)}, "constant score (NAB's zero point)"),
        "random": Kind(RandomDetector, {"seed": Param(42)}, "seeded uniform scores (no-skill reference)"),
        "running_extremes": Kind(RunningExtremes, {}, "1 on a new all-time high or low (parameter-free baseline)"),
        "extremes": Kind(DecayingExtremes, {
            "half_life": Param(7 * DAY, minimum=0.0), "mature": Param(0.0, minimum=0.0)},
                         "breakout beyond a (decaying; half_life 0: all-time) high/low range"),
        "robust_z": Kind(RobustZ, {
            "window": Param(DAY, positive=True), "on": Param("level", choices=("level", "diff")),
            "recent": Param(1, minimum=1), "min_samples": Param(30, minimum=1),
            "max_samples": Param(2048, minimum=1)}, "median/MAD z-score over a time window"),
        "ewma_z": Kind(EwmaZ, {"half_life": Param(HOUR, positive=True), "min_samples": Param(30, minimum=1)},
                       "EWMA mean/std z-score"),
        "forecast": Kind(_build_forecast, {
            "limit": Param(None), "horizon": Param(6 * HOUR, positive=True),
            "window": Param(HOUR, positive=True), "direction": Param("above", choices=("above", "below")),
            "min_span": Param(0.0, minimum=0.0), "max_samples": Param(512, minimum=2)},
            "time until a linear trend reaches a limit"),
        "fused": Kind(build_fused, {
            "half_life": Param(0.0, minimum=0.0), "mean_span": Param(6 * HOUR, positive=True),
            "mature": Param(60 * DAY, minimum=0.0), "seasons": Param("daily+weekly", choices=tuple(SEASONS)),
            "season_weight": Param(1 / 8, positive=True), "season_keep": Param(4, minimum=1),
            "season_min_periods": Param(2, minimum=1),
            "hold": Param(12 * HOUR, positive=True), "warmup": Param(6 * HOUR, minimum=0.0)},
            "the shipped composite (see fused.py)"),
    }


def _build_forecast(*, min_span: float, **params: Any) -> StreamingDetector:
    return ExhaustionForecast(min_span=min_span or None, **params)


def validate_spec(spec: Mapping[str, object], registry: Mapping[str, Kind]) -> tuple[str, dict[str, ParamValue]]:
    """``(kind, every parameter with defaults filled in)``; ``ValueError`` names the offending key."""
    kind_name = spec.get("kind")
    if not isinstance(kind_name, str) or kind_name not in registry:
        raise ValueError(f"kind: {kind_name!r} is not one of {sorted(registry)}")
    params = {**registry[kind_name].params, **COMMON}
    unknown = sorted(set(spec) - set(params) - {"kind"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key for a {kind_name} detector (known: {sorted(params)})")
    values: dict[str, ParamValue] = {}
    for name, param in params.items():
        values[name] = _check(name, spec.get(name, param.default), param)
    return kind_name, values


def _check(name: str, value: object, param: Param) -> ParamValue:
    if value is None:
        raise ValueError(f"{name}: required")
    if param.choices:
        if value not in param.choices:
            raise ValueError(f"{name}: {value!r} is not one of {list(param.choices)}")
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: {value!r} is not a number")  # noqa: TRY004 - callers catch one config error type
    if (param.positive and value <= 0) or (param.minimum is not None and value < param.minimum):
        raise ValueError(f"{name}: {value!r} is below the minimum ({'> 0' if param.positive else param.minimum})")
    if isinstance(param.default, int) and not isinstance(param.default, bool):
        if value != int(value):
            raise ValueError(f"{name}: {value!r} is not an integer")
        return int(value)
    return float(value)


def build_detector(spec: Mapping[str, object], registry: Mapping[str, Kind] | None = None) -> OrderedInput:
    """A fresh detector for one (node, metric) series, built from ``spec`` (see the module docstring)."""
    kinds = default_registry() if registry is None else registry
    kind_name, values = validate_spec(spec, kinds)
    common = {name: values.pop(name) for name in COMMON}
    detector: StreamingDetector = kinds[kind_name].build(**values)
    if common["calibrate"] == "tail":
        history = int(common["calibration_history"])
        detector = TailCalibrated(detector, history=history, min_history=min(100, history))
    elif common["calibrate"] == "peak":
        detector = PeakGate(detector, float(common["peak_hold"]))
    if float(common["step"]) > 0:
        detector = Resampled(detector, float(common["step"]))
    return OrderedInput(detector)


def spec_json_schema(registry: Mapping[str, Kind] | None = None) -> dict[str, Any]:
    """JSON Schema of a detector spec, one ``oneOf`` branch per kind, for a rulebook loader to embed."""
    kinds = default_registry() if registry is None else registry
    branches = []
    for kind_name, kind in sorted(kinds.items()):
        properties: dict[str, Any] = {"kind": {"const": kind_name}}
        for name, param in {**kind.params, **COMMON}.items():
            if param.choices:
                properties[name] = {"enum": list(param.choices)}
            else:
                number: dict[str, Any] = {"type": "integer" if isinstance(param.default, int) else "number"}
                if param.positive:
                    number["exclusiveMinimum"] = 0
                elif param.minimum is not None:
                    number["minimum"] = param.minimum
                properties[name] = number
        required = ["kind", *(name for name, param in kind.params.items() if param.default is None)]
        branches.append({"type": "object", "additionalProperties": False, "required": required,
                         "properties": properties})
    return {"oneOf": branches}
