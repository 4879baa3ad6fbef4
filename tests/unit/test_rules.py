"""Rulebooks: the built-in one, schema errors that name file/rule/key, matching, loading files."""

from __future__ import annotations

from pathlib import Path

import pytest

from rules.loader import FINDING_KINDS, load_default_rulebook, load_rulebooks, parse_rulebook
from rules.model import Rule, Rulebook
from selfheal.errors import RulebookError

SOURCE = "rules.yaml"


def book(*rules: str, thresholds: str = "") -> str:
    return "version: 1\n" + thresholds + "rules:\n" + "".join(rules)


def rule(name: str, kind: str = "unit_exited", action: str = "restart_unit", **extra: object) -> str:
    lines = [f"  - name: {name}\n", f"    kind: {kind}\n", f"    action: {action}\n"]
    lines += [f"    {key}: {value}\n" for key, value in extra.items()]
    return "".join(lines)


def error_of(text: str) -> str:
    with pytest.raises(RulebookError) as info:
        parse_rulebook(text, source=SOURCE)
    return str(info.value)


# --- the built-in rulebook ----------------------------------------------------------------------


def test_the_default_rulebook_covers_every_finding_kind() -> None:
    default = load_default_rulebook()
    assert {r.kind for r in default.rules} == set(FINDING_KINDS) == {
        "unit_exited", "probe_failing", "node_offline", "metric_threshold"}
    for kind in FINDING_KINDS:
        for severity in ("info", "warning", "critical"):
            assert default.rule_for(kind, severity) is not None, (kind, severity)


def test_the_default_rulebook_restarts_units_and_only_reports_the_rest() -> None:
    default = load_default_rulebook()
    exited = default.rule_for("unit_exited", "critical")
    assert exited is not None
    assert (exited.name, exited.action, exited.min_interval, exited.max_attempts, exited.verify_within) == (
        "restart-exited-unit", "restart_unit", 2.0, 5, 30.0)
    probe = default.rule_for("probe_failing", "critical")
    assert probe is not None
    assert probe.action == "restart_unit"
    assert default.rule_for("node_offline", "critical").action == "none"  # type: ignore[union-attr]
    assert default.rule_for("metric_threshold", "warning").action == "none"  # type: ignore[union-attr]
    assert all(r.source == "<builtin>/default.yaml" for r in default.rules)
    assert all(len(r.digest) == 64 for r in default.rules)


def test_the_default_rulebook_watches_disk_and_memory() -> None:
    thresholds = {t.name: t for t in load_default_rulebook().thresholds}
    assert thresholds["disk-nearly-full"].metric == "host.disk_max_percent"
    assert thresholds["disk-nearly-full"].above == 95.0
    assert thresholds["disk-nearly-full"].samples == 5
    assert thresholds["memory-exhausted"].metric == "host.mem_percent"


def test_load_rulebooks_without_paths_is_the_default() -> None:
    assert load_rulebooks([]) == load_default_rulebook()


# --- schema errors ------------------------------------------------------------------------------


def test_a_bad_action_names_file_rule_and_key() -> None:
    message = error_of(book(rule("restart-web", action="reboot")))
    assert message.startswith("rules.yaml: rule 'restart-web' (rules[0]): action: ")
    assert "'reboot' is not one of" in message


def test_max_attempts_zero_names_file_rule_and_key() -> None:
    message = error_of(book(rule("first", action="none"), rule("restart-web", max_attempts=0)))
    assert message == "rules.yaml: rule 'restart-web' (rules[1]): max_attempts: 0 is less than the minimum of 1"


def test_an_unknown_key_is_named() -> None:
    message = error_of(book(rule("restart-web", retries=3)))
    assert message.startswith("rules.yaml: rule 'restart-web' (rules[0]): ")
    assert "'retries' was unexpected" in message


def test_a_missing_kind_is_named() -> None:
    message = error_of(book("  - name: restart-web\n    action: none\n"))
    assert message == "rules.yaml: rule 'restart-web' (rules[0]): 'kind' is a required property"


def test_a_rule_without_a_name_is_named_by_index() -> None:
    message = error_of(book(rule("ok", action="none"), "  - kind: unit_exited\n    action: none\n"))
    assert message == "rules.yaml: rules[1]: 'name' is a required property"


def test_an_unknown_finding_kind_is_rejected() -> None:
    assert "kind: 'disk_full' is not one of" in error_of(book(rule("r", kind="disk_full")))


def test_a_bad_threshold_metric_names_the_threshold() -> None:
    text = book(rule("r", action="none"),
                thresholds="thresholds:\n  - name: cpu\n    metric: cpu_percent\n    above: 90\n")
    message = error_of(text)
    assert message.startswith("rules.yaml: threshold 'cpu' (thresholds[0]): metric: 'cpu_percent' is not one of")


@pytest.mark.parametrize("metric", ["host.cpu_precent", "unit.rss"])
def test_a_threshold_on_a_field_that_does_not_exist_is_rejected(metric: str) -> None:
    # The pattern accepts any ``host.<word>``; a typo would give a threshold that can never fire.
    text = book(rule("r", action="none"),
                thresholds=f"thresholds:\n  - name: typo\n    metric: {metric}\n    above: 90\n")
    message = error_of(text)
    assert "typo" in message
    assert metric in message


def test_a_bad_threshold_severity_is_rejected() -> None:
    text = book(rule("r", action="none"),
                thresholds="thresholds:\n  - name: cpu\n    metric: host.cpu_percent\n    above: 90\n"
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
    message = error_of(book(rule("a"), rule("a", kind="probe_failing")))
    assert message == "rules.yaml: duplicate rule name 'a'"


def test_duplicate_threshold_names_are_rejected() -> None:
    thresholds = ("thresholds:\n  - name: t\n    metric: host.cpu_percent\n    above: 1\n"
                  "  - name: t\n    metric: host.mem_percent\n    above: 1\n")
    assert error_of(book(rule("r"), thresholds=thresholds)) == "rules.yaml: duplicate threshold name 't'"


# --- parsing and matching -----------------------------------------------------------------------


def test_defaults_and_digest_of_a_parsed_rule() -> None:
    (parsed,) = parse_rulebook(book(rule("r")), source=SOURCE).rules
    assert (parsed.min_interval, parsed.max_attempts, parsed.verify_within, parsed.severity) == (5.0, 3, 30.0, ())
    assert parsed.source == SOURCE
    (changed,) = parse_rulebook(book(rule("r", max_attempts=4)), source=SOURCE).rules
    assert changed.digest != parsed.digest
    (same,) = parse_rulebook(book(rule("r")), source="other.yaml").rules
    assert same.digest == parsed.digest


def test_rule_for_takes_the_first_match() -> None:
    parsed = parse_rulebook(book(rule("first"), rule("second"), rule("probe", kind="probe_failing")),
                            source=SOURCE)
    assert parsed.rule_for("unit_exited", "critical").name == "first"  # type: ignore[union-attr]
    assert parsed.rule_for("probe_failing", "critical").name == "probe"  # type: ignore[union-attr]
    assert parsed.rule_for("node_offline", "critical") is None


def test_rule_for_filters_by_severity() -> None:
    parsed = parse_rulebook(book(rule("crit-only", kind="metric_threshold", severity="[critical]"),
                                 rule("any", kind="metric_threshold", action="none")), source=SOURCE)
    assert parsed.rule_for("metric_threshold", "critical").name == "crit-only"  # type: ignore[union-attr]
    assert parsed.rule_for("metric_threshold", "warning").name == "any"  # type: ignore[union-attr]


def test_a_severity_filtered_rule_alone_does_not_match_other_severities() -> None:
    only = Rulebook((Rule(name="r", kind="unit_exited", action="none", severity=("warning", "info")),))
    assert only.rule_for("unit_exited", "critical") is None
    assert only.rule_for("unit_exited", "info") is not None


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
    with pytest.raises(RulebookError, match="duplicate rule name 'same'"):
        load_rulebooks([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])


def test_an_error_in_a_file_names_that_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(book(rule("ok")))
    bad.write_text(book(rule("broken", max_attempts=0)))
    with pytest.raises(RulebookError) as info:
        load_rulebooks([str(good), str(bad)])
    assert str(info.value).startswith(f"{bad}: rule 'broken' (rules[0]): max_attempts:")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(RulebookError, match=f"{missing}: cannot read"):
        load_rulebooks([str(missing)])
