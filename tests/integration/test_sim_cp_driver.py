"""The `sim` ControlPlaneDriver on a real redis-server, driven by etcd_migration's own handler.

`run_operation` (tests/migrator_loop.py) feeds each event the Migrator emits back into it, as
the stream would, and retries a retryable driver error as the runtime does; what it cannot do
here (the bus, the ledger) the end-to-end tests cover. The prober runs through the driver's probe
target, so the availability figures come from the simulated API as clients would see it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from services.etcd_migration import core, steps
from services.etcd_migration.app import Migrator
from services.etcd_migration.drivers.base import ControlPlaneRef, DriverError
from services.etcd_migration.drivers.faults import Fault
from services.etcd_migration.drivers.sim import FIRST_NODE, SimControlPlaneDriver
from services.etcd_migration.probes import ProbeHub
from shared.events import Envelope, decode_payload
from shared.events.models import (
    ControlPlaneMigrationCompleted,
    ControlPlaneMigrationFailed,
    ControlPlaneMigrationRolledBack,
    ControlPlaneUpgradeCompleted,
    ControlPlaneUpgradeFailed,
)
from tests.migrator_loop import request, run_operation

ROLLBACK_CASES = [("precheck", "ensure_control_plane"), ("stop-mutations", "stop_mutations"),
                  ("snapshot-save", "snapshot_save"), ("stop-node", "stop_node"), ("snapshot-disk", "snapshot_disk"),
                  ("create-nodes", "create_nodes"), ("create-load-balancers", "create_load_balancers"),
                  ("restore-members", "restore_members"), ("verify-members", "describe")]  # fmt: skip


@pytest.fixture
async def rds(redis_proc: Any) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{redis_proc.port}/0", decode_responses=True)
    yield client
    await client.aclose()


def types(events: list[Envelope]) -> list[str]:
    return [e.type for e in events]


def migrator_for(driver: SimControlPlaneDriver, rds: Redis, interval_s: float = 0.01) -> Migrator:
    return Migrator(driver, ProbeHub(rds, "t", driver, interval_s=interval_s))


async def test_a_migration_keeps_the_keyspace_and_the_endpoint_and_fences_the_old_node(rds: Redis) -> None:
    driver = SimControlPlaneDriver(rds, "t", latency_s=0.05, jitter=0.2, seed=1)
    ref = ControlPlaneRef("core-1", "op1")
    before = await driver.ensure_control_plane(ref, "1.29")
    old = (await driver.load("core-1")).node(FIRST_NODE).data  # type: ignore[union-attr]

    events = await run_operation(migrator_for(driver, rds), request("core-1", "op1"))

    done = decode_payload(events[-1])
    assert isinstance(done, ControlPlaneMigrationCompleted)
    assert done.endpoint == before.public_endpoint
    cp = await driver.load("core-1")
    assert cp is not None and cp.members == steps.new_member_names(ref)
    datas = [cp.node(n).data for n in cp.members]
    # The same keys and values on every member as on the old node, one hashkv, the revision above the old.
    assert all(d.keys == old.keys and d.content == old.content for d in datas)
    assert len({d.hashkv for d in datas}) == 1
    assert min(d.revision for d in datas) > old.revision + steps.REVISION_BUMP - 1
    assert cp.node(FIRST_NODE).fenced and cp.load_balancers and cp.load_balancers.open
    assert all(cp.node(n).controller_manager for n in cp.members)
    # The step timeline in order, each once.
    step_names = [decode_payload(e).step for e in events if e.type == "ControlPlaneMigrationStepCompleted"]  # type: ignore[attr-defined]
    assert step_names == [s for _, s in core.MIGRATION_STEPS]
    # What the prober saw: an outage while the API servers were off, nothing served without quorum.
    assert done.availability is not None and done.availability.requests > 0
    assert 0 < done.availability.availability_pct < 100 and done.availability.downtime_s > 0
    assert done.availability.succeeded_without_quorum == 0
    # A fenced node is never started again; a second member crash leaves the API serving through the others.
    with pytest.raises(DriverError, match="fenced"):
        await driver.start_node(ref, FIRST_NODE)
    await driver.kill_member(ref, cp.members[0])
    assert await driver.write("core-1", b"/registry/x", b"1") > 0


@pytest.mark.parametrize("step,method", ROLLBACK_CASES)
async def test_a_failure_before_phase_three_rolls_back_to_the_untouched_single_node(
    rds: Redis, step: str, method: str
) -> None:
    driver = SimControlPlaneDriver(rds, "t")
    ref = ControlPlaneRef("core-2", "op-fail")
    await driver.ensure_control_plane(ref, "1.29")
    old = (await driver.load("core-2")).node(FIRST_NODE).data  # type: ignore[union-attr]
    # `describe` is also read by the prober: fail only the step's call, which comes after the precheck's.
    await driver.inject(Fault(method, cluster_id="core-2", retryable=False))

    events = await run_operation(migrator_for(driver, rds), request("core-2", "op-fail"))

    rolled = decode_payload(events[-1])
    assert isinstance(rolled, ControlPlaneMigrationRolledBack), types(events)
    cp = await driver.load("core-2")
    assert cp is not None and cp.members == [FIRST_NODE] and cp.serving()
    assert cp.load_balancers is None and set(cp.nodes) == {FIRST_NODE}
    # The same keys and values (the prober's own writes, before the stop, only raised the revision).
    assert cp.node(FIRST_NODE).data.content == old.content and cp.node(FIRST_NODE).data.revision >= old.revision
    # A rerun after the fault is gone succeeds.
    again = await run_operation(migrator_for(driver, rds), request("core-2", "op-rerun"))
    assert isinstance(decode_payload(again[-1]), ControlPlaneMigrationCompleted), types(again)


async def test_a_redone_step_waits_for_the_same_operation_and_creates_nothing_twice(rds: Redis) -> None:
    first = SimControlPlaneDriver(rds, "t", latency_s=0.2)
    ref = ControlPlaneRef("core-3", "op3")
    await first.ensure_control_plane(ref, "1.29")
    await first.stop_mutations(ref)
    snap = await first.snapshot_save(ref)
    await first.stop_node(ref, FIRST_NODE)
    disk = await first.snapshot_disk(ref, FIRST_NODE)
    names = steps.new_member_names(ref)
    # A service dies inside create_nodes; its replacement (and a racing replica) redo it.
    dying = asyncio.create_task(first.create_nodes(ref, disk, names))
    await asyncio.sleep(0.1)
    dying.cancel()
    second, third = SimControlPlaneDriver(rds, "t", latency_s=0.2), SimControlPlaneDriver(rds, "t", latency_s=0.2)
    await asyncio.gather(second.create_nodes(ref, disk, names), third.create_nodes(ref, disk, names))
    cp = await second.load("core-3")
    assert cp is not None and sorted(n for n in cp.nodes if n != FIRST_NODE) == sorted(names)
    assert len([k for k in cp.operations if k.endswith(":create_nodes:")]) == 1  # one operation, not three
    # Ensures all the way: the rest of the migration twice over leaves one control plane of three.
    for driver in (second, third):
        await driver.create_load_balancers(ref, names)
        await driver.restore_members(ref, snap, names, cluster_token="op3", revision_bump=10)
    info = await second.describe(ref)
    assert [m.name for m in info.members] == names and all(m.healthy for m in info.members)
    assert len({m.hashkv for m in info.members}) == 1 and info.members[0].revision == snap.revision + 10


async def test_throttling_is_retried_and_the_migration_completes(rds: Redis) -> None:
    driver = SimControlPlaneDriver(rds, "t", throttle_rate=0.3, seed=7)
    events = await run_operation(migrator_for(driver, rds), request("core-4", "op4"))
    assert isinstance(decode_payload(events[-1]), ControlPlaneMigrationCompleted), types(events)


async def test_the_old_node_cannot_restart_while_new_members_exist_and_serving_members_are_not_removed(
    rds: Redis,
) -> None:
    driver = SimControlPlaneDriver(rds, "t")
    ref = ControlPlaneRef("core-5", "op5")
    await driver.ensure_control_plane(ref, "1.29")
    await driver.stop_mutations(ref)
    await driver.snapshot_save(ref)
    await driver.stop_node(ref, FIRST_NODE)
    disk = await driver.snapshot_disk(ref, FIRST_NODE)
    await driver.create_nodes(ref, disk, steps.new_member_names(ref))
    with pytest.raises(DriverError, match="remove the new members"):
        await driver.start_node(ref, FIRST_NODE)  # never two writable control planes
    running = ControlPlaneRef("core-6", "op6")
    await driver.ensure_control_plane(running, "1.29")
    with pytest.raises(DriverError, match="still holds the addresses"):
        await driver.create_load_balancers(running, steps.new_member_names(running))


async def upgrade_ready(driver: SimControlPlaneDriver, rds: Redis, cluster_id: str) -> None:
    events = await run_operation(migrator_for(driver, rds), request(cluster_id, f"{cluster_id}-ha"))
    assert isinstance(decode_payload(events[-1]), ControlPlaneMigrationCompleted)


async def test_an_upgrade_replaces_one_member_at_a_time_and_keeps_quorum(rds: Redis) -> None:
    driver = SimControlPlaneDriver(rds, "t", latency_s=0.05)
    await upgrade_ready(driver, rds, "core-7")

    events = await run_operation(migrator_for(driver, rds), request("core-7", "up1", kind="upgrade"))

    done = decode_payload(events[-1])
    assert isinstance(done, ControlPlaneUpgradeCompleted), types(events)
    cp = await driver.load("core-7")
    assert cp is not None and {cp.node(n).version for n in cp.members} == {"1.30"} and cp.quorum()
    assert done.availability is not None and done.availability.requests > 0
    assert done.availability.availability_pct == 100.0 and done.availability.requests_without_quorum == 0
    replaced = [decode_payload(e).node for e in events if getattr(decode_payload(e), "step", "") == "replace"]  # type: ignore[attr-defined]
    assert len(replaced) == 3 and len(set(replaced)) == 3


async def test_a_failed_validation_rolls_the_member_back_and_halts_the_upgrade(rds: Redis) -> None:
    driver = SimControlPlaneDriver(rds, "t")
    await upgrade_ready(driver, rds, "core-8")
    await driver.inject(Fault("validate", cluster_id="core-8", retryable=False))

    events = await run_operation(migrator_for(driver, rds), request("core-8", "up2", kind="upgrade"))

    failed = decode_payload(events[-1])
    assert isinstance(failed, ControlPlaneUpgradeFailed) and failed.rolled_back, types(events)
    cp = await driver.load("core-8")
    assert cp is not None and {cp.node(n).version for n in cp.members} == {"1.29"} and cp.serving()


async def test_a_replacement_that_would_lose_quorum_is_refused(rds: Redis) -> None:
    driver = SimControlPlaneDriver(rds, "t")
    await upgrade_ready(driver, rds, "core-9")
    cp = await driver.load("core-9")
    assert cp is not None
    ref = ControlPlaneRef("core-9", "up3")
    await driver.kill_member(ref, cp.members[0])
    with pytest.raises(DriverError, match="lose quorum"):
        await driver.replace_node(ref, cp.members[1], "1.30")


@pytest.mark.parametrize("method", ["open_internal_load_balancer", "start_controller_manager", "open_load_balancers"])
async def test_a_phase_three_failure_stops_fenced_and_asking_again_resumes_it(rds: Redis, method: str) -> None:
    driver = SimControlPlaneDriver(rds, "t")
    await driver.inject(Fault(method, cluster_id="core-10", retryable=False))
    journals: dict[str, core.CPState] = {}  # what the service keeps per cluster

    events = await run_operation(migrator_for(driver, rds), request("core-10", "first"), states=journals)

    failed = decode_payload(events[-1])
    assert isinstance(failed, ControlPlaneMigrationFailed) and not failed.rolling_back, types(events)
    cp = await driver.load("core-10")
    assert cp is not None and not cp.serving(), "clients wait for the operator: the public endpoint is closed"
    assert cp.members == steps.new_member_names(ControlPlaneRef("core-10", "first"))
    if method != "open_internal_load_balancer":
        assert cp.node(FIRST_NODE).fenced  # fenced when kubelets were let in: no way back to the old node

    again = await run_operation(migrator_for(driver, rds), request("core-10", "second"), states=journals)

    done = decode_payload(again[-1])
    assert isinstance(done, ControlPlaneMigrationCompleted) and done.operation_id == "second", types(again)
    resumed = [decode_payload(e).step for e in again if e.type == "ControlPlaneMigrationStepCompleted"]  # type: ignore[attr-defined]
    assert resumed[0] == failed.step and "precheck" not in resumed  # from the failed step on, nothing redone
    cp = await driver.load("core-10")
    assert cp is not None and cp.serving() and cp.node(FIRST_NODE).fenced
    assert cp.members == steps.new_member_names(ControlPlaneRef("core-10", "first")), "the same three members"
    assert len(cp.nodes) == 4


async def test_a_migration_of_an_ha_cluster_completes_at_once_and_creates_nothing(rds: Redis) -> None:
    driver = SimControlPlaneDriver(rds, "t")
    await upgrade_ready(driver, rds, "core-11")
    before = await driver.load("core-11")

    events = await run_operation(migrator_for(driver, rds), request("core-11", "again"))

    done = decode_payload(events[-1])
    assert isinstance(done, ControlPlaneMigrationCompleted) and done.members and done.endpoint, types(events)
    assert types(events) == ["ControlPlaneMigrationStepCompleted", "ControlPlaneMigrationCompleted"]
    after = await driver.load("core-11")
    assert before is not None and after is not None and set(after.nodes) == set(before.nodes)


async def test_an_upgrade_halted_part_way_converges_when_asked_again(rds: Redis) -> None:
    driver = SimControlPlaneDriver(rds, "t")
    await upgrade_ready(driver, rds, "core-12")
    cp = await driver.load("core-12")
    assert cp is not None
    # Where a halted upgrade leaves a cluster: one member on the new version, the others on the old one.
    ahead = cp.members[1]
    await driver.replace_node(ControlPlaneRef("core-12", "up-a"), ahead, "1.30")

    again = await run_operation(migrator_for(driver, rds), request("core-12", "up-b", kind="upgrade"))

    assert isinstance(decode_payload(again[-1]), ControlPlaneUpgradeCompleted), types(again)
    replaced = [decode_payload(e).node for e in again if getattr(decode_payload(e), "step", "") == "replace"]  # type: ignore[attr-defined]
    assert sorted(replaced) == sorted(n for n in cp.members if n != ahead), "only the members still behind"
    cp = await driver.load("core-12")
    assert cp is not None and {cp.node(n).version for n in cp.members} == {"1.30"}
