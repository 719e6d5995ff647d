"""Fleet rollouts against real nats-server and redis-server: the rotation service's fleet subscriptions and timer
job in-process on the shared runtime, with the test playing the planner (it answers every ClusterSetPatchRequested
with ClusterSetConverged, or ClusterSetUpdateFailed for one chosen set)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from redis.asyncio import Redis

from services.rotation.catalog import DURABLE as CATALOG_DURABLE
from services.rotation.catalog import CatalogEntry, SetCatalog
from services.rotation.fleet import FleetState
from services.rotation.fleet_app import (
    FACTS_DURABLE,
    INTENTS_DURABLE,
    fleet_key,
    fleet_subscriptions,
    fleet_ticks_every,
)
from shared.bus import Bus, IdempotentConsumer
from shared.config import Settings
from shared.events import Envelope, Location, new_event, subjects
from shared.events.clusterset import UpdateStrategy
from shared.events.factory import payload_as
from shared.events.models import (
    ClusterSetAccepted,
    ClusterSetConverged,
    ClusterSetPatchRequested,
    ClusterSetRetired,
    ClusterSetUpdateFailed,
    FleetRolloutApproved,
    FleetRolloutRequested,
    FleetSelector,
    FleetStage,
)
from shared.service import ServiceContext, open_context
from tests.helpers import PLAIN, consumer_drained, example_spec, fleet_events, wait_until

RID = "k8s-131"
SPEC = example_spec(PLAIN)
SETS = {  # name -> (env, region)
    "ms-dev-use1": ("dev", "us-east-1"),
    "ms-prod-euc1": ("prod", "eu-central-1"),
    "ms-prod-euw1": ("prod", "eu-west-1"),
    "ms-prod-use1": ("prod", "us-east-1"),
    "ms-prod-use2": ("prod", "us-east-2"),
    "ms-prod-usw2": ("prod", "us-west-2"),
}
FAILING = "ms-prod-use1"
CANARY_SOAK, EU_SOAK = 1.0, 0.5


def accepted(name: str, generation: int = 1, cluster_type: str = "ModelServing") -> Envelope:
    env, region = SETS.get(name, ("prod", "us-east-1"))
    return new_event(ClusterSetAccepted(
        clusterset=name, location=Location(env=env, cloud="aws", region=region), generation=generation,
        document_hash=f"d{generation}", cluster_type=cluster_type, count=2, config_hash=SPEC.config_hash(), spec=SPEC,
        update_strategy=UpdateStrategy(type="cluster-rotation", max_surge=1),  # type: ignore[call-arg]
    ), source="planner")  # fmt: skip


def retired(name: str, generation: int) -> Envelope:
    location = Location(env="prod", cloud="aws", region="us-east-1")
    return new_event(ClusterSetRetired(clusterset=name, location=location, generation=generation, clusters=[]),
                     source="planner")  # fmt: skip


def user(payload: Any) -> Envelope:
    return new_event(payload, source="cli")


@dataclass
class FakePlanner:
    """Answers each patch the way the planner eventually would, and notes when each one arrived."""

    bus: Bus
    failing: set[str]
    seen: list[str] = field(default_factory=list)

    async def run(self) -> None:
        sub = await self.bus.js.pull_subscribe(subjects.fleet_filter(ClusterSetPatchRequested.type_name()),
                                               stream=subjects.STREAM_FLEET)  # fmt: skip
        try:
            while True:
                try:
                    msgs = await sub.fetch(10, timeout=0.2)
                except Exception:
                    continue
                for msg in msgs:
                    await self.answer(Envelope.from_bytes(msg.data))
                    await msg.ack()
        finally:  # a leftover pull subscription would hold up closing the connection
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 2)

    async def answer(self, env: Envelope) -> None:
        patch = payload_as(env, ClusterSetPatchRequested)
        self.seen.append(patch.clusterset)
        common = dict(clusterset=patch.clusterset, location=patch.location, generation=2, config_hash="newhash",
                      fleet_rollout_id=patch.fleet_rollout_id)  # fmt: skip
        if patch.clusterset in self.failing:
            outcome: Any = ClusterSetUpdateFailed(**common, cluster_ids=[f"{patch.clusterset}-1"],  # type: ignore[arg-type]
                                                  reason="node pool update failed")  # fmt: skip
        else:
            outcome = ClusterSetConverged(**common, count=2)  # type: ignore[arg-type]
        await self.bus.publish(new_event(outcome, source="planner", cause=env))


@dataclass
class Running:
    ctx: ServiceContext
    consumers: list[IdempotentConsumer[Any]]
    planner: FakePlanner


@contextlib.asynccontextmanager
async def rotation_fleet(settings: Settings, bus: Bus, failing: set[str]) -> AsyncIterator[Running]:
    """The fleet part of the rotation service (its subscriptions, the catalog and a fast timer job) plus the fake
    planner."""
    ctx = await open_context("rotation", settings)
    consumers = [IdempotentConsumer(ctx.bus, ctx.store, "rotation", s) for s in fleet_subscriptions(ctx)]
    for c in consumers:
        await c.start()
    planner = FakePlanner(bus, failing)
    tasks = [asyncio.create_task(job(ctx, consumers)) for job in (fleet_ticks_every(0.1),)]
    tasks.append(asyncio.create_task(planner.run()))
    try:
        yield Running(ctx, consumers, planner)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in consumers))
        await ctx.bus.close()
        await ctx.redis.aclose()


async def rollout_events(bus: Bus) -> list[Envelope]:
    return [e for e in await fleet_events(bus, source="rotation")
            if e.subject == RID or e.data.get("fleet_rollout_id") == RID]  # fmt: skip


def of_type(events: list[Envelope], type_name: str) -> list[Envelope]:
    return [e for e in events if e.type == type_name]


async def has(bus: Bus, type_name: str, **data: Any) -> bool:
    return any(all(e.data.get(k) == v for k, v in data.items()) for e in of_type(await rollout_events(bus), type_name))


async def test_a_staged_rollout_respects_order_soak_approval_and_halts_on_the_failure_budget(
    settings: Settings, bus: Bus, redis: Redis
) -> None:
    async with rotation_fleet(settings, bus, failing={FAILING}) as run:
        # The catalog: six sets of the type, one of another type, one that was retired.
        for name in SETS:
            await bus.publish(accepted(name))
        await bus.publish(accepted("core-prod-use1", cluster_type="Core"))
        await bus.publish(accepted("ms-prod-gone"))
        # The set rotation consumer of the same service handles ClusterSetRetired too (and may come first):
        # ledger entries are per durable consumer, so the retirement still reaches the catalog.
        retirement = retired("ms-prod-gone", 1)
        await run.ctx.store.commit("set:ms-prod-gone", 0, None, f"rotation:{retirement.id}", [])
        await bus.publish(retirement)
        catalog = SetCatalog(redis, settings.redis_prefix)
        await wait_until(lambda: _catalog_names(catalog, {*SETS, "core-prod-use1"}))

        request = user(FleetRolloutRequested(
            rollout_id=RID, cluster_type="ModelServing", patch={"kubernetesVersion": "1.31"}, max_in_flight=2,
            failure_budget=0, stages=[
                FleetStage(name="canary", selector=FleetSelector(envs=["dev"]), soak_seconds=CANARY_SOAK),
                FleetStage(name="eu", selector=FleetSelector(regions=["eu-west-1", "eu-central-1"]),
                           soak_seconds=EU_SOAK, approval=True),
                FleetStage(name="rest"),
            ]))  # fmt: skip
        await bus.publish(request)

        # canary, its soak, then the approval gate of "eu": nothing of "eu" starts without the approval.
        await wait_until(lambda: has(bus, "FleetRolloutAwaitingApproval", stage="eu"), within=10)
        await asyncio.sleep(0.5)
        assert run.planner.seen == ["ms-dev-use1"]
        await bus.publish(user(FleetRolloutApproved(rollout_id=RID, stage="eu", approver="alice")))

        # "rest" starts on its own after the eu soak (the timer job); its first set fails: budget 0 -> halt.
        await wait_until(lambda: has(bus, "FleetRolloutHalted"), within=10)
        await wait_until(lambda: has(bus, "FleetRolloutSetFinished", clusterset="ms-prod-use2"), within=10)
        await wait_until(lambda: _drained(bus))
        events = await rollout_events(bus)

    # Stage order, and every stage started only after the previous one's soak.
    started = of_type(events, "FleetRolloutStarted")
    assert [(s["name"], s["clustersets"]) for s in started[0].data["stages"]] == [
        ("canary", ["ms-dev-use1"]), ("eu", ["ms-prod-euc1", "ms-prod-euw1"]),
        ("rest", ["ms-prod-use1", "ms-prod-use2", "ms-prod-usw2"])]  # fmt: skip
    stage_started = {e.data["stage"]: e for e in of_type(events, "FleetRolloutStageStarted")}
    stage_completed = {e.data["stage"]: e for e in of_type(events, "FleetRolloutStageCompleted")}
    assert list(stage_started) == ["canary", "eu", "rest"] and list(stage_completed) == ["canary", "eu"]
    canary_done, eu_done = stage_completed["canary"], stage_completed["eu"]
    waiting = of_type(events, "FleetRolloutAwaitingApproval")[0]
    assert waiting.time - canary_done.time >= timedelta(seconds=CANARY_SOAK)
    assert stage_started["rest"].time - eu_done.time >= timedelta(seconds=EU_SOAK)
    assert stage_started["eu"].time >= waiting.time
    # Patches went out stage by stage; the third "rest" set was never started after the halt.
    patches = [e.data["clusterset"] for e in of_type(events, "ClusterSetPatchRequested")]
    assert patches == ["ms-dev-use1", "ms-prod-euc1", "ms-prod-euw1", "ms-prod-use1", "ms-prod-use2"]
    halted = of_type(events, "FleetRolloutHalted")[0]
    assert halted.data["failed_sets"] == [FAILING]
    finished = {e.data["clusterset"]: e.data["succeeded"] for e in of_type(events, "FleetRolloutSetFinished")}
    assert finished == {"ms-dev-use1": True, "ms-prod-euc1": True, "ms-prod-euw1": True, FAILING: False,
                        "ms-prod-use2": True}  # the set in flight at the halt still reported  # fmt: skip
    assert not of_type(events, "FleetRolloutCompleted")
    assert len({e.id for e in events}) == len(events)

    # The stored state agrees; and the whole thing again (the request re-sent, then every consumer replayed from
    # the start of its stream) changes nothing and publishes nothing new.
    before = [e.id for e in await fleet_events(bus)]
    for durable, stream in ((INTENTS_DURABLE, subjects.STREAM_CLUSTERSETS), (FACTS_DURABLE, subjects.STREAM_FLEET),
                            (CATALOG_DURABLE, subjects.STREAM_FLEET)):  # fmt: skip
        await bus.js.delete_consumer(stream, durable)
    await bus.publish_raw(subjects.fleet_rollout_intent(RID), request.to_bytes(), {"Nats-Msg-Id": "again"},
                          subjects.STREAM_CLUSTERSETS)  # fmt: skip
    async with rotation_fleet(settings, bus, failing={FAILING}) as run:
        await wait_until(lambda: _drained(bus))
        await asyncio.sleep(0.3)  # a few timer passes
        state, _ = await run.ctx.store.load(fleet_key(RID), FleetState)
        assert state is not None and state.status == "halted"
        assert state.with_status("pending") == ["ms-prod-usw2"] and state.with_status("failed") == [FAILING]
    assert [e.id for e in await fleet_events(bus)] == before


async def _catalog_names(catalog: SetCatalog, expected: set[str]) -> bool:
    return set(await catalog.snapshot()) == expected


async def _drained(bus: Bus) -> bool:
    return all([await consumer_drained(bus, INTENTS_DURABLE, subjects.STREAM_CLUSTERSETS),
                await consumer_drained(bus, FACTS_DURABLE), await consumer_drained(bus, CATALOG_DURABLE)])


async def test_the_catalog_keeps_the_newest_generation_and_a_retirement_is_final(settings: Settings,
                                                                                 redis: Redis) -> None:  # fmt: skip
    catalog = SetCatalog(redis, settings.redis_prefix)
    entry = CatalogEntry.from_accepted(payload_as(accepted("ms-dev-use1", generation=2), ClusterSetAccepted))
    assert await catalog.put(entry)
    assert not await catalog.put(entry)  # the same generation again
    assert not await catalog.put(entry.model_copy(update={"generation": 1, "count": 9}))  # older
    assert await catalog.put(entry.model_copy(update={"generation": 3, "count": 4}))
    assert (await catalog.snapshot())["ms-dev-use1"].count == 4
    assert await catalog.retire("ms-dev-use1", 3)
    assert not await catalog.put(entry.model_copy(update={"generation": 3}))  # a late copy cannot revive it
    assert await catalog.snapshot() == {}
    assert await catalog.put(entry.model_copy(update={"generation": 4}))  # re-applied after the delete
    assert list(await catalog.snapshot()) == ["ms-dev-use1"]
    assert await redis.exists(f"{settings.redis_prefix}:rotation:catalog")
