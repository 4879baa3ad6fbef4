"""Reading the Grafana dashboard's PromQL: which metric names its panels use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "selfheal.json"
DATASET_METRICS = {"selfheal_dataset_agreement_ratio", "selfheal_dataset_files_agreement_ratio"}
"""Exported only while agents report datasets: allowed to be absent from a controller without any."""

_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "rate", "increase", "irate", "histogram_quantile",
    "topk", "bottomk", "abs", "clamp_min", "clamp_max", "delta", "deriv", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "offset", "bool", "le", "quantile", "avg_over_time", "max_over_time",
}


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [str(t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)        # strings
    text = re.sub(r"\{[^}]*\}", "", text)                # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)               # range selectors
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping label lists
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {n for n in names if n not in _PROMQL_WORDS and not n.startswith("__")}


def family_of(name: str) -> str:
    """The exposition family a sample name belongs to (a histogram's ``_bucket``/``_sum``/``_count``)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
