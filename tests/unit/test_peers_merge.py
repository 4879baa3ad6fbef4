"""Merging the controllers' parts of the fleet view (``controller.peers``): pages of disjoint node sets."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from controller.peers import merge_counts, merge_pages, merge_views, node_key


def page(ids: list[str], after: str | None, limit: int) -> dict[str, Any]:
    """What one controller answers for ``after``/``limit`` over the nodes ``ids`` it owns."""
    rest = sorted(i for i in ids if after is None or i > after)
    items = [{"id": i} for i in rest[:limit]]
    return {"items": items, "next": items[-1]["id"] if len(rest) > limit else None}


def walk(parts: list[list[str]], limit: int) -> list[str]:
    seen: list[str] = []
    after = None
    for _ in range(1000):
        items, after = merge_pages([page(p, after, limit) for p in parts], limit, node_key, node_key)
        seen += [str(i["id"]) for i in items]
        if after is None:
            return seen
    raise AssertionError("the pages never ended")


def test_a_page_stops_where_a_part_with_more_stops() -> None:
    a, b = ["n1", "n3", "n5", "n7"], ["n2", "n4"]
    items, cursor = merge_pages([page(a, None, 2), page(b, None, 2)], 2, node_key, node_key)
    assert [i["id"] for i in items] == ["n1", "n2"]
    assert cursor == "n2"
    items, cursor = merge_pages([page(a, "n2", 2), page(b, "n2", 2)], 2, node_key, node_key)
    assert [i["id"] for i in items] == ["n3", "n4"]


@given(st.sets(st.integers(0, 300), max_size=60), st.integers(1, 4), st.integers(1, 7))
def test_walking_the_merged_pages_lists_every_node_once_in_order(ids: set[int], parts: int, limit: int) -> None:
    names = [f"n{i:03d}" for i in sorted(ids)]
    split = [[n for j, n in enumerate(names) if j % parts == k] for k in range(parts)]
    assert walk(split, limit) == names


def test_counts_are_summed_state_by_state() -> None:
    one = {"nodes": 2, "online": 2, "offline": 0, "units": 3, "unhealthy": 1, "problem_nodes": 1,
           "unit_states": {"running": 2, "exited": 1}}
    two = {"nodes": 1, "online": 0, "offline": 1, "units": 1, "unhealthy": 0, "problem_nodes": 1,
           "unit_states": {"running": 1}}
    assert merge_counts([one, two]) == {"nodes": 3, "online": 2, "offline": 1, "units": 4, "unhealthy": 1,
                                        "problem_nodes": 2, "unit_states": {"running": 3, "exited": 1}}


def test_the_status_page_lists_the_units_of_the_listed_nodes_only() -> None:
    counts = {"nodes": 0, "online": 0, "offline": 0, "units": 0, "unhealthy": 0, "problem_nodes": 0,
              "unit_states": {}}
    mine = {"counts": counts, "nodes": [{"id": "a"}, {"id": "c"}], "next": "c",
            "units": [{"node": "a", "name": "web"}, {"node": "c", "name": "db"}], "problems": [{"id": "c"}]}
    theirs = {"counts": counts, "nodes": [{"id": "b"}], "next": None,
              "units": [{"node": "b", "name": "api"}], "problems": [{"id": "b"}]}
    view = merge_views([mine, theirs], 2, 10)
    assert [n["id"] for n in view["nodes"]] == ["a", "b"]
    assert view["next"] == "b"
    assert [(u["node"], u["name"]) for u in view["units"]] == [("a", "web"), ("b", "api")]
    assert [p["id"] for p in view["problems"]] == ["b", "c"]
