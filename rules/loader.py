"""Load rulebooks from YAML, validated against a JSON Schema.

Errors name the file, the rule (by name, or index when it has none) and the
key, e.g. ``rules.yaml: rule 'restart-web' (rules[1]): max_attempts: 0 is less
than the minimum of 1``.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import yaml

from rules.model import Rule, Rulebook, ThresholdSpec
from selfheal.errors import RulebookError
from selfheal.wire import HostMetrics, UnitReport

FINDING_KINDS = ["unit_exited", "probe_failing", "node_offline", "metric_threshold"]


def _numeric_fields(struct: type[msgspec.Struct]) -> list[str]:
    return [f.name for f in msgspec.structs.fields(struct) if f.type in (int, float, int | None, float | None)
            and f.name not in ("pid", "exit_code", "exit_signal", "v")]


METRICS = sorted([*(f"host.{name}" for name in [*_numeric_fields(HostMetrics), "disk_max_percent"]),
                  *(f"unit.{name}" for name in _numeric_fields(UnitReport))])
"""Metrics a threshold may watch: the numeric fields of the wire's host and unit reports."""
_NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}
_SEVERITY = {"enum": ["info", "warning", "critical"]}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["version", "rules"],
    "properties": {
        "version": {"const": 1},
        "thresholds": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "metric", "above"],
                "properties": {
                    "name": _NAME,
                    "metric": {"enum": METRICS},
                    "above": {"type": "number"},
                    "samples": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "severity": _SEVERITY,
                },
            },
        },
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "kind", "action"],
                "properties": {
                    "name": _NAME,
                    "kind": {"enum": FINDING_KINDS},
                    "severity": {"type": "array", "items": _SEVERITY},
                    "action": {"enum": ["restart_unit", "none"]},
                    "min_interval": {"type": "number", "minimum": 0},
                    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
                    "verify_within": {"type": "number", "exclusiveMinimum": 0},
                    "attempt_window": {"type": "number", "exclusiveMinimum": 0},
                    "resolve_after": {"type": "number", "minimum": 0},
                },
            },
        },
    },
}
_validator = jsonschema.Draft202012Validator(SCHEMA)


def load_default_rulebook() -> Rulebook:
    text = resources.files("rules").joinpath("default.yaml").read_text(encoding="utf-8")
    return parse_rulebook(text, source="<builtin>/default.yaml")


def load_rulebooks(paths: list[str]) -> Rulebook:
    """The built-in rulebook when ``paths`` is empty, else the given files in order."""
    if not paths:
        return load_default_rulebook()
    rules: list[Rule] = []
    thresholds: list[ThresholdSpec] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RulebookError(f"{path}: cannot read: {exc.strerror}") from None
        book = parse_rulebook(text, source=path)
        rules.extend(book.rules)
        thresholds.extend(book.thresholds)
    _check_unique([r.name for r in rules], "rule")
    _check_unique([t.name for t in thresholds], "threshold")
    return Rulebook(tuple(rules), tuple(thresholds))


def parse_rulebook(text: str, *, source: str) -> Rulebook:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulebookError(f"{source}: not valid YAML: {exc}") from None
    errors = sorted(_validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        raise RulebookError(_describe(source, data, errors[0]))
    rules = tuple(
        Rule(
            name=item["name"], kind=item["kind"], action=item["action"],
            severity=tuple(item.get("severity", ())),
            min_interval=float(item.get("min_interval", 5.0)),
            max_attempts=int(item.get("max_attempts", 3)),
            verify_within=float(item.get("verify_within", 30.0)),
            attempt_window=float(item.get("attempt_window", 600.0)),
            resolve_after=float(item.get("resolve_after", 5.0)),
            source=source,
            digest=hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest(),
        )
        for item in data["rules"]
    )
    thresholds = tuple(
        ThresholdSpec(name=t["name"], metric=t["metric"], above=float(t["above"]),
                      samples=int(t.get("samples", 3)), severity=t.get("severity", "warning"))
        for t in data.get("thresholds", [])
    )
    _check_unique([r.name for r in rules], "rule", source)
    _check_unique([t.name for t in thresholds], "threshold", source)
    return Rulebook(rules, thresholds)


def _describe(source: str, data: Any, error: jsonschema.ValidationError) -> str:
    path = list(error.absolute_path)
    where = ""
    if len(path) >= 2 and path[0] in ("rules", "thresholds") and isinstance(path[1], int):
        item = data[path[0]][path[1]]
        name = item.get("name") if isinstance(item, dict) else None
        noun = "rule" if path[0] == "rules" else "threshold"
        label = f"{noun} {name!r} ({path[0]}[{path[1]}])" if name else f"{path[0]}[{path[1]}]"
        key = ".".join(str(p) for p in path[2:])
        where = f"{label}: {key}: " if key else f"{label}: "
    elif path:
        where = ".".join(str(p) for p in path) + ": "
    return f"{source}: {where}{error.message}"


def _check_unique(names: list[str], noun: str, source: str = "rulebooks") -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise RulebookError(f"{source}: duplicate {noun} name {name!r}")
        seen.add(name)
