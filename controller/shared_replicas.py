"""Dataset replicas across controllers: each writes what it hears of its own nodes' replicas to the shared store
and reads back what the others heard, so replicas in different controllers' buckets are compared.

One controller (SQLite) hears every node and needs none of this. Several controllers sharing a PostgreSQL
store each hear only the nodes of their buckets; without the others' replicas a divergent one goes unseen
(its controller holds no other copy to compare it with), or two copies on one controller disagree 1 to 1
with no majority although a third elsewhere would decide.

- **Written by the node's controller** (``heard``, then ``save`` once a second): a replica's record when what
  the comparison reads changed — root, state, manifest root, files, bytes, generation, chunk size, error — or
  the node's presence or address did; a rescan that found the same tree writes nothing. A dataset the node no
  longer holds is written as a record without summary. A node this controller stops hearing because its
  bucket moved (or it was evicted) gets no record: what it wrote stands until the next owner writes. The store
  drops a record written under an epoch that is not its bucket's live lease (``Store.save_replicas``), so a
  controller that lost the bucket cannot overwrite the new owner's records.
- **Read by every controller** (``sync``, once a second): the records numbered after the last one seen, and
  those stamped in the last ``OVERLAP`` seconds by the database's clock — a transaction that took its number
  before another but committed after it is still read. What a read costs is what changed, not the fleet.
  A record replaces the one held only when its number is higher.

``controller.observe`` merges these with the replicas it hears itself (its own win for its own nodes) and keeps
the findings to the nodes it acts on; ``controller.resync`` may fetch from a replica on another controller's
node (it verifies every listing against the root in the record, as for its own), signing the transfer token
with that node's key from the shared key directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from controller.datasets import Held
from controller.store import ReplicaRecord, Store
from selfheal import wire
from selfheal.logs import get_logger

OVERLAP = 30.0
"""Seconds of records read again at every sync (see the module doc)."""

_decode = msgspec.json.Decoder(wire.DatasetSummary).decode


def _compared(summary: wire.DatasetSummary | None, online: bool, http: str) -> tuple[object, ...]:
    """What a record says that matters to the others (a rescan's times do not)."""
    if summary is None:
        return (None,)
    s = summary
    return (s.root, s.state, s.manifest_root, s.files, s.bytes, s.generation, s.chunk_size, s.error, online, http)


class SharedReplicas:
    def __init__(self, epoch_of: Callable[[str], int | None]) -> None:
        self.epoch_of = epoch_of
        """The epoch this controller acts on a node under now (``Ownership.epoch_of``); None: not its node."""
        self.elsewhere: dict[str, dict[str, Held]] = {}
        """Dataset → node → its replica as the store has it (every controller's records, this one's too)."""
        self.version = 0
        """Bumped whenever ``elsewhere`` changed: a view built from it is current while this has not moved."""
        self._seq: dict[tuple[str, str], int] = {}
        self._said: dict[tuple[str, str], tuple[object, ...]] = {}
        """(dataset, node) → what this controller last queued for it."""
        self._names: dict[str, frozenset[str]] = {}
        """node → the datasets it was heard holding."""
        self._unsaved: dict[tuple[str, str], ReplicaRecord] = {}
        self._after = 0
        self._since: float | None = None
        self.log = get_logger("controller.shared_replicas")

    def heard(self, node: str, datasets: Mapping[str, wire.DatasetSummary] | None, *, online: bool = False,
              http: str = "") -> None:
        """A node this controller acts on reported its datasets or its presence changed (None: it is not
        heard here any more); queue the records that say something new."""
        before = self._names.pop(node, frozenset())
        if datasets is None:
            for name in before:
                self._said.pop((name, node), None)
                self._unsaved.pop((name, node), None)
            return
        epoch = self.epoch_of(node)
        if epoch is None:
            return
        self._names[node] = frozenset(datasets)
        changes: dict[str, wire.DatasetSummary | None] = dict.fromkeys(before - set(datasets))
        for name, summary in {**changes, **datasets}.items():
            said = _compared(summary, online, http)
            if self._said.get((name, node)) == said:
                continue
            self._said[(name, node)] = said
            self._unsaved[(name, node)] = ReplicaRecord(
                name, node, None if summary is None else wire.encode(summary), online, http, epoch)

    async def save(self, store: Store) -> None:
        """Write what was queued; a ``StoreError`` leaves it queued for the next call."""
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

    async def sync(self, store: Store) -> set[str]:
        """Read what changed in the store since the last call; the datasets whose replicas changed."""
        records, now = await store.replicas_changed(
            after=self._after, since=None if self._since is None else self._since - OVERLAP)
        self._since = now
        changed: set[str] = set()
        for record in records:
            key = (record.dataset, record.node)
            self._after = max(self._after, record.seq)
            if record.seq <= self._seq.get(key, 0):
                continue
            self._seq[key] = record.seq
            replicas = self.elsewhere.setdefault(record.dataset, {})
            summary = self._summary(record)
            if summary is None:
                replicas.pop(record.node, None)
                if not replicas:
                    del self.elsewhere[record.dataset]
            else:
                replicas[record.node] = Held(record.node, summary, record.online, record.http, here=False)
            changed.add(record.dataset)
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
