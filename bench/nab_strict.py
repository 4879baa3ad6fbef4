"""Strict (nested) scoring of the shipped detector: its settings are chosen on the other half, too.

The honest score in ``nab.py`` chooses only the threshold on the other half.
But the shipped detector's shape and durations were themselves chosen by
measuring variants on NAB, and that choice can fit the corpus as surely as a
threshold can. So here the whole family of variants that was explored
(``FAMILY``) is replayed, and for each half the pair (variant, threshold) that
scores best on the *other* half is applied to it. A design that only won by
luck on one half loses here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.nab_scoring import FileRows, Profile, normalise, score_at_threshold, sweep_thresholds

DAY = 86400.0
HOUR = 3600.0


SEASON_OPTIONS = (("none", 1.0), ("daily+weekly", 1.0), ("daily+weekly", 1 / 2), ("daily+weekly", 1 / 8),
                  ("daily+weekly", 1 / 16), ("daily+weekly", 1 / 32), ("daily", 1 / 8), ("weekly", 1 / 8))
"""Seasonal parts and their weight, as explored."""


def family() -> dict[str, dict[str, object]]:
    """Every variant of ``fused`` that was measured while designing it, by a short name."""
    variants: dict[str, dict[str, object]] = {}
    for mean_span, mature, (seasons, weight), hold in itertools.product(
            (6 * HOUR, 12 * HOUR), (0.0, 30 * DAY, 60 * DAY), SEASON_OPTIONS, (6 * HOUR, 12 * HOUR)):
        parts = "no seasons" if seasons == "none" else f"{seasons} at {_fraction(weight)}"
        name = f"mean {mean_span / HOUR:.0f}h, mature {mature / DAY:.0f}d, {parts}, hold {hold / HOUR:.0f}h"
        variants[name] = {"kind": "fused", "mean_span": mean_span, "mature": mature, "seasons": seasons,
                          "season_weight": weight, "hold": hold}
    return variants


def _fraction(weight: float) -> str:
    return "1" if weight == 1 else f"1/{1 / weight:.0f}"


@dataclass(frozen=True, slots=True)
class StrictResult:
    honest: float
    """Both halves, each scored with the variant and threshold chosen on the other."""
    half_a: float
    half_b: float
    chosen_on_a: str
    """The variant chosen on half A (and applied to half B)."""
    chosen_on_b: str


def strict_score(rows: Mapping[str, tuple[Sequence[FileRows], Sequence[FileRows]]], profile: Profile) -> StrictResult:
    """``rows``: each variant's (half A, half B) file rows. Ties go to the first variant listed."""

    def choose(side: int) -> tuple[str, float]:
        best_name, best_threshold, best_raw = "", 0.0, float("-inf")
        for name, halves in rows.items():
            threshold, raw = sweep_thresholds(halves[side], profile).best()
            if raw > best_raw:
                best_name, best_threshold, best_raw = name, threshold, raw
        return best_name, best_threshold

    on_a, threshold_a = choose(0)
    on_b, threshold_b = choose(1)
    scored_a, scored_b = rows[on_b][0], rows[on_a][1]
    raw_a = score_at_threshold(scored_a, profile, threshold_b)
    raw_b = score_at_threshold(scored_b, profile, threshold_a)
    return StrictResult(honest=normalise(raw_a + raw_b, [*scored_a, *scored_b], profile),
                        half_a=normalise(raw_a, scored_a, profile), half_b=normalise(raw_b, scored_b, profile),
                        chosen_on_a=on_a, chosen_on_b=on_b)
