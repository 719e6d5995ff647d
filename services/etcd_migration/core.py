"""etcd_migration's pure core: one control-plane operation per cluster, as a journal of steps. No I/O.

Aggregate: the cluster. An operation (a migration to HA, or an upgrade) is a fixed list of
steps; the service performs one step per message through the `ControlPlaneDriver` and emits
a `...StepCompleted` event, which comes back through the stream and moves the journal on. A
service killed at any instant therefore resumes at the step that was running (every driver
method is an ensure, so redoing it is safe), and the journal in the folded state says what
has been done: the steps completed, what they reported (snapshot hash and revision, disk
snapshot, the old revision), and whether the operation is rolling back.

Migration (ARCHITECTURE.md, "Control-plane migration"):
  phase 0  precheck                     one healthy member; remember its revision
  phase 1  stop-mutations, snapshot-save, stop-node, snapshot-disk
  phase 2  create-nodes, create-load-balancers, restore-members, verify-members
  phase 3  wait-kubelets, start-controller-manager, open-load-balancers
A failure before phase 3 rolls back (remove-new-nodes, remove-load-balancers, start-node,
resume-mutations): nothing mutated the old node's data, so it serves again as it was. A
failure in phase 3 stops and asks for an operator: the old node is fenced once the internal
load balancer opens (wait-kubelets), and two writable control planes must never exist. Asking
again for a migration of that cluster *resumes* it at the failed step (a new operation id for
the outcome, the first one for the driver's nodes); asking for one of a cluster that is HA
already completes at once. A re-run of a pipeline so converges instead of failing on what is done.

Upgrade: per member (followers first, the leader last): precheck (quorum healthy, one
version), snapshot (a fresh one), replace, validate. A failing validation replaces the node
back with the version it had (rollback-node) and halts the upgrade.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.events import Envelope, decode_payload
from shared.events.clusterset import Location
from shared.events.models import (
    MIGRATION_ROLLBACK_STEPS,
    MIGRATION_STEPS,
    ClusterEvent,
    ClusterRetirementRequested,
    ControlPlaneMigrationCompleted,
    ControlPlaneMigrationFailed,
    ControlPlaneMigrationRequested,
    ControlPlaneMigrationRolledBack,
    ControlPlaneMigrationStepCompleted,
    ControlPlaneUpgradeCompleted,
    ControlPlaneUpgradeFailed,
    ControlPlaneUpgradeRequested,
    ControlPlaneUpgradeStepCompleted,
    Event,
)

SOURCE = "etcd_migration"

PHASE = dict((step, phase) for phase, step in MIGRATION_STEPS)
ROLLBACK_STEPS = MIGRATION_ROLLBACK_STEPS
UPGRADE_NODE_STEPS: tuple[str, ...] = ("precheck", "snapshot", "replace", "validate")

Kind = Literal["migrate", "upgrade"]
Status = Literal["running", "rolling-back", "completed", "rolled-back", "failed"]


class Operation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    operation_id: str
    kind: Kind
    pipeline_id: str | None = None
    config_hash: str | None = None
    to_version: str | None = None
    status: Status = "running"
    done: list[str] = []  # steps completed (upgrades: "<node>:<step>")
    rolled_back: list[str] = []  # rollback steps completed
    failed_step: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = {}  # what steps reported, by step
    nodes: list[str] = []  # upgrades: the members in the order they are replaced
    old_versions: dict[str, str] = {}  # upgrades: what each node ran before
    resumes: str | None = None  # the operation this one continues (phase 3): its nodes carry that id

    @property
    def driver_operation_id(self) -> str:
        """The id the driver names this operation's snapshots and nodes by."""
        return self.resumes or self.operation_id


class CPState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cluster_id: str
    clusterset: str
    location: Location
    op: Operation | None = None
    finished: list[str] = []  # operation ids that ended: a late duplicate request does not restart one
    retired: bool = False
    awaiting: str | None = None  # id of the last event that moved the journal (the chain's continuation)


# ---------------------------------------------------------------- actions
class Step(BaseModel):
    """Perform one step through the driver, then emit its StepCompleted."""

    model_config = ConfigDict(frozen=True)
    kind: Kind
    step: str
    phase: int = 0
    node: str | None = None
    rollback: bool = False


class Finish(BaseModel):
    """Emit the operation's final event (the app adds the prober's availability)."""

    model_config = ConfigDict(frozen=True)
    outcome: Literal["completed", "rolled-back", "failed"]


Action = Step | Finish


# ---------------------------------------------------------------- evolve
def _payload(env: Envelope) -> Event | None:
    try:
        return decode_payload(env)
    except (KeyError, ValidationError):
        return None


def _op(state: CPState, **changes: Any) -> CPState:
    assert state.op is not None
    return state.model_copy(update={"op": state.op.model_copy(update=changes)})


def _end(state: CPState) -> CPState:
    assert state.op is not None
    return state.model_copy(update={"finished": [*state.finished, state.op.operation_id][-20:]})


def evolve(state: CPState | None, env: Envelope) -> CPState | None:
    """Fold one event in. Pure and idempotent."""
    p = _payload(env)
    if not isinstance(p, ClusterEvent):
        return state
    new = _apply(state, p, env)
    if new is None or new == state:
        return new
    return new.model_copy(update={"awaiting": env.id})


def _apply(state: CPState | None, p: ClusterEvent, env: Envelope) -> CPState | None:
    if isinstance(p, ControlPlaneMigrationRequested | ControlPlaneUpgradeRequested):
        base = state or CPState(cluster_id=p.cluster_id, clusterset=p.clusterset, location=p.location)
        busy = base.op is not None and base.op.status in ("running", "rolling-back")
        seen = p.operation_id in base.finished or (base.op is not None and base.op.operation_id == p.operation_id)
        if base.retired or busy or seen:
            return base  # one operation at a time per cluster; a repeat or a late duplicate changes nothing
        kind: Kind = "migrate" if isinstance(p, ControlPlaneMigrationRequested) else "upgrade"
        # Upgrades go to `to_version`; a migration keeps the version the control plane runs.
        version = p.to_version if isinstance(p, ControlPlaneUpgradeRequested) else p.kubernetes_version
        started = Operation(operation_id=p.operation_id, kind=kind, pipeline_id=p.pipeline_id,
                            config_hash=p.config_hash, to_version=version)  # fmt: skip
        if kind == "migrate" and resumable(base.op):
            assert base.op is not None
            started = started.model_copy(update={"done": base.op.done, "detail": base.op.detail,
                                                 "resumes": base.op.driver_operation_id})  # fmt: skip
        return base.model_copy(update={"op": started})
    if state is None:
        return None
    if isinstance(p, ClusterRetirementRequested):
        return state.model_copy(update={"retired": True})
    op = state.op
    if op is None or getattr(p, "operation_id", None) != op.operation_id:
        return state  # about another (older) operation
    match p:
        case ControlPlaneMigrationStepCompleted() | ControlPlaneUpgradeStepCompleted():
            name = p.step if isinstance(p, ControlPlaneMigrationStepCompleted) else f"{p.node}:{p.step}"
            if p.rollback:
                if name in op.rolled_back:
                    return state
                return _op(state, rolled_back=[*op.rolled_back, name], detail={**op.detail, name: dict(p.detail)})
            if name in op.done:
                return state
            update: dict[str, Any] = {"done": [*op.done, name], "detail": {**op.detail, name: dict(p.detail)}}
            if isinstance(p, ControlPlaneUpgradeStepCompleted) and p.step == "precheck" and not op.nodes:
                update["nodes"] = list(p.detail.get("order", []))
                update["old_versions"] = dict(p.detail.get("versions", {}))
            return _op(state, **update)
        case ControlPlaneMigrationFailed():
            status: Status = "rolling-back" if p.rolling_back else "failed"
            # A failure while running may start the rollback; one while rolling back stops everything.
            if not (op.status == "running" or (op.status == "rolling-back" and not p.rolling_back)):
                return state
            after = _op(state, status=status, failed_step=p.step, reason=p.reason)
            return after if p.rolling_back else _end(after)
        case ControlPlaneUpgradeFailed():
            if op.status not in ("running", "rolling-back"):
                return state
            node_failed = not p.rolled_back and p.node is not None
            if node_failed and op.status == "running":
                return _op(state, status="rolling-back", failed_step=p.node, reason=p.reason)
            if node_failed and p.node == op.failed_step:
                return state  # the same node failure again (it comes back through the stream): roll back once
            return _end(_op(state, status="failed", failed_step=p.node or op.failed_step, reason=p.reason))
        case ControlPlaneMigrationCompleted() | ControlPlaneUpgradeCompleted():
            return _end(_op(state, status="completed")) if op.status == "running" else state
        case ControlPlaneMigrationRolledBack():
            return _end(_op(state, status="rolled-back")) if op.status == "rolling-back" else state
    return state


def should_act(before: CPState | None, after: CPState | None, env: Envelope) -> bool:
    """Act on news, or on the event the chain waits for (its own last step); never on a stale duplicate."""
    if after is None:
        return False
    return after != before or (before is not None and before.awaiting == env.id)


# ---------------------------------------------------------------- next action
def next_action(state: CPState | None) -> Action | None:
    if state is None or state.op is None or state.retired:
        return None
    op = state.op
    if op.status in ("completed", "rolled-back", "failed"):
        return None
    if op.kind == "migrate":
        return _next_migration(op)
    return _next_upgrade(op)


def _next_migration(op: Operation) -> Action:
    if op.detail.get("precheck", {}).get("already_ha"):
        return Finish(outcome="completed")  # migrated before (another operation): nothing to do
    if op.status == "rolling-back":
        if op.failed_step == "precheck":
            return Finish(outcome="rolled-back")  # nothing was touched yet: nothing to undo
        for step in ROLLBACK_STEPS:
            if step not in op.rolled_back:
                return Step(kind="migrate", step=step, phase=PHASE.get(op.failed_step or "", 0), rollback=True)
        return Finish(outcome="rolled-back")
    for phase, step in MIGRATION_STEPS:
        if step not in op.done:
            return Step(kind="migrate", step=step, phase=phase)
    return Finish(outcome="completed")


def _next_upgrade(op: Operation) -> Action:
    if op.status == "rolling-back":
        node = op.failed_step or ""
        if f"{node}:rollback-node" not in op.rolled_back:
            return Step(kind="upgrade", step="rollback-node", node=node, rollback=True)
        return Finish(outcome="failed")
    if "cluster:precheck" not in op.done:
        return Step(kind="upgrade", step="precheck", node="cluster")
    for node in op.nodes:
        for step in UPGRADE_NODE_STEPS:
            if f"{node}:{step}" not in op.done:
                return Step(kind="upgrade", step=step, node=node)
    return Finish(outcome="completed")


def rollback_allowed(step: str) -> bool:
    """Before phase 3 nothing has mutated state and the old node is not fenced: rolling back is safe."""
    return PHASE.get(step, 0) < 3


def resumable(op: Operation | None) -> bool:
    """A migration that stopped in phase 3: the only way is forward, from the step that failed."""
    return (op is not None and op.kind == "migrate" and op.status == "failed"
            and not rollback_allowed(op.failed_step or ""))  # fmt: skip
