"""One fleet view from any controller: each answers for its own buckets and asks its peers for theirs.

With several controllers on PostgreSQL (``controller.leases``), a controller
holds in memory only the nodes of the buckets it owns; incidents, plans,
silences and the pause are in the shared store and need no asking. So a list of
nodes or units, and the status page, are assembled on the controller that was
asked: its own part, and each live peer's, fetched concurrently over HTTP with
``scope=local`` (the peers' API addresses come with their heartbeats), then
merged in the listing's order (``merge_pages``, ``merge_views``). A peer that
does not answer within ``timeout`` is named in the answer's ``missing`` list;
its nodes are left out, never guessed.

Approving or cancelling a plan is done by the controller that owns the plan's
node; asked elsewhere, the call is forwarded (``forward``): to the member the
assignment names first, then to the others, until one does not answer 421
(it is not the owner either, e.g. during a rebalance).

A request between controllers carries the caller's ``Authorization`` and
``X-Selfheal-Actor`` headers, so the same tokens guard it, and
``X-Selfheal-Forwarded`` naming the controller that sent it: a forwarded
request is answered locally, never forwarded again.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

import httpx

from selfheal.logs import RateLimiter, get_logger

FORWARDED = "x-selfheal-forwarded"
"""Header naming the controller a request came from: answer it locally."""
PASSED_ON = ("authorization", "x-selfheal-actor")
"""The caller's headers a request to a peer carries."""
TIMEOUT = 3.0
"""Seconds a peer has to answer before it is counted missing."""

log = get_logger("controller.peers")


class Peers:
    """The other live controllers (``members()``: id → API base URL) and an HTTP client to ask them."""

    def __init__(self, member: str, members: Callable[[], Mapping[str, str]], *, timeout: float = TIMEOUT,
                 tls: ssl.SSLContext | None = None, on_failure: Callable[[str], None] | None = None) -> None:
        self.member = member
        self.members = members
        self.timeout = timeout
        self._tls = tls
        self._client: httpx.AsyncClient | None = None
        self._on_failure = on_failure
        """Called with the peer's id for every request that got no answer (the controller counts them)."""
        self._limiter = RateLimiter()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, verify=self._tls or True)
        return self._client

    def _headers(self, given: Mapping[str, str]) -> dict[str, str]:
        return {**{h: given[h] for h in PASSED_ON if h in given}, FORWARDED: self.member}

    async def ask(self, path: str, params: Mapping[str, Any], headers: Mapping[str, str]) -> \
            tuple[dict[str, dict[str, Any]], list[str]]:
        """GET ``path`` with ``scope=local`` from every live peer at once; returns peer → its JSON answer, and
        the ids of the peers that gave none (unreachable, too slow, or an error status)."""
        members = dict(self.members())
        query = {**{k: v for k, v in params.items() if v is not None}, "scope": "local"}
        sent = self._headers(headers)

        async def one(member: str, base: str) -> dict[str, Any] | None:
            try:
                answer = await self._http().get(f"{base.rstrip('/')}{path}", params=query, headers=sent)
                answer.raise_for_status()
                body = answer.json()
            except (httpx.HTTPError, ValueError) as exc:
                self.failed(member, path, exc)
                return None
            return body if isinstance(body, dict) else None

        ids = sorted(members)
        answers = await asyncio.gather(*(one(m, members[m]) for m in ids))
        return ({m: a for m, a in zip(ids, answers, strict=True) if a is not None},
                [m for m, a in zip(ids, answers, strict=True) if a is None])

    async def forward(self, method: str, path: str, headers: Mapping[str, str], *, first: str | None = None,
                      json: Any = None, timeout: float | None = None) -> httpx.Response | None:
        """Send the call to the peers, ``first`` first, until one is not 421 (not the owner); None: none
        answered that way. ``timeout``: seconds each may take, when longer than the usual."""
        members = dict(self.members())
        order = sorted(members, key=lambda m: (m != first, m))
        for member in order:
            try:
                answer = await self._http().request(method, f"{members[member].rstrip('/')}{path}", json=json,
                                                    headers=self._headers(headers),
                                                    timeout=max(timeout or 0.0, self.timeout))
            except httpx.HTTPError as exc:
                self.failed(member, path, exc)
                continue
            if answer.status_code != 421:
                return answer
        return None


    def failed(self, member: str, path: str, exc: Exception) -> None:
        """A peer gave no (usable) answer: counted every time, logged once a minute per peer."""
        if self._on_failure is not None:
            self._on_failure(member)
        if self._limiter.allow(member, "no_answer", time.monotonic()):
            log.warning("peers.no_answer", peer=member, path=path, error=f"{type(exc).__name__}: {exc}"[:300],
                        suppressed_so_far=self._limiter.suppressed)


# --- merging (pure) --------------------------------------------------------------------------------


def merge_pages(pages: Sequence[Mapping[str, Any]], limit: int, key: Callable[[Mapping[str, Any]], Any],
                cursor: Callable[[Mapping[str, Any]], str]) -> tuple[list[Mapping[str, Any]], str | None]:
    """One page in ``key`` order from pages of disjoint sets, each the first ``limit`` after the same cursor.

    A source with more beyond its page (``next``) knows nothing past its last item, so the merged page
    stops there; the cursor of the next page is given when anything was left out."""
    items = sorted(chain.from_iterable(p.get("items", ()) for p in pages), key=key)
    bound = min((key(p["items"][-1]) for p in pages if p.get("next") and p.get("items")), default=None)
    if bound is not None:
        items = [i for i in items if key(i) <= bound]
    more = bound is not None or len(items) > limit
    items = items[:limit]
    return items, (cursor(items[-1]) if more and items else None)


def node_key(item: Mapping[str, Any]) -> str:
    return str(item["id"])


def unit_key(item: Mapping[str, Any]) -> tuple[str, str]:
    return str(item["node"]), str(item["name"])


def unit_cursor(item: Mapping[str, Any]) -> str:
    return f"{item['node']}/{item['name']}"


def merge_counts(counts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Fleet counts summed over controllers (each counts its own nodes)."""
    total: dict[str, Any] = {"nodes": 0, "online": 0, "offline": 0, "units": 0, "unhealthy": 0,
                             "problem_nodes": 0, "unit_states": {}}
    for part in counts:
        for name in ("nodes", "online", "offline", "units", "unhealthy", "problem_nodes"):
            total[name] += int(part.get(name, 0))
        for state, n in dict(part.get("unit_states", {})).items():
            total["unit_states"][state] = total["unit_states"].get(state, 0) + int(n)
    return total


def merge_views(views: Sequence[Mapping[str, Any]], limit: int, problems: int) -> dict[str, Any]:
    """The status page's fleet part from each controller's own (``/api/v1/view``)."""
    nodes, cursor = merge_pages([{"items": v["nodes"], "next": v.get("next")} for v in views], limit,
                                node_key, node_key)
    listed = {n["id"] for n in nodes}
    return {
        "counts": merge_counts(v["counts"] for v in views),
        "nodes": list(nodes),
        "units": sorted((u for v in views for u in v["units"] if u["node"] in listed), key=unit_key),
        "problems": sorted((p for v in views for p in v["problems"]), key=node_key)[:problems],
        "next": cursor,
    }
