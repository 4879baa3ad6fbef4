"""What every workload's entry point shares: flags with environment defaults, logging, the progress
file, SIGTERM, and the fault-injection hold file.

Each option ``--some-flag`` of job ``etl`` may also come from the environment
as ``SELFHEAL_ETL_SOME_FLAG`` (the flag wins); ``--progress`` defaults to
``$SELFHEAL_PROGRESS_FILE``, which the agent sets for a unit with a
``progress_file``. Nothing here imports anything but the kernel.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from selfheal.config import LogConfig
from selfheal.logs import configure_logging, get_logger
from selfheal.progress import ENV_VAR as PROGRESS_ENV
from selfheal.progress import write_progress

HOLD_POLL = 0.2
"""Seconds between looks at a hold file."""
EX_CONFIG = 78
"""Exit code for a missing prerequisite or bad arguments (sysexits' EX_CONFIG, as the selfheal CLI)."""


class JobParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose options default to ``SELFHEAL_<JOB>_<OPTION>`` environment variables."""

    def __init__(self, job: str, description: str) -> None:
        super().__init__(prog=f"python -m workloads.{job}", description=description,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        self.job = job
        self.add_argument("--progress", type=Path, default=_env_path(PROGRESS_ENV),
                          help=f"JSON progress file to keep current (env {PROGRESS_ENV})")
        self.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    def option(self, flag: str, *, default: Any = None, type: Any = str, **kwargs: Any) -> None:
        """``--flag`` with its environment default ``SELFHEAL_<JOB>_<FLAG>`` converted by ``type``."""
        env = f"SELFHEAL_{self.job.upper()}_{flag.removeprefix('--').replace('-', '_').upper()}"
        raw = os.environ.get(env)
        value = type(raw) if raw is not None else default
        help_text = kwargs.pop("help", "")
        self.add_argument(flag, default=value, type=type, help=f"{help_text} (env {env})".strip(), **kwargs)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def setup(job: str, level: str) -> Any:
    """Logging to stderr (JSON unless on a terminal); the job's logger."""
    configure_logging(LogConfig(level=level, format="auto"))  # type: ignore[arg-type]
    logging.getLogger("py4j").setLevel(logging.WARNING)
    return get_logger(f"workloads.{job}")


def run(main: Callable[[], int]) -> NoReturn:
    """The ``__main__`` entry: SIGTERM becomes ``SystemExit`` (so ``finally`` blocks clean up), then ``main``."""
    signal.signal(signal.SIGTERM, _terminate)
    raise SystemExit(main())


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class Progress:
    """The job's progress file, when it has one; every update replaces it atomically."""

    def __init__(self, path: Path | None, *, total: float | None = None) -> None:
        self.path = path
        self.total = total
        self.done = 0.0
        self.stage = "starting"

    def update(self, done: float | None = None, *, stage: str | None = None, total: float | None = None) -> None:
        if done is not None:
            self.done = done
        if stage is not None:
            self.stage = stage
        if total is not None:
            self.total = total
        if self.path is not None:
            write_progress(self.path, done=self.done, total=self.total, stage=self.stage, now=time.time())


def hold(path: Path | None, progress: Progress, log: Any) -> None:
    """Fault injection: while ``path`` exists, wait without progress (a stall the agent can see)."""
    if path is None or not path.exists():
        return
    log.warning("job.holding", hold_file=str(path))
    progress.update(stage="holding")
    while path.exists():
        time.sleep(HOLD_POLL)
    log.info("job.released", hold_file=str(path))


EX_TEMPFAIL = 75
_LOCKS: dict[Path, int] = {}
"""Lock files held for the life of the process (closing one would release its lock), by directory."""


def hold_exclusive(directory: Path) -> bool:
    """Take ``.<name>.lock`` beside ``directory`` for the rest of this process; False if another run holds it.

    Beside, not inside: the output may be a replicated dataset, whose digest must not see the lock.

    Two copies of a job on one output (a leftover, or a migrated job's old copy) would discard each
    other's uncommitted work and race on the manifest: the second one refuses to start instead.
    A process that already holds the lock (a job run twice in one interpreter) may go on."""
    key = directory.resolve()
    if key in _LOCKS:
        return True
    fd = os.open(key.parent / f".{key.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _LOCKS[key] = fd
    return True


def fail(message: str, code: int = EX_CONFIG) -> int:
    """Say why on stderr (one plain line an operator reads in the unit log) and give the exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
