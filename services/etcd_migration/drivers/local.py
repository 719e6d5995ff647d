"""The `local` ControlPlaneDriver: real etcd processes on loopback play the control-plane VMs.

The model, mapped onto the cloud the port is shaped after:

* a **node** (VM) is one `etcd` process with its own client and peer ports and a data directory
  (its data disk) under `<state_dir>/<cluster>/nodes/<name>/`;
* the single node's **API servers** are two proxy processes (drivers/proxy.py) holding the
  cluster's public and internal endpoints and forwarding to the node's client port. Clients only
  ever use the endpoints, so stopping these proxies is "control-plane pods off": no writes can
  reach etcd, while etcd stays up for the snapshot. On the new members the local driver has no
  separate API server: the load balancers forward straight to etcd;
* the **load balancers** are proxy processes bound to the very same two ports once the old node
  and its API servers have let go of them; they start closed (accept and close) and are opened,
  in place, by rewriting their config: the addresses never change, so clients never reconfigure.
  The internal one opens first (wait-kubelets: kubelets renew their leases through it before
  controller-manager starts), the public one last;
* a **disk snapshot** is a copy of the stopped node's data directory, never written to; the
  original stays untouched too, which is what a rollback starts the old node from;
* **fencing** is a marker file in the old node's directory plus a flag in the metadata: a fenced
  node is never started again, so there cannot be two writable control planes.

Everything a restarted service needs is in `<state_dir>/<cluster>/cluster.json` (written
atomically) and in pid files: processes run in their own session and outlive the service, and a
new driver instance finds them by pid, checks they are still the same processes (command line)
and that they answer. Mutating calls on one cluster are serialised by an asyncio lock plus an
flock on the cluster directory (released by the kernel if the service is killed).

Faults for tests: `fail_on(step)` / `inject(Fault(...))` make a step fail or stall, in memory or,
given a Redis, shared with other processes (an end-to-end test injects into the running service);
`kill_member` SIGKILLs one etcd. Local control planes run no kubelets and no controller-manager:
heartbeats are the node-lease keys' revisions (whatever renews them through the internal endpoint:
the tests, the benchmark's kubelets) and controller-manager is a flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from services.etcd_migration.drivers import etcd
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
from services.etcd_migration.drivers.faults import FaultBook, FaultInjection, driver_step
from services.etcd_migration.drivers.proxy import ProxyConfig, applied_generation, atomic_write_text
from shared.embedded import free_port

FIRST_NODE = "cp-0"
# The 3.4 revision bump is one write per revision (see _bump_revision); beyond this it would take minutes.
MAX_REVISION_BUMP = 100_000
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")  # a member name that is also a path part
_FENCE_MARKER = "FENCED"
_APISERVERS = ("apiserver-public", "apiserver-internal")
_LOAD_BALANCERS = ("lb-public", "lb-internal")
_REPO_ROOT = Path(__file__).resolve().parents[3]
_PROXY_ENTRY = "services.etcd_migration.drivers.proxy"



# ---------------------------------------------------------------- detached processes

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # started by this process: polled, so none stays a zombie


def _alive(pid: int, marker: str) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        # A recycled pid runs some other command line; a zombie (ours died unreaped elsewhere) is dead.
        return state not in ("Z", "X") and marker.encode() in cmdline
    try:  # no /proc (macOS): trust the pid
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _Detached:
    """A process in its own session (it outlives the service), found again through its pid file."""

    pid_file: Path
    marker: str  # a string in its command line, against pid reuse

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid, self.marker) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        if self.running():
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=log_path.parent,
                env=env, start_new_session=True,
            )  # fmt: skip
        _CHILDREN[proc.pid] = proc
        atomic_write_text(self.pid_file, str(proc.pid))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns once the process is gone."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                await _wait_until(lambda: not _alive(pid, self.marker), timeout_s, f"pid {pid} to exit")
            except DriverError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await _wait_until(lambda: not _alive(pid, self.marker), 10, f"pid {pid} to exit after SIGKILL")
        self.pid_file.unlink(missing_ok=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _wait_until(check: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        ok = check()
        if ok if isinstance(ok, bool) else await ok:
            return
        if time.monotonic() > deadline:
            raise DriverError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _wait_port_free(port: int, what: str) -> None:
    await _wait_until(lambda: _port_free(port), 10, f"port {port} to be free ({what})")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # the IANA range macOS uses


def pick_port(taken: set[int]) -> int:
    """Below the ephemeral range when there is room: a recorded port stays unused while its node is stopped
    (the rollback starts the old node on it again), and the kernel never hands it out for an outgoing
    connection there, while a port from bind(0) could be taken that way in the meantime."""
    low = _ephemeral_low()
    if low > 12_000:
        candidates = list(range(max(10_000, low - 20_000), low))
        random.shuffle(candidates)
        for port in candidates[:500]:
            if port not in taken and _port_free(port):
                return port
    while (port := free_port()) in taken:
        pass
    return port


def _safe(text: str) -> str:
    """An operation id as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:100]


# ---------------------------------------------------------------- metadata


class _Node(BaseModel):
    name: str
    client_port: int
    peer_port: int
    version: str  # the Kubernetes version the "VM" runs (metadata: the etcd binary is the same)
    token: str | None = None  # the cluster token its data directory was created with
    operation_id: str | None = None  # the migration that created it (None: the original node)
    from_disk: str | None = None
    running: bool = False  # desired state: what a restarted service or host brings back
    fenced: bool = False
    controller_manager: bool = True


class _Disk(BaseModel):
    node: str
    version: str


class _Cluster(BaseModel):
    cluster_id: str
    public_port: int
    internal_port: int
    nodes: dict[str, _Node] = Field(default_factory=dict)
    members: list[str] = Field(default_factory=list)  # the nodes forming the control plane now
    previous_members: list[str] = Field(default_factory=list)  # before the restore: what a rollback returns to
    mutations_stopped: bool = False
    load_balanced: bool = False
    lbs_open: bool = False  # both load balancers serve (public and internal)
    internal_open: bool = False  # the internal one serves (kubelets), the public one not yet
    lb_backends: list[str] = Field(default_factory=list)
    drained: list[str] = Field(default_factory=list)  # members taken out of the load balancers (replace_node)
    snapshots: dict[str, SnapshotInfo] = Field(default_factory=dict)  # by operation id
    disks: dict[str, _Disk] = Field(default_factory=dict)

    def node(self, name: str) -> _Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise DriverError(f"{self.cluster_id}: no node {name!r}", retryable=False) from None

    def ports(self) -> set[int]:
        return {self.public_port, self.internal_port} | {
            p for n in self.nodes.values() for p in (n.client_port, n.peer_port)
        }


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- the driver


class LocalDriver(FaultInjection):
    def __init__(self, state_dir: Path | str, redis: Redis | None = None, *, redis_prefix: str = "flotilla",
                 start_timeout_s: float = 30.0) -> None:  # fmt: skip
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout_s = start_timeout_s
        self._redis = redis
        self.fault_book = FaultBook(redis, redis_prefix, "local")
        self._locks: dict[str, asyncio.Lock] = {}
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------ layout and metadata

    def _dir(self, cluster_id: str) -> Path:
        if not _NAME.match(cluster_id):
            raise DriverError(f"cluster id {cluster_id!r} is not usable as a directory name", retryable=False)
        return self.state_dir / cluster_id

    def _node_dir(self, cluster_id: str, name: str) -> Path:
        return self._dir(cluster_id) / "nodes" / name

    def _etcd(self, cluster_id: str, name: str) -> _Detached:
        data_dir = self._node_dir(cluster_id, name) / "data"
        return _Detached(self._node_dir(cluster_id, name) / "etcd.pid", marker=f"--data-dir\0{data_dir}\0")

    def _proxy(self, cluster_id: str, role: str) -> tuple[_Detached, Path]:
        config = self._dir(cluster_id) / "proxies" / f"{role}.json"
        return _Detached(config.with_suffix(".pid"), marker=f"--config\0{config}"), config

    def _load(self, cluster_id: str) -> _Cluster | None:
        try:
            return _Cluster.model_validate_json((self._dir(cluster_id) / "cluster.json").read_text())
        except FileNotFoundError:
            return None

    def _require(self, ref: ControlPlaneRef) -> _Cluster:
        meta = self._load(ref.cluster_id)
        if meta is None:
            raise DriverError(f"{ref.cluster_id}: no local control plane", retryable=False)
        return meta

    def _save(self, meta: _Cluster) -> None:
        atomic_write_text(self._dir(meta.cluster_id) / "cluster.json", meta.model_dump_json(indent=1))

    def _fenced(self, meta: _Cluster, node: _Node) -> bool:
        return node.fenced or (self._node_dir(meta.cluster_id, node.name) / _FENCE_MARKER).exists()

    def _fence(self, meta: _Cluster, node: _Node) -> None:
        marker = self._node_dir(meta.cluster_id, node.name) / _FENCE_MARKER
        atomic_write_text(marker, f"fenced at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        node.fenced, node.running = True, False
        self._save(meta)

    def _allocate_port(self, taken: set[int]) -> int:
        """A port for good (like a static IP): free now, and not one any cluster here has recorded."""
        for meta in (self._load(d.name) for d in self.state_dir.iterdir() if (d / "cluster.json").exists()):
            if meta is not None:
                taken |= meta.ports()
        port = pick_port(taken)
        taken.add(port)
        return port

    @contextlib.asynccontextmanager
    async def _locked(self, cluster_id: str) -> AsyncIterator[None]:
        path = self._dir(cluster_id) / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        async with self._locks.setdefault(cluster_id, asyncio.Lock()):
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                while True:  # another service process on the same state dir: wait for its step
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.05)
                yield
            finally:
                os.close(fd)

    def _http(self, url: str) -> etcd.EtcdHttp:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # No keep-alive: through a proxy a pooled connection would stay pinned to one backend.
            self._client = httpx.AsyncClient(
                timeout=5.0, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
            )
            self._client_loop = loop
        return etcd.EtcdHttp(url, self._client)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------ processes

    async def _start_etcd(self, meta: _Cluster, node: _Node) -> None:
        if self._fenced(meta, node):
            raise DriverError(f"{meta.cluster_id}/{node.name} is fenced: it never starts again", retryable=False)
        proc = self._etcd(meta.cluster_id, node.name)
        if proc.running():
            return
        for port in (node.client_port, node.peer_port):
            await _wait_port_free(port, f"for {meta.cluster_id}/{node.name}")
        peers = {n.name: n.peer_port for n in meta.nodes.values() if n.operation_id == node.operation_id}
        if node.operation_id is None:
            peers = {node.name: node.peer_port}
        node_dir = self._node_dir(meta.cluster_id, node.name)
        argv = etcd.etcd_command(node.name, str(node_dir / "data"), node.client_port, node.peer_port, peers,
                                 node.token or f"flotilla-{meta.cluster_id}")  # fmt: skip
        proc.start(argv, node_dir / "etcd.log")

    async def _stop_etcd(self, meta: _Cluster, node: _Node) -> None:
        await self._etcd(meta.cluster_id, node.name).stop()
        for port in (node.client_port, node.peer_port):
            await _wait_port_free(port, f"{meta.cluster_id}/{node.name} stopped")

    async def _healthy(self, meta: _Cluster, name: str) -> bool:
        node = meta.nodes.get(name)
        if node is None or not self._etcd(meta.cluster_id, name).running():
            return False
        return await self._http(_url(node.client_port)).healthy()

    async def _first_healthy(self, meta: _Cluster, purpose: str) -> str:
        for name in meta.members:
            if await self._healthy(meta, name):
                return name
        raise DriverError(f"{meta.cluster_id}: no healthy member {purpose}")

    async def _wait_healthy(self, meta: _Cluster, names: list[str]) -> None:
        async def all_healthy() -> bool:
            for name in names:
                if not self._etcd(meta.cluster_id, name).running():
                    log = self._node_dir(meta.cluster_id, name) / "etcd.log"
                    raise DriverError(f"{meta.cluster_id}/{name}: etcd exited (see {log})")
            return all(await asyncio.gather(*(self._healthy(meta, n) for n in names)))

        await _wait_until(all_healthy, self.start_timeout_s, f"{meta.cluster_id}: {', '.join(names)} healthy")

    def _endpoint_port(self, meta: _Cluster, role: str) -> int:
        return meta.public_port if role.endswith("public") else meta.internal_port

    async def _set_proxy(self, meta: _Cluster, role: str, open_: bool, backends: list[str]) -> None:
        """Start the proxy or change it in place; returns once the change is in effect."""
        proc, config_path = self._proxy(meta.cluster_id, role)
        port = self._endpoint_port(meta, role)
        current = ProxyConfig.read(config_path)
        running = proc.running()
        if (running and current is not None and (current.open, current.backends) == (open_, backends)
                and applied_generation(config_path) == current.generation):  # fmt: skip
            return
        generation = (current.generation if current else 0) + 1
        atomic_write_text(config_path, ProxyConfig(open_, backends, generation).to_json())
        if running:
            proc.kill(signal.SIGHUP)
        else:
            await _wait_port_free(port, f"{meta.cluster_id}: for the {role}")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
            argv = [sys.executable, "-m", _PROXY_ENTRY, "--listen", f"127.0.0.1:{port}", "--config", str(config_path)]
            proc.start(argv, config_path.with_suffix(".log"), env=env)

        async def applied() -> bool:
            if not proc.running():
                raise DriverError(f"{meta.cluster_id}: the {role} proxy exited (see {config_path.with_suffix('.log')})")
            return (applied_generation(config_path) or 0) >= generation and _listening(port)

        await _wait_until(applied, 10, f"{meta.cluster_id}: the {role} proxy to apply its config")

    async def _stop_proxy(self, meta: _Cluster, role: str) -> None:
        proc, _ = self._proxy(meta.cluster_id, role)
        if proc.running():  # (when it is not, the address may well be someone else's by now: the rollback's)
            await proc.stop()
            await _wait_port_free(self._endpoint_port(meta, role), f"{meta.cluster_id}: the {role} stopped")

    async def _apiservers_up(self, meta: _Cluster) -> None:
        node = meta.node(meta.members[0])
        if not self._etcd(meta.cluster_id, node.name).running():
            raise DriverError(f"{meta.cluster_id}/{node.name} is not running: no API server without it")
        for role in _APISERVERS:
            await self._set_proxy(meta, role, True, [f"127.0.0.1:{node.client_port}"])

    async def _apply_load_balancers(self, meta: _Cluster) -> None:
        backends = [f"127.0.0.1:{meta.node(n).client_port}" for n in meta.lb_backends if n not in meta.drained]
        for role in _LOAD_BALANCERS:
            await self._set_proxy(meta, role, meta.lbs_open or (role == "lb-internal" and meta.internal_open), backends)

    # ------------------------------------------------ test hooks

    async def kill_member(self, ref: ControlPlaneRef, name: str) -> None:
        """SIGKILL one member's etcd, as a crash would (its desired state stays `running`)."""
        meta = self._require(ref)
        meta.node(name)
        proc = self._etcd(ref.cluster_id, name)
        pid = proc.pid()
        proc.kill()
        if pid is not None:
            await _wait_until(lambda: not _alive(pid, proc.marker), 10, f"{name} to die")

    async def destroy(self, cluster_id: str) -> None:
        """Stop every process of the cluster (files stay): test teardown, `make run` shutdown."""
        meta = self._load(cluster_id)
        if meta is None:
            return
        for role in _APISERVERS + _LOAD_BALANCERS:
            await self._proxy(cluster_id, role)[0].stop(timeout_s=2)
        # Briefly graceful: a member without quorum spends seconds on SIGTERM trying to hand over leadership.
        await asyncio.gather(*(self._etcd(cluster_id, n).stop(timeout_s=1) for n in meta.nodes))

    async def destroy_all(self) -> None:
        for d in sorted(self.state_dir.iterdir()):
            if (d / "cluster.json").exists():
                await self.destroy(d.name)
        await self.aclose()

    # ------------------------------------------------ the port

    @driver_step()
    async def ensure_control_plane(self, ref: ControlPlaneRef, version: str) -> ControlPlaneInfo:
        meta = self._load(ref.cluster_id)
        if meta is None:
            taken: set[int] = set()
            public, internal, client, peer = (self._allocate_port(taken) for _ in range(4))
            node = _Node(name=FIRST_NODE, client_port=client, peer_port=peer, version=version,
                         token=f"flotilla-{ref.cluster_id}", running=True)  # fmt: skip
            meta = _Cluster(cluster_id=ref.cluster_id, public_port=public, internal_port=internal,
                            nodes={node.name: node}, members=[node.name])  # fmt: skip
            self._node_dir(ref.cluster_id, node.name).mkdir(parents=True, exist_ok=True)
            self._save(meta)
        await self._reconcile(meta)
        return await self._describe(meta)

    async def _reconcile(self, meta: _Cluster) -> None:
        """Bring back what should run and does not (the host rebooted, or the cluster is new)."""
        wanted = [n for n in meta.nodes.values() if n.running and not self._fenced(meta, n)]
        for node in wanted:
            await self._start_etcd(meta, node)
        await self._wait_healthy(meta, [n.name for n in wanted])
        if meta.load_balanced:
            await self._apply_load_balancers(meta)
        elif not meta.mutations_stopped and meta.members and meta.node(meta.members[0]).running:
            await self._apiservers_up(meta)

    @driver_step(lock=False)
    async def describe(self, ref: ControlPlaneRef) -> ControlPlaneInfo:
        return await self._describe(self._require(ref))

    async def _describe(self, meta: _Cluster) -> ControlPlaneInfo:
        async def status(name: str) -> tuple[str, dict[str, Any] | None]:
            node = meta.node(name)
            if not self._etcd(meta.cluster_id, name).running():
                return name, None
            http = self._http(_url(node.client_port))
            try:
                st = await http.status(timeout_s=2.0)
            except DriverError:
                return name, None
            return name, st if await http.healthy() else None

        statuses = dict(await asyncio.gather(*(status(n) for n in meta.members)))
        healthy = [n for n in meta.members if statuses[n] is not None]
        try:
            hashes = await self._hashes(meta, healthy) if healthy else {}
        except DriverError:
            hashes = {}  # a member went away in between: reported unhealthy next time, not an error here
        members = []
        for name in meta.members:
            node, st = meta.node(name), statuses[name] or {"header": {"revision": 0}, "leader": None}
            members.append(MemberStatus(
                name=name, client_url=_url(node.client_port), healthy=statuses[name] is not None,
                version=node.version, revision=int(st["header"]["revision"]), hashkv=hashes.get(name, 0),
                is_leader=st["leader"] is not None and st["leader"] == st["header"].get("member_id"),
            ))  # fmt: skip
        return ControlPlaneInfo(
            public_endpoint=_url(meta.public_port), internal_endpoint=_url(meta.internal_port), members=members,
            mutations_stopped=meta.mutations_stopped, load_balanced=meta.load_balanced,
            load_balancers_open=meta.lbs_open if meta.load_balanced else True,
        )  # fmt: skip

    async def _hashes(self, meta: _Cluster, names: list[str]) -> dict[str, int]:
        """Every member's hashkv at one revision: members that applied the same history agree even while
        writes go on (each member hashes up to the lowest revision any of them has)."""
        urls = {n: _url(meta.node(n).client_port) for n in names}
        for _ in range(20):
            revisions = [int((await self._http(u).status(timeout_s=2.0))["header"]["revision"]) for u in urls.values()]
            try:
                out = await etcd.hashkv(list(urls.values()), min(revisions))
            except DriverError as exc:
                if "compacted" not in str(exc):
                    raise
                # Nothing written since the compaction: hash the current revision, if all are at the same one.
                out = await etcd.hashkv(list(urls.values()), 0)
                if len({rev for _, rev in out.values()}) > 1:
                    await asyncio.sleep(0.1)
                    continue
            return {n: out[u][0] for n, u in urls.items()}
        raise DriverError(f"{meta.cluster_id}: members never settled on one revision to compare hashkv")

    @driver_step()
    async def stop_mutations(self, ref: ControlPlaneRef) -> None:
        meta = self._require(ref)
        if meta.load_balanced:
            raise DriverError(f"{ref.cluster_id}: mutations are stopped only on a single node", retryable=False)
        meta.mutations_stopped = True
        self._save(meta)
        for role in _APISERVERS:
            await self._stop_proxy(meta, role)

    @driver_step()
    async def snapshot_save(self, ref: ControlPlaneRef) -> SnapshotInfo:
        meta = self._require(ref)
        path = self._dir(ref.cluster_id) / "snapshots" / f"{_safe(ref.operation_id)}.db"
        saved = meta.snapshots.get(ref.operation_id)
        # With mutations stopped nothing can have changed since: a redo hands back the file if it still verifies
        # (the node may be stopped by now). Otherwise (an upgrade's "fresh snapshot" before each node) a new one.
        if saved is not None and meta.mutations_stopped and path.exists():
            status = await etcd.snapshot_status(str(path))
            if (status["hash"], status["revision"]) == (saved.hash, saved.revision):
                return saved
        source = await self._first_healthy(meta, "to take a snapshot from")
        path.parent.mkdir(parents=True, exist_ok=True)
        # etcdctl writes <file>.part and renames it once complete, so a half-written file never looks saved.
        await etcd.etcdctl("snapshot", "save", str(path), endpoints=[_url(meta.node(source).client_port)])
        status = await etcd.snapshot_status(str(path))
        info = SnapshotInfo(location=str(path), hash=status["hash"], revision=status["revision"],
                            total_keys=status["totalKey"])  # fmt: skip
        meta.snapshots[ref.operation_id] = info
        self._save(meta)
        return info

    @driver_step()
    async def stop_node(self, ref: ControlPlaneRef, node: str) -> None:
        meta = self._require(ref)
        target = meta.node(node)
        target.running = False
        if meta.load_balanced and node not in meta.drained:
            meta.drained.append(node)
        self._save(meta)
        if meta.load_balanced:
            await self._apply_load_balancers(meta)
        elif meta.members == [node]:
            for role in _APISERVERS:  # its API server pods go down with the VM, and the addresses are free
                await self._stop_proxy(meta, role)
        await self._stop_etcd(meta, target)

    @driver_step()
    async def snapshot_disk(self, ref: ControlPlaneRef, node: str) -> DiskSnapshot:
        meta = self._require(ref)
        source = meta.node(node)
        disk_id = f"{_safe(ref.operation_id)}-{node}"
        target = self._dir(ref.cluster_id) / "disks" / disk_id
        if not target.exists():
            if self._etcd(ref.cluster_id, node).running():
                raise DriverError(f"{ref.cluster_id}/{node} is running: stop it before snapshotting its disk")
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            await asyncio.to_thread(shutil.copytree, self._node_dir(ref.cluster_id, node) / "data", partial / "data")
            os.replace(partial, target)
        if disk_id not in meta.disks:
            meta.disks[disk_id] = _Disk(node=node, version=source.version)
            self._save(meta)
        return DiskSnapshot(id=disk_id, node=node)

    @driver_step()
    async def create_nodes(self, ref: ControlPlaneRef, disk: DiskSnapshot, names: list[str]) -> None:
        meta = self._require(ref)
        if disk.id not in meta.disks:
            raise DriverError(f"{ref.cluster_id}: no disk snapshot {disk.id}", retryable=False)
        if len(set(names)) != len(names) or not all(_NAME.match(n) for n in names):
            raise DriverError(f"node names must be distinct and path-safe: {names}", retryable=False)
        taken = meta.ports()
        for name in names:
            existing = meta.nodes.get(name)
            if existing is not None:
                if existing.operation_id != ref.operation_id:
                    raise DriverError(f"{ref.cluster_id}: node {name} already exists", retryable=False)
                continue
            # The "VM from the disk snapshot": what counts from that disk is the software (its version); etcd's
            # data comes from the etcd snapshot at restore, so the data directory is not copied again.
            meta.nodes[name] = _Node(
                name=name, client_port=self._allocate_port(taken), peer_port=self._allocate_port(taken),
                version=meta.disks[disk.id].version, operation_id=ref.operation_id, from_disk=disk.id,
                controller_manager=False,
            )  # fmt: skip
            self._node_dir(ref.cluster_id, name).mkdir(parents=True, exist_ok=True)
        self._save(meta)

    def _resolve_backend(self, meta: _Cluster, backend: str) -> str:
        """A backend by node name, or by its client URL / host:port."""
        if backend in meta.nodes:
            return backend
        for node in meta.nodes.values():
            if backend.removeprefix("http://") == f"127.0.0.1:{node.client_port}":
                return node.name
        raise DriverError(f"{meta.cluster_id}: unknown load-balancer backend {backend!r}", retryable=False)

    @driver_step()
    async def create_load_balancers(self, ref: ControlPlaneRef, backends: list[str]) -> None:
        meta = self._require(ref)
        # The addresses belong to the old VM until it stops (a cloud refuses to move an attached static IP).
        holders = [n.name for n in meta.nodes.values()
                   if n.operation_id != ref.operation_id and self._etcd(ref.cluster_id, n.name).running()]  # fmt: skip
        if holders or any(self._proxy(ref.cluster_id, role)[0].running() for role in _APISERVERS):
            raise DriverError(f"{ref.cluster_id}: {holders or 'the API servers'} still hold the addresses: stop "
                              "the node first", retryable=False)  # fmt: skip
        if not meta.load_balanced:
            meta.load_balanced, meta.lbs_open = True, False
        meta.lb_backends = [self._resolve_backend(meta, b) for b in backends]
        self._save(meta)
        await self._apply_load_balancers(meta)

    @driver_step()
    async def restore_members(self, ref: ControlPlaneRef, snapshot: SnapshotInfo, names: list[str],
                              cluster_token: str, revision_bump: int) -> None:  # fmt: skip
        if not 1 <= revision_bump <= MAX_REVISION_BUMP:
            raise DriverError(f"revision_bump must be within 1..{MAX_REVISION_BUMP} on etcd 3.4", retryable=False)
        meta = self._require(ref)
        nodes = [meta.node(n) for n in names]
        if any(n.operation_id != ref.operation_id for n in nodes):
            raise DriverError(f"{ref.cluster_id}: {names} are not all nodes of {ref.operation_id}", retryable=False)
        peers = etcd.initial_cluster({n.name: n.peer_port for n in nodes})
        for node in nodes:
            if node.token is not None and node.token != cluster_token:
                raise DriverError(f"{ref.cluster_id}/{node.name} was restored with another cluster token",
                                  retryable=False)  # fmt: skip
            data = self._node_dir(ref.cluster_id, node.name) / "data"
            if not data.exists():
                # Restored beside, then renamed: a restore cut short leaves no half data directory behind.
                partial = data.with_name("data.restoring")
                shutil.rmtree(partial, ignore_errors=True)
                await etcd.etcdctl(
                    "snapshot", "restore", snapshot.location, "--name", node.name, "--initial-cluster", peers,
                    "--initial-cluster-token", cluster_token,
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{node.peer_port}", "--data-dir", str(partial),
                )  # fmt: skip
                os.replace(partial, data)
            node.token, node.running = cluster_token, True
        if meta.members != names:
            meta.previous_members, meta.members = meta.members, list(names)
        self._save(meta)
        for node in nodes:
            await self._start_etcd(meta, node)
        await self._wait_healthy(meta, names)
        found = await self._http(_url(nodes[0].client_port)).member_names()
        if found != sorted(names):
            raise DriverError(f"{ref.cluster_id}: membership is {found}, expected {sorted(names)}", retryable=False)
        await self._bump_revision(meta, nodes[0], snapshot.revision + revision_bump)
        await _wait_until(lambda: self._converged(meta, names), 15, f"{ref.cluster_id}: members to agree on hashkv")

    async def _bump_revision(self, meta: _Cluster, node: _Node, target: int) -> None:
        """Raise the revision to at least `target` and compact there, so watches from before the restore get
        "compacted" and informers re-list. etcd 3.5's `etcdutl snapshot restore --bump-revision --mark-compacted`
        does this offline; 3.4 has neither, so: writes to a throwaway key (one revision each), its delete, then
        a compaction at the final revision. Safe to redo: it only writes what is still missing."""
        http = self._http(_url(node.client_port))
        key = etcd.INTERNAL_PREFIX + b"revision-bump"
        revision = int((await http.status())["header"]["revision"])
        if revision < target:
            missing = max(target - 1 - revision, 1)  # the delete below is the last write
            gate = asyncio.Semaphore(16)

            async def put(i: int) -> None:
                async with gate:
                    await http.put(key, str(i).encode())

            await asyncio.gather(*(put(i) for i in range(missing)))
        await http.delete(key)
        final = int((await http.status())["header"]["revision"])
        await http.compact(final)

    async def _converged(self, meta: _Cluster, names: list[str]) -> bool:
        try:
            return len(set((await self._hashes(meta, names)).values())) == 1
        except DriverError:
            return False

    @driver_step(lock=False)
    async def kubelets_heartbeating(self, ref: ControlPlaneRef, since_revision: int) -> bool:
        meta = self._require(ref)
        # Read from a member: the load balancers may still be closed.
        source = await self._first_healthy(meta, "to read the node leases from")
        leases = await self._http(_url(meta.node(source).client_port)).scan(etcd.LEASE_PREFIX)
        return all(kv.mod_revision > since_revision for kv in leases)  # no kubelets (no leases): nothing to wait for

    @driver_step()
    async def start_controller_manager(self, ref: ControlPlaneRef) -> None:
        # Local control planes run no controller-manager process: the flag is what describe and tests see.
        meta = self._require(ref)
        for name in meta.members:
            meta.node(name).controller_manager = True
        self._save(meta)

    async def _fence_old_nodes_for(self, meta: _Cluster, what: str) -> None:
        """Before any load balancer sends traffic to the new members: they must be healthy, and the old node
        must never come back as a second writable cluster."""
        if not meta.load_balanced:
            raise DriverError(f"{meta.cluster_id}: there are no load balancers to open", retryable=False)
        for name in meta.members:
            if not await self._healthy(meta, name):
                raise DriverError(f"{meta.cluster_id}/{name} is not healthy: not opening {what}")
        for node in list(meta.nodes.values()):
            if node.name not in meta.members and not self._fenced(meta, node):
                await self._stop_etcd(meta, node)
                self._fence(meta, node)

    @driver_step()
    async def open_internal_load_balancer(self, ref: ControlPlaneRef) -> None:
        meta = self._require(ref)
        if meta.internal_open or meta.lbs_open:
            return
        await self._fence_old_nodes_for(meta, "the internal load balancer")
        meta.internal_open = True
        self._save(meta)
        await self._apply_load_balancers(meta)

    @driver_step()
    async def open_load_balancers(self, ref: ControlPlaneRef) -> None:
        meta = self._require(ref)
        await self._fence_old_nodes_for(meta, "the load balancers")
        meta.lbs_open, meta.mutations_stopped = True, False
        self._save(meta)
        await self._apply_load_balancers(meta)

    @driver_step()
    async def remove_new_nodes(self, ref: ControlPlaneRef) -> None:
        meta = self._require(ref)
        if meta.lbs_open or meta.internal_open:
            raise DriverError(f"{ref.cluster_id}: the new members serve already: no rollback", retryable=False)
        ours = [n for n in meta.nodes.values() if n.operation_id == ref.operation_id]
        for node in ours:
            self._fence(meta, node)  # before the old node can restart, none of these may ever serve
        names = {n.name for n in ours}
        if names & set(meta.members):
            original = [n.name for n in meta.nodes.values() if n.operation_id is None]
            meta.members, meta.previous_members = meta.previous_members or original, []
        meta.lb_backends = [n for n in meta.lb_backends if n not in names]
        meta.drained = [n for n in meta.drained if n not in names]
        self._save(meta)
        for node in ours:
            await self._stop_etcd(meta, node)
        for node in ours:
            shutil.rmtree(self._node_dir(ref.cluster_id, node.name), ignore_errors=True)
            del meta.nodes[node.name]
        self._save(meta)
        if meta.load_balanced:
            await self._apply_load_balancers(meta)

    @driver_step()
    async def remove_load_balancers(self, ref: ControlPlaneRef) -> None:
        meta = self._require(ref)
        if meta.lbs_open or meta.internal_open:
            raise DriverError(f"{ref.cluster_id}: the load balancers serve the new members: no rollback",
                              retryable=False)  # fmt: skip
        for role in _LOAD_BALANCERS:
            await self._stop_proxy(meta, role)
        meta.load_balanced, meta.lb_backends, meta.drained, meta.internal_open = False, [], [], False
        self._save(meta)

    @driver_step()
    async def start_node(self, ref: ControlPlaneRef, node: str) -> None:
        meta = self._require(ref)
        target = meta.node(node)
        if self._fenced(meta, target):
            raise DriverError(f"{ref.cluster_id}/{node} is fenced: it is never started again", retryable=False)
        if node not in meta.members:
            raise DriverError(f"{ref.cluster_id}/{node} is not a member of the control plane", retryable=False)
        others = [n for n in meta.nodes if n not in meta.members and self._etcd(ref.cluster_id, n).running()]
        # Order errors (the rollback runs remove_new_nodes and remove_load_balancers first): not retryable.
        if others:  # never two writable control planes
            raise DriverError(f"{ref.cluster_id}: {others} still run: not starting {node} beside them",
                              retryable=False)  # fmt: skip
        if not meta.load_balanced and any(self._proxy(ref.cluster_id, r)[0].running() for r in _LOAD_BALANCERS):
            raise DriverError(f"{ref.cluster_id}: the load balancers still hold {node}'s addresses", retryable=False)
        target.running = True
        meta.drained = [n for n in meta.drained if n != node]
        self._save(meta)
        await self._start_etcd(meta, target)
        await self._wait_healthy(meta, [node])
        if meta.load_balanced:
            await self._apply_load_balancers(meta)
        elif not meta.mutations_stopped:
            await self._apiservers_up(meta)  # the VM boots with its API server (unless mutations were stopped)

    @driver_step()
    async def resume_mutations(self, ref: ControlPlaneRef) -> None:
        meta = self._require(ref)
        if meta.load_balanced:
            raise DriverError(f"{ref.cluster_id}: load balancers hold the addresses: remove them first",
                              retryable=False)  # fmt: skip
        meta.mutations_stopped = False
        self._save(meta)
        await self._apiservers_up(meta)

    @driver_step()
    async def replace_node(self, ref: ControlPlaneRef, node: str, version: str) -> None:
        meta = self._require(ref)
        target = meta.node(node)
        if node not in meta.members:
            raise DriverError(f"{ref.cluster_id}/{node} is not a member of the control plane", retryable=False)
        if target.version == version and node not in meta.drained and await self._healthy(meta, node):
            return  # done already (a redo)
        others = [n for n in meta.members if n != node]
        if others:
            quorum = len(meta.members) // 2 + 1

            async def quorum_without_node() -> bool:
                return sum(await asyncio.gather(*(self._healthy(meta, n) for n in others))) >= quorum

            try:  # a few seconds' grace: an election after a member's crash makes the others unhealthy briefly
                await _wait_until(quorum_without_node, 3, "quorum among the other members")
            except DriverError:
                raise DriverError(f"{ref.cluster_id}: fewer than {quorum} of the other members {others} are "
                                  f"healthy: replacing {node} would lose quorum") from None  # fmt: skip
        if meta.load_balanced and node not in meta.drained:
            meta.drained.append(node)  # out of the load balancers first, as a cloud LB deregisters a target
            self._save(meta)
            await self._apply_load_balancers(meta)
        target.version, target.running = version, True
        self._save(meta)
        # The same data disk and identity on a "new VM": same data directory, name and ports.
        await self._stop_etcd(meta, target)
        await self._start_etcd(meta, target)
        await self._wait_healthy(meta, [node])
        meta.drained = [n for n in meta.drained if n != node]
        self._save(meta)
        if meta.load_balanced:
            await self._apply_load_balancers(meta)

    @driver_step(lock=False)
    async def validate(self, ref: ControlPlaneRef) -> ValidationReport:
        meta = self._require(ref)
        info = await self._describe(meta)
        problems = [f"{m.name} is not healthy" for m in info.members if not m.healthy]
        hashes = {m.name: m.hashkv for m in info.members if m.healthy}
        if len(set(hashes.values())) > 1:
            problems.append(f"members disagree on hashkv: {hashes}")
        if hashes:
            source = _url(meta.node(next(iter(hashes))).client_port)
            try:
                found = await self._http(source).member_names()
                if found != sorted(meta.members):
                    problems.append(f"membership is {found}, expected {sorted(meta.members)}")
            except DriverError as exc:
                problems.append(f"member list: {exc}")
        # A write through the public endpoint, read back through the internal one: both reach one cluster.
        key = etcd.INTERNAL_PREFIX + f"validate/{_safe(ref.operation_id)}".encode()
        token = os.urandom(8).hex().encode()
        try:
            await self._http(info.public_endpoint).put(key, token, timeout_s=5.0)
            got = await self._http(info.internal_endpoint).get(key, timeout_s=5.0)
            if got != token:
                problems.append(f"read back {got!r} through the internal endpoint, wrote {token!r}")
            await self._http(info.public_endpoint).delete(key, timeout_s=5.0)
        except DriverError as exc:
            problems.append(f"write and read through the endpoints: {exc}")
        return ValidationReport(problems=problems)

    async def down_members(self, ref: ControlPlaneRef) -> int:
        """Members whose process is gone or whose client port does not answer (cheap: the prober asks often)."""
        meta = self._load(ref.cluster_id)
        if meta is None:
            return 0
        return sum(
            1 for n in meta.members
            if not (self._etcd(ref.cluster_id, n).running() and _listening(meta.node(n).client_port))
        )  # fmt: skip


    def probe_target(self, ref: ControlPlaneRef, endpoint: str, timeout_s: float) -> ProbeTarget:
        return etcd.GatewayProbeTarget(endpoint, timeout_s)


def _implements_the_port(driver: LocalDriver) -> ControlPlaneDriver:
    return driver  # mypy checks LocalDriver against the ControlPlaneDriver protocol here
