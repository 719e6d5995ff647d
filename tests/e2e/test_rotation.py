"""End to end on sim, every service a process over real NATS and Redis: rotation and in-place updates."""

from __future__ import annotations

import copy
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.cloud_provisioner.providers.simcloud import SimCloud
from services.infra_installer.targets.sim import SimKubernetesTarget
from shared.client import FlotillaClient
from shared.cluster_ids import cluster_id_for
from shared.events import Envelope
from tests.conftest import example_documents
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "modelserving-prod-aws-us-east-1"


def six(version: str = "1.30", **strategy: Any) -> dict:
    doc = copy.deepcopy(example_documents()[NAME])
    doc["spec"].update(count=6, kubernetesVersion=version)
    doc["spec"]["infraServices"] = ["namespaces", "rbac"]  # fewer install steps: the rollout is what is tested
    doc["spec"]["updateStrategy"] = {"type": "cluster-rotation", "maxSurge": 2, "maxUnavailable": 0, **strategy}
    return doc


def bounds(events: list[Envelope], name: str) -> tuple[int, int]:
    """(fewest READY, most alive) over the stream, counted from when every first cluster was READY.

    Stream order is causal here: a drain or a new request is published after the facts that caused it."""
    ready: set[str] = set()
    alive: set[str] = set()
    started = False
    fewest, most = 1 << 30, 0
    for env in events:
        if env.data.get("clusterset") != name:
            continue
        cid = env.data.get("cluster_id")
        match env.type:
            case "ClusterRequested":
                alive.add(cid)
            case "ClusterReady":
                ready.add(cid)
            case "ClusterDrainRequested" | "ClusterRetirementRequested" | "ClusterInfraFailed" | \
                    "ClusterProvisioningFailed" | "ClusterUpdateRequested":  # fmt: skip
                ready.discard(cid)
            case "ClusterDeprovisioned":
                alive.discard(cid)
            case "RolloutStarted":
                started = True
        if started:
            fewest, most = min(fewest, len(ready)), max(most, len(alive))
    return fewest, most


async def rollout_of(client: FlotillaClient) -> dict[str, Any]:
    view = await client.clusterset(NAME) or {}
    return view.get("rollout") or {}


async def wait_rollout(fleet: Fleet, client: FlotillaClient, state: str, timeout: float = 240) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        rollout = await rollout_of(client)
        return rollout if rollout.get("state") == state else None

    return await fleet.wait_for(check, timeout, what=f"rollout {state}")


async def new_hash(client: FlotillaClient) -> str:
    view = await client.clusterset(NAME)
    assert view is not None
    return str(view["configHash"])


async def start_six(fleet: Fleet, client: FlotillaClient) -> None:
    await fleet.wait_for(client.ready, what="status API ready")
    result = await client.apply(six())
    assert result.accepted, result.errors
    await fleet.wait_states(client, {"READY": 6}, clusterset=NAME, state="READY")


async def test_a_version_bump_rotates_six_clusters_two_at_a_time_without_dropping_below_six(fleet: Fleet):
    async with fleet.client() as client:
        await start_six(fleet, client)
        result = await client.apply(six("1.31"))
        assert result.accepted, result.errors
        await wait_rollout(fleet, client, "COMPLETED")
        states = await fleet.wait_states(client, {"READY": 6}, clusterset=NAME, state="READY")
        target = await new_hash(client)
        clusters = await client.clusters(clusterset=NAME)
        assert {c["configHash"] for c in clusters if c["state"] == "READY"} == {target}
        assert set(states) == {cluster_id_for(NAME, s) for s in range(6, 12)}
    events = await fleet.events()
    fewest, most = bounds(events, NAME)
    assert fewest >= 6, f"READY dropped to {fewest}"
    assert most <= 8, f"{most} clusters alive at once"
    retirements = Counter(e.data["cluster_id"] for e in events if e.type == "ClusterRetirementRequested")
    assert sorted(retirements) == sorted(cluster_id_for(NAME, s) for s in range(6)) and set(retirements.values()) == {1}
    drains = [e for e in events if e.type == "ClusterDrained"]
    assert len(drains) == 6 and not any(e.data["timed_out"] for e in drains)
    assert await fleet.sim_inventory() and len(await fleet.sim_inventory()) == 6


@pytest.mark.parametrize("kill_after", ["ClusterDrainRequested", "ClusterRetirementRequested", "RolloutProgressed"])
async def test_rotation_killed_mid_rollout_resumes_without_extra_or_double_work(fleet: Fleet, kill_after: str):
    async with fleet.client() as client:
        await start_six(fleet, client)
        assert (await client.apply(six("1.31"))).accepted
        for round_ in range(2):  # kill it twice, at the first and at a later such event
            async def seen(n: int = round_ + 1) -> bool:
                return sum(e.type == kill_after for e in await fleet.events()) >= n

            await fleet.wait_for(seen, 120, what=kill_after)
            fleet.kill("rotation")
            fleet.start_service("rotation")
        await wait_rollout(fleet, client, "COMPLETED")
        await fleet.wait_states(client, {"READY": 6}, clusterset=NAME, state="READY")
    events = await fleet.events()
    requested = Counter(e.data["cluster_id"] for e in events if e.type == "ClusterRequested")
    assert len(requested) == 12 and set(requested.values()) == {1}, requested
    retired = Counter(e.data["cluster_id"] for e in events if e.type == "ClusterRetirementRequested")
    assert len(retired) == 6 and set(retired.values()) == {1}, retired
    fewest, most = bounds(events, NAME)
    assert fewest >= 6 and most <= 8
    assert len(await fleet.sim_inventory()) == 6


async def test_a_failing_new_cluster_pauses_then_rollback_keeps_the_old_then_a_fixed_retry_completes(fleet: Fleet):
    cloud = SimCloud(fleet.redis_client(), fleet.settings.redis_prefix)
    async with fleet.client() as client:
        await start_six(fleet, client)
        old = set(await fleet.states(client, clusterset=NAME))
        old_hash = await new_hash(client)
        # The first new cluster's control plane fails for good (quota).
        fault = await cloud.add_fault(kind="cluster", name_prefix=cluster_id_for(NAME, 6), code="QuotaExceeded",
                                      retryable=False)  # fmt: skip
        assert (await client.apply(six("1.31"))).accepted
        paused = await wait_rollout(fleet, client, "PAUSED")
        assert cluster_id_for(NAME, 6) in str(paused)
        assert not [e for e in await fleet.events() if e.type == "ClusterRetirementRequested"], "no old one retired"
        await client.rollout_control(NAME, "rollback")
        await wait_rollout(fleet, client, "ROLLED_BACK")
        await fleet.wait_states(client, {"READY": 6}, clusterset=NAME, state="READY")
        ready = {c["id"] for c in await client.clusters(clusterset=NAME) if c["state"] == "READY"}
        assert ready == old
        # The set went back to the config its clusters are on (a new generation, once the planner has seen the
        # rollback); re-applying the new version then retries the rollout.
        async def reverted() -> bool:
            return await new_hash(client) == old_hash

        await fleet.wait_for(reverted, 60, what="the set reverted to its clusters' config")
        await cloud.remove_fault(fault)
        assert (await client.apply(six("1.31"))).accepted
        await wait_rollout(fleet, client, "COMPLETED")
        await fleet.wait_states(client, {"READY": 6}, clusterset=NAME, state="READY")
        assert not (set(await fleet.states(client, clusterset=NAME, state="READY")) & old)


async def test_a_rollback_after_a_timed_out_drain_uncordons_the_old_clusters_it_drained(fleet: Fleet):
    target = SimKubernetesTarget(fleet.redis_client(), fleet.settings)
    async with fleet.client() as client:
        await start_six(fleet, client)
        old = set(await fleet.states(client, clusterset=NAME))
        await target.block_evictions()  # no disruption budget lets anything go: drains time out
        assert (await client.apply(six("1.31", drainTimeoutSeconds=2))).accepted
        paused = await wait_rollout(fleet, client, "PAUSED")
        assert "drain timed out" in str(paused)
        drained = {c["id"] for c in await client.clusters(clusterset=NAME) if c["state"] == "DRAINED"}
        assert drained and drained <= old
        await client.rollout_control(NAME, "rollback")
        await wait_rollout(fleet, client, "ROLLED_BACK")
        # Every old cluster READY again and taking pods: none left cordoned and empty.
        states = await fleet.wait_states(client, {"READY": 6}, clusterset=NAME, state="READY")
        assert set(states) == old
        for cid in drained:
            status = await target.drain_status(cid)
            assert "cordoned" not in status and status["uncordoned"] == 1, status
    events = await fleet.events()
    asked = Counter(e.data["cluster_id"] for e in events if e.type == "ClusterUncordonRequested")
    assert set(asked) == drained
    assert {e.data["cluster_id"] for e in events if e.type == "ClusterUncordoned"} == drained
    assert not {e.data["cluster_id"] for e in events if e.type == "ClusterRetirementRequested"} & old


async def test_drains_wait_for_the_maintenance_window_then_the_rollout_completes(fleet: Fleet):
    async with fleet.client() as client:
        await start_six(fleet, client)
        # A window opening on the next whole minute at least 40 s away (UTC), on today's and tomorrow's weekday:
        # time enough for the new clusters to come up while it is closed.
        opens = (datetime.now(UTC) + timedelta(seconds=100)).replace(second=0, microsecond=0)
        days = [d.strftime("%a") for d in (opens, opens + timedelta(days=1))]
        window = {"days": days, "start": opens.strftime("%H:%M"), "durationMinutes": 60}
        assert (await client.apply(six("1.31", maintenanceWindows=[window]))).accepted
        waiting = await wait_rollout(fleet, client, "WAITING", timeout=60)
        assert datetime.fromisoformat(waiting["waiting"]["until"].replace("Z", "+00:00")) == opens
        # New clusters may come up before the window; nothing old is drained or retired.
        await fleet.wait_states(client, {"READY": 8}, clusterset=NAME, state="READY")
        early = await fleet.events()
        assert not [e for e in early if e.type in ("ClusterDrainRequested", "ClusterRetirementRequested")]
        await wait_rollout(fleet, client, "COMPLETED", timeout=240)
    events = await fleet.events()
    first_drain = next(e for e in events if e.type == "ClusterDrainRequested")
    assert first_drain.time >= opens, "the first drain started inside the window"
    fewest, most = bounds(events, NAME)
    assert fewest >= 6 and most <= 8


async def test_resume_after_a_fix_completes(fleet: Fleet):
    cloud = SimCloud(fleet.redis_client(), fleet.settings.redis_prefix)
    async with fleet.client() as client:
        await start_six(fleet, client)
        fault = await cloud.add_fault(kind="cluster", name_prefix=cluster_id_for(NAME, 7), code="QuotaExceeded",
                                      retryable=False)  # fmt: skip
        assert (await client.apply(six("1.31"))).accepted
        await wait_rollout(fleet, client, "PAUSED")
        await cloud.remove_fault(fault)
        await client.rollout_control(NAME, "resume")
        await wait_rollout(fleet, client, "COMPLETED")
        await fleet.wait_states(client, {"READY": 6}, clusterset=NAME, state="READY")
    fewest, most = bounds(await fleet.events(), NAME)
    assert fewest >= 6 and most <= 8


async def test_an_in_place_change_updates_every_cluster_and_replaces_none(fleet: Fleet):
    async with fleet.client() as client:
        doc = six(maxUnavailable=2)
        await fleet.wait_for(client.ready, what="status API ready")
        assert (await client.apply(doc)).accepted
        await fleet.wait_states(client, {"READY": 6}, clusterset=NAME, state="READY")
        before = set(await fleet.states(client, clusterset=NAME))
        doc["spec"]["nodePools"][0]["maxCount"] = 9
        doc["spec"]["nodePools"][0]["labels"] = {"tier": "serving"}
        result = await client.apply(doc)
        assert result.accepted, result.errors
        target = result.config_hash

        async def converged() -> bool:
            clusters = await client.clusters(clusterset=NAME)
            return len(clusters) == 6 and all(c["state"] == "READY" and c["configHash"] == target for c in clusters)

        await fleet.wait_for(converged, 120, what="in-place update")
        assert set(await fleet.states(client, clusterset=NAME)) == before, "no cluster replaced"
    events = await fleet.events()
    updating = {e.data["cluster_id"] for e in events if e.type == "ClusterUpdateRequested"}
    assert updating == before
    assert not [e for e in events if e.type == "RolloutRequested"]
    assert sum(e.type == "ClusterResourcesUpdated" for e in events) == 6
    # At most maxUnavailable (2) updating at once, in stream order.
    in_flight, most = set(), 0
    for e in events:
        if e.type == "ClusterUpdateRequested":
            in_flight.add(e.data["cluster_id"])
        elif e.type == "ClusterReady" and e.data["config_hash"] == target:
            in_flight.discard(e.data["cluster_id"])
        most = max(most, len(in_flight))
    assert most <= 2
    inventory = await SimCloud(fleet.redis_client(), fleet.settings.redis_prefix).resources()
    pools = [r for r in inventory if r.kind == "node_pool"]
    assert len(pools) == 6 and all(r.attrs.get("max_count") == 9 for r in pools)
