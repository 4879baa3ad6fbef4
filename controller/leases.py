"""Membership and bucket leases on PostgreSQL: which controller acts on which of the 64 topic buckets.

Several controllers share one fleet through one PostgreSQL store (DESIGN §8). Each node's traffic lives
under one of ``wire.BUCKETS`` topic buckets, and each bucket is acted on by one controller at a time, the
holder of its lease. Nothing here is home-made consensus: the database's row locks and its clock decide.

- **Membership** (``controller_members``): every ``renew_every`` seconds a controller writes its heartbeat,
  timed by the *database's* clock (``now()``); a member is live while its heartbeat is younger than ``ttl``
  by that clock. Rows of members silent for ``FORGET_AFTER`` are removed, so restarts (a new default id
  each) do not grow the table. Each heartbeat also writes the member's API address (``api``): peers ask
  one another for their part of the fleet view, and forward a call to the owner (``controller.peers``).
- **Assignment** (``assign``): rendezvous (highest random weight) hashing of (bucket, member) over the live
  members: every member computes the same answer from the same list, and when a member joins or leaves
  only the buckets it gains or had move, about 1/N of them. The weight is blake2b, not Python's salted
  ``hash``, so every process agrees.
- **Leases** (``bucket_leases``, one row per bucket, made by the migration and never deleted): a member
  takes a bucket assigned to it only when the row is free (released), expired, or its own, so two
  controllers never hold one bucket; a controller releases the buckets no longer assigned to it (a member
  joined) after it has stopped acting on them. Taking, renewing and releasing are one statement
  (``claim``) that locks its rows in bucket order (no deadlocks between controllers) and reads the
  database's clock: the lease lasts until ``now() + ttl``. Each grant carries an **epoch**, the fencing
  token: renewal by the holder keeps it; any other grant (another owner, or the holder's own lease after
  it expired or was released) raises it by one. A row's epoch is never reset, even when its owner changes
  back, and a trigger refuses an update that lowers it. ``pgstore.epoch_current`` is the check the
  store makes before a write made under an epoch.
- **Acting safely** (``LeaseKeeper.owned``): a bucket counts as owned only until a local monotonic
  deadline, the moment the renewing request was *sent* plus ``ttl - margin``. The database started its
  clock later than that send, so a controller that cannot renew (the database is down, the network cut,
  the process paused by SIGSTOP) stops acting at least ``margin`` before any other controller can take
  the bucket. Owned sets are published (``LeaseChange``, ``LeaseKeeper.changed``) so the controller can
  subscribe and unsubscribe the buckets' topics.
- **Failures** never stop the loop: an error talking to PostgreSQL is logged (``lease.db_error``),
  counted (``LeaseKeeper.errors``), the connection dropped, and the next round runs after a short
  exponential backoff with jitter (at most ``renew_every``). The keeper has its own connection, not the
  store's pool, so store traffic never delays a renewal.

Time: leases and membership use only the database's clock; the only local clock is a monotonic one (boot
time, which counts a suspend), for the deadlines of this process. Controllers' wall clocks may disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import asyncpg
import msgspec

from controller.pgstore import migrate
from selfheal.config_checks import redact_url
from selfheal.errors import StoreError
from selfheal.logs import get_logger
from selfheal.wire import BUCKETS

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

TTL = 6.0
"""Seconds a lease and a heartbeat last, by the database's clock."""
RENEW_EVERY = 2.0
"""Seconds between two rounds (heartbeat, assignment, renewal)."""
FORGET_AFTER = 86400.0
"""Seconds after which a silent member's row is deleted (it has long stopped counting as live)."""

log = get_logger("lease")

_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _now() -> float:
    """The clock of local deadlines: monotonic, and unlike the loop's it counts a suspend of the host, during
    which the database's clock runs on and the leases expire (Linux; elsewhere the monotonic clock)."""
    return time.clock_gettime(_CLOCK)


_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
              StoreError)
"""What talking to PostgreSQL may raise: counted and retried, never the end of the loop."""

# --- assignment -----------------------------------------------------------------------------------


def weight(bucket: int, member: str) -> int:
    """The rendezvous weight of ``member`` for ``bucket``: the same in every process and Python version."""
    digest = hashlib.blake2b(f"{bucket}/{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(buckets: Iterable[int], members: Iterable[str]) -> dict[int, str]:
    """bucket → the member with the highest weight for it (ties, astronomically rare, to the greater id).

    No members: no owners. The answer depends only on the set of members, not their order.
    """
    pool = sorted(set(members))
    return {bucket: _winner(bucket, pool) for bucket in buckets} if pool else {}


def _winner(bucket: int, members: list[str]) -> str:
    return max(members, key=lambda member: (weight(bucket, member), member))


# --- statements -----------------------------------------------------------------------------------

_HEARTBEAT = """
WITH beat AS (
    INSERT INTO controller_members AS m (id, started_at, heartbeat_at, api) VALUES ($1, now(), now(), $4)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), api = $4,
        started_at = CASE WHEN m.heartbeat_at > now() - make_interval(secs => $2::float8)
                          THEN m.started_at ELSE now() END
), forgotten AS (
    DELETE FROM controller_members WHERE id <> $1 AND heartbeat_at < now() - make_interval(secs => $3::float8)
)
SELECT id, api FROM controller_members WHERE id <> $1 AND heartbeat_at > now() - make_interval(secs => $2::float8)
"""
"""Write ``$1``'s heartbeat (and its API address ``$4``) and list the other live members with theirs (a CTE's
write is not visible to its query)."""

_CLAIM = """
WITH locked AS MATERIALIZED (
    SELECT bucket FROM bucket_leases WHERE bucket = ANY($2::int[]) OR owner = $1 ORDER BY bucket FOR UPDATE
)
UPDATE bucket_leases AS l SET
    epoch = CASE WHEN l.bucket = ANY($2::int[]) AND (l.owner IS DISTINCT FROM $1 OR l.expires_at <= now())
                 THEN l.epoch + 1 ELSE l.epoch END,
    owner = CASE WHEN l.bucket = ANY($2::int[]) THEN $1 END,
    expires_at = CASE WHEN l.bucket = ANY($2::int[]) THEN now() + make_interval(secs => $3::float8)
                      ELSE now() END
FROM locked
WHERE l.bucket = locked.bucket AND CASE
    WHEN l.bucket = ANY($2::int[]) THEN l.owner IS NULL OR l.owner = $1 OR l.expires_at <= now()
    ELSE l.owner = $1
END
RETURNING l.bucket, l.epoch, l.owner
"""
"""Take or renew the buckets ``$2`` for ``$1`` and release every other bucket it holds. The CTE locks every
row involved in bucket order before any is changed, so concurrent claims queue instead of deadlocking."""

_LEAVE = "DELETE FROM controller_members WHERE id = $1"



async def peers(conn: Connection, member: str, ttl: float, *, api: str = "",
                timeout: float | None = None) -> dict[str, str]:
    """Record ``member``'s heartbeat with its API address; returns the other live members → their addresses."""
    rows = await conn.fetch(_HEARTBEAT, member, ttl, FORGET_AFTER, api, timeout=timeout)
    return {str(row[0]): str(row[1]) for row in rows}


async def claim(conn: Connection, member: str, buckets: Iterable[int], ttl: float, *,
                timeout: float | None = None) -> dict[int, int]:
    """Take or renew ``buckets`` for ``member`` for ``ttl`` seconds of the database's clock, and release every
    other bucket it holds; returns bucket → epoch of what it now holds (those held by another live member
    are left out). ``buckets`` empty: release everything.

    The caller must have stopped acting on the buckets it releases *before* calling this.
    """
    rows = await conn.fetch(_CLAIM, member, sorted(set(buckets)), ttl, timeout=timeout)
    return {int(bucket): int(epoch) for bucket, epoch, owner in rows if owner == member}


# --- the keeper -----------------------------------------------------------------------------------


class LeaseChange(msgspec.Struct, frozen=True, kw_only=True):
    """What changed in the buckets a keeper owns. A bucket granted again under a new epoch (after its lease
    lapsed) is in both: lost with the old epoch, gained with the new one."""

    gained: dict[int, int]
    """bucket → epoch now owned: subscribe its topics, act under this epoch."""
    lost: dict[int, int]
    """bucket → epoch no longer owned: stop acting on it now, unsubscribe."""
    owned: dict[int, int]
    """Everything owned after the change."""
    reason: str
    """Why buckets were lost: ``rebalanced``, ``not renewed in time``, ``held by another``, ``leaving``."""


class _Lease(NamedTuple):
    epoch: int
    deadline: float
    """``_now()`` until which this process may act on the bucket."""


Listener = Callable[[LeaseChange], None]


class LeaseKeeper:
    """Keeps ``member``'s membership and bucket leases in the PostgreSQL database at ``url``.

    ``await keeper.run(stop=event)`` runs the rounds until ``stop`` is set, then stops acting, releases its
    buckets and leaves (peers take them at their next round). Cancelled instead, it neither releases nor
    leaves, as if killed: peers take its buckets once the leases expire. ``owned()`` answers what may be
    acted on at this instant; listeners (``subscribe``) and ``changed`` hear every change.

    ``margin`` (default ``renew_every``, at least that) is how long before the database could hand a bucket
    to another controller this one stops acting on it; ``ttl - margin`` must exceed ``renew_every``.
    """

    def __init__(self, url: str, member: str, *, ttl: float = TTL, renew_every: float = RENEW_EVERY,
                 margin: float | None = None, buckets: int = BUCKETS, on_change: Listener | None = None) -> None:
        margin = renew_every if margin is None else margin
        if not member:
            raise ValueError("a lease keeper needs a member id (controller.id)")
        if renew_every <= 0 or ttl <= 0:
            raise ValueError(f"ttl ({ttl}) and renew_every ({renew_every}) must be > 0")
        if margin < renew_every:
            raise ValueError(f"margin ({margin}) must be at least renew_every ({renew_every})")
        if not 0 < buckets <= BUCKETS:
            raise ValueError(f"buckets must be in 1..{BUCKETS}, not {buckets}")
        if ttl - margin <= renew_every:
            raise ValueError(f"ttl - margin ({ttl} - {margin}) must exceed renew_every ({renew_every}), or every "
                             "bucket would lapse between two renewals")
        self.url = url
        self.member = member
        self.ttl = ttl
        self.renew_every = renew_every
        self.margin = margin
        self.buckets = buckets
        self.members: tuple[str, ...] = ()
        """The live members at the last round, this one included."""
        self.api = ""
        """This controller's API address for its peers (``controller.peers``), set before ``run``."""
        self.peers: dict[str, str] = {}
        """The other live members at the last round → their API addresses."""
        self.errors: Counter[str] = Counter()
        """Failed rounds by reason (``connect``, ``io_error``, ``timeout``, ``refused``), and connections found
        closed between rounds (``connection_lost``)."""
        self.changed = asyncio.Event()
        """Set at every change of the owned set; a waiter clears it, then reads ``owned()``."""
        self._listeners: list[Listener] = [on_change] if on_change is not None else []
        self._leases: dict[int, _Lease] = {}
        self._published: dict[int, int] = {}
        self.gained_at: dict[int, float] = {}
        """bucket → when this process last gained it (the local deadline clock): a bucket held only a moment
        has not heard from its nodes yet (``settled``)."""
        self._renewed = asyncio.Event()
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._migrated = False
        self._failures = 0
        self._log = log.bind(member=member)

    @property
    def validity(self) -> float:
        """Seconds a renewal lets this process act, counted from when it was sent: ``ttl - margin``."""
        return self.ttl - self.margin

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every change of the owned set, synchronously, in the keeper's task: it should
        only record or hand over the change (an exception from it ends ``run``, and the leases then lapse)."""
        self._listeners.append(listener)

    def owned(self) -> dict[int, int]:
        """bucket → epoch of every bucket this process may act on now (its local deadline not yet passed)."""
        now = _now()
        return {bucket: lease.epoch for bucket, lease in self._leases.items() if now < lease.deadline}

    def settled(self, seconds: float) -> frozenset[int]:
        """The buckets owned now and held for at least ``seconds``: their nodes have had time to report."""
        now = _now()
        return frozenset(b for b in self.owned() if now - self.gained_at.get(b, now) >= seconds)

    def holds(self, bucket: int, epoch: int) -> bool:
        """Whether ``bucket`` is owned now under ``epoch``: the check before acting under that epoch."""
        return self.owned().get(bucket) == epoch

    async def run(self, *, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                expiry = tg.create_task(self._expire_locally(), name=f"lease-expiry-{self.member}")
                await self._keep(stop)
                expiry.cancel()
            await self._leave()
        finally:
            self._disconnect()

    # --- rounds -----------------------------------------------------------------------------------

    async def _keep(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            began = _now()
            try:
                await self._round()
            except _DB_ERRORS as exc:
                delay = self._failed(exc)
            else:
                if self._failures:
                    self._log.info("lease.db_recovered", failures=self._failures)
                self._failures = 0
                delay = max(0.0, self.renew_every - (_now() - began))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _round(self) -> None:
        """Heartbeat, assign over the live members, stop acting on what is no longer ours, claim the rest."""
        conn = await self._connection()
        self.peers = await peers(conn, self.member, self.ttl, api=self.api, timeout=self.validity)
        members = tuple(sorted({self.member, *self.peers}))
        if members != self.members:
            self._log.info("lease.members", members=list(members), joined=not self.members)
            self.members = members
        mine = {bucket for bucket, owner in assign(range(self.buckets), members).items() if owner == self.member}
        for bucket in set(self._leases) - mine:
            del self._leases[bucket]
        self._publish("rebalanced")  # stop acting on them before the release goes out
        sent = _now()
        granted = await claim(conn, self.member, mine, self.ttl, timeout=self.validity)
        self._leases = {bucket: _Lease(epoch, sent + self.validity) for bucket, epoch in granted.items()}
        self._publish("held by another")
        self._renewed.set()

    async def _expire_locally(self) -> None:
        """Publish the loss of buckets whose deadline passed without a renewal, at that deadline."""
        while True:
            self._renewed.clear()
            self._publish("not renewed in time")
            now = _now()
            upcoming = [lease.deadline for lease in self._leases.values() if lease.deadline > now]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renewed.wait(), min(upcoming) - now if upcoming else None)

    async def _leave(self) -> None:
        """Stop acting on everything, then release it and delete the membership row (best effort)."""
        released = self.owned()
        self._leases = {}
        self._publish("leaving")
        try:
            conn = await self._connection()
            await claim(conn, self.member, (), self.ttl, timeout=self.validity)
            await conn.execute(_LEAVE, self.member, timeout=self.validity)
        except _DB_ERRORS as exc:
            self.errors[_reason(exc)] += 1
            self._log.warning("lease.leave_failed", error=_describe(exc), note="peers take the buckets at expiry")
            return
        self._log.info("lease.left", released=sorted(released))

    # --- state ------------------------------------------------------------------------------------

    def _publish(self, reason: str) -> None:
        """Tell listeners what changed since the last publication; ``reason`` is why buckets were lost."""
        owned = self.owned()
        before = self._published
        lost = {bucket: epoch for bucket, epoch in before.items() if owned.get(bucket) != epoch}
        gained = {bucket: epoch for bucket, epoch in owned.items() if before.get(bucket) != epoch}
        if not lost and not gained:
            return
        self._published = owned
        now = _now()
        self.gained_at = {b: (now if b in gained else self.gained_at.get(b, now)) for b in owned}
        if lost:
            level = self._log.warning if reason == "not renewed in time" else self._log.info
            level("lease.lost", buckets=sorted(lost), reason=reason, owned=len(owned))
        if gained:
            self._log.info("lease.gained", epochs={str(b): e for b, e in sorted(gained.items())}, owned=len(owned))
        change = LeaseChange(gained=gained, lost=lost, owned=owned, reason=reason)
        self.changed.set()
        for listener in self._listeners:
            listener(change)

    # --- the connection ---------------------------------------------------------------------------

    async def _connection(self) -> asyncpg.Connection[asyncpg.Record]:
        if self._conn is not None:
            if not self._conn.is_closed():
                return self._conn
            self._conn = None  # closed while idle (the server restarted, or terminated it): counted, replaced
            self.errors["connection_lost"] += 1
            self._log.warning("lease.connection_lost", store=redact_url(self.url), owned=len(self.owned()))
        try:
            conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
                self.url, timeout=self.validity, command_timeout=self.validity,
                server_settings={"application_name": f"selfheal-lease {self.member}"[:63]})
        except _DB_ERRORS as exc:
            raise _ConnectFailed(exc) from exc
        try:
            if not self._migrated:  # the store migrates too; whichever starts first makes the tables
                await migrate(conn)
                self._migrated = True
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    def _disconnect(self) -> None:
        """Drop the connection without a goodbye: a broken or hung one must not hold the loop."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    def _failed(self, exc: BaseException) -> float:
        """Count and log a failed round, drop the connection; returns the wait before the next round."""
        self._failures += 1
        self.errors[_reason(exc)] += 1
        self._disconnect()
        ramp = self.renew_every / 4 * 2.0 ** min(self._failures - 1, 8)
        delay = min(self.renew_every, ramp) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        self._log.warning("lease.db_error", store=redact_url(self.url), error=_describe(exc),
                          reason=_reason(exc), failures=self._failures, retry_in=round(delay, 3),
                          owned=len(self.owned()))
        return delay


class _ConnectFailed(OSError):
    """The connection could not be opened (its cause says why)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _ConnectFailed):
        return "connect"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                        asyncpg.exceptions.OperatorInterventionError)):
        return "io_error"
    return "refused"


def _describe(exc: BaseException) -> str:
    cause: Any = exc.__cause__ if isinstance(exc, _ConnectFailed) else exc
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
