"""Dataset divergence, pure: findings from replica digests, and the planner's choice of a resync source."""

from __future__ import annotations

from detectors.digests import ReplicaDigest, detect_divergence
from remediations.planner import Context, Propose, Replica, Target, choose_rung, choose_source, plan_remediation
from remediations.plans import ResyncDataset, Verification
from remediations.state import TargetState
from rules.model import Backoff, Rule, Rung

NOW = 1_700_000_000.0
GOOD = "blake3:" + "a" * 64
BAD = "blake3:" + "b" * 64
OTHER = "blake3:" + "c" * 64
NO_WAIT = Backoff(first=0.0, base=0.0, factor=1.0, max=0.0, jitter=0.0)


def replicas(*roots: str, states: dict[int, str] | None = None) -> list[ReplicaDigest]:
    states = states or {}
    return [ReplicaDigest(f"node-{chr(97 + i)}", root if states.get(i, "ok") == "ok" else "",
                          states.get(i, "ok"), files=3, bytes=300)  # type: ignore[arg-type]
            for i, root in enumerate(roots)]


def test_the_minority_replica_is_divergent_with_the_evidence_a_human_needs() -> None:
    findings = detect_divergence("train", replicas(GOOD, BAD, GOOD))
    assert [(f.kind, f.node, f.unit, f.key) for f in findings] == [
        ("dataset_divergent", "node-b", None, "dataset_divergent/node-b/-/train")]
    evidence = findings[0].evidence
    assert (evidence["dataset"], evidence["authority"], evidence["authority_root"], evidence["root"]) == (
        "train", "majority", GOOD, BAD)
    assert (evidence["files"], evidence["bytes"], evidence["matching"]) == (3, 300, ["node-a", "node-c"])


def test_agreeing_replicas_raise_nothing() -> None:
    assert detect_divergence("train", replicas(GOOD, GOOD, GOOD)) == []
    assert detect_divergence("train", replicas(GOOD)) == []


def test_nothing_is_judged_while_any_replica_is_settling() -> None:
    assert detect_divergence("train", replicas(GOOD, BAD, GOOD, states={2: "settling"})) == []
    assert detect_divergence("train", replicas(GOOD, BAD, states={0: "settling"})) == []


def test_one_against_one_is_for_a_human() -> None:
    findings = detect_divergence("train", replicas(GOOD, BAD))
    assert [(f.kind, f.node, f.scope) for f in findings] == [("dataset_no_authority", "node-a", "train")]
    assert "no strict majority" in findings[0].evidence["reason"]
    assert detect_divergence("train", replicas(GOOD, BAD, OTHER))[0].kind == "dataset_no_authority"
    on = detect_divergence("train", replicas(GOOD, BAD, OTHER), offline=frozenset({"node-a"}))
    assert [(f.kind, f.node) for f in on] == [("dataset_no_authority", "node-b")]  # raised where it can be heard


def test_a_manifest_decides_even_against_a_majority() -> None:
    digests = [ReplicaDigest("node-a", BAD, manifest_root=GOOD), ReplicaDigest("node-b", BAD, manifest_root=GOOD),
               ReplicaDigest("node-c", GOOD, manifest_root=GOOD)]
    findings = detect_divergence("model", digests)
    assert [(f.kind, f.node) for f in findings] == [("dataset_divergent", "node-a"), ("dataset_divergent", "node-b")]
    assert findings[0].evidence["authority"] == "manifest"


def test_one_node_reporting_a_manifest_cannot_make_the_honest_replicas_divergent() -> None:
    """A compromised node reports its own tree's root as the "published manifest": before, that manifest
    decided, every honest replica was ``dataset_divergent`` and the built-in rule resynced it from the
    attacker. Now a manifest needs a strict majority of the replicas behind it: a human is asked."""
    honest = [ReplicaDigest("node-a", GOOD), ReplicaDigest("node-b", GOOD), ReplicaDigest("node-c", GOOD)]
    findings = detect_divergence("train", [*honest, ReplicaDigest("node-evil", BAD, manifest_root=BAD)])
    assert [(f.kind, f.node) for f in findings] == [("dataset_no_authority", "node-a")]
    assert "not a strict majority" in findings[0].evidence["reason"]
    # Even agreeing with the honest roots, a lone manifest for a root nobody holds is flagged, not obeyed.
    findings = detect_divergence("train", [*honest, ReplicaDigest("node-evil", GOOD, manifest_root=BAD)])
    assert [f.kind for f in findings] == ["dataset_no_authority"]


def test_no_finding_is_raised_on_an_offline_node() -> None:
    assert detect_divergence("train", replicas(GOOD, BAD, GOOD), offline=frozenset({"node-b"})) == []


def test_the_source_is_a_replica_matching_the_authority_and_fit_to_serve() -> None:
    candidates = [Replica("node-a", BAD), Replica("node-b", BAD), Replica("node-c", GOOD, online=False),
                  Replica("node-d", GOOD, in_incident=True), Replica("node-e", GOOD)]
    assert choose_source(candidates, target="node-b", authority_root=GOOD) == ("node-e", "")


def test_a_replica_that_does_not_verify_against_the_authority_is_never_a_source() -> None:
    source, why = choose_source([Replica("node-a", OTHER), Replica("node-c", GOOD, state="settling")],
                                target="node-b", authority_root=GOOD)
    assert source is None
    assert "node-a: its root is not the authority's" in why
    assert "node-c: its root is not the authority's" in why
    assert choose_source([Replica("node-a", GOOD)], target="node-b", authority_root="")[0] is None


def dataset_target() -> Target:
    return Target(incident_id=9, key="dataset_divergent/node-b/-/train", kind="dataset_divergent", node="node-b",
                  unit=None, severity="critical", summary="dataset train on node-b differs",
                  labels={"kind": "dataset_divergent", "node": "node-b"}, first_seen=NOW)


def resync_rule() -> Rule:
    return Rule(name="resync", kind="dataset_divergent",
                ladder=(Rung("resync", 3, NO_WAIT), Rung("notify", 1, NO_WAIT)), digest="d" * 64,
                verify_kind="cleared")


def test_the_resync_rung_plans_a_resync_from_the_verified_source() -> None:
    ctx = Context(dataset="train", authority_root=GOOD,
                  dataset_replicas=(Replica("node-a", OTHER), Replica("node-b", BAD), Replica("node-c", GOOD)))
    decision = plan_remediation(dataset_target(), resync_rule(), TargetState(), ctx, NOW)
    assert isinstance(decision, Propose)
    assert decision.plan.steps == (ResyncDataset("node-b", "train", "node-c"),)
    assert decision.plan.verification is not None
    assert (decision.plan.verification.kind, decision.plan.verification.unit) == ("cleared", None)
    assert isinstance(decision.plan.verification, Verification)


def test_without_a_verified_source_the_resync_rung_is_skipped_with_the_reason() -> None:
    ctx = Context(dataset="train", authority_root=GOOD,
                  dataset_replicas=(Replica("node-a", OTHER), Replica("node-b", BAD)))
    index, _, skipped = choose_rung(resync_rule(), dataset_target(), TargetState(), ctx)  # type: ignore[misc]
    assert index == 1
    assert skipped[0][0] == 0
    assert skipped[0][1].startswith("no resync source for train: no replica verifies against the authority")
