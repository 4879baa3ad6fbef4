"""The human status pages: server-rendered HTML, refreshed every few seconds.

``/`` shows the fleet (its counts, the nodes with a problem, one page of
nodes and their units: never the whole of a large fleet), open incidents,
recent remediations with their outcome, dataset agreement and plots (MTTR
over time, incidents per hour); ``/incidents/{id}`` shows one incident's
timeline (the audit trail), its plans and its unit's metrics around the
moment it opened. No JavaScript and no external assets — plots are inline
SVG (``plots.py``) — so it works through any proxy and on any browser; every
value is HTML-escaped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from controller.plots import render_bars, render_lines

REFRESH = 3
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1b1f24;background:#fafbfc;max-width:1200px}
h1{font-size:1.3rem;margin:0 0 .2rem} h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
table{border-collapse:collapse;width:100%;background:#fff} td,th{padding:.3rem .6rem;
border-bottom:1px solid #e1e4e8;text-align:left;vertical-align:top} th{background:#f3f4f6;font-weight:600}
.ok{color:#1a7f37;font-weight:600} .bad{color:#cf222e;font-weight:600} .warn{color:#9a6700;font-weight:600}
.muted{color:#6e7781} .summary{font-size:1rem;margin:.6rem 0 0}
.plots{display:flex;flex-wrap:wrap;gap:1rem} .plots figure{margin:0;background:#fff;border:1px solid #e1e4e8;
padding:.4rem} figcaption{font-weight:600;font-size:.9rem} pre{margin:0;white-space:pre-wrap;font-size:12px;
max-width:60rem;overflow-wrap:anywhere}
"""

_CLASS = {"online": "ok", "running": "ok", "resolved": "ok", "succeeded": "ok", "completed": "ok",
          "offline": "bad", "exited": "bad", "failed": "bad", "crashed": "bad",
          "open": "warn", "starting": "warn", "stopped": "warn", "escalated": "warn", "verifying": "warn",
          "awaiting_approval": "warn", "cancelled": "muted", "expired": "muted"}


class Link:
    """A cell that links somewhere inside the controller (path and text escaped)."""

    def __init__(self, href: str, text: str) -> None:
        self.href, self.text = href, text


def _cell(value: Any) -> str:
    if isinstance(value, Link):
        return f'<td><a href="{escape(value.href)}">{escape(value.text)}</a></td>'
    text = "—" if value is None else str(value)
    css = _CLASS.get(text, "")
    return f'<td class="{css}">{escape(text)}</td>' if css else f"<td>{escape(text)}</td>"


def _table(headers: list[str], rows: list[list[Any]], empty: str, css: str = "") -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def _document(title: str, body: str, *, version: str, now: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)}</title><style>{_STYLE}</style></head><body>
<h1>{escape(title)}</h1><div class="muted">controller {escape(version)} · {escape(now)} · refreshes every {REFRESH} s ·
<a href="/">status</a> · <a href="/api/v1/incidents">incidents API</a> · <a href="/metrics">metrics</a></div>
{body}
</body></html>"""


def incidents_per_hour(opened: Sequence[float], now: float, hours: int = 24) -> list[tuple[str, float]]:
    start = (now // 3600 - hours + 1) * 3600
    counts = [0] * hours
    for at in opened:
        slot = int((at - start) // 3600)
        if 0 <= slot < hours:
            counts[slot] += 1
    return [(datetime.fromtimestamp(start + i * 3600, UTC).strftime("%H:00"), float(c)) for i, c in enumerate(counts)]


def mttr_points(history: Sequence[tuple[float, float | None]]) -> list[tuple[float, float]]:
    """(resolved at, seconds open) of resolved incidents, oldest first."""
    return sorted((resolved, resolved - opened) for opened, resolved in history if resolved is not None)


def render_status_page(*, counts: dict[str, Any], nodes: list[dict[str, Any]], units: list[dict[str, Any]],
                       incidents: list[dict[str, Any]], version: str, now: str,
                       problems: Sequence[dict[str, Any]] = (), after: str | None = None,
                       next_after: str | None = None, missing: Sequence[str] = (),
                       plans: list[dict[str, Any]] | None = None, datasets: list[dict[str, Any]] | None = None,
                       history: Sequence[tuple[float, float | None]] = (), now_ts: float | None = None) -> str:
    """``counts``: the fleet's (``nodes``, ``online``, ``offline``, ``units``, ``unhealthy``, ``unit_states``,
    ``problem_nodes``); ``problems``: the first nodes with a problem, each with its unhealthy units
    (``sick``); ``nodes``: one page of nodes (after the cursor ``after``; ``next_after`` the next page's)
    and ``units`` theirs; ``missing``: controllers that did not answer (their nodes are not shown)."""
    offline, unhealthy = counts["offline"], counts["unhealthy"]
    open_incidents = [i for i in incidents if i["state"] != "resolved"]
    if not counts["nodes"] and not open_incidents:
        verdict, css = "No agents have reported yet.", "warn"
    elif offline or unhealthy or open_incidents:
        verdict, css = (f"Degraded: {offline} node(s) offline, {unhealthy} unit(s) unhealthy, "
                        f"{len(open_incidents)} incident(s) unresolved."), "bad"
    else:
        verdict, css = f"Healthy: {counts['nodes']} node(s), {counts['units']} unit(s), no open incidents.", "ok"
    node_rows = [[n["id"], n["state"], n["last_seen"], ", ".join(n["units"])] for n in nodes]
    unit_rows = [[u["node"], u["name"], u["state"] + (" (fenced)" if u.get("fenced") else ""),
                  "—" if u["healthy"] is None else ("healthy" if u["healthy"] else "unhealthy"),
                  u["pid"], u["restarts"], f'{u["rss_bytes"] / 2**20:.1f} MiB'] for u in units]
    problem_rows = [[n["id"], n["state"], n["last_seen"],
                     ", ".join(f'{u["name"]} {u["state"] if u["state"] != "running" else "unhealthy"}'
                               for u in n["sick"]) or "—"] for n in problems]
    more = counts["problem_nodes"] - len(problems)

    def row(i: dict[str, Any]) -> list[Any]:
        return [Link(f'/incidents/{int(i["id"])}', f'#{i["id"]}'), i["state"], i["kind"],
                f'{i["node"]}/{i["unit"] or "-"}', i["summary"], i["opened_at"], i["resolved_at"]]

    headers = ["id", "state", "kind", "target", "what happened", "opened", "resolved"]
    remediation_rows = [[Link(f'/incidents/{int(p["incident_id"])}', f'#{p["incident_id"]}'), p["action"],
                         p["rule"], p["attempt"], p["mode"], p["state"], (p.get("detail") or {}).get("result", ""),
                         p["updated_at"]] for p in (plans or [])]
    gap = (f'<p class="summary warn">Controller(s) {escape(", ".join(missing))} did not answer: the nodes '
           'they act on are not shown below.</p>') if missing else ""
    body = f"""<p class="summary {css}">{escape(verdict)}</p>{gap}
<p>{escape(_fleet_line(counts))}</p>
<h2 id="problems">Nodes with a problem ({counts["problem_nodes"]})</h2>{_table(
        ["node", "state", "last seen", "unhealthy units"], problem_rows, "No node has a problem.")}{
        f'<p class="muted">and {more} more: <a href="/api/v1/nodes">the nodes API</a> lists them all, page by page.</p>'
        if more > 0 else ""}
<h2 id="nodes">Nodes{escape(_page_range(counts["nodes"], len(nodes), after))}</h2>{
        _table(["node", "state", "last seen", "units"], node_rows, "No nodes yet.")}{_pager(after, next_after)}
<h2>Units of these nodes</h2>{
        _table(["node", "unit", "state", "probe", "pid", "restarts", "memory"], unit_rows, "No units yet.")}
<h2 id="open">Unresolved incidents</h2>{_table(headers, [row(i) for i in open_incidents], "No unresolved incidents.",
                                                  "open")}
<h2>Recent remediations</h2>{_table(["incident", "action", "rule", "attempt", "mode", "outcome", "detail",
                                     "updated"], remediation_rows, "No remediations yet.")}
<h2>Dataset agreement</h2>{_datasets(datasets)}
<h2>Trends</h2><div class="plots">{_trend_plots(history, now_ts)}</div>
<h2>Recent incidents</h2>{_table(headers, [row(i) for i in incidents], "No incidents.")}"""
    return _document("selfheal", body, version=version, now=now)


def _fleet_line(counts: dict[str, Any]) -> str:
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts["unit_states"].items(), key=lambda x: (-x[1], x[0])))
    return (f'{counts["nodes"]} node(s): {counts["online"]} online, {counts["offline"]} offline · '
            f'{counts["units"]} unit(s)' + (f": {states}" if states else "") + f' · {counts["unhealthy"]} unhealthy')


def _page_range(total: int, shown: int, after: str | None) -> str:
    if total <= shown and after is None:
        return ""
    return f" ({shown} of {total}" + (f", after {after})" if after is not None else ", from the first)")


def _pager(after: str | None, next_after: str | None) -> str:
    """Links to the first and the next page of nodes (cursor in the query string, escaped)."""
    links = []
    if after is not None:
        links.append('<a href="/#nodes">first page</a>')
    if next_after is not None:
        links.append(f'<a href="/?after={escape(quote(next_after, safe=""), quote=True)}#nodes">next page</a>')
    return f'<p>{" · ".join(links)}</p>' if links else ""


def _trend_plots(history: Sequence[tuple[float, float | None]], now_ts: float | None) -> str:
    mttr = mttr_points(history)
    mttr_svg = render_lines("Time to recover per resolved incident", [("time open (s)", mttr)], unit="seconds")
    hourly = render_bars("Incidents opened per hour (last 24 h, UTC)",
                         incidents_per_hour([o for o, _ in history], now_ts) if now_ts is not None else [],
                         unit="incidents")
    return (f"<figure><figcaption>MTTR over time</figcaption>{mttr_svg}</figure>"
            f"<figure><figcaption>Incidents per hour</figcaption>{hourly}</figure>")


def _datasets(datasets: list[dict[str, Any]] | None) -> str:
    if datasets is None:
        return '<p class="muted">Dataset agreement is not available from this controller.</p>'
    rows = []
    for d in datasets:
        agreement = d.get("agreement") or {}
        ratio = agreement.get("replicas")
        rows.append([d.get("name"), len(d.get("replicas") or []), (d.get("authority") or {}).get("kind"),
                     "—" if ratio is None else f"{float(ratio):.0%}",
                     ", ".join(str(x.get("node")) for x in d.get("divergent") or []) or "none"])
    return _table(["dataset", "replicas", "authority", "replicas agreeing", "divergent"], rows,
                  "No datasets reported.")


def render_incident_page(*, incident: dict[str, Any], timeline: list[dict[str, Any]], plans: list[dict[str, Any]],
                         metrics: dict[str, list[tuple[float, float]]], opened_ts: float, version: str,
                         now: str) -> str:
    """One incident: what, its timeline (audit trail) and plans, and its unit's metrics around the opening."""
    facts = [["state", incident["state"]], ["kind", incident["kind"]], ["node", incident["node"]],
             ["unit", incident["unit"]], ["severity", incident["severity"]], ["rule", incident["rule"]],
             ["summary", incident["summary"]], ["opened", incident["opened_at"]],
             ["resolved", incident["resolved_at"]]]
    facts_html = "<table>" + "".join(f"<tr><th>{escape(k)}</th>{_cell(v)}</tr>" for k, v in facts) + "</table>"
    entries = "".join(
        f"<tr><td>{escape(e['at'])}</td>{_cell(e['kind'])}<td><pre>{escape(_compact(e['data']))}</pre></td></tr>"
        for e in timeline)
    timeline_html = (f"<table><tr><th>at</th><th>what</th><th>details</th></tr>{entries}</table>" if entries
                     else '<p class="muted">No entries.</p>')
    plan_rows = [[p["id"], p["action"], p["rule"], p["attempt"], p["mode"], p["state"],
                  (p.get("detail") or {}).get("result", ""), p["updated_at"]] for p in plans]
    target = f'{incident["node"]}/{incident["unit"]}' if incident["unit"] else incident["node"]
    cpu = render_lines(f"CPU of {target} around the incident", [("cpu %", metrics.get("cpu_percent", []))],
                       unit="percent", marker=opened_ts, marker_label="opened")
    rss = render_lines(f"Memory of {target} around the incident", [("rss MiB", metrics.get("rss_mib", []))],
                       unit="MiB", marker=opened_ts, marker_label="opened")
    body = f"""<p class="muted"><a href="/api/v1/incidents/{int(incident["id"])}">this incident as JSON</a></p>
{facts_html}
<h2>Metrics around the incident</h2><p class="muted">From the controller's bounded report history of the node.</p>
<div class="plots"><figure><figcaption>CPU</figcaption>{cpu}</figure>
<figure><figcaption>Memory</figcaption>{rss}</figure></div>
<h2>Plans</h2>{_table(["plan", "action", "rule", "attempt", "mode", "state", "detail", "updated"], plan_rows,
                      "No plans.")}
<h2>Timeline</h2>{timeline_html}"""
    return _document(f"Incident #{incident['id']}: {incident['summary']}", body, version=version, now=now)


def _compact(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return text if len(text) <= 600 else text[:600] + "…"


def render_api_docs(openapi: dict[str, Any]) -> str:
    """The OpenAPI document as one self-contained HTML page: no CDN, no JavaScript, every value escaped.

    FastAPI's Swagger page loads its JavaScript and CSS from a CDN, which a
    controller on an isolated network cannot reach and which would run
    third-party code next to the token. This lists each operation with its
    parameters, body schema and responses; the schemas follow as JSON.
    """
    info = openapi.get("info", {})
    sections = []
    for path, item in sorted(openapi.get("paths", {}).items()):
        for method, operation in item.items():
            params = [[p.get("name", ""), p.get("in", ""), "yes" if p.get("required") else "no",
                       _schema_name(p.get("schema", {}))] for p in operation.get("parameters", [])]
            body = operation.get("requestBody", {}).get("content", {})
            bodies = "".join(f"<div>body ({escape(kind)}): <code>{escape(_schema_name(spec.get('schema', {})))}"
                             f"</code></div>" for kind, spec in body.items())
            responses = [[status, spec.get("description", ""), ", ".join(
                f"{kind} {_schema_name(c.get('schema', {}))}".strip() for kind, c in spec.get("content", {}).items())]
                for status, spec in sorted(operation.get("responses", {}).items())]
            auth = " · bearer token" if operation.get("security") else ""
            anchor = escape(f"{method}-{path}", quote=True)
            sections.append(
                f'<h2 id="{anchor}"><code>{escape(method.upper())} {escape(path)}</code></h2>'
                f'<p>{escape(operation.get("summary", ""))}<span class="muted">{escape(auth)}</span></p>'
                f'<p class="muted">{escape(operation.get("description", ""))}</p>'
                + (_table(["parameter", "in", "required", "type"], params, "") if params else "")
                + bodies + _table(["status", "meaning", "content"], responses, "no responses documented"))
    schemas = "".join(f'<h3 id="schema-{escape(name, quote=True)}">{escape(name)}</h3><pre>'
                      f"{escape(json.dumps(schema, indent=1, sort_keys=True))}</pre>"
                      for name, schema in sorted(openapi.get("components", {}).get("schemas", {}).items()))
    title = f"{info.get('title', 'API')} {info.get('version', '')}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)}</title><style>{_STYLE}</style></head><body>
<h1>{escape(title)}</h1><div class="muted">OpenAPI {escape(str(openapi.get("openapi", "")))} ·
<a href="/api/v1/openapi.json">openapi.json</a> · <a href="/">status</a></div>
{"".join(sections)}<h2>Schemas</h2>{schemas}
</body></html>"""


def _schema_name(schema: dict[str, Any]) -> str:
    """A short name for a schema: its ``$ref`` name, its type, or the types of its alternatives."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items', {}))}"
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    return str(schema.get("type", "any"))
