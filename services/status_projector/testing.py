"""Realistic, deterministic FLEET histories for tests and demos (no I/O).

Ids are derived from causes (as the services derive them) and times advance by a fixed step,
so the same call always yields the same envelopes: unit tests compare projections byte for
byte, integration tests publish them through the real bus.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from shared.catalog import CATALOG, install_order
from shared.events import Envelope, new_event, validate_clusterset
from shared.events import models as m
from shared.events.clusterset import ClusterSet

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
STEP = timedelta(seconds=1)


def parse(document: dict[str, Any]) -> ClusterSet:
    model, errors = validate_clusterset(document)
    if model is None:
        raise ValueError(f"invalid ClusterSet: {errors}")
    return model


def accepted(cs: ClusterSet, *, generation: int = 1, time: datetime = T0, event_id: str | None = None) -> Envelope:
    spec = cs.spec.cluster_spec()
    payload = m.ClusterSetAccepted(
        location=cs.metadata.location, clusterset=cs.metadata.name, generation=generation,
        cluster_type=cs.metadata.cluster_type, count=cs.spec.count, config_hash=spec.config_hash(), spec=spec,
        update_strategy=cs.spec.update_strategy, document_hash=f"doc-{generation}",
    )  # fmt: skip
    return new_event(payload, source="planner", time=time,
                     event_id=event_id or f"accepted-{cs.metadata.name}-{generation}")  # fmt: skip


def _clock(start: datetime) -> Iterable[datetime]:
    t = start
    while True:
        yield t
        t += STEP


def provision(cs: ClusterSet, cause: Envelope, cluster_id: str, start: datetime) -> list[Envelope]:
    """ClusterRequested → resources ×5 → ClusterProvisioned → InfraServiceInstalled ×n → ClusterReady."""
    loc, name, spec = cs.metadata.location, cs.metadata.name, cs.spec.cluster_spec()
    common: dict[str, Any] = dict(location=loc, cluster_id=cluster_id, clusterset=name)
    clock = iter(_clock(start))
    out: list[Envelope] = []
    requested = new_event(
        m.ClusterRequested(**common, serial=0, cluster_type=cs.metadata.cluster_type, generation=1,
                           config_hash=spec.config_hash(), spec=spec),
        source="planner", cause=cause, discriminator=cluster_id, time=next(clock),
    )  # fmt: skip
    out.append(requested)
    resources: dict[str, dict[str, Any]] = {}
    for step in m.PROVISION_STEPS:
        resources[step] = {"id": f"{step}-{cluster_id}", "arn": f"arn:sim:{loc.region}:{step}/{cluster_id}"}
        out.append(new_event(m.ClusterResourceProvisioned(**common, step=step, resources=resources[step]),
                             source="cloud_provisioner", cause=requested, discriminator=step, time=next(clock)))
    endpoint = f"https://{cluster_id}.example.{loc.cloud}.test"
    provisioned = new_event(
        m.ClusterProvisioned(**common, endpoint=endpoint, ca_fingerprint=f"sha256:{cluster_id}",
                             network=m.NetworkInfo(network_id=f"net-{cluster_id}",
                                                   subnet_ids=[f"subnet-{cluster_id}-{i}" for i in range(3)]),
                             resources=resources, credential_ref=f"sim://{cluster_id}/token"),
        source="cloud_provisioner", cause=requested, time=next(clock),
    )  # fmt: skip
    out.append(provisioned)
    installed: list[dict[str, str]] = []
    for service in install_order(spec.infra_service_names()):
        version = CATALOG[service].version
        installed.append({"name": service, "version": version})
        out.append(new_event(m.InfraServiceInstalled(**common, service=service, version=version),
                             source="infra_installer", cause=provisioned, discriminator=service, time=next(clock)))
    out.append(new_event(
        m.ClusterReady(**common, cluster_type=cs.metadata.cluster_type, config_hash=spec.config_hash(),
                       endpoint=endpoint, infra_services=installed),
        source="infra_installer", cause=provisioned, time=next(clock),
    ))  # fmt: skip
    return out


RetireReason = Literal["scale-down", "clusterset-deleted", "rotation", "manual"]


def retire(cs: ClusterSet, cause: Envelope, cluster_id: str, start: datetime,
           reason: RetireReason = "scale-down") -> list[Envelope]:  # fmt: skip
    """ClusterRetirementRequested → resources deprovisioned ×5 (reverse order) → ClusterDeprovisioned."""
    common: dict[str, Any] = dict(location=cs.metadata.location, cluster_id=cluster_id, clusterset=cs.metadata.name)
    clock = iter(_clock(start))
    requested = new_event(m.ClusterRetirementRequested(**common, reason=reason), source="planner", cause=cause,
                          discriminator=f"retire:{cluster_id}", time=next(clock))  # fmt: skip
    out = [requested]
    for step in reversed(m.PROVISION_STEPS):
        out.append(new_event(m.ClusterResourceDeprovisioned(**common, step=step), source="cloud_provisioner",
                             cause=requested, discriminator=step, time=next(clock)))  # fmt: skip
    out.append(new_event(m.ClusterDeprovisioned(**common), source="cloud_provisioner", cause=requested,
                         time=next(clock)))  # fmt: skip
    return out


def interleave(*histories: list[Envelope]) -> list[Envelope]:
    """Round-robin merge, as concurrent clusters' facts land in the stream."""
    out: list[Envelope] = []
    longest = max((len(h) for h in histories), default=0)
    for i in range(longest):
        out.extend(h[i] for h in histories if i < len(h))
    return out


def fleet_history(cs: ClusterSet, cluster_ids: list[str], retired: Iterable[str] = ()) -> list[Envelope]:
    """A set accepted, its clusters provisioned concurrently, then the `retired` ones retired."""
    acc = accepted(cs)
    events = [acc, *interleave(*(provision(cs, acc, cid, T0 + STEP * (1 + i)) for i, cid in enumerate(cluster_ids)))]
    later = T0 + timedelta(minutes=30)
    for i, cid in enumerate(retired):
        events += retire(cs, acc, cid, later + timedelta(minutes=i))
    return events
