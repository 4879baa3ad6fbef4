"""What the anomaly watches learned, kept across a controller restart — as data, never as code.

The shipped detector weighs a breakout by the weeks of history behind it, so
a watch that started from nothing at every restart (an upgrade, a config
change) would stay half-deaf for weeks. The controller saves the watch's
streams to ``<state_dir>/anomaly-state.msgpack`` when it stops and adopts
them when it starts. Streams of a watch whose spec changed meanwhile start
afresh, and so does everything after a change of detector code (the file
names the code it was written by). A controller that is killed keeps the
state of its last clean stop.

The file is msgpack of plain typed data (``detectors/anomaly/state.py``)
with a format, a version and the detector-code fingerprint, checked before
any detector is built; the detectors are then built from the watch's own
spec and only take the saved numbers. Reading it can never run code. A file
that does not parse, is off the schema or does not fit the detectors is
moved aside to ``.bad``, logged and counted
(``selfheal_state_files_rejected_total``), and never stops the controller.
The pickle that releases before 13 wrote (``anomaly-streams.pickle``) is
never opened: it is moved aside unread, because unpickling a file is running
it, and anyone who could write to the state directory could have planted it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import detectors.anomaly
from detectors.anomaly.watch import AnomalyWatch
from selfheal.logs import get_logger

log = get_logger("controller.anomaly_state")
FILENAME = "anomaly-state.msgpack"
LEGACY_FILENAME = "anomaly-streams.pickle"
"""Written by earlier releases; never unpickled, only set aside."""
REJECTED_SUFFIX = ".bad"

Count = Callable[[str], None]
"""Counts a rejected state file by reason (``legacy_pickle``, ``unusable``, ``other_code``)."""


@functools.cache
def code_fingerprint() -> str:
    """A hash of the detector code: state written by other code is not adopted (read once per process)."""
    digest = hashlib.sha256()
    package = Path(detectors.anomaly.__file__).parent
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def set_aside_legacy(state_dir: Path, count: Count | None = None) -> None:
    """Move an old pickle state file aside without opening it."""
    legacy = state_dir / LEGACY_FILENAME
    if not legacy.is_file() and not legacy.is_symlink():
        return
    moved = _set_aside(legacy)
    log.warning("anomaly.legacy_state_set_aside", path=str(legacy), moved_to=moved,
                reason="pickled state is never loaded (loading a pickle runs code); the streams start afresh")
    if count is not None:
        count("legacy_pickle")


def load_watch_state(watch: AnomalyWatch | None, state_dir: Path, count: Count | None = None) -> None:
    """Adopt the streams saved by the last clean stop, if any are usable (without watches: only set aside
    a legacy pickle)."""
    set_aside_legacy(state_dir, count)
    if watch is None:
        return
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
        reason = "other_code" if "other detector code" in str(exc) else "unusable"
        moved = _set_aside(path)
        log.warning("anomaly.state_not_adopted", path=str(path), reason=str(exc)[:500], moved_to=moved)
        if count is not None:
            count(reason)
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
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()  # never write through a planted link
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
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


def _set_aside(path: Path) -> str | None:
    """Rename ``path`` to ``<path>.bad`` (replacing an older one); None if even that fails (then delete it)."""
    target = f"{path}{REJECTED_SUFFIX}"
    try:
        path.replace(target)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()  # it must not be looked at again at the next start either
        return None
    return target
