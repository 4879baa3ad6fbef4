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

from remediations.actions import ACTIONS
from remediations.state import HISTORY
from rules.model import AnomalyWatchSpec, Backoff, HostModelWatchSpec, LoopBreaker, Rule, Rulebook, Rung, ThresholdSpec
from selfheal.errors import RulebookError
from selfheal.wire import HostMetrics, UnitReport

FINDING_KINDS = ["unit_exited", "probe_failing", "unit_stalled", "unit_start_timeout", "unit_lost", "node_offline",
                 "metric_threshold", "metric_anomaly", "host_anomaly", "dataset_divergent", "dataset_no_authority",
                 "external_alert"]


def _numeric_fields(struct: type[msgspec.Struct]) -> list[str]:
    return [f.name for f in msgspec.structs.fields(struct) if f.type in (int, float, int | None, float | None)
            and f.name not in ("pid", "exit_code", "exit_signal", "v", "every", "next_run_at", "progress_at",
                               "stall_after", "start_timeout")]


METRICS = sorted([*(f"host.{name}" for name in [*_numeric_fields(HostMetrics), "disk_max_percent"]),
                  *(f"unit.{name}" for name in _numeric_fields(UnitReport))])
"""Metrics a threshold may watch: the numeric fields of the wire's host and unit reports."""
HOST_FEATURES = sorted(m.removeprefix("host.") for m in METRICS if m.startswith("host."))
"""Fields a host model's vector may hold."""
DEFAULT_HOST_FEATURES = ("cpu_percent", "load1", "mem_percent", "swap_percent", "disk_max_percent")
_NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}
_SEVERITY = {"enum": ["info", "warning", "critical"]}
_SECONDS = {"type": "number", "minimum": 0}
_POLICY: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"threshold": {"type": "number", "minimum": 0, "maximum": 1},
                   "persistence": {"type": "integer", "minimum": 1},
                   "window": {"type": "integer", "minimum": 1, "maximum": 1000},
                   "hold": _SECONDS},
}
_RUNG: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["action"],
    "properties": {
        "action": {"enum": list(ACTIONS)},
        "attempts": {"type": "integer", "minimum": 1, "maximum": 100},
        "backoff": {
            "type": "object", "additionalProperties": False,
            "properties": {"first": _SECONDS, "base": _SECONDS, "factor": {"type": "number", "minimum": 1},
                           "max": _SECONDS, "jitter": {"type": "number", "minimum": 0, "maximum": 1}},
        },
        "min_success_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "min_tries": {"type": "integer", "minimum": 1},
    },
}

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
        "anomalies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "metric", "detector"],
                "properties": {
                    "name": _NAME,
                    "metric": {"enum": METRICS},
                    "detector": {"type": "object", "required": ["kind"],
                                 "additionalProperties": {"type": ["number", "string"]}},
                    "policy": _POLICY,
                    "severity": _SEVERITY,
                },
            },
        },
        "host_models": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": _NAME,
                    "features": {"type": "array", "minItems": 1, "uniqueItems": True,
                                 "items": {"enum": HOST_FEATURES}},
                    "step": _SECONDS,
                    "history": {"type": "integer", "minimum": 2, "maximum": 100_000},
                    "min_samples": {"type": "integer", "minimum": 2},
                    "refit_every": {"type": "number", "exclusiveMinimum": 0},
                    "trees": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "max_samples": {"type": "integer", "minimum": 2, "maximum": 100_000},
                    "policy": _POLICY,
                    "severity": _SEVERITY,
                },
            },
        },
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "match", "ladder"],
                "properties": {
                    "name": _NAME,
                    "match": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["kind"],
                        "properties": {
                            "kind": {"enum": FINDING_KINDS},
                            "severity": {"type": "array", "items": _SEVERITY},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                    "for": _SECONDS,
                    "mode": {"enum": ["auto", "approve", "shadow"]},
                    "ladder": {"type": "array", "minItems": 1, "items": _RUNG},
                    "verify": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "kind": {"enum": ["healthy", "cleared"]},
                            "within": {"type": "number", "exclusiveMinimum": 0},
                            "stable_for": _SECONDS,
                        },
                    },
                    "reset_after": _SECONDS,
                    "resolve_after": _SECONDS,
                    "cooldown": _SECONDS,
                    "max_attempts": {"type": "integer", "minimum": 1, "maximum": HISTORY},
                    "attempt_window": {"type": "number", "exclusiveMinimum": 0},
                    "rate_limit": {
                        "type": "object", "additionalProperties": False, "required": ["count", "per"],
                        "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 10_000},
                                       "per": {"type": "number", "exclusiveMinimum": 0}},
                    },
                    "approval_timeout": {"type": "number", "exclusiveMinimum": 0},
                    "loop_breaker": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"refires": {"type": "integer", "minimum": 1},
                                       "within": {"type": "number", "exclusiveMinimum": 0},
                                       "quarantine_for": {"type": "number", "exclusiveMinimum": 0}},
                    },
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
    anomalies: list[AnomalyWatchSpec] = []
    host_models: list[HostModelWatchSpec] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RulebookError(f"{path}: cannot read: {exc.strerror}") from None
        book = parse_rulebook(text, source=path)
        rules.extend(book.rules)
        thresholds.extend(book.thresholds)
        anomalies.extend(book.anomalies)
        host_models.extend(book.host_models)
    _check_unique([r.name for r in rules], "rule")
    _check_unique([t.name for t in thresholds], "threshold")
    _check_unique([a.name for a in anomalies], "anomaly")
    _check_unique([h.name for h in host_models], "host model")
    return Rulebook(tuple(rules), tuple(thresholds), tuple(anomalies), tuple(host_models))


def parse_rulebook(text: str, *, source: str) -> Rulebook:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulebookError(f"{source}: not valid YAML: {exc}") from None
    errors = sorted(_validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        raise RulebookError(_describe(source, data, errors[0]))
    rules = tuple(_rule(item, source) for item in data["rules"])
    thresholds = tuple(
        ThresholdSpec(name=t["name"], metric=t["metric"], above=float(t["above"]),
                      samples=int(t.get("samples", 3)), severity=t.get("severity", "warning"))
        for t in data.get("thresholds", [])
    )
    anomalies = tuple(
        AnomalyWatchSpec(name=a["name"], metric=a["metric"], detector=tuple(sorted(a["detector"].items())),
                         threshold=float(a.get("policy", {}).get("threshold", 0.5)),
                         persistence=int(a.get("policy", {}).get("persistence", 1)),
                         window=int(a.get("policy", {}).get("window", 1)),
                         hold=float(a.get("policy", {}).get("hold", 600.0)), severity=a.get("severity", "warning"))
        for a in data.get("anomalies", [])
    )
    host_models = tuple(_host_model(item) for item in data.get("host_models", []))
    policies = [("anomaly", a.name, a.persistence, a.window) for a in anomalies]
    policies += [("host model", h.name, h.persistence, h.window) for h in host_models]
    for noun, name, persistence, window in policies:
        if persistence > window:
            raise RulebookError(f"{source}: {noun} {name!r}: policy: persistence {persistence} "
                                f"exceeds window {window}")
    for model in host_models:
        if model.min_samples > model.history:
            raise RulebookError(f"{source}: host model {model.name!r}: min_samples {model.min_samples} "
                                f"exceeds history {model.history}")
    _check_unique([r.name for r in rules], "rule", source)
    _check_unique([t.name for t in thresholds], "threshold", source)
    _check_unique([a.name for a in anomalies], "anomaly", source)
    _check_unique([h.name for h in host_models], "host model", source)
    return Rulebook(rules, thresholds, anomalies, host_models)


def _host_model(item: dict[str, Any]) -> HostModelWatchSpec:
    policy = item.get("policy", {})
    defaults = HostModelWatchSpec(name=item["name"], features=())
    return HostModelWatchSpec(
        name=item["name"], features=tuple(item.get("features", DEFAULT_HOST_FEATURES)),
        step=float(item.get("step", defaults.step)), history=int(item.get("history", defaults.history)),
        min_samples=int(item.get("min_samples", defaults.min_samples)),
        refit_every=float(item.get("refit_every", defaults.refit_every)),
        trees=int(item.get("trees", defaults.trees)), max_samples=int(item.get("max_samples", defaults.max_samples)),
        threshold=float(policy.get("threshold", defaults.threshold)),
        persistence=int(policy.get("persistence", defaults.persistence)),
        window=int(policy.get("window", defaults.window)), hold=float(policy.get("hold", defaults.hold)),
        severity=item.get("severity", defaults.severity))


def _rule(item: dict[str, Any], source: str) -> Rule:
    match, verify = item["match"], item.get("verify", {})
    breaker = item.get("loop_breaker", {})
    rate = item.get("rate_limit", {"count": 30, "per": 60.0})
    return Rule(
        name=item["name"], kind=match["kind"], severity=tuple(match.get("severity", ())),
        labels=tuple(sorted(match.get("labels", {}).items())),
        ladder=tuple(_rung(r) for r in item["ladder"]),
        for_=float(item.get("for", 0.0)), mode=item.get("mode", "auto"),
        verify_within=float(verify.get("within", 30.0)), verify_kind=verify.get("kind", "healthy"),
        stable_for=float(verify.get("stable_for", 1.0)),
        reset_after=float(item.get("reset_after", 300.0)), resolve_after=float(item.get("resolve_after", 5.0)),
        cooldown=float(item.get("cooldown", 1.0)), max_attempts=int(item.get("max_attempts", 10)),
        attempt_window=float(item.get("attempt_window", 3600.0)),
        rate_limit=(int(rate["count"]), float(rate["per"])),
        approval_timeout=float(item.get("approval_timeout", 900.0)),
        loop_breaker=LoopBreaker(refires=int(breaker.get("refires", 3)), within=float(breaker.get("within", 120.0)),
                                 quarantine_for=float(breaker.get("quarantine_for", 3600.0))),
        source=source, digest=hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest(),
    )


def _rung(item: dict[str, Any]) -> Rung:
    backoff = item.get("backoff", {})
    return Rung(action=item["action"], attempts=int(item.get("attempts", 1)),
                backoff=Backoff(first=float(backoff.get("first", 0.0)), base=float(backoff.get("base", 1.0)),
                                factor=float(backoff.get("factor", 2.0)),
                                max=float(backoff.get("max", 300.0)), jitter=float(backoff.get("jitter", 0.1))),
                min_success_rate=float(item.get("min_success_rate", 0.0)), min_tries=int(item.get("min_tries", 5)))


def _describe(source: str, data: Any, error: jsonschema.ValidationError) -> str:
    path = list(error.absolute_path)
    where = ""
    if (len(path) >= 2 and path[0] in ("rules", "thresholds", "anomalies", "host_models")
            and isinstance(path[1], int)):
        item = data[path[0]][path[1]]
        name = item.get("name") if isinstance(item, dict) else None
        noun = {"rules": "rule", "thresholds": "threshold", "anomalies": "anomaly",
                "host_models": "host model"}[path[0]]
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
