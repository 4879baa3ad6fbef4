"""Rulebooks: the built-in one, schema errors that name file/rule/key, matching, loading files."""

from __future__ import annotations

from pathlib import Path

import pytest

from rules.loader import FINDING_KINDS, load_default_rulebook, load_rulebooks, parse_rulebook
from rules.model import Backoff, LoopBreaker, Rule, Rulebook, Rung
from selfheal.errors import RulebookError

SOURCE = "rules.yaml"
RESTART = "[{action: restart}]"


def book(*rules: str, thresholds: str = "") -> str:
    return "version: 1\n" + thresholds + "rules:\n" + "".join(rules)


def rule(name: str, kind: str = "unit_exited", ladder: str = RESTART, match: str = "", **extra: object) -> str:
    """One rule in block style; ``match`` adds flow-style keys to ``match:`` (``, severity: [critical]``)."""
    lines = [f"  - name: {name}\n", f"    match: {{kind: {kind}{match}}}\n", f"    ladder: {ladder}\n"]
    lines += [f"    {key}: {value}\n" for key, value in extra.items()]
    return "".join(lines)


def error_of(text: str) -> str:
    with pytest.raises(RulebookError) as info:
        parse_rulebook(text, source=SOURCE)
    return str(info.value)


def only_rule(text: str) -> Rule:
    (parsed,) = parse_rulebook(text, source=SOURCE).rules
    return parsed


# --- the built-in rulebook ----------------------------------------------------------------------


def test_the_default_rulebook_covers_every_finding_kind() -> None:
    default = load_default_rulebook()
    assert {r.kind for r in default.rules} == set(FINDING_KINDS) == {
        "unit_exited", "probe_failing", "unit_stalled", "unit_start_timeout", "unit_lost", "node_offline",
        "metric_threshold", "metric_anomaly", "host_anomaly", "external_alert", "dataset_divergent",
        "dataset_no_authority"}
    for kind in FINDING_KINDS:
        for severity in ("info", "warning", "critical"):
            assert default.rule_for(kind, severity) is not None, (kind, severity)


def test_the_default_rulebook_climbs_restart_ladders_that_end_in_notify() -> None:
    default = load_default_rulebook()
    exited = default.rule_for("unit_exited", "critical")
    assert exited is not None
    assert exited.name == "restart-exited-unit"
    assert [(r.action, r.attempts) for r in exited.ladder] == [("restart", 3), ("stop_start", 1), ("notify", 1)]
    assert exited.ladder[0].backoff == Backoff(first=0.0, base=1.0, factor=2.0, max=30.0, jitter=0.2)
    assert exited.ladder[1].backoff.first == 10.0
    assert (exited.cooldown, exited.max_attempts, exited.attempt_window, exited.verify_within) == (
        1.0, 10, 3600.0, 30.0)
    assert (exited.reset_after, exited.resolve_after, exited.rate_limit) == (300.0, 5.0, (30, 60.0))
    assert exited.loop_breaker == LoopBreaker(refires=3, within=120.0, quarantine_for=3600.0)
    probe = default.rule_for("probe_failing", "critical")
    assert probe is not None
    assert [(r.action, r.attempts) for r in probe.ladder] == [("restart", 3), ("notify", 1)]
    assert (probe.cooldown, probe.stable_for) == (2.0, 0.0)


def test_the_default_rulebook_only_notifies_about_offline_nodes_and_thresholds() -> None:
    default = load_default_rulebook()
    offline = default.rule_for("node_offline", "critical")
    threshold = default.rule_for("metric_threshold", "warning")
    assert offline is not None
    assert threshold is not None
    assert [r.action for r in offline.ladder] == ["notify"]
    assert offline.ladder[0].backoff.first == 30.0  # a node that blips offline for a moment pages nobody
    assert [r.action for r in threshold.ladder] == ["notify"]
    assert offline.verify_kind == threshold.verify_kind == "cleared"
    assert all(r.source == "<builtin>/default.yaml" for r in default.rules)
    assert all(len(r.digest) == 64 for r in default.rules)
    assert len({r.digest for r in default.rules}) == len(default.rules)


def test_the_default_rulebook_watches_disk_and_memory() -> None:
    thresholds = {t.name: t for t in load_default_rulebook().thresholds}
    assert thresholds["disk-nearly-full"].metric == "host.disk_max_percent"
    assert thresholds["disk-nearly-full"].above == 95.0
    assert thresholds["disk-nearly-full"].samples == 5
    assert thresholds["memory-exhausted"].metric == "host.mem_percent"
    assert thresholds["memory-exhausted"].samples == 10


def test_load_rulebooks_without_paths_is_the_default() -> None:
    assert load_rulebooks([]) == load_default_rulebook()


# --- schema errors ------------------------------------------------------------------------------


def test_a_bad_action_in_a_rung_names_file_rule_and_key_path() -> None:
    message = error_of(book(rule("restart-web", ladder="[{action: restart}, {action: reboot}]")))
    assert message.startswith("rules.yaml: rule 'restart-web' (rules[0]): ladder.1.action: 'reboot' is not one of")


def test_max_attempts_zero_names_file_rule_and_key() -> None:
    message = error_of(book(rule("first"), rule("restart-web", max_attempts=0)))
    assert message == "rules.yaml: rule 'restart-web' (rules[1]): max_attempts: 0 is less than the minimum of 1"


def test_an_unknown_key_is_named() -> None:
    message = error_of(book(rule("restart-web", retries=3)))
    assert message == ("rules.yaml: rule 'restart-web' (rules[0]): "
                       "Additional properties are not allowed ('retries' was unexpected)")


def test_an_unknown_key_in_a_rung_is_named_with_its_path() -> None:
    message = error_of(book(rule("restart-web", ladder="[{action: restart, retries: 3}]")))
    assert message == ("rules.yaml: rule 'restart-web' (rules[0]): ladder.0: "
                       "Additional properties are not allowed ('retries' was unexpected)")


def test_a_bad_backoff_names_its_nested_key() -> None:
    message = error_of(book(rule("restart-web", ladder="[{action: restart, backoff: {jitter: 2}}]")))
    assert message == ("rules.yaml: rule 'restart-web' (rules[0]): "
                       "ladder.0.backoff.jitter: 2 is greater than the maximum of 1")


def test_an_empty_ladder_is_rejected() -> None:
    assert error_of(book(rule("r", ladder="[]"))) == "rules.yaml: rule 'r' (rules[0]): ladder: [] should be non-empty"


def test_a_missing_match_kind_is_named() -> None:
    text = book("  - name: restart-web\n    match: {severity: [critical]}\n    ladder: [{action: notify}]\n")
    assert error_of(text) == "rules.yaml: rule 'restart-web' (rules[0]): match: 'kind' is a required property"


def test_a_missing_match_is_named() -> None:
    text = book("  - name: restart-web\n    ladder: [{action: notify}]\n")
    assert error_of(text) == "rules.yaml: rule 'restart-web' (rules[0]): 'match' is a required property"


def test_the_old_flat_schema_is_rejected() -> None:
    text = book("  - name: restart-web\n    kind: unit_exited\n    action: restart_unit\n")
    assert error_of(text).startswith("rules.yaml: rule 'restart-web' (rules[0]): ")


def test_a_rule_without_a_name_is_named_by_index() -> None:
    message = error_of(book(rule("ok"), "  - match: {kind: unit_exited}\n    ladder: [{action: notify}]\n"))
    assert message == "rules.yaml: rules[1]: 'name' is a required property"


def test_an_unknown_finding_kind_is_rejected() -> None:
    message = error_of(book(rule("r", kind="disk_full")))
    assert message.startswith("rules.yaml: rule 'r' (rules[0]): match.kind: 'disk_full' is not one of")


def test_a_non_string_label_glob_is_rejected() -> None:
    message = error_of(book(rule("r", match=", labels: {node: 3}")))
    assert message == "rules.yaml: rule 'r' (rules[0]): match.labels.node: 3 is not of type 'string'"


def test_a_bad_mode_is_rejected() -> None:
    assert error_of(book(rule("r", mode="yolo"))).startswith("rules.yaml: rule 'r' (rules[0]): mode: 'yolo'")


def test_a_rate_limit_needs_count_and_per() -> None:
    message = error_of(book(rule("r", rate_limit="{count: 3}")))
    assert message == "rules.yaml: rule 'r' (rules[0]): rate_limit: 'per' is a required property"


def test_a_bad_threshold_metric_names_the_threshold() -> None:
    text = book(rule("r"), thresholds="thresholds:\n  - name: cpu\n    metric: cpu_percent\n    above: 90\n")
    message = error_of(text)
    assert message.startswith("rules.yaml: threshold 'cpu' (thresholds[0]): metric: 'cpu_percent' is not one of")


@pytest.mark.parametrize("metric", ["host.cpu_precent", "unit.rss"])
def test_a_threshold_on_a_field_that_does_not_exist_is_rejected(metric: str) -> None:
    text = book(rule("r"), thresholds=f"thresholds:\n  - name: typo\n    metric: {metric}\n    above: 90\n")
    message = error_of(text)
    assert message.startswith(f"rules.yaml: threshold 'typo' (thresholds[0]): metric: '{metric}' is not one of")


def test_a_bad_threshold_severity_is_rejected() -> None:
    text = book(rule("r"), thresholds="thresholds:\n  - name: cpu\n    metric: host.cpu_percent\n    above: 90\n"
                                      "    severity: fatal\n")
    assert "threshold 'cpu' (thresholds[0]): severity:" in error_of(text)


def test_a_wrong_version_is_rejected() -> None:
    assert error_of("version: 2\nrules: []\n") == "rules.yaml: version: 1 was expected"


@pytest.mark.parametrize("text", ["", "- 1\n", "just a string\n"])
def test_a_document_that_is_not_a_mapping_is_rejected(text: str) -> None:
    assert "is not of type 'object'" in error_of(text)


def test_invalid_yaml_names_the_file() -> None:
    message = error_of("version: 1\nrules: [\n")
    assert message.startswith("rules.yaml: not valid YAML:")
    assert "line 3" in message


def test_duplicate_rule_names_are_rejected() -> None:
    assert error_of(book(rule("a"), rule("a", kind="probe_failing"))) == "rules.yaml: duplicate rule name 'a'"


def test_duplicate_threshold_names_are_rejected() -> None:
    thresholds = ("thresholds:\n  - name: t\n    metric: host.cpu_percent\n    above: 1\n"
                  "  - name: t\n    metric: host.mem_percent\n    above: 1\n")
    assert error_of(book(rule("r"), thresholds=thresholds)) == "rules.yaml: duplicate threshold name 't'"


# --- parsing ------------------------------------------------------------------------------------


def test_defaults_of_a_parsed_rule() -> None:
    parsed = only_rule(book(rule("r")))
    assert parsed == Rule(
        name="r", kind="unit_exited", ladder=(Rung(action="restart", attempts=1, backoff=Backoff(),
                                                   min_success_rate=0.0, min_tries=5),),
        severity=(), labels=(), for_=0.0, mode="auto", verify_within=30.0, verify_kind="healthy", stable_for=1.0,
        reset_after=300.0, resolve_after=5.0, cooldown=1.0, max_attempts=10, attempt_window=3600.0,
        rate_limit=(30, 60.0), approval_timeout=900.0, loop_breaker=LoopBreaker(3, 120.0, 3600.0),
        source=SOURCE, digest=parsed.digest)
    assert parsed.ladder[0].backoff == Backoff(first=0.0, base=1.0, factor=2.0, max=300.0, jitter=0.1)


def test_every_key_of_a_rule_is_parsed() -> None:
    text = book(rule(
        "full", kind="probe_failing", match=", severity: [warning, critical], labels: {node: 'gpu-*', unit: web}",
        ladder=("[{action: restart, attempts: 2, backoff: {first: 1, base: 2, factor: 3, max: 40, jitter: 0},"
                " min_success_rate: 0.5, min_tries: 4}, {action: migrate}, {action: notify}]"),
        **{"for": 15, "mode": "approve", "verify": "{kind: cleared, within: 12, stable_for: 3}",
           "reset_after": 600, "resolve_after": 9, "cooldown": 4, "max_attempts": 6, "attempt_window": 1800,
           "rate_limit": "{count: 4, per: 10}", "approval_timeout": 120,
           "loop_breaker": "{refires: 2, within: 60, quarantine_for: 900}"}))
    parsed = only_rule(text)
    assert (parsed.kind, parsed.severity, parsed.labels) == (
        "probe_failing", ("warning", "critical"), (("node", "gpu-*"), ("unit", "web")))
    assert parsed.ladder == (
        Rung("restart", 2, Backoff(first=1.0, base=2.0, factor=3.0, max=40.0, jitter=0.0), 0.5, 4),
        Rung("migrate"), Rung("notify"))
    assert (parsed.for_, parsed.mode, parsed.verify_kind, parsed.verify_within, parsed.stable_for) == (
        15.0, "approve", "cleared", 12.0, 3.0)
    assert (parsed.reset_after, parsed.resolve_after, parsed.cooldown, parsed.max_attempts,
            parsed.attempt_window, parsed.rate_limit, parsed.approval_timeout) == (
        600.0, 9.0, 4.0, 6, 1800.0, (4, 10.0), 120.0)
    assert parsed.loop_breaker == LoopBreaker(refires=2, within=60.0, quarantine_for=900.0)


def test_the_digest_differs_when_content_differs_and_only_then() -> None:
    parsed = only_rule(book(rule("r")))
    assert len(parsed.digest) == 64
    assert only_rule(book(rule("r", max_attempts=4))).digest != parsed.digest
    assert only_rule(book(rule("r", ladder="[{action: restart, attempts: 2}]"))).digest != parsed.digest
    assert only_rule(book(rule("r", ladder="[{action: restart, backoff: {first: 1}}]"))).digest != parsed.digest
    assert parse_rulebook(book(rule("r")), source="other.yaml").rules[0].digest == parsed.digest
    reordered = "  - ladder: [{action: restart}]\n    match: {kind: unit_exited}\n    name: r\n"
    assert only_rule(book(reordered)).digest == parsed.digest


# --- matching -----------------------------------------------------------------------------------


def test_rule_for_takes_the_first_match() -> None:
    parsed = parse_rulebook(book(rule("first"), rule("second"), rule("probe", kind="probe_failing")), source=SOURCE)
    assert parsed.rule_for("unit_exited", "critical").name == "first"  # type: ignore[union-attr]
    assert parsed.rule_for("probe_failing", "critical").name == "probe"  # type: ignore[union-attr]
    assert parsed.rule_for("node_offline", "critical") is None
    assert parsed.by_name("second").name == "second"  # type: ignore[union-attr]
    assert parsed.by_name("nope") is None


def test_rule_for_filters_by_severity() -> None:
    parsed = parse_rulebook(book(rule("crit-only", kind="metric_threshold", match=", severity: [critical]"),
                                 rule("any", kind="metric_threshold", ladder="[{action: notify}]")), source=SOURCE)
    assert parsed.rule_for("metric_threshold", "critical").name == "crit-only"  # type: ignore[union-attr]
    assert parsed.rule_for("metric_threshold", "warning").name == "any"  # type: ignore[union-attr]


def test_a_severity_filtered_rule_alone_does_not_match_other_severities() -> None:
    only = Rulebook((Rule(name="r", kind="unit_exited", ladder=(Rung("notify"),), severity=("warning", "info")),))
    assert only.rule_for("unit_exited", "critical") is None
    assert only.rule_for("unit_exited", "info") is not None


def test_rule_for_matches_label_globs() -> None:
    parsed = parse_rulebook(book(rule("gpu", match=", labels: {node: \"gpu-*\"}", ladder="[{action: notify}]"),
                                 rule("web-on-a", match=", labels: {node: 'node-a', unit: 'web*'}"),
                                 rule("rest")), source=SOURCE)

    def name(labels: dict[str, str] | None) -> str | None:
        found = parsed.rule_for("unit_exited", "critical", labels)
        return found.name if found else None

    assert name({"node": "gpu-7", "unit": "train"}) == "gpu"
    assert name({"node": "gpu-"}) == "gpu"
    assert name({"node": "cpu-gpu-1"}) == "rest"  # a glob, anchored at both ends
    assert name({"node": "node-a", "unit": "web-2"}) == "web-on-a"
    assert name({"node": "node-a", "unit": "db"}) == "rest"
    assert name({"node": "node-a"}) == "rest"  # a missing label matches only an empty glob
    assert name(None) == "rest"


# --- files --------------------------------------------------------------------------------------


def test_load_rulebooks_concatenates_files_in_order(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text(book(rule("a-exit"), thresholds="thresholds:\n  - name: cpu\n    metric: host.cpu_percent\n"
                                                        "    above: 90\n"))
    second = tmp_path / "b.yaml"
    second.write_text(book(rule("b-exit"), rule("b-probe", kind="probe_failing")))
    loaded = load_rulebooks([str(first), str(second)])
    assert [r.name for r in loaded.rules] == ["a-exit", "b-exit", "b-probe"]
    assert [r.source for r in loaded.rules] == [str(first), str(second), str(second)]
    assert [t.name for t in loaded.thresholds] == ["cpu"]
    assert loaded.rule_for("unit_exited", "critical").name == "a-exit"  # type: ignore[union-attr]
    assert loaded.rule_for("node_offline", "critical") is None  # the default is replaced, not merged


def test_duplicate_names_across_files_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(book(rule("same")))
    (tmp_path / "b.yaml").write_text(book(rule("same", kind="probe_failing")))
    with pytest.raises(RulebookError) as info:
        load_rulebooks([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])
    assert str(info.value) == "rulebooks: duplicate rule name 'same'"


def test_an_error_in_a_file_names_that_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(book(rule("ok")))
    bad.write_text(book(rule("broken", max_attempts=0)))
    with pytest.raises(RulebookError) as info:
        load_rulebooks([str(good), str(bad)])
    assert str(info.value) == f"{bad}: rule 'broken' (rules[0]): max_attempts: 0 is less than the minimum of 1"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(RulebookError, match=f"{missing}: cannot read"):
        load_rulebooks([str(missing)])
