"""Response shapes of the status API, for the OpenAPI document.

The API serves the stored documents as they are (no re-validation on the hot path); a unit
test validates what the core and the renderers produce against these models, so the
published schema cannot drift from the data.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

ClusterStateName = Literal[
    "REQUESTED", "PROVISIONING", "PROVISIONED", "INSTALLING", "READY", "UPDATING",
    "DRAINING", "DRAINED", "DELETING", "DELETED", "FAILED",
]  # fmt: skip
CloudName = Literal["aws", "azure", "gcp"]
SetRolloutStateName = Literal["REQUESTED", "IN_PROGRESS", "WAITING", "PAUSED", "ROLLING_BACK", "COMPLETED", "ABORTED",
                              "ROLLED_BACK"]  # fmt: skip
FleetRolloutStateName = Literal["PENDING", "IN_PROGRESS", "AWAITING_APPROVAL", "SOAKING", "PAUSED", "HALTED", "ABORTED",
                                "COMPLETED", "REJECTED"]  # fmt: skip
RolloutStateName = Literal["REQUESTED", "IN_PROGRESS", "WAITING", "PAUSED", "ROLLING_BACK", "COMPLETED", "ABORTED",
                           "ROLLED_BACK", "PENDING", "AWAITING_APPROVAL", "SOAKING", "HALTED", "REJECTED"]  # fmt: skip
StageStateName = Literal["PENDING", "AWAITING_APPROVAL", "IN_PROGRESS", "SOAKING", "COMPLETED"]
SetEntryStateName = Literal["PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED"]
RolloutKindName = Literal["clusterset", "fleet"]
OperationStateName = Literal["REQUESTED", "IN_PROGRESS", "ROLLING_BACK", "COMPLETED", "ROLLED_BACK", "FAILED"]
PipelineStateName = Literal["IN_PROGRESS", "HALTED", "COMPLETED"]
MigrationStateName = Literal["REQUESTED", "IN_PROGRESS", "ROLLING_BACK", "COMPLETED", "ROLLED_BACK", "FAILED",
                             "HALTED"]  # fmt: skip
OperationKindName = Literal["migration", "upgrade"]
MigrationKindName = Literal["migration", "upgrade", "pipeline"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Location(_Out):
    env: str
    cloud: str
    region: str


class InfraServiceStatus(_Out):
    name: str
    version: str
    state: Literal["PENDING", "INSTALLED", "FAILED"]


class Condition(_Out):
    type: str
    status: Literal["True", "False"]
    reason: str
    message: str
    lastTransitionTime: str


class Failure(_Out):
    code: str | None
    message: str | None
    retryable: bool | None
    operation: str | None
    step: str | None
    service: str | None
    object: str | None
    fromState: str
    eventId: str
    time: str


class Network(_Out):
    networkId: str
    subnetIds: list[str]
    owned: bool
    vpcId: str | None = None
    vnetId: str | None = None


class Desired(_Out):
    generation: int
    configHash: str
    spec: dict[str, Any]
    changes: list[str]


class Retirement(_Out):
    reason: str | None
    drain: bool
    requestedAt: str
    rolloutId: str | None = Field(default=None, description="the rollout that retired it (rotation or rollback)")


class Drain(_Out):
    requestedAt: str | None
    drainedAt: str | None
    timedOut: bool
    timeoutSeconds: float | None = None
    evicted: int | None = Field(default=None, description="pods evicted")
    remaining: int | None = Field(default=None, description="pods still there when the drain ended (timed out)")


class ResourcesUpdate(_Out):
    generation: int
    configHash: str
    changed: list[str] = Field(description="provisioning steps whose resources were updated")
    time: str


class OperationSummary(_Out):
    """A control-plane migration or upgrade in short (the whole story: /v1/migrations/{operationId})."""

    operationId: str
    kind: OperationKindName
    state: OperationStateName
    phase: int | None = Field(description="migration: the phase (1-3) of the last step completed")
    step: str | None = Field(description="the last step completed")
    node: str | None = Field(description="upgrade: the node of the last step completed")
    toVersion: str | None
    availabilityPct: float | None = Field(description="% of the prober's API requests that succeeded")
    pipelineId: str | None
    requestedAt: str | None
    completedAt: str | None = Field(description="when it ended: completed, rolled back or failed")
    updatedAt: str


class ClusterControlPlane(_Out):
    mode: Literal["managed", "self-managed"] | None = Field(description="from the spec")
    ha: bool | None = Field(description="three members after a migration; until then what the spec says")
    members: list[str] = Field(description="the members a migration reported")
    endpoint: str | None = Field(description="the endpoint a migration reported (unchanged for clients)")
    version: str | None = Field(description="the version the last upgrade reached, else the spec's")
    lastOperation: OperationSummary | None


class Cluster(_Out):
    id: str
    name: str
    kind: Literal["Cluster"]
    clusterset: str
    location: Location
    clusterType: str | None
    state: ClusterStateName
    protected: bool = Field(description="deletion protection: never retired while set")
    lastDriftCorrection: dict[str, Any] | None = Field(
        default=None, description="the last objects re-applied after they were changed on the cluster")
    outdated: bool = Field(description="built from another configHash than its set's current one")
    generation: int | None
    configHash: str | None
    spec: dict[str, Any] | None = Field(description="the ClusterSpec it was built from (camelCase)")
    desired: Desired | None = Field(description="an update in progress: the spec it is moving to")
    endpoint: str | None
    caFingerprint: str | None
    credentialRef: str | None
    network: Network | None
    resources: dict[str, dict[str, Any]] = Field(description="cloud resources per provisioning step")
    infraServices: list[InfraServiceStatus]
    failure: Failure | None
    retiring: bool
    retirement: Retirement | None
    rolloutId: str | None = Field(description="the rollout that last drained or retired it")
    createdByRolloutId: str | None = Field(default=None, description="the rollout that created it (a surge cluster)")
    drain: Drain | None
    lastResourcesUpdate: ResourcesUpdate | None = Field(
        default=None, description="the cloud side of the last in-place update (node pools, tags)")
    controlPlane: ClusterControlPlane = Field(description="what its control-plane operations reported")
    conditions: list[Condition]
    createdAt: str
    updatedAt: str
    lastTransitionTime: str
    lastEventId: str | None
    lastEventSeq: int | None
    eventCount: int


class ClusterPage(_Out):
    items: list[Cluster]
    next: str | None = Field(description="pass as `cursor` (or `continue`) for the next page; null at the end")


class MemberMetadata(_Out):
    location: Location
    clusterType: str | None


class MemberSpec(_Out):
    configHash: str | None
    generation: int | None
    kubernetesVersion: str | None
    features: list[str]
    nodePools: list[dict[str, Any]]
    infraServices: list[str]
    tags: dict[str, str]


class MemberStatus(_Out):
    state: ClusterStateName
    protected: bool
    outdated: bool
    endpoint: str | None
    network: Network | None
    infraServices: list[InfraServiceStatus]
    failure: Failure | None
    lastTransitionTime: str
    conditions: list[Condition]


class Member(_Out):
    """One entry of `status.clusters` (see ../shared/examples/clusterset-status.yaml)."""

    name: str
    kind: Literal["Cluster"]
    metadata: MemberMetadata
    spec: MemberSpec
    status: MemberStatus


class FieldErrorOut(_Out):
    field: str
    message: str


class Rejection(_Out):
    eventId: str
    time: str
    cloud: str | None
    region: str | None
    errors: list[FieldErrorOut]


class Waiting(_Out):
    reason: str
    until: str | None
    since: str


class Rollout(_Out):
    """A ClusterSet rollout in short (the set's current one; the fields every rollout view shares)."""

    rolloutId: str
    state: SetRolloutStateName
    startedAt: str | None
    endedAt: str | None = None
    updatedAt: str
    fromConfigHashes: list[str]
    toConfigHash: str | None
    generation: int | None
    count: int | None = Field(default=None, description="clusters on the new config the rollout ends with")
    changes: list[str] = Field(default_factory=list, description="the spec fields whose change needs the rotation")
    replaced: int
    remaining: int | None
    batch: int = 0
    ready: int = Field(default=0, description="new clusters READY")
    alive: int = Field(default=0, description="clusters of the set serving (old and new)")
    reason: str | None = Field(description="why it is paused, aborted or rolled back")
    failed: bool = Field(default=False, description="paused because a new cluster failed")
    failedClusterIds: list[str] = Field(default_factory=list)
    waiting: Waiting | None = Field(default=None, description="outside the set's maintenance window")
    fleetRolloutId: str | None = None


class FleetPatch(_Out):
    fleetRolloutId: str
    stage: str
    patch: dict[str, Any]
    requestedAt: str


class UpdateFailure(_Out):
    generation: int
    configHash: str
    clusterIds: list[str]
    reason: str
    time: str


class SetChange(_Out):
    generation: int
    updatePath: Literal["none", "in-place", "rotation"]
    changes: list[str]
    fleetRolloutId: str | None
    time: str


class SetUpdateFailure(UpdateFailure):
    eventId: str
    fleetRolloutId: str | None


class PipelineSummary(_Out):
    pipelineId: str
    operation: Literal["migrate", "upgrade"] | None
    state: PipelineStateName
    toVersion: str | None
    requestedAt: str | None
    completedAt: str | None
    updatedAt: str


class ClusterSetStatus(_Out):
    observedGeneration: int | None
    desiredClusters: int | None
    currentClusters: int
    readyClusters: int
    counts: dict[ClusterStateName, int]
    outdatedClusters: int | None = None
    updatedClusters: int | None = None
    clusters: list[Member] | None = Field(default=None, description="member clusters that are not DELETED")


class ClusterSet(_Out):
    name: str
    kind: Literal["ClusterSet"]
    accepted: bool = Field(description="false while the set has only ever been rejected")
    deleted: bool
    generation: int | None
    configHash: str | None
    clusterType: str | None
    location: Location | None
    count: int | None
    protected: bool = Field(default=False, description="deletion protection: scale-down and delete are refused")
    spec: dict[str, Any] | None
    updateStrategy: dict[str, Any] | None
    lastRejection: Rejection | None
    labels: dict[str, str] = Field(default_factory=dict)
    lastChange: SetChange | None = Field(default=None, description="what the last new generation changed, and how")
    rollout: Rollout | None
    fleetRollout: FleetPatch | None = Field(default=None, description="the fleet rollout that last patched the set")
    controlPlanePipeline: PipelineSummary | None = Field(
        default=None, description="the latest control-plane migration or upgrade pipeline over the set")
    convergedGeneration: int | None = Field(default=None, description="last generation every cluster reached")
    convergedConfigHash: str | None = None
    convergedAt: str | None = None
    upToDate: bool = Field(default=False, description="the current generation has converged")
    lastUpdateFailure: SetUpdateFailure | None = None
    retiredClusters: list[str]
    createdAt: str
    acceptedAt: str | None
    retiredAt: str | None
    updatedAt: str
    lastEventId: str | None
    lastEventSeq: int | None
    eventCount: int
    status: ClusterSetStatus


class ClusterSetPage(_Out):
    items: list[ClusterSet]
    next: str | None


class TimelineEntry(_Out):
    state: str
    time: str
    type: str = Field(description="the event that moved it")
    eventId: str
    reason: str | None


class ClusterSetRollout(Rollout):
    """One rotation of one ClusterSet (`/v1/rollouts` leaves out the lists marked 'detail only')."""

    id: str
    kind: Literal["ClusterSetRollout"]
    clusterset: str
    location: Location
    clusterType: str | None
    requestedAt: str | None
    outdatedClusters: list[str] | None = Field(default=None, description="clusters it set out to replace; detail only")
    createdClusters: list[str] | None = Field(default=None, description="surge clusters it created; detail only")
    retiredClusters: list[str] | None = Field(default=None, description="clusters it retired; detail only")
    timeline: list[TimelineEntry] | None = Field(default=None, description="state transitions; detail only")
    createdAt: str
    lastEventId: str | None
    lastEventSeq: int | None
    eventCount: int


class FleetStageStatus(_Out):
    name: str
    state: StageStateName
    approval: bool
    soakSeconds: float
    soakUntil: str | None
    clustersets: list[str]
    startedAt: str | None
    completedAt: str | None


class RolloutProgress(_Out):
    rolloutId: str
    state: SetRolloutStateName
    count: int | None
    replaced: int
    remaining: int | None
    batch: int
    ready: int
    alive: int
    updatedAt: str


class Converged(_Out):
    generation: int
    configHash: str
    count: int
    time: str


class FleetSetEntry(_Out):
    clusterset: str
    stage: str | None
    state: SetEntryStateName
    reason: str | None
    errors: list[FieldErrorOut] = Field(description="the planner refused the patch for this set")
    generation: int | None = Field(description="the set's generation the patch made")
    updatePath: Literal["none", "in-place", "rotation"] | None
    changes: list[str]
    rolloutId: str | None
    rollout: RolloutProgress | None = Field(description="the set's own rollout, when the patch needed one")
    converged: Converged | None
    updateFailure: UpdateFailure | None
    startedAt: str | None
    finishedAt: str | None


class Stopped(_Out):
    reason: str
    since: str


class FleetRollout(_Out):
    """One change rolled over many ClusterSets, stage by stage (`/v1/rollouts` leaves out sets and timeline)."""

    id: str
    kind: Literal["FleetRollout"]
    rolloutId: str
    clusterType: str | None
    patch: dict[str, Any] | None
    state: FleetRolloutStateName
    stages: list[FleetStageStatus]
    sets: list[FleetSetEntry] | None = Field(default=None, description="per ClusterSet; detail only")
    setCounts: dict[SetEntryStateName, int]
    maxInFlight: int | None
    failureBudget: int | None
    succeeded: int
    failed: int
    inFlight: int
    budgetExceeded: bool = Field(description="more sets failed than the failure budget allows")
    paused: Stopped | None
    halted: Stopped | None
    reason: str | None = Field(description="why it is paused, halted or aborted")
    failedSets: list[str]
    errors: list[FieldErrorOut] = Field(description="why it was rejected")
    timeline: list[TimelineEntry] | None = Field(default=None, description="state transitions; detail only")
    createdAt: str
    startedAt: str | None
    endedAt: str | None
    updatedAt: str
    lastEventId: str | None
    lastEventSeq: int | None
    eventCount: int


AnyRollout = Annotated[ClusterSetRollout | FleetRollout, Field(discriminator="kind")]


class RolloutDetail(RootModel[AnyRollout]):
    """A ClusterSet rollout or a fleet rollout, told apart by `kind`."""


class RolloutPage(_Out):
    items: list[AnyRollout]
    next: str | None


class Availability(_Out):
    """What the prober saw through the load-balancer endpoint while the operation ran."""

    requests: int
    succeeded: int
    availabilityPct: float
    downtimeS: float = Field(description="longest run of failed requests, seconds")
    requestsWithoutQuorum: int = Field(description="requests made while more than one control-plane node was down")
    succeededWithoutQuorum: int = Field(description="of those, how many succeeded (must be 0)")


class MigrationStep(_Out):
    phase: int | None = Field(description="migration steps: phase 1-3")
    node: str | None = Field(description="upgrade steps: the node")
    step: str
    rollback: bool = Field(description="a step of the rollback")
    startedAt: str | None = Field(description="as reported, else when the previous step completed")
    completedAt: str
    durationS: float | None
    detail: dict[str, Any]
    eventId: str


class OperationFailure(_Out):
    step: str | None
    node: str | None
    reason: str
    rollingBack: bool = Field(description="the rollback steps follow")
    rolledBack: bool = Field(description="the cluster (or, for an upgrade, the failing node) was put back")
    time: str
    eventId: str


class RollbackInfo(_Out):
    fromStep: str
    reason: str | None
    time: str


class ControlPlaneOperation(_Out):
    """One control-plane migration (one node to three) or upgrade (one node at a time) of one cluster.

    `/v1/migrations` leaves out the timeline."""

    id: str
    kind: OperationKindName
    operationId: str
    clusterId: str
    clusterset: str
    location: Location
    pipelineId: str | None
    state: OperationStateName
    phase: int | None
    step: str | None
    node: str | None
    kubernetesVersion: str | None = Field(description="migration: the version the control plane runs")
    toVersion: str | None
    configHash: str | None
    reason: str | None = Field(description="why it was requested")
    timeline: list[MigrationStep] | None = Field(default=None, description="completed steps in order; detail only")
    nodes: list[str] = Field(description="upgrade: the nodes touched, in order")
    failure: OperationFailure | None
    rollback: RollbackInfo | None
    availability: Availability | None
    availabilityPct: float | None
    endpoint: str | None = Field(description="migration: the endpoint after it (the old node's address)")
    members: list[str] = Field(description="migration: the members after it")
    requestedAt: str | None
    completedAt: str | None = Field(description="when it ended: completed, rolled back or failed")
    durationS: float | None = Field(description="from the request to the end")
    createdAt: str
    updatedAt: str
    lastEventId: str | None
    lastEventSeq: int | None
    eventCount: int


class PipelineEntry(_Out):
    clusterId: str
    clusterset: str
    location: Location
    state: SetEntryStateName
    operationId: str | None
    operationState: OperationStateName | None
    startedAt: str | None
    finishedAt: str | None


class ControlPlanePipeline(_Out):
    """Migrations or upgrades of many clusters of a set, `concurrency` at a time, halting past the failure budget.

    `/v1/migrations` leaves out the per-cluster entries."""

    id: str
    kind: Literal["pipeline"]
    pipelineId: str
    clusterset: str
    location: Location
    operation: Literal["migrate", "upgrade"] | None
    kubernetesVersion: str | None = Field(description="migrations: the version the control planes run")
    toVersion: str | None
    configHash: str | None
    concurrency: int | None
    failureBudget: int | None
    state: PipelineStateName
    clusters: list[PipelineEntry] | None = Field(default=None, description="per cluster; detail only")
    counts: dict[SetEntryStateName, int]
    succeeded: int
    failed: int
    inFlight: int
    pending: int
    budgetExceeded: bool = Field(description="more clusters failed than the failure budget allows")
    failedClusters: list[str]
    halted: Stopped | None
    reason: str | None = Field(description="why it halted")
    requestedAt: str | None
    completedAt: str | None
    durationS: float | None
    createdAt: str
    updatedAt: str
    lastEventId: str | None
    lastEventSeq: int | None
    eventCount: int


AnyMigration = Annotated[ControlPlaneOperation | ControlPlanePipeline, Field(discriminator="kind")]


class MigrationDetail(RootModel[AnyMigration]):
    """A migration, an upgrade or a pipeline of either, told apart by `kind`."""


class MigrationPage(_Out):
    items: list[AnyMigration]
    next: str | None


class HistoryEntry(_Out):
    id: str
    type: str
    time: str
    source: str
    seq: int = Field(description="FLEET stream sequence")
    correlationId: str
    causationId: str | None
    detail: dict[str, Any]


class EventPage(_Out):
    items: list[HistoryEntry]
    next: str | None
    total: int


class DiscoveryEntry(_Out):
    id: str
    name: str
    clusterset: str | None
    clusterType: str | None
    location: Location
    endpoint: str | None
    caFingerprint: str | None
    configHash: str | None
    kubernetesVersion: str | None
    features: list[str]
    tags: dict[str, str]
    infraServices: list[InfraServiceStatus]
    readySince: str


class DiscoveryPage(_Out):
    items: list[DiscoveryEntry]
    next: str | None


class Health(_Out):
    status: Literal["ok"]


class ProjectorStatus(_Out):
    running: bool
    subscribed: bool
    namespace: str | None
    checkpoint: int | None
    streamLastSeq: int | None
    lag: int | None
    lastError: str | None


class Readiness(_Out):
    ready: bool
    redis: bool
    nats: bool
    projector: ProjectorStatus


class ErrorBody(_Out):
    error: str
    message: str
    detail: Any = None
