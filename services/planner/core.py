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
from shared.events.clusterset import ClusterSet, UpdateStrategy
from shared.events.models import Event

SOURCE = "planner"


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cluster_id: str
    serial: int
    config_hash: str
    generation: int
    state: str = "REQUESTED"
    retiring: bool = False
    protected: bool = False


class PlannerState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    generation: int = 0
    document_hash: str | None = None
    location: Location | None = None
    cluster_type: str | None = None
    spec: ClusterSpec | None = None
    update_strategy: UpdateStrategy | None = None
    count: int = 0
    config_hash: str | None = None
    deleted: bool = False
    protected: bool = False
    next_serial: int = 0
    members: dict[str, Member] = {}

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if not m.retiring]


# Lower rank = less risky to retire (carries no or least workload).
_RETIRE_RANK = {"FAILED": 0, "REQUESTED": 1, "PROVISIONING": 2, "PROVISIONED": 3, "INSTALLING": 4,
                "UPDATING": 5, "READY": 6}  # fmt: skip


def cluster_id_for(name: str, serial: int) -> str:
    """Stable id: the set name plus a short suffix that is a bijection of the serial (no collisions)."""
    if serial < 0x10000:
        suffix = format((serial * 0x9E37 + 0x7F3A) % 0x10000, "04x")
    else:
        suffix = format(serial, "x")
    return f"{name}-{suffix}"


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
        return base.model_copy(update=dict(
            generation=max(base.generation, payload.generation), document_hash=payload.document_hash,
            location=payload.location, cluster_type=payload.cluster_type, spec=payload.spec,
            update_strategy=payload.update_strategy, count=payload.count, config_hash=payload.config_hash,
            deleted=False, protected=payload.protected,
        ))  # fmt: skip
    if state is None:
        return None
    if isinstance(payload, ClusterSetRetired):
        return state.model_copy(update={"deleted": True, "count": 0})
    if isinstance(payload, ClusterRequested):
        if payload.cluster_id in state.members:
            return state
        member = Member(cluster_id=payload.cluster_id, serial=payload.serial, config_hash=payload.config_hash,
                        generation=payload.generation)  # fmt: skip
        return state.model_copy(update={
            "members": {**state.members, member.cluster_id: member},
            "next_serial": max(state.next_serial, payload.serial + 1),
        })  # fmt: skip
    if isinstance(payload, ClusterRetirementRequested):
        return _update_member(state, payload.cluster_id, retiring=True)
    if isinstance(payload, ClusterProtectionUpdated):
        return _update_member(state, payload.cluster_id, protected=payload.protected)
    if isinstance(payload, ClusterDeprovisioned):
        if payload.cluster_id not in state.members:
            return state
        return state.model_copy(update={"members": {k: v for k, v in state.members.items()
                                                    if k != payload.cluster_id}})  # fmt: skip
    fact_state = {ClusterProvisioned: "PROVISIONED", ClusterReady: "READY", ClusterProvisioningFailed: "FAILED",
                  ClusterInfraFailed: "FAILED"}.get(type(payload))  # fmt: skip
    if fact_state:
        return _update_member(state, payload.cluster_id, state=fact_state)  # type: ignore[attr-defined]
    return state


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
        return _decide_apply(state, env)
    if env.type == ClusterSetDeleted.type_name():
        return _decide_delete(state, env)
    if env.type == ClusterProtectionChanged.type_name():
        return _decide_protection(state, env)
    return []  # lifecycle facts only update membership


def _decide_apply(state: PlannerState | None, env: Envelope) -> list[Envelope]:
    document = env.data.get("document")
    cs, errors = validate_clusterset(document)
    if cs is not None and state is not None and not state.deleted and state.location is not None:
        errors = _immutable_field_errors(state, cs)
    if cs is None or errors:
        return [_rejected(env, document, errors)]
    doc_hash = document_hash(cs)
    same = state is not None and not state.deleted and state.document_hash == doc_hash
    generation = state.generation if (same and state) else (state.generation + 1 if state else 1)
    spec = cs.spec.cluster_spec()
    accepted = new_event(ClusterSetAccepted(
        clusterset=cs.metadata.name, location=cs.metadata.location, generation=generation,
        cluster_type=cs.metadata.cluster_type, count=cs.spec.count, config_hash=spec.config_hash(),
        spec=spec, update_strategy=cs.spec.update_strategy, document_hash=doc_hash,
        protected=cs.metadata.protected,
    ), source=SOURCE, cause=env)  # fmt: skip
    after = evolve(state, accepted)
    assert after is not None
    refusal = _protection_refusal(after)
    if refusal:
        return [_rejected(env, document, [refusal])]
    return [accepted, *reconcile(after, env)]


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


def _rejected(env: Envelope, document: Any, errors: list[FieldError]) -> Envelope:
    raw_meta = document.get("metadata") if isinstance(document, dict) else None
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    raw_loc = meta.get("location")
    loc: dict[str, Any] = raw_loc if isinstance(raw_loc, dict) else {}
    as_str = lambda v: v if isinstance(v, str) else None  # noqa: E731
    return new_event(ClusterSetRejected(
        clusterset=as_str(meta.get("name")), cloud=as_str(loc.get("cloud")), region=as_str(loc.get("region")),
        errors=errors,
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
    """Requests or retirements that bring the alive membership to `count`."""
    alive = state.alive()
    if len(alive) < state.count:
        return [_request(state, state.next_serial + i, cause) for i in range(state.count - len(alive))]
    if len(alive) > state.count:
        victims = retirement_order(state)[: len(alive) - state.count]
        return [_retire(state, m, cause, "scale-down") for m in victims]
    return []


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
    events = decide(state, env)
    new_state = evolve(state, env)
    for e in events:
        new_state = evolve(new_state, e)
    return new_state, events
