"""Control-plane operation read models: one document per migration or upgrade (etcd_migration's
ControlPlaneMigration* / ControlPlaneUpgrade* facts, keyed by operation id) and one per pipeline
(ControlPlanePipeline* facts, keyed by pipeline id). Pure: no I/O, no clock.

Operations: REQUESTED → IN_PROGRESS (→ ROLLING_BACK) → COMPLETED | ROLLED_BACK | FAILED.
- a late request never moves an operation back, and a forward step never ends a rollback;
- a migration failure either starts the rollback (ROLLING_BACK, then ROLLED_BACK) or stops for an operator
  (FAILED); an upgrade failure on a node first rolls that node back (ROLLING_BACK), then the upgrade halts
  (FAILED: the nodes done before it stay upgraded);
- COMPLETED and ROLLED_BACK are final; FAILED only gives way to one of them;
- the step timeline has one entry per step (phase or node, step, rollback): a step redone after a crash keeps
  its first completion. Later facts of a finished operation still add their steps but change no outcome.
Pipelines: IN_PROGRESS → HALTED | COMPLETED, derived from the halt and completion facts; a halt stands (a later
completion only records when the clusters in flight finished). Per-cluster entries go PENDING → IN_PROGRESS →
SUCCEEDED | FAILED, the first verdict standing, from the pipeline's own facts and from the operations that name it.

The operation fold feeds the cluster's `controlPlane.lastOperation` and the pipeline's entries, and the pipeline
fold feeds the set's `controlPlanePipeline`: each summary is copied from the document it summarises.
"""

from __future__ import annotations

from services.status_projector.docs import Doc, bounded, camel, in_plan_order, seconds_between, ts_or_none
from shared.events import Envelope
from shared.events import models as m

KIND_MIGRATION = "migration"
KIND_UPGRADE = "upgrade"
KIND_PIPELINE = "pipeline"
# The API's `kind` values; they are also the documents' own `kind`.
KINDS: tuple[str, ...] = (KIND_MIGRATION, KIND_UPGRADE, KIND_PIPELINE)

OPERATION_STATES = ("REQUESTED", "IN_PROGRESS", "ROLLING_BACK", "COMPLETED", "ROLLED_BACK", "FAILED")
PIPELINE_STATES = ("IN_PROGRESS", "HALTED", "COMPLETED")
ALL_STATES: tuple[str, ...] = tuple(dict.fromkeys((*OPERATION_STATES, *PIPELINE_STATES)))
ENTRY_STATES = ("PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED")

# Which kind of operation each fact belongs to.
OPERATION_KIND: dict[str, str] = {
    "ControlPlaneMigrationRequested": KIND_MIGRATION,
    "ControlPlaneMigrationStepCompleted": KIND_MIGRATION,
    "ControlPlaneMigrationCompleted": KIND_MIGRATION,
    "ControlPlaneMigrationFailed": KIND_MIGRATION,
    "ControlPlaneMigrationRolledBack": KIND_MIGRATION,
    "ControlPlaneUpgradeRequested": KIND_UPGRADE,
    "ControlPlaneUpgradeStepCompleted": KIND_UPGRADE,
    "ControlPlaneUpgradeCompleted": KIND_UPGRADE,
    "ControlPlaneUpgradeFailed": KIND_UPGRADE,
}
PIPELINE_TYPES = frozenset({"ControlPlanePipelineRequested", "ControlPlanePipelineProgressed",
                            "ControlPlanePipelineHalted", "ControlPlanePipelineCompleted"})  # fmt: skip
_REQUESTS = frozenset({"ControlPlaneMigrationRequested", "ControlPlaneUpgradeRequested"})
# etcd_migration reports the cluster-wide upgrade checks on this pseudo-node: not a node the upgrade touched.
CLUSTER_WIDE_NODE = "cluster"
_FINAL = frozenset({"COMPLETED", "ROLLED_BACK"})
_ENDED = frozenset({"COMPLETED", "ROLLED_BACK", "FAILED"})
_ENTRY_RANK = {"PENDING": 0, "IN_PROGRESS": 1, "SUCCEEDED": 2, "FAILED": 2}
_ENTRY_OF_OPERATION = {"REQUESTED": "IN_PROGRESS", "IN_PROGRESS": "IN_PROGRESS", "ROLLING_BACK": "IN_PROGRESS",
                       "COMPLETED": "SUCCEEDED", "ROLLED_BACK": "FAILED", "FAILED": "FAILED"}  # fmt: skip
# A migration has about fifteen steps and an upgrade a few per node; this only stops a runaway producer.
TIMELINE_MAX = 200
# Left out of /v1/migrations listings (unbounded lists); /v1/migrations/{id} has everything.
LISTING_OMIT = frozenset({"timeline", "clusters"})
# What a cluster shows of its latest operation, and a set of its latest pipeline.
OPERATION_SUMMARY_KEYS = ("operationId", "kind", "state", "phase", "step", "node", "toVersion", "availabilityPct",
                          "pipelineId", "requestedAt", "completedAt", "updatedAt")  # fmt: skip
PIPELINE_SUMMARY_KEYS = ("pipelineId", "operation", "state", "toVersion", "requestedAt", "completedAt", "updatedAt")

StepFact = m.ControlPlaneMigrationStepCompleted | m.ControlPlaneUpgradeStepCompleted
PipelineFact = m.ControlPlanePipelineRequested | m.ControlPlanePipelineEvent


# ---------------------------------------------------------------- operations
def new_operation(operation_id: str, kind: str, cluster_id: str, clusterset: str, location: Doc, time: str) -> Doc:
    return {
        "id": operation_id, "kind": kind, "operationId": operation_id, "clusterId": cluster_id,
        "clusterset": clusterset, "location": location, "pipelineId": None, "state": "REQUESTED", "phase": None,
        "step": None, "node": None, "kubernetesVersion": None, "toVersion": None, "configHash": None, "reason": None,
        "timeline": [],
        "nodes": [], "failure": None, "rollback": None, "availability": None, "availabilityPct": None,
        "endpoint": None, "members": [], "requestedAt": None, "completedAt": None, "durationS": None,
        "createdAt": time, "updatedAt": time, "lastEventId": None, "lastEventSeq": None, "eventCount": 0,
    }  # fmt: skip


def _target(p: m.ControlPlaneEvent) -> str:
    """The state a fact moves an operation to, before the guards."""
    if isinstance(p, m.ControlPlaneMigrationRequested | m.ControlPlaneUpgradeRequested):
        return "REQUESTED"
    if isinstance(p, StepFact):
        return "ROLLING_BACK" if p.rollback else "IN_PROGRESS"
    if isinstance(p, m.ControlPlaneMigrationFailed):
        return "ROLLING_BACK" if p.rolling_back else "FAILED"
    if isinstance(p, m.ControlPlaneUpgradeFailed):
        return "ROLLING_BACK" if p.node and not p.rolled_back else "FAILED"  # the node first, then the halt
    if isinstance(p, m.ControlPlaneMigrationRolledBack):
        return "ROLLED_BACK"
    return "COMPLETED"


def next_state(current: str, target: str) -> str:
    if current in _FINAL or target == current:
        return current
    if target in _FINAL:
        return target
    if current == "FAILED":
        return current
    if target == "FAILED":
        return target
    if target == "REQUESTED" or (current == "ROLLING_BACK" and target == "IN_PROGRESS"):
        return current
    return target


def operation_fact(doc: Doc, p: m.ControlPlaneEvent, env: Envelope, time: str) -> None:
    """One etcd_migration fact on the operation's own document."""
    previous = doc["state"]
    if p.pipeline_id and not doc["pipelineId"]:
        doc["pipelineId"] = p.pipeline_id
    # What the operation is and what it did: true whenever it arrives.
    if isinstance(p, m.ControlPlaneMigrationRequested):
        doc.update(requestedAt=doc["requestedAt"] or time, configHash=p.config_hash or doc["configHash"],
                   reason=p.reason or doc["reason"],
                   kubernetesVersion=p.kubernetes_version or doc["kubernetesVersion"])  # fmt: skip
    elif isinstance(p, m.ControlPlaneUpgradeRequested):
        doc.update(requestedAt=doc["requestedAt"] or time, toVersion=p.to_version,
                   configHash=p.config_hash or doc["configHash"])  # fmt: skip
    elif isinstance(p, StepFact):
        _step(doc, p, env, time)
    node = getattr(p, "node", None)
    if isinstance(p, m.ControlPlaneUpgradeStepCompleted | m.ControlPlaneUpgradeFailed) and node \
            and node != CLUSTER_WIDE_NODE:
        doc["nodes"] = doc["nodes"] if node in doc["nodes"] else [*doc["nodes"], node]  # in the order touched
    if previous in _FINAL:
        _settle(doc)
        return  # a late fact of a finished operation changes none of its outcome
    state = doc["state"] = next_state(previous, _target(p))
    if isinstance(p, m.ControlPlaneMigrationStepCompleted):
        doc.update(phase=p.phase, step=p.step)
    elif isinstance(p, m.ControlPlaneUpgradeStepCompleted):
        doc.update(node=p.node, step=p.step)
    elif isinstance(p, m.ControlPlaneMigrationFailed):
        doc["failure"] = {"step": p.step, "node": None, "reason": p.reason, "rollingBack": p.rolling_back,
                          "rolledBack": False, "time": time, "eventId": env.id}  # fmt: skip
    elif isinstance(p, m.ControlPlaneUpgradeFailed):
        node_failure = (doc["failure"] or {}).get("node")
        doc["failure"] = {"step": None, "node": p.node or node_failure, "reason": p.reason,
                          "rollingBack": state == "ROLLING_BACK", "rolledBack": p.rolled_back, "time": time,
                          "eventId": env.id}  # fmt: skip
        _availability(doc, p.availability, None)
    elif isinstance(p, m.ControlPlaneMigrationRolledBack):
        doc["rollback"] = {"fromStep": p.from_step, "reason": p.reason or None, "time": time}
        if doc["failure"]:
            doc["failure"] = {**doc["failure"], "rollingBack": False, "rolledBack": True}
        _availability(doc, p.availability, None)
    elif isinstance(p, m.ControlPlaneMigrationCompleted):
        doc.update(endpoint=p.endpoint or doc["endpoint"], members=list(p.members),
                   configHash=p.config_hash or doc["configHash"])  # fmt: skip
        _availability(doc, p.availability, p.availability_pct)
    elif isinstance(p, m.ControlPlaneUpgradeCompleted):
        doc.update(toVersion=p.to_version, configHash=p.config_hash or doc["configHash"])
        _availability(doc, p.availability, p.availability_pct)
    if state in _ENDED and state != previous:
        doc["completedAt"] = time
    _settle(doc)


def _step(doc: Doc, p: StepFact, env: Envelope, time: str) -> None:
    phase = p.phase if isinstance(p, m.ControlPlaneMigrationStepCompleted) else None
    node = p.node if isinstance(p, m.ControlPlaneUpgradeStepCompleted) else None
    key = (phase, node, p.step, p.rollback)
    if any((e["phase"], e["node"], e["step"], e["rollback"]) == key for e in doc["timeline"]):
        return  # redone after a crash: the first completion stands
    started = ts_or_none(p.started_at) if isinstance(p, m.ControlPlaneMigrationStepCompleted) else None
    if started is None:  # the steps of one operation run one after another: it began when the previous one ended
        started = doc["timeline"][-1]["completedAt"] if doc["timeline"] else doc["requestedAt"]
    entry = {"phase": phase, "node": node, "step": p.step, "rollback": p.rollback, "startedAt": started,
             "completedAt": time, "durationS": seconds_between(started, time), "detail": camel(p.detail),
             "eventId": env.id}  # fmt: skip
    doc["timeline"] = bounded([*doc["timeline"], entry], TIMELINE_MAX)


def _availability(doc: Doc, full: m.ControlPlaneAvailability | None, pct: float | None) -> None:
    if full is not None:
        doc["availability"] = camel(full.model_dump(mode="json"))
        doc["availabilityPct"] = full.availability_pct
    elif pct is not None:
        doc["availabilityPct"] = pct


def _settle(doc: Doc) -> None:
    doc["durationS"] = seconds_between(doc["requestedAt"] or doc["createdAt"], doc["completedAt"])


# ---------------------------------------------------------------- the cluster's control plane
def blank_control_plane() -> Doc:
    """What operations taught us about a cluster's control plane (the spec fills the gaps when rendered)."""
    return {"ha": None, "members": [], "endpoint": None, "version": None, "lastOperation": None}


def cluster_fact(current: Doc | None, operation: Doc, p: m.ControlPlaneEvent, event_type: str) -> Doc:
    """A cluster's control-plane summary after one fact of `operation` (already folded)."""
    summary = {**blank_control_plane(), **(current or {})}
    if isinstance(p, m.ControlPlaneMigrationCompleted) and operation["state"] == "COMPLETED":
        summary.update(ha=True, members=list(p.members), endpoint=p.endpoint or summary["endpoint"])
    elif isinstance(p, m.ControlPlaneUpgradeCompleted) and operation["state"] == "COMPLETED":
        summary["version"] = p.to_version
    last = summary["lastOperation"]
    # A new operation starts with its request; a stray fact of an older one does not take over the summary.
    if last is None or last["operationId"] == operation["id"] or event_type in _REQUESTS:
        summary["lastOperation"] = {k: operation[k] for k in OPERATION_SUMMARY_KEYS}
    return summary


# ---------------------------------------------------------------- pipelines
def new_pipeline(pipeline_id: str, clusterset: str, location: Doc, time: str) -> Doc:
    return {
        "id": pipeline_id, "kind": KIND_PIPELINE, "pipelineId": pipeline_id, "clusterset": clusterset,
        "location": location, "operation": None, "kubernetesVersion": None, "toVersion": None, "configHash": None,
        "concurrency": None,
        "failureBudget": None, "state": "IN_PROGRESS", "clusters": [], "counts": dict.fromkeys(ENTRY_STATES, 0),
        "succeeded": 0, "failed": 0, "inFlight": 0, "pending": 0, "budgetExceeded": False, "failedClusters": [],
        "halted": None, "reason": None, "requestedAt": None, "completedAt": None, "durationS": None,
        "createdAt": time, "updatedAt": time, "lastEventId": None, "lastEventSeq": None, "eventCount": 0,
    }  # fmt: skip


def _entry(doc: Doc, cluster_id: str, clusterset: str | None = None, location: Doc | None = None) -> Doc:
    entry = next((e for e in doc["clusters"] if e["clusterId"] == cluster_id), None)
    if entry is None:
        entry = {"clusterId": cluster_id, "clusterset": clusterset or doc["clusterset"],
                 "location": location or doc["location"], "state": "PENDING", "operationId": None,
                 "operationState": None, "startedAt": None, "finishedAt": None}  # fmt: skip
        doc["clusters"].append(entry)
    return entry


def _entry_to(entry: Doc, state: str, time: str) -> None:
    """Forward only; the first verdict (SUCCEEDED or FAILED) stands."""
    if _ENTRY_RANK[state] <= _ENTRY_RANK[entry["state"]]:
        return
    entry["state"] = state
    entry["startedAt"] = entry["startedAt"] or time
    if state in ("SUCCEEDED", "FAILED"):
        entry["finishedAt"] = time


def _verdicts(doc: Doc, time: str, in_flight: list[str], succeeded: list[str], failed: list[str]) -> None:
    for state, ids in (("IN_PROGRESS", in_flight), ("SUCCEEDED", succeeded), ("FAILED", failed)):
        for cid in ids:
            _entry_to(_entry(doc, cid), state, time)


def pipeline_fact(doc: Doc, p: PipelineFact, env: Envelope, time: str) -> None:
    """One pipeline fact on the pipeline's own document."""
    if isinstance(p, m.ControlPlanePipelineRequested):
        doc.update(operation=p.operation, toVersion=p.to_version, kubernetesVersion=p.kubernetes_version,
                   configHash=p.config_hash,
                   concurrency=p.concurrency, failureBudget=p.failure_budget,
                   requestedAt=doc["requestedAt"] or time)  # fmt: skip
        for c in p.clusters:
            _entry(doc, c.cluster_id, c.clusterset, c.location.model_dump(mode="json", by_alias=True))
        doc["clusters"] = in_plan_order(doc["clusters"], "clusterId", [c.cluster_id for c in p.clusters])
    elif isinstance(p, m.ControlPlanePipelineProgressed):
        _verdicts(doc, time, p.in_flight, p.succeeded, p.failed)
    elif isinstance(p, m.ControlPlanePipelineHalted):
        _verdicts(doc, time, [], [], p.failed)
        doc["halted"] = doc["halted"] or {"reason": p.reason, "since": time}
    elif isinstance(p, m.ControlPlanePipelineCompleted):
        _verdicts(doc, time, [], p.succeeded, p.failed)
        doc["completedAt"] = doc["completedAt"] or time
    _settle_pipeline(doc)


def pipeline_join(doc: Doc, operation: Doc, p: m.ControlPlaneEvent, event_type: str, time: str) -> None:
    """A fact of an operation the pipeline started (already folded into `operation`): the cluster's entry."""
    entry = _entry(doc, p.cluster_id, p.clusterset, p.location.model_dump(mode="json", by_alias=True))
    if entry["operationId"] not in (None, operation["id"]):
        if event_type not in _REQUESTS or entry["state"] in ("SUCCEEDED", "FAILED"):
            return  # a stray fact of an earlier attempt, or a new attempt after the verdict
    entry.update(operationId=operation["id"], operationState=operation["state"])
    _entry_to(entry, _ENTRY_OF_OPERATION[operation["state"]], time)
    _settle_pipeline(doc)


def _settle_pipeline(doc: Doc) -> None:
    counts = dict.fromkeys(ENTRY_STATES, 0)
    for entry in doc["clusters"]:
        counts[entry["state"]] += 1
    budget = doc["failureBudget"]
    doc.update(counts=counts, succeeded=counts["SUCCEEDED"], failed=counts["FAILED"], inFlight=counts["IN_PROGRESS"],
               pending=counts["PENDING"], budgetExceeded=budget is not None and counts["FAILED"] > budget,
               failedClusters=sorted(e["clusterId"] for e in doc["clusters"] if e["state"] == "FAILED"))  # fmt: skip
    halted = doc["halted"]
    doc["state"] = "HALTED" if halted else "COMPLETED" if doc["completedAt"] else "IN_PROGRESS"
    doc["reason"] = halted["reason"] if halted else None
    doc["durationS"] = seconds_between(doc["requestedAt"] or doc["createdAt"], doc["completedAt"])


def follow_pipeline(current: Doc | None, pipeline: Doc, event_type: str) -> Doc | None:
    """A set's latest pipeline after one fact of `pipeline`, or None when the fact is a stray one of an older one."""
    if (current and current["pipelineId"] != pipeline["id"] and current["state"] == "IN_PROGRESS"
            and event_type != "ControlPlanePipelineRequested"):  # fmt: skip
        return None
    return {k: pipeline[k] for k in PIPELINE_SUMMARY_KEYS}


# ---------------------------------------------------------------- indexes and listings
def index_entries(doc: Doc | None) -> set[tuple[str, str]]:
    """(field, value) pairs of the /v1/migrations filter indexes a document belongs to."""
    if not doc:
        return set()
    out = {("kind", str(doc["kind"])), ("state", str(doc["state"])), ("clusterset", str(doc["clusterset"]))}
    if doc["kind"] == KIND_PIPELINE:  # a pipeline is listed under every cluster it covers
        out |= {("cluster", str(e["clusterId"])) for e in doc["clusters"]}
    else:
        out.add(("cluster", str(doc["clusterId"])))
    return out


def listing(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if k not in LISTING_OMIT}
