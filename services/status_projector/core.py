"""The projection itself: FLEET events folded into read models. Pure: no I/O, no clock.

`apply(views, seq, envelope)` mutates plain dicts (the JSON documents served by the API)
and is deterministic: every timestamp comes from the envelope's `time` and every document
is serialised canonically (sorted keys), so replaying FLEET from sequence 1 into empty views
yields byte-identical JSON. Exact repeats are recognised by event id (`views.applied`), so
applying an event twice equals applying it once, whatever sequence it arrived at.

Cluster state machine (ARCHITECTURE.md), with guards:
- provisioning / install facts only move a cluster forward along
  REQUESTED → PROVISIONING → PROVISIONED → INSTALLING → READY (during an update they keep it UPDATING);
- once retiring (retirement requested or a resource deprovisioned) or DELETED, provisioning,
  install, update and drain facts no longer change the cluster; DELETED is final;
- a failure records {code, message, retryable, step/service, operation, fromState}; a later
  success (e.g. ClusterReady after a retryable failure, ClusterResourcesUpdated after a failed
  in-place update) clears it.

One event may change several documents: a surge cluster's ClusterRequested changes the cluster and
its rollout; a RolloutProgressed of a fleet rollout's set changes the set, the set's rollout and the
fleet rollout; a control-plane step of a pipeline's cluster changes the operation, the cluster and the
pipeline. `touched` names them all, so that the projector loads each before applying a batch; the
rollout documents themselves are built in rollouts.py, the control-plane ones in controlplane.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from services.status_projector import controlplane as cp
from services.status_projector import rollouts as ro
from services.status_projector.docs import Doc, camel, canonical, document, fill_defaults, stamp, ts
from shared.catalog import CATALOG
from shared.events import Envelope, decode_payload
from shared.events import models as m
from shared.events.clusterset import ClusterSpec, InfraServiceRef

__all__ = ["CLUSTER_STATES", "INDEX_FIELDS", "HANDLED_TYPES", "Doc", "Touch", "Views", "apply", "canonical",
           "index_entries", "touched", "ts"]  # fmt: skip

CLUSTER_STATES: tuple[str, ...] = m.CLUSTER_STATES
# Creation pipeline order: a fact never moves a cluster back along it.
_RANK = {"REQUESTED": 0, "PROVISIONING": 1, "PROVISIONED": 2, "INSTALLING": 3, "READY": 4}
# The filters /v1/clusters offers, each backed by one Redis index set per value.
INDEX_FIELDS: tuple[str, ...] = ("clusterset", "state", "env", "cloud", "region", "clusterType")
# Payload fields left out of history entries: repeated in the entry itself, or too large.
_HISTORY_OMIT = {"location", "cluster_id", "clusterset", "spec", "resources", "document", "clusters", "members"}
_FLEET_ROLLOUT_TYPES = ro.fleet_rollout_types()


# ---------------------------------------------------------------- helpers
def _spec_doc(spec: ClusterSpec) -> Doc:
    return spec.model_dump(mode="json", by_alias=True)


def _requested_services(spec: ClusterSpec) -> list[Doc]:
    """Every service the spec lists, PENDING, with the version asked for (or the catalog default)."""
    out: list[Doc] = []
    for item in spec.infra_services:
        name = item if isinstance(item, str) else item.name
        version = item.version if isinstance(item, InfraServiceRef) and item.version else None
        if version is None:
            d = CATALOG.get(name)
            version = d.version if d else ""
        out.append({"name": name, "version": version, "state": "PENDING"})
    return out


def _network_doc(cloud: str | None, net: m.NetworkInfo) -> Doc:
    doc: Doc = {"networkId": net.network_id, "subnetIds": list(net.subnet_ids), "owned": net.owned}
    # The cloud's own word for it, as operators read it in their console.
    alias = {"aws": "vpcId", "azure": "vnetId"}.get(cloud or "")
    if alias:
        doc[alias] = net.network_id
    return doc


# ---------------------------------------------------------------- the views
@dataclass
class Views:
    """The read models an `apply` call may touch.

    The projector loads only the documents a batch touches (see `touched`); unit tests start empty
    and keep everything. `history` holds the entries appended (all of them when starting empty), keyed
    "cluster:<id>" / "clusterset:<name>". `applied` maps event id → the stream sequence that applied it
    (the projector preloads the ids of the batch that are already known). `rollouts` are ClusterSet
    rollouts by rollout id, `fleet_rollouts` fleet rollouts by their id, `cp_operations` control-plane
    migrations and upgrades by operation id, `cp_pipelines` their pipelines by pipeline id.
    """

    clusters: dict[str, Doc] = field(default_factory=dict)
    clustersets: dict[str, Doc] = field(default_factory=dict)
    history: dict[str, list[Doc]] = field(default_factory=dict)
    applied: dict[str, int] = field(default_factory=dict)
    rollouts: dict[str, Doc] = field(default_factory=dict)
    fleet_rollouts: dict[str, Doc] = field(default_factory=dict)
    cp_operations: dict[str, Doc] = field(default_factory=dict)
    cp_pipelines: dict[str, Doc] = field(default_factory=dict)

    def dump(self) -> dict[str, str]:
        """Everything as canonical JSON, keyed like the Redis layout (for equality checks in tests)."""
        out: dict[str, str] = {}
        for cid, doc in self.clusters.items():
            out[f"cluster:{cid}"] = canonical(doc)
        for name, doc in self.clustersets.items():
            out[f"clusterset:{name}"] = canonical(doc)
        for rid, doc in self.rollouts.items():
            out[f"rollout:{rid}"] = canonical(doc)
        for rid, doc in self.fleet_rollouts.items():
            out[f"fleetrollout:{rid}"] = canonical(doc)
        for oid, doc in self.cp_operations.items():
            out[f"migration:{oid}"] = canonical(doc)
        for pid, doc in self.cp_pipelines.items():
            out[f"migrationpipeline:{pid}"] = canonical(doc)
        for key, entries in self.history.items():
            out[f"history:{key}"] = "[" + ",".join(canonical(e) for e in entries) + "]"
        out["applied"] = canonical({eid: str(seq) for eid, seq in self.applied.items()})  # as Redis hashes hold it
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class Touch:
    """The documents one event may change: what the projector loads before applying a batch."""

    cluster: str | None = None
    clusterset: str | None = None
    rollout: str | None = None
    fleet_rollout: str | None = None
    operation: str | None = None
    pipeline: str | None = None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def touched(env: Envelope) -> Touch:
    """The documents an envelope may change, read from raw data without decoding.

    A cluster fact changes the cluster's document only (never its set's); a rollout id or fleet rollout
    id on a set or cluster fact also names that rollout's document, an operation id or pipeline id the
    control-plane operation's or pipeline's. Over-naming is harmless (a document that does not change
    is not written); under-naming would lose an update, so this follows the data fields every handler
    reads.
    """
    data = env.data
    if env.type in _FLEET_ROLLOUT_TYPES:  # their rollout_id is the fleet rollout's (and clusterset is an entry)
        return Touch(fleet_rollout=_str(data.get("rollout_id")))
    cid = _str(data.get("cluster_id"))
    return Touch(cluster=cid, clusterset=None if cid else _str(data.get("clusterset")),
                 rollout=_str(data.get("rollout_id")), fleet_rollout=_str(data.get("fleet_rollout_id")),
                 operation=_str(data.get("operation_id")), pipeline=_str(data.get("pipeline_id")))  # fmt: skip


def index_entries(doc: Doc | None) -> set[tuple[str, str]]:
    """(field, value) pairs of the filter indexes a cluster document belongs to."""
    if not doc:
        return set()
    loc = doc.get("location") or {}
    values = {
        "clusterset": doc.get("clusterset"),
        "state": doc.get("state"),
        "env": loc.get("env"),
        "cloud": loc.get("cloud"),
        "region": loc.get("region"),
        "clusterType": doc.get("clusterType"),
    }
    return {(k, v) for k, v in values.items() if isinstance(v, str) and v}


# ---------------------------------------------------------------- entry point
def apply(views: Views, seq: int, env: Envelope) -> bool:
    """Fold one event into the views. Returns False when it changed nothing (repeat, unknown, undecodable)."""
    if env.id in views.applied:
        return False
    handlers = _HANDLERS.get(env.type)
    if not handlers:
        return False
    try:
        payload = decode_payload(env)
    except (KeyError, ValidationError, ValueError):
        # A malformed fact cannot be projected; skipping it is deterministic, so replays agree.
        return False
    views.applied[env.id] = seq
    for handler in handlers:
        handler(views, seq, env, payload)
    return True


def _history_entry(seq: int, env: Envelope, time: str) -> Doc:
    detail = {k: v for k, v in env.data.items() if k not in _HISTORY_OMIT}
    return {
        "id": env.id,
        "type": env.type,
        "time": time,
        "source": env.source,
        "seq": seq,
        "correlationId": env.correlation_id,
        "causationId": env.causation_id,
        "detail": camel(detail),
    }


def _record(views: Views, key: str, doc: Doc, seq: int, env: Envelope, time: str) -> None:
    views.history.setdefault(key, []).append(_history_entry(seq, env, time))
    stamp(doc, seq, env, time)


# ---------------------------------------------------------------- clusters
def new_cluster(cluster_id: str, clusterset: str, location: Doc, time: str) -> Doc:
    return {
        "id": cluster_id,
        "name": cluster_id,
        "kind": "Cluster",
        "clusterset": clusterset,
        "location": location,
        "clusterType": None,
        "state": "REQUESTED",
        "generation": None,
        "configHash": None,
        "spec": None,
        "desired": None,
        "endpoint": None,
        "caFingerprint": None,
        "credentialRef": None,
        "network": None,
        "resources": {},
        "infraServices": [],
        "failure": None,
        "retiring": False,
        "retirement": None,
        "rolloutId": None,
        "createdByRolloutId": None,
        "drain": None,
        "lastResourcesUpdate": None,
        "controlPlane": None,
        "lastDriftCorrection": None,
        "conditions": [],
        "createdAt": time,
        "updatedAt": time,
        "lastTransitionTime": time,
        "lastEventId": None,
        "lastEventSeq": None,
        "eventCount": 0,
    }


def _frozen(doc: Doc) -> bool:
    """Retiring or gone: lifecycle facts from before the retirement no longer change it."""
    return bool(doc["retiring"]) or doc["state"] == "DELETED"


def _set_state(doc: Doc, state: str, time: str) -> None:
    if doc["state"] != state:
        doc["state"] = state
        doc["lastTransitionTime"] = time
    if state != "FAILED":
        doc["failure"] = None


def _progress(doc: Doc, target: str, time: str) -> None:
    """A success fact of the creation pipeline: move forward, never back; clears a failure."""
    if _frozen(doc):
        return
    current = doc["state"]
    base = current
    if current == "FAILED":  # judge the fact against where the cluster was when it failed
        base = (doc["failure"] or {}).get("fromState") or "REQUESTED"
    if base == "UPDATING" and target != "READY":
        new = "UPDATING"
    elif base in _RANK:
        new = target if _RANK[target] >= _RANK[base] else base
    elif base in ("DRAINING", "DRAINED"):
        new = base
    else:  # pragma: no cover - every other state is handled above or frozen
        new = target
    _set_state(doc, new, time)


def _fail(doc: Doc, time: str, env: Envelope, **info: Any) -> None:
    current = doc["state"]
    from_state = current
    if current == "FAILED":  # failing again: keep where the cluster was before the first failure
        from_state = (doc["failure"] or {}).get("fromState") or "REQUESTED"
    doc["failure"] = {
        "code": info.get("code"),
        "message": info.get("message"),
        "retryable": info.get("retryable"),
        "operation": info.get("operation"),
        "step": info.get("step"),
        "service": info.get("service"),
        "object": info.get("object"),
        "fromState": from_state,
        "eventId": env.id,
        "time": time,
    }
    if current != "FAILED":
        doc["state"] = "FAILED"
        doc["lastTransitionTime"] = time


def _upsert_service(doc: Doc, name: str, version: str | None, state: str) -> None:
    for entry in doc["infraServices"]:
        if entry["name"] == name:
            if version is not None:
                entry["version"] = version
            entry["state"] = state
            return
    doc["infraServices"].append({"name": name, "version": version or "", "state": state})


def _condition(doc: Doc, ctype: str, status: bool, reason: str, message: str, time: str) -> Doc:
    """A Kubernetes-style condition; lastTransitionTime only moves when the status flips."""
    value = "True" if status else "False"
    previous = next((c for c in doc["conditions"] if c["type"] == ctype), None)
    since = previous["lastTransitionTime"] if previous and previous["status"] == value else time
    return {"type": ctype, "status": value, "reason": reason, "message": message, "lastTransitionTime": since}


def _refresh_conditions(doc: Doc, time: str) -> None:
    state = doc["state"]
    conds = [_condition(doc, "Ready", state == "READY", state.title(), f"cluster is {state}", time)]
    failure = doc["failure"]
    if failure:
        conds.append(_condition(doc, "Failed", True, str(failure["code"] or "Failed"),
                                str(failure["message"] or ""), time))  # fmt: skip
    if doc["retiring"] and state != "DELETED":
        reason = (doc["retirement"] or {}).get("reason") or "retiring"
        conds.append(_condition(doc, "Retiring", True, str(reason), "cluster is being retired", time))
    doc["conditions"] = conds


def _cluster_handler(fn: Callable[[Doc, m.ClusterEvent, Envelope, str], None]) -> _Handler:
    def handle(views: Views, seq: int, env: Envelope, payload: m.Event) -> None:
        assert isinstance(payload, m.ClusterEvent)
        time = ts(env.time)
        doc = views.clusters.get(payload.cluster_id)
        if doc is None:
            # Normally ClusterRequested comes first; a cluster first seen through a later fact still gets a view.
            location = payload.location.model_dump(mode="json", by_alias=True)
            doc = views.clusters[payload.cluster_id] = new_cluster(
                payload.cluster_id, payload.clusterset, location, time
            )
        else:
            fill_defaults(doc, new_cluster(payload.cluster_id, payload.clusterset, doc["location"], time))
        fn(doc, payload, env, time)
        _refresh_conditions(doc, time)
        _record(views, f"cluster:{payload.cluster_id}", doc, seq, env, time)

    return handle


def _requested(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterRequested)
    if p.rollout_id:
        doc["createdByRolloutId"] = p.rollout_id
    if doc["spec"] is not None:  # requested once; a second request for the same id changes nothing
        return
    doc.update(
        clusterType=p.cluster_type, generation=p.generation, configHash=p.config_hash, spec=_spec_doc(p.spec)
    )
    known = {s["name"] for s in doc["infraServices"]}
    doc["infraServices"] += [s for s in _requested_services(p.spec) if s["name"] not in known]


def _resource_provisioned(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterResourceProvisioned)
    if _frozen(doc):
        return
    doc["resources"][p.step] = p.resources
    _progress(doc, "PROVISIONING", time)


def _provisioned(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterProvisioned)
    if _frozen(doc):
        return
    doc["endpoint"] = p.endpoint
    doc["caFingerprint"] = p.ca_fingerprint
    doc["credentialRef"] = p.credential_ref
    doc["network"] = _network_doc(p.location.cloud, p.network)
    for step, resources in p.resources.items():
        doc["resources"][step] = resources
    _progress(doc, "PROVISIONED", time)


def _service_installed(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.InfraServiceInstalled)
    if _frozen(doc):
        return
    _upsert_service(doc, p.service, p.version, "INSTALLED")
    _progress(doc, "INSTALLING", time)


def _service_removed(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.InfraServiceRemoved)
    if _frozen(doc):
        return
    doc["infraServices"] = [s for s in doc["infraServices"] if s["name"] != p.service]


def _drift_corrected(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.InfraDriftCorrected)
    doc["lastDriftCorrection"] = {"time": time, "service": p.service, "version": p.version,
                                  "objects": sorted(p.objects)}  # fmt: skip


def _protection_updated(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterProtectionUpdated)
    doc["protected"] = p.protected


def _ready(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterReady)
    if _frozen(doc):
        return
    doc["endpoint"] = p.endpoint
    doc["clusterType"] = p.cluster_type
    desired = doc["desired"]
    if desired and desired.get("configHash") == p.config_hash:
        doc.update(generation=desired["generation"], spec=desired["spec"])
        doc["desired"] = None
    doc["configHash"] = p.config_hash
    installed = [s for s in p.infra_services if isinstance(s.get("name"), str)]
    if installed:
        doc["infraServices"] = [
            {"name": s["name"], "version": s.get("version", ""), "state": "INSTALLED"} for s in installed
        ]
    else:
        for entry in doc["infraServices"]:
            if entry["state"] == "PENDING":
                entry["state"] = "INSTALLED"
    _progress(doc, "READY", time)


def _update_requested(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterUpdateRequested)
    if _frozen(doc):
        return
    doc["desired"] = {
        "generation": p.generation, "configHash": p.config_hash, "spec": _spec_doc(p.spec), "changes": p.changes,
    }  # fmt: skip
    known = {s["name"] for s in doc["infraServices"]}
    doc["infraServices"] += [s for s in _requested_services(p.spec) if s["name"] not in known]
    if doc["state"] in ("READY", "UPDATING"):
        _set_state(doc, "UPDATING", time)


def _resources_updated(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    """The cloud side of an in-place update is done; the cluster stays UPDATING until ClusterReady."""
    assert isinstance(p, m.ClusterResourcesUpdated)
    if _frozen(doc):
        return
    for step, resources in p.resources.items():
        doc["resources"][step] = resources
    doc["lastResourcesUpdate"] = {"generation": p.generation, "configHash": p.config_hash,
                                  "changed": sorted(p.changed), "time": time}  # fmt: skip
    failure = doc["failure"] or {}
    if doc["state"] == "FAILED" and failure.get("fromState") == "UPDATING" and failure.get("operation") == "update":
        _set_state(doc, "UPDATING", time)  # the retried cloud update went through: the failure is over


def _blank_drain() -> Doc:
    return {"requestedAt": None, "drainedAt": None, "timedOut": False, "timeoutSeconds": None, "evicted": None,
            "remaining": None}  # fmt: skip


def _drain_requested(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterDrainRequested)
    if _frozen(doc):
        return
    doc["rolloutId"] = p.rollout_id or doc["rolloutId"]
    if doc["state"] in ("DRAINING", "DRAINED"):
        return
    doc["drain"] = {**_blank_drain(), "requestedAt": time, "timeoutSeconds": p.timeout_seconds}
    _set_state(doc, "DRAINING", time)


def _drained(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterDrained)
    if _frozen(doc):
        return
    doc["rolloutId"] = p.rollout_id or doc["rolloutId"]
    doc["drain"] = {**_blank_drain(), **(doc["drain"] or {}), "drainedAt": time, "timedOut": p.timed_out,
                    "evicted": p.evicted, "remaining": p.remaining}  # fmt: skip
    _set_state(doc, "DRAINED", time)


def _uncordon_requested(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterUncordonRequested)
    if _frozen(doc) or doc["state"] not in ("DRAINING", "DRAINED"):
        return
    doc["drain"] = {**_blank_drain(), **(doc["drain"] or {}), "uncordonRequestedAt": time, "uncordonReason": p.reason}


def _uncordoned(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterUncordoned)
    if _frozen(doc) or doc["state"] not in ("DRAINING", "DRAINED"):
        return
    doc["drain"] = {**_blank_drain(), **(doc["drain"] or {}), "uncordonedAt": time}
    _set_state(doc, "READY", time)


def _retirement_requested(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterRetirementRequested)
    if doc["state"] == "DELETED" or doc["retiring"]:
        return
    doc["retiring"] = True
    doc["retirement"] = {"reason": p.reason, "drain": p.drain, "requestedAt": time, "rolloutId": p.rollout_id}
    doc["rolloutId"] = p.rollout_id or doc["rolloutId"]
    _set_state(doc, "DELETING", time)


def _resource_deprovisioned(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterResourceDeprovisioned)
    if doc["state"] == "DELETED":
        return
    doc["resources"].pop(p.step, None)
    if not doc["retiring"]:
        doc["retiring"] = True
        doc["retirement"] = {"reason": None, "drain": False, "requestedAt": time, "rolloutId": None}
    _set_state(doc, "DELETING", time)


def _deprovisioned(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterDeprovisioned)
    if doc["state"] == "DELETED":
        return
    doc["retiring"] = True
    doc["resources"] = {}
    _set_state(doc, "DELETED", time)


def _provisioning_failed(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterProvisioningFailed)
    if doc["state"] == "DELETED":
        return
    if p.operation == "provision" and doc["retiring"]:
        return  # a provisioning attempt that lost the race against the retirement: no longer relevant
    _fail(doc, time, env, code=p.code, message=p.message, retryable=p.retryable, operation=p.operation,
          step=p.step)  # fmt: skip


def _infra_failed(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterInfraFailed)
    if _frozen(doc):
        return
    _upsert_service(doc, p.service, None, "FAILED")
    _fail(doc, time, env, code="InfraServiceFailed", message=p.reason, retryable=p.retryable,
          operation="install", service=p.service, object=p.object)  # fmt: skip


# ---------------------------------------------------------------- cluster sets
def new_clusterset(name: str, time: str) -> Doc:
    return {
        "name": name,
        "kind": "ClusterSet",
        "accepted": False,
        "deleted": False,
        "generation": None,
        "configHash": None,
        "clusterType": None,
        "location": None,
        "count": None,
        "spec": None,
        "updateStrategy": None,
        "lastRejection": None,
        "labels": {},
        "lastChange": None,
        "rollout": None,
        "fleetRollout": None,
        "controlPlanePipeline": None,
        "convergedGeneration": None,
        "convergedConfigHash": None,
        "convergedAt": None,
        "upToDate": False,
        "lastUpdateFailure": None,
        "retiredClusters": [],
        "protected": False,
        "createdAt": time,
        "acceptedAt": None,
        "retiredAt": None,
        "updatedAt": time,
        "lastEventId": None,
        "lastEventSeq": None,
        "eventCount": 0,
    }


def _clusterset_handler(fn: Callable[[Doc, Any, Envelope, str], None]) -> _Handler:
    def handle(views: Views, seq: int, env: Envelope, payload: m.Event) -> None:
        name = getattr(payload, "clusterset", None)
        if not name:
            return  # a rejected document without a usable name: nothing to show it under
        time = ts(env.time)
        doc = views.clustersets.get(name)
        if doc is None:
            doc = views.clustersets[name] = new_clusterset(name, time)
        else:
            fill_defaults(doc, new_clusterset(name, time))
        fn(doc, payload, env, time)
        # The planner reported the current generation converged (a new generation is not, until it says so).
        doc["upToDate"] = doc["convergedGeneration"] is not None and doc["convergedGeneration"] == doc["generation"]
        _record(views, f"clusterset:{name}", doc, seq, env, time)

    return handle


def _set_accepted(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterSetAccepted)
    current = doc["generation"]
    if current is not None and (p.generation < current or (p.generation == current and doc["deleted"])):
        return  # an older generation (or the one already retired) never overwrites a newer state
    if current is None or p.generation > current:  # what changed with this generation (a re-apply changes nothing)
        doc["lastChange"] = {"generation": p.generation, "updatePath": p.update_path, "changes": list(p.changes),
                             "fleetRolloutId": p.fleet_rollout_id, "time": time}  # fmt: skip
    doc.update(
        accepted=True,
        labels=dict(p.labels),
        deleted=False,
        generation=p.generation,
        configHash=p.config_hash,
        clusterType=p.cluster_type,
        location=p.location.model_dump(mode="json", by_alias=True),
        count=p.count,
        protected=p.protected,
        spec=_spec_doc(p.spec),
        updateStrategy=p.update_strategy.model_dump(mode="json", by_alias=True),
        acceptedAt=time,
        retiredAt=None,
        retiredClusters=[],
    )


def _set_rejected(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterSetRejected)
    doc["lastRejection"] = {
        "eventId": env.id,
        "time": time,
        "cloud": p.cloud,
        "region": p.region,
        "errors": [e.model_dump(mode="json") for e in p.errors],
    }


def _set_retired(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterSetRetired)
    if doc["generation"] is not None and p.generation < doc["generation"]:
        return  # retirement of a generation that was since re-applied
    doc.update(deleted=True, retiredAt=time, retiredClusters=sorted(p.clusters), generation=p.generation)
    if doc["location"] is None:
        doc["location"] = p.location.model_dump(mode="json", by_alias=True)


def _set_rollout(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    """The set's current (latest) rollout, in short; the whole story is the rollout's own document."""
    summary = ro.follow(doc["rollout"], p, env.type, time)
    if summary is not None:
        doc["rollout"] = summary


def _patch_requested(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterSetPatchRequested)
    doc["fleetRollout"] = {"fleetRolloutId": p.fleet_rollout_id, "stage": p.stage, "patch": p.patch,
                           "requestedAt": time}  # fmt: skip


def _converged(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterSetConverged)
    if doc["convergedGeneration"] is not None and p.generation < doc["convergedGeneration"]:
        return  # an older generation's convergence never hides a newer one
    doc.update(convergedGeneration=p.generation, convergedConfigHash=p.config_hash, convergedAt=time)
    failure = doc["lastUpdateFailure"]
    if failure and failure["generation"] <= p.generation:
        doc["lastUpdateFailure"] = None


def _update_failed(doc: Doc, p: Any, env: Envelope, time: str) -> None:
    assert isinstance(p, m.ClusterSetUpdateFailed)
    converged = doc["convergedGeneration"]
    if converged is not None and p.generation <= converged:
        return  # that generation converged after all (a retry went through)
    doc["lastUpdateFailure"] = {"generation": p.generation, "configHash": p.config_hash,
                                "clusterIds": sorted(p.cluster_ids), "reason": p.reason, "eventId": env.id,
                                "time": time, "fleetRolloutId": p.fleet_rollout_id}  # fmt: skip


# ---------------------------------------------------------------- rollouts (documents of their own)
def _rollout_doc(views: Views, rollout_id: str, clusterset: str, location: Doc, time: str) -> Doc:
    return document(views.rollouts, rollout_id, ro.new_rollout(rollout_id, clusterset, location, time))


def _rollout_fact(views: Views, seq: int, env: Envelope, payload: m.Event) -> None:
    assert isinstance(payload, m.RolloutEvent | m.RolloutRequested)
    time = ts(env.time)
    location = payload.location.model_dump(mode="json", by_alias=True)
    doc = _rollout_doc(views, payload.rollout_id, payload.clusterset, location, time)
    ro.rollout_fact(doc, payload, env, time)
    stamp(doc, seq, env, time)


def _rollout_cluster(views: Views, seq: int, env: Envelope, payload: m.Event) -> None:
    """A surge cluster a rotation created, or a cluster it retired."""
    assert isinstance(payload, m.ClusterRequested | m.ClusterRetirementRequested)
    if not payload.rollout_id:
        return
    time = ts(env.time)
    location = payload.location.model_dump(mode="json", by_alias=True)
    doc = _rollout_doc(views, payload.rollout_id, payload.clusterset, location, time)
    ro.rollout_cluster(doc, payload)
    stamp(doc, seq, env, time)


def _fleet_doc(views: Views, rollout_id: str, time: str) -> Doc:
    return document(views.fleet_rollouts, rollout_id, ro.new_fleet(rollout_id, time))


def _fleet_fact(views: Views, seq: int, env: Envelope, payload: m.Event) -> None:
    assert isinstance(payload, m.FleetRolloutEvent)
    time = ts(env.time)
    doc = _fleet_doc(views, payload.rollout_id, time)
    ro.fleet_fact(doc, payload, env, time)
    stamp(doc, seq, env, time)


def _fleet_join(views: Views, seq: int, env: Envelope, payload: m.Event) -> None:
    """A set-level fact that names a fleet rollout: that rollout's entry for the set."""
    fleet_rollout_id = getattr(payload, "fleet_rollout_id", None)
    if not fleet_rollout_id:
        return
    time = ts(env.time)
    doc = _fleet_doc(views, fleet_rollout_id, time)
    ro.fleet_join(doc, payload, env, time)
    stamp(doc, seq, env, time)


# ---------------------------------------------------------------- control-plane operations and pipelines
def _pipeline_doc(views: Views, pipeline_id: str, clusterset: str, location: Doc, time: str) -> Doc:
    return document(views.cp_pipelines, pipeline_id, cp.new_pipeline(pipeline_id, clusterset, location, time))


def _operation_fact(views: Views, seq: int, env: Envelope, payload: m.Event) -> None:
    """A migration or upgrade fact: the operation, then the cluster's and the pipeline's view of it."""
    assert isinstance(payload, m.ControlPlaneEvent)
    time = ts(env.time)
    location = payload.location.model_dump(mode="json", by_alias=True)
    blank = cp.new_operation(payload.operation_id, cp.OPERATION_KIND[env.type], payload.cluster_id,
                             payload.clusterset, location, time)  # fmt: skip
    operation = document(views.cp_operations, payload.operation_id, blank)
    cp.operation_fact(operation, payload, env, time)
    stamp(operation, seq, env, time)

    def on_cluster(doc: Doc, p: Any, env: Envelope, time: str) -> None:
        # Shown on the cluster without changing its state: it keeps serving throughout.
        if doc["state"] != "DELETED":
            doc["controlPlane"] = cp.cluster_fact(doc["controlPlane"], operation, p, env.type)

    _cluster_handler(on_cluster)(views, seq, env, payload)
    if payload.pipeline_id:
        pipeline = _pipeline_doc(views, payload.pipeline_id, payload.clusterset, location, time)
        cp.pipeline_join(pipeline, operation, payload, env.type, time)
        stamp(pipeline, seq, env, time)


def _pipeline_fact(views: Views, seq: int, env: Envelope, payload: m.Event) -> None:
    """A pipeline fact: the pipeline, then its set's summary of it."""
    assert isinstance(payload, cp.PipelineFact)
    time = ts(env.time)
    location = payload.location.model_dump(mode="json", by_alias=True)
    pipeline = _pipeline_doc(views, payload.pipeline_id, payload.clusterset, location, time)
    cp.pipeline_fact(pipeline, payload, env, time)
    stamp(pipeline, seq, env, time)

    def on_set(doc: Doc, p: Any, env: Envelope, time: str) -> None:
        summary = cp.follow_pipeline(doc["controlPlanePipeline"], pipeline, env.type)
        if summary is not None:
            doc["controlPlanePipeline"] = summary

    _clusterset_handler(on_set)(views, seq, env, payload)


_Handler = Callable[[Views, int, Envelope, m.Event], None]

_CLUSTER_HANDLERS: dict[str, Callable[[Doc, Any, Envelope, str], None]] = {
    "ClusterRequested": _requested,
    "ClusterResourceProvisioned": _resource_provisioned,
    "ClusterProvisioned": _provisioned,
    "InfraServiceInstalled": _service_installed,
    "ClusterReady": _ready,
    "ClusterProtectionUpdated": _protection_updated,
    "InfraServiceRemoved": _service_removed,
    "InfraDriftCorrected": _drift_corrected,
    "ClusterUpdateRequested": _update_requested,
    "ClusterResourcesUpdated": _resources_updated,
    "ClusterDrainRequested": _drain_requested,
    "ClusterDrained": _drained,
    "ClusterUncordonRequested": _uncordon_requested,
    "ClusterUncordoned": _uncordoned,
    "ClusterRetirementRequested": _retirement_requested,
    "ClusterResourceDeprovisioned": _resource_deprovisioned,
    "ClusterDeprovisioned": _deprovisioned,
    "ClusterProvisioningFailed": _provisioning_failed,
    "ClusterInfraFailed": _infra_failed,
}
_SET_HANDLERS: dict[str, Callable[[Doc, Any, Envelope, str], None]] = {
    "ClusterSetAccepted": _set_accepted,
    "ClusterSetRejected": _set_rejected,
    "ClusterSetRetired": _set_retired,
    "ClusterSetPatchRequested": _patch_requested,
    "ClusterSetConverged": _converged,
    "ClusterSetUpdateFailed": _update_failed,
    **dict.fromkeys(ro.ROLLOUT_EVENT_STATE, _set_rollout),
}
# Every document an event changes, in order. `touched` must name each of them (see its docstring).
_HANDLERS: dict[str, list[_Handler]] = {
    **{name: [_cluster_handler(fn)] for name, fn in _CLUSTER_HANDLERS.items()},
    **{name: [_clusterset_handler(fn)] for name, fn in _SET_HANDLERS.items()},
    **{name: [_fleet_fact] for name in _FLEET_ROLLOUT_TYPES},
    **{name: [_operation_fact] for name in cp.OPERATION_KIND},
    **{name: [_pipeline_fact] for name in cp.PIPELINE_TYPES},
}
for _name in ro.ROLLOUT_EVENT_STATE:
    _HANDLERS[_name].append(_rollout_fact)
for _name in ("ClusterRequested", "ClusterRetirementRequested"):
    _HANDLERS[_name].append(_rollout_cluster)
for _name in ("ClusterSetAccepted", "ClusterSetPatchRequested", "ClusterSetRejected", "ClusterSetConverged",
              "ClusterSetUpdateFailed", *ro.ROLLOUT_EVENT_STATE):  # fmt: skip
    _HANDLERS[_name].append(_fleet_join)

# Every FLEET event type must be projected: a new type without a handler fails the unit tests.
HANDLED_TYPES: frozenset[str] = frozenset(_HANDLERS)
