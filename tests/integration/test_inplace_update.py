"""In-place updates through the cloud_provisioner service: real nats-server and redis-server, the sim cloud.

A provisioned cluster gets a ClusterUpdateRequested (maxCount and labels changed): the node pool is changed
in the sim cloud, nothing is created, exactly one ClusterResourcesUpdated reports the generation, and
duplicates or a full replay change nothing. An update that arrives while the cluster is still being
provisioned is applied once it is provisioned.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.cloud_provisioner.app import DURABLE, SERVICE
from services.cloud_provisioner.providers import build_registry
from services.cloud_provisioner.providers.base import TAG_CLUSTER
from services.cloud_provisioner.providers.simcloud import SimCloud, SimResource
from shared.bus import Bus
from shared.config import Settings
from shared.events import Envelope, subjects
from shared.events.models import ClusterResourcesUpdated
from tests.helpers import PLAIN, cluster_requested, consumer_drained, fleet_events, from_planner, provisioner_service
from tests.helpers import wait_until as wait
from tests.unit.test_provisioner_core import update_requested


async def ours(bus: Bus, cluster_id: str, event_type: str | None = None) -> list[Envelope]:
    events = await fleet_events(bus, source=SERVICE, aggregate=cluster_id)
    return [e for e in events if event_type is None or e.type == event_type]


async def resources(sim: SimCloud, cluster_id: str) -> dict[str, SimResource]:
    return {r.id: r for r in await sim.resources(cluster_id)}


def the_pool(found: dict[str, SimResource], cluster_id: str) -> SimResource:
    (pool,) = [r for r in found.values() if r.kind == "node_pool" and r.tags.get(TAG_CLUSTER) == cluster_id]
    return pool


async def test_update_of_a_provisioned_cluster_changes_the_pool_in_place_once(settings: Settings, bus: Bus,
                                                                             redis: Redis) -> None:  # fmt: skip
    req = cluster_requested(PLAIN)
    cid = req.cluster_id
    sim = SimCloud.from_settings(redis, settings)
    async with provisioner_service(settings, build_registry(settings, redis)):
        await bus.publish(from_planner(req))
        await wait(lambda: ours(bus, cid, "ClusterProvisioned"))
        before, created = await resources(sim, cid), await sim.stats()
        assert the_pool(before, cid).attrs["max_count"] == 3

        update = update_requested(req, 2, maxCount=6, labels={"tier": "gold"})
        sent = from_planner(update)
        await bus.publish(sent)
        await wait(lambda: ours(bus, cid, "ClusterResourcesUpdated"))
        (report_env,) = await ours(bus, cid, "ClusterResourcesUpdated")
        report = ClusterResourcesUpdated.model_validate(report_env.data)
        assert (report.generation, report.config_hash) == (2, update.config_hash)
        assert report.changed == ["node_pools"] and report_env.causation_id == sent.id
        after = await resources(sim, cid)
        assert set(after) == set(before)  # the same resources, by id: nothing created, nothing replaced
        pool = the_pool(after, cid)
        assert (pool.attrs["max_count"], pool.attrs["labels"], pool.attrs["instance_types"]) == (
            6, {"tier": "gold"}, ["m6i.2xlarge"])  # fmt: skip
        stats = await sim.stats()
        assert stats["created:node_pool"] == created["created:node_pool"] and stats["updated:node_pool"] == 1
        assert report.resources["node_pools"] == {"node_pools": {"default": pool.id}}

        # Duplicates: the same envelope (JetStream dedup), and the planner re-emitting it (a new event id).
        assert not await bus.publish(sent)
        await bus.publish(from_planner(update))
        await bus.publish(from_planner(update_requested(req, 1, maxCount=4)))  # an older generation
        await wait(lambda: consumer_drained(bus, DURABLE))
        assert len(await ours(bus, cid, "ClusterResourcesUpdated")) == 1
        assert await sim.stats() == stats and set(await resources(sim, cid)) == set(before)
        emitted = [e.id for e in await ours(bus, cid)]

    # Replay proof: reset the consumer to the stream's first message and re-deliver everything.
    await bus.js.delete_consumer(subjects.STREAM_FLEET, DURABLE)
    async with provisioner_service(settings, build_registry(settings, redis)):
        await wait(lambda: consumer_drained(bus, DURABLE))
        assert [e.id for e in await ours(bus, cid)] == emitted
        assert await sim.stats() == stats and set(await resources(sim, cid)) == set(before)


async def test_update_while_provisioning_is_applied_once_the_cluster_is_provisioned(settings: Settings, bus: Bus,
                                                                                   redis: Redis) -> None:  # fmt: skip
    slow = settings.model_copy(update={"sim_latency_s": 0.2, "sim_latency_jitter": 0.0})
    req = cluster_requested(PLAIN, "0002")
    cid = req.cluster_id
    sim = SimCloud.from_settings(redis, slow)
    async with provisioner_service(slow, build_registry(slow, redis)):
        await bus.publish(from_planner(req))
        await wait(lambda: ours(bus, cid, "ClusterResourceProvisioned"))  # provisioning has started
        update = update_requested(req, 2, maxCount=5, labels={"tier": "silver"})
        sent = from_planner(update)
        await bus.publish(sent)
        await wait(lambda: ours(bus, cid, "ClusterResourcesUpdated"), within=30)
        await wait(lambda: consumer_drained(bus, DURABLE))
        events = await ours(bus, cid)
        types = [e.type for e in events]
        # The update took the chain over: the remaining steps ran on the new spec.
        assert any(e.causation_id == sent.id for e in events if e.type == "ClusterResourceProvisioned")
        assert types.count("ClusterProvisioned") == 1 and types.count("ClusterResourcesUpdated") == 1
        assert types.index("ClusterProvisioned") < types.index("ClusterResourcesUpdated")
        (report_env,) = await ours(bus, cid, "ClusterResourcesUpdated")
        assert report_env.data["generation"] == 2
        pool = the_pool(await resources(sim, cid), cid)
        assert (pool.attrs["max_count"], pool.attrs["labels"]) == (5, {"tier": "silver"})
        assert await sim.inventory(cid) == {cid: {"network": 1, "cluster": 1, "node_pool": 1, "iam_role": 1,
                                                  "log_stream": 1}}  # fmt: skip
