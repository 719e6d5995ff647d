"""Rotation of one ClusterSet: replace its clusters in batches. Pure decide/evolve, no I/O.

Aggregate: the ClusterSet. A rollout (from the planner's `RolloutRequested`) moves the set from
the clusters it has to `count` clusters on the new config, like a Deployment's rolling update
but with whole clusters:

    create up to maxSurge new clusters -> wait until READY -> drain as many old ones as the
    READY floor allows -> retire each once drained -> repeat until no old cluster is left.

Invariants at every instant (counted from the lifecycle facts this core folds in):
- READY clusters (not draining) never drop below `count - maxUnavailable`: a drain starts
  only when the READY count above the floor pays for it;
- clusters that exist (anything not yet deprovisioned, draining and deleting ones included)
  never exceed `count + maxSurge`: a new cluster is requested only when one is gone.

Old clusters go least healthy first (failed, still provisioning), then oldest. A new cluster
that fails pauses the rollout (or rolls it back, per `updateStrategy.onFailure`); a drain that
times out pauses it. Draining and retiring start only inside the set's maintenance windows.
Every emitted event is derived from its cause, so re-handling a message re-emits the same ids,
and every decision is a function of the folded state: a restarted service continues exactly
where the state says, creating and retiring nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from services.rotation.windows import is_open, next_opening
from shared.cluster_ids import cluster_id_for
from shared.decider import decide_and_evolve
from shared.events import Envelope, decode_payload, new_event
from shared.events.clusterset import ClusterSpec, Location, UpdateStrategy
from shared.events.models import (
    ClusterDeprovisioned,
    ClusterDrained,
    ClusterDrainRequested,
    ClusterEvent,
    ClusterInfraFailed,
    ClusterProvisioned,
    ClusterProvisioningFailed,
    ClusterReady,
    ClusterRequested,
    ClusterRetirementRequested,
    ClusterSetRetired,
    ClusterUncordoned,
    ClusterUncordonRequested,
    Event,
    RolloutAborted,
    RolloutCompleted,
    RolloutControlRequested,
    RolloutEvent,
    RolloutPaused,
    RolloutProgressed,
    RolloutRequested,
    RolloutResumed,
    RolloutRolledBack,
    RolloutRollingBack,
    RolloutStarted,
    RolloutWaiting,
)

SOURCE = "rotation"

MemberState = Literal["REQUESTED", "PROVISIONED", "READY", "FAILED", "DRAINING", "DRAINED", "RETIRING", "DELETED"]


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cluster_id: str
    serial: int
    config_hash: str
    state: MemberState = "REQUESTED"
    protected: bool = False
    created_by: str | None = None  # the rollout that requested it
    drain_timed_out: bool = False

    @property
    def exists(self) -> bool:
        return self.state != "DELETED"

    @property
    def leaving(self) -> bool:
        """Retired or on its way out (draining): not counted as serving any more."""
        return self.state in ("DRAINING", "DRAINED", "RETIRING", "DELETED")


class Run(BaseModel):
    """One rollout of the set."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rollout_id: str
    fleet_rollout_id: str | None = None
    generation: int
    to_config_hash: str
    cluster_type: str
    spec: ClusterSpec
    strategy: UpdateStrategy
    count: int
    mode: Literal["running", "paused", "rolling-back"] = "running"
    pause_reason: str | None = None
    failed_clusters: list[str] = []
    batch: int = 0
    replaced: int = 0
    waiting_until: datetime | None = None  # reported RolloutWaiting for the window opening at this time


class RotationState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    clusterset: str
    location: Location
    members: dict[str, Member] = {}
    next_serial: int = 0
    run: Run | None = None
    finished: list[str] = []  # rollout ids that ended (a late duplicate request does not restart one)

    def existing(self) -> list[Member]:
        return [m for m in self.members.values() if m.exists]


# ---------------------------------------------------------------- evolve
def _payload(env: Envelope) -> Event | None:
    try:
        return decode_payload(env)
    except (KeyError, ValidationError):
        return None


def _set_member(rs: RotationState, cluster_id: str, **changes: Any) -> RotationState:
    member = rs.members.get(cluster_id)
    if member is None:
        return rs
    updated = member.model_copy(update=changes)
    return rs if updated == member else rs.model_copy(update={"members": {**rs.members, cluster_id: updated}})


def _set_run(state: RotationState, **changes: Any) -> RotationState:
    assert state.run is not None
    return state.model_copy(update={"run": state.run.model_copy(update=changes)})


def _end(state: RotationState) -> RotationState:
    assert state.run is not None
    members = {k: m for k, m in state.members.items() if m.exists}  # the deleted ones matter no more
    return state.model_copy(update={"run": None, "members": members,
                                    "finished": [*state.finished, state.run.rollout_id][-50:]})  # fmt: skip


# Facts never move a member backwards (a late ClusterReady does not undo a drain or a retirement).
_ORDER = {"REQUESTED": 0, "PROVISIONED": 1, "READY": 2, "FAILED": 2, "DRAINING": 3, "DRAINED": 4, "RETIRING": 5,
          "DELETED": 6}  # fmt: skip


def _advance(rs: RotationState, cluster_id: str, to: MemberState, **changes: Any) -> RotationState:
    member = rs.members.get(cluster_id)
    if member is None or _ORDER[to] < _ORDER[member.state]:
        return rs
    return _set_member(rs, cluster_id, state=to, **changes)


def evolve(state: RotationState | None, env: Envelope) -> RotationState | None:
    """Fold one event in. Pure and idempotent. Facts about sets without a rollout are not kept."""
    p = _payload(env)
    if p is None:
        return state
    if isinstance(p, RolloutRequested):
        return _start(state, p)
    if state is None:
        return None
    match p:
        case ClusterRequested():
            if p.cluster_id in state.members:
                return state
            added = Member(cluster_id=p.cluster_id, serial=p.serial, config_hash=p.config_hash,
                           created_by=p.rollout_id)  # fmt: skip
            return state.model_copy(update={"members": {**state.members, p.cluster_id: added},
                                            "next_serial": max(state.next_serial, p.serial + 1)})  # fmt: skip
        case ClusterProvisioned():
            return _advance(state, p.cluster_id, "PROVISIONED")
        case ClusterReady():
            member = state.members.get(p.cluster_id)
            if member is None:
                return state
            return _advance(state, p.cluster_id, "READY", config_hash=p.config_hash)
        case ClusterProvisioningFailed() | ClusterInfraFailed():
            member = state.members.get(p.cluster_id)
            if member is None or member.leaving:
                return state  # a failure while being deleted is the provisioner's to retry
            return _set_member(state, p.cluster_id, state="FAILED")
        case ClusterDrainRequested():
            return _advance(state, p.cluster_id, "DRAINING")
        case ClusterDrained():
            return _advance(state, p.cluster_id, "DRAINED", drain_timed_out=p.timed_out)
        case ClusterUncordonRequested() | ClusterUncordoned():
            # Kept after all (a rollback): serving again. The one way a member moves back.
            member = state.members.get(p.cluster_id)
            if member is None or member.state not in ("DRAINING", "DRAINED"):
                return state
            return _set_member(state, p.cluster_id, state="READY", drain_timed_out=False)
        case ClusterRetirementRequested():
            return _advance(state, p.cluster_id, "RETIRING")
        case ClusterDeprovisioned():
            # Gone for good (ids are never reused): forgetting it keeps the state small; later facts are ignored.
            if p.cluster_id not in state.members:
                return state
            return state.model_copy(update={"members": {k: m for k, m in state.members.items() if k != p.cluster_id}})
        case RolloutStarted():
            return state
        case RolloutProgressed():
            if state.run is None or state.run.rollout_id != p.rollout_id:
                return state
            return _set_run(state, replaced=max(state.run.replaced, p.replaced), batch=max(state.run.batch, p.batch))
        case RolloutWaiting():
            if state.run is None or state.run.rollout_id != p.rollout_id:
                return state
            return _set_run(state, waiting_until=p.until)
        case RolloutPaused():
            if state.run is None or state.run.rollout_id != p.rollout_id or state.run.mode == "rolling-back":
                return state
            return _set_run(state, mode="paused", pause_reason=p.reason, failed_clusters=list(p.cluster_ids))
        case RolloutRollingBack():
            if state.run is None or state.run.rollout_id != p.rollout_id:
                return state
            return _set_run(state, mode="rolling-back", pause_reason=p.reason)
        case RolloutResumed():
            if state.run is None or state.run.rollout_id != p.rollout_id or state.run.mode != "paused":
                return state
            return _set_run(state, mode="running", pause_reason=None, failed_clusters=[], waiting_until=None)
        case RolloutControlRequested():
            return state
        case RolloutCompleted() | RolloutAborted() | RolloutRolledBack():
            if state.run is None or state.run.rollout_id != p.rollout_id:
                return state
            return _end(state)
        case ClusterSetRetired():
            return state
    return state


def _start(state: RotationState | None, p: RolloutRequested) -> RotationState:
    base = state or RotationState(clusterset=p.clusterset, location=p.location)
    if p.rollout_id in base.finished or (base.run is not None and base.run.rollout_id == p.rollout_id):
        return base
    members = dict(base.members)
    for m in p.members:
        # The planner's snapshot fills in what this service has not seen; its own facts are newer.
        if m.cluster_id not in members:
            state_: MemberState = m.state if m.state in _ORDER else "REQUESTED"  # type: ignore[assignment]
            members[m.cluster_id] = Member(cluster_id=m.cluster_id, serial=m.serial, config_hash=m.config_hash,
                                           state=state_, protected=m.protected)  # fmt: skip
    run = Run(rollout_id=p.rollout_id, fleet_rollout_id=p.fleet_rollout_id, generation=p.generation,
              to_config_hash=p.to_config_hash, cluster_type=p.cluster_type, spec=p.spec, strategy=p.update_strategy,
              count=p.count)  # fmt: skip
    serial = max([base.next_serial, p.serial_base, *(m.serial + 1 for m in members.values())])
    return base.model_copy(update={"members": members, "run": run, "next_serial": serial})


# ---------------------------------------------------------------- decide
def decide(state: RotationState | None, env: Envelope) -> list[Envelope]:
    """The events for one incoming event, given the state before it."""
    p = _payload(env)
    if p is None:
        return []
    after = evolve(state, env)
    if after is None:
        return []
    out: list[Envelope] = []
    if isinstance(p, RolloutRequested) and after.run is not None and after.run.rollout_id == p.rollout_id and (
        state is None or state.run is None or state.run.rollout_id != p.rollout_id
    ):
        out.append(_emit(after, RolloutStarted, env, to_config_hash=p.to_config_hash, count=p.count,
                         outdated=sorted(m.cluster_id for m in Tally.of(after).old)))  # fmt: skip
    elif isinstance(p, RolloutControlRequested):
        out += _control(after, p, env)
    elif isinstance(p, ClusterSetRetired):
        out += _set_deleted(after, p, env)
    if after.run is None:
        return out
    for e in out:
        after = evolve(after, e) or after
    return out + step(after, env)


def handle(state: RotationState | None, env: Envelope) -> tuple[RotationState | None, list[Envelope]]:
    """decide, then fold the input and every emitted event into the state."""
    return decide_and_evolve(decide, evolve, state, env)


def _emit(state: RotationState, cls: type[RolloutEvent], cause: Envelope, discriminator: str = "",
          **fields: Any) -> Envelope:  # fmt: skip
    assert state.run is not None
    payload = cls(clusterset=state.clusterset, location=state.location, rollout_id=state.run.rollout_id,
                  fleet_rollout_id=state.run.fleet_rollout_id, **fields)  # fmt: skip
    return new_event(payload, source=SOURCE, cause=cause, discriminator=discriminator)


def _cluster_event(state: RotationState, cls: type[ClusterEvent], cluster_id: str, cause: Envelope, **fields: Any
                   ) -> Envelope:  # fmt: skip
    payload = cls(cluster_id=cluster_id, clusterset=state.clusterset, location=state.location, **fields)
    return new_event(payload, source=SOURCE, cause=cause, discriminator=cluster_id)


@dataclass(frozen=True)
class Tally:
    """The set as the rollout sees it, counted in one pass (a step looks at it many times)."""

    existing: int  # not deprovisioned yet: what counts against count + maxSurge
    new: list[Member]  # on the target config, not on their way out
    old: list[Member]  # still to be replaced: another config, not on their way out
    serving: int  # READY (and so not draining): what counts against the READY floor
    drained: list[Member]  # old ones whose drain finished, oldest first

    @classmethod
    def of(cls, state: RotationState) -> Tally:
        assert state.run is not None
        target = state.run.to_config_hash
        existing = serving = 0
        new: list[Member] = []
        old: list[Member] = []
        drained: list[Member] = []
        for m in state.members.values():
            if not m.exists:
                continue
            existing += 1
            serving += m.state == "READY"
            if m.leaving:
                if m.state == "DRAINED" and m.config_hash != target:
                    drained.append(m)
            else:
                (new if m.config_hash == target else old).append(m)
        return cls(existing, new, old, serving, sorted(drained, key=lambda m: m.serial))


_HEALTH_RANK = {"FAILED": 0, "REQUESTED": 1, "PROVISIONED": 2, "READY": 3}


def replacement_order(old: list[Member]) -> list[Member]:
    """Least healthy first, then oldest."""
    return sorted(old, key=lambda m: (_HEALTH_RANK.get(m.state, 3), m.serial))


def step(state: RotationState, cause: Envelope) -> list[Envelope]:
    """What the rollout does next from this state (nothing while paused)."""
    run = state.run
    if run is None:
        return []
    if run.mode == "rolling-back":
        return _roll_back(state, cause)
    if run.mode == "paused":
        return []
    tally = Tally.of(state)
    failed_new = sorted(m.cluster_id for m in tally.new if m.state == "FAILED")
    if failed_new:
        if run.strategy.on_failure == "rollback":
            return _begin_rollback(state, cause, f"new cluster(s) failed: {', '.join(failed_new)}")
        return [_emit(state, RolloutPaused, cause, reason=f"new cluster(s) failed: {', '.join(failed_new)}",
                      failed=True, cluster_ids=failed_new)]  # fmt: skip
    timed_out = [m.cluster_id for m in tally.drained if m.drain_timed_out]
    if timed_out:
        return [_emit(state, RolloutPaused, cause, reason=f"drain timed out: {', '.join(timed_out)}; resume to "
                      "retire them anyway, or roll back", cluster_ids=timed_out)]  # fmt: skip
    # Drained old clusters are retired.
    out = [_retire(state, m, cause, drain=True) for m in tally.drained]
    replaced = run.replaced + len(out)
    if out:
        out.append(_emit(state, RolloutProgressed, cause, discriminator=f"replaced:{replaced}", replaced=replaced,
                         remaining=len(tally.old), batch=run.batch, ready=tally.serving,
                         alive=tally.existing))  # fmt: skip
    out += _create(state, tally, cause)
    out += _drain(state, tally, cause)
    if not out and _complete(state, tally):
        out.append(_emit(state, RolloutCompleted, cause, next_serial=state.next_serial))
    return out


def _create(state: RotationState, tally: Tally, cause: Envelope) -> list[Envelope]:
    run = state.run
    assert run is not None
    missing = run.count - len(tally.new)
    room = run.count + run.strategy.max_surge - tally.existing
    # Whole batches, as operators run it by hand: the next one starts once the last one's old clusters are gone.
    n = min(missing, run.strategy.max_surge or run.strategy.max_unavailable)
    if n <= 0 or room < n:
        return []
    out = []
    batch = run.batch + 1
    for i in range(n):
        serial = state.next_serial + i
        cluster_id = cluster_id_for(state.clusterset, serial)
        out.append(new_event(ClusterRequested(
            cluster_id=cluster_id, clusterset=state.clusterset, location=state.location, serial=serial,
            cluster_type=run.cluster_type, generation=run.generation, config_hash=run.to_config_hash, spec=run.spec,
            rollout_id=run.rollout_id,
        ), source=SOURCE, cause=cause, discriminator=cluster_id))  # fmt: skip
    out.append(_emit(state, RolloutProgressed, cause, discriminator=f"batch:{batch}", replaced=run.replaced,
                     remaining=len(tally.old), batch=batch, ready=tally.serving,
                     alive=tally.existing + n))  # fmt: skip
    return out


def _drain(state: RotationState, tally: Tally, cause: Envelope) -> list[Envelope]:
    """Retire old clusters that serve nothing; drain READY ones as far as the READY floor allows."""
    run = state.run
    assert run is not None
    old = [m for m in replacement_order(tally.old) if not m.protected]
    idle = [m for m in old if m.state != "READY"]
    # The floor: count - maxUnavailable clusters READY and not draining, at every instant.
    budget = min(tally.serving - max(0, run.count - run.strategy.max_unavailable), len(old) - len(idle))
    out = [_retire(state, m, cause, drain=False) for m in idle]  # they serve nothing: nothing to drain
    if budget <= 0:
        return out
    now = cause.time
    if not is_open(run.strategy.maintenance_windows, now):
        until = next_opening(run.strategy.maintenance_windows, now)
        if run.waiting_until != until:
            out.append(_emit(state, RolloutWaiting, cause, discriminator=str(until), until=until,
                             reason="outside the ClusterSet's maintenance windows"))  # fmt: skip
        return out
    for m in [m for m in old if m.state == "READY"][:budget]:
        out.append(_cluster_event(state, ClusterDrainRequested, m.cluster_id, cause, rollout_id=run.rollout_id,
                                  timeout_seconds=float(run.strategy.drain_timeout_seconds)))  # fmt: skip
    return out


def _complete(state: RotationState, tally: Tally) -> bool:
    run = state.run
    assert run is not None
    return (not tally.old and len(tally.new) == run.count and all(m.state == "READY" for m in tally.new)
            and tally.existing == run.count)  # fmt: skip


def _retire(state: RotationState, member: Member, cause: Envelope, drain: bool,
            reason: Literal["rotation", "rollback"] = "rotation") -> Envelope:  # fmt: skip
    assert state.run is not None
    return _cluster_event(state, ClusterRetirementRequested, member.cluster_id, cause, reason=reason, drain=drain,
                          rollout_id=state.run.rollout_id)  # fmt: skip


# ---------------------------------------------------------------- controls
def _control(state: RotationState, p: RolloutControlRequested, cause: Envelope) -> list[Envelope]:
    run = state.run
    if run is None or (p.rollout_id and p.rollout_id != run.rollout_id):
        return []  # nothing running, or a control meant for another rollout
    reason = p.reason or f"{p.action} requested"
    match p.action:
        case "pause" if run.mode == "running":
            return [_emit(state, RolloutPaused, cause, reason=reason)]
        case "resume" if run.mode == "paused":
            resumed = _emit(state, RolloutResumed, cause)
            after = evolve(state, resumed) or state
            # The operator has looked: failed new clusters make way for fresh ones, timed-out drains are retired.
            out = [resumed]
            for m in after.existing():
                if m.state == "FAILED" and m.created_by == run.rollout_id:
                    out.append(_retire(after, m, cause, drain=False))
                elif m.state == "DRAINED" and m.drain_timed_out:
                    out.append(_retire(after, m, cause, drain=True))
            return out
        case "abort":
            return [_emit(state, RolloutAborted, cause, reason=reason, next_serial=state.next_serial)]
        case "rollback" if run.mode != "rolling-back":
            return _begin_rollback(state, cause, reason)
    return []


def _begin_rollback(state: RotationState, cause: Envelope, reason: str) -> list[Envelope]:
    started = _emit(state, RolloutRollingBack, cause, reason=reason)
    after = evolve(state, started) or state
    return [started, *_roll_back(after, cause)]


def _roll_back(state: RotationState, cause: Envelope) -> list[Envelope]:
    """Retire every cluster this rollout created; the old ones stay, and those it drained are uncordoned.
    Done when the new ones are gone."""
    run = state.run
    assert run is not None
    created = [m for m in state.existing() if m.created_by == run.rollout_id]
    out = [_retire(state, m, cause, drain=False, reason="rollback") for m in created if m.state != "RETIRING"]
    out += [_cluster_event(state, ClusterUncordonRequested, m.cluster_id, cause, rollout_id=run.rollout_id,
                           reason=f"rollout {run.rollout_id} rolled back")
            for m in state.existing() if m.created_by != run.rollout_id and m.state in ("DRAINING", "DRAINED")]
    if not created:
        out.append(_emit(state, RolloutRolledBack, cause, reason=run.pause_reason or "rolled back",
                         next_serial=state.next_serial))  # fmt: skip
    return out


def _set_deleted(state: RotationState, p: ClusterSetRetired, cause: Envelope) -> list[Envelope]:
    """The set is deleted: the rollout ends, and clusters it created that the planner did not list are retired."""
    run = state.run
    if run is None:
        return []
    listed = set(p.clusters)
    out = [_retire(state, m, cause, drain=False) for m in state.existing()
           if m.created_by == run.rollout_id and m.cluster_id not in listed and m.state != "RETIRING"]  # fmt: skip
    out.append(_emit(state, RolloutAborted, cause, reason="the ClusterSet was deleted", next_serial=state.next_serial))
    return out
