"""End to end: every service as its own process over real NATS JetStream and Redis, on the sim cloud."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from services.planner.core import cluster_id_for
from services.status_projector.store import dump_views
from shared.bus import connect_bus
from shared.client import FlotillaClient
from shared.events import subjects
from tests.conftest import example_documents
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = example_documents()
MODELSERVING = "modelserving-prod-aws-us-east-1"
TOTAL = sum(d["spec"]["count"] for d in EXAMPLES.values())  # 5 + 2 + 3 + 2


def with_count(name: str, count: int) -> dict:
    doc = copy.deepcopy(EXAMPLES[name])
    doc["spec"]["count"] = count
    return doc


def expected_ids(name: str, count: int, first_serial: int = 0) -> set[str]:
    return {cluster_id_for(name, s) for s in range(first_serial, first_serial + count)}


def expected_kinds(doc: dict) -> dict[str, int]:
    """What one cluster of this set owns in the sim cloud: one of each, a node pool per pool, no byon network."""
    kinds = {"cluster": 1, "node_pool": len(doc["spec"]["nodePools"]), "iam_role": 1, "log_stream": 1}
    if "byon" not in doc["spec"].get("features", []):
        kinds["network"] = 1
    return kinds


def assert_no_duplicates(inventory: dict[str, dict[str, int]]) -> None:
    for cid, kinds in inventory.items():
        set_name = cid.rsplit("-", 1)[0]
        assert kinds == expected_kinds(EXAMPLES[set_name]), (cid, kinds)


async def apply_all(client: FlotillaClient) -> None:
    for doc in EXAMPLES.values():
        result = await client.apply(doc)
        assert result.accepted, result.errors


async def fleet_event_ids(fleet: Fleet) -> list[str]:
    bus = await connect_bus(fleet.settings, "e2e-read", ensure_streams=False)
    try:
        info = await bus.js.stream_info(subjects.STREAM_FLEET)
        sub = await bus.js.pull_subscribe(subjects.FLEET_ALL, stream=subjects.STREAM_FLEET)
        ids: list[str] = []
        while len(ids) < info.state.messages:
            for msg in await sub.fetch(min(500, info.state.messages - len(ids)), timeout=5):
                ids.append(json.loads(msg.data)["id"])
                await msg.ack()
        await sub.unsubscribe()
        return ids
    finally:
        await bus.close()


async def test_examples_go_ready_then_scale_delete_and_replay_changes_nothing(fleet: Fleet):
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API ready")
        await apply_all(client)
        await fleet.wait_states(client, {"READY": TOTAL})
        states = await fleet.states(client)
        assert set(states) == set().union(*(expected_ids(n, d["spec"]["count"]) for n, d in EXAMPLES.items()))
        # Discovery lists every READY cluster with its endpoint; ready events are filterable by cloud.
        discovery = await client.discovery()
        items = discovery["items"] if isinstance(discovery, dict) else discovery
        assert len(items) == TOTAL and all(i["endpoint"].startswith("https://") for i in items)

        # Scale 5 -> 7 -> 3: exactly 3 remain, the retired ones are DELETED, nothing of theirs left in the cloud.
        assert (await client.apply(with_count(MODELSERVING, 7))).accepted
        await fleet.wait_states(client, {"READY": 7}, clusterset=MODELSERVING)
        assert (await client.apply(with_count(MODELSERVING, 3))).accepted
        final = await fleet.wait_states(client, {"READY": 3, "DELETED": 4}, clusterset=MODELSERVING)
        for cid, state in final.items():
            inventory = await fleet.sim_inventory(cid)
            if state == "DELETED":
                assert inventory == {}, (cid, inventory)
            else:  # every resource of a live cluster exists exactly once
                assert inventory.get(cid) == expected_kinds(EXAMPLES[MODELSERVING]), (cid, inventory)
        view = await client.clusterset(MODELSERVING)
        assert view and view["status"]["readyClusters"] == 3 and len(view["status"]["clusters"]) == 3

        # Delete a set: all of its clusters DELETED, none of its resources left.
        deleted = await client.delete("dataeng-staging-azure-westeurope")
        assert deleted.retired
        await fleet.wait_states(client, {"DELETED": 2}, clusterset="dataeng-staging-azure-westeurope")
        for cid in expected_ids("dataeng-staging-azure-westeurope", 2):
            assert await fleet.sim_inventory(cid) == {}

    # Replay: reset every consumer to the first message and re-deliver everything.
    await fleet.wait_for(fleet.consumers_idle, what="consumers idle")
    redis = fleet.redis_client()
    views_before = await dump_views(redis, fleet.settings.redis_prefix)
    inventory_before = await fleet.sim_inventory()
    ids_before = await fleet_event_ids(fleet)
    for name in ("planner", "cloud_provisioner", "infra_installer", "rotation", "etcd_migration",
                 "status_projector"):  # fmt: skip
        fleet.stop_service(name)
    bus = await connect_bus(fleet.settings, "e2e-reset", ensure_streams=False)
    durables: set[tuple[str, str]] = set()
    for stream in (subjects.STREAM_CLUSTERSETS, subjects.STREAM_FLEET):
        for info in await bus.js.consumers_info(stream):
            if info.config.durable_name:
                durables.add((stream, info.name))
                await bus.js.delete_consumer(stream, info.name)
    assert len(durables) >= 5
    # The projector's cursor is its checkpoint in Redis: rewind it to the start as well.
    checkpoint_keys = [k async for k in redis.scan_iter(match=f"{fleet.settings.redis_prefix}:views:*checkpoint*")]
    assert checkpoint_keys
    for key in checkpoint_keys:
        await redis.set(key, 0)
    for name in ("planner", "cloud_provisioner", "infra_installer", "rotation", "etcd_migration",
                 "status_projector"):  # fmt: skip
        fleet.start_service(name)

    async def redelivered_everything() -> bool:
        for stream, name in durables:
            try:
                info = await bus.js.consumer_info(stream, name)
            except Exception:
                return False
            last = (await bus.js.stream_info(stream)).state.last_seq
            if info.delivered.stream_seq < last and info.num_pending:
                return False
        return await fleet.consumers_idle()

    await fleet.wait_for(redelivered_everything, what="every consumer re-delivered the whole stream")
    await bus.close()
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="projector ready after replay")
    ids_after = await fleet_event_ids(fleet)
    assert ids_after == ids_before, "replay published new events"
    assert await fleet.sim_inventory() == inventory_before, "replay touched the cloud"
    views_after = await dump_views(redis, fleet.settings.redis_prefix)
    assert views_after == views_before, "read models changed on replay"
    await redis.aclose()


@pytest.mark.fleet(env_overrides={"FLOTILLA_SIM_LATENCY_S": "0.4"})
async def test_provisioner_killed_mid_provisioning_converges_without_duplicates(fleet: Fleet):
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API ready")
        await apply_all(client)

        async def provisioning() -> bool:
            states = await fleet.states(client)
            return sum(s == "PROVISIONING" for s in states.values()) >= 5

        await fleet.wait_for(provisioning, what="clusters provisioning")
        fleet.kill("cloud_provisioner")
        await asyncio.sleep(0.5)
        fleet.start_service("cloud_provisioner")
        await asyncio.sleep(1.0)
        fleet.kill("cloud_provisioner")  # a second kill, at another instant of the chain
        fleet.start_service("cloud_provisioner")
        await fleet.wait_states(client, {"READY": TOTAL}, timeout=180)
    inventory = await fleet.sim_inventory()
    assert len(inventory) == TOTAL
    assert_no_duplicates(inventory)


@pytest.mark.fleet(replicas=2)
async def test_two_replicas_of_every_service_reach_the_same_end_state(fleet: Fleet):
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API ready")
        await apply_all(client)
        await fleet.wait_states(client, {"READY": TOTAL}, timeout=180)
        states = await fleet.states(client)
        assert set(states) == set().union(*(expected_ids(n, d["spec"]["count"]) for n, d in EXAMPLES.items()))
    inventory = await fleet.sim_inventory()
    assert len(inventory) == TOTAL
    assert_no_duplicates(inventory)
    ids = await fleet_event_ids(fleet)
    assert len(ids) == len(set(ids)), "an event id was published twice"


async def test_bad_input_is_rejected_and_the_services_keep_working(fleet: Fleet):
    base = copy.deepcopy(EXAMPLES["core-prod-aws-eu-west-1"])
    cases: list[tuple[dict, set[str]]] = []
    bad = copy.deepcopy(base); bad["metadata"]["location"]["cloud"] = "digitalocean"  # noqa: E702
    cases.append((bad, {"metadata.location.cloud"}))
    bad = copy.deepcopy(base); bad["spec"]["count"] = -1  # noqa: E702
    cases.append((bad, {"spec.count"}))
    bad = copy.deepcopy(base); bad["spec"]["features"] = ["warp-drive"]  # noqa: E702
    cases.append((bad, {"spec.features[0]"}))
    bad = copy.deepcopy(base); bad["spec"]["count"] = "two"; bad["spec"]["nodePools"][0]["maxCount"] = [1]  # noqa
    cases.append((bad, {"spec.count", "spec.nodePools[0].maxCount"}))
    bad = copy.deepcopy(base); bad["spec"]["padding"] = "x" * (5 * 1024 * 1024)  # noqa: E702
    cases.append((bad, {"(document)"}))
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API ready")
        for doc, fields in cases:
            result = await client.apply(doc)
            assert not result.accepted
            named = {e["field"] if isinstance(e, dict) else e.field for e in result.errors}
            assert fields <= named, (fields, result.errors)
        # Non-JSON bytes on the subject: dead-lettered; the planner moves on.
        bus = await connect_bus(fleet.settings, "e2e-bad", ensure_streams=False)
        await bus.js.publish(subjects.clusterset_applied("garbage"), b"\xff\xfe not json",
                             stream=subjects.STREAM_CLUSTERSETS)  # fmt: skip

        async def dead_lettered() -> bool:
            info = await bus.js.stream_info(subjects.STREAM_DEADLETTER)
            return info.state.messages >= 1

        await fleet.wait_for(dead_lettered, what="dead letter")
        await bus.close()
        # Nothing was created by the bad input, and a valid apply still goes READY.
        assert await fleet.states(client) == {}
        assert (await client.apply(base)).accepted
        await fleet.wait_states(client, {"READY": base["spec"]["count"]})
        # The API validates its queries too.
        import httpx

        async with httpx.AsyncClient(base_url=fleet.api_url) as http:
            r = await http.get("/v1/clusters", params={"state": "SLEEPING"})
            assert r.status_code == 422 and "SLEEPING" in r.text
            r = await http.get("/v1/clusters", params={"limit": "0"})
            assert r.status_code == 422
            r = await http.get("/v1/clusters/nope-0000")
            assert r.status_code == 404
            r = await http.get("/v1/clustersets/nope")
            assert r.status_code == 404


async def test_deletion_protection_refuses_retirement_until_the_mark_is_removed(fleet: Fleet):
    name = "core-prod-aws-eu-west-1"
    doc = copy.deepcopy(EXAMPLES[name])
    doc["metadata"]["protected"] = True
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API ready")
        assert (await client.apply(doc)).accepted
        await fleet.wait_states(client, {"READY": 2}, clusterset=name)
        refused = await client.delete(name)
        assert not refused.retired and refused.errors[0].field == "metadata.protected"
        smaller = copy.deepcopy(doc)
        smaller["spec"]["count"] = 1
        assert not (await client.apply(smaller)).accepted
        # Unprotect the set but protect one cluster: scale-down keeps that one.
        doc["metadata"]["protected"] = False
        assert (await client.apply(doc)).accepted
        keep = sorted(expected_ids(name, 2))[0]
        assert (await client.protect(keep)).accepted

        async def shown_protected() -> bool:
            view = await client.cluster(keep)
            return bool(view and view["protected"] is True)

        await fleet.wait_for(shown_protected, what="protection visible in the API")
        smaller["metadata"]["protected"] = False
        assert (await client.apply(smaller)).accepted
        final = await fleet.wait_states(client, {"READY": 1, "DELETED": 1}, clusterset=name)
        assert final[keep] == "READY"
        assert not (await client.delete(name)).retired
        assert (await client.protect(keep, protected=False)).accepted
        assert (await client.delete(name)).retired
        await fleet.wait_states(client, {"DELETED": 2}, clusterset=name)
        assert await fleet.sim_inventory() == {}


@pytest.mark.fleet(env_overrides={"FLOTILLA_SIM_LATENCY_S": "0.3"})
async def test_nats_restart_in_the_middle_of_a_run_converges(fleet: Fleet):
    """Every service's consumers recover from a NATS restart (reconnect, re-bind) and the run completes."""
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API ready")
        await apply_all(client)

        async def underway() -> bool:
            states = await fleet.states(client)
            return len(states) == TOTAL and any(s in ("PROVISIONING", "PROVISIONED") for s in states.values())

        await fleet.wait_for(underway, what="provisioning under way")
    assert fleet.nats
    fleet.nats.restart()
    async with fleet.client() as client:
        await fleet.wait_states(client, {"READY": TOTAL}, timeout=180)
    assert_no_duplicates(await fleet.sim_inventory())
