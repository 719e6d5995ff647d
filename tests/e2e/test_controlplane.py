"""End to end: the self-managed example's control planes migrated to HA on the local driver (real etcd), every
service a process over real NATS and Redis; the etcd_migration service SIGKILLed mid-phase; a failing step rolled
back."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from services.etcd_migration.drivers.base import ControlPlaneRef
from services.etcd_migration.drivers.etcd import EtcdHttp
from services.etcd_migration.drivers.faults import Fault
from services.etcd_migration.drivers.local import LocalDriver
from shared.client import FlotillaClient
from shared.cluster_ids import cluster_id_for
from shared.events import Envelope
from tests.conftest import example_documents
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "core-prod-aws-eu-west-1"
KEYS = 300


def core(ha: bool, count: int = 1) -> dict[str, Any]:
    doc = copy.deepcopy(example_documents()[NAME])
    doc["spec"]["count"] = count
    doc["spec"]["controlPlane"] = {"mode": "self-managed", "ha": ha}
    return doc


async def ready(fleet: Fleet, client: FlotillaClient, count: int = 1) -> list[str]:
    await fleet.wait_for(client.ready, what="status API ready")
    assert (await client.apply(core(False, count))).accepted
    states = await fleet.wait_states(client, {"READY": count}, clusterset=NAME)
    return sorted(states)


async def to_ha(fleet: Fleet, client: FlotillaClient, count: int = 1) -> None:
    """Apply ha: true and wait until the planner has seen the pipeline end (the set converges on the HA config):
    until then it refuses further spec changes, naming the pipeline."""
    result = await client.apply(core(True, count))
    assert result.accepted, result.errors
    await wait_event(fleet, "ClusterSetConverged", config_hash=result.config_hash)


async def seed(driver: LocalDriver, cluster_id: str) -> dict[bytes, bytes]:
    """The cluster's single control-plane node with some data (kube objects under /registry/)."""
    info = await driver.ensure_control_plane(ControlPlaneRef(cluster_id, "seed"), "1.29")
    data = {f"/registry/configmaps/default/cm-{i}".encode(): f"value-{i}".encode() for i in range(KEYS)}
    async with httpx.AsyncClient() as http:
        await EtcdHttp(info.public_endpoint, http).put_many(list(data.items()))
    return data


async def dump(endpoint: str) -> dict[bytes, bytes]:
    async with httpx.AsyncClient() as http:
        return {kv.key: kv.value for kv in await EtcdHttp(endpoint, http).scan(b"/registry/")}


def of(events: list[Envelope], type_name: str, **data: Any) -> list[Envelope]:
    return [e for e in events if e.type == type_name and all(e.data.get(k) == v for k, v in data.items())]


async def wait_event(fleet: Fleet, type_name: str, timeout: float = 240, **data: Any) -> Envelope:
    async def found() -> Envelope | None:
        hits = of(await fleet.events(), type_name, **data)
        return hits[0] if hits else None

    return await fleet.wait_for(found, timeout, what=f"{type_name} {data}")


async def test_ha_on_the_self_managed_example_migrates_every_cluster_keeping_data_and_address(fleet: Fleet):
    driver = LocalDriver(fleet.controlplane_dir)
    async with fleet.client() as client:
        clusters = await ready(fleet, client, count=2)
        seeded = {c: await seed(driver, c) for c in clusters}
        endpoints = {c: (await driver.describe(ControlPlaneRef(c, "t"))).public_endpoint for c in clusters}
        result = await client.apply(core(True, 2))
        assert result.accepted, result.errors
        await wait_event(fleet, "ControlPlanePipelineCompleted")
        # The set converges on the HA config once the planner has seen the pipeline end.
        await wait_event(fleet, "ClusterSetConverged", config_hash=result.config_hash)

        async def shown() -> list[dict[str, Any]] | None:
            ops = await client.migrations(kind="migration", clusterset=NAME)
            return ops if len(ops) == 2 and all(o["state"] == "COMPLETED" for o in ops) else None

        listed = await fleet.wait_for(shown, 30, what="migrations in the status API")
        detail = await client.migration(listed[0]["id"])
        assert detail and len(detail["timeline"]) == 12 and detail["availability"]["requests"] > 0
    events = await fleet.events()
    done = of(events, "ControlPlaneMigrationCompleted")
    assert sorted(e.data["cluster_id"] for e in done) == clusters
    for c in clusters:
        info = await driver.describe(ControlPlaneRef(c, "t"))
        assert info.public_endpoint == endpoints[c], "clients keep their address"
        assert len(info.members) == 3 and all(m.healthy for m in info.members)
        assert len({m.hashkv for m in info.members}) == 1
        assert await dump(info.public_endpoint) == seeded[c]
    for e in done:
        availability = e.data["availability"]
        assert availability and availability["requests"] > 0
        assert availability["succeeded_without_quorum"] == 0
    steps = [e.data["step"] for e in of(events, "ControlPlaneMigrationStepCompleted", cluster_id=clusters[0])]
    assert steps[0] == "precheck" and steps[-1] == "open-load-balancers" and len(steps) == 12
    await driver.aclose()


@pytest.mark.parametrize("kill_after", ["snapshot-save", "create-load-balancers", "wait-kubelets"])
async def test_the_service_killed_mid_phase_resumes_from_its_journal(fleet: Fleet, kill_after: str):
    driver = LocalDriver(fleet.controlplane_dir)
    async with fleet.client() as client:
        (cluster,) = await ready(fleet, client)
        data = await seed(driver, cluster)
        endpoint = (await driver.describe(ControlPlaneRef(cluster, "t"))).public_endpoint
        assert (await client.apply(core(True))).accepted
        await wait_event(fleet, "ControlPlaneMigrationStepCompleted", step=kill_after)
        fleet.kill("etcd_migration")
        fleet.start_service("etcd_migration")
        await wait_event(fleet, "ControlPlaneMigrationCompleted", cluster_id=cluster)
    events = await fleet.events()
    steps = [e.data["step"] for e in of(events, "ControlPlaneMigrationStepCompleted", cluster_id=cluster)]
    assert len(steps) == len(set(steps)) == 12, steps  # every step once (a redo re-emits the same event id)
    info = await driver.describe(ControlPlaneRef(cluster, "t"))
    assert info.public_endpoint == endpoint and len(info.members) == 3
    assert await dump(endpoint) == data
    await driver.aclose()


# Every step before phase 3 that acts on the cluster, by the driver method it runs.
ROLLBACK_CASES = [("precheck", "ensure_control_plane"), ("stop-mutations", "stop_mutations"),
                  ("snapshot-save", "snapshot_save"), ("stop-node", "stop_node"), ("snapshot-disk", "snapshot_disk"),
                  ("create-nodes", "create_nodes"), ("create-load-balancers", "create_load_balancers"),
                  ("restore-members", "restore_members")]  # fmt: skip


@pytest.mark.parametrize(("failing", "method"), ROLLBACK_CASES)
async def test_a_failing_step_rolls_back_to_the_single_node_serving_the_same_data(fleet: Fleet, failing: str,
                                                                                  method: str):  # fmt: skip
    driver = LocalDriver(fleet.controlplane_dir, fleet.redis_client(), redis_prefix=fleet.settings.redis_prefix)
    async with fleet.client() as client:
        (cluster,) = await ready(fleet, client)
        data = await seed(driver, cluster)
        endpoint = (await driver.describe(ControlPlaneRef(cluster, "t"))).public_endpoint
        await driver.fail_on(method, times=100, cluster_id=cluster)
        assert (await client.apply(core(True))).accepted
        rolled = await wait_event(fleet, "ControlPlaneMigrationRolledBack", cluster_id=cluster)
        assert rolled.data["from_step"] == failing
        await driver.clear_faults()
    info = await driver.describe(ControlPlaneRef(cluster, "t"))
    assert len(info.members) == 1 and info.members[0].healthy and info.public_endpoint == endpoint
    assert await dump(endpoint) == data
    await driver.aclose()


async def test_a_version_change_upgrades_each_ha_control_plane_one_node_at_a_time_keeping_quorum(fleet: Fleet):
    driver = LocalDriver(fleet.controlplane_dir, fleet.redis_client(), redis_prefix=fleet.settings.redis_prefix)
    async with fleet.client() as client:
        (cluster,) = await ready(fleet, client)
        data = await seed(driver, cluster)
        await to_ha(fleet, client)
        upgraded = core(True)
        upgraded["spec"]["kubernetesVersion"] = "1.30"
        result = await client.apply(upgraded)
        assert result.accepted, result.errors
        done = await wait_event(fleet, "ControlPlaneUpgradeCompleted", cluster_id=cluster)
    availability = done.data["availability"]
    # One node down at a time: quorum all along, so every request succeeds (bar a leader election's blip).
    assert availability["availability_pct"] >= 95 and availability["requests_without_quorum"] == 0
    info = await driver.describe(ControlPlaneRef(cluster, "t"))
    assert {m.version for m in info.members} == {"1.30"} and all(m.healthy for m in info.members)
    assert await dump(info.public_endpoint) == data
    nodes = [e.data["node"] for e in of(await fleet.events(), "ControlPlaneUpgradeStepCompleted", cluster_id=cluster)
             if e.data["step"] == "replace"]  # fmt: skip
    assert len(nodes) == 3 and len(set(nodes)) == 3
    await driver.aclose()


async def test_a_failing_validation_rolls_the_node_back_and_the_pipeline_halts_past_its_budget(fleet: Fleet):
    driver = LocalDriver(fleet.controlplane_dir, fleet.redis_client(), redis_prefix=fleet.settings.redis_prefix)
    first, second, third = (cluster_id_for(NAME, s) for s in range(3))
    async with fleet.client() as client:
        await ready(fleet, client, count=3)
        await to_ha(fleet, client, count=3)
        # Two at a time, no failure budget. The first fails its validation; the second is slow (still in flight
        # when the first fails) and finishes; the third must never start.
        await driver.fail_on("validate", times=100, cluster_id=first)
        await driver.inject(Fault("replace_node", times=1, cluster_id=second, delay_s=4, fail=False))
        result = await client.request_control_plane_change(NAME, "upgrade", to_version="1.30", concurrency=2,
                                                           failure_budget=0, wait_s=30)  # fmt: skip
        assert result.answer is not None and result.answer.type == "ControlPlanePipelineRequested", result
        halted = await wait_event(fleet, "ControlPlanePipelineHalted")
        completed = await wait_event(fleet, "ControlPlanePipelineCompleted", pipeline_id=halted.data["pipeline_id"])
        await driver.clear_faults()
    events = await fleet.events()
    assert of(events, "ControlPlaneUpgradeFailed", cluster_id=first, rolled_back=True)
    assert halted.data["failed"] == [first]
    assert completed.data["succeeded"] == [second] and completed.data["failed"] == [first]
    assert len(of(events, "ControlPlaneUpgradeStepCompleted", cluster_id=first, step="rollback-node")) == 1
    assert not of(events, "ControlPlaneUpgradeRequested", cluster_id=third), "the budget halted the rest"
    info = await driver.describe(ControlPlaneRef(first, "t"))
    assert {m.version for m in info.members} == {"1.29"} and all(m.healthy for m in info.members)
    info = await driver.describe(ControlPlaneRef(second, "t"))
    assert {m.version for m in info.members} == {"1.30"}
    await driver.aclose()
