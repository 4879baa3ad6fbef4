"""The notification log's keys without I/O: the same on every controller, one per state change and destination."""

from __future__ import annotations

from collections.abc import Sequence

from controller.notify import Notification, incident_labels
from controller.notify.claims import Claims, cause_of, notification_key
from selfheal.clocks import SystemClock
from selfheal.errors import StoreError


def note(incident: int, event: str = "opened", *, action: str = "", outcome: str = "", text: str = "",
         cause: str = "", at: float = 1000.0) -> Notification:
    return Notification(incident_id=incident, event=event, severity="critical",  # type: ignore[arg-type]
                        title="t", text=text, node="node-a", unit="web", kind="unit_exited", summary="web exited",
                        action=action, outcome=outcome, at=at, cause=cause,
                        labels=incident_labels(kind="unit_exited", node="node-a", unit="web", severity="warning",
                                               rule="r", node_labels={}))


def life(incident: int, *, at: float) -> list[Notification]:
    """Two restarts that both fail the same way, then an escalation: the timings differ from run to run."""
    return [note(incident, "opened", text="web exited", at=at),
            note(incident, "action", action="restart_unit", text="restart_unit (rule r, attempt 1)", at=at + 1),
            note(incident, "outcome", action="restart_unit", outcome="failed", text="not running within 30s",
                 at=at + 2),
            note(incident, "action", action="restart_unit", text="restart_unit (rule r, attempt 2)", at=at + 3),
            note(incident, "outcome", action="restart_unit", outcome="failed", text="not running within 30s",
                 at=at + 4),
            note(incident, "outcome", action="restart_unit", outcome="succeeded",
                 text=f"running {at % 7:.2f}s after the action", cause="7-3", at=at + 5),
            note(incident, "resolved", text=f"cleared at {at}", at=at + 6)]


def keys(notifications: Sequence[Notification], destination: str = "ops") -> list[str]:
    claims = Claims(None, clock=SystemClock())
    return [notification_key(n.incident_id, n.event, claims.cause(n), destination) for n in notifications]


def test_the_key_has_no_time_or_random_part_so_every_controller_derives_the_same() -> None:
    first, second = keys(life(7, at=1000.0)), keys(life(7, at=2345.6))
    assert first == second
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in first)


def test_each_state_change_and_destination_has_a_key_of_its_own() -> None:
    mine = keys(life(7, at=1000.0))
    assert len(set(mine)) == len(mine)  # the second attempt's outcome is not the first's, though its text is
    assert set(mine).isdisjoint(keys(life(7, at=1000.0), destination="pager"))
    assert set(mine).isdisjoint(keys(life(8, at=1000.0)))


def test_causes() -> None:
    assert cause_of(note(1, "opened", text="a")) == cause_of(note(1, "opened", text="b")) == ""
    assert cause_of(note(1, "resolved", text="cleared for 5s")) == ""
    assert cause_of(note(1, "approval_needed", text="plan 1-2 (restart) awaits approval")) == \
        "||plan 1-2 (restart) awaits approval"
    assert cause_of(note(1, "outcome", action="restart_unit", outcome="failed", text="x"),
                    last_action="restart_unit|attempt 2") == "restart_unit|attempt 2"
    assert cause_of(note(1, "outcome", outcome="failed", text="x", cause="1-2"), last_action="other") == "1-2"


class Refusing:
    """A notification log that cannot answer (a full disk, PostgreSQL down)."""

    async def claim_notification(self, *, key: str, incident_id: int, event: str, destination: str,
                                 at: float) -> bool:
        raise StoreError("disk full")

    async def finish_notifications(self, keys: Sequence[str], *, outcome: str, at: float) -> None:
        raise StoreError("disk full")


async def test_a_log_that_cannot_answer_sends_rather_than_loses() -> None:
    claims = Claims(Refusing(), clock=SystemClock())
    n = note(1)
    assert await claims.claim(n, "ops", notification_key(1, "opened", claims.cause(n), "ops")) is True
    await claims.finish(["k"], "sent")  # bookkeeping only: no exception reaches the lane


async def test_without_a_log_every_claim_is_won() -> None:
    claims = Claims(None, clock=SystemClock())
    assert await claims.claim(note(1), "ops", "k") is True
    assert await claims.claim(note(1), "ops", "k") is True
