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
                                                          "drainedAt": "2026-11-21T11:12:00Z", "timedOut": True}
    run(T.retire(CS, ACC, "c1", T.T0 + timedelta(hours=2), reason="rotation"), views, start_seq=120)
    assert views.clusters["c1"]["state"] == "DELETED"


def test_a_fact_before_the_request_still_gets_a_view_and_the_request_fills_it_in() -> None:
    full = T.provision(CS, ACC, "c1", T.T0)
    views = run([full[1], full[0]])  # resource before request (e.g. a partially replayed stream)
    doc = views.clusters["c1"]
    assert doc["state"] == "PROVISIONING" and doc["spec"] is not None and doc["clusterType"] == "ModelServing"
    assert doc["createdAt"] == core.ts(full[1].time)


def test_control_plane_operations_are_shown_without_changing_state() -> None:
    views, _ = ready_cluster()
    cp: dict[str, Any] = dict(common(), operation_id="op1")
    run([
        ev(m.ControlPlaneMigrationRequested(**cp), 80),
        ev(m.ControlPlaneMigrationStepCompleted(**cp, phase=1, step="snapshot"), 81),
        ev(m.ControlPlaneMigrationCompleted(**cp, availability_pct=99.9), 82),
    ], views, start_seq=100)  # fmt: skip
    doc = views.clusters["c1"]
    assert doc["state"] == "READY"
    op = doc["controlPlaneOperation"]
    assert op["kind"] == "migration" and op["state"] == "COMPLETED" and op["phase"] == 1
    assert op["step"] == "snapshot" and op["availabilityPct"] == 99.9 and op["startedAt"] == "2026-11-21T11:20:00Z"
    apply(views, 200, ev(m.ControlPlaneUpgradeRequested(**dict(cp, operation_id="op2"), to_version="1.31"), 83))
    op = views.clusters["c1"]["controlPlaneOperation"]
    assert op["operationId"] == "op2" and op["kind"] == "upgrade" and op["toVersion"] == "1.31"


# ---------------------------------------------------------------- cluster sets
def test_clusterset_accepted_rejected_retired() -> None:
    views = run([ACC])
    doc = views.clustersets[NAME]
    assert doc["accepted"] and not doc["deleted"] and doc["generation"] == 1 and doc["count"] == 5
    assert doc["updateStrategy"] == {"type": "cluster-rotation", "maxSurge": 2, "maxUnavailable": 0}
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


def test_rollout_view() -> None:
    spec = CS.spec.cluster_spec()
    base: dict[str, Any] = dict(location=LOC, clusterset=NAME, rollout_id="r1")
    views = run([
        ACC,
        ev(m.RolloutRequested(**base, generation=2, from_config_hashes=["a"], to_config_hash="b", spec=spec,
                              update_strategy=CS.spec.update_strategy), 1),
        ev(m.RolloutStarted(**base, to_config_hash="b"), 2),
        ev(m.RolloutProgressed(**base, replaced=2, remaining=3), 3),
        ev(m.RolloutProgressed(**dict(base, rollout_id="old"), replaced=9, remaining=0), 4),
        ev(m.RolloutPaused(**base, reason="too many failures"), 5),
    ])  # fmt: skip
    rollout = views.clustersets[NAME]["rollout"]
    assert rollout == {"rolloutId": "r1", "state": "PAUSED", "startedAt": "2026-11-21T10:02:00Z",
                       "updatedAt": "2026-11-21T10:05:00Z", "fromConfigHashes": ["a"], "toConfigHash": "b",
                       "generation": 2, "replaced": 2, "remaining": 3, "reason": "too many failures"}  # fmt: skip


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
        ev(m.RolloutRequested(location=LOC, clusterset=NAME, rollout_id="r1", generation=2, from_config_hashes=["a"],
                              to_config_hash="h2", spec=spec, update_strategy=CS.spec.update_strategy), 6),
    ], views, start_seq=1000)  # fmt: skip
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
    ]
    return [*T.fleet_history(CS, ["c1", "c2"], retired=["c2"]), *extra]


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
            cid, name = core.touched(env)
            if cid and f"cluster:{cid}" in stored:
                views.clusters[cid] = json.loads(stored[f"cluster:{cid}"])
            elif not cid and name and f"clusterset:{name}" in stored:
                views.clustersets[name] = json.loads(stored[f"clusterset:{name}"])
            if env.id in applied:
                views.applied[env.id] = applied[env.id]
        for seq, env in batch:
            apply(views, seq, env)
        stored.update({f"cluster:{k}": core.canonical(v) for k, v in views.clusters.items()})
        stored.update({f"clusterset:{k}": core.canonical(v) for k, v in views.clustersets.items()})
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


def test_published_state_enum_is_the_state_machine() -> None:
    assert schemas.ClusterStateName.__args__ == core.CLUSTER_STATES  # type: ignore[attr-defined]
