"""The human status page: one server-rendered HTML page, refreshed every few seconds.

No JavaScript and no external assets, so it works through any proxy and on
any browser; every value is HTML-escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1b1f24;background:#fafbfc}
h1{font-size:1.3rem;margin:0 0 .2rem} h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
table{border-collapse:collapse;width:100%;background:#fff} td,th{padding:.3rem .6rem;
border-bottom:1px solid #e1e4e8;text-align:left} th{background:#f3f4f6;font-weight:600}
.ok{color:#1a7f37;font-weight:600} .bad{color:#cf222e;font-weight:600} .warn{color:#9a6700;font-weight:600}
.muted{color:#6e7781} .summary{font-size:1rem;margin:.6rem 0 0}
"""

_CLASS = {"online": "ok", "running": "ok", "resolved": "ok", "offline": "bad", "exited": "bad",
          "failed": "bad", "open": "warn", "starting": "warn", "stopped": "warn"}


def _cell(value: Any) -> str:
    text = "—" if value is None else str(value)
    css = _CLASS.get(text, "")
    return f'<td class="{css}">{escape(text)}</td>' if css else f"<td>{escape(text)}</td>"


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_status_page(*, nodes: list[dict[str, Any]], units: list[dict[str, Any]],
                       incidents: list[dict[str, Any]], version: str, now: str) -> str:
    offline = sum(1 for n in nodes if n["state"] == "offline")
    unhealthy = sum(1 for u in units if u["state"] != "running" or u["healthy"] is False)
    open_incidents = [i for i in incidents if i["state"] != "resolved"]
    if not nodes:
        verdict, css = "No agents have reported yet.", "warn"
    elif offline or unhealthy or open_incidents:
        verdict, css = (f"Degraded: {offline} node(s) offline, {unhealthy} unit(s) unhealthy, "
                        f"{len(open_incidents)} incident(s) open."), "bad"
    else:
        verdict, css = f"Healthy: {len(nodes)} node(s), {len(units)} unit(s), no open incidents.", "ok"
    node_rows = [[n["id"], n["state"], n["last_seen"], ", ".join(n["units"])] for n in nodes]
    unit_rows = [[u["node"], u["name"], u["state"],
                  "—" if u["healthy"] is None else ("healthy" if u["healthy"] else "unhealthy"),
                  u["pid"], u["restarts"], f'{u["rss_bytes"] / 2**20:.1f} MiB'] for u in units]
    incident_rows = [[f'#{i["id"]}', i["state"], i["summary"], i["opened_at"], i["resolved_at"]]
                     for i in incidents]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>selfheal status</title><style>{_STYLE}</style></head><body>
<h1>selfheal</h1><div class="muted">controller {escape(version)} · {escape(now)} · refreshes every 3 s ·
<a href="/api/v1/incidents">incidents API</a> · <a href="/metrics">metrics</a></div>
<p class="summary {css}">{escape(verdict)}</p>
<h2>Nodes</h2>{_table(["node", "state", "last seen", "units"], node_rows, "No nodes yet.")}
<h2>Units</h2>{_table(["node", "unit", "state", "probe", "pid", "restarts", "memory"], unit_rows,
                      "No units yet.")}
<h2>Recent incidents</h2>{_table(["id", "state", "what happened", "opened", "resolved"], incident_rows,
                                 "No incidents.")}
</body></html>"""
