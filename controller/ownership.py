"""Which nodes this controller acts on, and under which epoch its commands to them go out.

One controller (SQLite, the default) acts on every node under the epoch it drew at start (``Sole``).
Several controllers sharing a PostgreSQL store each act on the nodes of the topic buckets whose leases
they hold (``Leased``, over ``controller.leases.LeaseKeeper``), under each bucket's lease epoch. The
epoch is the fencing token: agents refuse a command whose epoch is below the highest they accepted, and
the PostgreSQL store refuses to record a command under an epoch that is no longer its bucket's.

``epoch_of`` is asked at the moment of acting: a lease lost a moment ago answers None, and the caller
stops (``NotOwner``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from selfheal.errors import SelfhealError
from selfheal.wire import BUCKETS, bucket_of

if TYPE_CHECKING:
    from controller.leases import LeaseKeeper

ALL_BUCKETS = frozenset(range(BUCKETS))


class NotOwner(SelfhealError):
    """This controller no longer holds the node's bucket: another one carries the work on; write nothing."""


class Ownership(Protocol):
    def epoch_of(self, node: str) -> int | None:
        """The epoch to act on ``node`` under now; None: not this controller's to act on."""
        ...

    def owns(self, node: str) -> bool: ...

    def partial(self) -> bool:
        """Whether other controllers act on some nodes now (this one holds fewer than all buckets)."""
        ...

    def settled(self, seconds: float) -> frozenset[int]:
        """The buckets this controller has acted on for at least ``seconds`` (long enough to have heard from
        their nodes)."""
        ...


class Sole:
    """The only controller: every node, one epoch (``Store.next_epoch`` at start)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_of(self, node: str) -> int | None:
        return self.epoch

    def owns(self, node: str) -> bool:
        return True

    def partial(self) -> bool:
        return False

    def settled(self, seconds: float) -> frozenset[int]:
        return ALL_BUCKETS


class Leased:
    """The nodes of the buckets whose leases this controller holds now, each under its bucket's epoch."""

    def __init__(self, keeper: LeaseKeeper) -> None:
        self.keeper = keeper

    def epoch_of(self, node: str) -> int | None:
        return self.keeper.owned().get(bucket_of(node))

    def owns(self, node: str) -> bool:
        return self.epoch_of(node) is not None

    def partial(self) -> bool:
        return len(self.keeper.owned()) < BUCKETS

    def settled(self, seconds: float) -> frozenset[int]:
        return self.keeper.settled(seconds)


def require_epoch(ownership: Ownership, node: str) -> int:
    """``ownership.epoch_of(node)``, or ``NotOwner``."""
    epoch = ownership.epoch_of(node)
    if epoch is None:
        raise NotOwner(f"{node}'s bucket {bucket_of(node)} is no longer held by this controller")
    return epoch
