"""End to end: a fleet-wide staged rollout over several ClusterSets, every service a process on sim."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from services.cloud_provisioner.providers.simcloud import SimCloud
from shared.client import FlotillaClient
from shared.cluster_ids import cluster_id_for
from shared.events.models import FleetRolloutRequested, FleetSelector, FleetStage
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# name -> (env, region)
SETS = {
    "web-staging-aws-us-west-2": ("staging", "us-west-2"),
    "web-prod-aws-eu-west-1": ("prod", "eu-west-1"),
    "web-prod-aws-ap-south-1": ("prod", "ap-south-1"),
    "web-prod-aws-us-east-1": ("prod", "us-east-1"),
    "web-prod-aws-us-east-2": ("prod", "us-east-2"),
}


def document(name: str, env: str, region: str) -> dict[str, Any]:
    return {
        "apiVersion": "flotilla.dev/v1", "kind": "ClusterSet",
        "metadata": {"name": name, "location": {"env": env, "cloud": "aws", "region": region}, "clusterType": "Web"},
        "spec": {"count": 1, "kubernetesVersion": "1.30", "infraServices": ["namespaces"],
                 "nodePools": [{"name": "default", "instanceTypes": ["m6i.large"], "minCount": 1, "maxCount": 2}],
                 "updateStrategy": {"type": "cluster-rotation", "maxSurge": 1, "maxUnavailable": 0}},
    }  # fmt: skip


async def rollout(client: FlotillaClient, rollout_id: str) -> dict[str, Any]:
    return await client.rollout(rollout_id) or {}


async def test_stages_in_order_with_soak_approval_and_a_failure_budget_that_halts(fleet: Fleet):
    cloud = SimCloud(fleet.redis_client(), fleet.settings.redis_prefix)
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API ready")
        for name, (env, region) in SETS.items():
            assert (await client.apply(document(name, env, region))).accepted
        await fleet.wait_states(client, {"READY": len(SETS)}, state="READY")
        # The first set of the last stage (by name) fails its new cluster for good.
        failing = "web-prod-aws-us-east-1"
        await cloud.add_fault(kind="cluster", name_prefix=cluster_id_for(failing, 1), code="QuotaExceeded",
                              retryable=False)  # fmt: skip
        request = FleetRolloutRequested(
            rollout_id="web-k8s-131", cluster_type="Web", patch={"kubernetesVersion": "1.31"}, max_in_flight=1,
            failure_budget=0,
            stages=[FleetStage(name="staging", selector=FleetSelector(envs=["staging"]), soak_seconds=3),
                    FleetStage(name="canary", selector=FleetSelector(regions=["eu-west-1", "ap-south-1"]),
                               approval=True, soak_seconds=1),
                    FleetStage(name="rest")],
        )  # fmt: skip
        await client.start_fleet_rollout(request)

        async def awaiting_approval() -> dict[str, Any] | None:
            view = await rollout(client, "web-k8s-131")
            return view if view.get("state") == "AWAITING_APPROVAL" else None

        view = await fleet.wait_for(awaiting_approval, 240, what="canary awaits approval")
        events = await fleet.events()
        patched = [e.data["clusterset"] for e in events if e.type == "ClusterSetPatchRequested"]
        assert patched == ["web-staging-aws-us-west-2"], "only staging before the approval"
        await client.approve_fleet_rollout("web-k8s-131", "canary", approver="e2e")

        async def halted() -> dict[str, Any] | None:
            view = await rollout(client, "web-k8s-131")
            return view if view.get("state") == "HALTED" else None

        view = await fleet.wait_for(halted, 300, what="fleet rollout halted by the failure budget")
    events = await fleet.events()
    patched = [e.data["clusterset"] for e in events if e.type == "ClusterSetPatchRequested"]
    # Stage order; within a stage by name; max one in flight; nothing after the failure.
    assert patched == ["web-staging-aws-us-west-2", "web-prod-aws-ap-south-1", "web-prod-aws-eu-west-1", failing]
    finished = {e.data["clusterset"]: e.data["succeeded"] for e in events if e.type == "FleetRolloutSetFinished"}
    assert finished == {"web-staging-aws-us-west-2": True, "web-prod-aws-ap-south-1": True,
                        "web-prod-aws-eu-west-1": True, failing: False}  # fmt: skip
    # The soak after staging: the canary stage started no earlier than 3 s after staging completed.
    times = {(e.type, e.data.get("stage")): datetime.fromisoformat(str(e.time)) for e in events
             if e.type in ("FleetRolloutStageCompleted", "FleetRolloutStageStarted", "FleetRolloutAwaitingApproval")}
    assert (times[("FleetRolloutAwaitingApproval", "canary")] - times[("FleetRolloutStageCompleted", "staging")]
            ).total_seconds() >= 3  # fmt: skip
    assert any(e.type == "FleetRolloutHalted" for e in events)
    assert "web-prod-aws-us-east-2" not in patched
    assert view["failed"] == 1 and view["failedSets"] == [failing] and view["succeeded"] == 3
