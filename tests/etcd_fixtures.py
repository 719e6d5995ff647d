"""Real etcd for the control-plane suites: a LocalDriver on a temporary state directory, keyspace helpers,
and the migration's steps called one by one through the driver (what the service's journal does, minus
the journal), so suites can stop between any two steps.

Import the fixture where it is used (`from tests.etcd_fixtures import local_driver_fixture  # noqa: F401`),
or in tests/conftest.py. `python -m tests.etcd_fixtures STATE_DIR CLUSTER OPERATION` runs a migration
up to the restore in its own process and stalls there: a suite SIGKILLs it to stand for a killed service.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.etcd_migration.drivers.base import ControlPlaneRef, DriverError, SnapshotInfo
from services.etcd_migration.drivers.etcd import LEASE_PREFIX, EtcdHttp
from services.etcd_migration.drivers.faults import Fault
from services.etcd_migration.drivers.local import FIRST_NODE, LocalDriver

VERSION = "1.29"
REVISION_BUMP = 1000


@pytest.fixture(name="local_driver")
async def local_driver_fixture(tmp_path: Path) -> AsyncIterator[LocalDriver]:
    """A LocalDriver on a fresh state directory; every process it started is stopped afterwards."""
    driver = LocalDriver(tmp_path / "controlplanes")
    yield driver
    await driver.destroy_all()


def ref(cluster_id: str = "c1", operation_id: str = "op1") -> ControlPlaneRef:
    return ControlPlaneRef(cluster_id=cluster_id, operation_id=operation_id)


def new_names(r: ControlPlaneRef) -> list[str]:
    return [f"{r.operation_id}-m{i}" for i in (1, 2, 3)]


def token(r: ControlPlaneRef) -> str:
    return f"{r.cluster_id}-{r.operation_id}"


@contextlib.asynccontextmanager
async def etcd_http(url: str, timeout_s: float = 5.0) -> AsyncIterator[EtcdHttp]:
    """A client of one endpoint; a new connection per request, as through a load balancer."""
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False,
                                 limits=httpx.Limits(max_keepalive_connections=0)) as client:  # fmt: skip
        yield EtcdHttp(url, client)


def sample_keys(n: int, leases: int = 3, seed: int = 6) -> list[tuple[bytes, bytes]]:
    """`n` keys like a cluster's: most under /registry/ (a few node leases among them), the rest elsewhere;
    values are arbitrary bytes (not UTF-8), so the base64 round trip is exercised."""
    rng = random.Random(seed)
    items = [(LEASE_PREFIX + f"node-{i}".encode(), rng.randbytes(40)) for i in range(leases)]
    for i in range(n - leases):
        key = f"/registry/pods/ns-{i % 17}/pod-{i}" if i % 4 else f"/app/config/{i}"
        items.append((key.encode(), rng.randbytes(rng.randint(1, 120))))
    return items


async def load(url: str, items: list[tuple[bytes, bytes]]) -> None:
    async with etcd_http(url) as http:
        await http.put_many(items)


async def dump(url: str) -> dict[bytes, bytes]:
    async with etcd_http(url) as http:
        return await http.dump()


async def try_put(url: str, key: bytes = b"/app/probe", value: bytes = b"v", timeout_s: float = 2.0) -> bool:
    async with etcd_http(url, timeout_s) as http:
        try:
            await http.put(key, value)
            return await http.get(key) == value
        except DriverError:
            return False


async def heartbeat(driver: LocalDriver, r: ControlPlaneRef) -> None:
    """Stand in for the kubelets: renew every node lease through the internal endpoint, as kubelets do."""
    info = await driver.describe(r)
    async with etcd_http(info.internal_endpoint) as http:
        for kv in await http.scan(LEASE_PREFIX):
            await http.put(kv.key, kv.value)


# ---------------------------------------------------------------- the migration, step by step
async def phase1(driver: LocalDriver, r: ControlPlaneRef, until: str | None = None) -> SnapshotInfo:
    await driver.stop_mutations(r)
    snapshot = await driver.snapshot_save(r)
    if until == "snapshot_save":
        return snapshot
    await driver.stop_node(r, FIRST_NODE)
    if until == "stop_node":
        return snapshot
    await driver.snapshot_disk(r, FIRST_NODE)
    return snapshot


async def phase2(driver: LocalDriver, r: ControlPlaneRef, snapshot: SnapshotInfo, until: str | None = None) -> None:
    names = new_names(r)
    disk = await driver.snapshot_disk(r, FIRST_NODE)  # a redo: hands back the disk phase 1 took
    await driver.create_nodes(r, disk, names)
    if until == "create_nodes":
        return
    await driver.create_load_balancers(r, names)
    if until == "create_load_balancers":
        return
    await driver.restore_members(r, snapshot, names, token(r), REVISION_BUMP)


async def phase3(driver: LocalDriver, r: ControlPlaneRef) -> None:
    since = max(m.revision for m in (await driver.describe(r)).members)
    await driver.open_internal_load_balancer(r)
    if not await driver.kubelets_heartbeating(r, since):
        await heartbeat(driver, r)
    assert await driver.kubelets_heartbeating(r, since)
    await driver.start_controller_manager(r)
    await driver.open_load_balancers(r)


async def migrate(driver: LocalDriver, r: ControlPlaneRef) -> None:
    await phase2(driver, r, await phase1(driver, r))
    await phase3(driver, r)


async def rollback(driver: LocalDriver, r: ControlPlaneRef) -> None:
    await driver.remove_new_nodes(r)
    await driver.remove_load_balancers(r)
    await driver.start_node(r, FIRST_NODE)
    await driver.resume_mutations(r)


async def ha_cluster(driver: LocalDriver, r: ControlPlaneRef, keys: int = 200) -> str:
    """A migrated three-member cluster holding `keys` keys; returns its public endpoint."""
    info = await driver.ensure_control_plane(r, VERSION)
    await load(info.public_endpoint, sample_keys(keys))
    await migrate(driver, r)
    return info.public_endpoint


async def _stall_before_restore(state_dir: str, cluster_id: str, operation_id: str) -> None:
    driver = LocalDriver(state_dir)
    r = ref(cluster_id, operation_id)
    await driver.inject(Fault("restore_members", delay_s=3600, fail=False))
    snapshot = await phase1(driver, r)
    await phase2(driver, r, snapshot, until="create_load_balancers")
    print("STALLED", flush=True)
    # Stalls inside the step (after its fault check, before any work) until the test kills this process.
    await driver.restore_members(r, snapshot, new_names(r), token(r), REVISION_BUMP)


if __name__ == "__main__":
    asyncio.run(_stall_before_restore(*sys.argv[1:4]))
