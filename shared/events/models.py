"""Every event payload, one class each. The class name is the event `type`.

User intent (stream CLUSTERSETS): ClusterSetApplied, ClusterSetDeleted.
Everything else is a lifecycle fact on stream FLEET, routed by cloud, region and aggregate.
"""

from __future__ import annotations

from datetime import datetime
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


class RolloutControlRequested(Event):
    """An operator pauses, resumes, aborts or rolls back the running rollout of one ClusterSet.

    abort: stop where it is, keep every cluster (old and new); rollback: retire the new clusters, keep the old."""

    stream: ClassVar[str] = subjects.STREAM_CLUSTERSETS
    clusterset: str = Field(min_length=1, max_length=63)
    action: Literal["pause", "resume", "abort", "rollback"]
    rollout_id: str | None = Field(default=None, description="only act if this is the running rollout")
    reason: str = Field(default="", max_length=500)

    def aggregate(self) -> str:
        return self.clusterset

    def subject(self) -> str:
        return subjects.clusterset_rollout(self.clusterset)


class FleetSelector(BaseModel):
    """Which ClusterSets; an empty list matches every value."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    envs: list[str] = Field(default_factory=list)
    clouds: list[Literal["aws", "azure", "gcp"]] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    names: list[str] = Field(default_factory=list)

    def matches(self, name: str, location: Location) -> bool:
        return ((not self.envs or location.env in self.envs) and (not self.clouds or location.cloud in self.clouds)
                and (not self.regions or location.region in self.regions)
                and (not self.names or name in self.names))  # fmt: skip


class FleetStage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    # Sets matching this selector and no earlier stage; the default (match everything) takes the rest.
    selector: FleetSelector = FleetSelector()
    soak_seconds: float = Field(default=0, ge=0, le=30 * 24 * 3600)
    # Wait for a FleetRolloutApproved naming this stage before it starts.
    approval: bool = False


class FleetRolloutRequested(Event):
    """Roll one change (a patch of the ClusterSet spec) over every set of a cluster type, stage by stage."""

    stream: ClassVar[str] = subjects.STREAM_CLUSTERSETS
    rollout_id: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    cluster_type: str = Field(min_length=1, max_length=63)
    selector: FleetSelector = FleetSelector()
    # A JSON merge patch of `spec` (e.g. {"kubernetesVersion": "1.31"}); count and strategy may not be patched.
    patch: dict[str, Any]
    stages: list[FleetStage] = Field(min_length=1, max_length=50)
    max_in_flight: int = Field(default=1, ge=1, le=1000)
    # The run halts once more than this many sets have failed.
    failure_budget: int = Field(default=0, ge=0, le=10_000)

    def aggregate(self) -> str:
        return self.rollout_id

    def subject(self) -> str:
        return subjects.fleet_rollout_intent(self.rollout_id)


class FleetRolloutApproved(Event):
    stream: ClassVar[str] = subjects.STREAM_CLUSTERSETS
    rollout_id: str = Field(min_length=1, max_length=63)
    stage: str = Field(min_length=1, max_length=40)
    approver: str = Field(default="", max_length=200)

    def aggregate(self) -> str:
        return self.rollout_id

    def subject(self) -> str:
        return subjects.fleet_rollout_intent(self.rollout_id)


class FleetRolloutControlRequested(Event):
    stream: ClassVar[str] = subjects.STREAM_CLUSTERSETS
    rollout_id: str = Field(min_length=1, max_length=63)
    action: Literal["pause", "resume", "abort"]
    reason: str = Field(default="", max_length=500)

    def aggregate(self) -> str:
        return self.rollout_id

    def subject(self) -> str:
        return subjects.fleet_rollout_intent(self.rollout_id)


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
    labels: dict[str, str] = Field(default_factory=dict, description="metadata.labels of the document")
    # What the planner does about the spec change (from its rule table): nothing, in place, or by rotation.
    update_path: Literal["none", "in-place", "rotation"] = "none"
    changes: list[str] = Field(default_factory=list)
    fleet_rollout_id: str | None = Field(default=None, description="set when a fleet rollout's patch made it")


class ClusterSetRejected(Event):
    """Invalid input. Location fields are raw (they may be what was invalid)."""

    clusterset: str | None
    cloud: str | None = None
    region: str | None = None
    errors: list[FieldError]
    fleet_rollout_id: str | None = Field(default=None, description="set when a fleet rollout's patch was refused")

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
    rollout_id: str | None = Field(default=None, description="set when a rotation asked for it (a surge cluster)")


class ClusterUpdateRequested(ClusterEvent):
    generation: int
    config_hash: str
    spec: ClusterSpec
    changes: list[str]


class ClusterRetirementRequested(ClusterEvent):
    reason: Literal["scale-down", "clusterset-deleted", "rotation", "rollback", "manual"]
    drain: bool = False
    rollout_id: str | None = None


class RolloutMember(BaseModel):
    """A cluster of the set as the planner knew it when it asked for the rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cluster_id: str
    serial: int
    config_hash: str
    state: str
    protected: bool = False


class RolloutRequested(ClusterSetEvent):
    rollout_id: str
    generation: int
    from_config_hashes: list[str]
    to_config_hash: str
    cluster_type: str
    spec: ClusterSpec
    update_strategy: UpdateStrategy
    count: int = Field(ge=0, description="how many clusters on the new config the rollout ends with")
    # New clusters take serials from here up; the planner creates none while the rollout runs.
    serial_base: int = Field(ge=0)
    members: list[RolloutMember]
    # The rotation fields of the spec that changed (from the planner's rule table).
    changes: list[str] = Field(default_factory=list)
    fleet_rollout_id: str | None = None


class ClusterSetPatchRequested(ClusterSetEvent):
    """A fleet rollout asks the planner to apply its patch to one set (a new generation of the set)."""

    fleet_rollout_id: str
    stage: str
    patch: dict[str, Any]


class ClusterSetConverged(ClusterSetEvent):
    """Every live cluster of the set is READY on the set's current config (after an update or rollout)."""

    generation: int
    config_hash: str
    count: int
    fleet_rollout_id: str | None = None


class ClusterSetUpdateFailed(ClusterSetEvent):
    """An in-place update stopped: a cluster failed while being updated (the others are left as they are)."""

    generation: int
    config_hash: str
    cluster_ids: list[str]
    reason: str
    fleet_rollout_id: str | None = None


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
    operation: Literal["provision", "deprovision", "update"]
    step: ProvisionStep | None
    code: str
    message: str
    retryable: bool


class ClusterDeprovisioned(ClusterEvent):
    pass


class ClusterResourcesUpdated(ClusterEvent):
    """An in-place update's cloud side is done (node pools, tags converged to the new spec)."""

    generation: int
    config_hash: str
    resources: dict[str, dict[str, Any]]
    changed: list[str] = Field(default_factory=list, description="steps whose resources were updated")


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
    reason: Literal["retry", "drift", "drain"]
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
    fleet_rollout_id: str | None = None


class RolloutStarted(RolloutEvent):
    to_config_hash: str
    count: int = 0
    outdated: list[str] = Field(default_factory=list)


class ClusterDrainRequested(ClusterEvent):
    rollout_id: str | None = None
    timeout_seconds: float = 900


class ClusterDrained(ClusterEvent):
    rollout_id: str | None = None
    timed_out: bool = False
    evicted: int = 0
    remaining: int = Field(default=0, description="pods still on the cluster (a timed-out drain)")


class ClusterUncordonRequested(ClusterEvent):
    """A drained (or draining) cluster stays after all (its rollout rolled back): stop draining it and make the
    nodes Flotilla cordoned schedulable again."""

    rollout_id: str | None = None
    reason: str = ""


class ClusterUncordoned(ClusterEvent):
    rollout_id: str | None = None
    nodes: int = Field(default=0, description="nodes made schedulable again")


class RolloutProgressed(RolloutEvent):
    replaced: int
    remaining: int
    batch: int = 0
    ready: int = 0
    alive: int = 0


class RolloutWaiting(RolloutEvent):
    """Nothing disruptive may start now (outside the set's maintenance window)."""

    reason: str
    until: datetime | None = None


class RolloutCompleted(RolloutEvent):
    next_serial: int = 0


class RolloutPaused(RolloutEvent):
    reason: str
    failed: bool = Field(default=False, description="paused because a new cluster failed (not by an operator)")
    cluster_ids: list[str] = Field(default_factory=list)


class RolloutResumed(RolloutEvent):
    pass


class RolloutAborted(RolloutEvent):
    reason: str
    next_serial: int = 0


class RolloutRollingBack(RolloutEvent):
    """The rollout is being rolled back: the clusters it created are retired, the old ones kept."""

    reason: str


class RolloutRolledBack(RolloutEvent):
    reason: str
    next_serial: int = 0


class RolloutTick(RolloutEvent):
    """Rotation's own periodic nudge (maintenance windows open, timers): handled locally, never published."""

    local_only: ClassVar[bool] = True
    bucket: int


# fleet-wide rollouts (aggregate: the fleet rollout id; they span locations)
class FleetRolloutEvent(Event):
    rollout_id: str

    def aggregate(self) -> str:
        return self.rollout_id

    def subject(self) -> str:
        return subjects.fleet(self.type_name(), None, None, self.rollout_id)


class FleetRolloutStagePlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    clustersets: list[str]
    soak_seconds: float = 0
    approval: bool = False


class FleetRolloutStarted(FleetRolloutEvent):
    cluster_type: str
    patch: dict[str, Any]
    stages: list[FleetRolloutStagePlan]
    max_in_flight: int
    failure_budget: int


class FleetRolloutRejected(FleetRolloutEvent):
    errors: list[FieldError]


class FleetRolloutStageStarted(FleetRolloutEvent):
    stage: str


class FleetRolloutAwaitingApproval(FleetRolloutEvent):
    stage: str


class FleetRolloutSetFinished(FleetRolloutEvent):
    stage: str
    clusterset: str
    succeeded: bool
    reason: str = ""


class FleetRolloutStageCompleted(FleetRolloutEvent):
    stage: str
    soak_until: datetime | None = None


class FleetRolloutPaused(FleetRolloutEvent):
    reason: str


class FleetRolloutResumed(FleetRolloutEvent):
    pass


class FleetRolloutHalted(FleetRolloutEvent):
    reason: str
    failed_sets: list[str]


class FleetRolloutAborted(FleetRolloutEvent):
    reason: str


class FleetRolloutCompleted(FleetRolloutEvent):
    succeeded: int
    failed: int


class FleetRolloutTick(FleetRolloutEvent):
    """The fleet orchestrator's own nudge (soak timers): handled locally, never published."""

    local_only: ClassVar[bool] = True
    bucket: int


# etcd_migration
ControlPlaneOperation = Literal["migrate", "upgrade"]


# The steps a control-plane migration reports, in order, by phase; and the rollback steps (one source of truth for
# etcd_migration, which runs them, and the projector, which shows them).
MIGRATION_STEPS: tuple[tuple[int, str], ...] = (
    (0, "precheck"),
    (1, "stop-mutations"), (1, "snapshot-save"), (1, "stop-node"), (1, "snapshot-disk"),
    (2, "create-nodes"), (2, "create-load-balancers"), (2, "restore-members"), (2, "verify-members"),
    (3, "wait-kubelets"), (3, "start-controller-manager"), (3, "open-load-balancers"),
)  # fmt: skip
MIGRATION_ROLLBACK_STEPS: tuple[str, ...] = ("remove-new-nodes", "remove-load-balancers", "start-node",
                                             "resume-mutations")  # fmt: skip


class ControlPlaneEvent(ClusterEvent):
    operation_id: str
    pipeline_id: str | None = None


class ControlPlaneChangeRequested(Event):
    """An operator asks for a control-plane migration to HA or an upgrade of some clusters of a set (CLI)."""

    stream: ClassVar[str] = subjects.STREAM_CLUSTERSETS
    clusterset: str = Field(min_length=1, max_length=63)
    operation: ControlPlaneOperation
    cluster_ids: list[str] = Field(default_factory=list, description="empty: every live cluster of the set")
    to_version: str | None = Field(default=None, pattern=r"^1\.\d{1,2}$")
    concurrency: int = Field(default=1, ge=1, le=100)
    failure_budget: int = Field(default=0, ge=0, le=10_000)

    def aggregate(self) -> str:
        return self.clusterset

    def subject(self) -> str:
        return subjects.clusterset_controlplane(self.clusterset)


class PipelineCluster(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cluster_id: str
    clusterset: str
    location: Location


class ControlPlanePipelineRequested(ClusterSetEvent):
    """Migrate or upgrade these clusters' control planes, `concurrency` at a time, halting past the budget."""

    pipeline_id: str
    operation: ControlPlaneOperation
    clusters: list[PipelineCluster]
    to_version: str | None = None
    kubernetes_version: str | None = Field(default=None, description="what the control planes run (migrations)")
    config_hash: str | None = Field(default=None, description="the set config the clusters are on when done")
    concurrency: int = Field(default=1, ge=1)
    failure_budget: int = Field(default=0, ge=0)


class ControlPlanePipelineEvent(ClusterSetEvent):
    pipeline_id: str


class ControlPlanePipelineProgressed(ControlPlanePipelineEvent):
    succeeded: list[str]
    failed: list[str]
    in_flight: list[str]
    pending: int


class ControlPlanePipelineHalted(ControlPlanePipelineEvent):
    reason: str
    failed: list[str]


class ControlPlanePipelineCompleted(ControlPlanePipelineEvent):
    succeeded: list[str]
    failed: list[str]


class ControlPlaneAvailability(BaseModel):
    """What the prober saw through the load-balancer endpoint while the operation ran."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    requests: int
    succeeded: int
    availability_pct: float
    downtime_s: float = Field(description="longest run of failed requests, seconds")
    # Requests made while more than one control-plane node was down (quorum lost): must all fail.
    requests_without_quorum: int = 0
    succeeded_without_quorum: int = 0


class ControlPlaneMigrationRequested(ControlPlaneEvent):
    kubernetes_version: str | None = Field(default=None, description="what the control plane runs")
    config_hash: str | None = None
    reason: str = ""


class ControlPlaneMigrationStepCompleted(ControlPlaneEvent):
    phase: int
    step: str
    rollback: bool = Field(default=False, description="a step of the rollback")
    detail: dict[str, Any] = Field(default_factory=dict)
    started_at: datetime | None = None


class ControlPlaneMigrationCompleted(ControlPlaneEvent):
    availability_pct: float | None = None
    availability: ControlPlaneAvailability | None = None
    config_hash: str | None = None
    endpoint: str = ""
    members: list[str] = Field(default_factory=list)


class ControlPlaneMigrationFailed(ControlPlaneEvent):
    step: str
    reason: str
    rolling_back: bool = Field(description="true: the rollback steps follow; false: stopped, needs an operator")


class ControlPlaneMigrationRolledBack(ControlPlaneEvent):
    from_step: str
    reason: str = ""
    availability: ControlPlaneAvailability | None = None


class ControlPlaneUpgradeRequested(ControlPlaneEvent):
    to_version: str
    config_hash: str | None = None


class ControlPlaneUpgradeStepCompleted(ControlPlaneEvent):
    node: str
    step: str
    rollback: bool = False
    detail: dict[str, Any] = Field(default_factory=dict)


class ControlPlaneUpgradeCompleted(ControlPlaneEvent):
    to_version: str
    availability_pct: float | None = None
    availability: ControlPlaneAvailability | None = None
    config_hash: str | None = None


class ControlPlaneUpgradeFailed(ControlPlaneEvent):
    node: str | None
    reason: str
    rolled_back: bool = False
    availability: ControlPlaneAvailability | None = None


def _all_event_classes() -> dict[str, type[Event]]:
    found: dict[str, type[Event]] = {}
    stack: list[type[Event]] = [Event]
    abstract = {Event, FleetEvent, ClusterSetEvent, ClusterEvent, RolloutEvent, ControlPlaneEvent, FleetRolloutEvent,
                ControlPlanePipelineEvent}
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            stack.append(sub)
            if sub not in abstract:
                found[sub.type_name()] = sub
    return dict(sorted(found.items()))


EVENT_TYPES: dict[str, type[Event]] = _all_event_classes()
