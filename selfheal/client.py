"""The CLI's API-client commands: status, datasets, plans, approve, cancel, pause, resume, silence.

They talk to a running controller over HTTP. The address comes from
``--url``, else ``controller.listen`` in ``--config``, else
``http://127.0.0.1:8080``. Mutating commands send the bearer token from
``$SELFHEAL_API_TOKEN``, else ``--token-file``, else the config's
``security.api_token_file``; and the caller's login name as the actor the
audit trail records. Reads (when the controller sets
``security.api_read_token_file``) send the read token from
``$SELFHEAL_API_READ_TOKEN``, else ``--read-token-file``, else the config's
``security.api_read_token_file``, else whatever mutating token the rules
above find (the controller accepts it for reads too).

Exit codes: 0 ok (status: healthy); 1 failed or refused (status: degraded);
3 the controller could not be reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from selfheal.config import load_config
from selfheal.errors import EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    import httpx

EXIT_UNREACHABLE = 3
PAGE = 1000
"""Items asked for per request when a listing is read whole: each request stays short for a controller
under load (the API allows up to 5000)."""
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def add_client_commands(sub: Any) -> None:
    """Register the client subcommands on the CLI's subparsers."""
    def command(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        _connection_args(p)
        return p

    p = command("status", cmd_status, "show nodes, units and open incidents; exit 0 healthy, 1 degraded, 3 unreachable")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = command("datasets", cmd_datasets, "show each dataset's replicas, authority and agreement")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = command("plans", cmd_plans, "list recent remediation plans and their state")
    p.add_argument("--json", action="store_true")
    p = command("approve", cmd_approve, "approve a plan that waits for a human")
    p.add_argument("plan_id")
    p = command("cancel", cmd_cancel, "cancel a plan that waits or runs")
    p.add_argument("plan_id")
    p = command("pause", cmd_pause, "pause all disruptive remediation fleet-wide (notifications continue)")
    p.add_argument("--reason", default="", help="recorded and shown with every held plan")
    command("resume", cmd_resume, "resume remediation after a pause")

    silence = sub.add_parser("silence", help="mute actions and alerts for matching incidents")
    silence_sub = silence.add_subparsers(metavar="ACTION")
    add = silence_sub.add_parser("add", help="add a silence")
    add.set_defaults(func=cmd_silence_add)
    _connection_args(add)
    add.add_argument("--match", action="append", required=True, metavar="LABEL=GLOB",
                     help="e.g. node=node-a, unit=web, kind=unit_exited, group=gpu-* (repeat: all must match)")
    add.add_argument("--duration", required=True, help="e.g. 90s, 30m, 2h, 1d")
    add.add_argument("--comment", required=True)
    add.add_argument("--author", default=getpass.getuser())
    listing = silence_sub.add_parser("list", help="list silences")
    listing.set_defaults(func=cmd_silence_list)
    _connection_args(listing)
    expire = silence_sub.add_parser("expire", help="end a silence now")
    expire.set_defaults(func=cmd_silence_expire)
    _connection_args(expire)
    expire.add_argument("silence_id")


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="controller API base URL")
    p.add_argument("--config", type=Path, default=None, help="read the API address and token file from this config")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the API bearer token")
    p.add_argument("--read-token-file", type=Path, default=None,
                   help="file holding the API read token (security.api_read_token_file)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the API")


def _client(args: argparse.Namespace, *, auth: bool = False) -> httpx.Client:
    config = load_config(args.config, role="client") if args.config else None
    url = args.url
    if url is None:
        listen = config.controller.listen if config else "127.0.0.1:8080"
        url = f"http://{listen.replace('0.0.0.0', '127.0.0.1')}"  # noqa: S104 - rewriting, not binding
    headers = {"X-Selfheal-Actor": getpass.getuser()}
    token_file = args.token_file or (Path(config.security.api_token_file) if config else None)
    if auth:
        token = os.environ.get("SELFHEAL_API_TOKEN", "") or _read_token(token_file, quiet=False)
        if not token:
            print("selfheal: no API token (set SELFHEAL_API_TOKEN, --token-file or --config); "
                  "the controller will refuse", file=sys.stderr)
    else:
        read_file = getattr(args, "read_token_file", None) or (
            Path(config.security.api_read_token_file) if config and config.security.api_read_token_file else None)
        token = (os.environ.get("SELFHEAL_API_READ_TOKEN", "") or _read_token(read_file, quiet=False)
                 or os.environ.get("SELFHEAL_API_TOKEN", "") or _read_token(token_file, quiet=True))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    import httpx  # noqa: PLC0415 - `selfheal agent` (this module's importer, the CLI) never loads it

    return httpx.Client(base_url=url.rstrip("/"), timeout=args.timeout, headers=headers)


def _read_token(path: Path | None, *, quiet: bool) -> str:
    """The token in ``path`` ("" when there is none); a read failure is said unless ``quiet``."""
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        if not quiet:
            print(f"selfheal: cannot read the API token from {path}: {exc.strerror}", file=sys.stderr)
        return ""


def _http_error() -> type[Exception]:
    import httpx  # noqa: PLC0415 - loaded by _client already

    return httpx.HTTPError


def _call(args: argparse.Namespace, method: str, path: str, *, auth: bool = False,
          body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """(exit code, decoded body); problems are printed for the user."""
    with _client(args, auth=auth) as client:
        try:
            response = client.request(method, path, json=body)
        except _http_error() as exc:
            if not getattr(args, "json", False):
                print(f"selfheal: cannot reach the controller at {client.base_url}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE, {"url": str(client.base_url), "error": str(exc)}
    data = response.json() if response.content else None
    if response.is_error:
        detail = data.get("detail") if isinstance(data, dict) else response.text
        print(f"selfheal: {method} {path}: {response.status_code} {detail}", file=sys.stderr)
        return EXIT_FAILURE, data
    return EXIT_OK, data


def _listing(args: argparse.Namespace, path: str) -> tuple[int, Any]:
    """(exit code, every item) of a paged listing, following its ``next`` cursors; a listing without
    them (an older controller) is one page. On failure, the failed call's body instead of the items."""
    items: list[Any] = []
    cursor: str | None = None
    while True:
        query = f"?limit={PAGE}" + (f"&after={quote(cursor, safe='')}" if cursor is not None else "")
        code, data = _call(args, "GET", path + query)
        if code != EXIT_OK:
            return code, data
        items += data["items"]
        following = data.get("next")
        if following is None or following == cursor or not data["items"]:
            return EXIT_OK, items
        cursor = following


def cmd_status(args: argparse.Namespace) -> int:
    found: dict[str, Any] = {}
    for name, path, paged in (("nodes", "/api/v1/nodes", True), ("units", "/api/v1/units", True),
                              ("open", "/api/v1/incidents?state=open", False),
                              ("failed", "/api/v1/incidents?state=failed", False)):
        code, data = _listing(args, path) if paged else _call(args, "GET", path)
        if code == EXIT_UNREACHABLE:
            if args.json:
                print(json.dumps({"status": "unreachable", **data}))
            return EXIT_UNREACHABLE
        if code != EXIT_OK:
            return code
        found[name] = data if paged else data["items"]
    nodes, units, incidents = found["nodes"], found["units"], found["open"] + found["failed"]
    degraded = (any(n["state"] != "online" for n in nodes) or bool(incidents)
                or any(u["state"] not in ("running", "stopped") or u["healthy"] is False for u in units))
    verdict = "degraded" if degraded else "healthy"
    if args.json:
        print(json.dumps({"status": verdict, "nodes": nodes, "units": units, "incidents": incidents}))
        return EXIT_FAILURE if degraded else EXIT_OK
    print(f"selfheal: {verdict}")
    print(f"\nNODES ({len(nodes)})")
    for n in nodes:
        print(f"  {n['id']:<20} {n['state']:<8} last seen {n['last_seen']}")
    print(f"\nUNITS ({len(units)})")
    for u in units:
        probe = "-" if u["healthy"] is None else ("healthy" if u["healthy"] else "unhealthy")
        print(f"  {u['node'] + '/' + u['name']:<30} {u['state']:<9} probe {probe:<9} pid {u['pid']} "
              f"restarts {u['restarts']}")
    print(f"\nOPEN INCIDENTS ({len(incidents)})")
    for i in incidents:
        print(f"  #{i['id']:<5} {i['state']:<7} {i['summary']} (since {i['opened_at']})")
    return EXIT_FAILURE if degraded else EXIT_OK


def cmd_plans(args: argparse.Namespace) -> int:
    code, data = _call(args, "GET", "/api/v1/plans")
    if code != EXIT_OK:
        return code
    if args.json:
        print(json.dumps(data))
        return EXIT_OK
    print(f"{'PLAN':<10} {'STATE':<18} {'INCIDENT':<9} {'ACTION':<14} {'RULE':<28} CREATED")
    for p in data["items"]:
        print(f"{p['id']:<10} {p['state']:<18} #{p['incident_id']:<8} {p['action']:<14} {p['rule']:<28} "
              f"{p['created_at']}")
    return EXIT_OK


def cmd_datasets(args: argparse.Namespace) -> int:
    code, data = _call(args, "GET", "/api/v1/datasets")
    if code != EXIT_OK:
        return code
    if args.json:
        print(json.dumps(data))
        return EXIT_OK
    if not data["items"]:
        print("no datasets reported (configure [[agent.datasets]] on the agents)")
    for d in data["items"]:
        agreement = d["agreement"]
        print(f"{d['name']}: authority {d['authority']['kind']} ({d['authority']['reason']}); "
              f"replicas agreeing {_share(agreement['replicas'])}, files agreeing {_share(agreement['files'])}")
        divergent = {v["node"]: v["files"] for v in d["divergent"]}
        for r in d["replicas"]:
            mark = "DIVERGENT" if r["node"] in divergent else ("unknown" if r["node"] in d["unknown"] else "ok")
            files = divergent.get(r["node"])
            print(f"  {r['node']:<20} {r['state']:<9} {mark:<9} {r['root'][:23] or '-':<23} files {r['files']} "
                  f"bytes {r['bytes']} gen {r['generation']}" + (f" differs: {', '.join(files[:5])}" if files else ""))
    return EXIT_OK


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def cmd_approve(args: argparse.Namespace) -> int:
    code, data = _call(args, "POST", f"/api/v1/plans/{args.plan_id}/approve", auth=True)
    if code == EXIT_OK:
        print(f"plan {data['id']} approved: {data['state']}")
    return code


def cmd_cancel(args: argparse.Namespace) -> int:
    code, data = _call(args, "POST", f"/api/v1/plans/{args.plan_id}/cancel", auth=True)
    if code == EXIT_OK:
        print(f"plan {data['id']} {data['state']}")
    return code


def cmd_pause(args: argparse.Namespace) -> int:
    code, _ = _call(args, "POST", "/api/v1/pause", auth=True, body={"reason": args.reason})
    if code == EXIT_OK:
        print("remediation paused fleet-wide (notifications continue); `selfheal resume` to resume")
    return code


def cmd_resume(args: argparse.Namespace) -> int:
    code, _ = _call(args, "POST", "/api/v1/resume", auth=True)
    if code == EXIT_OK:
        print("remediation resumed")
    return code


def cmd_silence_add(args: argparse.Namespace) -> int:
    matchers = []
    for item in args.match:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            print(f"selfheal: --match {item!r} is not LABEL=GLOB", file=sys.stderr)
            return EXIT_FAILURE
        matchers.append({"name": name, "value": value})
    duration = _DURATION.match(args.duration)
    if duration is None:
        print(f"selfheal: --duration {args.duration!r} is not like 90s, 30m, 2h or 1d", file=sys.stderr)
        return EXIT_FAILURE
    seconds = float(duration.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[duration.group(2)]
    code, data = _call(args, "POST", "/api/v1/silences", auth=True, body={
        "matchers": matchers, "duration_s": seconds, "comment": args.comment, "author": args.author})
    if code == EXIT_OK:
        print(f"silence {data['id']} until {data['ends_at']}")
    return code


def cmd_silence_list(args: argparse.Namespace) -> int:
    code, data = _call(args, "GET", "/api/v1/silences")
    if code != EXIT_OK:
        return code
    for s in data["items"]:
        match = ", ".join(f"{m['name']}={m['value']}" for m in s["matchers"])
        state = "active" if s["active"] else "inactive"
        print(f"{s['id']}  {state:<8} {match}  until {s['ends_at']}  by {s['author']}: {s['comment']}")
    return EXIT_OK


def cmd_silence_expire(args: argparse.Namespace) -> int:
    code, data = _call(args, "DELETE", f"/api/v1/silences/{args.silence_id}", auth=True)
    if code == EXIT_OK:
        print(f"silence {data['id']} ended at {data['ends_at']}")
    return code
