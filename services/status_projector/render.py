"""Read-time shapes built from stored documents. Pure.

What depends on more than one document is derived when read rather than stored: whether a
cluster is outdated (its configHash against its set's current one) and a set's status
(counts, ready clusters, its member clusters in the shape of clusterset-status.yaml). That
keeps a write O(1) per event however large a set is, and a new set spec marks every member
outdated at once without rewriting thousands of cluster documents. A cluster's control plane
is what its operations reported, the spec filling in what no operation has changed yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.status_projector import controlplane as cp
from services.status_projector import rollouts as ro
from services.status_projector.core import CLUSTER_STATES, Doc


def is_outdated(cluster: Doc, set_config_hash: str | None) -> bool:
    """Built from another spec than its set's current one (gone clusters are never outdated)."""
    if cluster.get("state") == "DELETED" or not set_config_hash or not cluster.get("configHash"):
        return False
    return bool(cluster["configHash"] != set_config_hash)


def control_plane(cluster: Doc) -> Doc:
    """Mode and HA from the spec until a migration reports its members; the version the last upgrade reached,
    else the spec's."""
    spec = cluster.get("spec") or {}
    wanted = spec.get("controlPlane") or {}
    facts = {**cp.blank_control_plane(), **(cluster.get("controlPlane") or {})}
    return {**facts, "mode": wanted.get("mode"), "ha": facts["ha"] if facts["ha"] is not None else wanted.get("ha"),
            "version": facts["version"] or spec.get("kubernetesVersion")}  # fmt: skip


def cluster_view(cluster: Doc, set_config_hash: str | None) -> Doc:
    return {**cluster, "protected": bool(cluster.get("protected")), "outdated": is_outdated(cluster, set_config_hash),
            "controlPlane": control_plane(cluster)}  # fmt: skip


def member_status(cluster: Doc, set_config_hash: str | None) -> Doc:
    """One entry of a set's `status.clusters`, as in ../shared/examples/clusterset-status.yaml."""
    spec = cluster.get("spec") or {}
    services = [s if isinstance(s, str) else s.get("name") for s in spec.get("infraServices") or []]
    return {
        "name": cluster["name"],
        "kind": "Cluster",
        "metadata": {"location": cluster.get("location"), "clusterType": cluster.get("clusterType")},
        "spec": {
            "configHash": cluster.get("configHash"),
            "generation": cluster.get("generation"),
            "kubernetesVersion": spec.get("kubernetesVersion"),
            "features": spec.get("features") or [],
            "nodePools": spec.get("nodePools") or [],
            "infraServices": services,
            "tags": spec.get("tags") or {},
        },
        "status": {
            "state": cluster.get("state"),
            "protected": bool(cluster.get("protected")),
            "outdated": is_outdated(cluster, set_config_hash),
            "endpoint": cluster.get("endpoint"),
            "network": cluster.get("network"),
            "infraServices": cluster.get("infraServices") or [],
            "failure": cluster.get("failure"),
            "lastTransitionTime": cluster.get("lastTransitionTime"),
            "conditions": cluster.get("conditions") or [],
        },
    }


def state_counts(states: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(CLUSTER_STATES, 0)
    for state in states:
        if state in counts:
            counts[state] += 1
    return counts


def set_status(clusterset: Doc, counts: dict[str, int], members: list[Doc] | None) -> Doc:
    """A set's status. `members` (cluster docs, any order) adds `clusters` and the outdated count."""
    status: dict[str, Any] = {
        "observedGeneration": clusterset.get("generation"),
        "desiredClusters": 0 if clusterset.get("deleted") else clusterset.get("count"),
        "currentClusters": sum(n for s, n in counts.items() if s != "DELETED"),
        "readyClusters": counts.get("READY", 0),
        "counts": counts,
    }
    if members is not None:
        live = sorted((c for c in members if c.get("state") != "DELETED"), key=lambda c: str(c["name"]))
        set_hash = clusterset.get("configHash")
        status["outdatedClusters"] = sum(1 for c in live if is_outdated(c, set_hash))
        status["updatedClusters"] = sum(
            1 for c in live if c.get("state") == "READY" and not is_outdated(c, set_hash)
        )
        status["clusters"] = [member_status(c, set_hash) for c in live]
    return status


def clusterset_view(clusterset: Doc, members: list[Doc]) -> Doc:
    counts = state_counts(str(c.get("state")) for c in members)
    return {**clusterset, "status": set_status(clusterset, counts, members)}


def clusterset_summary(clusterset: Doc, counts: dict[str, int]) -> Doc:
    """A set in a listing: its document and counts, without member details."""
    return {**clusterset, "status": set_status(clusterset, counts, None)}


def discovery_entry(cluster: Doc) -> Doc:
    """What another control plane needs to reach a READY cluster: no secrets, only references."""
    spec = cluster.get("spec") or {}
    return {
        "id": cluster["id"],
        "name": cluster["name"],
        "clusterset": cluster.get("clusterset"),
        "clusterType": cluster.get("clusterType"),
        "location": cluster.get("location"),
        "endpoint": cluster.get("endpoint"),
        "caFingerprint": cluster.get("caFingerprint"),
        "configHash": cluster.get("configHash"),
        "kubernetesVersion": spec.get("kubernetesVersion"),
        "features": spec.get("features") or [],
        "tags": spec.get("tags") or {},
        "infraServices": cluster.get("infraServices") or [],
        "readySince": cluster.get("lastTransitionTime"),
    }


def rollout_listing(rollout: Doc) -> Doc:
    """A rollout in a listing: without its unbounded lists (timeline, per-set entries, cluster ids)."""
    return ro.listing(rollout)


def migration_listing(doc: Doc) -> Doc:
    """A migration, upgrade or pipeline in a listing: without its step timeline or per-cluster entries."""
    return cp.listing(doc)
