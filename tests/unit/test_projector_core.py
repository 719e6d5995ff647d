"""status_projector's pure core and renderers: state machine, guards, determinism, idempotence."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.status_projector import controlplane as cp
from services.status_projector import core, render, schemas
from services.status_projector import testing as T
from services.status_projector.core import Views, apply
from services.status_projector.store import CursorError, decode_cursor, encode_cursor, page_after
from shared.events import EVENT_TYPES, Envelope, new_event, subjects
from shared.events import models as m
from shared.events.clusterset import FieldError
from tests.conftest import EXAMPLES_DIR, example_documents

DOCS = example_documents()
CS = T.parse(DOCS["modelserving-prod-aws-us-east-1"])
AZ = T.parse(DOCS["dataeng-staging-azure-westeurope"])
SM = T.parse(DOCS["core-prod-aws-eu-west-1"])  # self-managed control planes, one node (not HA)
NAME = CS.metadata.name
LOC = CS.metadata.location
ACC = T.accepted(CS)


def common(cid: str = "c1") -> dict[str, Any]:
    return dict(location=LOC, cluster_id=cid, clusterset=NAME)


def ev(payload: m.Event, n: int, source: str = "test") -> Envelope:
    """An event with a fixed id and time (minute `n` after T0)."""
    return new_event(payload, source=source, event_id=f"e-{payload.type_name()}-{n}",
                     time=T.T0 + timedelta(minutes=n))  # fmt: skip


def run(events: list[Envelope], views: Views | None = None, start_seq: int = 1) -> Views:
    views = views or Views()
    for i, env in enumerate(events):
        apply(views, start_seq + i, env)
    return views


def states_along(events: list[Envelope], cid: str) -> list[str | None]:
    views, out = Views(), []
    for i, env in enumerate(events, 1):
        apply(views, i, env)
        out.append(views.clusters.get(cid, {}).get("state"))
    return out


def ready_cluster(cid: str = "c1") -> tuple[Views, list[Envelope]]:
    events = [ACC, *T.provision(CS, ACC, cid, T.T0)]
    return run(events), events


# ---------------------------------------------------------------- coverage of the event catalog
def test_every_fleet_event_type_is_projected() -> None:
    fleet = {name for name, cls in EVENT_TYPES.items() if cls.stream == subjects.STREAM_FLEET and not cls.local_only}
    assert fleet - core.HANDLED_TYPES == set()


# ---------------------------------------------------------------- cluster lifecycle
def test_provisioning_walks_the_state_machine_with_times_from_the_events() -> None:
    events = [ACC, *T.provision(CS, ACC, "c1", T.T0)]
    states = states_along(events, "c1")
    n_services = len(CS.spec.infra_service_names())
    assert states == [None, "REQUESTED", *["PROVISIONING"] * 5, "PROVISIONED", *["INSTALLING"] * n_services, "READY"]
    views = run(events)
    doc = views.clusters["c1"]
    assert doc["createdAt"] == core.ts(events[1].time)
    assert doc["lastTransitionTime"] == doc["updatedAt"] == core.ts(events[-1].time)
    assert doc["configHash"] == CS.spec.cluster_spec().config_hash()
    assert doc["clusterType"] == "ModelServing" and doc["location"] == {"env": "prod", "cloud": "aws",
                                                                        "region": "us-east-1"}  # fmt: skip
    assert set(doc["resources"]) == set(m.PROVISION_STEPS)
    assert doc["endpoint"] == "https://c1.example.aws.test"
    assert doc["network"]["vpcId"] == "net-c1" and len(doc["network"]["subnetIds"]) == 3
    assert [s["state"] for s in doc["infraServices"]] == ["INSTALLED"] * n_services
    assert doc["conditions"] == [{"type": "Ready", "status": "True", "reason": "Ready",
                                  "message": "cluster is READY", "lastTransitionTime": doc["updatedAt"]}]  # fmt: skip
    history = views.history["cluster:c1"]
    assert [h["type"] for h in history] == [e.type for e in events[1:]]
    assert [h["seq"] for h in history] == list(range(2, len(events) + 1))
    assert history[0] | {"detail": None} == {
        "id": events[1].id, "type": "ClusterRequested", "time": "2026-11-21T10:00:00Z", "source": "planner",
        "seq": 2, "correlationId": ACC.id, "causationId": ACC.id, "detail": None,
    }  # fmt: skip


def test_services_are_pending_from_the_request_on() -> None:
    views = run([ACC, T.provision(CS, ACC, "c1", T.T0)[0]])
    services = views.clusters["c1"]["infraServices"]
    assert [s["name"] for s in services] == CS.spec.infra_service_names()
    assert {s["state"] for s in services} == {"PENDING"}
    assert services[0]["version"] == "1.0.0"


def test_retirement_chain_ends_deleted_and_deleted_is_final() -> None:
    views, events = ready_cluster()
    retirement = T.retire(CS, ACC, "c1", T.T0 + timedelta(hours=1))
    states = []
    for i, env in enumerate(retirement, len(events) + 1):
        apply(views, i, env)
        states.append(views.clusters["c1"]["state"])
    assert states == ["DELETING"] * 6 + ["DELETED"]
    doc = views.clusters["c1"]
    assert doc["resources"] == {} and doc["retiring"] and doc["retirement"]["reason"] == "scale-down"
    late = [
        ev(m.ClusterReady(**common(), cluster_type="ModelServing", config_hash="x", endpoint="e", infra_services=[]),
           90),
        ev(m.ClusterProvisioned(**common(), endpoint="e", ca_fingerprint="f", resources={}, credential_ref="r",
                                network=m.NetworkInfo(network_id="n", subnet_ids=["s"])), 91),
        ev(m.ClusterProvisioningFailed(**common(), operation="deprovision", step="network", code="X", message="m",
                                       retryable=True), 92),
        ev(m.ClusterRetirementRequested(**common(), reason="manual"), 93),
        ev(m.ClusterDrainRequested(**common()), 94),
        ev(m.ClusterUpdateRequested(**common(), generation=2, config_hash="y", spec=CS.spec.cluster_spec(),
                                    changes=["tags"]), 95),
    ]  # fmt: skip
    before = dict(doc)
    run(late, views, start_seq=500)
    after = views.clusters["c1"]
    assert after["state"] == "DELETED" and after["failure"] is None and after["desired"] is None
    assert {k: v for k, v in after.items() if k not in ("updatedAt", "lastEventId", "lastEventSeq", "eventCount")} \
        == {k: v for k, v in before.items() if k not in ("updatedAt", "lastEventId", "lastEventSeq", "eventCount")}


def test_once_retiring_provisioning_facts_do_not_move_it_back() -> None:
    full = T.provision(CS, ACC, "c1", T.T0)
    views = run([ACC, *full[:3]])  # requested + two resources
    assert views.clusters["c1"]["state"] == "PROVISIONING"
    apply(views, 100, ev(m.ClusterRetirementRequested(**common(), reason="clusterset-deleted"), 50))
    assert views.clusters["c1"]["state"] == "DELETING"
    run(full[3:], views, start_seq=101)  # the rest of provisioning and install arrives late
    apply(views, 200, ev(m.ClusterProvisioningFailed(**common(), operation="provision", step="iam", code="Throttled",
                                                     message="slow down", retryable=True), 51))  # fmt: skip
    doc = views.clusters["c1"]
    assert doc["state"] == "DELETING" and doc["failure"] is None and doc["endpoint"] is None
    # A failure of the deprovisioning itself is shown...
    apply(views, 201, ev(m.ClusterProvisioningFailed(**common(), operation="deprovision", step="network",
                                                     code="DependencyViolation", message="eni in use",
                                                     retryable=True), 52))  # fmt: skip
    doc = views.clusters["c1"]
    assert doc["state"] == "FAILED"
    assert doc["failure"] | {"eventId": None} == {
        "code": "DependencyViolation", "message": "eni in use", "retryable": True, "operation": "deprovision",
        "step": "network", "service": None, "object": None, "fromState": "DELETING", "eventId": None,
        "time": "2026-11-21T10:52:00Z",
    }  # fmt: skip
    assert {c["type"] for c in doc["conditions"]} == {"Ready", "Failed", "Retiring"}
    # ...but still no provisioning fact brings it back, and the retried deprovisioning clears it.
    apply(views, 202, ev(m.ClusterReady(**common(), cluster_type="ModelServing", config_hash="h", endpoint="e",
                                        infra_services=[]), 53))  # fmt: skip
    assert views.clusters["c1"]["state"] == "FAILED"
    apply(views, 203, ev(m.ClusterResourceDeprovisioned(**common(), step="network"), 54))
    assert views.clusters["c1"]["state"] == "DELETING" and views.clusters["c1"]["failure"] is None
    apply(views, 204, ev(m.ClusterDeprovisioned(**common()), 55))
    assert views.clusters["c1"]["state"] == "DELETED"


def test_retryable_infra_failure_then_success_clears_the_failure() -> None:
    full = T.provision(CS, ACC, "c1", T.T0)
    installs = [e for e in full if e.type == "InfraServiceInstalled"]
    views = run([ACC, *full[:-1]][: 2 + 5 + 1 + 2])  # up to two services installed
    apply(views, 100, ev(m.ClusterInfraFailed(**common(), service="observability", object="Deployment/otel",
                                              reason="not healthy after 300s", retryable=True), 30))  # fmt: skip
    doc = views.clusters["c1"]
    assert doc["state"] == "FAILED"
    assert doc["failure"]["service"] == "observability" and doc["failure"]["retryable"] is True
    assert doc["failure"]["fromState"] == "INSTALLING" and doc["failure"]["code"] == "InfraServiceFailed"
    assert doc["failure"]["message"] == "not healthy after 300s"
    assert next(s for s in doc["infraServices"] if s["name"] == "observability")["state"] == "FAILED"
    failed = next(c for c in doc["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InfraServiceFailed" and failed["lastTransitionTime"] == "2026-11-21T10:30:00Z"
    run([*installs[2:], full[-1]], views, start_seq=101)
    doc = views.clusters["c1"]
    assert doc["state"] == "READY" and doc["failure"] is None
    assert [c["type"] for c in doc["conditions"]] == ["Ready"]
    assert {s["state"] for s in doc["infraServices"]} == {"INSTALLED"}


def test_provisioning_failure_records_step_and_a_retry_moves_on() -> None:
    full = T.provision(CS, ACC, "c1", T.T0)
    views = run([ACC, *full[:2]])
    apply(views, 50, ev(m.ClusterProvisioningFailed(**common(), operation="provision", step="cluster",
                                                    code="LimitExceeded", message="quota", retryable=False), 9))
    doc = views.clusters["c1"]
    assert doc["state"] == "FAILED" and doc["failure"]["step"] == "cluster" and doc["failure"]["retryable"] is False
    assert doc["lastTransitionTime"] == "2026-11-21T10:09:00Z"
    # failing again keeps where it failed from and the first transition time
    apply(views, 51, ev(m.ClusterProvisioningFailed(**common(), operation="provision", step="cluster",
                                                    code="LimitExceeded", message="quota", retryable=False), 10))
    assert views.clusters["c1"]["failure"]["fromState"] == "PROVISIONING"
    assert views.clusters["c1"]["lastTransitionTime"] == "2026-11-21T10:09:00Z"
    run(full[2:], views, start_seq=52)
    assert views.clusters["c1"]["state"] == "READY" and views.clusters["c1"]["failure"] is None


def test_update_moves_through_updating_and_promotes_the_new_spec() -> None:
    views, events = ready_cluster()
    new_spec = CS.spec.cluster_spec().model_copy(update={"tags": {"team": "serving", "tier": "gold"}})
    new_hash = new_spec.config_hash()
    old_hash = views.clusters["c1"]["configHash"]
    apply(views, 100, ev(m.ClusterUpdateRequested(**common(), generation=2, config_hash=new_hash, spec=new_spec,
                                                  changes=["tags"]), 60))  # fmt: skip
    doc = views.clusters["c1"]
    assert doc["state"] == "UPDATING" and doc["configHash"] == old_hash
    assert doc["desired"]["configHash"] == new_hash and doc["desired"]["changes"] == ["tags"]
    assert render.cluster_view(doc, new_hash)["outdated"] is True
    apply(views, 101, ev(m.InfraServiceInstalled(**common(), service="ingress", version="4.12.0"), 61))
    apply(views, 102, ev(m.ClusterResourceProvisioned(**common(), step="node_pools", resources={"v": 2}), 62))
    assert views.clusters["c1"]["state"] == "UPDATING"
    installed = [{"name": s, "version": "1"} for s in CS.spec.infra_service_names()]
    apply(views, 103, ev(m.ClusterReady(**common(), cluster_type="ModelServing", config_hash=new_hash,
                                        endpoint="https://c1.example.aws.test", infra_services=installed), 63))
    doc = views.clusters["c1"]
    assert doc["state"] == "READY" and doc["configHash"] == new_hash and doc["generation"] == 2
    assert doc["spec"]["tags"] == {"team": "serving", "tier": "gold"} and doc["desired"] is None
    assert doc["resources"]["node_pools"] == {"v": 2}
    assert render.cluster_view(doc, new_hash)["outdated"] is False


def test_drain_then_retire() -> None:
    views, _ = ready_cluster()
    run([
        ev(m.ClusterDrainRequested(**common(), rollout_id="r1"), 70),
        ev(m.ClusterReady(**common(), cluster_type="ModelServing", config_hash="h", endpoint="e", infra_services=[]),
           71),
    ], views, start_seq=100)  # fmt: skip
    doc = views.clusters["c1"]
    assert doc["state"] == "DRAINING" and doc["rolloutId"] == "r1"  # a late ready fact does not undo the drain
    apply(views, 110, ev(m.ClusterDrained(**common(), rollout_id="r1", timed_out=True), 72))
    doc = views.clusters["c1"]
    assert doc["state"] == "DRAINED" and doc["drain"] == {"requestedAt": "2026-11-21T11:10:00Z",
                                                          "drainedAt": "2026-11-21T11:12:00Z", "timedOut": True,
                                                          "timeoutSeconds": 900, "evicted": 0, "remaining": 0}
    run(T.retire(CS, ACC, "c1", T.T0 + timedelta(hours=2), reason="rotation"), views, start_seq=120)
    assert views.clusters["c1"]["state"] == "DELETED"


def test_a_fact_before_the_request_still_gets_a_view_and_the_request_fills_it_in() -> None:
    full = T.provision(CS, ACC, "c1", T.T0)
    views = run([full[1], full[0]])  # resource before request (e.g. a partially replayed stream)
    doc = views.clusters["c1"]
    assert doc["state"] == "PROVISIONING" and doc["spec"] is not None and doc["clusterType"] == "ModelServing"
    assert doc["createdAt"] == core.ts(full[1].time)


# ---------------------------------------------------------------- control-plane operations
SM_ACC = T.accepted(SM)
SM_NAME, SM_LOC = SM.metadata.name, SM.metadata.location


def self_managed(*cluster_ids: str) -> Views:
    return run(T.fleet_history(SM, list(cluster_ids)))


def cp_common(cid: str = "s1", op: str = "op1", **kw: Any) -> dict[str, Any]:
    return dict(location=SM_LOC, clusterset=SM_NAME, cluster_id=cid, operation_id=op, **kw)


def test_a_migration_has_a_step_timeline_availability_and_shows_on_the_cluster() -> None:
    views = self_managed("s1")
    before = render.cluster_view(views.clusters["s1"], None)["controlPlane"]
    assert before == {"mode": "self-managed", "ha": False, "members": [], "endpoint": None, "version": "1.29",
                      "lastOperation": None}  # fmt: skip
    events = T.migration(SM, SM_ACC, "s1", "op1", T.T0 + timedelta(hours=1))
    states = []
    for i, env in enumerate(events, 100):
        apply(views, i, env)
        states.append(views.cp_operations["op1"]["state"])
    assert states == ["REQUESTED", *["IN_PROGRESS"] * len(T.MIGRATION_STEPS), "COMPLETED"]
    doc = views.cp_operations["op1"]
    assert (doc["kind"], doc["clusterId"], doc["clusterset"], doc["pipelineId"]) == ("migration", "s1", SM_NAME, None)
    assert doc["location"] == {"env": "prod", "cloud": "aws", "region": "eu-west-1"}
    assert (doc["phase"], doc["step"]) == (3, "open-load-balancers") and doc["failure"] is None
    assert doc["kubernetesVersion"] == "1.29"
    assert doc["members"] == ["s1-cp-0", "s1-cp-1", "s1-cp-2"] and doc["endpoint"] == "https://s1.example.aws.test"
    assert doc["reason"] == "controlPlane.ha false -> true"
    assert doc["configHash"] == SM.spec.cluster_spec().config_hash()
    timeline = doc["timeline"]
    assert [(t["phase"], t["step"]) for t in timeline] == list(T.MIGRATION_STEPS)
    assert timeline[1] == {"phase": 1, "node": None, "step": "stop-mutations", "rollback": False,
                           "startedAt": "2026-11-21T11:00:01.500000Z", "completedAt": "2026-11-21T11:00:02Z",
                           "durationS": 0.5, "detail": {}, "eventId": events[2].id}  # fmt: skip
    assert timeline[2]["detail"] == {"revision": 10042, "hash": 3141592}
    assert doc["availability"] == {"requests": 1200, "succeeded": 1188, "availabilityPct": 99.0, "downtimeS": 2.5,
                                   "requestsWithoutQuorum": 0, "succeededWithoutQuorum": 0}  # fmt: skip
    assert doc["availabilityPct"] == 99.0
    assert (doc["requestedAt"], doc["completedAt"], doc["durationS"]) == ("2026-11-21T11:00:00Z",
                                                                          "2026-11-21T11:00:13Z", 13.0)
    cluster = views.clusters["s1"]
    assert cluster["state"] == "READY"  # it kept serving throughout
    view = render.cluster_view(cluster, None)["controlPlane"]
    assert view | {"lastOperation": None} == {"mode": "self-managed", "ha": True, "members": doc["members"],
                                              "endpoint": "https://s1.example.aws.test", "version": "1.29",
                                              "lastOperation": None}  # fmt: skip
    assert view["lastOperation"] == {k: doc[k] for k in cp.OPERATION_SUMMARY_KEYS}
    assert [h["type"] for h in views.history["cluster:s1"]][-2:] == ["ControlPlaneMigrationStepCompleted",
                                                                      "ControlPlaneMigrationCompleted"]
    assert cp.index_entries(doc) == {("kind", "migration"), ("state", "COMPLETED"), ("clusterset", SM_NAME),
                                     ("cluster", "s1")}  # fmt: skip
    assert "timeline" not in render.migration_listing(doc) and render.migration_listing(doc)["members"]


def test_a_failed_migration_rolls_back_and_a_rerun_completes() -> None:
    views = self_managed("s1")
    failed = T.migration(SM, SM_ACC, "s1", "op1", T.T0 + timedelta(hours=1), fail_at="restore-members")
    states = []
    for i, env in enumerate(failed, 100):
        apply(views, i, env)
        states.append(views.cp_operations["op1"]["state"])
    assert states == ["REQUESTED", *["IN_PROGRESS"] * 7, *["ROLLING_BACK"] * 5, "ROLLED_BACK"]
    doc = views.cp_operations["op1"]
    assert doc["failure"] | {"eventId": None} == {"step": "restore-members", "node": None,
                                                  "reason": "restore-members: injected failure", "rollingBack": False,
                                                  "rolledBack": True, "time": "2026-11-21T11:00:08Z",
                                                  "eventId": None}  # fmt: skip
    assert doc["rollback"] == {"fromStep": "restore-members", "reason": "injected failure",
                               "time": "2026-11-21T11:00:13Z"}  # fmt: skip
    assert [t["step"] for t in doc["timeline"] if t["rollback"]] == list(T.ROLLBACK_STEPS)
    assert doc["availability"]["downtimeS"] == 9.0 and doc["durationS"] == 13.0
    cluster = render.cluster_view(views.clusters["s1"], None)["controlPlane"]
    assert cluster["ha"] is False and cluster["members"] == [] and cluster["lastOperation"]["state"] == "ROLLED_BACK"

    rerun = T.migration(SM, SM_ACC, "s1", "op2", T.T0 + timedelta(hours=2))
    run(rerun, views, start_seq=200)
    # A late fact of the first attempt (redone after a crash, a new event id) changes neither it nor the cluster.
    late = ev(m.ControlPlaneMigrationStepCompleted(**cp_common(), phase=2, step="restore-members", rollback=True), 5)
    apply(views, 300, late)
    assert views.cp_operations["op1"]["state"] == "ROLLED_BACK" and views.cp_operations["op2"]["state"] == "COMPLETED"
    cluster = render.cluster_view(views.clusters["s1"], None)["controlPlane"]
    assert cluster["ha"] is True and cluster["lastOperation"]["operationId"] == "op2"


def test_operation_state_guards() -> None:
    views = self_managed("s1")
    step = ev(m.ControlPlaneMigrationStepCompleted(**cp_common(), phase=1, step="stop-mutations"), 61)
    run([
        ev(m.ControlPlaneMigrationRequested(**cp_common()), 60),
        step,
        ev(m.ControlPlaneMigrationStepCompleted(**cp_common(), phase=1, step="stop-mutations", detail={"x": 1}), 62),
        ev(m.ControlPlaneMigrationFailed(**cp_common(), step="snapshot-save", reason="disk full", rolling_back=False),
           63),
        ev(m.ControlPlaneMigrationStepCompleted(**cp_common(), phase=1, step="snapshot-save"), 64),
        ev(m.ControlPlaneMigrationRequested(**cp_common()), 65),
    ], views, start_seq=100)  # fmt: skip
    doc = views.cp_operations["op1"]
    assert doc["state"] == "FAILED" and doc["failure"]["rollingBack"] is False and doc["completedAt"] is not None
    assert [t["eventId"] for t in doc["timeline"]] == [step.id, "e-ControlPlaneMigrationStepCompleted-64"]
    assert doc["timeline"][0]["detail"] == {}  # the step redone after a crash keeps its first completion
    assert doc["timeline"][0]["startedAt"] == doc["requestedAt"] == "2026-11-21T11:00:00Z"  # no start reported
    run([ev(m.ControlPlaneMigrationRolledBack(**cp_common(), from_step="snapshot-save"), 66),
         ev(m.ControlPlaneMigrationCompleted(**cp_common(), members=["a", "b", "c"]), 67)], views, start_seq=200)
    doc = views.cp_operations["op1"]
    assert doc["state"] == "ROLLED_BACK" and doc["completedAt"] == "2026-11-21T11:06:00Z" and doc["members"] == []
    assert doc["durationS"] == 360.0
    assert render.cluster_view(views.clusters["s1"], None)["controlPlane"]["ha"] is False  # not completed after all
    # Rolling back: a forward step does not end the rollback.
    run([ev(m.ControlPlaneMigrationFailed(**cp_common(op="op3"), step="create_nodes", reason="quota",
                                          rolling_back=True), 70),
         ev(m.ControlPlaneMigrationStepCompleted(**cp_common(op="op3"), phase=2, step="create_nodes"), 71)],
        views, start_seq=300)  # fmt: skip
    assert views.cp_operations["op3"]["state"] == "ROLLING_BACK"
    # Facts of a deleted cluster's operation are kept on the operation, not on the cluster.
    deleted = self_managed("s2")
    run(T.retire(SM, SM_ACC, "s2", T.T0 + timedelta(hours=1)), deleted, start_seq=100)
    apply(deleted, 200, ev(m.ControlPlaneUpgradeRequested(**cp_common("s2", "op9"), to_version="1.30"), 80))
    assert deleted.clusters["s2"]["controlPlane"] is None and deleted.cp_operations["op9"]["toVersion"] == "1.30"


def test_an_upgrade_goes_one_node_at_a_time_and_a_failing_node_halts_it() -> None:
    views = self_managed("s1", "s2")
    run(T.upgrade(SM, SM_ACC, "s1", "up1", T.T0 + timedelta(hours=1), to_version="1.30"), views, start_seq=100)
    doc = views.cp_operations["up1"]
    assert (doc["kind"], doc["state"], doc["toVersion"]) == ("upgrade", "COMPLETED", "1.30")
    # The cluster-wide precheck runs on no node of its own: the nodes touched are the members, in order.
    assert doc["nodes"] == ["s1-cp-0", "s1-cp-1", "s1-cp-2"] and (doc["node"], doc["step"]) == ("s1-cp-2", "validate")
    assert [(t["node"], t["step"]) for t in doc["timeline"][:5]] == [("cluster", "precheck"),
                                                                     *(("s1-cp-0", s) for s in T.UPGRADE_STEPS)]
    # Upgrade steps report no start: each began when the one before it ended.
    assert [t["startedAt"] for t in doc["timeline"][1:]] == [t["completedAt"] for t in doc["timeline"][:-1]]
    assert doc["timeline"][1]["phase"] is None and doc["timeline"][1]["detail"] == {"version": "1.30"}
    assert doc["timeline"][0]["detail"]["order"] == doc["nodes"] and len(doc["timeline"]) == 13
    assert doc["availability"]["availabilityPct"] == 100.0
    assert render.cluster_view(views.clusters["s1"], None)["controlPlane"]["version"] == "1.30"

    states = []
    for i, env in enumerate(T.upgrade(SM, SM_ACC, "s2", "up2", T.T0 + timedelta(hours=2), fail_node=1), 200):
        apply(views, i, env)
        states.append(views.cp_operations["up2"]["state"])
    assert states[-4:] == ["IN_PROGRESS", "ROLLING_BACK", "ROLLING_BACK", "FAILED"]  # the node first, then the halt
    doc = views.cp_operations["up2"]
    assert doc["state"] == "FAILED" and doc["nodes"] == ["s2-cp-0", "s2-cp-1"]
    assert doc["failure"] | {"eventId": None, "time": None} == {
        "step": None, "node": "s2-cp-1", "reason": "validation: hashkv differs", "rollingBack": False,
        "rolledBack": True, "eventId": None, "time": None}  # fmt: skip
    assert doc["timeline"][-1] | {"eventId": None} == doc["timeline"][-1] | {
        "node": "s2-cp-1", "step": "rollback-node", "rollback": True, "eventId": None}
    assert render.cluster_view(views.clusters["s2"], None)["controlPlane"]["version"] == "1.29"


def test_a_pipeline_halts_past_its_failure_budget() -> None:
    ids = ["s1", "s2", "s3", "s4", "s5"]
    views = self_managed(*ids)
    events = T.pipeline(SM, SM_ACC, "pl1", ids, T.T0 + timedelta(hours=1), fail=["s3"], failure_budget=0)
    run(events, views, start_seq=1000)
    doc = views.cp_pipelines["pl1"]
    assert (doc["state"], doc["operation"], doc["concurrency"], doc["failureBudget"]) == ("HALTED", "migrate", 2, 0)
    assert doc["reason"] == "1 cluster(s) failed; the failure budget is 0" and doc["halted"]["reason"] == doc["reason"]
    assert [(e["clusterId"], e["state"], e["operationState"]) for e in doc["clusters"]] == [
        ("s1", "SUCCEEDED", "COMPLETED"), ("s2", "SUCCEEDED", "COMPLETED"), ("s3", "FAILED", "ROLLED_BACK"),
        ("s4", "SUCCEEDED", "COMPLETED"), ("s5", "PENDING", None)]  # fmt: skip
    assert (doc["succeeded"], doc["failed"], doc["inFlight"], doc["pending"]) == (3, 1, 0, 1)
    assert doc["counts"] == {"PENDING": 1, "IN_PROGRESS": 0, "SUCCEEDED": 3, "FAILED": 1}
    assert doc["budgetExceeded"] is True and doc["failedClusters"] == ["s3"] and doc["completedAt"] is None
    assert views.cp_operations["pl1-s3"]["pipelineId"] == "pl1" and "pl1-s5" not in views.cp_operations
    assert views.clustersets[SM_NAME]["controlPlanePipeline"] == {
        "pipelineId": "pl1", "operation": "migrate", "state": "HALTED", "toVersion": None,
        "requestedAt": doc["requestedAt"], "completedAt": None, "updatedAt": doc["updatedAt"]}  # fmt: skip
    assert cp.index_entries(doc) == {("kind", "pipeline"), ("state", "HALTED"), ("clusterset", SM_NAME),
                                     *(("cluster", c) for c in ids)}  # fmt: skip
    assert "clusters" not in render.migration_listing(doc)
    # A completion after the halt (the clusters in flight finished) records the end; the halt stands.
    base: dict[str, Any] = dict(location=SM_LOC, clusterset=SM_NAME, pipeline_id="pl1")
    apply(views, 2000, ev(m.ControlPlanePipelineCompleted(**base, succeeded=["s5"], failed=["s1"]), 300))
    doc = views.cp_pipelines["pl1"]
    assert doc["state"] == "HALTED" and doc["completedAt"] is not None and doc["durationS"] is not None
    assert [e["state"] for e in doc["clusters"]] == ["SUCCEEDED", "SUCCEEDED", "FAILED", "SUCCEEDED", "SUCCEEDED"]


def test_a_pipeline_of_upgrades_completes_and_facts_before_its_request_are_kept() -> None:
    views = self_managed("s1", "s2")
    events = T.pipeline(SM, SM_ACC, "pl2", ["s1", "s2"], T.T0 + timedelta(hours=1), operation="upgrade",
                        concurrency=1)  # fmt: skip
    run([*events[1:3], events[0], *events[3:]], views, start_seq=100)  # an operation's facts before the request
    doc = views.cp_pipelines["pl2"]
    assert doc["state"] == "COMPLETED" and doc["toVersion"] == "1.31" and doc["succeeded"] == 2
    assert [e["clusterId"] for e in doc["clusters"]] == ["s1", "s2"]
    assert doc["durationS"] == (events[-1].time - events[0].time).total_seconds()
    assert views.clustersets[SM_NAME]["controlPlanePipeline"]["state"] == "COMPLETED"
    # A stray fact of an older pipeline does not replace the running one in the set's summary.
    base: dict[str, Any] = dict(location=SM_LOC, clusterset=SM_NAME)
    run([ev(m.ControlPlanePipelineRequested(**base, pipeline_id="pl3", operation="migrate", clusters=[]), 400),
         ev(m.ControlPlanePipelineProgressed(**base, pipeline_id="pl2", succeeded=[], failed=[], in_flight=[],
                                             pending=0), 401)], views, start_seq=500)  # fmt: skip
    assert views.clustersets[SM_NAME]["controlPlanePipeline"]["pipelineId"] == "pl3"


# ---------------------------------------------------------------- cluster sets
def test_clusterset_accepted_rejected_retired() -> None:
    views = run([ACC])
    doc = views.clustersets[NAME]
    assert doc["accepted"] and not doc["deleted"] and doc["generation"] == 1 and doc["count"] == 5
    assert doc["updateStrategy"] | {"type": "cluster-rotation", "maxSurge": 2, "maxUnavailable": 0} \
        == doc["updateStrategy"]
    assert doc["lastChange"] == {"generation": 1, "updatePath": "none", "changes": [], "fleetRolloutId": None,
                                 "time": "2026-11-21T10:00:00Z"}  # fmt: skip
    assert doc["spec"]["kubernetesVersion"] == "1.30" and doc["location"]["cloud"] == "aws"
    rejected = ev(m.ClusterSetRejected(clusterset=NAME, cloud="aws", region="us-east-1",
                                       errors=[FieldError(field="spec.count", message="must be >= 0")]), 5)
    apply(views, 2, rejected)
    doc = views.clustersets[NAME]
    assert doc["accepted"] and doc["generation"] == 1  # a rejected re-apply leaves the accepted spec in place
    assert doc["lastRejection"] == {"eventId": rejected.id, "time": "2026-11-21T10:05:00Z", "cloud": "aws",
                                    "region": "us-east-1",
                                    "errors": [{"field": "spec.count", "message": "must be >= 0"}]}  # fmt: skip
    stale = T.accepted(CS, generation=0, event_id="stale")
    apply(views, 3, stale)
    assert views.clustersets[NAME]["generation"] == 1
    apply(views, 4, ev(m.ClusterSetRetired(location=LOC, clusterset=NAME, generation=1, clusters=["b", "a"]), 6))
    doc = views.clustersets[NAME]
    assert doc["deleted"] and doc["retiredClusters"] == ["a", "b"] and doc["retiredAt"] == "2026-11-21T10:06:00Z"
    assert render.clusterset_view(doc, [])["status"]["desiredClusters"] == 0
    apply(views, 5, T.accepted(CS, generation=2))
    assert not views.clustersets[NAME]["deleted"] and views.clustersets[NAME]["generation"] == 2
    assert [h["seq"] for h in views.history[f"clusterset:{NAME}"]] == [1, 2, 3, 4, 5]


def test_a_name_never_accepted_keeps_its_rejection_and_a_nameless_one_is_skipped() -> None:
    errors = [FieldError(field="spec.nodePools", message="Field required")]
    views = run([ev(m.ClusterSetRejected(clusterset="broken", errors=errors), 1),
                 ev(m.ClusterSetRejected(clusterset=None, errors=errors), 2)])  # fmt: skip
    assert list(views.clustersets) == ["broken"]
    doc = views.clustersets["broken"]
    assert doc["accepted"] is False and doc["spec"] is None
    assert doc["lastRejection"]["errors"] == [{"field": "spec.nodePools", "message": "Field required"}]


def rollout_requested(rollout_id: str, n: int, **kw: Any) -> Envelope:
    spec = CS.spec.cluster_spec()
    fields: dict[str, Any] = dict(location=LOC, clusterset=NAME, rollout_id=rollout_id, generation=2,
                                  from_config_hashes=["a"], to_config_hash="b", cluster_type="ModelServing", spec=spec,
                                  update_strategy=CS.spec.update_strategy, count=5, serial_base=5, members=[],
                                  changes=["kubernetesVersion"])  # fmt: skip
    return ev(m.RolloutRequested(**(fields | kw)), n)


def test_rollout_view() -> None:
    base: dict[str, Any] = dict(location=LOC, clusterset=NAME, rollout_id="r1")
    views = run([
        ACC,
        rollout_requested("r1", 1),
        ev(m.RolloutStarted(**base, to_config_hash="b"), 2),
        ev(m.RolloutProgressed(**base, replaced=2, remaining=3, batch=1, ready=2, alive=5), 3),
        ev(m.RolloutProgressed(**dict(base, rollout_id="old"), replaced=9, remaining=0), 4),
        ev(m.RolloutPaused(**base, reason="too many failures", failed=True, cluster_ids=["c9"]), 5),
    ])  # fmt: skip
    rollout = views.clustersets[NAME]["rollout"]
    assert rollout == {"rolloutId": "r1", "state": "PAUSED", "startedAt": "2026-11-21T10:02:00Z", "endedAt": None,
                       "updatedAt": "2026-11-21T10:05:00Z", "fromConfigHashes": ["a"], "toConfigHash": "b",
                       "generation": 2, "count": 5, "changes": ["kubernetesVersion"], "replaced": 2, "remaining": 3,
                       "batch": 1, "ready": 2, "alive": 5, "reason": "too many failures", "failed": True,
                       "failedClusterIds": ["c9"], "waiting": None, "fleetRolloutId": None}  # fmt: skip
    assert set(views.rollouts) == {"r1", "old"}  # every rollout has its own document, the stray one too
    assert views.rollouts["r1"] | rollout | {"updatedAt": rollout["updatedAt"]} == views.rollouts["r1"]


def states_of(timeline: list[dict[str, Any]]) -> list[str]:
    return [t["state"] for t in timeline]


def test_rollout_state_machine_and_its_guards() -> None:
    base: dict[str, Any] = dict(location=LOC, clusterset=NAME, rollout_id="r1")
    views = run([
        rollout_requested("r1", 1),
        ev(m.RolloutStarted(**base, to_config_hash="b", count=5, outdated=["c2", "c1"]), 2),
        ev(m.RolloutWaiting(**base, reason="outside the maintenance window",
                            until=T.T0 + timedelta(hours=8)), 3),
        ev(m.RolloutProgressed(**base, replaced=1, remaining=4), 4),
        ev(m.RolloutPaused(**base, reason="new cluster failed", failed=True, cluster_ids=["c7"]), 5),
        ev(m.RolloutProgressed(**base, replaced=2, remaining=3), 6),  # a batch finishing does not resume it
        rollout_requested("r1", 7, generation=3),  # late: never back to REQUESTED
    ])  # fmt: skip
    doc = views.rollouts["r1"]
    assert doc["state"] == "PAUSED" and doc["reason"] == "new cluster failed" and doc["failed"] is True
    assert doc["replaced"] == 2 and doc["failedClusterIds"] == ["c7"] and doc["outdatedClusters"] == ["c1", "c2"]
    assert states_of(doc["timeline"]) == ["REQUESTED", "IN_PROGRESS", "WAITING", "IN_PROGRESS", "PAUSED"]
    assert doc["timeline"][2] == {"state": "WAITING", "time": "2026-11-21T10:03:00Z", "type": "RolloutWaiting",
                                  "eventId": "e-RolloutWaiting-3", "reason": "outside the maintenance window"}
    run([
        ev(m.RolloutResumed(**base), 8),
        ev(m.RolloutRollingBack(**base, reason="operator"), 9),
        ev(m.RolloutProgressed(**base, replaced=1, remaining=0), 10),
        ev(m.RolloutRolledBack(**base, reason="operator", next_serial=9), 11),
        ev(m.RolloutProgressed(**base, replaced=5, remaining=0), 12),  # late facts of a finished rollout
        ev(m.RolloutResumed(**base), 13),
    ], views, start_seq=100)  # fmt: skip
    doc = views.rollouts["r1"]
    assert doc["state"] == "ROLLED_BACK" and doc["reason"] == "operator" and doc["endedAt"] == "2026-11-21T10:11:00Z"
    assert doc["replaced"] == 1 and doc["failed"] is False
    assert states_of(doc["timeline"])[-3:] == ["IN_PROGRESS", "ROLLING_BACK", "ROLLED_BACK"]
    assert views.clustersets[NAME]["rollout"]["state"] == "ROLLED_BACK"
    # a new rollout of the set replaces the finished one in the set's summary
    apply(views, 200, rollout_requested("r2", 20))
    assert views.clustersets[NAME]["rollout"]["rolloutId"] == "r2" and views.rollouts["r1"]["state"] == "ROLLED_BACK"


def test_rollout_waiting_ends_with_progress_and_aborted_is_final() -> None:
    base: dict[str, Any] = dict(location=LOC, clusterset=NAME, rollout_id="r1")
    views = run([
        rollout_requested("r1", 1),
        ev(m.RolloutWaiting(**base, reason="window closed"), 2),
        ev(m.RolloutProgressed(**base, replaced=1, remaining=4), 3),
    ])  # fmt: skip
    assert views.rollouts["r1"]["state"] == "IN_PROGRESS" and views.rollouts["r1"]["waiting"] is None
    run([ev(m.RolloutAborted(**base, reason="stop", next_serial=7), 4), ev(m.RolloutCompleted(**base), 5)], views, 10)
    doc = views.rollouts["r1"]
    assert doc["state"] == "ABORTED" and doc["reason"] == "stop" and doc["remaining"] == 4


def test_a_rotation_history_shows_on_the_rollout_its_clusters_and_the_set() -> None:
    new_cs = T.with_spec(CS, kubernetes_version="1.31")
    history = T.fleet_history(CS, ["c1", "c2"])
    events = [*history, *T.rotation(CS, new_cs, ACC, "r1", ["c1", "c2"], ["n1", "n2"], T.T0 + timedelta(hours=1))]
    views = run(events)
    doc = views.rollouts["r1"]
    assert doc["state"] == "COMPLETED" and doc["kind"] == "ClusterSetRollout" and doc["clusterset"] == NAME
    assert doc["createdClusters"] == ["n1", "n2"] and doc["retiredClusters"] == ["c1", "c2"]
    assert doc["outdatedClusters"] == ["c1", "c2"] and doc["clusterType"] == "ModelServing"
    assert (doc["replaced"], doc["remaining"], doc["count"], doc["changes"]) == (2, 0, 2, ["kubernetesVersion"])
    assert states_of(doc["timeline"]) == ["REQUESTED", "IN_PROGRESS", "COMPLETED"]
    assert doc["requestedAt"] == "2026-11-21T11:00:00Z" and doc["endedAt"] == doc["timeline"][-1]["time"]
    assert doc["eventCount"] == 2 + 2 + 2 + 2 + 1  # its facts, 2 created, 2 retired, 2 progress, completed
    n1, c1 = views.clusters["n1"], views.clusters["c1"]
    assert n1["createdByRolloutId"] == "r1" and n1["state"] == "READY" and n1["generation"] == 2
    assert c1["state"] == "DELETED" and c1["retirement"]["rolloutId"] == "r1" and c1["rolloutId"] == "r1"
    assert c1["retirement"]["reason"] == "rotation" and c1["drain"]["evicted"] == 12
    assert c1["drain"]["timeoutSeconds"] == 600
    cs = views.clustersets[NAME]
    assert cs["rollout"]["state"] == "COMPLETED" and cs["convergedGeneration"] == 2
    assert cs["upToDate"] is False  # the set document is still at generation 1 here (no ClusterSetAccepted 2)
    apply(views, 10_000, T.accepted(new_cs, generation=2))
    assert views.clustersets[NAME]["upToDate"] is True
    apply(views, 10_001, T.accepted(T.with_spec(CS, kubernetes_version="1.32"), generation=3))
    assert views.clustersets[NAME]["upToDate"] is False


def test_in_place_update_resources_then_ready_and_a_failed_update() -> None:
    views, _ = ready_cluster()
    new_spec = CS.spec.cluster_spec().model_copy(update={"tags": {"team": "serving", "tier": "gold"}})
    h = new_spec.config_hash()
    run([
        ev(m.ClusterUpdateRequested(**common(), generation=2, config_hash=h, spec=new_spec, changes=["tags"]), 60),
        ev(m.ClusterProvisioningFailed(**common(), operation="update", step="node_pools", code="Throttled",
                                       message="slow down", retryable=True), 61),
    ], views, start_seq=100)  # fmt: skip
    doc = views.clusters["c1"]
    assert doc["state"] == "FAILED" and doc["failure"]["fromState"] == "UPDATING"
    apply(views, 110, ev(m.ClusterResourcesUpdated(**common(), generation=2, config_hash=h,
                                                   resources={"node_pools": {"v": 3}}, changed=["node_pools"]), 62))
    doc = views.clusters["c1"]
    assert doc["state"] == "UPDATING" and doc["failure"] is None and doc["resources"]["node_pools"] == {"v": 3}
    assert doc["lastResourcesUpdate"] == {"generation": 2, "configHash": h, "changed": ["node_pools"],
                                          "time": "2026-11-21T11:02:00Z"}  # fmt: skip
    apply(views, 111, ev(m.ClusterReady(**common(), cluster_type="ModelServing", config_hash=h, endpoint="e",
                                        infra_services=[]), 63))  # fmt: skip
    doc = views.clusters["c1"]
    assert doc["state"] == "READY" and doc["configHash"] == h and doc["generation"] == 2


def test_set_convergence_update_failure_and_patch() -> None:
    set_fields: dict[str, Any] = dict(location=LOC, clusterset=NAME)
    views = run([
        ACC,
        ev(m.ClusterSetPatchRequested(**set_fields, fleet_rollout_id="f1", stage="canary",
                                      patch={"kubernetesVersion": "1.31"}), 1),
        ev(m.ClusterSetUpdateFailed(**set_fields, generation=2, config_hash="h2", cluster_ids=["c2", "c1"],
                                    reason="boom", fleet_rollout_id="f1"), 2),
    ])  # fmt: skip
    doc = views.clustersets[NAME]
    assert doc["fleetRollout"] == {"fleetRolloutId": "f1", "stage": "canary", "patch": {"kubernetesVersion": "1.31"},
                                   "requestedAt": "2026-11-21T10:01:00Z"}  # fmt: skip
    assert doc["lastUpdateFailure"]["clusterIds"] == ["c1", "c2"] and doc["lastUpdateFailure"]["generation"] == 2
    run([ev(m.ClusterSetConverged(**set_fields, generation=2, config_hash="h2", count=5), 3),
         ev(m.ClusterSetConverged(**set_fields, generation=1, config_hash="h1", count=5), 4),
         ev(m.ClusterSetUpdateFailed(**set_fields, generation=2, config_hash="h2", cluster_ids=[], reason="late"), 5)],
        views, start_seq=10)  # fmt: skip
    doc = views.clustersets[NAME]
    assert doc["convergedGeneration"] == 2 and doc["convergedConfigHash"] == "h2" and doc["lastUpdateFailure"] is None
    assert doc["convergedAt"] == "2026-11-21T10:03:00Z"


# ---------------------------------------------------------------- fleet rollouts
def fleet_views() -> tuple[Views, list[Envelope]]:
    events = [*T.fleet_history(CS, ["a1", "a2"]), *T.fleet_history(AZ, ["b1"])]
    fleet = T.fleet_rollout_history("k131", (CS, ["a1", "a2"]), (AZ, ["b1"]), T.T0 + timedelta(hours=1))
    return run([*events, *fleet]), fleet


def test_a_fleet_rollout_with_a_canary_an_approval_and_a_halt() -> None:
    views, fleet = fleet_views()
    doc = views.fleet_rollouts["k131"]
    assert doc["kind"] == "FleetRollout" and doc["clusterType"] == "ModelServing"
    assert doc["patch"] == {"kubernetesVersion": "1.31"} and (doc["maxInFlight"], doc["failureBudget"]) == (1, 0)
    assert doc["state"] == "HALTED" and doc["reason"] == "1 set failed; the failure budget is 0"
    assert doc["halted"]["reason"] == doc["reason"] and doc["failedSets"] == [AZ.metadata.name]
    assert (doc["succeeded"], doc["failed"], doc["inFlight"], doc["budgetExceeded"]) == (1, 1, 0, True)
    assert doc["setCounts"] == {"PENDING": 0, "IN_PROGRESS": 0, "SUCCEEDED": 1, "FAILED": 1}
    canary, rest = doc["stages"]
    assert (canary["name"], canary["state"], canary["soakSeconds"]) == ("canary", "COMPLETED", 600)
    assert canary["soakUntil"] == "2026-11-21T12:00:00Z" and canary["clustersets"] == [NAME]
    assert (rest["name"], rest["state"], rest["approval"]) == ("rest", "IN_PROGRESS", True)
    a, b = doc["sets"]
    assert (a["clusterset"], a["stage"], a["state"], a["updatePath"], a["generation"]) == (
        NAME, "canary", "SUCCEEDED", "rotation", 2)
    assert a["rolloutId"] == "k131-a" and a["rollout"]["state"] == "COMPLETED" and a["rollout"]["replaced"] == 2
    assert a["converged"]["generation"] == 2 and a["errors"] == [] and a["updateFailure"] is None
    assert (b["clusterset"], b["stage"], b["state"], b["updatePath"]) == (AZ.metadata.name, "rest", "FAILED",
                                                                          "in-place")  # fmt: skip
    assert b["reason"] == "control plane upgrade failed" and b["updateFailure"]["clusterIds"] == ["b1"]
    assert b["rollout"] is None and b["startedAt"] is not None and b["finishedAt"] is not None
    assert states_of(doc["timeline"]) == ["IN_PROGRESS", "SOAKING", "AWAITING_APPROVAL", "IN_PROGRESS", "HALTED"]
    # the set rollout it caused knows it, and so do the sets
    assert views.rollouts["k131-a"]["fleetRolloutId"] == "k131"
    assert views.clustersets[NAME]["fleetRollout"]["fleetRolloutId"] == "k131"
    assert views.clustersets[NAME]["lastChange"]["updatePath"] == "rotation"
    assert views.clusters["b1"]["state"] == "FAILED"

    states, along = [], Views()
    for i, env in enumerate(fleet):  # the state along the way
        apply(along, i + 1, env)
        states.append(along.fleet_rollouts["k131"]["state"])
    assert states[0] == "IN_PROGRESS" and "SOAKING" in states and "AWAITING_APPROVAL" in states

    # resume clears the halt; abort is final
    started = fleet[0]
    resume = new_event(m.FleetRolloutResumed(rollout_id="k131"), source="fleet", cause=started, discriminator="r")
    abort = new_event(m.FleetRolloutAborted(rollout_id="k131", reason="operator"), source="fleet", cause=started)
    done = new_event(m.FleetRolloutCompleted(rollout_id="k131", succeeded=1, failed=1), source="fleet", cause=started)
    run([resume], views, start_seq=50_000)
    assert views.fleet_rollouts["k131"]["state"] == "IN_PROGRESS" and views.fleet_rollouts["k131"]["halted"] is None
    assert views.fleet_rollouts["k131"]["reason"] is None
    run([abort, done], views, start_seq=50_001)
    doc = views.fleet_rollouts["k131"]
    assert doc["state"] == "ABORTED" and doc["reason"] == "operator" and doc["endedAt"] is not None


def fleet_ev(payload: m.Event, n: int) -> Envelope:
    return ev(payload, n, source="fleet")


def test_fleet_soak_pause_completion_and_facts_before_the_plan() -> None:
    f: dict[str, Any] = dict(rollout_id="f1")
    plan = [m.FleetRolloutStagePlan(name="one", clustersets=["s1", "s2"], soak_seconds=60),
            m.FleetRolloutStagePlan(name="two", clustersets=["s3"])]  # fmt: skip
    views = run([
        fleet_ev(m.FleetRolloutStageStarted(**f, stage="one"), 1),  # before the plan (e.g. a partial replay)
        fleet_ev(m.FleetRolloutSetFinished(**f, stage="one", clusterset="s2", succeeded=True), 2),
        fleet_ev(m.FleetRolloutStarted(**f, cluster_type="T", patch={"tags": {"a": "b"}}, stages=plan,
                                       max_in_flight=2, failure_budget=1), 3),
    ])  # fmt: skip
    doc = views.fleet_rollouts["f1"]
    assert [s["name"] for s in doc["stages"]] == ["one", "two"] and doc["stages"][0]["state"] == "IN_PROGRESS"
    assert [e["clusterset"] for e in doc["sets"]] == ["s1", "s2", "s3"]
    assert [e["state"] for e in doc["sets"]] == ["PENDING", "SUCCEEDED", "PENDING"]
    assert doc["state"] == "IN_PROGRESS" and doc["startedAt"] == "2026-11-21T10:03:00Z"
    run([
        fleet_ev(m.FleetRolloutSetFinished(**f, stage="one", clusterset="s2", succeeded=False), 4),  # first verdict
        fleet_ev(m.FleetRolloutSetFinished(**f, stage="one", clusterset="s1", succeeded=False, reason="x"), 5),
        fleet_ev(m.FleetRolloutStageCompleted(**f, stage="one", soak_until=T.T0 + timedelta(minutes=5)), 6),
    ], views, start_seq=10)  # fmt: skip
    doc = views.fleet_rollouts["f1"]
    assert doc["stages"][0]["state"] == "COMPLETED"  # the soak deadline had passed when the stage completed
    assert (doc["failed"], doc["budgetExceeded"]) == (1, False)
    run([fleet_ev(m.FleetRolloutPaused(**f, reason="looking"), 7),
         fleet_ev(m.FleetRolloutStageCompleted(**f, stage="two", soak_until=T.T0 + timedelta(hours=5)), 8)],
        views, start_seq=20)  # fmt: skip
    doc = views.fleet_rollouts["f1"]
    assert doc["state"] == "PAUSED" and doc["reason"] == "looking" and doc["stages"][1]["state"] == "SOAKING"
    run([fleet_ev(m.FleetRolloutResumed(**f), 9)], views, start_seq=30)
    assert views.fleet_rollouts["f1"]["state"] == "SOAKING"
    run([fleet_ev(m.FleetRolloutCompleted(**f, succeeded=1, failed=1), 10),
         fleet_ev(m.FleetRolloutPaused(**f, reason="late"), 11)], views, start_seq=40)  # fmt: skip
    doc = views.fleet_rollouts["f1"]
    assert doc["state"] == "COMPLETED" and doc["stages"][1]["state"] == "COMPLETED" and doc["reason"] is None
    assert states_of(doc["timeline"]) == ["IN_PROGRESS", "PAUSED", "SOAKING", "COMPLETED"]


def test_a_rejected_fleet_rollout_and_a_refused_patch() -> None:
    errors = [FieldError(field="patch.count", message="count may not be patched")]
    views = run([
        fleet_ev(m.FleetRolloutRejected(rollout_id="bad", errors=errors), 1),
        ev(m.ClusterSetRejected(clusterset=NAME, errors=errors, fleet_rollout_id="other"), 2),
    ])  # fmt: skip
    assert views.fleet_rollouts["bad"]["state"] == "REJECTED"
    assert views.fleet_rollouts["bad"]["errors"] == [{"field": "patch.count", "message": "count may not be patched"}]
    assert views.fleet_rollouts["other"]["sets"][0]["errors"][0]["field"] == "patch.count"
    assert views.clustersets[NAME]["lastRejection"]["errors"][0]["field"] == "patch.count"


def test_rollout_index_members_sort_by_id_across_kinds() -> None:
    from services.status_projector import rollouts as ro
    from services.status_projector.docs import member, split_member

    members = sorted([member(ro.KIND_FLEET, "abc"), member(ro.KIND_SET, "abc-x"), member(ro.KIND_SET, "ab")])
    assert [split_member(x) for x in members] == [(ro.KIND_SET, "ab"), (ro.KIND_FLEET, "abc"),
                                                  (ro.KIND_SET, "abc-x")]  # fmt: skip
    views, _ = fleet_views()
    assert ro.index_entries(views.fleet_rollouts["k131"]) == {
        ("kind", "FleetRollout"), ("state", "HALTED"), ("clusterset", NAME), ("clusterset", AZ.metadata.name)}
    assert ro.index_entries(views.rollouts["k131-a"]) == {("kind", "ClusterSetRollout"), ("state", "COMPLETED"),
                                                          ("clusterset", NAME)}  # fmt: skip
    listed = render.rollout_listing(views.fleet_rollouts["k131"])
    assert "sets" not in listed and "timeline" not in listed and listed["setCounts"]["FAILED"] == 1


# ---------------------------------------------------------------- repeats, unknowns
def test_unknown_or_malformed_events_change_nothing() -> None:
    views = run([ACC])
    before = views.dump()
    bogus = Envelope(id="x1", type="NoSuchEvent", source="t", subject="s", time=T.T0, correlation_id="x1", data={})
    broken = Envelope(id="x2", type="ClusterReady", source="t", subject="s", time=T.T0, correlation_id="x2",
                      data={"cluster_id": "c9"})  # fmt: skip
    assert apply(views, 2, bogus) is False and apply(views, 3, broken) is False
    assert views.dump() == before


def test_the_same_event_at_a_later_sequence_is_a_no_op() -> None:
    views, events = ready_cluster()
    before = views.dump()
    for i, env in enumerate(events):
        assert apply(views, 1000 + i, env) is False
    assert views.dump() == before


# ---------------------------------------------------------------- rendering
def _shape(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        return [_shape(obj[0])]
    return None


def _covers(ours: Any, example: Any, path: str = "") -> list[str]:
    """Keys of the example missing from ours (ours may have more)."""
    missing: list[str] = []
    if isinstance(example, dict):
        for k, v in example.items():
            if not isinstance(ours, dict) or k not in ours:
                missing.append(f"{path}.{k}")
            else:
                missing += _covers(ours[k], v, f"{path}.{k}")
    elif isinstance(example, list) and example:
        if isinstance(ours, list) and ours:
            missing += _covers(ours[0], example[0], f"{path}[0]")
    return missing


def test_clusterset_status_has_everything_the_status_example_shows() -> None:
    example = yaml.safe_load((Path(EXAMPLES_DIR) / "clusterset-status.yaml").read_text())
    views = run(T.fleet_history(CS, ["c1", "c2", "c3"], retired=["c3"]))
    view = render.clusterset_view(views.clustersets[NAME], list(views.clusters.values()))
    assert _covers(_shape(view), _shape(example)) == []
    status = view["status"]
    assert [c["name"] for c in status["clusters"]] == ["c1", "c2"]  # DELETED members are not listed
    assert status["readyClusters"] == 2 and status["counts"]["DELETED"] == 1 and status["currentClusters"] == 2
    member = status["clusters"][0]
    assert member["spec"]["infraServices"] == CS.spec.infra_service_names()
    assert member["status"]["infraServices"][0] == {"name": "namespaces", "version": "1.0.0", "state": "INSTALLED"}
    assert member["metadata"] == {"location": {"env": "prod", "cloud": "aws", "region": "us-east-1"},
                                  "clusterType": "ModelServing"}  # fmt: skip


def test_members_built_from_another_spec_are_outdated() -> None:
    views = run(T.fleet_history(CS, ["c1", "c2"]))
    changed = CS.model_copy(update={"spec": CS.spec.model_copy(update={"kubernetes_version": "1.31"})})
    apply(views, 100, T.accepted(changed, generation=2))
    view = render.clusterset_view(views.clustersets[NAME], list(views.clusters.values()))
    assert view["status"]["observedGeneration"] == 2
    assert view["status"]["outdatedClusters"] == 2 and view["status"]["updatedClusters"] == 0
    assert all(c["status"]["outdated"] for c in view["status"]["clusters"])


def _rich_views() -> Views:
    """Every kind of document content: failures, updates, drains, rollouts, control plane, rejection."""
    views = run(T.fleet_history(CS, ["c1", "c2", "c3", "c4"], retired=["c4"]))
    spec = CS.spec.cluster_spec()
    run([
        ev(m.ClusterInfraFailed(**common("c2"), service="ingress", reason="timeout", retryable=True), 1),
        ev(m.ClusterUpdateRequested(**common("c1"), generation=2, config_hash="h2", spec=spec, changes=["x"]), 2),
        ev(m.ClusterDrainRequested(**common("c3"), rollout_id="r1"), 3),
        ev(m.ControlPlaneUpgradeRequested(**common("c3"), operation_id="op", to_version="1.31"), 4),
        ev(m.ClusterSetRejected(clusterset="other", errors=[FieldError(field="a", message="b")]), 5),
        rollout_requested("r1", 6, to_config_hash="h2"),
        ev(m.RolloutWaiting(location=LOC, clusterset=NAME, rollout_id="r1", reason="window",
                            until=T.T0 + timedelta(hours=3)), 7),
        ev(m.ClusterSetUpdateFailed(location=LOC, clusterset=NAME, generation=2, config_hash="h2", cluster_ids=["c1"],
                                    reason="x"), 8),
        ev(m.ClusterResourcesUpdated(**common("c1"), generation=2, config_hash="h2", resources={}), 9),
        ev(m.ClusterDrained(**common("c3"), rollout_id="r1", timed_out=True, remaining=3), 10),
    ], views, start_seq=1000)  # fmt: skip
    sm = T.fleet_history(SM, ["s1", "s2", "s3"])
    sm += T.pipeline(SM, SM_ACC, "pl1", ["s1", "s2", "s3"], T.T0 + timedelta(hours=1), fail=["s2"], failure_budget=1)
    sm += T.upgrade(SM, SM_ACC, "s1", "up1", T.T0 + timedelta(hours=2), fail_node=2)
    run(sm, views, start_seq=2000)
    fleet, _ = fleet_views()
    views.fleet_rollouts.update(fleet.fleet_rollouts)
    views.rollouts.update(fleet.rollouts)
    for name in (NAME, AZ.metadata.name):  # sets touched by a fleet rollout and converged
        views.clustersets[f"{name}-fleet"] = {**fleet.clustersets[name], "name": f"{name}-fleet"}
    return views


def test_rendered_documents_match_the_published_schemas() -> None:
    views = _rich_views()
    hashes = {n: d["configHash"] for n, d in views.clustersets.items()}
    for doc in views.clusters.values():
        schemas.Cluster.model_validate(render.cluster_view(doc, hashes.get(doc["clusterset"])))
        if doc["state"] == "READY":
            schemas.DiscoveryEntry.model_validate(render.discovery_entry(doc))
    for name, doc in views.clustersets.items():
        members = [c for c in views.clusters.values() if c["clusterset"] == name]
        schemas.ClusterSet.model_validate(render.clusterset_view(doc, members))
        counts = render.state_counts(c["state"] for c in members)
        schemas.ClusterSet.model_validate(render.clusterset_summary(doc, counts))
    for entries in views.history.values():
        for entry in entries:
            schemas.HistoryEntry.model_validate(entry)
    assert views.rollouts and views.fleet_rollouts
    for doc in [*views.rollouts.values(), *views.fleet_rollouts.values()]:
        schemas.RolloutDetail.model_validate(doc)
        schemas.RolloutPage.model_validate({"items": [render.rollout_listing(doc)], "next": None})
    assert {d["kind"] for d in views.cp_operations.values()} == {"migration", "upgrade"} and views.cp_pipelines
    assert {d["state"] for d in views.cp_operations.values()} == {"REQUESTED", "COMPLETED", "ROLLED_BACK", "FAILED"}
    for doc in [*views.cp_operations.values(), *views.cp_pipelines.values()]:
        schemas.MigrationDetail.model_validate(doc)
        schemas.MigrationPage.model_validate({"items": [render.migration_listing(doc)], "next": None})
    assert views.clusters["s1"]["controlPlane"]["lastOperation"]["kind"] == "upgrade"


def test_index_entries() -> None:
    views, _ = ready_cluster()
    assert core.index_entries(views.clusters["c1"]) == {
        ("clusterset", NAME), ("state", "READY"), ("env", "prod"), ("cloud", "aws"), ("region", "us-east-1"),
        ("clusterType", "ModelServing"),
    }  # fmt: skip
    assert core.index_entries(None) == set()


def test_timestamps_are_canonical() -> None:
    from datetime import UTC, datetime, timezone

    assert core.ts(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert core.ts(datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC)) == "2026-01-02T03:04:05.000120Z"
    plus_two = timezone(timedelta(hours=2))
    assert core.ts(datetime(2026, 1, 2, 5, 4, 5, tzinfo=plus_two)) == "2026-01-02T03:04:05Z"
    assert core.ts(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"


# ---------------------------------------------------------------- cursors
def test_cursor_round_trip_and_malformed_tokens() -> None:
    token = encode_cursor("c", "cluster-0042")
    assert decode_cursor(token, "c") == "cluster-0042"
    for bad in ("%%%", "bm9jb2xvbg", encode_cursor("e", 5), "", "a"):
        with pytest.raises(CursorError):
            decode_cursor(bad, "c")


def test_page_after() -> None:
    ids = [f"c{i:02d}" for i in range(10)]
    assert page_after(ids, None, 4) == (ids[:4], "c03")
    assert page_after(ids, "c03", 4) == (ids[4:8], "c07")
    assert page_after(ids, "c07", 4) == (ids[8:], None)
    assert page_after(ids, "c05x", 2) == (["c06", "c07"], "c07")  # a removed id still resumes in order
    assert page_after([], None, 3) == ([], None)


# ---------------------------------------------------------------- properties
def _pool() -> list[Envelope]:
    """Facts of two clusters and their set, in their natural order, plus failures, updates and rollouts."""
    spec = CS.spec.cluster_spec()
    extra = [
        ev(m.ClusterInfraFailed(**common("c1"), service="ingress", reason="timeout", retryable=True), 1),
        ev(m.ClusterProvisioningFailed(**common("c2"), operation="provision", step="iam", code="X", message="m",
                                       retryable=True), 2),
        ev(m.ClusterUpdateRequested(**common("c1"), generation=2, config_hash="h2", spec=spec, changes=["x"]), 3),
        ev(m.ClusterReady(**common("c1"), cluster_type="ModelServing", config_hash="h2", endpoint="e2",
                          infra_services=[{"name": "rbac", "version": "2"}]), 4),
        ev(m.ClusterDrainRequested(**common("c1")), 5),
        ev(m.ClusterDrained(**common("c1")), 6),
        ev(m.ClusterSetRejected(clusterset=NAME, errors=[]), 7),
        ev(m.RolloutStarted(location=LOC, clusterset=NAME, rollout_id="r", to_config_hash="h2"), 8),
        ev(m.ControlPlaneUpgradeRequested(**common("c2"), operation_id="o", to_version="1.31"), 9),
        T.accepted(CS, generation=2, event_id="acc2"),
        ev(m.ClusterResourcesUpdated(**common("c1"), generation=2, config_hash="h2", resources={"x": {}}), 10),
        ev(m.RolloutPaused(location=LOC, clusterset=NAME, rollout_id="r", reason="p", cluster_ids=["n1"]), 11),
        ev(m.RolloutResumed(location=LOC, clusterset=NAME, rollout_id="r"), 12),
        ev(m.ClusterSetUpdateFailed(location=LOC, clusterset=NAME, generation=2, config_hash="h2", cluster_ids=[],
                                    reason="x", fleet_rollout_id="k131"), 13),
    ]  # fmt: skip
    new_cs = T.with_spec(CS, kubernetes_version="1.31")
    # A rotation (with surge clusters and retirements) and a fleet rollout's facts, trimmed to keep examples small.
    rotation = T.rotation(CS, new_cs, ACC, "r", ["c1"], ["n1"], T.T0 + timedelta(hours=1), fleet_rollout_id="k131")
    rotation = [e for e in rotation if e.type not in ("ClusterResourceProvisioned", "InfraServiceInstalled",
                                                      "ClusterResourceDeprovisioned")]  # fmt: skip
    fleet = T.fleet_rollout_history("k131", (CS, ["c1"]), (AZ, ["b1"]), T.T0 + timedelta(hours=2))
    fleet = [e for e in fleet if e.type.startswith("FleetRollout") or e.type.startswith("ClusterSet")]
    # Control-plane operations of the same clusters: a pipeline of two migrations (one rolled back, halting it),
    # a retry of the failed one, an upgrade whose second node fails; plus a redone step (new id, same step).
    start = T.T0 + timedelta(hours=3)
    cps = [*T.pipeline(CS, ACC, "pl", ["c1", "c2"], start, fail=["c2"]),
           *T.migration(CS, ACC, "c2", "retry", start + timedelta(hours=1)),
           *T.upgrade(CS, ACC, "c1", "up", start + timedelta(hours=2), fail_node=1),
           ev(m.ControlPlaneMigrationStepCompleted(**common("c2"), operation_id="retry", phase=1, step="stop-node"),
              14),
           ev(m.ControlPlanePipelineCompleted(location=LOC, clusterset=NAME, pipeline_id="pl", succeeded=["c1"],
                                              failed=["c2"]), 15)]  # fmt: skip
    cps = [e for e in cps if e.type != "ControlPlaneMigrationStepCompleted" or e.data["step"] in
           ("stop-mutations", "restore-members", "stop-node", "remove-new-nodes")]  # fmt: skip
    return [*T.fleet_history(CS, ["c1", "c2"], retired=["c2"]), *extra, *rotation, *fleet, *cps]


POOL = _pool()
indices = st.lists(st.integers(min_value=0, max_value=len(POOL) - 1), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=indices, repeats=st.lists(st.integers(min_value=0, max_value=59), max_size=20))
def test_applying_an_event_again_changes_nothing(order: list[int], repeats: list[int]) -> None:
    """Any order of facts; every repeat (at a later sequence, as after the dedup window) is a no-op."""
    once = Views()
    twice = Views()
    for seq, i in enumerate(order, 1):
        apply(once, seq, POOL[i])
        apply(twice, seq, POOL[i])
        apply(twice, 10_000 + seq, POOL[i])
        for r in repeats:
            if r < seq:
                apply(twice, 20_000 + seq, POOL[order[r]])
    assert twice.dump() == once.dump()


def _documents(views: Views) -> dict[str, dict[str, dict[str, Any]]]:
    """The documents of a Views by their Redis key prefix."""
    return {"cluster": views.clusters, "clusterset": views.clustersets, "rollout": views.rollouts,
            "fleetrollout": views.fleet_rollouts, "migration": views.cp_operations,
            "migrationpipeline": views.cp_pipelines}  # fmt: skip


def named(touch: core.Touch) -> list[tuple[str, str | None]]:
    """The documents a Touch names, by their Redis key prefix."""
    return [("cluster", touch.cluster), ("clusterset", touch.clusterset), ("rollout", touch.rollout),
            ("fleetrollout", touch.fleet_rollout), ("migration", touch.operation),
            ("migrationpipeline", touch.pipeline)]  # fmt: skip


def load_touched(views: Views, touch: core.Touch, stored: dict[str, str]) -> None:
    """What the projector does before a batch: load every stored document the event names."""
    docs = _documents(views)
    for prefix, key in named(touch):
        if key and f"{prefix}:{key}" in stored:
            docs[prefix][key] = json.loads(stored[f"{prefix}:{key}"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=indices)
def test_touched_names_every_document_an_event_changes(order: list[int]) -> None:
    """The projector loads only what `touched` names: a document changed but not named would be lost."""
    views = Views()
    for seq, i in enumerate(order, 1):
        env = POOL[i]
        before = {p: {k: core.canonical(v) for k, v in d.items()} for p, d in _documents(views).items()}
        apply(views, seq, env)
        touch = set(named(core.touched(env)))
        for prefix, docs in _documents(views).items():
            for key, doc in docs.items():
                if before[prefix].get(key) != core.canonical(doc):
                    assert (prefix, key) in touch, (env.type, prefix, key)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=indices, cuts=st.lists(st.integers(min_value=1, max_value=59), max_size=8))
def test_replay_in_batches_through_json_equals_one_pass(order: list[int], cuts: list[int]) -> None:
    """What the projector does: per batch load the touched JSON documents, apply, store. Same bytes as one pass."""
    events = [(seq, POOL[i]) for seq, i in enumerate(order, 1)]
    one_pass = Views()
    for seq, env in events:
        apply(one_pass, seq, env)

    stored: dict[str, str] = {}
    history: dict[str, list[str]] = {}
    applied: dict[str, int] = {}
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        batch = events[lo:hi]
        views = Views()
        for _, env in batch:
            load_touched(views, core.touched(env), stored)
            if env.id in applied:
                views.applied[env.id] = applied[env.id]
        for seq, env in batch:
            apply(views, seq, env)
        for prefix, docs in _documents(views).items():
            stored.update({f"{prefix}:{k}": core.canonical(v) for k, v in docs.items()})
        for key, entries in views.history.items():
            history.setdefault(key, []).extend(core.canonical(e) for e in entries)
        applied.update(views.applied)

    expected = one_pass.dump()
    got = {**stored, **{f"history:{k}": "[" + ",".join(v) + "]" for k, v in history.items()},
           "applied": core.canonical({k: str(v) for k, v in applied.items()})}  # fmt: skip
    assert dict(sorted(got.items())) == expected
    # and a second replay from scratch gives the same bytes again
    again = Views()
    for seq, env in events:
        apply(again, seq, env)
    assert again.dump() == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=indices)
def test_state_invariants(order: list[int]) -> None:
    views = Views()
    deleted: set[str] = set()
    for seq, i in enumerate(order, 1):
        apply(views, seq, POOL[i])
        for cid, doc in views.clusters.items():
            assert doc["state"] in core.CLUSTER_STATES
            assert (doc["failure"] is not None) == (doc["state"] == "FAILED")
            if cid in deleted:
                assert doc["state"] == "DELETED"
            if doc["state"] == "DELETED":
                deleted.add(cid)
            assert [c["type"] for c in doc["conditions"]][0] == "Ready"
        for doc in views.rollouts.values():
            assert doc["state"] in schemas.SetRolloutStateName.__args__  # type: ignore[attr-defined]
        for doc in views.fleet_rollouts.values():
            assert doc["state"] in schemas.FleetRolloutStateName.__args__  # type: ignore[attr-defined]
            assert doc["failed"] + doc["succeeded"] + doc["inFlight"] <= len(doc["sets"])
        for doc in views.cp_operations.values():
            assert doc["state"] in cp.OPERATION_STATES
            assert (doc["completedAt"] is not None) == (doc["state"] in ("COMPLETED", "ROLLED_BACK", "FAILED"))
            assert len({(t["phase"], t["node"], t["step"], t["rollback"]) for t in doc["timeline"]}) \
                == len(doc["timeline"])
        for doc in views.cp_pipelines.values():
            assert doc["state"] in cp.PIPELINE_STATES
            assert doc["failed"] + doc["succeeded"] + doc["inFlight"] + doc["pending"] == len(doc["clusters"])


def test_published_state_enum_is_the_state_machine() -> None:
    from services.status_projector import rollouts as ro

    assert schemas.ClusterStateName.__args__ == core.CLUSTER_STATES  # type: ignore[attr-defined]
    assert schemas.SetRolloutStateName.__args__ == ro.SET_ROLLOUT_STATES  # type: ignore[attr-defined]
    assert schemas.FleetRolloutStateName.__args__ == ro.FLEET_ROLLOUT_STATES  # type: ignore[attr-defined]
    assert set(schemas.RolloutStateName.__args__) == set(ro.ALL_ROLLOUT_STATES)  # type: ignore[attr-defined]
    assert schemas.StageStateName.__args__ == ro.STAGE_STATES  # type: ignore[attr-defined]
    assert schemas.SetEntryStateName.__args__ == ro.SET_ENTRY_STATES  # type: ignore[attr-defined]
    assert set(schemas.RolloutKindName.__args__) == set(ro.KINDS)  # type: ignore[attr-defined]
    assert schemas.OperationStateName.__args__ == cp.OPERATION_STATES  # type: ignore[attr-defined]
    assert schemas.PipelineStateName.__args__ == cp.PIPELINE_STATES  # type: ignore[attr-defined]
    assert schemas.MigrationStateName.__args__ == cp.ALL_STATES  # type: ignore[attr-defined]
    assert schemas.MigrationKindName.__args__ == cp.KINDS  # type: ignore[attr-defined]
    assert set(schemas.OperationKindName.__args__) == set(cp.OPERATION_KIND.values())  # type: ignore[attr-defined]
