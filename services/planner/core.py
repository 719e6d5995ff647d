"""The planner's pure core: decide(state, event) -> events and evolve(state, event) -> state.

The aggregate is one ClusterSet. Desired membership comes from the accepted spec's `count`;
actual membership from the planner's own requests/retirements plus lifecycle facts, so
that scale-down can retire the lowest-risk clusters first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from services.planner import rules
from shared.cluster_ids import cluster_id_for
from shared.decider import decide_and_evolve
from shared.events import (
    ClusterDeprovisioned,
    ClusterInfraFailed,
    ClusterProtectionChanged,
    ClusterProtectionUpdated,
    ClusterProvisioned,
    ClusterProvisioningFailed,
    ClusterReady,
    ClusterRequested,
    ClusterRetirementRequested,
    ClusterSetAccepted,
    ClusterSetApplied,
    ClusterSetDeleted,
    ClusterSetRejected,
    ClusterSetRetired,
    ClusterSpec,
    Envelope,
    FieldError,
    Location,
    decode_payload,
    new_event,
    validate_clusterset,
)  # fmt: skip
from shared.events.clusterset import ClusterSet, UpdateStrategy, clusterset_document
from shared.events.envelope import derive_id
from shared.events.models import (
    ClusterSetConverged,
    ClusterSetPatchRequested,
    ClusterSetUpdateFailed,
    ClusterUpdateRequested,
    ControlPlaneChangeRequested,
    ControlPlaneMigrationCompleted,
    ControlPlanePipelineCompleted,
    ControlPlanePipelineHalted,
    ControlPlanePipelineRequested,
    ControlPlaneUpgradeCompleted,
    Event,
    PipelineCluster,
    RolloutAborted,
    RolloutCompleted,
    RolloutMember,
    RolloutRequested,
    RolloutRolledBack,
)
from shared.merge_patch import merge_patch

SOURCE = "planner"


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cluster_id: str
    serial: int
    config_hash: str  # the config the cluster was last built or updated to
    generation: int
    state: str = "REQUESTED"
    retiring: bool = False
    protected: bool = False
    rollout_id: str | None = None  # the rotation that created it
    updating_to: str | None = None  # config hash of an in-place update in flight


class PlannerState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    generation: int = 0
    document_hash: str | None = None
    location: Location | None = None
    cluster_type: str | None = None
    labels: dict[str, str] = {}
    spec: ClusterSpec | None = None
    update_strategy: UpdateStrategy | None = None
    count: int = 0
    config_hash: str | None = None
    deleted: bool = False
    protected: bool = False
    next_serial: int = 0
    members: dict[str, Member] = {}
    # Specs by config hash, for the hashes members are on: what an in-place update or a rotation diffs against.
    specs: dict[str, ClusterSpec] = {}
    # The rotation running on the set: while set, the planner neither scales nor updates in place.
    rollout_id: str | None = None
    # The control-plane pipeline (migration to HA, or upgrade) running on the set: like a rollout, it owns the set.
    pipeline_id: str | None = None
    # The fleet rollout whose patch made the current generation (reported back when the set converges).
    fleet_rollout_id: str | None = None
    converged: str | None = None  # "<generation>:<fleet rollout id>" last reported converged
    update_failed_generation: int | None = None

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if not m.retiring]


# Lower rank = less risky to retire (carries no or least workload).
_RETIRE_RANK = {"FAILED": 0, "REQUESTED": 1, "PROVISIONING": 2, "PROVISIONED": 3, "INSTALLING": 4,
                "UPDATING": 5, "READY": 6}  # fmt: skip


def document_hash(cs: ClusterSet) -> str:
    canonical = json.dumps(cs.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def retirement_order(state: PlannerState) -> list[Member]:
    """Alive unprotected members, lowest risk first: failed/not-ready before READY, outdated first, newest first."""
    return sorted(
        (m for m in state.alive() if not m.protected),
        key=lambda m: (_RETIRE_RANK.get(m.state, 0), m.config_hash == state.config_hash, -m.serial),
    )


# ---------------------------------------------------------------- evolve
def evolve(state: PlannerState | None, env: Envelope) -> PlannerState | None:
    """Fold one event into the state. Pure; applying the same event twice equals once."""
    payload = _payload(env)
    if payload is None:
        return state
    if isinstance(payload, ClusterSetAccepted):
        base = state or PlannerState(name=payload.clusterset)
        return _prune_specs(base.model_copy(update=dict(
            generation=max(base.generation, payload.generation), document_hash=payload.document_hash,
            location=payload.location, cluster_type=payload.cluster_type, spec=payload.spec,
            update_strategy=payload.update_strategy, count=payload.count, config_hash=payload.config_hash,
            deleted=False, protected=payload.protected, labels=dict(payload.labels),
            fleet_rollout_id=payload.fleet_rollout_id, specs={**base.specs, payload.config_hash: payload.spec},
        )))  # fmt: skip
    if state is None:
        return None
    match payload:
        case ClusterSetRetired():
            return state.model_copy(update={"deleted": True, "count": 0, "rollout_id": None})
        case ClusterRequested():
            if payload.cluster_id in state.members:
                return state
            added = Member(cluster_id=payload.cluster_id, serial=payload.serial, config_hash=payload.config_hash,
                           generation=payload.generation, rollout_id=payload.rollout_id)  # fmt: skip
            return state.model_copy(update={
                "members": {**state.members, added.cluster_id: added},
                "next_serial": max(state.next_serial, payload.serial + 1),
                "specs": {**state.specs, payload.config_hash: payload.spec},
            })  # fmt: skip
        case ClusterRetirementRequested():
            return _update_member(state, payload.cluster_id, retiring=True)
        case ClusterProtectionUpdated():
            return _update_member(state, payload.cluster_id, protected=payload.protected)
        case ClusterDeprovisioned():
            if payload.cluster_id not in state.members:
                return state
            return _prune_specs(state.model_copy(update={"members": {k: v for k, v in state.members.items()
                                                                     if k != payload.cluster_id}}))  # fmt: skip
        case ClusterUpdateRequested():
            member = state.members.get(payload.cluster_id)
            if member is None or member.config_hash == payload.config_hash:
                return state
            return _update_member(state, payload.cluster_id, updating_to=payload.config_hash, state="UPDATING")
        case ClusterReady():
            member = state.members.get(payload.cluster_id)
            if member is None:
                return state
            done = member.updating_to is None or member.updating_to == payload.config_hash
            return _update_member(state, payload.cluster_id, state="READY" if done else member.state,
                                  config_hash=payload.config_hash if done else member.config_hash,
                                  updating_to=None if done else member.updating_to)  # fmt: skip
        case RolloutRequested():
            return state.model_copy(update={"rollout_id": payload.rollout_id})
        case RolloutCompleted() | RolloutAborted() | RolloutRolledBack():
            update: dict[str, Any] = {"next_serial": max(state.next_serial, payload.next_serial)}
            if state.rollout_id == payload.rollout_id:
                update["rollout_id"] = None
            return state.model_copy(update=update)
        case ControlPlanePipelineRequested():
            return state.model_copy(update={"pipeline_id": payload.pipeline_id})
        case ControlPlanePipelineCompleted() | ControlPlanePipelineHalted():
            return state.model_copy(update={"pipeline_id": None}) if state.pipeline_id == payload.pipeline_id else state
        case ControlPlaneMigrationCompleted() | ControlPlaneUpgradeCompleted():
            # The cluster's control plane now matches that config (the other fields did not change).
            if not payload.config_hash:
                return state
            return _update_member(state, payload.cluster_id, config_hash=payload.config_hash)
        case ClusterSetConverged():
            return state.model_copy(update={"converged": _converged_marker(payload.generation,
                                                                           payload.fleet_rollout_id)})  # fmt: skip
        case ClusterSetUpdateFailed():
            return state.model_copy(update={"update_failed_generation": payload.generation})
        case ClusterProvisioned():
            return _update_member(state, payload.cluster_id, state="PROVISIONED")
        case ClusterProvisioningFailed() | ClusterInfraFailed():
            return _update_member(state, payload.cluster_id, state="FAILED")
    return state


def _converged_marker(generation: int, fleet_rollout_id: str | None) -> str:
    return f"{generation}:{fleet_rollout_id or ''}"


def _prune_specs(state: PlannerState) -> PlannerState:
    """Keep only the specs of the current config and of configs members are on (or updating to)."""
    used = {state.config_hash} | {m.config_hash for m in state.members.values()}
    used |= {m.updating_to for m in state.members.values() if m.updating_to}
    kept = {h: s for h, s in state.specs.items() if h in used}
    return state if kept == state.specs else state.model_copy(update={"specs": kept})


def _update_member(plan: PlannerState, cluster_id: str, **changes: Any) -> PlannerState:
    member = plan.members.get(cluster_id)
    if member is None:
        return plan
    updated = member.model_copy(update=changes)
    if updated == member:
        return plan
    return plan.model_copy(update={"members": {**plan.members, cluster_id: updated}})


def _payload(env: Envelope) -> Event | None:
    try:
        return decode_payload(env)
    except (KeyError, ValidationError):
        return None


# ---------------------------------------------------------------- decide
def decide(state: PlannerState | None, env: Envelope) -> list[Envelope]:
    """The events the planner emits for one incoming event, given the state before it."""
    if env.type == ClusterSetApplied.type_name():
        return _decide_apply(state, env.data.get("document"), env)
    if env.type == ClusterSetDeleted.type_name():
        return _decide_delete(state, env)
    if env.type == ClusterProtectionChanged.type_name():
        return _decide_protection(state, env)
    if env.type == ClusterSetPatchRequested.type_name():
        return _decide_patch(state, env)
    if env.type == ControlPlaneChangeRequested.type_name():
        return _decide_control_plane_change(state, env)
    # A lifecycle fact: it may let an in-place update move on, end a rollout or complete the set.
    after = evolve(state, env)
    if after is None or after == state or after.location is None:
        return []
    if env.type == RolloutRolledBack.type_name() and state is not None and state.rollout_id == env.data.get(
        "rollout_id"
    ):
        reverted = _revert(after, env)
        if reverted:
            return reverted
    if env.type in PIPELINE_ENDS and state is not None and state.pipeline_id == env.data.get("pipeline_id"):
        failed = _pipeline_failures(after, env)
        if failed:
            return [failed]
    return reconcile(after, env)


PIPELINE_ENDS = (ControlPlanePipelineCompleted.type_name(), ControlPlanePipelineHalted.type_name())


def _pipeline_failures(state: PlannerState, end: Envelope) -> Envelope | None:
    """A pipeline the spec started that ended with failed clusters: the set cannot converge on this
    generation, so say so once (a fleet rollout waiting on the set counts it failed)."""
    payload = decode_payload(end)
    assert isinstance(payload, ControlPlanePipelineCompleted | ControlPlanePipelineHalted)
    # Only clusters left off the set's config: a CLI-requested operation on a converged set changes no spec.
    failed = [state.members[c] for c in payload.failed
              if c in state.members and state.members[c].config_hash != state.config_hash]  # fmt: skip
    if not failed or state.update_failed_generation == state.generation:
        return None
    reason = getattr(payload, "reason", "") or "control-plane operations failed"
    ids = ", ".join(sorted(m.cluster_id for m in failed))
    return _update_failed(state, failed, end, reason=f"control-plane pipeline {payload.pipeline_id}: {reason} ({ids})")


def _revert(state: PlannerState, cause: Envelope) -> list[Envelope]:
    """After a rollback the set goes back to the config its clusters are on (a new generation says so),
    so that scaling does not bring back the config that was rolled back."""
    hashes = {m.config_hash for m in state.alive()}
    if len(hashes) != 1 or state.config_hash in hashes:
        return []
    old_spec = state.specs.get(next(iter(hashes)))
    if old_spec is None:
        return []
    document = current_document(state)
    document["spec"] = {**old_spec.model_dump(mode="json", by_alias=True), "count": document["spec"]["count"],
                        "updateStrategy": document["spec"]["updateStrategy"]}  # fmt: skip
    return _decide_apply(state, document, cause)


def _decide_apply(state: PlannerState | None, document: Any, env: Envelope,
                  fleet_rollout_id: str | None = None) -> list[Envelope]:  # fmt: skip
    cs, errors = validate_clusterset(document)
    live = state is not None and not state.deleted and state.location is not None
    if cs is not None and state is not None and live:
        errors = _immutable_field_errors(state, cs)
    if cs is None or errors:
        return [_rejected(env, document, errors, fleet_rollout_id)]
    doc_hash = document_hash(cs)
    same = state is not None and live and state.document_hash == doc_hash
    generation = state.generation if (same and state) else (state.generation + 1 if state else 1)
    spec = cs.spec.cluster_spec()
    changes = rules.diff(state.spec, spec) if state is not None and live and state.spec is not None else []
    path = "none" if not changes else ("rotation" if rules.needs_rotation(changes) else "in-place")
    accepted = new_event(ClusterSetAccepted(
        clusterset=cs.metadata.name, location=cs.metadata.location, generation=generation,
        cluster_type=cs.metadata.cluster_type, count=cs.spec.count, config_hash=spec.config_hash(),
        spec=spec, update_strategy=cs.spec.update_strategy, document_hash=doc_hash,
        protected=cs.metadata.protected, labels=dict(cs.metadata.labels), update_path=path,  # type: ignore[arg-type]
        changes=rules.fields(changes), fleet_rollout_id=fleet_rollout_id,
    ), source=SOURCE, cause=env)  # fmt: skip
    refusals = _update_refusals(state, changes, cs) if state is not None and live else []
    after = evolve(state, accepted)
    assert after is not None
    refusal = None if after.rollout_id else _protection_refusal(after)
    refusals += [refusal] if refusal else []
    if refusals:
        return [_rejected(env, document, refusals, fleet_rollout_id)]
    return [accepted, *_start_rotation(after, env), *_start_control_plane(after, changes, env), *reconcile(after, env)]


def _update_refusals(state: PlannerState, changes: list[rules.Change], cs: ClusterSet) -> list[FieldError]:
    """Spec changes the planner will not start: one error per field, all at once."""
    if not changes:
        return []
    if state.rollout_id:
        return [FieldError(field=f"spec.{c.field}", message=(
            f"rollout {state.rollout_id} is running on this ClusterSet; let it finish, or abort or roll it back "
            "(flotilla rollout abort|rollback) before changing the spec")) for c in changes]  # fmt: skip
    if state.pipeline_id:
        return [FieldError(field=f"spec.{c.field}", message=(
            f"control-plane pipeline {state.pipeline_id} is running on this ClusterSet; change the spec once it "
            "has finished")) for c in changes]  # fmt: skip
    control = [c for c in changes if c.kind == "control-plane"]
    if control and len(control) != len(changes):
        return [FieldError(field=f"spec.{c.field}", message=(
            "a control-plane change (controlPlane.ha, or the version of a self-managed control plane) goes on "
            "its own: apply it first, then the other changes")) for c in changes if c.kind != "control-plane"]
    if any(c.field == "controlPlane.ha" for c in control) and not cs.spec.control_plane.ha:
        return [FieldError(field="spec.controlPlane.ha", message=(
            "going back from three control-plane nodes to one is not supported"))]
    rotation = [c for c in changes if c.kind == "rotation"]
    if rotation and cs.spec.update_strategy.type == "in-place":
        return [FieldError(field=f"spec.{c.field}", message=(
            f"changing it replaces clusters ({c.rule.why}), but updateStrategy.type is in-place; "
            "use updateStrategy.type: cluster-rotation to roll it out")) for c in rotation]  # fmt: skip
    if rotation:
        protected = sorted(m.cluster_id for m in state.alive() if m.protected)
        if cs.metadata.protected or protected:
            what = "the ClusterSet is protected" if cs.metadata.protected else f"protected: {', '.join(protected)}"
            return [FieldError(field=f"spec.{rotation[0].field}", message=(
                f"a rotation would retire protected clusters ({what}); remove the protection first"))]  # fmt: skip
    return []


def _decide_patch(state: PlannerState | None, env: Envelope) -> list[Envelope]:
    """A fleet rollout's patch: the set's current document with the patch merged into its spec."""
    payload = _payload(env)
    assert isinstance(payload, ClusterSetPatchRequested)
    if state is None or state.deleted or state.location is None or state.spec is None:
        error = FieldError(field="clusterset", message=f"ClusterSet {payload.clusterset} does not exist (any more)")
        return [new_event(ClusterSetRejected(clusterset=payload.clusterset, cloud=payload.location.cloud,
                                             region=payload.location.region, errors=[error],
                                             fleet_rollout_id=payload.fleet_rollout_id),
                          source=SOURCE, cause=env)]  # fmt: skip
    document = current_document(state)
    document["spec"] = merge_patch(document["spec"], payload.patch)
    return _decide_apply(state, document, env, fleet_rollout_id=payload.fleet_rollout_id)


def current_document(state: PlannerState) -> dict[str, Any]:
    """The ClusterSet document the state was accepted from (what a patch applies to)."""
    assert state.location and state.spec and state.update_strategy and state.cluster_type
    return clusterset_document(name=state.name, location=state.location, cluster_type=state.cluster_type,
                               labels=state.labels, protected=state.protected, spec=state.spec, count=state.count,
                               update_strategy=state.update_strategy)  # fmt: skip


def _protection_refusal(after: PlannerState) -> FieldError | None:
    """A scale-down that would have to retire a protected cluster is refused, not partly applied."""
    excess = len(after.alive()) - after.count
    if excess <= 0:
        return None
    if after.protected:
        return FieldError(field="spec.count", message=(
            f"would retire {excess} cluster(s) of a protected ClusterSet; apply it with "
            "metadata.protected: false first"))  # fmt: skip
    retirable = len(retirement_order(after))
    if retirable < excess:
        protected = sorted(m.cluster_id for m in after.alive() if m.protected)
        return FieldError(field="spec.count", message=(
            f"would retire {excess} cluster(s) but only {retirable} are not protected (protected: "
            f"{', '.join(protected)})"))  # fmt: skip
    return None


def _immutable_field_errors(state: PlannerState, cs: ClusterSet) -> list[FieldError]:
    errors = []
    if state.location != cs.metadata.location:
        errors.append(FieldError(field="metadata.location",
                                 message="cannot change for an existing ClusterSet; delete it and apply a new one"))
    if state.cluster_type != cs.metadata.cluster_type:
        errors.append(FieldError(field="metadata.clusterType",
                                 message="cannot change for an existing ClusterSet; delete it and apply a new one"))
    return errors


def _rejected(env: Envelope, document: Any, errors: list[FieldError], fleet_rollout_id: str | None = None
              ) -> Envelope:  # fmt: skip
    raw_meta = document.get("metadata") if isinstance(document, dict) else None
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    raw_loc = meta.get("location")
    loc: dict[str, Any] = raw_loc if isinstance(raw_loc, dict) else {}
    as_str = lambda v: v if isinstance(v, str) else None  # noqa: E731
    return new_event(ClusterSetRejected(
        clusterset=as_str(meta.get("name")), cloud=as_str(loc.get("cloud")), region=as_str(loc.get("region")),
        errors=errors, fleet_rollout_id=fleet_rollout_id,
    ), source=SOURCE, cause=env)  # fmt: skip


def _decide_delete(state: PlannerState | None, env: Envelope) -> list[Envelope]:
    if state is None or state.deleted or state.location is None:
        return []
    alive = sorted(state.alive(), key=lambda m: m.serial)
    refusal: FieldError | None = None
    if state.protected:
        refusal = FieldError(field="metadata.protected", message=(
            "the ClusterSet is protected; apply it with metadata.protected: false before deleting it"))  # fmt: skip
    elif any(m.protected for m in alive):
        refusal = FieldError(field="clusters", message="protected clusters would be deleted: "
                             + ", ".join(m.cluster_id for m in alive if m.protected))  # fmt: skip
    if refusal:
        return [_set_rejected(state, env, [refusal])]
    retired = new_event(ClusterSetRetired(
        clusterset=state.name, location=state.location, generation=state.generation,
        clusters=[m.cluster_id for m in alive],
    ), source=SOURCE, cause=env)  # fmt: skip
    return [retired, *(_retire(state, m, env, "clusterset-deleted") for m in alive)]


def _decide_protection(state: PlannerState | None, env: Envelope) -> list[Envelope]:
    payload = _payload(env)
    assert isinstance(payload, ClusterProtectionChanged)
    member = state.members.get(payload.cluster_id) if state else None
    if state is None or state.location is None or member is None or member.retiring:
        error = FieldError(field="clusterId", message=f"{payload.cluster_id} is not a live cluster of "
                           f"ClusterSet {payload.clusterset}")  # fmt: skip
        return [new_event(ClusterSetRejected(clusterset=payload.clusterset, errors=[error]), source=SOURCE, cause=env)]
    # Answered even when nothing changes, so whoever asked gets a confirmation.
    return [new_event(ClusterProtectionUpdated(
        cluster_id=member.cluster_id, clusterset=state.name, location=state.location, protected=payload.protected,
    ), source=SOURCE, cause=env)]  # fmt: skip


def _set_rejected(state: PlannerState, env: Envelope, errors: list[FieldError]) -> Envelope:
    assert state.location
    return new_event(ClusterSetRejected(clusterset=state.name, cloud=state.location.cloud,
                                        region=state.location.region, errors=errors), source=SOURCE, cause=env)


def reconcile(state: PlannerState, cause: Envelope) -> list[Envelope]:
    """What brings the set towards its spec now: scaling, in-place updates, or reporting it converged.

    While a rotation runs, it owns the membership: nothing here (a count change waits for its end)."""
    if state.rollout_id or state.pipeline_id or state.location is None:
        return []
    alive = state.alive()
    if len(alive) < state.count:
        return [_request(state, state.next_serial + i, cause) for i in range(state.count - len(alive))]
    if len(alive) > state.count:
        victims = retirement_order(state)[: len(alive) - state.count]
        return [_retire(state, m, cause, "scale-down") for m in victims]
    return _in_place_updates(state, cause) or _convergence(state, cause)


def _changes_to_target(state: PlannerState, member: Member) -> list[rules.Change] | None:
    """The rule-table changes from a member's config to the set's; None when its spec is unknown."""
    old = state.specs.get(member.config_hash)
    if old is None or state.spec is None:
        return None
    return rules.diff(old, state.spec)


def _in_place_updates(state: PlannerState, cause: Envelope) -> list[Envelope]:
    """ClusterUpdateRequested for READY clusters whose config differs only in place: at most maxUnavailable
    (at least one) updating at once; a cluster that fails while updating stops the update of this generation."""
    if state.deleted or state.update_strategy is None or state.config_hash is None:
        return []
    alive = sorted(state.alive(), key=lambda m: m.serial)
    updating = [m for m in alive if m.updating_to is not None]
    failed = [m for m in updating if m.state == "FAILED"]
    if failed:
        if state.update_failed_generation == state.generation:
            return []
        return [_update_failed(state, failed, cause)]
    if state.update_failed_generation == state.generation:
        return []
    budget = max(1, state.update_strategy.max_unavailable) - len(updating)
    out: list[Envelope] = []
    for member in alive:
        if budget <= 0:
            break
        if member.state != "READY" or member.updating_to or member.config_hash == state.config_hash:
            continue
        changes = _changes_to_target(state, member)
        if not changes or any(c.kind != "in-place" for c in changes):
            continue  # needs a rotation (or a control-plane migration), not an in-place update
        out.append(_update(state, member, changes, cause))
        budget -= 1
    return out


def _convergence(state: PlannerState, cause: Envelope) -> list[Envelope]:
    """ClusterSetConverged once per generation (and fleet rollout): every live cluster READY on the set's config."""
    if state.deleted or state.config_hash is None or state.location is None:
        return []
    marker = _converged_marker(state.generation, state.fleet_rollout_id)
    alive = state.alive()
    # Retired clusters count until they are gone: a rollout or scale-down is over when they are deleted.
    if state.converged == marker or len(alive) != state.count or len(alive) != len(state.members):
        return []
    if any(m.state != "READY" or m.config_hash != state.config_hash or m.updating_to for m in alive):
        return []
    return [new_event(ClusterSetConverged(
        clusterset=state.name, location=state.location, generation=state.generation, config_hash=state.config_hash,
        count=state.count, fleet_rollout_id=state.fleet_rollout_id,
    ), source=SOURCE, cause=cause, discriminator=marker)]  # fmt: skip


def _start_rotation(state: PlannerState, cause: Envelope) -> list[Envelope]:
    """RolloutRequested when live clusters differ from the set's config in a way only a rotation can change."""
    if (state.rollout_id or state.deleted or state.location is None or state.spec is None
            or state.update_strategy is None or state.update_strategy.type != "cluster-rotation"):  # fmt: skip
        return []
    alive = sorted(state.alive(), key=lambda m: m.serial)
    outdated: list[Member] = []
    changed: list[str] = []
    for member in alive:
        changes = _changes_to_target(state, member)
        if changes is not None and rules.needs_rotation(changes):
            outdated.append(member)
            changed += [c.field for c in changes if c.field not in changed]
    if not outdated or any(m.protected for m in alive) or state.protected:
        return []
    assert state.config_hash and state.cluster_type
    rollout_id = f"{state.name}-g{state.generation}-{derive_id(cause.id, 'rollout', state.name)[:4]}"
    rollout = new_event(RolloutRequested(
        clusterset=state.name, location=state.location, rollout_id=rollout_id, generation=state.generation,
        from_config_hashes=sorted({m.config_hash for m in outdated}), to_config_hash=state.config_hash,
        cluster_type=state.cluster_type, spec=state.spec, update_strategy=state.update_strategy, count=state.count,
        serial_base=state.next_serial, changes=changed, fleet_rollout_id=state.fleet_rollout_id,
        members=[RolloutMember(cluster_id=m.cluster_id, serial=m.serial, config_hash=m.config_hash, state=m.state,
                               protected=m.protected) for m in alive],
    ), source=SOURCE, cause=cause)  # fmt: skip
    return [rollout]


def _start_control_plane(state: PlannerState, changes: list[rules.Change], cause: Envelope) -> list[Envelope]:
    """A control-plane change becomes a pipeline over the set's live clusters (etcd_migration runs it)."""
    operation = rules.control_plane_operation(changes)
    if operation is None or state.deleted or state.location is None or state.spec is None:
        return []
    members = sorted(state.alive(), key=lambda m: m.serial)
    return [_pipeline(state, operation, members, cause, config_hash=state.config_hash)] if members else []


def _pipeline(state: PlannerState, operation: str, members: list[Member], cause: Envelope, config_hash: str | None,
              concurrency: int | None = None, failure_budget: int = 0, to_version: str | None = None
              ) -> Envelope:  # fmt: skip
    assert state.location and state.spec and state.update_strategy
    pipeline_id = f"{state.name}-cp{state.generation}-{derive_id(cause.id, 'pipeline', state.name)[:4]}"
    return new_event(ControlPlanePipelineRequested(
        clusterset=state.name, location=state.location, pipeline_id=pipeline_id,
        operation=operation,  # type: ignore[arg-type]
        clusters=[PipelineCluster(cluster_id=m.cluster_id, clusterset=state.name, location=state.location)
                  for m in members],
        to_version=(to_version or state.spec.kubernetes_version) if operation == "upgrade" else None,
        kubernetes_version=state.spec.kubernetes_version, config_hash=config_hash,
        concurrency=concurrency or max(1, state.update_strategy.max_unavailable), failure_budget=failure_budget,
    ), source=SOURCE, cause=cause)  # fmt: skip


def _decide_control_plane_change(state: PlannerState | None, env: Envelope) -> list[Envelope]:
    """An operator's request for some clusters of a set (CLI): checked here, run as a pipeline."""
    payload = _payload(env)
    assert isinstance(payload, ControlPlaneChangeRequested)
    errors: list[FieldError] = []
    if state is None or state.deleted or state.location is None or state.spec is None:
        errors.append(FieldError(field="clusterset", message=f"ClusterSet {payload.clusterset} does not exist"))
    else:
        if state.spec.control_plane.mode != "self-managed":
            errors.append(FieldError(field="operation", message="only self-managed control planes are operated on"))
        behind = [m for m in state.alive() if m.config_hash != state.config_hash
                  and (not payload.cluster_ids or m.cluster_id in payload.cluster_ids)]  # fmt: skip
        if payload.operation == "migrate" and state.spec.control_plane.ha and not behind:
            errors.append(FieldError(field="operation", message="the set's control planes are HA already"))
        if payload.operation == "upgrade" and not payload.to_version:
            errors.append(FieldError(field="toVersion", message="an upgrade needs the version to go to"))
        unknown = [c for c in payload.cluster_ids if c not in {m.cluster_id for m in state.alive()}]
        if unknown:
            errors.append(FieldError(field="clusterIds", message=f"not live clusters of the set: {', '.join(unknown)}"))
        if state.rollout_id or state.pipeline_id:
            errors.append(FieldError(field="clusterset", message="a rollout or pipeline is running on the set"))
    if errors:
        cloud, region = (state.location.cloud, state.location.region) if state and state.location else (None, None)
        return [new_event(ClusterSetRejected(clusterset=payload.clusterset, cloud=cloud, region=region,
                                             errors=errors), source=SOURCE, cause=env)]  # fmt: skip
    assert state is not None and state.spec is not None
    chosen = set(payload.cluster_ids)
    members = [m for m in sorted(state.alive(), key=lambda m: m.serial) if not chosen or m.cluster_id in chosen]
    # Finishing what the spec asked for (after a halted pipeline): done clusters reach the set's config, and
    # the set converges. Otherwise (ahead of the spec) the clusters keep the config they are on.
    to_spec = ((payload.operation == "migrate" and state.spec.control_plane.ha)
               or (payload.operation == "upgrade" and payload.to_version == state.spec.kubernetes_version))  # fmt: skip
    return [_pipeline(state, payload.operation, members, env, config_hash=state.config_hash if to_spec else None,
                      concurrency=payload.concurrency, failure_budget=payload.failure_budget,
                      to_version=payload.to_version)]  # fmt: skip


def _update(state: PlannerState, member: Member, changes: list[rules.Change], cause: Envelope) -> Envelope:
    assert state.location and state.spec and state.config_hash
    return new_event(ClusterUpdateRequested(
        cluster_id=member.cluster_id, clusterset=state.name, location=state.location, generation=state.generation,
        config_hash=state.config_hash, spec=state.spec, changes=rules.fields(changes),
    ), source=SOURCE, cause=cause, discriminator=f"{member.cluster_id}:{state.config_hash}")  # fmt: skip


def _update_failed(state: PlannerState, failed: list[Member], cause: Envelope, reason: str = "") -> Envelope:
    assert state.location and state.config_hash
    ids = sorted(m.cluster_id for m in failed)
    return new_event(ClusterSetUpdateFailed(
        clusterset=state.name, location=state.location, generation=state.generation, config_hash=state.config_hash,
        cluster_ids=ids, reason=reason or f"cluster(s) failed while being updated in place: {', '.join(ids)}",
        fleet_rollout_id=state.fleet_rollout_id,
    ), source=SOURCE, cause=cause, discriminator=str(state.generation))  # fmt: skip


def _request(state: PlannerState, serial: int, cause: Envelope) -> Envelope:
    assert state.location and state.spec and state.config_hash and state.cluster_type
    cluster_id = cluster_id_for(state.name, serial)
    return new_event(ClusterRequested(
        cluster_id=cluster_id, clusterset=state.name, location=state.location, serial=serial,
        cluster_type=state.cluster_type, generation=state.generation, config_hash=state.config_hash,
        spec=state.spec,
    ), source=SOURCE, cause=cause, discriminator=cluster_id)  # fmt: skip


def _retire(state: PlannerState, member: Member, cause: Envelope, reason: str) -> Envelope:
    assert state.location
    return new_event(ClusterRetirementRequested(
        cluster_id=member.cluster_id, clusterset=state.name, location=state.location,
        reason=reason,  # type: ignore[arg-type]
    ), source=SOURCE, cause=cause, discriminator=member.cluster_id)  # fmt: skip


def handle(state: PlannerState | None, env: Envelope) -> tuple[PlannerState | None, list[Envelope]]:
    """decide, then fold the input and every emitted event into the state."""
    return decide_and_evolve(decide, evolve, state, env)
