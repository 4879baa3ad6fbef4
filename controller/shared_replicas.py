"""Dataset replicas across controllers: each writes what it hears of its own nodes' replicas to the shared store
and reads back what the others heard, so replicas in different controllers' buckets are compared.

One controller (SQLite) hears every node and needs none of this. Several controllers sharing a PostgreSQL
store each hear only the nodes of their buckets; without the others' replicas a divergent one goes unseen
(its controller holds no other copy to compare it with), or two copies on one controller disagree 1 to 1
with no majority although a third elsewhere would decide.

- **Written by the node's controller** (``heard``, then ``save`` once a second): a replica's record when what
  the comparison reads changed — root, state, manifest root, files, bytes, generation, chunk size, error — or
  the node's presence or address did; a rescan that found the same tree writes nothing. A dataset the node no
  longer holds, or every dataset of a node evicted here, is written as a record without summary. A node whose
  bucket moved to another controller gets no record (``release``, called before its nodes are forgotten):
  what was written stands until the new owner writes. The store drops a record written under an epoch that
  is not its bucket's live lease (``Store.save_replicas``), so a controller that lost the bucket cannot
  overwrite the new owner's records.
- **Read by every controller** (``sync``, once a second): the records numbered after the last one seen, and
  those stamped in the last ``OVERLAP`` seconds by the database's clock — a record numbered before another
  but committed after it is still read, as long as its write took less than ``OVERLAP`` (the store bounds
  each write's statements). What a read costs is what changed in the last ``OVERLAP`` seconds, not the
  fleet. Every ``FULL_EVERY`` seconds the whole table is read instead (and records without summary older
  than ``FORGET_AFTER`` are deleted), so whatever a read missed — a write slower than the overlap, a long
  outage — is made right within that time, and nothing kept here outlives its record.

``controller.observe`` merges these with the replicas it hears itself (its own win for its own nodes) and keeps
the findings to the nodes it acts on; ``controller.resync`` may fetch from a replica on another controller's
node (it verifies every listing against the root in the record, as for its own), signing the transfer token
with that node's key from the shared key directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import msgspec

from controller.datasets import Held
from controller.store import ReplicaRecord, Store
from selfheal import wire
from selfheal.logs import get_logger

OVERLAP = 15.0
"""Seconds of records read again at every sync (see the module doc)."""
FULL_EVERY = 600.0
"""Seconds between two reads of every record."""
FORGET_AFTER = 3600.0
"""Seconds a record without summary is kept (then every reader has read it, or reads the whole table)."""

_decode = msgspec.json.Decoder(wire.DatasetSummary).decode
_Heard = tuple[Mapping[str, wire.DatasetSummary] | None, bool, str]


def _compared(summary: wire.DatasetSummary, online: bool, http: str) -> tuple[object, ...]:
    """What a record says that matters to the others (a rescan's times do not)."""
    s = summary
    return (s.root, s.state, s.manifest_root, s.files, s.bytes, s.generation, s.chunk_size, s.error, online, http)


class SharedReplicas:
    def __init__(self, epoch_of: Callable[[str], int | None], *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.epoch_of = epoch_of
        """The epoch this controller acts on a node under now (``Ownership.epoch_of``); None: not now."""
        self.monotonic = monotonic
        self.elsewhere: dict[str, dict[str, Held]] = {}
        """Dataset → node → its replica as the store has it (every controller's records, this one's too)."""
        self.version = 0
        """Bumped whenever ``elsewhere`` changed: a view built from it is current while this has not moved."""
        self._seq: dict[tuple[str, str], int] = {}
        """(dataset, node) → the number of the record ``elsewhere`` holds for it."""
        self._heard: dict[str, _Heard] = {}
        """node → what it was last heard holding (None: evicted), not yet turned into records."""
        self._names: dict[str, frozenset[str]] = {}
        """node → the datasets its records say it holds."""
        self._said: dict[tuple[str, str], tuple[object, ...]] = {}
        """(dataset, node) → what its last record queued here said."""
        self._unsaved: dict[tuple[str, str], ReplicaRecord] = {}
        self._after = 0
        self._since: float | None = None
        self._full_at = -FULL_EVERY
        self.log = get_logger("controller.shared_replicas")

    # --- this controller's nodes ------------------------------------------------------------------

    def heard(self, node: str, datasets: Mapping[str, wire.DatasetSummary] | None, *, online: bool = False,
              http: str = "") -> None:
        """A node of this controller reported its datasets, or its presence or address changed; None: it was
        evicted here (its replicas leave the comparison) — or its bucket moved, which ``release`` said first."""
        self._heard[node] = (datasets, online, http)

    def release(self, gone: Callable[[str], bool]) -> None:
        """The buckets of the nodes ``gone`` names moved to another controller (or came back under a new epoch):
        nothing more is written for them here; their new owner writes what it hears."""
        for node in [n for n in self._heard.keys() | self._names.keys() if gone(n)]:
            self._heard.pop(node, None)
            for name in self._names.pop(node, ()):
                self._said.pop((name, node), None)
                self._unsaved.pop((name, node), None)
        for key in [k for k in self._unsaved if gone(k[1])]:
            del self._unsaved[key]

    async def save(self, store: Store) -> None:
        """Write the records of what was heard; a ``StoreError`` leaves them queued for the next call."""
        self._queue()
        if not self._unsaved:
            return
        batch = dict(self._unsaved)
        written = await store.save_replicas(list(batch.values()))
        for key, record in batch.items():
            if self._unsaved.get(key) is record:
                del self._unsaved[key]
        if written < len(batch):
            self.log.info("replicas.not_written", records=len(batch) - written,
                          reason="their buckets' leases moved on: the new owner writes them")

    def _queue(self) -> None:
        """Turn what was heard into records, for the nodes this controller acts on at this moment (the others
        wait: a lease round late, or dropped by ``release``)."""
        for node, (datasets, online, http) in list(self._heard.items()):
            epoch = self.epoch_of(node)
            if epoch is None:
                continue
            del self._heard[node]
            held = datasets if datasets is not None else {}
            before = self._names.pop(node, frozenset())
            if held:
                self._names[node] = frozenset(held)
            for name in before - held.keys():
                self._said.pop((name, node), None)
                self._unsaved[(name, node)] = ReplicaRecord(name, node, None, online, http, epoch)
            for name, summary in held.items():
                said = _compared(summary, online, http)
                if self._said.get((name, node)) != said:
                    self._said[(name, node)] = said
                    self._unsaved[(name, node)] = ReplicaRecord(name, node, wire.encode(summary), online, http,
                                                                epoch)

    # --- every controller's nodes ------------------------------------------------------------------

    async def sync(self, store: Store) -> set[str]:
        """Read what changed in the store (everything, every ``FULL_EVERY``); the datasets whose replicas
        changed."""
        now = self.monotonic()
        if self._since is None or now - self._full_at >= FULL_EVERY:
            await store.forget_replicas(older_than=FORGET_AFTER)
            records, self._since = await store.replicas_changed(after=0, since=None)
            self._full_at = now
            return self._take_all(records)
        records, self._since = await store.replicas_changed(after=self._after, since=self._since - OVERLAP)
        changed = {record.dataset for record in records if self._take(record)}
        if changed:
            self.version += 1
        return changed

    def _take(self, record: ReplicaRecord) -> bool:
        """Apply one record unless the one held is as new; whether anything changed."""
        key = (record.dataset, record.node)
        self._after = max(self._after, record.seq)
        held = self._seq.get(key)
        if held is not None and record.seq <= held:
            return False
        summary = self._summary(record)
        replicas = self.elsewhere.get(record.dataset, {})
        if summary is None:  # no longer held there (or unreadable): gone from the comparison
            self._seq.pop(key, None)
            if replicas.pop(record.node, None) is None:
                return False
            if not replicas:
                del self.elsewhere[record.dataset]
            return True
        self._seq[key] = record.seq
        self.elsewhere.setdefault(record.dataset, replicas)[record.node] = \
            Held(record.node, summary, record.online, record.http, here=False)
        return True

    def _take_all(self, records: list[ReplicaRecord]) -> set[str]:
        """Replace everything held by ``records`` (the whole table); the datasets that changed."""
        before = self.elsewhere
        self.elsewhere, self._seq, self._after = {}, {}, 0
        for record in records:
            self._take(record)
        changed = {name for name in before.keys() | self.elsewhere.keys()
                   if before.get(name) != self.elsewhere.get(name)}
        if changed:
            self.version += 1
        return changed

    def _summary(self, record: ReplicaRecord) -> wire.DatasetSummary | None:
        if record.summary is None:
            return None
        try:
            summary = _decode(record.summary)
        except msgspec.DecodeError as exc:  # not what this version writes: skipped, with the reason
            self.log.warning("replicas.unreadable", dataset=record.dataset, node=record.node, error=str(exc)[:200])
            return None
        return summary if summary.name == record.dataset else None
