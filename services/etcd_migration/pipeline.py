"""A control-plane pipeline: migrate or upgrade many clusters, `concurrency` at a time, halting past a budget.

Pure. Aggregate: the pipeline id. It starts each cluster's operation with a request event and
learns the outcome from the operation's final event; a cluster's own precheck and post-checks
are the cluster-level pre- and post-conditions. More failures than `failure_budget` halt it:
nothing new starts, operations in flight finish and are still counted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.decider import decide_and_evolve
from shared.events import Envelope, decode_payload, new_event
from shared.events.clusterset import Location
from shared.events.envelope import derive_id
from shared.events.models import (
    ControlPlaneMigrationCompleted,
    ControlPlaneMigrationFailed,
    ControlPlaneMigrationRequested,
    ControlPlaneMigrationRolledBack,
    ControlPlaneOperation,
    ControlPlanePipelineCompleted,
    ControlPlanePipelineEvent,
    ControlPlanePipelineHalted,
    ControlPlanePipelineProgressed,
    ControlPlanePipelineRequested,
    ControlPlaneUpgradeCompleted,
    ControlPlaneUpgradeFailed,
    ControlPlaneUpgradeRequested,
    Event,
    PipelineCluster,
)

SOURCE = "etcd_migration"
OUTCOMES = (ControlPlaneMigrationCompleted, ControlPlaneMigrationRolledBack, ControlPlaneMigrationFailed,
            ControlPlaneUpgradeCompleted, ControlPlaneUpgradeFailed)  # fmt: skip


class PipelineState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pipeline_id: str
    clusterset: str
    location: Location
    operation: ControlPlaneOperation
    to_version: str | None = None
    kubernetes_version: str | None = None
    config_hash: str | None = None
    concurrency: int = 1
    failure_budget: int = 0
    clusters: list[PipelineCluster] = []
    started: dict[str, str] = {}  # cluster id -> operation id
    succeeded: list[str] = []
    failed: list[str] = []
    halted: bool = False
    completed: bool = False

    def in_flight(self) -> list[str]:
        done = set(self.succeeded) | set(self.failed)
        return [c for c in self.started if c not in done]


def operation_id(pipeline_id: str, cluster_id: str) -> str:
    return f"{pipeline_id}-{derive_id(pipeline_id, 'op', cluster_id)[:8]}"


def _payload(env: Envelope) -> Event | None:
    try:
        return decode_payload(env)
    except (KeyError, ValidationError):
        return None


def final_outcome(p: Event) -> bool | None:
    """True: the operation succeeded; False: it ended without success; None: not a final event."""
    match p:
        case ControlPlaneMigrationCompleted() | ControlPlaneUpgradeCompleted():
            return True
        case ControlPlaneMigrationRolledBack():
            return False
        case ControlPlaneMigrationFailed():
            return None if p.rolling_back else False
        case ControlPlaneUpgradeFailed():
            return False if (p.rolled_back or p.node is None) else None
    return None


def evolve(state: PipelineState | None, env: Envelope) -> PipelineState | None:
    p = _payload(env)
    match p:
        case ControlPlanePipelineRequested():
            if state is not None:
                return state
            return PipelineState(pipeline_id=p.pipeline_id, clusterset=p.clusterset, location=p.location,
                                 operation=p.operation, to_version=p.to_version, config_hash=p.config_hash,
                                 kubernetes_version=p.kubernetes_version,
                                 concurrency=p.concurrency, failure_budget=p.failure_budget,
                                 clusters=list(p.clusters))  # fmt: skip
        case ControlPlaneMigrationRequested() | ControlPlaneUpgradeRequested():
            if state is None or p.cluster_id in state.started:
                return state
            return state.model_copy(update={"started": {**state.started, p.cluster_id: p.operation_id}})
        case ControlPlanePipelineHalted():
            return state.model_copy(update={"halted": True}) if state else state
        case ControlPlanePipelineCompleted():
            return state.model_copy(update={"completed": True}) if state else state
    if state is None or p is None:
        return state
    outcome = final_outcome(p)
    cluster_id = getattr(p, "cluster_id", None)
    if outcome is None or state.started.get(str(cluster_id)) != getattr(p, "operation_id", None):
        return state
    if cluster_id in state.succeeded or cluster_id in state.failed:
        return state
    key = "succeeded" if outcome else "failed"
    return state.model_copy(update={key: [*getattr(state, key), cluster_id]})


def decide(state: PipelineState | None, env: Envelope) -> list[Envelope]:
    after = evolve(state, env)
    if after is None or after == state or after.completed:
        return []
    out: list[Envelope] = []
    if len(after.failed) > after.failure_budget and not after.halted:
        out.append(_emit(after, ControlPlanePipelineHalted, env, reason=(
            f"{len(after.failed)} cluster(s) failed, more than the failure budget of {after.failure_budget}"),
            failed=list(after.failed)))  # fmt: skip
        after = after.model_copy(update={"halted": True})
    if not after.halted:
        room = after.concurrency - len(after.in_flight())
        for cluster in [c for c in after.clusters if c.cluster_id not in after.started][: max(0, room)]:
            out.append(_request(after, cluster, env))
    started = len(after.started) + sum(1 for e in out if e.type.endswith("Requested"))
    pending = len(after.clusters) - started
    in_flight = [*after.in_flight(), *(e.data["cluster_id"] for e in out if e.type.endswith("Requested"))]
    if not in_flight and (pending == 0 or after.halted):
        out.append(_emit(after, ControlPlanePipelineCompleted, env, succeeded=list(after.succeeded),
                         failed=list(after.failed)))  # fmt: skip
    else:
        out.append(_emit(after, ControlPlanePipelineProgressed, env, succeeded=list(after.succeeded),
                         failed=list(after.failed), in_flight=in_flight, pending=pending))  # fmt: skip
    return out


def handle(state: PipelineState | None, env: Envelope) -> tuple[PipelineState | None, list[Envelope]]:
    return decide_and_evolve(decide, evolve, state, env)


def _emit(state: PipelineState, cls: type[ControlPlanePipelineEvent], cause: Envelope, **fields: Any) -> Envelope:
    payload = cls(clusterset=state.clusterset, location=state.location, pipeline_id=state.pipeline_id, **fields)
    return new_event(payload, source=SOURCE, cause=cause)


def _request(state: PipelineState, cluster: PipelineCluster, cause: Envelope) -> Envelope:
    op_id = operation_id(state.pipeline_id, cluster.cluster_id)
    payload: Event
    if state.operation == "migrate":
        payload = ControlPlaneMigrationRequested(
            cluster_id=cluster.cluster_id, clusterset=cluster.clusterset, location=cluster.location,
            operation_id=op_id, pipeline_id=state.pipeline_id, config_hash=state.config_hash,
            kubernetes_version=state.kubernetes_version)  # fmt: skip
    else:
        payload = ControlPlaneUpgradeRequested(
            cluster_id=cluster.cluster_id, clusterset=cluster.clusterset, location=cluster.location,
            operation_id=op_id, pipeline_id=state.pipeline_id, to_version=state.to_version or "",
            config_hash=state.config_hash)  # fmt: skip
    return new_event(payload, source=SOURCE, cause=cause, discriminator=cluster.cluster_id)
