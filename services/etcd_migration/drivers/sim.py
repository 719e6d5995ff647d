"""The `sim` ControlPlaneDriver: simulated control-plane VMs for fleet-scale runs, kept in Redis.

It behaves like the cloud the port is shaped after, without running anything:
* every control plane is one JSON document in Redis (outside the service process, so restarts
  and racing replicas are honest), changed only by compare-and-set on its version;
* VM and load-balancer work is an **asynchronous operation**: the first call records it with
  a completion time (latency ± jitter, scaled per kind of work), every call (a redo after a
  crash included) waits for that time and then applies the effect, which is idempotent;
* calls are **throttled** at `sim_throttle_rate` (a retryable error, as a cloud API's 429), and
  the faults of `drivers/faults.py` can be injected into any step from another process;
* the keyspace is modelled by what the procedure checks: revision, compacted revision, key
  count and a content hash (`hashkv`). Writes through the endpoint (the prober's) raise the
  revision and change the hash on every running member when the API can serve them;
* the API serves when its API servers are on (mutations not stopped) and either the single
  node runs unfenced, or the load balancers are open with a quorum of members running;
* kubelets reach the members only through the internal load balancer and renew their leases
  every `heartbeat_s` (the wait-kubelets step waits for one round after opening it);
  controller-manager is a flag.
Keys: f"{prefix}:simcp:{{simcp}}:cp:<cluster>" (one hash tag, so the script runs on Redis Cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Literal, cast

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from services.etcd_migration.drivers.base import (
    ControlPlaneDriver,
    ControlPlaneInfo,
    ControlPlaneRef,
    DiskSnapshot,
    DriverError,
    MemberStatus,
    ProbeTarget,
    SnapshotInfo,
    ValidationReport,
)
from services.etcd_migration.drivers.etcd import INTERNAL_PREFIX
from services.etcd_migration.drivers.faults import FaultBook, FaultInjection, driver_step
from shared.config import Settings

FIRST_NODE = "cp-0"
INITIAL_KEYS = 1_200  # what a small cluster's etcd holds: the first revision is this high too
CAS_ATTEMPTS = 50
OPERATIONS_KEPT = 100  # operations remembered per control plane (a redo only ever looks for a recent one)

# How long each kind of work takes, in units of the sim latency (a VM boots slower than an LB reconfigures).
WORK_UNITS = {
    "stop_mutations": 0.3, "stop_node": 1.0, "snapshot_disk": 2.0, "create_nodes": 3.0,
    "create_load_balancers": 2.0, "restore_members": 1.0, "start_controller_manager": 0.3,
    "open_internal_load_balancer": 0.5, "open_load_balancers": 0.5, "remove_new_nodes": 1.0,
    "remove_load_balancers": 1.0, "start_node": 1.0,
    "resume_mutations": 0.3, "replace_node": 3.0,
}  # fmt: skip

# KEYS[1]=document  ARGV[1]=expected version ('0': none yet)  ARGV[2]=new version  ARGV[3]=document JSON
_CAS = """
local v = redis.call('HGET', KEYS[1], 'v') or '0'
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'doc', ARGV[3])
return 1
"""


def _digest(*parts: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b"\0".join(parts), digest_size=8).digest(), "big")


class Keyspace(BaseModel):
    revision: int
    compact_revision: int = 0
    keys: int
    content: int  # a digest of the users' keys and values (Flotilla's own probe keys aside)

    def written(self, key: bytes, value: bytes) -> Keyspace:
        if key.startswith(INTERNAL_PREFIX):
            return self.model_copy(update={"revision": self.revision + 1})
        content = _digest(self.content.to_bytes(8, "big"), key, value)
        return self.model_copy(update={"revision": self.revision + 1, "content": content})

    @property
    def hashkv(self) -> int:
        """What `etcdctl endpoint hashkv` would report: equal on members with the same keys at the same revision."""
        return _digest(self.content.to_bytes(8, "big"), self.revision.to_bytes(8, "big")) >> 32


class Node(BaseModel):
    name: str
    version: str
    state: Literal["running", "stopped", "deleted"] = "running"
    fenced: bool = False  # never started again
    data: Keyspace  # its data disk
    controller_manager: bool = False
    created_by: str = ""  # the operation that created it ("" for the first node)


class LoadBalancers(BaseModel):
    backends: list[str]
    open: bool = False  # both serve
    internal_open: bool = False  # the internal one serves (kubelets), the public one not yet
    internal_opened_at: float | None = None

    @property
    def serving_new_members(self) -> bool:
        return self.open or self.internal_open


class ControlPlane(BaseModel):
    cluster_id: str
    nodes: dict[str, Node]
    members: list[str]
    mutations_stopped: bool = False
    load_balancers: LoadBalancers | None = None
    snapshots: dict[str, Keyspace] = Field(default_factory=dict)  # etcd snapshot files, by location
    disks: dict[str, Keyspace] = Field(default_factory=dict)  # disk snapshots, by id
    operations: dict[str, float] = Field(default_factory=dict)  # asynchronous work -> when it is done
    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise DriverError(f"{self.cluster_id}: no control-plane node {name}", retryable=False) from None

    def running(self, name: str) -> bool:
        node = self.nodes.get(name)
        return node is not None and node.state == "running" and not node.fenced

    def quorum(self) -> bool:
        return sum(self.running(n) for n in self.members) >= len(self.members) // 2 + 1

    def serving(self) -> bool:
        """Whether a request through the public endpoint reaches a writable control plane."""
        if self.mutations_stopped:
            return False
        if self.load_balancers is not None:
            return self.load_balancers.open and self.quorum()
        return len(self.members) == 1 and self.running(self.members[0])

    def leader(self) -> str | None:
        return next((n for n in sorted(self.members) if self.running(n)), None) if self.quorum() else None


class SimControlPlaneDriver(FaultInjection):
    def __init__(self, redis: Redis, prefix: str = "flotilla", *, latency_s: float = 0.0, jitter: float = 0.0,
                 throttle_rate: float = 0.0, heartbeat_s: float | None = None, seed: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.redis = redis
        self.base = f"{prefix}:simcp:{{simcp}}"
        self.latency_s = latency_s
        self.jitter = jitter
        self.throttle_rate = throttle_rate
        # Kubelets renew their node lease every 10 s on a real cluster; the sim scales that with its latency.
        self.heartbeat_s = 2 * latency_s if heartbeat_s is None else heartbeat_s
        self.rng = random.Random(seed)
        self.clock = clock
        self.fault_book = FaultBook(redis, prefix, "sim")
        self._cas = redis.register_script(_CAS)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> SimControlPlaneDriver:
        return cls(redis, settings.redis_prefix, latency_s=settings.sim_latency_s, jitter=settings.sim_latency_jitter,
                   throttle_rate=settings.sim_throttle_rate, seed=settings.sim_seed)  # fmt: skip

    # ------------------------------------------------ state

    def _key(self, cluster_id: str) -> str:
        return f"{self.base}:cp:{cluster_id}"

    async def _read(self, cluster_id: str) -> tuple[int, ControlPlane | None]:
        raw = cast(dict[str, str], await self.redis.hgetall(self._key(cluster_id)))  # type: ignore[misc]
        if not raw:
            return 0, None
        return int(raw["v"]), ControlPlane.model_validate_json(raw["doc"])

    async def load(self, cluster_id: str) -> ControlPlane | None:
        return (await self._read(cluster_id))[1]

    async def _require(self, ref: ControlPlaneRef) -> ControlPlane:
        cp = await self.load(ref.cluster_id)
        if cp is None:
            raise DriverError(f"{ref.cluster_id}: no simulated control plane", retryable=False)
        return cp

    async def _change(self, cluster_id: str, change: Callable[[ControlPlane | None], ControlPlane | None]
                      ) -> ControlPlane | None:  # fmt: skip
        """Read, change, compare-and-set; again on a lost race. `change` returns None for "nothing to do"."""
        for _ in range(CAS_ATTEMPTS):
            version, cp = await self._read(cluster_id)
            after = change(cp.model_copy(deep=True) if cp else None)
            if after is None:
                return cp
            if await self._cas(keys=[self._key(cluster_id)], args=[version, version + 1, after.model_dump_json()]):
                return after
        raise DriverError(f"{cluster_id}: the control plane's record kept changing under this call")

    def _locked(self, cluster_id: str) -> AbstractAsyncContextManager[None]:
        # Every change is a compare-and-set on the cluster's record: steps need no lock of their own.
        return contextlib.nullcontext()

    # ------------------------------------------------ cloud behaviour

    def _throttle(self, what: str) -> None:
        if self.throttle_rate and self.rng.random() < self.throttle_rate:
            raise DriverError(f"Throttling: rate exceeded ({what})", retryable=True)

    async def _operation(self, ref: ControlPlaneRef, work: str, target: str = "") -> None:
        """Start the asynchronous operation `work` (once, whoever asks first) and wait until it is done."""
        self._throttle(work)
        name = f"{ref.operation_id}:{work}:{target}"
        scale = WORK_UNITS.get(work, 1.0) * self.latency_s
        duration = max(0.0, scale * (1 + self.rng.uniform(-self.jitter, self.jitter))) if scale else 0.0

        def start(cp: ControlPlane | None) -> ControlPlane | None:
            if cp is None or name in cp.operations:
                return None
            cp.operations[name] = self.clock() + duration
            if len(cp.operations) > OPERATIONS_KEPT:  # the record of a long-lived control plane stays small
                cp.operations = dict(sorted(cp.operations.items(), key=lambda kv: kv[1])[-OPERATIONS_KEPT:])
            return cp

        cp = await self._change(ref.cluster_id, start)
        if cp is None:
            raise DriverError(f"{ref.cluster_id}: no simulated control plane", retryable=False)
        wait = cp.operations.get(name, 0.0) - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)

    def _info(self, cp: ControlPlane) -> ControlPlaneInfo:
        leader = cp.leader()
        members = [
            MemberStatus(name=n, client_url=f"sim://{cp.cluster_id}/nodes/{n}",
                         healthy=cp.running(n) and (len(cp.members) == 1 or cp.quorum()),
                         version=cp.node(n).version, revision=cp.node(n).data.revision,
                         hashkv=cp.node(n).data.hashkv, is_leader=n == leader)
            for n in cp.members
        ]  # fmt: skip
        lbs = cp.load_balancers
        return ControlPlaneInfo(public_endpoint=f"sim://{cp.cluster_id}/public",
                                internal_endpoint=f"sim://{cp.cluster_id}/internal", members=members,
                                mutations_stopped=cp.mutations_stopped, load_balanced=lbs is not None,
                                load_balancers_open=lbs.open if lbs else True)  # fmt: skip

    async def write(self, cluster_id: str, key: bytes, value: bytes) -> int:
        """A write through the public endpoint: every running member applies it (the revision it got)."""

        def put(cp: ControlPlane | None) -> ControlPlane | None:
            if cp is None or not cp.serving():
                raise DriverError(f"{cluster_id}: the API is not serving")
            for name in cp.members:
                if cp.running(name):
                    cp.nodes[name].data = cp.nodes[name].data.written(key, value)
            return cp

        cp = await self._change(cluster_id, put)
        assert cp is not None
        return max(cp.node(n).data.revision for n in cp.members)

    async def read(self, cluster_id: str) -> int:
        """A linearizable read through the public endpoint (the revision it saw)."""
        cp = await self.load(cluster_id)
        if cp is None or not cp.serving():
            raise DriverError(f"{cluster_id}: the API is not serving")
        return max(cp.node(n).data.revision for n in cp.members if cp.running(n))

    async def kill_member(self, ref: ControlPlaneRef, name: str) -> None:
        """A member's VM crashes (tests)."""

        def crash(cp: ControlPlane | None) -> ControlPlane | None:
            if cp is None:
                return None
            cp.node(name).state = "stopped"
            return cp

        await self._change(ref.cluster_id, crash)

    async def inventory(self) -> dict[str, ControlPlane]:
        out: dict[str, ControlPlane] = {}
        async for key in self.redis.scan_iter(match=f"{self.base}:cp:*", count=1000):
            cluster_id = str(key).rsplit(":", 1)[1]
            cp = await self.load(cluster_id)
            if cp is not None:
                out[cluster_id] = cp
        return out

    # ------------------------------------------------ the port

    @driver_step()
    async def ensure_control_plane(self, ref: ControlPlaneRef, version: str) -> ControlPlaneInfo:
        self._throttle("ensure_control_plane")

        def create(cp: ControlPlane | None) -> ControlPlane | None:
            if cp is not None:
                return None
            data = Keyspace(revision=INITIAL_KEYS, keys=INITIAL_KEYS, content=_digest(ref.cluster_id.encode()))
            node = Node(name=FIRST_NODE, version=version, data=data)
            return ControlPlane(cluster_id=ref.cluster_id, nodes={FIRST_NODE: node}, members=[FIRST_NODE])

        cp = await self._change(ref.cluster_id, create)
        assert cp is not None
        return self._info(cp)

    @driver_step(lock=False)
    async def describe(self, ref: ControlPlaneRef) -> ControlPlaneInfo:
        return self._info(await self._require(ref))

    async def _set(self, ref: ControlPlaneRef, change: Callable[[ControlPlane], bool | None]) -> ControlPlane:
        """Apply an idempotent change (it returns False when there is nothing to do)."""

        def apply(cp: ControlPlane | None) -> ControlPlane | None:
            if cp is None:
                raise DriverError(f"{ref.cluster_id}: no simulated control plane", retryable=False)
            return None if change(cp) is False else cp

        cp = await self._change(ref.cluster_id, apply)
        assert cp is not None
        return cp

    @driver_step()
    async def stop_mutations(self, ref: ControlPlaneRef) -> None:
        await self._operation(ref, "stop_mutations")

        def stop(cp: ControlPlane) -> bool | None:
            if cp.mutations_stopped:
                return False
            cp.mutations_stopped = True  # API servers off: nothing writes to etcd any more
            return None

        await self._set(ref, stop)

    @driver_step()
    async def snapshot_save(self, ref: ControlPlaneRef) -> SnapshotInfo:
        self._throttle("snapshot_save")
        location = f"sim://{ref.cluster_id}/snapshots/{ref.operation_id}"

        def save(cp: ControlPlane) -> bool | None:
            if location in cp.snapshots:
                return False  # a redo: the file is there already
            source = cp.leader() if len(cp.members) > 1 else next((n for n in cp.members if cp.running(n)), None)
            if source is None:
                raise DriverError(f"{ref.cluster_id}: no healthy member to take a snapshot from")
            cp.snapshots[location] = cp.node(source).data.model_copy()
            return None

        snap = (await self._set(ref, save)).snapshots[location]
        return SnapshotInfo(location=location, hash=snap.content, revision=snap.revision, total_keys=snap.keys)

    @driver_step()
    async def stop_node(self, ref: ControlPlaneRef, node: str) -> None:
        await self._operation(ref, "stop_node", node)

        def stop(cp: ControlPlane) -> bool | None:
            if cp.node(node).state != "running":
                return False
            cp.node(node).state = "stopped"  # its public and internal addresses are released
            return None

        await self._set(ref, stop)

    @driver_step()
    async def snapshot_disk(self, ref: ControlPlaneRef, node: str) -> DiskSnapshot:
        disk_id = f"disk-{ref.operation_id}-{node}"
        await self._operation(ref, "snapshot_disk", node)

        def snapshot(cp: ControlPlane) -> bool | None:
            if disk_id in cp.disks:
                return False
            if cp.node(node).state == "running":
                raise DriverError(f"{ref.cluster_id}/{node} is running: stop it before snapshotting its disk",
                                  retryable=False)  # fmt: skip
            cp.disks[disk_id] = cp.node(node).data.model_copy()
            return None

        await self._set(ref, snapshot)
        return DiskSnapshot(id=disk_id, node=node)

    @driver_step()
    async def create_nodes(self, ref: ControlPlaneRef, disk: DiskSnapshot, names: list[str]) -> None:
        await self._operation(ref, "create_nodes")

        def create(cp: ControlPlane) -> bool | None:
            if disk.id not in cp.disks:
                raise DriverError(f"{ref.cluster_id}: no disk snapshot {disk.id}", retryable=False)
            missing = [n for n in names if n not in cp.nodes]
            version = cp.node(disk.node).version
            for name in missing:  # not serving: stopped until restore_members starts them as members
                cp.nodes[name] = Node(name=name, version=version, state="stopped", data=cp.disks[disk.id],
                                      created_by=ref.operation_id)  # fmt: skip
            return None if missing else False

        await self._set(ref, create)

    @driver_step()
    async def create_load_balancers(self, ref: ControlPlaneRef, backends: list[str]) -> None:
        cp = await self._require(ref)
        if cp.load_balancers is None and any(cp.running(n) for n in cp.members):
            raise DriverError(f"{ref.cluster_id}: the node still holds the addresses the load balancers need")
        await self._operation(ref, "create_load_balancers")

        def create(cp: ControlPlane) -> bool | None:
            if cp.load_balancers is not None:
                return False
            cp.load_balancers = LoadBalancers(backends=list(backends), open=False)
            return None

        await self._set(ref, create)

    @driver_step()
    async def restore_members(self, ref: ControlPlaneRef, snapshot: SnapshotInfo, names: list[str],
                              cluster_token: str, revision_bump: int) -> None:  # fmt: skip
        await self._operation(ref, "restore_members")

        def restore(cp: ControlPlane) -> bool | None:
            if cp.members == names and all(cp.running(n) for n in names):
                return False
            if snapshot.location not in cp.snapshots:
                raise DriverError(f"{ref.cluster_id}: no snapshot at {snapshot.location}", retryable=False)
            snap = cp.snapshots[snapshot.location]
            # A bumped revision, compacted: watches and informer caches re-list instead of resuming.
            revision = snap.revision + revision_bump
            restored = snap.model_copy(update={"revision": revision, "compact_revision": revision})
            for name in names:
                node = cp.node(name)
                node.data, node.state = restored, "running"
            cp.members = list(names)
            return None

        await self._set(ref, restore)

    @staticmethod
    def _fence_old_nodes(cp: ControlPlane) -> None:
        """Before any load balancer sends traffic to the new members: never two writable control planes."""
        if cp.load_balancers is None:
            raise DriverError(f"{cp.cluster_id}: no load balancers to open", retryable=False)
        if not all(cp.running(n) for n in cp.members):
            raise DriverError(f"{cp.cluster_id}: not every new member is running yet")
        for node in cp.nodes.values():
            if not node.created_by and node.name not in cp.members:
                node.fenced, node.state = True, "stopped"

    @driver_step()
    async def open_internal_load_balancer(self, ref: ControlPlaneRef) -> None:
        await self._operation(ref, "open_internal_load_balancer")

        def open_internal(cp: ControlPlane) -> bool | None:
            if cp.load_balancers is not None and cp.load_balancers.serving_new_members:
                return False
            self._fence_old_nodes(cp)
            assert cp.load_balancers is not None
            cp.load_balancers.internal_open, cp.load_balancers.internal_opened_at = True, self.clock()
            return None

        await self._set(ref, open_internal)

    @driver_step(lock=False)
    async def kubelets_heartbeating(self, ref: ControlPlaneRef, since_revision: int) -> bool:
        # Kubelets reach the members through the internal endpoint only, and renew every `heartbeat_s`.
        cp = await self._require(ref)
        lbs = cp.load_balancers
        if lbs is None or not lbs.serving_new_members or not cp.quorum():
            return False
        opened = lbs.internal_opened_at if lbs.internal_opened_at is not None else 0.0
        return self.clock() >= opened + self.heartbeat_s

    @driver_step()
    async def start_controller_manager(self, ref: ControlPlaneRef) -> None:
        await self._operation(ref, "start_controller_manager")

        def start(cp: ControlPlane) -> bool | None:
            if all(cp.node(n).controller_manager for n in cp.members):
                return False
            for name in cp.members:
                cp.node(name).controller_manager = True
            return None

        await self._set(ref, start)

    @driver_step()
    async def open_load_balancers(self, ref: ControlPlaneRef) -> None:
        await self._operation(ref, "open_load_balancers")

        def open_(cp: ControlPlane) -> bool | None:
            if cp.load_balancers is not None and cp.load_balancers.open and not cp.mutations_stopped:
                return False
            self._fence_old_nodes(cp)
            assert cp.load_balancers is not None
            cp.load_balancers.open, cp.mutations_stopped = True, False
            return None

        await self._set(ref, open_)

    @driver_step()
    async def remove_new_nodes(self, ref: ControlPlaneRef) -> None:
        await self._operation(ref, "remove_new_nodes")

        def remove(cp: ControlPlane) -> bool | None:
            if cp.load_balancers is not None and cp.load_balancers.serving_new_members:
                raise DriverError(f"{ref.cluster_id}: the new members serve already; not removing them",
                                  retryable=False)  # fmt: skip
            created = [n for n in cp.nodes.values() if n.created_by == ref.operation_id]
            if not created:
                return False
            for node in created:
                del cp.nodes[node.name]
            cp.members = [n for n in cp.members if n in cp.nodes] or [
                n.name for n in cp.nodes.values() if not n.created_by and not n.fenced][:1]  # fmt: skip
            return None

        await self._set(ref, remove)

    @driver_step()
    async def remove_load_balancers(self, ref: ControlPlaneRef) -> None:
        await self._operation(ref, "remove_load_balancers")

        def remove(cp: ControlPlane) -> bool | None:
            if cp.load_balancers is None:
                return False
            if cp.load_balancers.serving_new_members:
                raise DriverError(f"{ref.cluster_id}: the load balancers serve; not removing them", retryable=False)
            cp.load_balancers = None
            return None

        await self._set(ref, remove)

    @driver_step()
    async def start_node(self, ref: ControlPlaneRef, node: str) -> None:
        cp = await self._require(ref)
        if cp.node(node).fenced:
            raise DriverError(f"{ref.cluster_id}/{node} is fenced: it is never started again", retryable=False)
        if any(n.created_by == ref.operation_id for n in cp.nodes.values()) or cp.load_balancers is not None:
            raise DriverError(f"{ref.cluster_id}: remove the new members and load balancers before restarting "
                              f"{node}", retryable=False)  # fmt: skip
        await self._operation(ref, "start_node", node)

        def start(cp: ControlPlane) -> bool | None:
            if cp.running(node) and cp.members == [node]:
                return False
            cp.node(node).state, cp.members = "running", [node]  # from its untouched disk, on its own addresses
            return None

        await self._set(ref, start)

    @driver_step()
    async def resume_mutations(self, ref: ControlPlaneRef) -> None:
        await self._operation(ref, "resume_mutations")

        def resume(cp: ControlPlane) -> bool | None:
            if not cp.mutations_stopped:
                return False
            cp.mutations_stopped = False
            return None

        await self._set(ref, resume)

    @driver_step()
    async def replace_node(self, ref: ControlPlaneRef, node: str, version: str) -> None:
        cp = await self._require(ref)
        if node not in cp.members:
            raise DriverError(f"{ref.cluster_id}/{node} is not a member of the control plane", retryable=False)
        target = cp.node(node)
        if target.version == version and cp.running(node):
            return  # done already (a redo)
        others = [n for n in cp.members if n != node]
        if others and sum(cp.running(n) for n in others) < len(cp.members) // 2 + 1:
            raise DriverError(f"{ref.cluster_id}: replacing {node} would lose quorum")

        def take_down(cp: ControlPlane) -> bool | None:
            if cp.node(node).state == "stopped":
                return False
            cp.node(node).state = "stopped"  # the old VM is gone; the new one boots from the same data disk
            return None

        await self._set(ref, take_down)
        await self._operation(ref, "replace_node", f"{node}:{version}")  # a new VM per version

        def boot(cp: ControlPlane) -> bool | None:
            n = cp.node(node)
            if n.state == "running" and n.version == version:
                return False
            leader = cp.leader()
            if leader is not None and leader != node:  # it catches up from the leader on joining
                n.data = cp.node(leader).data.model_copy()
            n.state, n.version = "running", version
            return None

        await self._set(ref, boot)

    @driver_step(lock=False)
    async def validate(self, ref: ControlPlaneRef) -> ValidationReport:
        cp = await self._require(ref)
        info = self._info(cp)
        problems = [f"{m.name} is not healthy" for m in info.members if not m.healthy]
        hashes = {m.name: m.hashkv for m in info.members if m.healthy}
        if len(set(hashes.values())) > 1:
            problems.append(f"members disagree on hashkv: {hashes}")
        try:
            written = await self.write(ref.cluster_id, b"/flotilla/validate", ref.operation_id.encode())
            if await self.read(ref.cluster_id) < written:
                problems.append("a read after the write saw an older revision")
        except DriverError as exc:
            problems.append(f"write and read through the endpoint: {exc}")
        return ValidationReport(problems=problems)

    async def down_members(self, ref: ControlPlaneRef) -> int:
        cp = await self.load(ref.cluster_id)
        return 0 if cp is None else sum(not cp.running(n) for n in cp.members)

    def probe_target(self, ref: ControlPlaneRef, endpoint: str, timeout_s: float) -> ProbeTarget:
        return SimProbeTarget(self, ref.cluster_id)


class SimProbeTarget:
    """The prober's client of a simulated control plane: requests succeed exactly when the API serves."""

    def __init__(self, driver: SimControlPlaneDriver, cluster_id: str) -> None:
        self.driver = driver
        self.cluster_id = cluster_id

    async def put(self, key: bytes, value: bytes) -> object:
        return await self.driver.write(self.cluster_id, key, value)

    async def get(self, key: bytes) -> object:
        return await self.driver.read(self.cluster_id)

    async def aclose(self) -> None:
        return None


def _implements_the_port(driver: SimControlPlaneDriver) -> ControlPlaneDriver:
    return driver  # mypy checks the driver against the ControlPlaneDriver protocol here
