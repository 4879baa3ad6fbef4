"""Command executor decisions: signature, node, expiry, epoch, at-most-once, unknown units."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from agent.executor import CommandExecutor, check_authentic, check_fresh
from agent.ledger import Ledger
from selfheal.clocks import ManualClock
from selfheal.errors import UnitError
from selfheal.wire import Command, RestartUnit, sign_command

NODE = "node-x"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@dataclass
class FakeUnit:
    pid: int = 4242


@dataclass
class FakeSupervisor:
    units: set[str] = field(default_factory=lambda: {"web"})
    restarted: list[str] = field(default_factory=list)

    async def restart(self, name: str) -> object:
        if name not in self.units:
            raise UnitError(f"unknown unit {name!r} on node {NODE!r} (units: web)")
        self.restarted.append(name)
        return FakeUnit()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def ledger(tmp_path: Path, clock: ManualClock) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite3").open(clock.wall()) as opened:
        yield opened


def make(clock: ManualClock, *, key: str = "k1", unit: str = "web", epoch: int = 1, ttl: float = 15.0,
         node: str = NODE, sign_with: bytes | None = KEY) -> Command:
    command = Command(id=f"cmd-{key}", key=key, node=node, epoch=epoch, issued_at=clock.wall(),
                      expires_at=clock.wall() + ttl, step=RestartUnit(unit=unit))
    return sign_command(command, sign_with) if sign_with is not None else command


def executor(ledger: Ledger, clock: ManualClock, units: FakeSupervisor,
             key: bytes | None = KEY) -> CommandExecutor:
    return CommandExecutor(node_id=NODE, key=key, ledger=ledger, units=units, clock=clock)


async def test_a_valid_command_runs_once_and_a_repeat_is_a_duplicate(ledger: Ledger,
                                                                     clock: ManualClock) -> None:
    units = FakeSupervisor()
    ex = executor(ledger, clock, units)
    first = await ex.execute(make(clock))
    assert (first.status, first.command_id, first.key) == ("done", "cmd-k1", "k1")
    assert "pid 4242" in first.detail
    again = await ex.execute(make(clock))
    assert again.status == "duplicate"
    assert again.detail == f"done: {first.detail}"
    assert units.restarted == ["web"]
    assert ex.counts == {"done": 1, "duplicate": 1}


async def test_duplicates_are_remembered_by_a_new_executor(ledger: Ledger, clock: ManualClock) -> None:
    units = FakeSupervisor()
    await executor(ledger, clock, units).execute(make(clock))
    later = await executor(ledger, clock, units).execute(make(clock))
    assert later.status == "duplicate"
    assert units.restarted == ["web"]


async def test_an_unknown_unit_fails_with_a_clear_detail(ledger: Ledger, clock: ManualClock) -> None:
    result = await executor(ledger, clock, FakeSupervisor()).execute(make(clock, unit="nope"))
    assert result.status == "failed"
    assert "unknown unit 'nope'" in result.detail


@pytest.mark.parametrize(("command_kw", "detail"), [
    ({"sign_with": None}, "unsigned command"),
    ({"sign_with": OTHER_KEY}, "bad signature"),
    ({"node": "node-y"}, "addressed to node 'node-y'"),
    ({"ttl": -1.0}, "expired"),
])
async def test_bad_commands_are_rejected_and_not_run(ledger: Ledger, clock: ManualClock,
                                                     command_kw: dict[str, object], detail: str) -> None:
    units = FakeSupervisor()
    ex = executor(ledger, clock, units)
    result = await ex.execute(make(clock, **command_kw))  # type: ignore[arg-type]
    assert result.status == "rejected"
    assert detail in result.detail
    assert units.restarted == []
    assert ex.counts == {"rejected": 1}


async def test_a_tampered_command_is_rejected(ledger: Ledger, clock: ManualClock) -> None:
    signed = make(clock)
    tampered = msgspec.structs.replace(signed, step=RestartUnit(unit="db"))
    result = await executor(ledger, clock, FakeSupervisor()).execute(tampered)
    assert (result.status, result.detail) == ("rejected", "bad signature")


async def test_a_forged_command_does_not_burn_its_key(ledger: Ledger, clock: ManualClock) -> None:
    units = FakeSupervisor()
    ex = executor(ledger, clock, units)
    assert (await ex.execute(make(clock, sign_with=OTHER_KEY))).status == "rejected"
    assert (await ex.execute(make(clock))).status == "done"


async def test_without_a_key_every_command_is_rejected_saying_why(ledger: Ledger,
                                                                 clock: ManualClock) -> None:
    result = await executor(ledger, clock, FakeSupervisor(), key=None).execute(make(clock))
    assert result.status == "rejected"
    assert "no command key" in result.detail


async def test_an_expired_command_is_rejected_at_execution_time(ledger: Ledger, clock: ManualClock) -> None:
    command = make(clock, ttl=5.0)
    clock.advance(5.5)
    result = await executor(ledger, clock, FakeSupervisor()).execute(command)
    assert result.status == "rejected"
    assert result.detail.startswith("expired")


async def test_a_stale_epoch_is_rejected_and_equal_or_higher_ones_run(ledger: Ledger,
                                                                      clock: ManualClock) -> None:
    units = FakeSupervisor()
    ex = executor(ledger, clock, units)
    assert (await ex.execute(make(clock, key="a", epoch=5))).status == "done"
    stale = await ex.execute(make(clock, key="b", epoch=4))
    assert (stale.status, stale.detail) == ("rejected", "stale epoch 4 < 5")
    assert (await ex.execute(make(clock, key="c", epoch=5))).status == "done"
    assert (await ex.execute(make(clock, key="d", epoch=7))).status == "done"
    assert ex.highest_epoch == 7
    assert ex.rejections == {"stale_epoch": 1}


async def test_a_redelivered_command_interrupted_by_a_crash_is_not_run_again(
        ledger: Ledger, clock: ManualClock) -> None:
    command = make(clock)
    ledger.claim(command.key, command.id, clock.wall())  # claimed, then the agent died
    units = FakeSupervisor()
    result = await executor(ledger, clock, units).execute(command)
    assert result.status == "duplicate"
    assert "interrupted" in result.detail
    assert units.restarted == []


async def test_a_duplicate_is_answered_even_after_expiry(ledger: Ledger, clock: ManualClock) -> None:
    ex = executor(ledger, clock, FakeSupervisor())
    command = make(clock, ttl=1.0)
    assert (await ex.execute(command)).status == "done"
    clock.advance(10)
    assert (await ex.execute(command)).status == "duplicate"


def test_the_pure_checks() -> None:
    clock = ManualClock()
    command = make(clock)
    assert check_authentic(command, node_id=NODE, key=KEY) is None
    assert check_authentic(command, node_id=NODE, key=OTHER_KEY) is not None
    rejection = check_authentic(command, node_id=NODE, key=None)
    assert rejection is not None
    assert rejection.reason == "no_key"
    assert check_fresh(command, now=clock.wall(), highest_epoch=1) is None
    assert check_fresh(command, now=clock.wall() + 16, highest_epoch=1) is not None
    assert check_fresh(command, now=clock.wall(), highest_epoch=2) is not None


def test_a_non_ascii_signature_is_simply_wrong() -> None:
    command = msgspec.structs.replace(make(ManualClock()), sig="é" * 64)
    rejection = check_authentic(command, node_id=NODE, key=KEY)
    assert rejection is not None
    assert rejection.reason == "bad_signature"
