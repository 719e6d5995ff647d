"""Realistic, deterministic FLEET histories for tests and demos (no I/O).

Ids are derived from causes (as the services derive them) and times advance by a fixed step,
so the same call always yields the same envelopes: unit tests compare projections byte for
byte, integration tests publish them through the real bus.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from shared.catalog import CATALOG, install_order
from shared.events import Envelope, new_event, validate_clusterset
from shared.events import models as m
from shared.events.clusterset import ClusterSet

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
STEP = timedelta(seconds=1)


def parse(document: dict[str, Any]) -> ClusterSet:
    model, errors = validate_clusterset(document)
    if model is None:
        raise ValueError(f"invalid ClusterSet: {errors}")
    return model


def accepted(cs: ClusterSet, *, generation: int = 1, time: datetime = T0, event_id: str | None = None) -> Envelope:
    spec = cs.spec.cluster_spec()
    payload = m.ClusterSetAccepted(
        location=cs.metadata.location, clusterset=cs.metadata.name, generation=generation,
        cluster_type=cs.metadata.cluster_type, count=cs.spec.count, config_hash=spec.config_hash(), spec=spec,
        update_strategy=cs.spec.update_strategy, document_hash=f"doc-{generation}",
    )  # fmt: skip
    return new_event(payload, source="planner", time=time,
                     event_id=event_id or f"accepted-{cs.metadata.name}-{generation}")  # fmt: skip


def _clock(start: datetime) -> Iterable[datetime]:
    t = start
    while True:
        yield t
        t += STEP


def provision(cs: ClusterSet, cause: Envelope, cluster_id: str, start: datetime, *, serial: int = 0,
              generation: int = 1, rollout_id: str | None = None) -> list[Envelope]:  # fmt: skip
    """ClusterRequested → resources ×5 → ClusterProvisioned → InfraServiceInstalled ×n → ClusterReady."""
    loc, name, spec = cs.metadata.location, cs.metadata.name, cs.spec.cluster_spec()
    common: dict[str, Any] = dict(location=loc, cluster_id=cluster_id, clusterset=name)
    clock = iter(_clock(start))
    out: list[Envelope] = []
    requested = new_event(
        m.ClusterRequested(**common, serial=serial, cluster_type=cs.metadata.cluster_type, generation=generation,
                           config_hash=spec.config_hash(), spec=spec, rollout_id=rollout_id),
        source="planner", cause=cause, discriminator=cluster_id, time=next(clock),
    )  # fmt: skip
    out.append(requested)
    resources: dict[str, dict[str, Any]] = {}
    for step in m.PROVISION_STEPS:
        resources[step] = {"id": f"{step}-{cluster_id}", "arn": f"arn:sim:{loc.region}:{step}/{cluster_id}"}
        out.append(new_event(m.ClusterResourceProvisioned(**common, step=step, resources=resources[step]),
                             source="cloud_provisioner", cause=requested, discriminator=step, time=next(clock)))
    endpoint = f"https://{cluster_id}.example.{loc.cloud}.test"
    provisioned = new_event(
        m.ClusterProvisioned(**common, endpoint=endpoint, ca_fingerprint=f"sha256:{cluster_id}",
                             network=m.NetworkInfo(network_id=f"net-{cluster_id}",
                                                   subnet_ids=[f"subnet-{cluster_id}-{i}" for i in range(3)]),
                             resources=resources, credential_ref=f"sim://{cluster_id}/token"),
        source="cloud_provisioner", cause=requested, time=next(clock),
    )  # fmt: skip
    out.append(provisioned)
    installed: list[dict[str, str]] = []
    for service in install_order(spec.infra_service_names()):
        version = CATALOG[service].version
        installed.append({"name": service, "version": version})
        out.append(new_event(m.InfraServiceInstalled(**common, service=service, version=version),
                             source="infra_installer", cause=provisioned, discriminator=service, time=next(clock)))
    out.append(new_event(
        m.ClusterReady(**common, cluster_type=cs.metadata.cluster_type, config_hash=spec.config_hash(),
                       endpoint=endpoint, infra_services=installed),
        source="infra_installer", cause=provisioned, time=next(clock),
    ))  # fmt: skip
    return out


RetireReason = Literal["scale-down", "clusterset-deleted", "rotation", "rollback", "manual"]


def retire(cs: ClusterSet, cause: Envelope, cluster_id: str, start: datetime, reason: RetireReason = "scale-down",
           rollout_id: str | None = None) -> list[Envelope]:  # fmt: skip
    """ClusterRetirementRequested → resources deprovisioned ×5 (reverse order) → ClusterDeprovisioned."""
    common: dict[str, Any] = dict(location=cs.metadata.location, cluster_id=cluster_id, clusterset=cs.metadata.name)
    clock = iter(_clock(start))
    requested = new_event(m.ClusterRetirementRequested(**common, reason=reason, rollout_id=rollout_id),
                          source="rotation" if rollout_id else "planner", cause=cause,
                          discriminator=f"retire:{cluster_id}", time=next(clock))  # fmt: skip
    out = [requested]
    for step in reversed(m.PROVISION_STEPS):
        out.append(new_event(m.ClusterResourceDeprovisioned(**common, step=step), source="cloud_provisioner",
                             cause=requested, discriminator=step, time=next(clock)))  # fmt: skip
    out.append(new_event(m.ClusterDeprovisioned(**common), source="cloud_provisioner", cause=requested,
                         time=next(clock)))  # fmt: skip
    return out


def interleave(*histories: list[Envelope]) -> list[Envelope]:
    """Round-robin merge, as concurrent clusters' facts land in the stream."""
    out: list[Envelope] = []
    longest = max((len(h) for h in histories), default=0)
    for i in range(longest):
        out.extend(h[i] for h in histories if i < len(h))
    return out


def fleet_history(cs: ClusterSet, cluster_ids: list[str], retired: Iterable[str] = ()) -> list[Envelope]:
    """A set accepted, its clusters provisioned concurrently, then the `retired` ones retired."""
    acc = accepted(cs)
    events = [acc, *interleave(*(provision(cs, acc, cid, T0 + STEP * (1 + i)) for i, cid in enumerate(cluster_ids)))]
    later = T0 + timedelta(minutes=30)
    for i, cid in enumerate(retired):
        events += retire(cs, acc, cid, later + timedelta(minutes=i))
    return events


# ---------------------------------------------------------------- rollouts
def retime(events: list[Envelope], start: datetime) -> list[Envelope]:
    """The same events one STEP apart from `start`, in list order (ids do not depend on time)."""
    return [e.model_copy(update={"time": start + STEP * i}) for i, e in enumerate(events)]


def with_spec(cs: ClusterSet, **spec_changes: Any) -> ClusterSet:
    """The set with some spec fields changed (python names, e.g. kubernetes_version="1.31")."""
    return cs.model_copy(update={"spec": cs.spec.model_copy(update=spec_changes)})


def rotation(old: ClusterSet, new: ClusterSet, cause: Envelope, rollout_id: str, old_ids: list[str],
             new_ids: list[str], start: datetime, *, generation: int = 2,
             fleet_rollout_id: str | None = None) -> list[Envelope]:  # fmt: skip
    """A whole rotation, one cluster per batch: RolloutRequested → RolloutStarted → per batch a surge cluster
    provisioned, an old one drained and retired, RolloutProgressed → RolloutCompleted → ClusterSetConverged."""
    loc, name = old.metadata.location, old.metadata.name
    old_hash, new_spec = old.spec.cluster_spec().config_hash(), new.spec.cluster_spec()
    rollout: dict[str, Any] = dict(location=loc, clusterset=name, rollout_id=rollout_id,
                                   fleet_rollout_id=fleet_rollout_id)  # fmt: skip
    members = [m.RolloutMember(cluster_id=cid, serial=i, config_hash=old_hash, state="READY")
               for i, cid in enumerate(old_ids)]  # fmt: skip
    requested = new_event(m.RolloutRequested(
        **rollout, generation=generation, from_config_hashes=[old_hash], to_config_hash=new_spec.config_hash(),
        cluster_type=new.metadata.cluster_type, spec=new_spec, update_strategy=new.spec.update_strategy,
        count=len(new_ids), serial_base=len(old_ids), members=members, changes=["kubernetesVersion"],
    ), source="planner", cause=cause, discriminator=rollout_id)  # fmt: skip
    started = new_event(m.RolloutStarted(**rollout, to_config_hash=new_spec.config_hash(), count=len(new_ids),
                                         outdated=list(old_ids)), source="rotation", cause=requested)  # fmt: skip
    events = [requested, started]
    for i, (new_id, old_id) in enumerate(zip(new_ids, old_ids, strict=True)):
        common: dict[str, Any] = dict(location=loc, clusterset=name, cluster_id=old_id)
        events += provision(new, started, new_id, start, serial=len(old_ids) + i, generation=generation,
                            rollout_id=rollout_id)  # fmt: skip
        drain = new_event(m.ClusterDrainRequested(**common, rollout_id=rollout_id, timeout_seconds=600),
                          source="rotation", cause=started, discriminator=old_id)  # fmt: skip
        drained = new_event(m.ClusterDrained(**common, rollout_id=rollout_id, evicted=12), source="infra_installer",
                            cause=drain)  # fmt: skip
        events += [drain, drained, *retire(old, drained, old_id, start, reason="rotation", rollout_id=rollout_id)]
        events.append(new_event(m.RolloutProgressed(**rollout, replaced=i + 1, remaining=len(new_ids) - i - 1,
                                                    batch=i + 1, ready=i + 1, alive=len(old_ids)),
                                source="rotation", cause=drained))  # fmt: skip
    completed = new_event(m.RolloutCompleted(**rollout, next_serial=len(old_ids) + len(new_ids)), source="rotation",
                          cause=started)  # fmt: skip
    converged = new_event(m.ClusterSetConverged(location=loc, clusterset=name, generation=generation,
                                                config_hash=new_spec.config_hash(), count=len(new_ids),
                                                fleet_rollout_id=fleet_rollout_id),
                          source="planner", cause=completed)  # fmt: skip
    return retime([*events, completed, converged], start)


def fleet_rollout_history(fleet_id: str, canary: tuple[ClusterSet, list[str]], rest: tuple[ClusterSet, list[str]],
                          start: datetime) -> list[Envelope]:  # fmt: skip
    """A fleet rollout of kubernetesVersion 1.31 over two sets whose clusters are READY.

    Stage `canary` rotates its set (success) and soaks; stage `rest` needs approval, its set's in-place
    update fails, the failure budget (0) is exceeded and the run halts.
    """
    (cs_a, ids_a), (cs_b, ids_b) = canary, rest
    patch = {"kubernetesVersion": "1.31"}
    fleet: dict[str, Any] = dict(rollout_id=fleet_id)
    started = new_event(m.FleetRolloutStarted(
        **fleet, cluster_type=cs_a.metadata.cluster_type, patch=patch, max_in_flight=1, failure_budget=0,
        stages=[m.FleetRolloutStagePlan(name="canary", clustersets=[cs_a.metadata.name], soak_seconds=600),
                m.FleetRolloutStagePlan(name="rest", clustersets=[cs_b.metadata.name], approval=True)],
    ), source="fleet", event_id=f"{fleet_id}-started")  # fmt: skip

    def fact(payload: m.Event, discriminator: str = "") -> Envelope:
        return new_event(payload, source="fleet", cause=started, discriminator=discriminator)

    def patched(cs: ClusterSet, stage: str, path: Literal["in-place", "rotation"]) -> list[Envelope]:
        new = with_spec(cs, kubernetes_version="1.31")
        loc, name = cs.metadata.location, cs.metadata.name
        patch_req = fact(m.ClusterSetPatchRequested(location=loc, clusterset=name, fleet_rollout_id=fleet_id,
                                                    stage=stage, patch=patch), name)  # fmt: skip
        spec = new.spec.cluster_spec()
        acc = new_event(m.ClusterSetAccepted(
            location=loc, clusterset=name, generation=2, cluster_type=new.metadata.cluster_type, count=new.spec.count,
            config_hash=spec.config_hash(), spec=spec, update_strategy=new.spec.update_strategy, document_hash="doc-2",
            update_path=path, changes=["kubernetesVersion"], fleet_rollout_id=fleet_id,
        ), source="planner", cause=patch_req)  # fmt: skip
        return [patch_req, acc]

    a_new = [f"{cid}-v2" for cid in ids_a]
    a_events = patched(cs_a, "canary", "rotation")
    a_events += rotation(cs_a, with_spec(cs_a, kubernetes_version="1.31"), a_events[-1], f"{fleet_id}-a", ids_a,
                         a_new, start, fleet_rollout_id=fleet_id)  # fmt: skip
    b_events = patched(cs_b, "rest", "in-place")
    b_loc, b_name = cs_b.metadata.location, cs_b.metadata.name
    b_spec = with_spec(cs_b, kubernetes_version="1.31").spec.cluster_spec()
    b_events += [
        new_event(m.ClusterUpdateRequested(location=b_loc, clusterset=b_name, cluster_id=ids_b[0], generation=2,
                                           config_hash=b_spec.config_hash(), spec=b_spec,
                                           changes=["kubernetesVersion"]),
                  source="planner", cause=b_events[-1], discriminator=ids_b[0]),
        new_event(m.ClusterProvisioningFailed(location=b_loc, clusterset=b_name, cluster_id=ids_b[0],
                                              operation="update", step="cluster", code="UpgradeFailed",
                                              message="control plane upgrade failed", retryable=False),
                  source="cloud_provisioner", cause=b_events[-1], discriminator=ids_b[0]),
        new_event(m.ClusterSetUpdateFailed(location=b_loc, clusterset=b_name, generation=2,
                                           config_hash=b_spec.config_hash(), cluster_ids=[ids_b[0]],
                                           reason="control plane upgrade failed", fleet_rollout_id=fleet_id),
                  source="planner", cause=b_events[-1]),
    ]  # fmt: skip
    soak_until = start + timedelta(hours=1)
    events = [
        started,
        fact(m.FleetRolloutStageStarted(**fleet, stage="canary"), "canary"),
        *a_events,
        fact(m.FleetRolloutSetFinished(**fleet, stage="canary", clusterset=cs_a.metadata.name, succeeded=True),
             cs_a.metadata.name),
        fact(m.FleetRolloutStageCompleted(**fleet, stage="canary", soak_until=soak_until), "canary"),
        fact(m.FleetRolloutAwaitingApproval(**fleet, stage="rest"), "rest"),
        fact(m.FleetRolloutStageStarted(**fleet, stage="rest"), "rest"),
        *b_events,
        fact(m.FleetRolloutSetFinished(**fleet, stage="rest", clusterset=b_name, succeeded=False,
                                       reason="control plane upgrade failed"), b_name),
        fact(m.FleetRolloutHalted(**fleet, reason="1 set failed; the failure budget is 0", failed_sets=[b_name])),
    ]  # fmt: skip
    return retime(events, start)


# ---------------------------------------------------------------- control-plane operations
# The steps etcd_migration reports (from the event catalog).
MIGRATION_STEPS = m.MIGRATION_STEPS
ROLLBACK_STEPS = m.MIGRATION_ROLLBACK_STEPS

UPGRADE_STEPS = ("precheck", "snapshot", "replace", "validate")  # per node, after a cluster-wide precheck


def availability(requests: int = 1200, failed: int = 12, downtime_s: float = 2.5,
                 without_quorum: int = 0) -> m.ControlPlaneAvailability:  # fmt: skip
    succeeded = requests - failed
    return m.ControlPlaneAvailability(requests=requests, succeeded=succeeded, downtime_s=downtime_s,
                                      availability_pct=round(100 * succeeded / requests, 3),
                                      requests_without_quorum=without_quorum)  # fmt: skip


def migration(cs: ClusterSet, cause: Envelope, cluster_id: str, operation_id: str, start: datetime, *,
              fail_at: str | None = None, pipeline_id: str | None = None) -> list[Envelope]:  # fmt: skip
    """One node to three: ControlPlaneMigrationRequested, a step completed per step, ControlPlaneMigrationCompleted.

    With `fail_at` (a step name), the steps before it, ControlPlaneMigrationFailed (rolling back), the rollback
    steps and ControlPlaneMigrationRolledBack."""
    op: dict[str, Any] = dict(location=cs.metadata.location, clusterset=cs.metadata.name, cluster_id=cluster_id,
                              operation_id=operation_id, pipeline_id=pipeline_id)  # fmt: skip
    clock = iter(_clock(start))
    spec = cs.spec.cluster_spec()
    requested = new_event(m.ControlPlaneMigrationRequested(**op, config_hash=spec.config_hash(),
                                                           kubernetes_version=spec.kubernetes_version,
                                                           reason="controlPlane.ha false -> true"),
                          source="planner", cause=cause, discriminator=operation_id, time=next(clock))  # fmt: skip

    def fact(payload: m.Event, discriminator: str = "") -> Envelope:
        at = next(clock)
        if isinstance(payload, m.ControlPlaneMigrationStepCompleted):  # it took half a step
            payload = payload.model_copy(update={"started_at": at - STEP / 2})
        return new_event(payload, source="etcd_migration", cause=requested, discriminator=discriminator, time=at)

    out = [requested]
    for phase, step in MIGRATION_STEPS:
        if step == fail_at:
            out.append(fact(m.ControlPlaneMigrationFailed(**op, step=step, reason=f"{step}: injected failure",
                                                          rolling_back=True)))  # fmt: skip
            out += [fact(m.ControlPlaneMigrationStepCompleted(**op, phase=phase, step=rb, rollback=True), f"rb:{rb}")
                    for rb in ROLLBACK_STEPS]  # fmt: skip
            out.append(fact(m.ControlPlaneMigrationRolledBack(**op, from_step=step, reason="injected failure",
                                                              availability=availability(600, 30, 9.0))))
            return out
        detail: dict[str, Any] = {"revision": 10_042, "hash": 3_141_592} if step == "snapshot-save" else {}
        out.append(fact(m.ControlPlaneMigrationStepCompleted(**op, phase=phase, step=step, detail=detail), step))
    endpoint = f"https://{cluster_id}.example.{cs.metadata.location.cloud}.test"
    out.append(fact(m.ControlPlaneMigrationCompleted(
        **op, availability=availability(), config_hash=cs.spec.cluster_spec().config_hash(), endpoint=endpoint,
        members=[f"{cluster_id}-cp-{i}" for i in range(3)])))  # fmt: skip
    return out


def upgrade(cs: ClusterSet, cause: Envelope, cluster_id: str, operation_id: str, start: datetime, *,
            to_version: str = "1.31", fail_node: int | None = None,
            pipeline_id: str | None = None) -> list[Envelope]:  # fmt: skip
    """A cluster-wide precheck, then three members one at a time (precheck, snapshot, replace, validate each); with
    `fail_node`, that node's validation fails (ControlPlaneUpgradeFailed), it is rolled back and the upgrade halts
    (ControlPlaneUpgradeFailed, rolled back)."""
    op: dict[str, Any] = dict(location=cs.metadata.location, clusterset=cs.metadata.name, cluster_id=cluster_id,
                              operation_id=operation_id, pipeline_id=pipeline_id)  # fmt: skip
    clock = iter(_clock(start))
    requested = new_event(m.ControlPlaneUpgradeRequested(**op, to_version=to_version), source="planner", cause=cause,
                          discriminator=operation_id, time=next(clock))  # fmt: skip

    def fact(payload: m.Event, discriminator: str = "") -> Envelope:
        return new_event(payload, source="etcd_migration", cause=requested, discriminator=discriminator,
                         time=next(clock))  # fmt: skip

    nodes = [f"{cluster_id}-cp-{i}" for i in range(3)]
    out = [requested, fact(m.ControlPlaneUpgradeStepCompleted(
        **op, node="cluster", step="precheck", detail={"order": nodes, "versions": dict.fromkeys(nodes, "1.30")}),
        "precheck")]  # fmt: skip
    for i, node in enumerate(nodes):
        for step in UPGRADE_STEPS:
            if i == fail_node and step == "validate":
                reason = "validation: hashkv differs"
                out.append(fact(m.ControlPlaneUpgradeFailed(**op, node=node, reason=reason), "failed"))
                out.append(fact(m.ControlPlaneUpgradeStepCompleted(**op, node=node, step="rollback-node",
                                                                   rollback=True), f"{node}:rb"))  # fmt: skip
                out.append(fact(m.ControlPlaneUpgradeFailed(**op, node=node, reason=reason, rolled_back=True,
                                                            availability=availability(900, 0, 0)), "halted"))
                return out
            out.append(fact(m.ControlPlaneUpgradeStepCompleted(**op, node=node, step=step,
                                                               detail={"version": to_version}), f"{node}:{step}"))
    out.append(fact(m.ControlPlaneUpgradeCompleted(**op, to_version=to_version, availability=availability(900, 0, 0))))
    return out


def pipeline(cs: ClusterSet, cause: Envelope, pipeline_id: str, cluster_ids: list[str], start: datetime, *,
             operation: Literal["migrate", "upgrade"] = "migrate", concurrency: int = 2, failure_budget: int = 0,
             fail: Iterable[str] = ()) -> list[Envelope]:  # fmt: skip
    """A pipeline over `cluster_ids`, `concurrency` at a time (their operations interleaved, a batch every 100
    steps from `start`), progress after each batch; the clusters in `fail` fail (a migration rolled back, an upgrade
    halted on its second node). Once more clusters failed than the budget allows it halts, leaving the rest
    pending; else it completes."""
    loc, name, failing = cs.metadata.location, cs.metadata.name, set(fail)
    base: dict[str, Any] = dict(location=loc, clusterset=name, pipeline_id=pipeline_id)
    to_version = "1.31" if operation == "upgrade" else None
    requested = new_event(m.ControlPlanePipelineRequested(
        **base, operation=operation, to_version=to_version, concurrency=concurrency, failure_budget=failure_budget,
        kubernetes_version=None if to_version else cs.spec.kubernetes_version,
        clusters=[m.PipelineCluster(cluster_id=cid, clusterset=name, location=loc) for cid in cluster_ids],
    ), source="etcd_migration", cause=cause, discriminator=pipeline_id, time=start - STEP)  # fmt: skip
    events, succeeded, failed = [requested], [], []
    for b in range(0, len(cluster_ids), concurrency):
        batch = cluster_ids[b:b + concurrency]
        batch_start, batch_end = start + STEP * 100 * (b // concurrency), start + STEP * (100 * (b // concurrency) + 60)
        histories = []
        for cid in batch:
            op_id = f"{pipeline_id}-{cid}"
            if operation == "migrate":
                histories.append(migration(cs, requested, cid, op_id, batch_start, pipeline_id=pipeline_id,
                                           fail_at="restore-members" if cid in failing else None))  # fmt: skip
            else:
                histories.append(upgrade(cs, requested, cid, op_id, batch_start, pipeline_id=pipeline_id,
                                         fail_node=1 if cid in failing else None))  # fmt: skip
        events += interleave(*histories)
        succeeded += [c for c in batch if c not in failing]
        failed += [c for c in batch if c in failing]
        events.append(new_event(m.ControlPlanePipelineProgressed(
            **base, succeeded=list(succeeded), failed=list(failed), in_flight=[],
            pending=len(cluster_ids) - b - len(batch)), source="etcd_migration", cause=requested,
            discriminator=str(b), time=batch_end))  # fmt: skip
        if len(failed) > failure_budget:
            events.append(new_event(m.ControlPlanePipelineHalted(
                **base, reason=f"{len(failed)} cluster(s) failed; the failure budget is {failure_budget}",
                failed=list(failed)), source="etcd_migration", cause=requested, time=batch_end + STEP))  # fmt: skip
            return events
    events.append(new_event(m.ControlPlanePipelineCompleted(**base, succeeded=succeeded, failed=failed),
                            source="etcd_migration", cause=requested, time=events[-1].time + STEP))  # fmt: skip
    return events
