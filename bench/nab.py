"""Anomaly detectors on the Numenta Anomaly Benchmark, scored the scoreboard's way and honestly.

Every NAB file is replayed, one sample at a time, through the same
``build_detector(spec)`` detectors the controller will run, and scored with
``bench/nab_scoring.py`` (NAB v1.1's rules, re-implemented). For each detector
and profile it reports:

- **optimised**: threshold optimised over the whole corpus — what the published
  scoreboard reports, and optimistic by construction;
- **honest**: threshold chosen on one half of the files and applied to the
  other (halves fixed in ``bench/nab_corpus.py``), both halves shown, and the
  corpus score of the two held-out halves together.

The shipped detector's shape was found by measuring variants on both halves,
so its honest figure still flatters it a little. The **strict** figure removes
that: every variant explored while designing it (``bench/nab_strict.py``) is
replayed, and each half is scored with the variant *and* threshold that did
best on the other half. The shipped settings are the ones half A chooses for
reward_low_FP, so half B's strict figure for that profile is the shipped
detector on files its design never chose on. Also measured: cost per
metric-sample (wall time of ``update`` over the corpus), and, for the shipped
alert policy, false alarms per metric-day on the anomaly-free files and the
detection delay.

    .venv/bin/python bench/nab.py [--data DIR] [--only NAME ...] [--json]

``--data`` defaults to ``../shared/nab`` beside the checkout. With ``--json``
the last line is ``{detector: {profile: {"optimised": x, "honest": y}}}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.nab_corpus import NabFile, load_corpus, split_halves
from bench.nab_multivariate import measure_host_watch, replay_isolation_forest
from bench.nab_scoring import PROFILES, FileRows, Result, score_corpus, sweep_file
from bench.nab_strict import StrictResult, family, strict_score
from detectors.anomaly.policy import AlertPolicy, AlertPolicySpec
from detectors.anomaly.registry import build_detector, default_registry, validate_spec

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "nab"

DETECTORS: dict[str, Mapping[str, object]] = {
    "null": {"kind": "null"},
    "random": {"kind": "random"},
    "running_extremes": {"kind": "running_extremes"},
    "robust_z": {"kind": "robust_z"},
    "robust_z_diff": {"kind": "robust_z", "on": "diff"},
    "robust_z_tail": {"kind": "robust_z", "calibrate": "tail"},
    "robust_z_peak": {"kind": "robust_z", "calibrate": "peak"},
    "ewma_z": {"kind": "ewma_z"},
    "ewma_z_tail": {"kind": "ewma_z", "calibrate": "tail"},
    "extremes": {"kind": "extremes"},
    "extremes_alltime": {"kind": "extremes", "half_life": 0},
    "extremes_alltime_peak": {"kind": "extremes", "half_life": 0, "calibrate": "peak", "peak_hold": 12 * 3600},
    "fused_plain": {"kind": "fused", "mature": 0, "seasons": "none"},
    "fused_no_seasons": {"kind": "fused", "seasons": "none"},
    "fused": {"kind": "fused"},
}
"""What is measured: the baselines, each building block, and the shipped composite (``fused``).

``fused_plain`` is the composite without maturity and without seasonal parts (what shipped before them);
``fused_no_seasons`` adds maturity only."""
MULTIVARIATE = "isolation_forest"
SHIPPED = "fused"
SHIPPED_POLICY = AlertPolicySpec()
BASELINES = ("null", "random", "running_extremes")

SCOREBOARD = {
    "ARTime": (74.9, 65.1, 80.4), "Numenta HTM": (70.5, 62.6, 75.2), "CAD OSE": (69.9, 67.0, 73.2),
    "earthgecko Skyline": (58.2, 46.2, 63.9), "KNN CAD": (58.0, 43.4, 64.8), "Relative Entropy": (54.6, 47.6, 58.8),
    "Random Cut Forest": (51.7, 38.4, 59.7), "Twitter ADVec": (47.1, 33.6, 53.5),
    "Windowed Gaussian": (39.6, 20.9, 47.4),
}
"""NAB's published scoreboard (standard, reward_low_FP, reward_low_FN), optimised thresholds."""
SHORT = {"standard": "std", "reward_low_FP_rate": "low_FP", "reward_low_FN_rate": "low_FN"}

Scores = dict[str, np.ndarray]


def replay(spec: Mapping[str, object], files: Sequence[NabFile]) -> tuple[Scores, float]:
    """Each file's scores from a fresh detector, and the cost in microseconds per sample."""
    scores: Scores = {}
    elapsed, samples = 0.0, 0
    for nab_file in files:
        detector = build_detector(spec)
        update = detector.update
        times, values = nab_file.timestamps.tolist(), nab_file.values.tolist()
        started = time.perf_counter()
        out = [update(ts, value) for ts, value in zip(times, values, strict=True)]
        elapsed += time.perf_counter() - started
        samples += len(out)
        scores[nab_file.name] = np.asarray(out)
    return scores, 1e6 * elapsed / samples


def score_detector(scores: Scores, files: Sequence[NabFile], half_a: Sequence[NabFile],
                   half_b: Sequence[NabFile]) -> dict[str, Result]:
    rows = {f.name: sweep_file(f.name, f.timestamps, scores[f.name], f.windows) for f in files}

    def pick(subset: Sequence[NabFile]) -> list[FileRows]:
        return [rows[f.name] for f in subset]

    return {name: score_corpus(pick(files), pick(half_a), pick(half_b), profile)
            for name, profile in PROFILES.items()}


def measure_policy(scores: Scores, files: Sequence[NabFile], spec: AlertPolicySpec) -> dict[str, float]:
    """False alarms per metric-day on anomaly-free files; delay from the labelled instant to the alert."""
    quiet_alarms, quiet_days, delays, windows = 0, 0.0, [], 0
    for nab_file in files:
        policy = AlertPolicy(spec)
        onsets = [ts for ts, score in zip(nab_file.timestamps.tolist(), scores[nab_file.name].tolist(), strict=True)
                  if policy.observe(ts, score).onset]
        start = nab_file.timestamps[0] + (nab_file.timestamps[-1] - nab_file.timestamps[0]) * 0.15
        if not nab_file.windows:
            quiet_alarms += sum(1 for ts in onsets if ts >= start)
            quiet_days += (nab_file.timestamps[-1] - start) / 86400.0
        for left, right in nab_file.windows:
            label = next((t for t in nab_file.labels if left <= t <= right), (left + right) / 2)
            if right < start:
                continue
            windows += 1
            hit = next((ts for ts in onsets if left <= ts <= right), None)
            if hit is not None:
                delays.append((hit - label) / 60.0)
    return {"false_alarms_per_metric_day": quiet_alarms / quiet_days if quiet_days else 0.0,
            "median_delay_min": statistics.median(delays) if delays else float("nan"),
            "windows_detected": len(delays), "windows": windows}


def measure_strict(files: Sequence[NabFile], half_a: Sequence[NabFile],
                   half_b: Sequence[NabFile]) -> dict[str, StrictResult]:
    """Nested scoring of the shipped detector's family (``bench/nab_strict.py``), per profile.

    The variants are replayed in parallel, one process per core; each returns its swept rows."""
    variants = family()
    with ProcessPoolExecutor(os.cpu_count() or 1, initializer=_share_corpus, initargs=(files,)) as pool:
        swept = dict(zip(variants, pool.map(_replay_and_sweep, variants.values()), strict=True))
    rows = {name: ([by_file[f.name] for f in half_a], [by_file[f.name] for f in half_b])
            for name, by_file in swept.items()}
    return {name: strict_score(rows, profile) for name, profile in PROFILES.items()}


_CORPUS: Sequence[NabFile] = ()


def _share_corpus(files: Sequence[NabFile]) -> None:
    global _CORPUS  # noqa: PLW0603 - a worker process's copy of the corpus, set once by the pool initializer
    _CORPUS = files


def _replay_and_sweep(spec: Mapping[str, object]) -> dict[str, FileRows]:
    scores, _ = replay(spec, _CORPUS)
    return {f.name: sweep_file(f.name, f.timestamps, scores[f.name], f.windows) for f in _CORPUS}


def shipped_variant() -> str:
    """The family member with the shipped defaults."""
    _, defaults = validate_spec({"kind": SHIPPED}, default_registry())
    return next((name for name, spec in family().items()
                 if all(defaults[key] == value for key, value in spec.items() if key != "kind")), "not in the family")


def render_strict(strict: Mapping[str, StrictResult]) -> str:
    lines = [f"{SHIPPED} strict: variant and threshold chosen on the other half ({len(family())} variants)",
             f"{'profile':<10}{'strict (A|B)':>22}  chosen on A (scores B) / chosen on B (scores A)"]
    for profile, r in strict.items():
        lines.append(f"{SHORT[profile]:<10}{f'{r.honest:.1f} ({r.half_a:.1f}|{r.half_b:.1f})':>22}  "
                     f"{r.chosen_on_a} / {r.chosen_on_b}")
    lines.append(f"shipped settings: {shipped_variant()}")
    return "\n".join(lines)


def render_table(results: Mapping[str, Mapping[str, Result]], costs: Mapping[str, float]) -> str:
    head = f"{'detector':<22}" + "".join(f"{SHORT[p] + ' opt':>11}{'honest (A|B)':>22}" for p in PROFILES)
    lines = [head + f"{'us/sample':>11}", "-" * len(head + " " * 11)]
    for name, by_profile in results.items():
        cells = "".join(f"{r.optimised:>11.1f}{f'{r.honest:.1f} ({r.half_a:.1f}|{r.half_b:.1f})':>22}"
                        for r in by_profile.values())
        lines.append(f"{name:<22}{cells}{costs[name]:>11.1f}")
    return "\n".join(lines)


def render_scoreboard(results: Mapping[str, Mapping[str, Result]]) -> str:
    ours = {name: tuple(r.optimised for r in results[name].values()) for name in (SHIPPED, *BASELINES)
            if name in results}
    rows = sorted([*SCOREBOARD.items(), *((f"selfheal {k}", v) for k, v in ours.items())], key=lambda kv: -kv[1][1])
    lines = [f"{'published scoreboard + ours (optimised)':<40}{'std':>7}{'low_FP':>8}{'low_FN':>8}"]
    lines += [f"{name:<40}{a:>7.1f}{b:>8.1f}{c:>8.1f}" for name, (a, b, c) in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="NAB checkout (data/, labels/)")
    parser.add_argument("--only", nargs="*", help="measure only these detectors")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--no-strict", action="store_true",
                        help="skip the strict (nested) scoring of the shipped detector (saves a few minutes)")
    args = parser.parse_args(argv)
    if not (args.data / "labels" / "combined_windows.json").exists():
        print(f"no NAB corpus at {args.data} (need labels/combined_windows.json and data/)", file=sys.stderr)
        return 2
    files = load_corpus(args.data)
    half_a, half_b = split_halves(files)
    print(f"NAB: {len(files)} files, {sum(len(f.values) for f in files)} samples, "
          f"{sum(len(f.windows) for f in files)} windows; half A {len(half_a)} files, half B {len(half_b)}")
    wanted = args.only or [*DETECTORS, MULTIVARIATE]
    replays: dict[str, Callable[[], tuple[Scores, float]]] = {
        name: functools.partial(replay, spec, files) for name, spec in DETECTORS.items()}
    replays[MULTIVARIATE] = functools.partial(replay_isolation_forest, files)
    results: dict[str, dict[str, Result]] = {}
    costs: dict[str, float] = {}
    shipped_scores: Scores | None = None
    for name in wanted:
        scores, costs[name] = replays[name]()
        results[name] = score_detector(scores, files, half_a, half_b)
        shipped_scores = scores if name == SHIPPED else shipped_scores
        print(f"  {name}: done ({costs[name]:.1f} us/sample)", flush=True)
    print()
    print(render_table(results, costs))
    print()
    print(render_scoreboard(results))
    strict = measure_strict(files, half_a, half_b) if SHIPPED in wanted and not args.no_strict else {}
    if strict:
        print()
        print(render_strict(strict))
    if shipped_scores is not None:
        figures = measure_policy(shipped_scores, files, SHIPPED_POLICY)
        print(f"\nshipped policy on {SHIPPED} (threshold {SHIPPED_POLICY.threshold}, "
              f"{SHIPPED_POLICY.persistence} of {SHIPPED_POLICY.window}, hold {SHIPPED_POLICY.hold:g} s): "
              f"{figures['false_alarms_per_metric_day']:.3f} false alarms per metric-day on the anomaly-free files; "
              f"{figures['windows_detected']}/{figures['windows']} windows alerted, median delay "
              f"{figures['median_delay_min']:.0f} min from the labelled instant")
    if MULTIVARIATE in wanted:
        cost = measure_host_watch()
        print(f"\nhost model in the controller (synthetic host, 1 s reports, {cost['features']:.0f} features, "
              f"10 s vectors): {cost['observe_us_per_report']:.1f} us per report to observe, "
              f"{cost['loop_us_per_report']:.1f} us per report on the loop in all; worker thread: "
              f"{cost['fit_ms']:.0f} ms per fit of {cost['history']:.0f} vectors ({cost['fits']:.0f} fits), "
              f"{cost['score_ms_per_batch']:.1f} ms per scoring batch ({cost['vectors_scored']:.0f} vectors)")
    if args.json:
        figures_json = {name: {profile: {"optimised": round(r.optimised, 2), "honest": round(r.honest, 2)}
                               for profile, r in by_profile.items()} for name, by_profile in results.items()}
        for profile, r in strict.items():
            figures_json[SHIPPED][profile]["strict"] = round(r.honest, 2)
        print(json.dumps(figures_json))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
