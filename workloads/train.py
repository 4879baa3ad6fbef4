"""``python -m workloads.train``: train a model on the ETL's features, publish it only if it is no worse.

Reads the features the ETL committed (by its manifest, each file checked
against its sha256), splits them into a training and a held-out set
(stratified, seeded), and grows a scikit-learn RandomForest ``--tree-step``
trees at a time (``warm_start``), checkpointing after each step into
``<models>/_work/<run key>/``. The run key digests the data's root digest and
the training parameters, so a killed run restarts from its last checkpoint
(the same seed makes the resumed forest the same one an uninterrupted run
grows), and a finished one is never trained twice.

The new model is scored on the held-out set (ROC AUC; accuracy when the set
holds one class only), and so is the current model, on the same rows. When
the new one scores worse than the current one by more than ``--margin``, it
is kept as a refused version but not published. Otherwise it is published:
the version directory ``vNNNNNN/`` (``model.joblib``, ``metrics.json``,
``manifest.json`` with sha256s and a root digest) is renamed into place and
``current.json`` — the pointer the prediction service watches — is replaced
atomically.

``--hold-file PATH`` (fault injection): while it exists, the job waits
without progress before each training step of a run but its first.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workloads.jobs import EX_TEMPFAIL, JobParser, Progress, fail, hold, hold_exclusive, run, setup
from workloads.manifests import (
    CURRENT_POINTER,
    CurrentPointer,
    ModelManifest,
    digest_files,
    fsync_dir,
    read_current,
    read_etl_manifest,
    read_model_manifest,
    root_digest,
    verify_files,
    write_json_atomic,
)
from workloads.telemetry import FEATURES, LABEL

VERSION_NAME = re.compile(r"^v(\d{6})$")
NO_PYARROW = ("pyarrow is not installed: install selfheal with its `spark` extra (pip install 'selfheal[spark]') "
              "— training reads the ETL's Parquet output")
EX_DATA = 65
"""Exit code when the features do not match their manifest (sysexits' EX_DATAERR)."""
EX_REFUSED = 3
"""Exit code of a refused model with ``--fail-on-refusal``."""


@dataclass(frozen=True, slots=True)
class Decision:
    publish: bool
    reason: str


def decide(score: float, current: float | None, margin: float) -> Decision:
    """Publish unless the new model scores worse than the current one by more than ``margin``."""
    if current is None:
        return Decision(True, f"scores {score:.4f}; there is no current model")
    if score < current - margin:
        return Decision(False, f"scores {score:.4f}, worse than the current model's {current:.4f} "
                               f"by more than the margin {margin:g}")
    return Decision(True, f"scores {score:.4f} against the current model's {current:.4f} (margin {margin:g})")


def score_model(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[str, float]:
    """(metric, value) on a held-out set: ROC AUC, or accuracy when ``y`` holds one class only."""
    from sklearn.metrics import accuracy_score, roc_auc_score  # type: ignore[import-untyped]  # noqa: PLC0415

    if len(np.unique(y)) < 2:
        return "accuracy", float(accuracy_score(y, model.predict(x)))
    classes = list(model.classes_)
    if 1 not in classes:
        return "roc_auc", 0.5  # it never saw a failure: no better than chance
    proba = model.predict_proba(x)[:, classes.index(1)]
    return "roc_auc", float(roc_auc_score(y, proba))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = JobParser("train", "Train a RandomForest on the ETL's features; publish a versioned model unless it "
                                "scores worse than the current one by more than a margin.")
    parser.option("--features", type=Path, help="the ETL's output directory (with manifest.json)")
    parser.option("--models", type=Path, help="model directory: vNNNNNN/ versions and current.json")
    parser.option("--trees", type=int, default=200, help="trees in the forest")
    parser.option("--tree-step", type=int, default=20, help="trees grown between checkpoints")
    parser.option("--max-depth", type=int, default=8, help="maximum tree depth")
    parser.option("--test-size", type=float, default=0.25, help="share of rows held out for evaluation")
    parser.option("--seed", type=int, default=7, help="random seed (split and forest)")
    parser.option("--margin", type=float, default=0.02, help="refuse a model scoring worse than current by more")
    parser.option("--min-rows", type=int, default=20, help="feature rows needed before training")
    parser.option("--hold-file", type=Path, help="fault injection: wait before later steps while it exists")
    parser.add_argument("--fail-on-refusal", action="store_true",
                        help=f"exit {EX_REFUSED} when the model is refused (default: exit 0, logged)")
    return parser.parse_args(argv)


def load_features(features: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(X, y, the data's root digest) from the ETL's committed files; ``ValueError`` when they do not match."""
    import pyarrow as pa  # noqa: PLC0415 - an optional extra, checked in main
    import pyarrow.parquet as pq  # noqa: PLC0415

    manifest = read_etl_manifest(features)
    files = manifest.feature_files()
    if not files:
        return np.empty((0, len(FEATURES))), np.empty(0, dtype=int), manifest.root
    problems = verify_files(features, files)
    if problems:
        raise ValueError("features do not match their manifest: " + "; ".join(problems[:5]))
    table = pa.concat_tables([pq.read_table(features / f.path, columns=[*FEATURES, LABEL]) for f in files])
    x = np.column_stack([table.column(name).to_numpy(zero_copy_only=False).astype(float) for name in FEATURES])
    y = table.column(LABEL).to_numpy(zero_copy_only=False).astype(int)
    return x, y, manifest.root


def run_key(data_root: str, args: argparse.Namespace) -> str:
    params = {"data": data_root, "trees": args.trees, "max_depth": args.max_depth, "test_size": args.test_size,
              "seed": args.seed, "features": FEATURES, "model": "RandomForestClassifier"}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def versions(models: Path) -> list[Path]:
    """Version directories, oldest first."""
    found = [(int(m.group(1)), p) for p in models.iterdir() if p.is_dir() and (m := VERSION_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_model(version_dir: Path) -> Any:
    """A version's model after checking its files against its manifest; None when it does not check out."""
    import joblib  # type: ignore[import-untyped]  # noqa: PLC0415 - comes with scikit-learn

    manifest = read_model_manifest(version_dir)
    if manifest is None or verify_files(version_dir, manifest.files):
        return None
    return joblib.load(version_dir / "model.joblib")


def publish(models: Path, version: str, root: str) -> None:
    write_json_atomic(models / CURRENT_POINTER, CurrentPointer(version=version, root=root, published_at=time.time()))


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915 - one job, read top to bottom
    args = parse_args(argv)
    log = setup("train", args.log_level)
    if args.features is None or args.models is None:
        return fail("--features and --models (or SELFHEAL_TRAIN_FEATURES / SELFHEAL_TRAIN_MODELS) are required")
    if args.trees < 1 or args.tree_step < 1 or not 0 < args.test_size < 1:
        return fail("--trees and --tree-step must be >= 1, --test-size in (0, 1)")
    progress = Progress(args.progress, total=args.trees)
    progress.update(0, stage="loading")
    if importlib.util.find_spec("pyarrow") is None:
        return fail(NO_PYARROW)
    import joblib  # noqa: PLC0415 - comes with scikit-learn
    from sklearn.ensemble import RandomForestClassifier  # type: ignore[import-untyped]  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]  # noqa: PLC0415

    models: Path = args.models
    models.mkdir(parents=True, exist_ok=True)
    if not hold_exclusive(models):
        return fail(f"another training run holds {models}; not running a second copy", EX_TEMPFAIL)
    try:
        x, y, data_root = load_features(args.features)
    except ValueError as exc:
        return fail(str(exc), EX_DATA)
    key = run_key(data_root, args)
    current = read_current(models)
    for version_dir in versions(models):
        metrics = _read_json(version_dir / "metrics.json")
        if metrics.get("run_key") != key:
            continue
        newer = current is None or version_dir.name > current.version
        if metrics.get("published") and newer and (manifest := read_model_manifest(version_dir)) is not None:
            publish(models, version_dir.name, manifest.root)  # killed between rename and publish last time
            log.info("train.published_late", version=version_dir.name)
        progress.update(args.trees, stage="up to date")
        log.info("train.up_to_date", version=version_dir.name, run_key=key)
        return 0
    if len(y) < args.min_rows or len(np.unique(y)) < 2:
        progress.update(0, stage="waiting for data")
        log.info("train.not_enough_data", rows=len(y), classes=len(np.unique(y)), min_rows=args.min_rows)
        return 0
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=args.test_size, random_state=args.seed,
                                                        stratify=y)
    work = models / "_work" / key
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint.joblib"
    model: Any
    if checkpoint.exists():
        model = joblib.load(checkpoint)
        log.info("train.resuming", trees=len(model.estimators_), run_key=key)
    else:
        model = RandomForestClassifier(n_estimators=0, max_depth=args.max_depth, random_state=args.seed,
                                       warm_start=True, n_jobs=1)
    resumed_from = len(getattr(model, "estimators_", []))
    built = resumed_from
    progress.update(built, stage="training")
    while built < args.trees:
        if built > resumed_from:
            hold(args.hold_file, progress, log)
        built = min(args.trees, built + args.tree_step)
        model.set_params(n_estimators=built)
        model.fit(x_train, y_train)
        tmp = work / f".checkpoint.{os.getpid()}.tmp"
        joblib.dump(model, tmp)
        tmp.replace(checkpoint)
        progress.update(built, stage="training")
    progress.update(stage="evaluating")
    metric, score = score_model(model, x_test, y_test)
    current_model = load_model(models / current.version) if current is not None else None
    current_score = score_model(current_model, x_test, y_test)[1] if current_model is not None else None
    decision = decide(score, current_score, args.margin)
    existing = versions(models)
    version = f"v{(int(existing[-1].name[1:]) if existing else 0) + 1:06d}"
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    joblib.dump(model, out / "model.joblib")
    metrics = {
        "version": version, "run_key": key, "metric": metric, "score": score,
        "accuracy": float((model.predict(x_test) == y_test).mean()), "current_version":
        current.version if current is not None else None, "current_score": current_score,
        "published": decision.publish, "reason": decision.reason, "margin": args.margin,
        "train_rows": len(y_train), "test_rows": len(y_test), "trees": built, "resumed_from_trees": resumed_from,
        "features": list(FEATURES), "label": LABEL, "data_root": data_root, "created_at": time.time(),
    }
    write_json_atomic(out / "metrics.json", metrics)
    files = digest_files(out, [out / "model.joblib", out / "metrics.json"])
    manifest = ModelManifest(version=version, run_key=key, files=files, root=root_digest(files),
                             created_at=time.time())
    write_json_atomic(out / "manifest.json", manifest)
    out.rename(models / version)
    fsync_dir(models)
    if decision.publish:
        publish(models, version, manifest.root)
    shutil.rmtree(work, ignore_errors=True)
    with suppress(OSError):
        work.parent.rmdir()  # the last run's work dir: gone unless another run's checkpoint is in it
    progress.update(built, stage="published" if decision.publish else "refused")
    log.info("train.published" if decision.publish else "train.refused", version=version, metric=metric,
             score=round(score, 4), current=current_score, reason=decision.reason, resumed_from_trees=resumed_from)
    return 0 if decision.publish or not args.fail_on_refusal else EX_REFUSED


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


if __name__ == "__main__":
    run(main)
