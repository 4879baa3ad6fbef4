"""The audit trail's hash chain: one append-only, hash-chained record per incident.

Every timeline entry stores ``hash = sha256(prev_hash || canonical(at, kind, data))``
with the previous entry's hash (the first entry chains from the incident's
genesis, ``sha256("selfheal/incident/<id>")``), and the incident row keeps the
head hash and the entry count. Changing, removing or reordering any entry —
or dropping the last ones — breaks the chain; ``selfheal audit verify``
recomputes it, in an SQLite file (``verify_database``) or a PostgreSQL store
(``verify_postgres``). (An attacker who can rewrite the whole database can
rebuild the chain too; the head hashes are also written to the log on
resolution, so a copy outside the database can anchor them.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def genesis(incident_id: int) -> str:
    return hashlib.sha256(f"selfheal/incident/{incident_id}".encode()).hexdigest()


def canonical(at: float, kind: str, data: Any) -> str:
    """The exact text that is hashed: sorted keys, no spaces; ``data`` as stored (JSON text)."""
    payload = data if isinstance(data, str) else json.dumps(data, sort_keys=True, separators=(",", ":"),
                                                            default=str)
    return json.dumps([repr(float(at)), kind, payload], separators=(",", ":"))


def chain_hash(prev: str, at: float, kind: str, data: Any) -> str:
    return hashlib.sha256((prev + canonical(at, kind, data)).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainProblem:
    incident_id: int
    entry: int
    problem: str


def verify_chain(incident_id: int, entries: Iterable[tuple[float, str, str, str, str]],
                 head: str | None, count: int | None) -> list[ChainProblem]:
    """``entries`` are (at, kind, data JSON, prev_hash, hash) in order."""
    problems = []
    prev = genesis(incident_id)
    n = 0
    for n, (at, kind, data, stored_prev, stored_hash) in enumerate(entries, start=1):
        if stored_prev != prev:
            problems.append(ChainProblem(incident_id, n, "does not chain to the entry before it"))
        expected = chain_hash(stored_prev, at, kind, data)
        if stored_hash != expected:
            problems.append(ChainProblem(incident_id, n, f"{kind!r} entry was altered (hash mismatch)"))
        prev = stored_hash
    if count is not None and n != count:
        problems.append(ChainProblem(incident_id, n, f"{count} entries recorded, {n} present"))
    if head is not None and prev != head:
        problems.append(ChainProblem(incident_id, n, "the chain does not end at the recorded head"))
    return problems


def verify_postgres(url: str) -> tuple[int, list[ChainProblem]]:
    """``verify_database`` for a PostgreSQL store (``[store] url``), read from one snapshot."""
    from controller.pgstore import verify_chains  # noqa: PLC0415 - asyncpg is an optional extra

    return asyncio.run(verify_chains(url))


def verify_database(path: Path) -> tuple[int, list[ChainProblem]]:
    """Check every incident's chain in a controller database (opened read-only). (incidents, problems)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        problems: list[ChainProblem] = []
        incidents = db.execute("SELECT id, audit_head, audit_count FROM incidents ORDER BY id").fetchall()
        for incident_id, head, count in incidents:
            rows = db.execute("SELECT at, kind, data, prev_hash, hash FROM timeline WHERE incident_id = ? "
                              "ORDER BY seq", (incident_id,)).fetchall()
            problems.extend(verify_chain(incident_id, rows, head, count))
        return len(incidents), problems
    finally:
        db.close()
