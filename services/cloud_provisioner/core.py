"""The provisioner's pure core: per-cluster state, `evolve` and `next_action`. No I/O here.

One aggregate per cluster id. The chain of cloud operations advances one step per message:
the handler performs the action `next_action` returns, emits the resulting fact
(`ClusterResourceProvisioned` / `ClusterResourceDeprovisioned` / ...), evolves it into the
state and commits; the emitted fact comes back through the stream and triggers the next
step. A crash therefore resumes at the step that was running, never from scratch.

Guards that keep duplicates and late events harmless:
- `evolve` is idempotent: an event that does not change the state is a no-op.
- `awaiting` holds the id of the last event that changed the state. A message acts only
  if it changed the state (news) or is that awaited event (the chain's own continuation):
  a second `ClusterRequested` with another id, or a step result that arrives after a
  retirement took over, starts no second chain.
- Retirement is terminal: the target becomes absent and stays absent (cluster ids are
  never reused; a replacement is a new cluster).
- Leaks are closed four ways: the step that may have been in flight when a retirement
  arrived is deleted by tag lookup (`unconfirmed`: covers a crash after the create but
  before the commit); a step result that arrives after the retirement is recorded and
  deleted; the app undoes a create whose commit lost a race to a retirement; and the
  retirement of a cluster we have no record of sweeps every step by tag, in reverse order,
  before ClusterDeprovisioned. That last one covers a request whose first handling crashed
  after creating the network (so nothing was committed) and whose retirement is handled
  before the redelivery: the state is None, yet the network exists. One step per message,
  like any deprovision chain; the redelivered request then finds the cluster retired and
  creates nothing.
- A sweep without a spec cannot tell a bring-your-own network from ours, and needs not:
  deletes by tag only find resources tagged with this cluster's id, which an adopted network
  never is (we never tag what we do not create).

In-place updates (ClusterUpdateRequested, issue 5): an update with a higher generation than the
spec we hold replaces the spec and leaves a pending update. Provisioning still running goes on
with the new spec; once the cluster is provisioned (ClusterProvisioned emitted, and consumed back
as the chain's continuation) `next_action` returns `Update`, which converges the in-place steps
(node pools, tags) through the driver without creating anything and reports
ClusterResourcesUpdated(generation), which clears the pending update. A newer update supersedes a
pending one (the update converges to the newest spec and reports the newest generation); an older
or repeated one is ignored, and so is any update of a retired cluster or of one never requested.
A failed update is retried by the same update asked for again (a later envelope), or superseded
by a newer one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shared.events import ClusterSpec, Envelope, Location, decode_payload
from shared.events.models import (
    PROVISION_STEPS,
    ClusterDeprovisioned,
    ClusterProvisioned,
    ClusterProvisioningFailed,
    ClusterRequested,
    ClusterResourceDeprovisioned,
    ClusterResourceProvisioned,
    ClusterResourcesUpdated,
    ClusterRetirementRequested,
    ClusterUpdateRequested,
    Event,
    NetworkInfo,
    ProvisionStep,
)

Target = Literal["present", "absent"]
Operation = Literal["provision", "deprovision", "update"]
# The steps an in-place update asks the driver to converge, in this order. What each can change in place
# (node pool scaling, labels and taints; tags) is the driver's knowledge: it leaves the rest alone, and
# the planner sends a rotation, not an update, for changes only new clusters can have.
UPDATE_STEPS: tuple[ProvisionStep, ...] = PROVISION_STEPS


class Failure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    operation: Operation
    step: ProvisionStep | None
    code: str
    message: str
    retryable: bool
    at: datetime  # when it was recorded: only a request made after it retries


class PendingUpdate(BaseModel):
    """An in-place update recorded but not yet applied to the cloud."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    generation: int
    config_hash: str
    changes: list[str] = []


class ProvisionerState(BaseModel):
    """What the provisioner knows about one cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster_id: str
    clusterset: str
    location: Location
    spec: ClusterSpec | None = None  # None: retired before any request was recorded
    # The ClusterSet generation and config hash `spec` comes from (the request's, then each newer update's).
    generation: int = 0
    config_hash: str = ""
    pending_update: PendingUpdate | None = None
    target: Target = "present"
    # Steps whose resources exist (ensured and not deleted since), with what the step reported.
    resources: dict[ProvisionStep, dict[str, Any]] = {}
    # Steps that may have been started without a recorded result (the step in flight when the
    # retirement arrived, or every step of a cluster retired before any request was recorded;
    # a crash may have left it half done): deleted by tag lookup.
    unconfirmed: list[ProvisionStep] = []
    deleted: list[ProvisionStep] = []
    provisioned: bool = False
    deprovisioned: bool = False
    failure: Failure | None = None
    awaiting: str | None = None  # id of the last event that changed this state

    def owns(self, step: ProvisionStep) -> bool:
        """False for an adopted (bring-your-own) network: never ours to delete."""
        return bool(self.resources.get(step, {}).get("owned", True))

    def byon(self) -> bool:
        return self.spec is not None and "byon" in self.spec.features


# ---------------------------------------------------------------- actions
@dataclass(frozen=True)
class Ensure:
    step: ProvisionStep


@dataclass(frozen=True)
class Adopt:
    """Record an existing resource we do not own (byon network): no cloud call, nothing created."""

    step: ProvisionStep
    resources: dict[str, Any]


@dataclass(frozen=True)
class Delete:
    step: ProvisionStep
    resources: dict[str, Any] | None  # None: unconfirmed, the provider finds it by tag


@dataclass(frozen=True)
class EmitProvisioned:
    pass


@dataclass(frozen=True)
class Update:
    """Converge the existing resources of `steps` to the spec in place (creating nothing), then report
    ClusterResourcesUpdated for `generation`."""

    generation: int
    steps: tuple[ProvisionStep, ...] = UPDATE_STEPS


@dataclass(frozen=True)
class EmitDeprovisioned:
    pass


Action = Ensure | Adopt | Delete | EmitProvisioned | EmitDeprovisioned | Update


def operation_of(action: Action) -> Operation:
    if isinstance(action, Update):
        return "update"
    return "deprovision" if isinstance(action, Delete | EmitDeprovisioned) else "provision"


def step_of(action: Action) -> ProvisionStep | None:
    return action.step if isinstance(action, Ensure | Adopt | Delete) else None


# ---------------------------------------------------------------- evolve
def _frontier(state: ProvisionerState) -> list[ProvisionStep]:
    """The step provisioning was at (possibly in flight) when it stopped; [] if none could be."""
    if state.spec is None or state.target != "present":
        return []
    for step in PROVISION_STEPS:
        if step not in state.resources:
            if step == "network" and state.byon():
                return []  # adopting is not a cloud side effect
            return [step]
    return []


def _changed(old: ProvisionerState, new: ProvisionerState, event_id: str) -> ProvisionerState:
    return old if new == old else new.model_copy(update={"awaiting": event_id})


def _retries(failure: Failure | None, operation: Operation, env: Envelope) -> bool:
    """A new request clears a failure of its operation; a replay of an older one does not."""
    return failure is not None and failure.operation == operation and env.time > failure.at


def _apply(state: ProvisionerState | None, event: Event, env: Envelope) -> ProvisionerState | None:
    match event:
        case ClusterRequested():
            if state is None:
                return ProvisionerState(
                    cluster_id=event.cluster_id, clusterset=event.clusterset, location=event.location,
                    spec=event.spec, generation=event.generation, config_hash=event.config_hash,
                )  # fmt: skip
            if state.target == "present" and state.spec is not None and _retries(state.failure, "provision", env):
                return state.model_copy(update={"failure": None})  # asked again: retry the failed step
            return state  # duplicate request, or a late one after retirement: ignored
        case ClusterRetirementRequested():
            if state is None:
                # No record, but a first handling of the request may have created something and
                # crashed before committing: sweep every step by tag (the chain runs them in reverse).
                return ProvisionerState(
                    cluster_id=event.cluster_id, clusterset=event.clusterset, location=event.location,
                    target="absent", unconfirmed=list(PROVISION_STEPS),
                )  # fmt: skip
            if state.target == "present":
                pending = [s for s in _frontier(state) if s not in state.unconfirmed]
                # A provisioning failure no longer matters: cleaning up is the job now.
                return state.model_copy(
                    update={"target": "absent", "unconfirmed": [*state.unconfirmed, *pending], "failure": None}
                )
            if _retries(state.failure, "deprovision", env):
                return state.model_copy(update={"failure": None})  # asked again: retry the failed delete
            return state
        case ClusterResourceProvisioned():
            if state is None or event.step in state.resources or event.step in state.deleted:
                return state  # duplicate, or a result that a retirement already cleaned up
            return state.model_copy(
                update={
                    "resources": {**state.resources, event.step: dict(event.resources)},
                    "unconfirmed": [s for s in state.unconfirmed if s != event.step],
                }
            )
        case ClusterResourceDeprovisioned():
            if state is None or event.step in state.deleted:
                return state
            return state.model_copy(
                update={
                    "resources": {k: v for k, v in state.resources.items() if k != event.step},
                    "unconfirmed": [s for s in state.unconfirmed if s != event.step],
                    "deleted": [*state.deleted, event.step],
                }
            )
        case ClusterUpdateRequested():
            return _update_requested(state, event, env)
        case ClusterResourcesUpdated():
            if state is None or state.target != "present":
                return state  # a late report after the retirement: the resources are being deleted
            still = state.pending_update
            if still is not None and event.generation >= still.generation:
                still = None
            reported = {step: dict(event.resources[step]) for step in state.resources if step in event.resources}
            return state.model_copy(update={"resources": {**state.resources, **reported}, "pending_update": still})
        case ClusterProvisioned():
            return state if state is None else state.model_copy(update={"provisioned": True})
        case ClusterDeprovisioned():
            return state if state is None else state.model_copy(update={"deprovisioned": True})
        case ClusterProvisioningFailed():
            if state is None:
                return None
            failure = Failure(operation=event.operation, step=event.step, code=event.code,
                              message=event.message, retryable=event.retryable, at=env.time)  # fmt: skip
            return state.model_copy(update={"failure": failure})
    return state  # any other event type does not concern the provisioner


def _update_requested(state: ProvisionerState | None, event: ClusterUpdateRequested, env: Envelope
                      ) -> ProvisionerState | None:  # fmt: skip
    # Unknown (its request not seen: nothing to update, the request brings the spec) or retired: ignored.
    if state is None or state.target != "present" or state.spec is None:
        return state
    if event.generation > state.generation:
        # A new update clears the failure of an older one; a provisioning failure stays (a new request retries).
        failure = None if state.failure is not None and state.failure.operation == "update" else state.failure
        pending = PendingUpdate(generation=event.generation, config_hash=event.config_hash, changes=event.changes)
        return state.model_copy(update={"spec": event.spec, "generation": event.generation,
                                        "config_hash": event.config_hash, "pending_update": pending,
                                        "failure": failure})  # fmt: skip
    if event.generation == state.generation and state.pending_update is not None \
            and _retries(state.failure, "update", env):  # fmt: skip
        return state.model_copy(update={"failure": None})  # the same update asked again: retry it
    return state  # older or repeated


def evolve(state: ProvisionerState | None, env: Envelope) -> ProvisionerState | None:
    """Fold one event into the state. Pure and idempotent: the same event twice equals once."""
    new = _apply(state, decode_payload(env), env)
    if new is None or state is None:
        return new if new is None else new.model_copy(update={"awaiting": env.id})
    return _changed(state, new, env.id)


def replay(history: list[Envelope], state: ProvisionerState | None = None) -> ProvisionerState | None:
    for env in history:
        state = evolve(state, env)
    return state


def should_act(before: ProvisionerState | None, after: ProvisionerState | None, env: Envelope) -> bool:
    """Act on news, or on the event the chain is waiting for; never on a stale duplicate."""
    if after is None:
        return False
    return after != before or (before is not None and before.awaiting == env.id)


# ---------------------------------------------------------------- next action
def byon_network(spec: ClusterSpec) -> dict[str, Any]:
    net = spec.network
    assert net is not None, "validated: byon needs spec.network"
    network_id = net.vpc_id or net.vnet_id or net.network_id or ""
    return {"network_id": network_id, "subnet_ids": list(net.subnet_ids), "owned": False}


def next_action(state: ProvisionerState | None) -> Action | None:
    """What to do next for this cluster; None when there is nothing to do (done, failed or waiting)."""
    if state is None:
        return None
    if state.target == "present":
        if state.failure is not None or state.spec is None:
            return None
        for step in PROVISION_STEPS:
            if step not in state.resources:
                if step == "network" and state.byon():
                    return Adopt(step, byon_network(state.spec))
                return Ensure(step)
        if not state.provisioned:
            return EmitProvisioned()
        return None if state.pending_update is None else Update(state.pending_update.generation)
    if state.failure is not None and state.failure.operation == "deprovision":
        return None
    for step in reversed(PROVISION_STEPS):
        if step in state.resources and state.owns(step):
            return Delete(step, state.resources[step])
        if step in state.unconfirmed and step not in state.resources:
            return Delete(step, None)
    return None if state.deprovisioned else EmitDeprovisioned()


def remaining_steps(state: ProvisionerState) -> list[ProvisionStep]:
    """Owned steps that still exist or may exist (for status and tests)."""
    return [s for s in PROVISION_STEPS if (s in state.resources and state.owns(s)) or s in state.unconfirmed]


# ---------------------------------------------------------------- payloads of the facts we emit
def _ids(state: ProvisionerState) -> dict[str, Any]:
    return {"cluster_id": state.cluster_id, "clusterset": state.clusterset, "location": state.location}


def resource_provisioned(state: ProvisionerState, step: ProvisionStep, resources: dict[str, Any]
                         ) -> ClusterResourceProvisioned:  # fmt: skip
    return ClusterResourceProvisioned(**_ids(state), step=step, resources=resources)


def resource_deprovisioned(state: ProvisionerState, step: ProvisionStep) -> ClusterResourceDeprovisioned:
    return ClusterResourceDeprovisioned(**_ids(state), step=step)


def provisioned(state: ProvisionerState) -> ClusterProvisioned:
    cluster = state.resources["cluster"]
    net = state.resources["network"]
    return ClusterProvisioned(
        **_ids(state),
        endpoint=str(cluster["endpoint"]),
        ca_fingerprint=str(cluster["ca_fingerprint"]),
        network=NetworkInfo(
            network_id=str(net["network_id"]),
            subnet_ids=[str(s) for s in net["subnet_ids"]],
            owned=bool(net.get("owned", True)),
        ),
        resources={step: dict(state.resources[step]) for step in PROVISION_STEPS},
        credential_ref=str(cluster.get("credential_ref") or f"{state.location.cloud}://{state.cluster_id}"),
    )


def deprovisioned(state: ProvisionerState) -> ClusterDeprovisioned:
    return ClusterDeprovisioned(**_ids(state))


def resources_updated(state: ProvisionerState, resources: dict[ProvisionStep, dict[str, Any]],
                      changed: list[ProvisionStep]) -> ClusterResourcesUpdated:  # fmt: skip
    pending = state.pending_update
    assert pending is not None, "an update is reported only while one is pending"
    return ClusterResourcesUpdated(
        **_ids(state), generation=pending.generation, config_hash=pending.config_hash,
        resources={step: dict(resources[step]) for step in PROVISION_STEPS if step in resources}, changed=list(changed),
    )  # fmt: skip


def failed(state: ProvisionerState, action: Action, code: str, message: str, retryable: bool,
           step: ProvisionStep | None = None) -> ClusterProvisioningFailed:  # fmt: skip
    """`step`: which step failed, when the action covers several (an update)."""
    return ClusterProvisioningFailed(
        **_ids(state), operation=operation_of(action), step=step_of(action) or step, code=code,
        message=message[:1000], retryable=retryable,
    )  # fmt: skip
