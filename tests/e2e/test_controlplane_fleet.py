"""End to end: a fleet-wide control-plane migration to HA across several self-managed ClusterSets, as a staged
fleet rollout (a patch of `controlPlane.ha`), every service a process over real NATS and Redis, the control
planes on the `sim` driver (simulated VMs in Redis with latency). The operator then finishes the halted set from
the CLI: the cluster left is migrated, the one migrated already is found HA, and the set converges."""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import pytest

from services.etcd_migration.drivers.faults import Fault
from services.etcd_migration.drivers.sim import FIRST_NODE, SimControlPlaneDriver
from shared.client import FlotillaClient
from shared.cluster_ids import cluster_id_for
from shared.events.models import FleetRolloutRequested, FleetSelector, FleetStage
from tests.conftest import example_documents
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.fleet(env_overrides={"FLOTILLA_CONTROLPLANE_DRIVER": "sim"})]  # fmt: skip

# name -> region; the canary stage takes eu-west-1, the rest go by name.
SETS = {"core-prod-aws-eu-west-1": "eu-west-1", "core-prod-aws-ap-south-1": "ap-south-1",
        "core-prod-aws-us-east-1": "us-east-1"}  # fmt: skip
FAILING = "core-prod-aws-ap-south-1"


def core(name: str, region: str) -> dict[str, Any]:
    doc = copy.deepcopy(example_documents()["core-prod-aws-eu-west-1"])
    doc["metadata"]["name"] = name
    doc["metadata"]["location"]["region"] = region
    doc["spec"]["updateStrategy"] = {"type": "in-place", "maxUnavailable": 2}  # two control planes at a time
    return doc


async def fleet_rollout(client: FlotillaClient, state: str) -> dict[str, Any] | None:
    view = await client.rollout("core-ha") or {}
    return view if view.get("state") == state else None


async def test_a_fleet_rollout_of_ha_migrates_stage_by_stage_and_a_failed_set_halts_the_rest(fleet: Fleet):
    driver = SimControlPlaneDriver(fleet.redis_client(), fleet.settings.redis_prefix)
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API ready")
        for name, region in SETS.items():
            assert (await client.apply(core(name, region))).accepted
        await fleet.wait_states(client, {"READY": 2 * len(SETS)}, state="READY")
        # One control plane of the first set of the last stage fails while its new members are restored.
        broken = cluster_id_for(FAILING, 1)
        await driver.inject(Fault("restore_members", cluster_id=broken))
        request = FleetRolloutRequested(
            rollout_id="core-ha", cluster_type="Core", patch={"controlPlane": {"ha": True}}, max_in_flight=1,
            failure_budget=0,
            stages=[FleetStage(name="canary", selector=FleetSelector(regions=["eu-west-1"]), soak_seconds=1),
                    FleetStage(name="rest")],
        )  # fmt: skip
        await client.start_fleet_rollout(request)
        view = await fleet.wait_for(lambda: fleet_rollout(client, "HALTED"), 300, what="fleet rollout halted")

        async def all_ended() -> list[dict[str, Any]] | None:  # the failed set's other migration was in flight
            found = await client.migrations(kind="migration")
            return found if len(found) == 4 and all(m["state"] != "IN_PROGRESS" for m in found) else None

        migrations = await fleet.wait_for(all_ended, 120, what="the migrations in flight to end")

        # The operator finishes the halted set from the CLI (the fault is gone): only the cluster left is migrated.
        finish = await client.request_control_plane_change(FAILING, "migrate", wait_s=30)
        assert finish.answer is not None and finish.answer.type == "ControlPlanePipelineRequested", finish.answer
        history = await fleet.events()
        accepted = [e for e in history if e.type == "ClusterSetAccepted" and e.data["clusterset"] == FAILING]
        ha_hash = accepted[-1].data["config_hash"]  # the patch's generation

        async def converged() -> bool:
            return any(e.type == "ClusterSetConverged" and e.data["clusterset"] == FAILING
                       and e.data["config_hash"] == ha_hash for e in await fleet.events())  # fmt: skip

        await fleet.wait_for(converged, 120, what=f"{FAILING} converged on the HA config")

    events = await fleet.events()
    patched = [e.data["clusterset"] for e in events if e.type == "ClusterSetPatchRequested"]
    assert patched == ["core-prod-aws-eu-west-1", FAILING], "stage order, by name, nothing after the failure"
    assert view["failedSets"] == [FAILING] and view["succeeded"] == 1
    (failed,) = [e for e in events if e.type == "ClusterSetUpdateFailed"]
    assert failed.data["clusterset"] == FAILING and failed.data["cluster_ids"] == [broken]

    # The canary set: both control planes on three members, the old node fenced, data and address kept.
    by_cluster = {m["clusterId"]: m for m in migrations}
    for serial in (0, 1):
        cid = cluster_id_for("core-prod-aws-eu-west-1", serial)
        cp = await driver.load(cid)
        assert cp is not None and len(cp.members) == 3 and cp.serving() and cp.node(FIRST_NODE).fenced
        assert {cp.node(n).data.content for n in cp.members} == {cp.node(FIRST_NODE).data.content}
        assert by_cluster[cid]["state"] == "COMPLETED"
        assert by_cluster[cid]["availability"]["succeededWithoutQuorum"] == 0
    # The failed set: the broken one rolled back (to its single node), its sibling (in flight) finished; then the
    # operator's re-run migrated the broken one and found its sibling HA already.
    assert by_cluster[broken]["state"] == "ROLLED_BACK"
    assert by_cluster[cluster_id_for(FAILING, 0)]["state"] == "COMPLETED"
    cp = await driver.load(broken)
    assert cp is not None and len(cp.members) == 3 and cp.serving() and cp.node(FIRST_NODE).fenced
    spec_run, cli_run = [e.data["pipeline_id"] for e in events
                         if e.type == "ControlPlanePipelineRequested" and e.data["clusterset"] == FAILING]
    steps_in: dict[tuple[str, str], list[str]] = defaultdict(list)
    for e in events:
        if e.type == "ControlPlaneMigrationStepCompleted":
            steps_in[(e.data["pipeline_id"], e.data["cluster_id"])].append(e.data["step"])
    assert steps_in[(cli_run, cluster_id_for(FAILING, 0))] == ["precheck"], "HA already: nothing redone"
    assert steps_in[(cli_run, broken)][-1] == "open-load-balancers"
    assert "restore-members" not in steps_in[(spec_run, broken)]
    # The set after the halt was never touched.
    for serial in (0, 1):
        untouched = await driver.load(cluster_id_for("core-prod-aws-us-east-1", serial))
        assert untouched is None or untouched.members == [FIRST_NODE]
