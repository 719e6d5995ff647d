"""Pure installer logic: per-cluster state, `evolve` and `next_action`. No I/O.

The installer learns a cluster's spec from `ClusterRequested` and its API endpoint from
`ClusterProvisioned` (either may be handled first). Once both are known it installs the
spec's infra services one per message, in catalog dependency order: each handled message
installs at most one service and emits `InfraServiceInstalled`, and that event, consumed
again, advances the chain. A crash therefore resumes at the next service. After the last
service (or at once when none are listed) it emits `ClusterReady`. Retirement stops
everything, and a recorded failure (`ClusterInfraFailed`) stops the chain.

In-place updates: `ClusterUpdateRequested` (generation G) re-applies the services for the new spec at
once, but `ClusterReady` waits until the cloud side is done too, i.e. until `ClusterResourcesUpdated`
with a generation >= G has been seen (the two arrive in either order). New provisioning results
replace the old ones per step; when they change what bundles render from, every service is
re-applied.

Drains: `ClusterDrainRequested` records a request (deadline = the event's time + its timeout). While
any request is open, `drain_action` asks for a pass through the port (cordon, evict what the
disruption budgets allow) and `settle_drain` folds its report in: nothing left to evict answers every
open request with `ClusterDrained`; a request whose deadline passed with pods left is answered
`timed_out=True` (nothing is ever forced); the others wait for the next pass (the service's periodic
pass comes back). Each request is answered exactly once. A drained cluster is not drained again (a
new request is answered at once), and a retired one is not drained at all. Drain progress comes
from the port's reports, not from events, so it is the one part of the state a replay of FLEET alone
does not rebuild (the answers themselves are in FLEET, with ids derived from their requests).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.infra_installer.drain_plan import DrainReport
from shared.catalog import install_order, known_services
from shared.events.clusterset import ClusterSpec, InfraServiceRef, Location
from shared.events.envelope import Envelope
from shared.events.models import (
    ClusterDrained,
    ClusterDrainRequested,
    ClusterEvent,
    ClusterInfraFailed,
    ClusterProvisioned,
    ClusterReady,
    ClusterRequested,
    ClusterResourcesUpdated,
    ClusterRetirementRequested,
    ClusterUncordoned,
    ClusterUncordonRequested,
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


# How many answered drain requests a cluster remembers (a redelivery of one of them answers nothing).
ANSWERED_KEPT = 50


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str  # the ClusterDrainRequested event id: its ClusterDrained's id derives from it
    correlation_id: str
    rollout_id: str | None = None
    requested_at: datetime
    deadline: datetime


class DrainState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pending: list[DrainRequest] = Field(default_factory=list)  # not answered yet
    answered: list[str] = Field(default_factory=list)  # ids of answered requests, newest last
    drained: bool = False  # a drain finished: nothing left to evict
    evicted: int = 0  # pods evicted by this cluster's drains, all passes
    remaining: int | None = None  # pods left after the last pass that got through (None: none did)


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
    # In-place updates: the generation of the last ClusterUpdateRequested applied, and the newest generation
    # whose cloud side is done (ClusterResourcesUpdated). READY waits while the first is ahead.
    update_generation: int = 0
    resources_generation: int = 0
    ready: bool = False
    failure: InfraFailure | None = None
    retired: bool = False
    drain: DrainState = Field(default_factory=DrainState)


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
           InfraDriftCorrected, ClusterResourcesUpdated, ClusterDrainRequested,
           ClusterUncordonRequested)  # fmt: skip


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


def evolve(state: InstallerState | None, event: Event, env: Envelope | None = None) -> InstallerState | None:
    """Fold one event into the state. Idempotent: applying an event twice equals applying it once.

    `env` is the event's envelope: a drain request needs its id and time (every other event folds without)."""
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
                                                spec=event.spec, update_generation=event.generation, ready=False,
                                                failure=None))  # fmt: skip
        case ClusterResourcesUpdated():
            if event.generation <= state.resources_generation:
                return state
            resources = {**state.resources, **event.resources}
            upd: dict[str, Any] = dict(resources_generation=event.generation, resources=resources)
            if resources != state.resources:
                upd["installed_for"] = {}  # bundles render from these: apply every service again
            return state.model_copy(update=upd)
        case ClusterDrainRequested():
            if env is None:
                raise ValueError("a drain request is folded with its envelope (its id and time)")
            return _request_drain(state, event, env)
        case ClusterUncordonRequested():
            # Kept after all: open requests are dropped (nobody waits for them any more), and a later rollout
            # may drain it again. Requests answered already stay answered.
            drain = state.drain
            answered = [*drain.answered, *(r.id for r in drain.pending)][-ANSWERED_KEPT:]
            return state.model_copy(update=dict(drain=DrainState(answered=answered)))
        case InfraServiceRemoved():
            return state.model_copy(update=dict(
                installed={k: v for k, v in state.installed.items() if k != event.service},
                installed_for={k: v for k, v in state.installed_for.items() if k != event.service}))  # fmt: skip
        case InfraReconcileRequested():
            if event.reason == "retry" and state.failure is not None and state.failure.retryable:
                return state.model_copy(update=dict(failure=None))
            return state
        case ClusterProvisioned():
            # A late copy must not undo what an in-place update changed since.
            resources = {**event.resources, **state.resources} if state.resources_generation else event.resources
            return state.model_copy(update=dict(provisioned=True, endpoint=event.endpoint,
                                                credential_ref=event.credential_ref,
                                                ca_fingerprint=event.ca_fingerprint,
                                                resources=resources))  # fmt: skip
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


def uncordoned_event(state: InstallerState, request: ClusterUncordonRequested, nodes: int) -> ClusterUncordoned:
    return ClusterUncordoned(location=state.location, cluster_id=state.cluster_id, clusterset=state.clusterset,
                             rollout_id=request.rollout_id, nodes=nodes)  # fmt: skip


def _request_drain(state: InstallerState, event: ClusterDrainRequested, env: Envelope) -> InstallerState:
    drain = state.drain
    if state.retired or env.id in drain.answered or any(r.id == env.id for r in drain.pending):
        return state
    request = DrainRequest(id=env.id, correlation_id=env.correlation_id, rollout_id=event.rollout_id,
                           requested_at=env.time,
                           deadline=env.time + timedelta(seconds=event.timeout_seconds))  # fmt: skip
    return state.model_copy(update=dict(drain=drain.model_copy(update=dict(pending=[*drain.pending, request]))))


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
    if state.update_generation > state.resources_generation:
        return None  # the cloud side of the in-place update is not done yet: ClusterResourcesUpdated comes back
    return EmitReady(tuple(services))


def drift_check(state: InstallerState | None) -> list[PlannedService]:
    """The services whose objects a drift check compares: only on a READY, live cluster that is not drained."""
    if state is None or state.retired or not state.ready or state.spec is None or draining(state):
        return []
    services, _ = plan(state.spec)
    return [s for s in services if state.installed.get(s.name) == s.version]


# ---------------------------------------------------------------- drains
@dataclass(frozen=True)
class DrainPass:
    """Run one drain pass through the port, then settle_drain with its report."""


@dataclass(frozen=True)
class AnswerDrains:
    """The cluster is drained already: answer the open requests without touching it."""


@dataclass(frozen=True)
class DrainAnswer:
    request: DrainRequest
    event: ClusterDrained


def draining(state: InstallerState) -> bool:
    """A drain is open or done: the cluster is on its way out (no drift checks)."""
    return bool(state.drain.pending) or state.drain.drained


def drain_action(state: InstallerState | None) -> DrainPass | AnswerDrains | None:
    if state is None or state.retired or not state.drain.pending:
        return None
    return AnswerDrains() if state.drain.drained else DrainPass()


def settle_drain(state: InstallerState, report: DrainReport | None, now: datetime
                 ) -> tuple[InstallerState, list[DrainAnswer]]:  # fmt: skip
    """Fold a pass's report in (None: the pass failed) and answer the requests it settles.

    Nothing left: every open request is answered. Otherwise only those past their deadline, as timed out
    with the pods left (as of the last pass that got through)."""
    drain = state.drain
    evicted = drain.evicted + (report.evicted if report else 0)
    remaining = report.remaining if report else drain.remaining
    done = report is not None and report.done
    answers, still = [], []
    for request in drain.pending:
        if done or now >= request.deadline:
            event = ClusterDrained(location=state.location, cluster_id=state.cluster_id, clusterset=state.clusterset,
                                   rollout_id=request.rollout_id, timed_out=not done, evicted=evicted,
                                   remaining=0 if done else remaining or 0)  # fmt: skip
            answers.append(DrainAnswer(request, event))
        else:
            still.append(request)
    answered = [*drain.answered, *(a.request.id for a in answers)][-ANSWERED_KEPT:]
    new = drain.model_copy(update=dict(pending=still, answered=answered, drained=drain.drained or done,
                                       evicted=evicted, remaining=remaining))  # fmt: skip
    return state.model_copy(update=dict(drain=new)), answers


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
