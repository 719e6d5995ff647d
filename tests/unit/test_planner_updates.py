"""The planner's rule table and what it does with a spec change: in place, by rotation, or refused."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from services.planner import rules
from services.planner.core import PlannerState, current_document, handle
from shared.events import (
    ClusterDeprovisioned,
    ClusterInfraFailed,
    ClusterReady,
    ClusterSetDeleted,
    Envelope,
    new_event,
)  # fmt: skip
from shared.events.clusterset import ClusterSpec
from shared.events.models import (
    ClusterRequested,
    ClusterRetirementRequested,
    ClusterSetPatchRequested,
    RolloutCompleted,
    RolloutRolledBack,
)
from tests.conftest import example_documents
from tests.unit.test_planner_core import applied, run, types

EXAMPLES = example_documents()
MODELSERVING = EXAMPLES["modelserving-prod-aws-us-east-1"]  # cluster-rotation, maxSurge 2
DATAENG = EXAMPLES["dataeng-staging-azure-westeurope"]  # in-place


def ready(state: PlannerState, cluster_id: str, config_hash: str | None = None) -> Envelope:
    m = state.members[cluster_id]
    assert state.location
    return new_event(ClusterReady(cluster_id=m.cluster_id, clusterset=state.name, location=state.location,
                                  cluster_type="X", config_hash=config_hash or m.config_hash, endpoint="https://x",
                                  infra_services=[]), source="test")  # fmt: skip


def all_ready(doc: dict) -> PlannerState:
    state, _ = run([applied(doc)])
    assert state is not None
    for cid in list(state.members):
        state, _ = handle(state, ready(state, cid))
    assert state is not None
    return state


def changed(doc: dict, path: str, value: Any) -> dict:
    d = copy.deepcopy(doc)
    node = d["spec"]
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    node[leaf] = value
    return d


# ---------------------------------------------------------------- the rule table, one test per field
SPEC = ClusterSpec.model_validate(copy.deepcopy({k: v for k, v in DATAENG["spec"].items()
                                                 if k not in ("count", "updateStrategy")}))  # fmt: skip
POOL = "spark-executor"
SELF_MANAGED = ClusterSpec.model_validate({k: v for k, v in EXAMPLES["core-prod-aws-eu-west-1"]["spec"].items()
                                           if k not in ("count", "updateStrategy")})  # fmt: skip
FIELD_CASES: dict[str, tuple[str, Any]] = {
    "kubernetesVersion": ("kubernetesVersion", "1.31"),
    "kubernetesVersion (self-managed)": ("kubernetesVersion", "1.31"),
    "features": ("features", ["byon", "private-connectivity"]),
    "network": ("network", {"vnetId": "/subscriptions/0000/other", "subnetIds": ["snet-c"]}),
    "controlPlane.mode": ("controlPlane", {"mode": "self-managed"}),
    "controlPlane.ha": ("controlPlane", {"mode": "self-managed", "ha": True}),
    "nodePools": ("nodePools", None),  # a pool added
    "nodePools[].instanceTypes": ("nodePools.2.instanceTypes", ["Standard_E16ds_v5"]),
    "nodePools[].spot": ("nodePools.2.spot", False),
    "nodePools[].minCount": ("nodePools.2.minCount", 1),
    "nodePools[].maxCount": ("nodePools.2.maxCount", 400),
    "nodePools[].labels": ("nodePools.2.labels", {"purpose": "spark"}),
    "nodePools[].taints": ("nodePools.2.taints", []),
    "infraServices": ("infraServices", ["namespaces", "rbac", "observability", "logging"]),
    "tags": ("tags", {"team": "data"}),
}


def test_every_rule_has_a_case():
    assert set(FIELD_CASES) == {r.field for r in rules.RULES}


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.field)
def test_rule_table(rule: rules.Rule):
    path, value = FIELD_CASES[rule.field]
    spec = SELF_MANAGED if rule.field in ("kubernetesVersion (self-managed)", "controlPlane.ha") else SPEC
    base = spec.model_dump(mode="json", by_alias=True)
    new = copy.deepcopy(base)
    if rule.field == "nodePools":
        new["nodePools"].append({"name": "extra", "instanceTypes": ["Standard_D4s_v5"], "minCount": 0, "maxCount": 2})
    elif rule.field == "controlPlane.mode":
        new["controlPlane"] = value
    else:
        node = new
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[leaf] = value
    changes = rules.diff(spec, ClusterSpec.model_validate(new))
    kinds = {c.rule.field: c.kind for c in changes}
    assert kinds.get(rule.field) == rule.kind, changes
    assert len(changes) == 1, changes
    if rule.field.startswith("nodePools[]."):
        assert any(c.field == f"nodePools[{POOL}].{rule.field.split('.')[-1]}" for c in changes)


def test_no_change_no_rule():
    assert rules.diff(SPEC, SPEC) == []


# ---------------------------------------------------------------- rotation
def test_a_version_bump_on_a_rotation_set_requests_a_rollout_and_nothing_else():
    state = all_ready(MODELSERVING)
    state, out = handle(state, applied(changed(MODELSERVING, "kubernetesVersion", "1.31")))
    assert types(out) == ["ClusterSetAccepted", "RolloutRequested"]
    accepted, rollout = out
    assert accepted.data["update_path"] == "rotation" and accepted.data["changes"] == ["kubernetesVersion"]
    assert rollout.data["count"] == 5 and rollout.data["serial_base"] == 5 and len(rollout.data["members"]) == 5
    assert rollout.data["to_config_hash"] == accepted.data["config_hash"]
    assert state is not None and state.rollout_id == rollout.data["rollout_id"]


def test_while_a_rollout_runs_count_waits_and_spec_changes_are_refused():
    state = all_ready(MODELSERVING)
    state, out = handle(state, applied(changed(MODELSERVING, "kubernetesVersion", "1.31")))
    rollout = out[1]
    # A count change is accepted but nothing is created until the rollout ends.
    bigger = changed(changed(MODELSERVING, "kubernetesVersion", "1.31"), "count", 7)
    state, out = handle(state, applied(bigger))
    assert types(out) == ["ClusterSetAccepted"]
    # A spec change is refused, naming the field and the rollout.
    state, out = handle(state, applied(changed(bigger, "tags", {"team": "x"})))
    assert types(out) == ["ClusterSetRejected"]
    assert out[0].data["errors"][0]["field"] == "spec.tags" and rollout.data["rollout_id"] in str(out[0].data)
    # The rollout ends: the deferred scale-up happens, on the new config.
    assert state is not None and state.location
    done = new_event(RolloutCompleted(clusterset=state.name, location=state.location,
                                      rollout_id=rollout.data["rollout_id"], next_serial=12), source="rotation")
    state, out = handle(state, done)
    assert types(out) == ["ClusterRequested", "ClusterRequested"]
    assert [e.data["serial"] for e in out] == [12, 13], "serials continue after the rotation's"


def test_a_rotation_change_on_an_in_place_set_is_refused_per_field():
    state = all_ready(DATAENG)
    doc = changed(changed(DATAENG, "kubernetesVersion", "1.31"), "nodePools.0.instanceTypes", ["Standard_D16s_v5"])
    _, out = handle(state, applied(doc))
    assert types(out) == ["ClusterSetRejected"]
    fields = [e["field"] for e in out[0].data["errors"]]
    assert fields == ["spec.kubernetesVersion", "spec.nodePools[infra].instanceTypes"]
    assert "in-place" in out[0].data["errors"][0]["message"]


def test_rotation_is_refused_when_clusters_are_protected():
    doc = copy.deepcopy(MODELSERVING)
    doc["metadata"]["protected"] = True
    state = all_ready(doc)
    _, out = handle(state, applied(changed(doc, "kubernetesVersion", "1.31")))
    assert types(out) == ["ClusterSetRejected"] and "protected" in out[0].data["errors"][0]["message"]


def test_rollback_puts_the_set_back_on_the_config_its_clusters_are_on():
    state = all_ready(MODELSERVING)
    old_hash = state.config_hash
    state, out = handle(state, applied(changed(MODELSERVING, "kubernetesVersion", "1.31")))
    rollout_id = out[1].data["rollout_id"]
    assert state is not None and state.location
    # The rotation had created one cluster and retired it in the rollback.
    new_cluster = ClusterRequested(cluster_id=f"{state.name}-new", clusterset=state.name, location=state.location,
                                   serial=5, cluster_type="X", generation=2, config_hash=str(state.config_hash),
                                   spec=state.spec, rollout_id=rollout_id)  # type: ignore[arg-type]
    ids = {"cluster_id": new_cluster.cluster_id, "clusterset": state.name, "location": state.location}
    state, _ = run([new_event(new_cluster, source="rotation"),
                    new_event(ClusterRetirementRequested(**ids, reason="rollback"), source="rotation"),
                    new_event(ClusterDeprovisioned(**ids), source="p")], state)  # fmt: skip
    assert state is not None and state.location
    rolled_back = RolloutRolledBack(clusterset=state.name, location=state.location, rollout_id=rollout_id, reason="x",
                                    next_serial=6)  # fmt: skip
    state, out = handle(state, new_event(rolled_back, source="r"))
    assert types(out)[0] == "ClusterSetAccepted" and out[0].data["config_hash"] == old_hash
    assert state is not None and state.rollout_id is None and state.config_hash == old_hash
    assert "ClusterSetConverged" in types(out)


# ---------------------------------------------------------------- in place
def test_an_in_place_change_updates_max_unavailable_clusters_at_a_time():
    doc = changed(DATAENG, "count", 4)
    doc["spec"]["updateStrategy"] = {"type": "in-place", "maxUnavailable": 2}
    state = all_ready(doc)
    state, out = handle(state, applied(changed(doc, "nodePools.1.maxCount", 40)))
    assert types(out) == ["ClusterSetAccepted", "ClusterUpdateRequested", "ClusterUpdateRequested"]
    assert out[0].data["update_path"] == "in-place"
    assert out[1].data["changes"] == ["nodePools[spark-driver].maxCount"]
    assert state is not None
    target = state.config_hash
    first = out[1].data["cluster_id"]
    # An old ClusterReady (from before) does not count as done; the new one does and lets the next one go.
    state, more = handle(state, ready(state, first, config_hash=state.members[first].config_hash))
    assert more == []
    state, more = handle(state, ready(state, first, config_hash=target))
    assert types(more) == ["ClusterUpdateRequested"]
    assert state is not None
    for cid in [out[2].data["cluster_id"], more[0].data["cluster_id"]]:
        state, more = handle(state, ready(state, cid, config_hash=target))
    assert state is not None
    last = next(m for m in state.members.values() if m.updating_to)
    state, more = handle(state, ready(state, last.cluster_id, config_hash=target))
    assert types(more) == ["ClusterSetConverged"]
    assert all(m.config_hash == target for m in state.members.values())  # type: ignore[union-attr]


def test_a_cluster_failing_during_an_in_place_update_stops_it():
    state = all_ready(DATAENG)
    state, out = handle(state, applied(changed(DATAENG, "tags", {"team": "data"})))
    assert types(out) == ["ClusterSetAccepted", "ClusterUpdateRequested"]
    assert state is not None and state.location
    cid = out[1].data["cluster_id"]
    failed = new_event(ClusterInfraFailed(cluster_id=cid, clusterset=state.name, location=state.location,
                                          service="ingress", reason="x", retryable=False), source="installer")
    state, out = handle(state, failed)
    assert types(out) == ["ClusterSetUpdateFailed"] and out[0].data["cluster_ids"] == [cid]
    state, out = handle(state, failed)
    assert out == []


# ---------------------------------------------------------------- fleet rollout patches
def test_a_patch_makes_a_new_generation_carrying_the_fleet_rollout_id():
    state = all_ready(MODELSERVING)
    assert state is not None and state.location
    patch = new_event(ClusterSetPatchRequested(clusterset=state.name, location=state.location, fleet_rollout_id="k131",
                                               stage="canary", patch={"kubernetesVersion": "1.31"}), source="rotation")
    state, out = handle(state, patch)
    assert types(out) == ["ClusterSetAccepted", "RolloutRequested"]
    assert out[0].data["fleet_rollout_id"] == "k131" and out[1].data["fleet_rollout_id"] == "k131"
    assert state is not None and current_document(state)["spec"]["kubernetesVersion"] == "1.31"


def test_a_patch_that_changes_nothing_reports_the_set_converged_at_once():
    state = all_ready(MODELSERVING)
    assert state is not None and state.location
    patch = new_event(ClusterSetPatchRequested(clusterset=state.name, location=state.location, fleet_rollout_id="noop",
                                               stage="all", patch={"kubernetesVersion": "1.30"}), source="rotation")
    _, out = handle(state, patch)
    assert "ClusterSetConverged" in types(out) and out[-1].data["fleet_rollout_id"] == "noop"


def test_a_bad_patch_or_a_deleted_set_is_rejected_for_the_fleet_rollout():
    state = all_ready(MODELSERVING)
    assert state is not None and state.location
    bad = new_event(ClusterSetPatchRequested(clusterset=state.name, location=state.location, fleet_rollout_id="f",
                                             stage="s", patch={"kubernetesVersion": "one"}), source="rotation")
    _, out = handle(state, bad)
    assert types(out) == ["ClusterSetRejected"] and out[0].data["fleet_rollout_id"] == "f"
    assert out[0].data["errors"][0]["field"] == "spec.kubernetesVersion"
    gone, _ = handle(state, new_event(ClusterSetDeleted(name=state.name), source="u"))
    ok = new_event(ClusterSetPatchRequested(clusterset=state.name, location=state.location, fleet_rollout_id="f",
                                            stage="s", patch={"kubernetesVersion": "1.31"}), source="rotation")
    _, out = handle(gone, ok)
    assert types(out) == ["ClusterSetRejected"] and out[0].data["fleet_rollout_id"] == "f"
