"""Rollout read models: one document per ClusterSet rollout, one per fleet rollout. Pure: no I/O, no clock.

ClusterSet rollouts (rotation's Rollout* facts, keyed by rollout_id):
    REQUESTED → IN_PROGRESS ⇄ WAITING / PAUSED → ROLLING_BACK → COMPLETED | ABORTED | ROLLED_BACK (final).
A late RolloutRequested never moves a rollout back to REQUESTED, and progress ends neither a pause (only a
RolloutResumed does) nor a rollback. The same fold (`advance`) keeps a set's current-rollout summary, the rollout's own
document and a fleet rollout's per-set progress, so the three can never disagree.

Fleet rollouts (FleetRollout* facts, keyed by the fleet rollout id) keep stages and per-set entries; the
rollout's state is derived from them (AWAITING_APPROVAL / IN_PROGRESS / SOAKING), overridden by a pause or a
halt, and ABORTED / COMPLETED / REJECTED are final. A stage is SOAKING after it completed with a soak deadline
and COMPLETED once a later stage starts or the rollout completes: nothing here reads a clock.
"""

from __future__ import annotations

from services.status_projector.docs import Doc, add_sorted, bounded, in_plan_order, ts_or_none
from shared.events import Envelope
from shared.events import models as m

KIND_SET = "ClusterSetRollout"
KIND_FLEET = "FleetRollout"
# The API's `kind` filter values and the document kinds they select.
KINDS: dict[str, str] = {"clusterset": KIND_SET, "fleet": KIND_FLEET}

SET_ROLLOUT_STATES = ("REQUESTED", "IN_PROGRESS", "WAITING", "PAUSED", "ROLLING_BACK", "COMPLETED", "ABORTED",
                      "ROLLED_BACK")  # fmt: skip
FLEET_ROLLOUT_STATES = ("PENDING", "IN_PROGRESS", "AWAITING_APPROVAL", "SOAKING", "PAUSED", "HALTED", "ABORTED",
                        "COMPLETED", "REJECTED")  # fmt: skip
STAGE_STATES = ("PENDING", "AWAITING_APPROVAL", "IN_PROGRESS", "SOAKING", "COMPLETED")
SET_ENTRY_STATES = ("PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED")
ALL_ROLLOUT_STATES: tuple[str, ...] = tuple(dict.fromkeys((*SET_ROLLOUT_STATES, *FLEET_ROLLOUT_STATES)))

# The state each ClusterSet rollout fact moves to (subject to the guards in `next_state`).
ROLLOUT_EVENT_STATE = {
    "RolloutRequested": "REQUESTED",
    "RolloutStarted": "IN_PROGRESS",
    "RolloutProgressed": "IN_PROGRESS",
    "RolloutResumed": "IN_PROGRESS",
    "RolloutWaiting": "WAITING",
    "RolloutPaused": "PAUSED",
    "RolloutCompleted": "COMPLETED",
    "RolloutAborted": "ABORTED",
    "RolloutRollingBack": "ROLLING_BACK",
    "RolloutRolledBack": "ROLLED_BACK",
}
_SET_FINAL = {"COMPLETED", "ABORTED", "ROLLED_BACK"}
_SET_RUNNING = {"REQUESTED", "IN_PROGRESS", "WAITING", "PAUSED", "ROLLING_BACK"}
_REASON_STATES = {"PAUSED", "ABORTED", "ROLLING_BACK", "ROLLED_BACK"}
_FLEET_FINAL = {"ABORTED", "COMPLETED", "REJECTED"}
_STAGE_RANK = {s: i for i, s in enumerate(STAGE_STATES)}
_ENTRY_RANK = {"PENDING": 0, "IN_PROGRESS": 1, "SUCCEEDED": 2, "FAILED": 2}
# A pathological pause/resume loop must not grow a document without bound: keep the first and the latest.
TIMELINE_MAX = 200
# What a fleet rollout shows of each set's own rollout (the full summary is on /v1/rollouts/{rolloutId}).
PROGRESS_KEYS = ("rolloutId", "state", "count", "replaced", "remaining", "batch", "ready", "alive", "updatedAt")
# Left out of /v1/rollouts listings (unbounded lists); /v1/rollouts/{id} has everything.
LISTING_OMIT = frozenset({"timeline", "sets", "outdatedClusters", "createdClusters", "retiredClusters"})

RolloutFact = m.RolloutEvent | m.RolloutRequested


# ---------------------------------------------------------------- ClusterSet rollouts
def blank_summary(rollout_id: str) -> Doc:
    return {
        "rolloutId": rollout_id, "state": None, "startedAt": None, "endedAt": None, "updatedAt": None,
        "fromConfigHashes": [], "toConfigHash": None, "generation": None, "count": None, "changes": [],
        "replaced": 0, "remaining": None, "batch": 0, "ready": 0, "alive": 0, "reason": None, "failed": False,
        "failedClusterIds": [], "waiting": None, "fleetRolloutId": None,
    }  # fmt: skip


def next_state(current: str | None, event_type: str) -> str:
    new = ROLLOUT_EVENT_STATE[event_type]
    if current is None:
        return new
    if current in _SET_FINAL or new == "REQUESTED":
        return current
    if event_type == "RolloutProgressed" and current in ("PAUSED", "ROLLING_BACK"):
        return current  # a batch finishing while paused does not resume the rollout, nor end its rollback
    return new


def advance(r: Doc, p: RolloutFact, event_type: str, time: str) -> bool:
    """Fold one rollout fact into a summary, in place. True when its state changed."""
    previous = r["state"]
    finished = previous in _SET_FINAL
    state = next_state(previous, event_type)
    r["state"] = state
    r["updatedAt"] = time
    if p.fleet_rollout_id:
        r["fleetRolloutId"] = p.fleet_rollout_id
    if isinstance(p, m.RolloutRequested):  # what the rollout is: true whenever it arrives
        r.update(fromConfigHashes=list(p.from_config_hashes), toConfigHash=p.to_config_hash, generation=p.generation,
                 count=p.count, changes=list(p.changes))  # fmt: skip
    if finished:
        return False  # a late fact of a finished rollout changes none of its outcome
    if isinstance(p, m.RolloutStarted):
        r["startedAt"] = r["startedAt"] or time
        r["toConfigHash"] = p.to_config_hash
        if p.count:
            r["count"] = p.count
    elif isinstance(p, m.RolloutProgressed):
        r.update(replaced=p.replaced, remaining=p.remaining, batch=p.batch, ready=p.ready, alive=p.alive)
    elif isinstance(p, m.RolloutWaiting):
        r["waiting"] = {"reason": p.reason, "until": ts_or_none(p.until), "since": time}
    elif isinstance(p, m.RolloutPaused):
        r.update(reason=p.reason, failed=p.failed)
        r["failedClusterIds"] = sorted({*r["failedClusterIds"], *p.cluster_ids})
    elif isinstance(p, m.RolloutResumed):
        r["failed"] = False
    elif isinstance(p, m.RolloutCompleted):
        r.update(remaining=0, endedAt=time)
    elif isinstance(p, m.RolloutRollingBack):
        r["reason"] = p.reason
    elif isinstance(p, m.RolloutAborted | m.RolloutRolledBack):
        r.update(reason=p.reason, endedAt=time)
    if state != "WAITING":
        r["waiting"] = None
    if state not in _REASON_STATES:
        r["reason"] = None
    return state != previous


def follow(current: Doc | None, p: RolloutFact, event_type: str, time: str) -> Doc | None:
    """A set's latest rollout after one fact, or None when the fact is a stray one of an older rollout."""
    if current is None or current.get("rolloutId") != p.rollout_id:
        if current and current.get("state") in _SET_RUNNING and not isinstance(p, m.RolloutRequested):
            return None  # a stray fact of an older rollout does not replace the one running
        current = {}
    summary = {**blank_summary(p.rollout_id), **current}
    advance(summary, p, event_type, time)
    return summary


def new_rollout(rollout_id: str, clusterset: str, location: Doc, time: str) -> Doc:
    return {
        "id": rollout_id, "kind": KIND_SET, "clusterset": clusterset, "location": location, "clusterType": None,
        # A surge cluster's request may be the first fact seen of its rollout: the rollout was requested then.
        **blank_summary(rollout_id), "state": "REQUESTED",
        "requestedAt": None, "outdatedClusters": [], "createdClusters": [], "retiredClusters": [], "timeline": [],
        "createdAt": time, "updatedAt": time, "lastEventId": None, "lastEventSeq": None, "eventCount": 0,
    }  # fmt: skip


def rollout_fact(doc: Doc, p: RolloutFact, env: Envelope, time: str) -> None:
    """One rotation fact on the rollout's own document."""
    if advance(doc, p, env.type, time) or not doc["timeline"]:
        _timeline(doc, doc["state"], env, time, getattr(p, "reason", None))
    if isinstance(p, m.RolloutRequested):
        doc.update(clusterType=p.cluster_type, requestedAt=doc["requestedAt"] or time)
    elif isinstance(p, m.RolloutStarted) and p.outdated:
        doc["outdatedClusters"] = sorted(set(p.outdated))


def rollout_cluster(doc: Doc, p: m.ClusterEvent) -> None:
    """A cluster the rollout created (surge) or retired (rotation or rollback)."""
    if isinstance(p, m.ClusterRequested):
        doc["createdClusters"] = add_sorted(doc["createdClusters"], p.cluster_id)
    elif isinstance(p, m.ClusterRetirementRequested):
        doc["retiredClusters"] = add_sorted(doc["retiredClusters"], p.cluster_id)


def _timeline(doc: Doc, state: str, env: Envelope, time: str, reason: str | None) -> None:
    doc["timeline"] = bounded([*doc["timeline"], {"state": state, "time": time, "type": env.type, "eventId": env.id,
                                                  "reason": reason or None}], TIMELINE_MAX)  # fmt: skip


# ---------------------------------------------------------------- fleet rollouts
def new_fleet(rollout_id: str, time: str) -> Doc:
    return {
        "id": rollout_id, "kind": KIND_FLEET, "rolloutId": rollout_id, "clusterType": None, "patch": None,
        "state": "PENDING", "stages": [], "sets": [], "setCounts": dict.fromkeys(SET_ENTRY_STATES, 0),
        "maxInFlight": None, "failureBudget": None, "succeeded": 0, "failed": 0, "inFlight": 0,
        "budgetExceeded": False, "paused": None, "halted": None, "reason": None, "failedSets": [], "errors": [],
        "timeline": [], "createdAt": time, "startedAt": None, "endedAt": None, "updatedAt": time,
        "lastEventId": None, "lastEventSeq": None, "eventCount": 0,
    }  # fmt: skip


def _new_stage(name: str) -> Doc:
    return {"name": name, "state": "PENDING", "approval": False, "soakSeconds": 0, "soakUntil": None,
            "clustersets": [], "startedAt": None, "completedAt": None}  # fmt: skip


def _new_entry(clusterset: str) -> Doc:
    return {"clusterset": clusterset, "stage": None, "state": "PENDING", "reason": None, "errors": [],
            "generation": None, "updatePath": None, "changes": [], "rolloutId": None, "rollout": None,
            "converged": None, "updateFailure": None, "startedAt": None, "finishedAt": None}  # fmt: skip


def _stage(doc: Doc, name: str) -> Doc:
    for stage in doc["stages"]:
        if stage["name"] == name:
            return stage
    stage = _new_stage(name)
    doc["stages"].append(stage)
    return stage


def _entry(doc: Doc, clusterset: str, stage: str | None = None) -> Doc:
    entry = next((e for e in doc["sets"] if e["clusterset"] == clusterset), None)
    if entry is None:
        entry = _new_entry(clusterset)
        doc["sets"].append(entry)
    if stage and not entry["stage"]:
        entry["stage"] = stage
    return entry


def _stage_to(doc: Doc, name: str, state: str, time: str) -> None:
    """Move a stage forward (never back); earlier stages still soaking are done once a later one moves on."""
    stage = _stage(doc, name)
    if _STAGE_RANK[state] > _STAGE_RANK[stage["state"]]:
        stage["state"] = state
    if state == "IN_PROGRESS":
        stage["startedAt"] = stage["startedAt"] or time
    for earlier in doc["stages"]:
        if earlier is stage:
            break
        if earlier["state"] == "SOAKING":
            earlier["state"] = "COMPLETED"


def _started(doc: Doc, p: m.FleetRolloutStarted, time: str) -> None:
    doc.update(clusterType=p.cluster_type, patch=p.patch, maxInFlight=p.max_in_flight, failureBudget=p.failure_budget,
               startedAt=doc["startedAt"] or time)  # fmt: skip
    for plan in p.stages:
        _stage(doc, plan.name).update(approval=plan.approval, soakSeconds=plan.soak_seconds,
                                      clustersets=list(plan.clustersets))  # fmt: skip
        for name in plan.clustersets:
            _entry(doc, name)["stage"] = plan.name
    doc["stages"] = in_plan_order(doc["stages"], "name", [s.name for s in p.stages])
    doc["sets"] = in_plan_order(doc["sets"], "clusterset", [n for s in p.stages for n in s.clustersets])


def _set_finished(doc: Doc, p: m.FleetRolloutSetFinished, time: str) -> None:
    entry = _entry(doc, p.clusterset, p.stage)
    if entry["state"] in ("SUCCEEDED", "FAILED"):
        return  # the first verdict stands
    entry.update(state="SUCCEEDED" if p.succeeded else "FAILED", reason=p.reason or None, finishedAt=time)


def _stage_completed(doc: Doc, p: m.FleetRolloutStageCompleted, env: Envelope, time: str) -> None:
    soaking = p.soak_until is not None and p.soak_until > env.time
    _stage_to(doc, p.stage, "SOAKING" if soaking else "COMPLETED", time)
    stage = _stage(doc, p.stage)
    stage["completedAt"] = stage["completedAt"] or time
    stage["soakUntil"] = ts_or_none(p.soak_until)


def fleet_fact(doc: Doc, p: m.FleetRolloutEvent, env: Envelope, time: str) -> None:
    """One fleet orchestrator fact on the fleet rollout's document."""
    final: str | None = None
    if isinstance(p, m.FleetRolloutStarted):
        _started(doc, p, time)
    elif isinstance(p, m.FleetRolloutRejected):
        doc["errors"] = [e.model_dump(mode="json") for e in p.errors]
        final = "REJECTED"
    elif isinstance(p, m.FleetRolloutStageStarted):
        _stage_to(doc, p.stage, "IN_PROGRESS", time)
    elif isinstance(p, m.FleetRolloutAwaitingApproval):
        _stage_to(doc, p.stage, "AWAITING_APPROVAL", time)
    elif isinstance(p, m.FleetRolloutSetFinished):
        _set_finished(doc, p, time)
    elif isinstance(p, m.FleetRolloutStageCompleted):
        _stage_completed(doc, p, env, time)
    elif isinstance(p, m.FleetRolloutPaused):
        doc["paused"] = {"reason": p.reason, "since": time}
    elif isinstance(p, m.FleetRolloutResumed):
        doc.update(paused=None, halted=None)
    elif isinstance(p, m.FleetRolloutHalted):
        doc["halted"] = {"reason": p.reason, "since": time}
        doc["failedSets"] = sorted({*doc["failedSets"], *p.failed_sets})
    elif isinstance(p, m.FleetRolloutAborted):
        final = "ABORTED"
    elif isinstance(p, m.FleetRolloutCompleted):
        for stage in doc["stages"]:
            if stage["state"] == "SOAKING":
                stage["state"] = "COMPLETED"
        final = "COMPLETED"
    _settle(doc, env, time, final, getattr(p, "reason", None))


def fleet_join(doc: Doc, p: m.Event, env: Envelope, time: str) -> None:
    """A set-level fact of a set the fleet rollout patched: its entry's progress."""
    name = getattr(p, "clusterset", None)
    if not isinstance(name, str) or not name:
        return
    if isinstance(p, m.ClusterSetPatchRequested):
        entry = _entry(doc, name, p.stage)
        if entry["state"] == "PENDING":
            entry.update(state="IN_PROGRESS", startedAt=time)
    elif isinstance(p, m.ClusterSetRejected):
        _entry(doc, name)["errors"] = [e.model_dump(mode="json") for e in p.errors]
    elif isinstance(p, m.ClusterSetAccepted):  # the patched generation, and how the planner applies it
        _entry(doc, name).update(generation=p.generation, updatePath=p.update_path, changes=list(p.changes))
    elif isinstance(p, m.RolloutEvent | m.RolloutRequested):
        entry = _entry(doc, name)
        summary = follow(entry["rollout"], p, env.type, time)
        if summary is not None:
            entry.update(rolloutId=p.rollout_id, rollout={k: summary[k] for k in PROGRESS_KEYS})
    elif isinstance(p, m.ClusterSetConverged):
        _entry(doc, name)["converged"] = {"generation": p.generation, "configHash": p.config_hash,
                                          "count": p.count, "time": time}  # fmt: skip
    elif isinstance(p, m.ClusterSetUpdateFailed):
        _entry(doc, name)["updateFailure"] = {"generation": p.generation, "configHash": p.config_hash,
                                              "clusterIds": sorted(p.cluster_ids), "reason": p.reason,
                                              "time": time}  # fmt: skip
    _settle(doc, env, time, None, None)


def _settle(doc: Doc, env: Envelope, time: str, final: str | None, reason: str | None) -> None:
    """Counts and state from the stages and entries; a state change goes on the timeline."""
    counts = dict.fromkeys(SET_ENTRY_STATES, 0)
    for entry in doc["sets"]:
        counts[entry["state"]] += 1
    budget = doc["failureBudget"]
    doc.update(setCounts=counts, succeeded=counts["SUCCEEDED"], failed=counts["FAILED"],
               inFlight=counts["IN_PROGRESS"], budgetExceeded=budget is not None and counts["FAILED"] > budget)
    previous = doc["state"]
    if previous in _FLEET_FINAL:
        return  # its outcome and reason stand
    state = _derive(doc, final)
    if state in ("PAUSED", "HALTED", "ABORTED"):
        doc["reason"] = reason or doc["reason"]  # why it stopped (a second pause's reason replaces the first)
    elif state not in _FLEET_FINAL:
        doc["reason"] = None
    if state == previous:
        return
    doc["state"] = state
    if state in _FLEET_FINAL:
        doc["endedAt"] = time
    _timeline(doc, state, env, time, reason)


def _derive(doc: Doc, final: str | None) -> str:
    if final:
        return final
    if doc["halted"]:
        return "HALTED"
    if doc["paused"]:
        return "PAUSED"
    states = {s["state"] for s in doc["stages"]}
    for state in ("AWAITING_APPROVAL", "IN_PROGRESS", "SOAKING"):
        if state in states:
            return state
    if doc["startedAt"] is None and states <= {"PENDING"}:
        return "PENDING"
    return "IN_PROGRESS"


# ---------------------------------------------------------------- indexes and listings
def index_entries(doc: Doc | None) -> set[tuple[str, str]]:
    """(field, value) pairs of the /v1/rollouts filter indexes a rollout document belongs to."""
    if not doc:
        return set()
    out = {("kind", str(doc["kind"])), ("state", str(doc["state"]))}
    if doc["kind"] == KIND_SET:
        out.add(("clusterset", str(doc["clusterset"])))
    else:  # a fleet rollout is listed under every set it covers
        out |= {("clusterset", str(e["clusterset"])) for e in doc["sets"]}
    return out


def listing(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if k not in LISTING_OMIT}


def fleet_rollout_types() -> frozenset[str]:
    return frozenset(name for name, cls in m.EVENT_TYPES.items() if issubclass(cls, m.FleetRolloutEvent))
