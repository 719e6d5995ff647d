"""status_projector against real nats-server and redis-server: projection, replay, rebuild, replicas, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.status_projector import core
from services.status_projector import testing as T
from services.status_projector.projector import Projector, _Item
from services.status_projector.rebuild import rebuild
from services.status_projector.store import ViewKeys, current_namespace, dump_views, pointer_key
from shared.bus import Bus
from shared.config import Settings
from shared.embedded import ServerProcess, free_port, service_env, start_service
from shared.events import Envelope, subjects
from shared.events.factory import subject_of
from tests.conftest import example_documents

DOCS = example_documents()
CS = T.parse(DOCS["modelserving-prod-aws-us-east-1"])
AZ = T.parse(DOCS["dataeng-staging-azure-westeurope"])
SM = T.parse(DOCS["core-prod-aws-eu-west-1"])


def history() -> list[Envelope]:
    """Two sets; three AWS clusters (one retired to DELETED) and one Azure cluster."""
    return [*T.fleet_history(CS, ["ms-1", "ms-2", "ms-3"], retired=["ms-3"]), *T.fleet_history(AZ, ["de-1"])]


async def publish(bus: Bus, events: list[Envelope]) -> None:
    for env in events:
        assert await bus.publish(env), f"{env.type} {env.id} was dropped as a duplicate"


async def project_history(bus: Bus, projector: Projector) -> list[Envelope]:
    """Publish `history()` and wait until the projector has applied all of it; returns the events."""
    events = history()
    await publish(bus, events)
    await projector.wait_for(len(events), 20)
    return events


def new_projector(bus: Bus, redis: Redis, settings: Settings, **kw: object) -> Projector:
    return Projector(bus, redis, settings.redis_prefix, idle_check_s=0.3, heartbeat_s=0.5, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def projector(bus: Bus, redis: Redis, settings: Settings) -> AsyncIterator[Projector]:
    p = new_projector(bus, redis, settings)
    await p.start()
    yield p
    await p.stop()


async def test_projects_a_realistic_history_exactly_like_the_pure_core(
    bus: Bus, redis: Redis, settings: Settings, projector: Projector
) -> None:
    events = await project_history(bus, projector)
    views = await dump_views(redis, settings.redis_prefix)

    # Every document is byte-for-byte what the pure core computes from the same sequence.
    expected = core.Views()
    for seq, env in enumerate(events, 1):
        core.apply(expected, seq, env)
    assert {k: v for k, v in views.items() if not k.startswith(("idx:", "sets"))} == expected.dump()

    ms1, ms3 = json.loads(views["cluster:ms-1"]), json.loads(views["cluster:ms-3"])
    assert ms1["state"] == "READY" and ms1["endpoint"] == "https://ms-1.example.aws.test"
    assert {s["state"] for s in ms1["infraServices"]} == {"INSTALLED"}
    assert ms3["state"] == "DELETED" and ms3["resources"] == {}
    assert json.loads(views["idx:state:READY"]) == ["de-1", "ms-1", "ms-2"]
    assert json.loads(views["idx:state:DELETED"]) == ["ms-3"]
    assert "idx:state:PROVISIONING" not in views  # emptied index sets disappear
    assert json.loads(views["idx:cloud:azure"]) == ["de-1"]
    assert json.loads(views["idx:clusterset:" + CS.metadata.name]) == ["ms-1", "ms-2", "ms-3"]
    assert json.loads(views["sets"]) == sorted([CS.metadata.name, AZ.metadata.name])
    types = [e["type"] for e in json.loads(views["history:cluster:ms-3"])]
    assert types[0] == "ClusterRequested" and types[-1] == "ClusterDeprovisioned"
    assert await redis.get(ViewKeys(settings.redis_prefix, "live").checkpoint) == str(len(events))
    assert projector.batches < len(events)  # applied in batches, not one transaction per event


async def test_replay_from_sequence_1_and_late_duplicates_change_nothing(
    bus: Bus, redis: Redis, settings: Settings
) -> None:
    events = history()
    await publish(bus, events)
    first = new_projector(bus, redis, settings)
    await first.start()
    await first.wait_for(len(events), 20)
    await first.stop()
    before = await dump_views(redis, settings.redis_prefix)

    # An exact repeat published after JetStream's duplicate window: a new stream sequence, the same event id.
    for env in events[5:8]:
        await bus.js.publish(subject_of(env), env.to_bytes(), stream=subjects.STREAM_FLEET,
                             headers={"Nats-Msg-Id": f"late-{env.id}"})  # fmt: skip
    # Reset the cursor to the first message: everything is delivered again.
    keys = ViewKeys(settings.redis_prefix, "live")
    await redis.set(keys.checkpoint, 0)
    again = new_projector(bus, redis, settings)
    await again.start()
    try:
        await again.wait_for(len(events) + 3, 20)
    finally:
        await again.stop()
    assert again.batches >= 1 and again.applied_events == 0
    assert await dump_views(redis, settings.redis_prefix) == before
    assert await redis.get(keys.checkpoint) == str(len(events) + 3)


async def test_rebuild_equals_the_live_views_and_the_switch_is_followed(
    bus: Bus, redis: Redis, settings: Settings, projector: Projector
) -> None:
    prefix = settings.redis_prefix
    events = await project_history(bus, projector)
    live = await dump_views(redis, prefix, "live")

    built = await rebuild(bus, redis, prefix, swap=False)
    # Not `built.events`: a batch whose EXEC went through but whose reply timed out (a loaded machine) is re-applied
    # as a no-op and not counted. The views below are what must be equal.
    assert built.previous is None and built.checkpoint == len(events)
    assert await current_namespace(redis, prefix) == "live"
    assert await dump_views(redis, prefix, built.namespace) == live

    switched = await rebuild(bus, redis, prefix, swap=True, grace_s=0)
    assert switched.previous == "live" and switched.namespace != built.namespace
    assert await redis.get(pointer_key(prefix)) == switched.namespace
    assert await dump_views(redis, prefix, "live") == {}  # the old namespace is deleted
    assert await dump_views(redis, prefix) == live

    # The running projector follows the switch and keeps projecting into the new namespace.
    more = T.provision(CS, T.accepted(CS), "ms-4", T.T0 + T.STEP * 600)
    await publish(bus, more)
    await projector.wait_for(len(events) + len(more), 20)
    assert projector.namespace == switched.namespace
    current = await dump_views(redis, prefix)
    assert json.loads(current["cluster:ms-4"])["state"] == "READY"
    fresh = await rebuild(bus, redis, prefix, swap=False)
    assert await dump_views(redis, prefix, fresh.namespace) == current


def rollout_history() -> list[Envelope]:
    """history(), then a fleet rollout over both sets: a rotation (surge clusters, drains, retirements) of the AWS
    set in a canary stage, an approval, a failed in-place update of the Azure set, a halt."""
    fleet = T.fleet_rollout_history("k131", (CS, ["ms-1", "ms-2"]), (AZ, ["de-1"]), T.T0 + T.STEP * 1000)
    return [*history(), *fleet]


async def test_rollouts_project_across_batches_and_replicas_like_the_pure_core(
    bus: Bus, redis: Redis, settings: Settings
) -> None:
    """Rollout documents are changed by set, cluster and fleet facts alike: small batches cut them in every way,
    two replicas race, and the result is still the pure core's, byte for byte, and a rebuild's."""
    prefix = settings.redis_prefix
    events = rollout_history()
    a = new_projector(bus, redis, settings, batch_size=4)
    b = new_projector(bus, redis, settings, batch_size=3, batch_window_s=0.001)
    await a.start()
    await b.start()
    try:
        for i in range(0, len(events), 7):
            await publish(bus, events[i:i + 7])
            await asyncio.sleep(0.005)
        await a.wait_for(len(events), 30)
    finally:
        await a.stop()
        await b.stop()
    views = await dump_views(redis, prefix)
    expected = core.Views()
    for seq, env in enumerate(events, 1):
        core.apply(expected, seq, env)
    assert {k: v for k, v in views.items() if not k.startswith(("idx:", "sets"))} == expected.dump()

    fleet = json.loads(views["fleetrollout:k131"])
    assert fleet["state"] == "HALTED" and [e["state"] for e in fleet["sets"]] == ["SUCCEEDED", "FAILED"]
    assert json.loads(views["rollout:k131-a"])["createdClusters"] == ["ms-1-v2", "ms-2-v2"]
    assert json.loads(views["idx:rollouts:all"]) == ["k131\tFleetRollout", "k131-a\tClusterSetRollout"]
    assert json.loads(views["idx:rollouts:state:HALTED"]) == ["k131\tFleetRollout"]
    assert json.loads(views[f"idx:rollouts:clusterset:{AZ.metadata.name}"]) == ["k131\tFleetRollout"]
    assert "idx:rollouts:state:IN_PROGRESS" not in views  # emptied as the rollouts moved on

    fresh = await rebuild(bus, redis, prefix, swap=False)
    assert await dump_views(redis, prefix, fresh.namespace) == views


def control_plane_history() -> list[Envelope]:
    """A self-managed set of three clusters; a migration pipeline (two at a time, budget 0) whose second cluster
    rolls back, halting it before the third; then an upgrade of the first cluster, one node at a time."""
    acc = T.accepted(SM)
    return [*T.fleet_history(SM, ["cp-1", "cp-2", "cp-3"]),
            *T.pipeline(SM, acc, "pl-1", ["cp-1", "cp-2", "cp-3"], T.T0 + T.STEP * 1000, fail=["cp-2"]),
            *T.upgrade(SM, acc, "cp-1", "up-1", T.T0 + T.STEP * 2000, to_version="1.30")]  # fmt: skip


async def test_control_plane_operations_project_across_batches_like_the_pure_core(
    bus: Bus, redis: Redis, settings: Settings
) -> None:
    """An operation's fact changes the operation, its cluster and its pipeline: small batches cut them apart, and
    the result is still the pure core's, byte for byte, with the /v1/migrations indexes, and a rebuild's."""
    prefix = settings.redis_prefix
    events = [*history(), *control_plane_history()]
    projector = new_projector(bus, redis, settings, batch_size=5)
    await projector.start()
    try:
        for i in range(0, len(events), 11):
            await publish(bus, events[i:i + 11])
            await asyncio.sleep(0.005)
        await projector.wait_for(len(events), 30)
    finally:
        await projector.stop()
    views = await dump_views(redis, prefix)
    expected = core.Views()
    for seq, env in enumerate(events, 1):
        core.apply(expected, seq, env)
    assert {k: v for k, v in views.items() if not k.startswith(("idx:", "sets"))} == expected.dump()

    pipeline, rolled_back = json.loads(views["migrationpipeline:pl-1"]), json.loads(views["migration:pl-1-cp-2"])
    assert pipeline["state"] == "HALTED" and [e["state"] for e in pipeline["clusters"]] == ["SUCCEEDED", "FAILED",
                                                                                            "PENDING"]  # fmt: skip
    assert rolled_back["state"] == "ROLLED_BACK" and len(rolled_back["timeline"]) == 11
    assert json.loads(views["cluster:cp-1"])["controlPlane"]["version"] == "1.30"
    assert json.loads(views["idx:migrations:all"]) == ["pl-1\tpipeline", "pl-1-cp-1\tmigration",
                                                       "pl-1-cp-2\tmigration", "up-1\tupgrade"]  # fmt: skip
    assert json.loads(views["idx:migrations:cluster:cp-1"]) == ["pl-1\tpipeline", "pl-1-cp-1\tmigration",
                                                                "up-1\tupgrade"]  # fmt: skip
    assert json.loads(views["idx:migrations:cluster:cp-3"]) == ["pl-1\tpipeline"]
    assert json.loads(views["idx:migrations:state:HALTED"]) == ["pl-1\tpipeline"]
    assert json.loads(views["idx:migrations:state:COMPLETED"]) == ["pl-1-cp-1\tmigration", "up-1\tupgrade"]
    assert "idx:migrations:state:IN_PROGRESS" not in views and "idx:migrations:state:REQUESTED" not in views

    fresh = await rebuild(bus, redis, prefix, swap=False)
    assert await dump_views(redis, prefix, fresh.namespace) == views


async def test_rebuild_refuses_the_served_namespace(bus: Bus, redis: Redis, settings: Settings) -> None:
    with pytest.raises(ValueError, match="being served"):
        await rebuild(bus, redis, settings.redis_prefix, namespace="live")


async def test_two_projectors_at_once_build_the_same_views(bus: Bus, redis: Redis, settings: Settings) -> None:
    prefix = settings.redis_prefix
    a = new_projector(bus, redis, settings, batch_size=7)
    b = new_projector(bus, redis, settings, batch_size=3, batch_window_s=0.001)
    await a.start()
    await b.start()
    try:
        events = history()
        for i in range(0, len(events), 9):  # in waves, so both race on every batch
            await publish(bus, events[i:i + 9])
            await asyncio.sleep(0.01)
        await a.wait_for(len(events), 20)
        await asyncio.sleep(0.3)
    finally:
        await a.stop()
        await b.stop()
    assert a.batches + b.batches > 0
    together = await dump_views(redis, prefix)
    alone = await rebuild(bus, redis, prefix, swap=False)
    assert await dump_views(redis, prefix, alone.namespace) == together


async def test_a_replica_behind_the_checkpoint_neither_writes_nor_moves_it_back(
    bus: Bus, redis: Redis, settings: Settings, projector: Projector
) -> None:
    """The race two replicas run on every batch, made deterministic: the loser's batch is already applied."""
    events = await project_history(bus, projector)
    await projector.stop()
    before = await dump_views(redis, settings.redis_prefix, include_checkpoint=True)
    keys = ViewKeys(settings.redis_prefix, "live")
    behind = new_projector(bus, redis, settings)
    items = [_Item(seq, env) for seq, env in enumerate(events[:10], 1)]
    await behind._apply(keys, items, sub_start=1)
    assert behind.checkpoint == len(events) and behind.batches == 0
    assert await dump_views(redis, settings.redis_prefix, include_checkpoint=True) == before
    # Part of a batch beyond the checkpoint: only that part is applied.
    more = T.provision(CS, T.accepted(CS), "ms-9", T.T0)[:2]
    await publish(bus, more)
    items = [_Item(seq, env) for seq, env in enumerate([*events[-3:], *more], len(events) - 2)]
    await behind._apply(keys, items, sub_start=1)
    assert behind.checkpoint == len(events) + 2 and behind.applied_events == 2
    assert json.loads((await dump_views(redis, settings.redis_prefix))["cluster:ms-9"])["state"] == "PROVISIONING"


async def project_across_a_restart(bus: Bus, projector: Projector, restart: Callable[[], object]) -> int:
    """Publish `history()` in two halves with `restart()` in between; return once all of it is projected.

    Returns the projector's subscription count from just before the restart.
    """
    events = history()
    half = len(events) // 2
    await publish(bus, events[:half])
    await projector.wait_for(half, 20)
    subscriptions = projector.subscriptions
    restart()
    await publish(bus, events[half:])  # the bus retries until the server is back
    await projector.wait_for(len(events), 30)
    return subscriptions


async def assert_a_rebuild_equals_the_live_views(bus: Bus, redis: Redis, settings: Settings) -> None:
    live = await dump_views(redis, settings.redis_prefix)
    fresh = await rebuild(bus, redis, settings.redis_prefix, swap=False)
    assert await dump_views(redis, settings.redis_prefix, fresh.namespace) == live


async def test_recovers_after_a_nats_restart(
    bus: Bus, redis: Redis, settings: Settings, nats_proc: ServerProcess, projector: Projector
) -> None:
    subscriptions = await project_across_a_restart(bus, projector, nats_proc.restart)
    assert projector.subscriptions > subscriptions
    await assert_a_rebuild_equals_the_live_views(bus, redis, settings)


async def test_recovers_after_a_redis_restart(
    bus: Bus, redis: Redis, settings: Settings, redis_proc: ServerProcess, projector: Projector
) -> None:
    await project_across_a_restart(bus, projector, redis_proc.restart)  # AOF keeps the views, as in a deployment
    await assert_a_rebuild_equals_the_live_views(bus, redis, settings)


async def test_a_gap_in_delivery_resubscribes_and_deleted_messages_are_tolerated(
    bus: Bus, redis: Redis, settings: Settings
) -> None:
    """A jump in stream sequences makes the projector start over from its checkpoint; a message that was
    deleted from the stream (a real hole) is then skipped instead of looping forever."""
    events = history()[:12]
    await publish(bus, events)
    await bus.js.delete_msg(subjects.STREAM_FLEET, 6)
    p = new_projector(bus, redis, settings)
    await p.start()
    try:
        await p.wait_for(len(events), 20)
    finally:
        await p.stop()
    assert p.subscriptions == 2
    expected = core.Views()
    for seq, env in enumerate(events, 1):
        if seq != 6:
            core.apply(expected, seq, env)
    views = await dump_views(redis, settings.redis_prefix)
    assert {k: v for k, v in views.items() if not k.startswith(("idx:", "sets"))} == expected.dump()


async def test_undecodable_messages_are_skipped_and_checkpointed(
    bus: Bus, redis: Redis, settings: Settings, projector: Projector
) -> None:
    events = history()[:3]
    await publish(bus, events[:1])
    await bus.js.publish("fleet.garbage.aws.x.y", b"\x00not json", stream=subjects.STREAM_FLEET)
    await publish(bus, events[1:])
    await projector.wait_for(4, 20)
    views = await dump_views(redis, settings.redis_prefix)
    assert json.loads(views["applied"]) == {events[0].id: "1", events[1].id: "3", events[2].id: "4"}


async def test_the_process_serves_projects_and_stops_on_sigterm(
    nats_proc: ServerProcess, redis_proc: ServerProcess, bus: Bus, tmp_path: Path
) -> None:
    port = free_port()
    env = service_env(nats_proc.port, redis_proc.port, FLOTILLA_API_PORT=str(port), FLOTILLA_LOG_LEVEL="INFO")
    proc = start_service("status_projector", env, tmp_path / "logs")
    base = f"http://127.0.0.1:{port}"
    try:
        events = history()
        await publish(bus, events)
        async with httpx.AsyncClient(base_url=base, timeout=2) as client:
            deadline = time.monotonic() + 30
            ready: dict = {}
            while time.monotonic() < deadline:
                try:
                    r = await client.get("/readyz")
                    ready = r.json()
                    if r.status_code == 200 and ready["projector"]["lag"] == 0:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            assert ready.get("ready") and ready["projector"]["checkpoint"] == len(events), ready
            r = await client.get("/v1/clusters", params={"state": "READY"})
            assert r.status_code == 200, r.text
            assert [c["id"] for c in r.json()["items"]] == ["de-1", "ms-1", "ms-2"]
            assert (await client.get("/openapi.json")).status_code == 200
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "logs" / "status_projector.log").read_text()
    assert f"listening on http://127.0.0.1:{port}" in log
