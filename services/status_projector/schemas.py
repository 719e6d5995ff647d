"""Response shapes of the status API, for the OpenAPI document.

The API serves the stored documents as they are (no re-validation on the hot path); a unit
test validates what the core and the renderers produce against these models, so the
published schema cannot drift from the data.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ClusterStateName = Literal[
    "REQUESTED", "PROVISIONING", "PROVISIONED", "INSTALLING", "READY", "UPDATING",
    "DRAINING", "DRAINED", "DELETING", "DELETED", "FAILED",
]  # fmt: skip
CloudName = Literal["aws", "azure", "gcp"]


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


class Drain(_Out):
    requestedAt: str | None
    drainedAt: str | None
    timedOut: bool


class ControlPlaneOperation(_Out):
    operationId: str
    kind: Literal["migration", "upgrade"]
    state: Literal["REQUESTED", "RUNNING", "COMPLETED", "FAILED", "ROLLED_BACK"]
    startedAt: str
    updatedAt: str
    phase: int | None
    step: str | None
    node: str | None
    toVersion: str | None
    availabilityPct: float | None
    reason: str | None


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
    rolloutId: str | None
    drain: Drain | None
    controlPlaneOperation: ControlPlaneOperation | None
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


class Rollout(_Out):
    rolloutId: str
    state: Literal["REQUESTED", "IN_PROGRESS", "COMPLETED", "PAUSED", "ROLLED_BACK"]
    startedAt: str | None
    updatedAt: str
    fromConfigHashes: list[str]
    toConfigHash: str | None
    generation: int | None
    replaced: int
    remaining: int | None
    reason: str | None


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
    rollout: Rollout | None
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
