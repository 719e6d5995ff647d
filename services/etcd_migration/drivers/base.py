"""The `ControlPlaneDriver` port: what etcd_migration needs from the machines a control plane runs on.

Shaped after a cloud: control-plane nodes are VMs with a data disk; a stopped VM releases its
addresses; a disk can be snapshotted and new VMs created from the snapshot; a load balancer can
take over a static address. Every method is an *ensure*: calling it again after a crash (or
after it already happened) does no harm and reports the same result, so the service can redo
the step that was running when it died. Methods raise `DriverError` (retryable or not).

A cluster's control plane has a **public** and an **internal** endpoint (clients and kubelets).
Before a migration they are the single node's own addresses; after it, two load balancers hold
the same addresses in front of three members. Clients are never reconfigured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class DriverError(Exception):
    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ControlPlaneRef:
    cluster_id: str
    operation_id: str  # names this operation's snapshots and new nodes, so a redo finds them


@dataclass(frozen=True)
class MemberStatus:
    name: str
    client_url: str
    healthy: bool
    version: str  # the control-plane (Kubernetes) version the node runs
    revision: int = 0
    hashkv: int = 0
    is_leader: bool = False


@dataclass(frozen=True)
class ControlPlaneInfo:
    public_endpoint: str  # what clients use; unchanged by a migration
    internal_endpoint: str  # what kubelets use; unchanged by a migration
    members: list[MemberStatus]
    mutations_stopped: bool = False  # control-plane pods (API servers) off
    load_balanced: bool = False  # the endpoints are load balancers (HA), not one node's addresses
    load_balancers_open: bool = True


@dataclass(frozen=True)
class SnapshotInfo:
    location: str  # where the snapshot file is (a path, or an object-store URL)
    hash: int
    revision: int
    total_keys: int


@dataclass(frozen=True)
class DiskSnapshot:
    id: str
    node: str


@dataclass(frozen=True)
class ValidationReport:
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class ProbeTarget(Protocol):
    """What the availability prober talks to: the control plane's API as its clients see it."""

    async def put(self, key: bytes, value: bytes) -> object:
        ...

    async def get(self, key: bytes) -> object:
        ...

    async def aclose(self) -> None:
        ...


class ControlPlaneDriver(Protocol):
    """One implementation per place control planes run (local processes, sim, later EC2/Azure VM/GCE)."""

    async def ensure_control_plane(self, ref: ControlPlaneRef, version: str) -> ControlPlaneInfo:
        """Make sure the cluster has a control plane (a single node if none); describe it."""
        ...

    async def describe(self, ref: ControlPlaneRef) -> ControlPlaneInfo:
        """The control plane as it is now (members with health, revision and hashkv)."""
        ...

    # ---- migration, phase 1: quiesce and capture
    async def stop_mutations(self, ref: ControlPlaneRef) -> None:
        """Control-plane pods off: no API server writes to etcd any more (etcd stays up)."""
        ...

    async def snapshot_save(self, ref: ControlPlaneRef) -> SnapshotInfo:
        """`etcdctl snapshot save` from the single member, verified with `snapshot status` (hash, revision)."""
        ...

    async def stop_node(self, ref: ControlPlaneRef, node: str) -> None:
        """Stop the node's VM; its public and internal addresses are released."""
        ...

    async def snapshot_disk(self, ref: ControlPlaneRef, node: str) -> DiskSnapshot:
        """Snapshot the stopped node's data disk (the rollback copy; never written to)."""
        ...

    # ---- phase 2: the new control plane, dark
    async def create_nodes(self, ref: ControlPlaneRef, disk: DiskSnapshot, names: list[str]) -> None:
        """Create one VM per name from the disk snapshot, without controller-manager, not serving."""
        ...

    async def create_load_balancers(self, ref: ControlPlaneRef, backends: list[str]) -> None:
        """Public and internal load balancers on the old node's addresses, sending no traffic yet."""
        ...

    async def restore_members(self, ref: ControlPlaneRef, snapshot: SnapshotInfo, names: list[str],
                              cluster_token: str, revision_bump: int) -> None:  # fmt: skip
        """`snapshot restore` on every new node with the new `--initial-cluster` and token, start them; the
        revision is raised by `revision_bump` and compacted, so watches and informer caches re-list."""
        ...

    # ---- phase 3: serve
    async def open_internal_load_balancer(self, ref: ControlPlaneRef) -> None:
        """Let the kubelets reach the new members through the internal endpoint (the public one stays closed),
        so that they renew their leases before controller-manager judges them. The old node is fenced first:
        from here on the new members take writes, and the migration can no longer roll back."""
        ...

    async def kubelets_heartbeating(self, ref: ControlPlaneRef, since_revision: int) -> bool:
        """Whether the nodes' kubelets have renewed their leases since the restore."""
        ...

    async def start_controller_manager(self, ref: ControlPlaneRef) -> None:
        ...

    async def open_load_balancers(self, ref: ControlPlaneRef) -> None:
        """Send traffic to the new members; the old node is fenced for good (it can never be started again)."""
        ...

    # ---- rollback (only before phase 3)
    async def remove_new_nodes(self, ref: ControlPlaneRef) -> None:
        """Stop and delete the nodes this operation created (fencing them before the old one restarts)."""
        ...

    async def remove_load_balancers(self, ref: ControlPlaneRef) -> None:
        ...

    async def start_node(self, ref: ControlPlaneRef, node: str) -> None:
        """Start the old node from its untouched disk; it takes its addresses back."""
        ...

    async def resume_mutations(self, ref: ControlPlaneRef) -> None:
        """Control-plane pods on again."""
        ...

    # ---- upgrades, one node at a time
    async def replace_node(self, ref: ControlPlaneRef, node: str, version: str) -> None:
        """Replace the node's VM with one running `version`, keeping its data disk and membership."""
        ...

    async def validate(self, ref: ControlPlaneRef) -> ValidationReport:
        """Post-checks: every member healthy, same hashkv, a write and read through the public endpoint."""
        ...

    async def down_members(self, ref: ControlPlaneRef) -> int:
        """How many control-plane nodes are not serving right now (for the prober's quorum accounting)."""
        ...

    def probe_target(self, ref: ControlPlaneRef, endpoint: str, timeout_s: float) -> ProbeTarget:
        """A client of the public endpoint for the prober: every request raises unless the API served it."""
        ...
