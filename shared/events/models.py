"""Every event payload, one class each. The class name is the event `type`.

User intent (stream CLUSTERSETS): ClusterSetApplied, ClusterSetDeleted.
Everything else is a lifecycle fact on stream FLEET, routed by cloud, region and aggregate.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import subjects
from shared.events.clusterset import ClusterSpec, FieldError, Location, UpdateStrategy

ClusterState = Literal[
    "REQUESTED", "PROVISIONING", "PROVISIONED", "INSTALLING", "READY", "UPDATING",
    "DRAINING", "DRAINED", "DELETING", "DELETED", "FAILED",
]  # fmt: skip
CLUSTER_STATES: tuple[str, ...] = ClusterState.__args__  # type: ignore[attr-defined]

# IAM comes before the cluster: EKS needs its cluster role, AKS its identity, GKE nodes their service account.
ProvisionStep = Literal["network", "iam", "cluster", "node_pools", "log_stream"]
PROVISION_STEPS: tuple[ProvisionStep, ...] = ("network", "iam", "cluster", "node_pools", "log_stream")


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stream: ClassVar[str] = subjects.STREAM_FLEET
    # A command a service hands to its own consumer (handle_local) and never publishes.
    local_only: ClassVar[bool] = False

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def aggregate(self) -> str:
        raise NotImplementedError

    def subject(self) -> str:
        raise NotImplementedError


# ---------------------------------------------------------------- user intent (CLUSTERSETS)
class ClusterSetApplied(Event):
    """A user's ClusterSet document, unvalidated: the planner validates it."""

    stream: ClassVar[str] = subjects.STREAM_CLUSTERSETS
    document: dict[str, Any]

    def name(self) -> str | None:
        meta = self.document.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        return name if isinstance(name, str) else None

    def aggregate(self) -> str:
        return self.name() or "_"

    def subject(self) -> str:
        return subjects.clusterset_applied(self.name())


class ClusterSetDeleted(Event):
    stream: ClassVar[str] = subjects.STREAM_CLUSTERSETS
    name: str = Field(min_length=1, max_length=63)

    def aggregate(self) -> str:
        return self.name

    def subject(self) -> str:
        return subjects.clusterset_deleted(self.name)


class ClusterProtectionChanged(Event):
    """A user marks one cluster protected (never deprovisioned) or removes the mark."""

    stream: ClassVar[str] = subjects.STREAM_CLUSTERSETS
    clusterset: str = Field(min_length=1, max_length=63)
    cluster_id: str = Field(min_length=1, max_length=128)
    protected: bool

    def aggregate(self) -> str:
        return self.clusterset

    def subject(self) -> str:
        return subjects.clusterset_protection(self.clusterset)


# ---------------------------------------------------------------- fleet facts (FLEET)
class FleetEvent(Event):
    location: Location

    def subject(self) -> str:
        return subjects.fleet(self.type_name(), self.location.cloud, self.location.region, self.aggregate())


class ClusterSetEvent(FleetEvent):
    clusterset: str

    def aggregate(self) -> str:
        return self.clusterset


class ClusterEvent(FleetEvent):
    cluster_id: str
    clusterset: str

    def aggregate(self) -> str:
        return self.cluster_id


class ClusterSetAccepted(ClusterSetEvent):
    generation: int
    protected: bool = False
    document_hash: str = Field(description="hash of the whole accepted document; equal on a no-op re-apply")
    cluster_type: str
    count: int
    config_hash: str
    spec: ClusterSpec
    update_strategy: UpdateStrategy


class ClusterSetRejected(Event):
    """Invalid input. Location fields are raw (they may be what was invalid)."""

    clusterset: str | None
    cloud: str | None = None
    region: str | None = None
    errors: list[FieldError]

    def aggregate(self) -> str:
        return self.clusterset or "_"

    def subject(self) -> str:
        return subjects.fleet(self.type_name(), self.cloud, self.region, self.clusterset)


class ClusterSetRetired(ClusterSetEvent):
    """The set was deleted; its clusters are being retired."""

    generation: int
    clusters: list[str]


class ClusterProtectionUpdated(ClusterEvent):
    """The planner recorded a cluster's protection mark."""

    protected: bool


class ClusterRequested(ClusterEvent):
    serial: int = Field(ge=0, description="ordinal of the cluster within its set; never reused")
    cluster_type: str
    generation: int
    config_hash: str
    spec: ClusterSpec


class ClusterUpdateRequested(ClusterEvent):
    generation: int
    config_hash: str
    spec: ClusterSpec
    changes: list[str]


class ClusterRetirementRequested(ClusterEvent):
    reason: Literal["scale-down", "clusterset-deleted", "rotation", "manual"]
    drain: bool = False


class RolloutRequested(ClusterSetEvent):
    rollout_id: str
    generation: int
    from_config_hashes: list[str]
    to_config_hash: str
    spec: ClusterSpec
    update_strategy: UpdateStrategy


# cloud_provisioner
class ClusterResourceProvisioned(ClusterEvent):
    step: ProvisionStep
    resources: dict[str, Any]


class ClusterResourceDeprovisioned(ClusterEvent):
    step: ProvisionStep


class NetworkInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    network_id: str
    subnet_ids: list[str]
    owned: bool = True


class ClusterProvisioned(ClusterEvent):
    endpoint: str
    ca_fingerprint: str
    network: NetworkInfo
    resources: dict[str, dict[str, Any]]
    credential_ref: str = Field(description="how the installer obtains a token; never a secret")


class ClusterProvisioningFailed(ClusterEvent):
    operation: Literal["provision", "deprovision"]
    step: ProvisionStep | None
    code: str
    message: str
    retryable: bool


class ClusterDeprovisioned(ClusterEvent):
    pass


# infra_installer
class InfraServiceInstalled(ClusterEvent):
    service: str
    version: str
    # The cluster spec it was rendered from: a spec change (values, node pools) re-applies it.
    config_hash: str = ""


class InfraServiceRemoved(ClusterEvent):
    """A service the spec no longer lists was uninstalled (its objects pruned)."""

    service: str
    version: str


class InfraDriftCorrected(ClusterEvent):
    """Objects changed on the cluster behind our back were re-applied to the desired state."""

    service: str
    version: str
    objects: list[str]


class InfraReconcileRequested(ClusterEvent):
    """The installer's own periodic nudge for one cluster: retry a retryable failure, or check for drift.

    Handled locally through the same idempotent path as a delivered event; never published."""

    local_only: ClassVar[bool] = True
    reason: Literal["retry", "drift"]
    bucket: int = Field(description="the time bucket it belongs to; one nudge per cluster and bucket")


class ClusterReady(ClusterEvent):
    cluster_type: str
    config_hash: str
    endpoint: str
    infra_services: list[dict[str, str]]


class ClusterInfraFailed(ClusterEvent):
    service: str
    object: str | None = None
    reason: str
    retryable: bool


# rotation
class RolloutEvent(ClusterSetEvent):
    rollout_id: str


class RolloutStarted(RolloutEvent):
    to_config_hash: str


class ClusterDrainRequested(ClusterEvent):
    rollout_id: str | None = None


class ClusterDrained(ClusterEvent):
    rollout_id: str | None = None
    timed_out: bool = False


class RolloutProgressed(RolloutEvent):
    replaced: int
    remaining: int


class RolloutCompleted(RolloutEvent):
    pass


class RolloutPaused(RolloutEvent):
    reason: str


class RolloutRolledBack(RolloutEvent):
    reason: str


# etcd_migration
class ControlPlaneEvent(ClusterEvent):
    operation_id: str


class ControlPlaneMigrationRequested(ControlPlaneEvent):
    pass


class ControlPlaneMigrationStepCompleted(ControlPlaneEvent):
    phase: int
    step: str


class ControlPlaneMigrationCompleted(ControlPlaneEvent):
    availability_pct: float | None = None


class ControlPlaneMigrationFailed(ControlPlaneEvent):
    step: str
    reason: str


class ControlPlaneMigrationRolledBack(ControlPlaneEvent):
    from_step: str


class ControlPlaneUpgradeRequested(ControlPlaneEvent):
    to_version: str


class ControlPlaneUpgradeStepCompleted(ControlPlaneEvent):
    node: str
    step: str


class ControlPlaneUpgradeCompleted(ControlPlaneEvent):
    to_version: str
    availability_pct: float | None = None


class ControlPlaneUpgradeFailed(ControlPlaneEvent):
    node: str | None
    reason: str


def _all_event_classes() -> dict[str, type[Event]]:
    found: dict[str, type[Event]] = {}
    stack: list[type[Event]] = [Event]
    abstract = {Event, FleetEvent, ClusterSetEvent, ClusterEvent, RolloutEvent, ControlPlaneEvent}
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            stack.append(sub)
            if sub not in abstract:
                found[sub.type_name()] = sub
    return dict(sorted(found.items()))


EVENT_TYPES: dict[str, type[Event]] = _all_event_classes()
