"""Where each movable singleton runs: recorded as the fleet reports it, kept in the store.

A unit whose agent reports ``fence_after`` (``stop_after_disconnect`` in its
config) is a movable singleton. Whenever an online node reports it running,
that node becomes its placement — so a migration's new home is recorded the
moment the standby copy is up, and a controller restart still knows where a
unit lived while its node is down. ``detectors.placement`` turns placements
into ``unit_lost`` findings; the dispatcher reads ``fence_after`` to know how
long to wait before it may start a copy elsewhere.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from controller.store import PlacementRecord, Store
from detectors.placement import Placement
from selfheal.logs import get_logger


class Placements:
    def __init__(self) -> None:
        self.current: dict[str, PlacementRecord] = {}
        self._unsaved: dict[str, PlacementRecord] = {}
        self.log = get_logger("controller.placement")

    async def load(self, store: Store) -> None:
        self.current = {p.unit: p for p in await store.list_placements()}

    async def sync(self, store: Store) -> bool:
        """Take up what other controllers recorded (several controllers share the store): a unit moved to a
        node another controller acts on is that controller's to find lost from then on. What this one
        recorded meanwhile, saved or not, stands; it runs here, and the next pass records it again."""
        before, unsaved = dict(self.current), set(self._unsaved)
        stored = {p.unit: p for p in await store.list_placements()}
        changed = False
        for unit, record in stored.items():
            known = self.current.get(unit)
            # recorded here since the read began, or saved while it ran (the read may predate the save): stands
            if known is before.get(unit) and unit not in unsaved and unit not in self._unsaved and known != record:
                self.current[unit] = record
                changed = True
                self.log.info("placement.synced", unit=unit, node=record.node,
                              previous=known.node if known else None)
        return changed

    def observe(self, movable: Mapping[str, Mapping[str, float]], running: Mapping[str, Collection[str]],
                now: float) -> None:
        """Record the node each movable singleton runs on now (one node: the first, sorted, if two do).

        ``movable``: unit → the online nodes that run it as a movable singleton → its ``fence_after``
        there; ``running``: unit → the online nodes that run it at all."""
        for unit, copies in movable.items():
            for node_id in sorted(copies):
                fence_after = copies[node_id]
                known = self.current.get(unit)
                if known is not None and known.node == node_id and known.fence_after == fence_after:
                    continue
                if known is not None and known.node != node_id and known.node in running.get(unit, ()):
                    self.log.error("placement.two_copies", unit=unit, nodes=[known.node, node_id])
                    continue
                record = PlacementRecord(unit, node_id, fence_after, now)
                self.current[unit] = self._unsaved[unit] = record
                self.log.info("placement.recorded", unit=unit, node=node_id,
                              previous=known.node if known else None)

    async def save(self, store: Store) -> None:
        for unit, record in list(self._unsaved.items()):
            await store.save_placement(record)  # a StoreError leaves it unsaved, for the next pass
            if self._unsaved.get(unit) is record:
                del self._unsaved[unit]

    def placements(self) -> list[Placement]:
        return [Placement(p.unit, p.node, p.fence_after) for p in self.current.values()]

    def fence_after(self, unit: str) -> float | None:
        record = self.current.get(unit)
        return record.fence_after if record is not None else None

