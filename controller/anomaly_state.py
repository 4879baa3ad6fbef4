"""What the anomaly watches learned, kept across a controller restart.

The shipped detector weighs a breakout by the weeks of history behind it, so
a watch that started from nothing at every restart (an upgrade, a config
change) would stay half-deaf for weeks. The controller saves the watch's
streams to ``<state_dir>/anomaly-streams.pickle`` when it stops and adopts
them when it starts. Streams of a watch whose spec changed meanwhile start
afresh, and so does everything after a change of detector code (the file
names the code it was written by). An unusable file is logged, moved aside
to ``.bad`` and never stops the controller. A controller that is killed
keeps the state of its last clean stop.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from pathlib import Path

import detectors.anomaly
from detectors.anomaly.watch import AnomalyWatch
from selfheal.logs import get_logger

log = get_logger("controller.anomaly_state")
FILENAME = "anomaly-streams.pickle"


@functools.cache
def code_fingerprint() -> str:
    """A hash of the detector code: state pickled by other code is not adopted (read once per process)."""
    digest = hashlib.sha256()
    package = Path(detectors.anomaly.__file__).parent
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def load_watch_state(watch: AnomalyWatch, state_dir: Path) -> None:
    """Adopt the streams saved by the last clean stop, if any are usable."""
    path = state_dir / FILENAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("anomaly.state_unreadable", path=str(path), error=exc.strerror)
        return
    try:
        adopted, dropped = watch.restore(data, code_fingerprint())
    except ValueError as exc:
        log.warning("anomaly.state_not_adopted", path=str(path), reason=str(exc), moved_to=f"{path}.bad")
        with contextlib.suppress(OSError):
            path.replace(f"{path}.bad")
        return
    log.info("anomaly.state_restored", path=str(path), streams=adopted, dropped=dropped)


def save_watch_state(watch: AnomalyWatch | None, state_dir: Path) -> None:
    """Write the streams atomically (a temporary file, then a rename); a failure is logged, not raised."""
    path = state_dir / FILENAME
    if watch is None:
        with contextlib.suppress(OSError):
            path.unlink()  # no watches any more: nothing to resume
        return
    partial = state_dir / f".{FILENAME}.partial"
    try:
        data = watch.snapshot(code_fingerprint())
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        partial.replace(path)
    except OSError as exc:
        log.warning("anomaly.state_not_saved", path=str(path), error=exc.strerror)
        with contextlib.suppress(OSError):
            partial.unlink()
        return
    log.info("anomaly.state_saved", path=str(path), streams=watch.stream_count, bytes=len(data))
