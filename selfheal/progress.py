"""The progress file: how a job tells the agent how far it has come.

A job (``workloads.*``, or an operator's own) keeps one small JSON object in
the file named by its unit's ``progress_file`` (the agent passes the path as
``$SELFHEAL_PROGRESS_FILE``)::

    {"done": 3, "total": 10, "stage": "writing", "updated_at": 1700000000.0}

``done`` and ``total`` are numbers in any unit the job likes (batches, rows,
trees); ``total`` may be null when unknown; ``stage`` is a short word;
``updated_at`` is the job's wall time. Writers replace the file atomically
(``write_progress``), so a reader never sees half of it; a reader still takes
anything it cannot use as "no progress", never as an error (``parse_progress``).

Both sides import this module: it is the contract between them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import msgspec

from selfheal.wire import UnitProgress

ENV_VAR = "SELFHEAL_PROGRESS_FILE"
"""The agent sets it to the unit's ``progress_file``; jobs default their ``--progress`` to it."""
MAX_BYTES = 64 * 1024
"""A progress file larger than this is not read (it is not one)."""
MAX_STAGE = 64


def parse_progress(raw: bytes) -> UnitProgress | None:
    """The progress in ``raw`` (a progress file's bytes), or None when it holds none we can use."""
    if not raw or len(raw) > MAX_BYTES:
        return None
    try:
        data: Any = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(data, dict):
        return None
    done = _number(data.get("done"))
    if done is None:
        return None
    total = _number(data.get("total"))
    stage = data.get("stage")
    updated_at = _number(data.get("updated_at"))
    return UnitProgress(done=done, total=total, stage=stage[:MAX_STAGE] if isinstance(stage, str) else "",
                        updated_at=updated_at or 0.0)


def read_progress(path: Path) -> UnitProgress | None:
    """``parse_progress`` of the file at ``path`` (blocking); None when it is missing or unreadable."""
    try:
        with path.open("rb") as file:
            return parse_progress(file.read(MAX_BYTES + 1))
    except OSError:
        return None


def write_progress(path: Path, *, done: float, total: float | None, stage: str, now: float) -> None:
    """Replace the progress file atomically (blocking): a temp file in the same directory, then rename."""
    body = msgspec.json.encode({"done": done, "total": total, "stage": stage[:MAX_STAGE], "updated_at": now})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(body + b"\n")
    tmp.replace(path)


def _number(value: object) -> float | None:
    # bool is an int in Python; true/false is not a count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None
