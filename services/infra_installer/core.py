"""Pure installer logic: per-cluster state, `evolve` and `next_action`. No I/O.

The installer learns a cluster's spec from `ClusterRequested` and its API endpoint from
`ClusterProvisioned` (either may be handled first). Once both are known it installs the
spec's infra services one per message, in catalog dependency order: each handled message
installs at most one service and emits `InfraServiceInstalled`, and that event, consumed
again, advances the chain. A crash therefore resumes at the next service. After the last
service (or at once when none are listed) it emits `ClusterReady`. Retirement stops
everything, and a recorded failure (`ClusterInfraFailed`) stops the chain.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.catalog import install_order, known_services
from shared.events.clusterset import ClusterSpec, InfraServiceRef, Location
from shared.events.models import (
    ClusterEvent,
    ClusterInfraFailed,
    ClusterProvisioned,
    ClusterReady,
    ClusterRequested,
    ClusterRetirementRequested,
    ClusterUpdateRequested,
    Event,
    InfraDriftCorrected,
    InfraReconcileRequested,
    InfraServiceInstalled,
    InfraServiceRemoved,
)


class InfraFailure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    service: str
    reason: str
    retryable: bool


class InstallerState(BaseModel):
    """What the installer knows about one cluster (aggregate key = cluster id)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster_id: str
    clusterset: str
    location: Location
    # From ClusterRequested (the highest generation seen wins, so arrival order does not matter).
    generation: int = 0
    cluster_type: str | None = None
    config_hash: str | None = None
    spec: ClusterSpec | None = None
    # From ClusterProvisioned.
    provisioned: bool = False
    endpoint: str | None = None
    credential_ref: str | None = None
    ca_fingerprint: str | None = None
    # Provisioning results per step (log stream, network ...): what bundles are rendered from.
    resources: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Progress: service name -> version installed (from our own InfraServiceInstalled events).
    installed: dict[str, str] = Field(default_factory=dict)
    # ... and the config hash each was rendered from (bundles depend on values, node pools, version).
    installed_for: dict[str, str] = Field(default_factory=dict)
    ready: bool = False
    failure: InfraFailure | None = None
    retired: bool = False


@dataclass(frozen=True)
class PlannedService:
    name: str
    version: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Install:
    """Install (ensure) one service, wait until healthy, then emit InfraServiceInstalled."""

    service: PlannedService


@dataclass(frozen=True)
class Remove:
    """Uninstall a service the spec no longer lists (prune its objects), then emit InfraServiceRemoved."""

    name: str
    version: str


@dataclass(frozen=True)
class EmitReady:
    services: tuple[PlannedService, ...]


@dataclass(frozen=True)
class Fail:
    """A failure known without touching the cluster (e.g. a service the catalog does not know)."""

    service: str
    reason: str
    retryable: bool


Action = Install | Remove | EmitReady | Fail | None

# Events this core understands; anything else leaves the state as it is.
HANDLED = (ClusterRequested, ClusterProvisioned, InfraServiceInstalled, ClusterReady, ClusterInfraFailed,
           ClusterRetirementRequested, ClusterUpdateRequested, InfraServiceRemoved, InfraReconcileRequested,
           InfraDriftCorrected)  # fmt: skip


# ---------------------------------------------------------------- plan
def plan(spec: ClusterSpec) -> tuple[list[PlannedService], list[str]]:
    """The services to install in dependency order, and any names the catalog does not know.

    Versions come from the catalog unless the spec's InfraServiceRef pins one.
    """
    refs: dict[str, InfraServiceRef | None] = {}
    for entry in spec.infra_services:
        name = entry if isinstance(entry, str) else entry.name
        refs.setdefault(name, None if isinstance(entry, str) else entry)  # first mention wins
    catalog = known_services()
    unknown = [n for n in refs if n not in catalog]
    ordered = install_order([n for n in refs if n in catalog])
    services = []
    for name in ordered:
        ref = refs[name]
        version = (ref.version if ref is not None and ref.version else None) or catalog[name].version
        services.append(PlannedService(name=name, version=version, values=dict(ref.values) if ref else {}))
    return services, unknown


# ---------------------------------------------------------------- evolve
def _initial(event: ClusterEvent) -> InstallerState:
    return InstallerState(cluster_id=event.cluster_id, clusterset=event.clusterset, location=event.location)


def evolve(state: InstallerState | None, event: Event) -> InstallerState | None:
    """Fold one event into the state. Idempotent: applying an event twice equals applying it once."""
    if not isinstance(event, HANDLED):
        return state
    assert isinstance(event, ClusterEvent)
    if state is None:
        state = _initial(event)
    match event:
        case ClusterRequested():
            if state.spec is not None and event.generation <= state.generation:
                return state  # an older or the same request: keep what we have
            return state.model_copy(update=dict(generation=event.generation, cluster_type=event.cluster_type,
                                                config_hash=event.config_hash, spec=event.spec))  # fmt: skip
        case ClusterUpdateRequested():
            # In place: the new spec is installed over the old one; READY again once it all is.
            if event.generation <= state.generation:
                return state
            return state.model_copy(update=dict(generation=event.generation, config_hash=event.config_hash,
                                                spec=event.spec, ready=False, failure=None))  # fmt: skip
        case InfraServiceRemoved():
            return state.model_copy(update=dict(
                installed={k: v for k, v in state.installed.items() if k != event.service},
                installed_for={k: v for k, v in state.installed_for.items() if k != event.service}))  # fmt: skip
        case InfraReconcileRequested():
            if event.reason == "retry" and state.failure is not None and state.failure.retryable:
                return state.model_copy(update=dict(failure=None))
            return state
        case ClusterProvisioned():
            return state.model_copy(update=dict(provisioned=True, endpoint=event.endpoint,
                                                credential_ref=event.credential_ref,
                                                ca_fingerprint=event.ca_fingerprint,
                                                resources=event.resources))  # fmt: skip
        case InfraServiceInstalled():
            return state.model_copy(update=dict(installed={**state.installed, event.service: event.version},
                                                installed_for={**state.installed_for,
                                                               event.service: event.config_hash}))  # fmt: skip
        case ClusterReady():
            return state.model_copy(update=dict(ready=True))
        case ClusterInfraFailed():
            failure = InfraFailure(service=event.service, reason=event.reason, retryable=event.retryable)
            return state.model_copy(update=dict(failure=failure))
        case ClusterRetirementRequested():
            return state.model_copy(update=dict(retired=True))
    return state


def replay(events: Iterable[Event], state: InstallerState | None = None) -> InstallerState | None:
    for event in events:
        state = evolve(state, event)
    return state


# ---------------------------------------------------------------- decide
def next_action(state: InstallerState | None) -> Action:
    """What to do next for this cluster, or None when there is nothing to do (yet, or any more)."""
    if state is None or state.retired or state.ready or state.failure is not None:
        return None
    if state.spec is None or not state.provisioned:
        return None  # install starts once both the spec and the provisioning result are known
    services, unknown = plan(state.spec)
    if unknown:
        return Fail(service=unknown[0], reason=f"not in the infra-service catalog: {', '.join(unknown)}",
                    retryable=False)  # fmt: skip
    for service in services:
        # Re-apply what was rendered from another spec too: server-side apply makes unchanged objects no-ops.
        if (state.installed.get(service.name) != service.version
                or state.installed_for.get(service.name, "") != (state.config_hash or "")):  # fmt: skip
            return Install(service)
    wanted = {s.name for s in services}
    # Prune dependents before what they depend on: reverse of the install order.
    catalog = known_services()
    for name in reversed(install_order([n for n in state.installed if n in catalog])):
        if name not in wanted:
            return Remove(name, state.installed[name])
    for name in sorted(set(state.installed) - wanted - set(catalog)):
        return Remove(name, state.installed[name])
    return EmitReady(tuple(services))


def drift_check(state: InstallerState | None) -> list[PlannedService]:
    """The services whose objects a drift check compares: only on a READY, live cluster."""
    if state is None or state.retired or not state.ready or state.spec is None:
        return []
    services, _ = plan(state.spec)
    return [s for s in services if state.installed.get(s.name) == s.version]


# ---------------------------------------------------------------- event payloads
def installed_event(state: InstallerState, service: PlannedService) -> InfraServiceInstalled:
    return InfraServiceInstalled(location=state.location, cluster_id=state.cluster_id, clusterset=state.clusterset,
                                 service=service.name, version=service.version,
                                 config_hash=state.config_hash or "")  # fmt: skip


def removed_event(state: InstallerState, action: Remove) -> InfraServiceRemoved:
    return InfraServiceRemoved(location=state.location, cluster_id=state.cluster_id, clusterset=state.clusterset,
                               service=action.name, version=action.version)  # fmt: skip


def drift_event(state: InstallerState, service: PlannedService, objects: list[str]) -> InfraDriftCorrected:
    return InfraDriftCorrected(location=state.location, cluster_id=state.cluster_id, clusterset=state.clusterset,
                               service=service.name, version=service.version, objects=objects)  # fmt: skip


def ready_event(state: InstallerState, action: EmitReady) -> ClusterReady:
    return ClusterReady(
        location=state.location, cluster_id=state.cluster_id, clusterset=state.clusterset,
        cluster_type=state.cluster_type or "", config_hash=state.config_hash or "", endpoint=state.endpoint or "",
        infra_services=[{"name": s.name, "version": s.version} for s in action.services],
    )  # fmt: skip


def failed_event(state: InstallerState, service: str, reason: str, retryable: bool, obj: str | None = None
                 ) -> ClusterInfraFailed:  # fmt: skip
    return ClusterInfraFailed(location=state.location, cluster_id=state.cluster_id, clusterset=state.clusterset,
                              service=service, object=obj, reason=reason[:2000], retryable=retryable)  # fmt: skip
