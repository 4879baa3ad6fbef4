"""Training and the prediction service on real files: publish, refuse worse, resume a killed run, reload.

Features are written the way the ETL commits them (``tests.workload_data``),
so no Spark is needed here; the Spark side has its own tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfheal.progress import read_progress
from tests.conftest import eventually_sync, free_port, wait_port
from tests.workload_data import instance, restored_logging, write_features
from workloads import train
from workloads.manifests import read_current
from workloads.telemetry import FEATURES

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with restored_logging():
        yield


def metrics_of(models: Path, version: str) -> dict[str, Any]:
    return dict(json.loads((models / version / "metrics.json").read_text()))


def test_training_publishes_a_versioned_model_and_does_not_train_the_same_data_twice(tmp_path: Path) -> None:
    features, models = tmp_path / "features", tmp_path / "models"
    write_features(features)
    progress = tmp_path / "train.progress.json"
    args = ["--features", str(features), "--models", str(models), "--trees", "30", "--tree-step", "10"]
    assert train.main([*args, "--progress", str(progress)]) == 0
    current = read_current(models)
    assert current is not None
    assert current.version == "v000001"
    metrics = metrics_of(models, "v000001")
    assert metrics["published"] is True
    assert (metrics["metric"], metrics["trees"], metrics["resumed_from_trees"]) == ("roc_auc", 30, 0)
    assert metrics["score"] > 0.8
    assert metrics["features"] == list(FEATURES)
    assert sorted(p.name for p in (models / "v000001").iterdir()) == ["manifest.json", "metrics.json", "model.joblib"]
    assert not (models / "_work").exists()
    recorded = read_progress(progress)
    assert recorded is not None
    assert (recorded.done, recorded.total, recorded.stage) == (30, 30, "published")
    assert train.main(args) == 0  # same data, same parameters: nothing to do
    assert sorted(p.name for p in models.iterdir()) == ["current.json", "v000001"]


def test_a_model_worse_than_current_by_more_than_the_margin_is_refused(tmp_path: Path) -> None:
    features, models = tmp_path / "features", tmp_path / "models"
    write_features(features)
    base = ["--features", str(features), "--models", str(models)]
    assert train.main([*base, "--trees", "40"]) == 0
    # A single stump on the same data scores clearly worse on the same held-out rows.
    assert train.main([*base, "--trees", "1", "--max-depth", "1", "--margin", "0.01"]) == 0
    refused = metrics_of(models, "v000002")
    assert refused["published"] is False
    assert refused["current_version"] == "v000001"
    assert refused["score"] < refused["current_score"] - 0.01
    assert "worse than the current model's" in refused["reason"]
    current = read_current(models)
    assert current is not None
    assert current.version == "v000001"
    assert train.main([*base, "--trees", "2", "--max-depth", "1", "--fail-on-refusal"]) == train.EX_REFUSED
    # Within a generous margin the weaker model is published after all.
    assert train.main([*base, "--trees", "3", "--max-depth", "1", "--margin", "0.9"]) == 0
    current = read_current(models)
    assert current is not None
    assert current.version == "v000004"


def test_features_that_do_not_match_their_manifest_are_not_trained_on(tmp_path: Path) -> None:
    features, models = tmp_path / "features", tmp_path / "models"
    write_features(features)
    next((features / "commits").rglob("*.parquet")).write_bytes(b"tampered")
    assert train.main(["--features", str(features), "--models", str(models)]) == train.EX_DATA
    assert read_current(models) is None


def test_too_little_data_waits_without_failing(tmp_path: Path) -> None:
    features, models = tmp_path / "features", tmp_path / "models"
    write_features(features, rows=10, commits=1)
    assert train.main(["--features", str(features), "--models", str(models)]) == 0
    assert read_current(models) is None


def test_a_killed_training_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    features, models = tmp_path / "features", tmp_path / "models"
    write_features(features)
    hold, progress = tmp_path / "hold", tmp_path / "progress.json"
    hold.touch()
    args = [sys.executable, "-m", "workloads.train", "--features", str(features), "--models", str(models),
            "--trees", "40", "--tree-step", "10", "--hold-file", str(hold), "--progress", str(progress)]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def holding() -> bool:
            recorded = read_progress(progress)
            return recorded is not None and recorded.stage == "holding"
        eventually_sync(holding, timeout=60, what="training to hold after its first checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    assert read_current(models) is None
    hold.unlink()
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    metrics = metrics_of(models, "v000001")
    assert (metrics["resumed_from_trees"], metrics["trees"]) == (10, 40)
    # The resumed forest is the one an uninterrupted run grows.
    other = tmp_path / "other"
    assert train.main(["--features", str(features), "--models", str(other), "--trees", "40"]) == 0
    assert metrics_of(other, "v000001")["score"] == metrics["score"]


Service = tuple[httpx.Client, Path, Path]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """``python -m workloads.serve`` on a free port, watching an empty model directory."""
    features, models = tmp_path / "features", tmp_path / "models"
    models.mkdir()
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "workloads.serve", "--models", str(models), "--port", str(port),
                             "--reload-interval", "0.1"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_port(port, timeout=30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client, features, models
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0, (tmp_path / "serve.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


def model_version(client: httpx.Client) -> str | None:
    response = client.get("/healthz")
    return str(response.json()["model_version"]) if response.status_code == 200 else None


def test_the_service_waits_for_a_model_then_serves_and_reloads_each_published_one(
        service: Service) -> None:
    client, features, models = service
    assert client.get("/healthz").status_code == 503  # not ready: no model yet
    assert client.get("/livez").status_code == 200  # but alive: restarting it would not help
    response = client.post("/predict", json={"instances": [instance(hot=True)]})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    write_features(features)
    assert train.main(["--features", str(features), "--models", str(models), "--trees", "30"]) == 0
    eventually_sync(lambda: model_version(client) == "v000001", timeout=10, what="v000001 loaded")
    response = client.post("/predict", json={"instances": [instance(hot=True), instance(hot=False)]})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "v000001"
    assert body["predictions"] == [1, 0]
    assert body["probabilities"][0] > 0.5 > body["probabilities"][1]
    single = client.post("/predict", json={"features": instance(hot=False)}).json()
    assert single["predictions"] == [0]
    assert train.main(["--features", str(features), "--models", str(models), "--trees", "31"]) == 0
    eventually_sync(lambda: model_version(client) == "v000002", timeout=10, what="v000002 loaded")
    text = client.get("/metrics").text
    assert 'predict_requests_total{outcome="ok"} 2.0' in text
    assert 'predict_requests_total{outcome="unavailable"} 1.0' in text
    assert "predict_rows_total 3.0" in text
    assert 'model_reloads_total{outcome="ok"} 2.0' in text
    assert 'model_version_info{version="v000002"} 1.0' in text
    assert 'version="v000001"' not in text
    assert "predict_latency_seconds_count 3.0" in text  # every /predict, not /healthz


def test_a_version_that_fails_its_manifest_is_not_loaded_and_the_old_one_keeps_serving(
        service: Service) -> None:
    client, features, models = service
    write_features(features)
    assert train.main(["--features", str(features), "--models", str(models), "--trees", "10"]) == 0
    eventually_sync(lambda: model_version(client) == "v000001", timeout=10, what="v000001 loaded")
    assert train.main(["--features", str(features), "--models", str(models), "--trees", "11"]) == 0
    # v000002 was published; damage it before the service looks (the pointer check comes first).
    with (models / "v000002" / "model.joblib").open("ab") as out:
        out.write(b"bit rot")
    os.utime(models / "current.json")
    eventually_sync(lambda: 'model_reloads_total{outcome="failed"} 1.0' in client.get("/metrics").text
                    or model_version(client) == "v000002", timeout=10, what="the reload attempt")
    assert model_version(client) == "v000001"
    assert client.post("/predict", json={"features": instance(hot=True)}).json()["model_version"] == "v000001"


BAD_BODIES = [
    (b"not json", "not JSON"),
    (b'{"rows": []}', "expected"),
    (b'{"instances": []}', "between 1 and"),
    (b'{"instances": [1]}', "not an object"),
    (b'{"features": {"events": 1}}', "'temp_mean' must be a finite number"),
    (b'{"features": {"events": true}}', "'events' must be a finite number"),
]


def test_bad_requests_are_problems_that_say_what_is_wrong(service: Service) -> None:
    client, features, models = service
    write_features(features, rows=120, commits=1)
    assert train.main(["--features", str(features), "--models", str(models), "--trees", "5"]) == 0
    eventually_sync(lambda: model_version(client) == "v000001", timeout=10, what="v000001 loaded")
    for body, detail in BAD_BODIES:
        response = client.post("/predict", content=body)
        assert response.status_code == 400, body
        assert response.headers["content-type"] == "application/problem+json"
        assert detail in response.json()["detail"], body
    assert 'predict_requests_total{outcome="bad_request"} 6.0' in client.get("/metrics").text
