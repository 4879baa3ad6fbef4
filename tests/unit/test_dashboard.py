"""The Grafana dashboard is importable JSON whose panels query only selfheal's own metrics."""

from __future__ import annotations

from tests.dashboard_support import exprs, load_dashboard, metric_names


def test_the_dashboard_has_the_structure_grafana_imports() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] == "selfheal"
    assert dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid)
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"stat", "timeseries", "gauge", "table", "bargauge"}
        assert panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_the_dashboard_covers_what_operators_need_using_only_selfheal_metrics() -> None:
    dashboard = load_dashboard()
    used = set().union(*(metric_names(e) for e in exprs(dashboard)))
    assert used, "no metric names found"
    assert all(name.startswith("selfheal_") for name in used), sorted(used)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("nodes", "incidents", "outcome", "mttr", "dataset agreement"):
        assert topic in titles, topic


def test_metric_names_are_read_from_promql() -> None:
    expr = 'histogram_quantile(0.9, sum by (le, action) (rate(selfheal_x_bucket{a="b c"}[5m]))) / on(k) y_total'
    assert metric_names(expr) == {"selfheal_x_bucket", "y_total"}
