"""``workloads.serve.Batcher``: concurrent requests share one model call, each gets its own rows back."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

from workloads.serve import Batcher, LoadedModel


class SlowModel:
    """A model whose calls take a while, counting them and the rows each saw."""

    classes_ = np.array([0, 1])

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        self.calls.append(len(matrix))
        if len(self.calls) == 1:
            self.gate.wait(5)  # hold the first call so that the others queue behind it
        p = matrix[:, 0] / 100.0
        return np.column_stack([1 - p, p])


def loaded(model: Any, version: str = "v000001") -> LoadedModel:
    return LoadedModel(version=version, model=model, loaded_at=0.0)


async def test_requests_queued_behind_a_call_share_the_next_one() -> None:
    model = SlowModel()
    batcher, stop = Batcher(), asyncio.Event()
    runner = asyncio.create_task(batcher.run(stop=stop))
    current = loaded(model)
    first = asyncio.create_task(batcher.predict(current, np.array([[10.0]])))
    await asyncio.sleep(0.1)  # the first call is running
    rest = [asyncio.create_task(batcher.predict(current, np.array([[float(i)], [float(i + 1)]])))
            for i in range(20, 80, 2)]
    await asyncio.sleep(0.1)
    model.gate.set()
    results = await asyncio.gather(first, *rest)
    stop.set()
    batcher.close()
    await runner
    assert model.calls == [1, 60]  # the 30 queued requests in one call
    assert results[0]["probabilities"] == [0.1]
    for i, result in zip(range(20, 80, 2), results[1:], strict=True):
        assert result["probabilities"] == [i / 100, (i + 1) / 100]  # its own rows, in order


async def test_a_request_is_answered_by_the_model_it_arrived_under() -> None:
    old, new = SlowModel(), SlowModel()
    old.gate.set()
    new.gate.set()
    batcher, stop = Batcher(), asyncio.Event()
    runner = asyncio.create_task(batcher.run(stop=stop))
    answers = await asyncio.gather(batcher.predict(loaded(old), np.array([[50.0]])),
                                   batcher.predict(loaded(new, "v000002"), np.array([[50.0]])))
    stop.set()
    batcher.close()
    await runner
    assert [a["model_version"] for a in answers] == ["v000001", "v000002"]
    assert (old.calls, new.calls) == ([1], [1])


async def test_a_failing_call_fails_each_waiting_request_and_the_batcher_goes_on() -> None:
    class Broken(SlowModel):
        def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
            raise ValueError("boom")
    batcher, stop = Batcher(), asyncio.Event()
    runner = asyncio.create_task(batcher.run(stop=stop))
    results = await asyncio.gather(batcher.predict(loaded(Broken()), np.array([[1.0]])), return_exceptions=True)
    assert isinstance(results[0], ValueError)
    good = SlowModel()
    good.gate.set()
    assert (await batcher.predict(loaded(good), np.array([[30.0]])))["probabilities"] == [0.3]
    stop.set()
    batcher.close()
    await runner
