"""The controller's node keys, held in memory: ingest checks every node message's signature against them.

Loaded at start from ``security.key_dir`` (every ``<node>.key``), reloaded on
SIGHUP and when the directory's mtime changes — looked at, at most once a
second, as messages arrive — and never read per message. A key file written
in place (not added, removed or renamed) leaves the directory's mtime alone:
rotate keys by writing a new file and renaming it over the old one, or send
SIGHUP. A load within two seconds of the directory's last change is done once
more at the next look, so a file added in the same clock tick is not missed.

"Keys configured" means the directory holds at least one ``<node>.key`` file,
readable or not: then the controller drops node traffic that is not signed
with its node's key. A node whose file cannot be read or parsed has no key
(its traffic is refused as from an unknown node) and the load says why once;
a broken file never turns signing off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from selfheal.errors import ConfigError
from selfheal.keys import read_key
from selfheal.logs import get_logger

KEY_FILE = re.compile(r"^([a-z0-9][a-z0-9-]{0,62})\.key$")
CHECK_EVERY = 1.0
"""Seconds between looks at the key directory's mtime."""
RACY = 2.0
"""Seconds: a load this close after the directory changed is repeated at the next look."""

log = get_logger("controller.keys")


class KeyRing:
    def __init__(self, key_dir: str | Path, *, check_every: float = CHECK_EVERY) -> None:
        self.key_dir = Path(key_dir)
        self.check_every = check_every
        self.keys: Mapping[str, bytes] = {}
        self.files = 0
        """``<node>.key`` files found at the last load, readable or not."""
        self.loads = 0
        self._mtime: int | None = None
        self._racy = False
        self._checked_at: float | None = None

    @property
    def configured(self) -> bool:
        """Node traffic must be signed: the key directory holds at least one ``<node>.key``."""
        return self.files > 0

    def get(self, node: str) -> bytes | None:
        return self.keys.get(node)

    def load(self, wall: float) -> None:
        """Read every key file (blocking: call it off the event loop)."""
        mtime = self._dir_mtime()
        keys: dict[str, bytes] = {}
        files = 0
        try:
            names = sorted(path.name for path in self.key_dir.iterdir())
        except FileNotFoundError:
            names = []
        except OSError as exc:
            log.error("keys.unreadable_dir", key_dir=str(self.key_dir), error=exc.strerror)  # noqa: TRY400 - no traceback
            names = []
        for name in names:
            match = KEY_FILE.match(name)
            if match is None:
                continue
            files += 1
            try:
                key = read_key(self.key_dir, match.group(1))
            except ConfigError as exc:
                log.error("keys.unusable", node=match.group(1), error=str(exc),  # noqa: TRY400 - not the key
                          effect="this node's traffic is refused until its key file is fixed")
                continue
            if key is not None:
                keys[match.group(1)] = key
        was_configured = self.configured if self.loads else None
        self.keys, self.files, self._mtime = keys, files, mtime
        self._racy = mtime is not None and wall - mtime / 1e9 < RACY
        self.loads += 1
        if was_configured is not self.configured:
            if self.configured:
                log.info("keys.loaded", key_dir=str(self.key_dir), nodes=len(keys),
                         effect="node traffic must be signed with its node's key")
            else:
                log.warning("keys.none", key_dir=str(self.key_dir),
                            effect="node traffic is NOT authenticated: anyone who can publish to the broker "
                                   "can speak for any node (add <node>.key files to sign it)")

    def changed(self, now: float) -> bool:
        """At most once per ``check_every`` (``now``: monotonic seconds): has the directory changed since the
        last load (or was that load racy)? Only a ``stat``, cheap enough for the event loop."""
        if self._checked_at is not None and now - self._checked_at < self.check_every:
            return False
        self._checked_at = now
        return self._racy or self._dir_mtime() != self._mtime

    def _dir_mtime(self) -> int | None:
        try:
            return self.key_dir.stat().st_mtime_ns
        except OSError:
            return None
