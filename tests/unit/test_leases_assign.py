"""Rendezvous assignment of the topic buckets over live controllers (``controller.leases.assign``).

What the leases rely on: one owner per bucket, the same answer in every process, and when a member joins
or leaves only the buckets it gains or had move (about 1/N of them), so a rebalance disturbs little.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from hypothesis import assume, given
from hypothesis import strategies as st

from controller.leases import assign, weight
from selfheal.wire import BUCKETS

BUCKET_RANGE = range(BUCKETS)
member_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=24)
member_sets = st.sets(member_ids, min_size=1, max_size=12)


@given(member_sets)
def test_every_bucket_has_exactly_one_live_owner(members: set[str]) -> None:
    owners = assign(BUCKET_RANGE, members)
    assert sorted(owners) == list(BUCKET_RANGE)
    assert set(owners.values()) <= members


@given(member_sets)
def test_the_answer_depends_on_the_set_of_members_not_their_order(members: set[str]) -> None:
    ordered = sorted(members)
    assert assign(BUCKET_RANGE, ordered) == assign(BUCKET_RANGE, reversed(ordered)) == assign(
        BUCKET_RANGE, ordered + ordered)


@given(member_sets, member_ids)
def test_a_joining_member_takes_buckets_only_for_itself_and_a_leaving_one_gives_only_its_own(
        members: set[str], newcomer: str) -> None:
    """The rendezvous property: no bucket moves between members that stayed."""
    assume(newcomer not in members)
    before = assign(BUCKET_RANGE, members)
    after = assign(BUCKET_RANGE, members | {newcomer})
    for bucket in BUCKET_RANGE:
        assert after[bucket] in (before[bucket], newcomer)
    # and back: the newcomer leaves, its buckets go back where they were, nothing else moves
    assert assign(BUCKET_RANGE, members) == before


@given(st.sets(member_ids, min_size=2, max_size=12), st.data())
def test_when_a_member_leaves_only_its_buckets_move(members: set[str], data: st.DataObject) -> None:
    leaving = data.draw(st.sampled_from(sorted(members)))
    before = assign(BUCKET_RANGE, members)
    after = assign(BUCKET_RANGE, members - {leaving})
    for bucket in BUCKET_RANGE:
        assert after[bucket] != leaving
        if before[bucket] != leaving:
            assert after[bucket] == before[bucket]


def test_about_one_bucket_in_n_moves_when_the_nth_member_joins() -> None:
    """Averaged over many fleets (each answer is deterministic, so this is too)."""
    for size in (2, 3, 5):
        moved = []
        for fleet in range(200):
            members = [f"controller-{fleet}-{n}" for n in range(size - 1)]
            before = assign(BUCKET_RANGE, members)
            after = assign(BUCKET_RANGE, [*members, f"controller-{fleet}-new"])
            moved.append(sum(before[b] != after[b] for b in BUCKET_RANGE) / BUCKETS)
        assert abs(statistics.mean(moved) - 1 / size) < 0.03, (size, statistics.mean(moved))


def test_no_members_no_owners() -> None:
    assert assign(BUCKET_RANGE, []) == {}


def test_the_weights_are_the_same_in_another_process() -> None:
    """Not Python's salted ``hash``: a fresh interpreter (a new PYTHONHASHSEED) computes the same owners."""
    members = ["ctl-a-101", "ctl-b-202", "ctl-c-303"]
    code = f"from controller.leases import assign; print(sorted(assign(range({BUCKETS}), {members!r}).items()))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}, cwd=".")
    assert other.stdout.strip() == str(sorted(assign(BUCKET_RANGE, members).items()))


def test_the_weights_never_change_between_releases() -> None:
    """Controllers of two versions running side by side during an upgrade must agree on every owner."""
    assert weight(7, "ctl-a-101") == 18423264229997037218
    assert weight(0, "a") == 13225716355254514689
