"""``python -m workloads.serve``: the prediction service — the current model over HTTP.

- ``POST /predict``: ``{"instances": [{"events": 18, "temp_mean": 71.2, ...}, ...]}``
  (or one ``{"features": {...}}``) → ``{"model_version": "v000003",
  "predictions": [0, 1], "probabilities": [0.04, 0.81]}``; every name of
  ``telemetry.FEATURES`` is required and numeric. Errors are
  ``application/problem+json``: 400 for a bad body, 503 while no model is loaded.
- ``GET /healthz``: 200 with the model version once a model is loaded, else 503
  (readiness: is it serving predictions).
- ``GET /livez``: 200 while the service answers at all (liveness: the probe to
  restart on; a restart does not bring a model that was never published).
- ``GET /metrics``: Prometheus text from the service's own registry: requests
  by outcome, request latency (histogram), rows predicted, model reloads by
  outcome, and the loaded version.

Concurrent requests are predicted together (``Batcher``): a forest costs
about as much for a few hundred rows as for one, so under load the service
answers many requests per model call instead of queueing them one by one.

The service watches ``<models>/current.json`` (the pointer ``workloads.train``
replaces atomically) every ``--reload-interval`` seconds. A new version is
loaded in a thread, checked against its manifest, and swapped in with one
assignment: a request in flight finishes on the model it started with, and
one that starts later gets the new one. A version that fails to load is
logged and counted, and the old model keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import numpy as np
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from selfheal.logs import get_logger
from workloads.jobs import JobParser, fail, run, setup
from workloads.manifests import CURRENT_POINTER, read_current, read_model_manifest, verify_files
from workloads.telemetry import FEATURES

MAX_BODY = 1024 * 1024
MAX_INSTANCES = 1000
MAX_BATCH_ROWS = 4096
"""Rows of concurrent requests predicted in one model call (``Batcher``)."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    version: str
    model: Any
    loaded_at: float


class BadRequest(Exception):
    pass


class ServiceMetrics:
    """The service's Prometheus metrics, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("predict_requests", "Prediction requests by outcome", ["outcome"],
                                registry=self.registry)
        self.latency = Histogram("predict_latency_seconds", "Prediction request latency",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                                 registry=self.registry)
        self.rows = Counter("predict_rows", "Rows predicted", registry=self.registry)
        self.reloads = Counter("model_reloads", "Model loads by outcome", ["outcome"], registry=self.registry)
        self.version = Gauge("model_version_info", "The loaded model version (1 for the loaded one)", ["version"],
                             registry=self.registry)
        for outcome in ("ok", "bad_request", "unavailable"):
            self.requests.labels(outcome)
        for outcome in ("ok", "failed"):
            self.reloads.labels(outcome)


class ModelHolder:
    """The loaded model, swapped atomically when the current pointer moves."""

    def __init__(self, models: Path, metrics: ServiceMetrics, log: Any) -> None:
        self.models = models
        self.metrics = metrics
        self.log = log
        self.loaded: LoadedModel | None = None
        self._seen: tuple[int, int, int] | None = None

    def _load(self, version: str) -> LoadedModel:
        import joblib  # type: ignore[import-untyped]  # noqa: PLC0415 - comes with scikit-learn

        directory = self.models / version
        manifest = read_model_manifest(directory)
        if manifest is None:
            raise ValueError(f"{directory} has no readable manifest")
        problems = verify_files(directory, manifest.files)
        if problems:
            raise ValueError(f"{directory} does not match its manifest: {'; '.join(problems)}")
        # Our own artifact, checked against its manifest just above.
        model = joblib.load(directory / "model.joblib")
        return LoadedModel(version=version, model=model, loaded_at=time.time())

    async def refresh(self) -> None:
        """Load the version ``current.json`` names if it moved (blocking work in a thread)."""
        pointer = self.models / CURRENT_POINTER
        try:
            st = await asyncio.to_thread(pointer.stat)
        except FileNotFoundError:
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        current = await asyncio.to_thread(read_current, self.models)
        if current is None:
            return  # half-written by someone not using a rename: look again next time
        self._seen = seen
        if self.loaded is not None and current.version == self.loaded.version:
            return
        try:
            loaded = await asyncio.to_thread(self._load, current.version)
        except (OSError, ValueError, EOFError) as exc:
            self.metrics.reloads.labels("failed").inc()
            self.log.warning("serve.model_load_failed", version=current.version, error=str(exc))
            return
        previous = self.loaded
        self.loaded = loaded  # the swap: one assignment
        self.metrics.reloads.labels("ok").inc()
        if previous is not None:
            self.metrics.version.remove(previous.version)
        self.metrics.version.labels(loaded.version).set(1)
        self.log.info("serve.model_loaded", version=loaded.version,
                      previous=previous.version if previous is not None else None)

    async def watch(self, *, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            await self.refresh()
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def parse_instances(body: bytes) -> np.ndarray:
    """The request's rows as a float matrix in ``FEATURES`` order; ``BadRequest`` says what is wrong."""
    if len(body) > MAX_BODY:
        raise BadRequest(f"body larger than {MAX_BODY} bytes")
    try:
        data: Any = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("features"), dict):
        rows = [data["features"]]
    elif isinstance(data, dict) and isinstance(data.get("instances"), list):
        rows = data["instances"]
    else:
        raise BadRequest('expected {"instances": [{...}, ...]} or {"features": {...}}')
    if not rows or len(rows) > MAX_INSTANCES:
        raise BadRequest(f"between 1 and {MAX_INSTANCES} instances")
    matrix = np.empty((len(rows), len(FEATURES)))
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"instance {i} is not an object")
        for j, name in enumerate(FEATURES):
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise BadRequest(f"instance {i}: {name!r} must be a finite number")
            matrix[i, j] = value
    return matrix


def problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail},
                        status_code=status, media_type="application/problem+json")


def positive_proba(loaded: LoadedModel, matrix: np.ndarray) -> np.ndarray:
    """P(failure) of each row (blocking: the model's own work)."""
    model = loaded.model
    classes = list(model.classes_)
    return model.predict_proba(matrix)[:, classes.index(1)] if 1 in classes else np.zeros(len(matrix))


def answer(loaded: LoadedModel, proba: np.ndarray) -> dict[str, Any]:
    return {"model_version": loaded.version, "predictions": [int(p >= 0.5) for p in proba],
            "probabilities": [round(float(p), 6) for p in proba]}


def predict_rows(loaded: LoadedModel, matrix: np.ndarray) -> dict[str, Any]:
    return answer(loaded, positive_proba(loaded, matrix))


class Batcher:
    """Coalesces concurrent requests into one model call.

    A forest's per-call overhead (input checks, dispatching over its trees) dwarfs its per-row cost, so
    rows predicted together cost about what one row does. While a call runs, new requests queue; the next
    call takes every queued request for the same model (up to ``max_rows`` rows). A lone request waits for
    nothing; each request is answered by the model it arrived under, as without batching.
    """

    def __init__(self, max_rows: int = MAX_BATCH_ROWS) -> None:
        self.max_rows = max_rows
        self._pending: deque[tuple[LoadedModel, np.ndarray, asyncio.Future[dict[str, Any]]]] = deque()
        self._wake = asyncio.Event()
        self.calls = 0

    def close(self) -> None:
        """Wake ``run`` so that it sees its ``stop`` set."""
        self._wake.set()

    async def predict(self, loaded: LoadedModel, matrix: np.ndarray) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((loaded, matrix, future))
        self._wake.set()
        return await future

    async def run(self, *, stop: asyncio.Event) -> None:
        while True:
            await self._wake.wait()
            if stop.is_set():
                return
            if not self._pending:
                self._wake.clear()
                continue
            loaded, batch = self._take()
            self.calls += 1
            try:
                proba = await run_in_threadpool(positive_proba, loaded, np.vstack([m for m, _ in batch]))
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for matrix, future in batch:
                if not future.done():  # its client may have gone away
                    future.set_result(answer(loaded, proba[start:start + len(matrix)]))
                start += len(matrix)

    def _take(self) -> tuple[LoadedModel, list[tuple[np.ndarray, asyncio.Future[dict[str, Any]]]]]:
        loaded, matrix, future = self._pending.popleft()
        batch, rows = [(matrix, future)], len(matrix)
        while self._pending and self._pending[0][0] is loaded and rows + len(self._pending[0][1]) <= self.max_rows:
            _, matrix, future = self._pending.popleft()
            batch.append((matrix, future))
            rows += len(matrix)
        return loaded, batch


def create_app(models: Path, *, reload_interval: float = 1.0, log: Any = None) -> Starlette:
    """The service as an ASGI app (its model watcher runs in the app's lifespan)."""
    metrics = ServiceMetrics()
    holder = ModelHolder(models, metrics, log or get_logger("workloads.serve"))
    batcher = Batcher()

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        try:
            loaded = holder.loaded
            if loaded is None:
                metrics.requests.labels("unavailable").inc()
                return problem(503, "No model", "no model has been published yet")
            try:
                matrix = parse_instances(await request.body())
            except BadRequest as exc:
                metrics.requests.labels("bad_request").inc()
                return problem(400, "Bad request", str(exc))
            result = await batcher.predict(loaded, matrix)
            metrics.requests.labels("ok").inc()
            metrics.rows.inc(len(matrix))
            return JSONResponse(result)
        finally:
            metrics.latency.observe(time.perf_counter() - started)

    async def healthz(request: Request) -> Response:
        loaded = holder.loaded
        if loaded is None:
            return JSONResponse({"status": "no model"}, status_code=503)
        return JSONResponse({"status": "ok", "model_version": loaded.version})

    async def livez(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        await holder.refresh()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(holder.watch(stop=stop, interval=reload_interval), name="serve-model-watch")
            tg.create_task(batcher.run(stop=stop), name="serve-batcher")
            yield
            stop.set()
            batcher.close()

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz),
                            Route("/livez", livez), Route("/metrics", prometheus)], lifespan=lifespan)
    app.state.holder = holder
    app.state.batcher = batcher
    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = JobParser("serve", "Prediction service: the current model over HTTP (POST /predict, GET /healthz, "
                                "GET /metrics), reloaded atomically when a new model is published.")
    parser.option("--models", type=Path, help="model directory holding current.json and the versions")
    parser.option("--host", default="127.0.0.1", help="address to listen on")
    parser.option("--port", type=int, default=8000, help="port to listen on")
    parser.option("--reload-interval", type=float, default=1.0, help="seconds between looks at current.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = setup("serve", args.log_level)
    if args.models is None:
        return fail("--models (or SELFHEAL_SERVE_MODELS) is required")
    if args.reload_interval <= 0:
        return fail("--reload-interval must be > 0")
    app = create_app(args.models, reload_interval=args.reload_interval, log=log)
    log.info("serve.starting", host=args.host, port=args.port, models=str(args.models))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            lifespan="on")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for whoever handled it
    # before: a stop is the service's normal end, so that ends in exit 0.
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.Server(config).run()
    return 0


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    run(main)
