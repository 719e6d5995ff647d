"""Fleet-wide staged rollouts: the pure core (no I/O).

The aggregate is one fleet rollout (its id). `handle(state, env, catalog)` takes one event — the user's request,
an approval or a control, a set's outcome, or the orchestrator's own tick — and returns the new state and the
events to publish. Time comes only from the triggering envelope (`env.time`), and emitted events carry that same
time, so handling is deterministic: the same event twice changes nothing the second time, and replaying the
inputs from scratch yields the same state and the same event ids.

The life of a rollout:
- FleetRolloutRequested is validated against the set catalog (passed in by the shell) and planned: the sets of
  the cluster type that match the rollout's selector, each in the first stage whose selector matches it.
- Stages run in order. A stage starts once the previous one's soak is over and, if it needs approval, once it
  is approved (an approval may come early). Inside a stage, at most `max_in_flight` sets are patched at once.
- Each set finishes once, on the first outcome the planner or rotation reports for this rollout. More failures
  than `failure_budget` halt the rollout: nothing new starts; sets in flight still report.
- Pause stops new starts (finishing stages still complete), resume continues, abort stops for good.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from services.rotation.catalog import CatalogEntry
from shared.events import ClusterSpec, Envelope, FieldError, Location, decode_payload, new_event, validate_clusterset
from shared.events.models import (
    ClusterSetConverged,
    ClusterSetPatchRequested,
    ClusterSetRejected,
    ClusterSetUpdateFailed,
    Event,
    FleetRolloutAborted,
    FleetRolloutApproved,
    FleetRolloutAwaitingApproval,
    FleetRolloutCompleted,
    FleetRolloutControlRequested,
    FleetRolloutHalted,
    FleetRolloutPaused,
    FleetRolloutRejected,
    FleetRolloutRequested,
    FleetRolloutResumed,
    FleetRolloutSetFinished,
    FleetRolloutStageCompleted,
    FleetRolloutStagePlan,
    FleetRolloutStageStarted,
    FleetRolloutStarted,
    RolloutAborted,
    RolloutPaused,
    RolloutRolledBack,
)
from shared.merge_patch import merge_patch

SOURCE = "rotation"

SetStatus = Literal["pending", "in_flight", "succeeded", "failed"]
StageStatus = Literal["waiting", "awaiting_approval", "running", "completed"]
# new: nothing but early approvals known yet (the request has not been handled).
RolloutStatus = Literal["new", "rejected", "running", "paused", "halted", "aborted", "completed"]
ACTIVE: tuple[RolloutStatus, ...] = ("running", "paused")

# The set outcomes that concern a fleet rollout (when they carry its id).
OUTCOMES: tuple[type[Event], ...] = (ClusterSetConverged, ClusterSetUpdateFailed, ClusterSetRejected, RolloutPaused,
                                     RolloutRolledBack, RolloutAborted)  # fmt: skip
# What may be patched: the ClusterSpec fields, as users write them (camelCase).
PATCHABLE: dict[str, str] = {f.alias or name: name for name, f in ClusterSpec.model_fields.items()}
_NOT_PATCHABLE = {
    "count": "a fleet rollout may not change count; apply the ClusterSet to scale it",
    "updateStrategy": "a fleet rollout may not change the update strategy; apply the ClusterSet to change it",
}
REMEMBERED = 200
# Sets named in one validation message before "+N more".
_NAMES_SHOWN = 5


class SetRun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stage: str
    location: Location
    status: SetStatus = "pending"
    reason: str = ""


class StageRun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    clustersets: list[str]
    soak_seconds: float = 0
    approval: bool = False
    status: StageStatus = "waiting"
    soak_until: datetime | None = None


class FleetState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rollout_id: str
    status: RolloutStatus = "new"
    cluster_type: str = ""
    patch: dict[str, Any] = {}
    max_in_flight: int = 1
    failure_budget: int = 0
    stages: list[StageRun] = []
    sets: dict[str, SetRun] = {}
    # Stages approved so far (sorted), including approvals that came before the stage was reached.
    approvals: list[str] = []
    # Ids of events that must never act again, newest last: controls (a stale redelivery of "pause" must not
    # undo a later "resume") and outcomes for sets not in flight (a stray must not count once the set starts).
    # Both are rare, so a short memory is enough, and it outlives the runtime's ledger.
    remembered: list[str] = []

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def stage(self, name: str) -> StageRun | None:
        return next((s for s in self.stages if s.name == name), None)

    def current_stage(self) -> int | None:
        """Index of the first stage not completed; None when all are."""
        return next((i for i, s in enumerate(self.stages) if s.status != "completed"), None)

    def with_status(self, status: SetStatus) -> list[str]:
        return sorted(name for name, s in self.sets.items() if s.status == status)


# ---------------------------------------------------------------- validation and planning
@dataclass(frozen=True)
class Plan:
    stages: list[FleetRolloutStagePlan]
    locations: dict[str, Location]


def plan(request: FleetRolloutRequested, catalog: Mapping[str, CatalogEntry]) -> tuple[Plan | None, list[FieldError]]:
    """The stages with their sets, or every reason the request is refused (each naming its field)."""
    key_errors = patch_key_errors(request.patch)
    errors = key_errors + stage_errors(request)
    matched = sorted((e for e in catalog.values() if e.cluster_type == request.cluster_type
                      and request.selector.matches(e.name, e.location)), key=lambda e: e.name)  # fmt: skip
    if not matched:
        errors.append(FieldError(field="selector",
                                 message=f"no live ClusterSet of cluster type {request.cluster_type!r} matches"))
    by_stage: list[list[CatalogEntry]] = [[] for _ in request.stages]
    for entry in matched:
        first = next((i for i, st in enumerate(request.stages) if st.selector.matches(entry.name, entry.location)),
                     None)  # fmt: skip
        if first is not None:
            by_stage[first].append(entry)
    included = [e for group in by_stage for e in group]
    if matched and not included:
        errors.append(FieldError(field="stages", message=(
            f"none of the {len(matched)} matching ClusterSets falls into a stage: {_names([e.name for e in matched])}"
        )))  # fmt: skip
    if not key_errors:  # a patch of the wrong fields would only repeat the same complaint per set
        errors += patched_spec_errors(included, request.patch)
    if errors:
        return None, errors
    stages = [FleetRolloutStagePlan(name=st.name, clustersets=[e.name for e in group], soak_seconds=st.soak_seconds,
                                    approval=st.approval) for st, group in zip(request.stages, by_stage, strict=True)]
    return Plan(stages=stages, locations={e.name: e.location for e in included}), []


def patch_key_errors(patch: Mapping[str, Any]) -> list[FieldError]:
    if not patch:
        return [FieldError(field="patch", message="empty: there is nothing to roll out")]
    errors = []
    for key in patch:
        if key in PATCHABLE:
            continue
        if key in _NOT_PATCHABLE:
            message = _NOT_PATCHABLE[key]
        elif key in PATCHABLE.values():
            message = f"write it as {next(a for a, n in PATCHABLE.items() if n == key)}"
        else:
            message = f"not a ClusterSpec field; a fleet rollout may patch {', '.join(PATCHABLE)}"
        errors.append(FieldError(field=f"patch.{key}", message=message))
    return errors


def stage_errors(request: FleetRolloutRequested) -> list[FieldError]:
    seen: set[str] = set()
    errors = []
    for i, stage in enumerate(request.stages):
        if stage.name in seen:
            errors.append(FieldError(field=f"stages[{i}].name", message=f"duplicate stage name {stage.name!r}"))
        seen.add(stage.name)
    return errors


def patched_spec_errors(entries: list[CatalogEntry], patch: Mapping[str, Any]) -> list[FieldError]:
    """Validate the patch merged into each set's spec, as the planner will; one error per distinct problem,
    naming the sets it applies to."""
    found: dict[tuple[str, str], list[str]] = {}
    for entry in entries:
        document = entry.document()
        document["spec"] = merge_patch(document["spec"], dict(patch))
        _, errors = validate_clusterset(document)
        for error in errors:
            found.setdefault((_patch_field(error.field), error.message), []).append(entry.name)
    return [FieldError(field=field, message=f"{message} (ClusterSet {_names(names)})")
            for (field, message), names in found.items()]  # fmt: skip


def _patch_field(path: str) -> str:
    """'spec.kubernetesVersion' -> 'patch.kubernetesVersion': the user wrote the patch, not the spec."""
    if path == "spec":
        return "patch"
    return "patch." + path.removeprefix("spec.") if path.startswith("spec.") else path


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" +{len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


# ---------------------------------------------------------------- evolve: folding our own facts
def evolve(state: FleetState, event: Event) -> FleetState:
    """Fold an event this core emitted (or an approval) into the state. Pure; the same event twice = once."""
    match event:
        case FleetRolloutStarted():
            return state.model_copy(update={"status": "running"}) if state.status == "new" else state
        case FleetRolloutRejected():
            return state.model_copy(update={"status": "rejected"}) if state.status == "new" else state
        case FleetRolloutApproved():
            return _approve(state, event.stage)
        case FleetRolloutAwaitingApproval():
            return _set_stage(state, event.stage, status="awaiting_approval")
        case FleetRolloutStageStarted():
            return _set_stage(state, event.stage, status="running")
        case FleetRolloutStageCompleted():
            return _set_stage(state, event.stage, status="completed", soak_until=event.soak_until)
        case ClusterSetPatchRequested():
            return _set_set(state, event.clusterset, status="in_flight")
        case FleetRolloutSetFinished():
            return _set_set(state, event.clusterset, status="succeeded" if event.succeeded else "failed",
                            reason=event.reason)  # fmt: skip
        case FleetRolloutPaused():
            return state.model_copy(update={"status": "paused"})
        case FleetRolloutResumed():
            return state.model_copy(update={"status": "running"})
        case FleetRolloutHalted():
            return state.model_copy(update={"status": "halted"})
        case FleetRolloutAborted():
            return state.model_copy(update={"status": "aborted"})
        case FleetRolloutCompleted():
            return state.model_copy(update={"status": "completed"})
    return state


def _approve(state: FleetState, stage_name: str) -> FleetState:
    if stage_name in state.approvals:
        return state
    if state.status != "new":  # before the request we cannot tell a later stage from an unknown one
        stage = state.stage(stage_name)
        if not state.active or stage is None or not stage.approval or stage.status in ("running", "completed"):
            return state
    return state.model_copy(update={"approvals": sorted([*state.approvals, stage_name])})


def _set_stage(state: FleetState, name: str, **changes: Any) -> FleetState:
    stages = [s.model_copy(update=changes) if s.name == name else s for s in state.stages]
    return state.model_copy(update={"stages": stages})


def _set_set(state: FleetState, name: str, **changes: Any) -> FleetState:
    current = state.sets.get(name)
    if current is None:
        return state
    return state.model_copy(update={"sets": {**state.sets, name: current.model_copy(update=changes)}})


# ---------------------------------------------------------------- handle: decide and fold
class _Run:
    """One handling: the state as it evolves and the events emitted so far, all stamped with the cause's time."""

    def __init__(self, state: FleetState, cause: Envelope) -> None:
        self.state, self.cause, self.now = state, cause, as_utc(cause.time)
        self.events: list[Envelope] = []

    def remember(self) -> bool:
        """Note the cause as one that must never act again; False when it was noted before."""
        if self.cause.id in self.state.remembered:
            return False
        remembered = [*self.state.remembered, self.cause.id][-REMEMBERED:]
        self.state = self.state.model_copy(update={"remembered": remembered})
        return True

    def emit(self, payload: Event, discriminator: str = "") -> None:
        self.events.append(new_event(payload, source=SOURCE, cause=self.cause, discriminator=discriminator,
                                     time=self.now))  # fmt: skip
        self.state = evolve(self.state, payload)


def handle(state: FleetState | None, env: Envelope, catalog: Mapping[str, CatalogEntry] | None = None
           ) -> tuple[FleetState | None, list[Envelope]]:  # fmt: skip
    """The new state and the events to publish for one incoming event. `catalog` is only read for a request."""
    payload = _payload(env)
    if payload is None:
        return state, []
    if isinstance(payload, FleetRolloutRequested):
        if state is not None and state.status != "new":  # a rollout id is used once
            return state, []
        return _request(state, payload, env, catalog or {})
    if state is None:
        if isinstance(payload, FleetRolloutApproved):  # an approval ahead of its request: remember it
            return _approve(FleetState(rollout_id=payload.rollout_id), payload.stage), []
        return None, []
    if state.status == "new" and not isinstance(payload, FleetRolloutApproved):
        return state, []
    run = _Run(state, env)
    match payload:
        case FleetRolloutApproved():
            run.state = evolve(run.state, payload)
        case FleetRolloutControlRequested():
            _control(run, payload)
        case _ if isinstance(payload, OUTCOMES):
            _outcome(run, payload)
    if run.state.status != "new":
        _advance(run)
    return run.state, run.events


def _request(state: FleetState | None, request: FleetRolloutRequested, env: Envelope,
             catalog: Mapping[str, CatalogEntry]) -> tuple[FleetState, list[Envelope]]:  # fmt: skip
    early = state.approvals if state is not None else []
    planned, errors = plan(request, catalog)
    base = FleetState(rollout_id=request.rollout_id)
    if planned is None:
        run = _Run(base, env)
        run.emit(FleetRolloutRejected(rollout_id=request.rollout_id, errors=errors))
        return run.state, run.events
    # FleetRolloutStarted names the sets; where each one is comes from the catalog this request was planned on.
    stages = [StageRun(name=s.name, clustersets=s.clustersets, soak_seconds=s.soak_seconds, approval=s.approval)
              for s in planned.stages]  # fmt: skip
    sets = {name: SetRun(stage=s.name, location=planned.locations[name]) for s in planned.stages
            for name in s.clustersets}  # fmt: skip
    approvals = sorted(a for a in early if any(s.name == a and s.approval for s in stages))
    run = _Run(base.model_copy(update=dict(
        cluster_type=request.cluster_type, patch=request.patch, max_in_flight=request.max_in_flight,
        failure_budget=request.failure_budget, stages=stages, sets=sets, approvals=approvals,
    )), env)  # fmt: skip
    run.emit(FleetRolloutStarted(rollout_id=request.rollout_id, cluster_type=request.cluster_type,
                                 patch=request.patch, stages=planned.stages, max_in_flight=request.max_in_flight,
                                 failure_budget=request.failure_budget))  # fmt: skip
    _advance(run)
    return run.state, run.events


def _control(run: _Run, control: FleetRolloutControlRequested) -> None:
    rid, status = run.state.rollout_id, run.state.status
    if not run.remember():
        return
    reason = control.reason or f"{control.action} requested by an operator"
    if control.action == "pause" and status == "running":
        run.emit(FleetRolloutPaused(rollout_id=rid, reason=reason))
    elif control.action == "resume" and status == "paused":
        run.emit(FleetRolloutResumed(rollout_id=rid))
    elif control.action == "abort" and status in ACTIVE:
        run.emit(FleetRolloutAborted(rollout_id=rid, reason=reason))


def set_outcome(event: Event) -> tuple[str, bool, str] | None:
    """(set, succeeded, reason) when `event` ends a set's part in a fleet rollout, else None."""
    match event:
        case ClusterSetConverged():
            return event.clusterset, True, ""
        case ClusterSetUpdateFailed():
            return event.clusterset, False, f"in-place update failed: {event.reason}"
        case RolloutPaused(failed=True):
            return event.clusterset, False, f"rollout {event.rollout_id} paused on a failure: {event.reason}"
        case RolloutRolledBack():
            return event.clusterset, False, f"rollout {event.rollout_id} rolled back: {event.reason}"
        case RolloutAborted():
            return event.clusterset, False, f"rollout {event.rollout_id} aborted: {event.reason}"
        case ClusterSetRejected(clusterset=str() as name):
            detail = "; ".join(f"{e.field}: {e.message}" for e in event.errors)
            return name, False, f"patch rejected: {detail}"[:2000]
    return None


def fleet_rollout_of(event: Event) -> str | None:
    value = getattr(event, "fleet_rollout_id", None)
    return value if isinstance(value, str) and value else None


def _outcome(run: _Run, event: Event) -> None:
    outcome = set_outcome(event)
    if outcome is None or fleet_rollout_of(event) != run.state.rollout_id:
        return
    name, succeeded, reason = outcome
    current = run.state.sets.get(name)
    if current is None or current.status in ("succeeded", "failed"):  # the first outcome counts
        return
    if current.status == "pending" or run.cause.id in run.state.remembered:
        run.remember()  # reported before the set was even patched: a stray, now and when it comes again
        return
    run.emit(FleetRolloutSetFinished(rollout_id=run.state.rollout_id, stage=current.stage, clusterset=name,
                                     succeeded=succeeded, reason=reason), discriminator=name)  # fmt: skip
    failed = run.state.with_status("failed")
    if not succeeded and run.state.active and len(failed) > run.state.failure_budget:
        run.emit(FleetRolloutHalted(rollout_id=run.state.rollout_id, failed_sets=failed, reason=(
            f"{len(failed)} ClusterSet(s) failed, more than the failure budget of {run.state.failure_budget}")))


def _soaked(state: FleetState, index: int, now: datetime) -> bool:
    previous = state.stages[index - 1].soak_until if index > 0 else None
    return previous is None or now >= as_utc(previous)


def _advance(run: _Run) -> None:
    """Move on as far as the state allows now; stops at a fixed point, so doing it again emits nothing."""
    while run.state.active:
        state, rid = run.state, run.state.rollout_id
        index = state.current_stage()
        if index is None:
            run.emit(FleetRolloutCompleted(rollout_id=rid, succeeded=len(state.with_status("succeeded")),
                                           failed=len(state.with_status("failed"))))  # fmt: skip
            return
        stage = state.stages[index]
        if stage.status in ("waiting", "awaiting_approval"):
            if state.status == "paused" or not _soaked(state, index, run.now):
                return
            if stage.approval and stage.name not in state.approvals:
                if stage.status == "waiting":
                    run.emit(FleetRolloutAwaitingApproval(rollout_id=rid, stage=stage.name), stage.name)
                return
            run.emit(FleetRolloutStageStarted(rollout_id=rid, stage=stage.name), stage.name)
            continue
        statuses = [state.sets[name].status for name in stage.clustersets]
        if all(s in ("succeeded", "failed") for s in statuses):
            # An empty stage changed nothing, so there is nothing to soak.
            soak_until = run.now + timedelta(seconds=stage.soak_seconds) if stage.clustersets else None
            run.emit(FleetRolloutStageCompleted(rollout_id=rid, stage=stage.name, soak_until=soak_until), stage.name)
            continue
        if state.status == "paused":
            return
        free = state.max_in_flight - len(state.with_status("in_flight"))
        pending = [name for name in stage.clustersets if state.sets[name].status == "pending"]
        for name in pending[: max(free, 0)]:
            run.emit(ClusterSetPatchRequested(clusterset=name, location=state.sets[name].location,
                                              fleet_rollout_id=rid, stage=stage.name, patch=state.patch), name)
        return


def due(state: FleetState, now: datetime) -> bool:
    """Whether a tick would move the rollout on: its next stage waits only for a soak that is now over."""
    index = state.current_stage()
    if state.status != "running" or index is None or state.stages[index].status != "waiting":
        return False
    return _soaked(state, index, as_utc(now))


def as_utc(moment: datetime) -> datetime:
    """Envelope times are UTC; a naive one (from a careless publisher) is read as UTC rather than crash."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _payload(env: Envelope) -> Event | None:
    try:
        return decode_payload(env)
    except (KeyError, ValidationError):
        return None
