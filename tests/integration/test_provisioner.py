"""cloud_provisioner against real nats-server and redis-server, with the Redis-backed sim cloud.

The service runs in-process (its own consumers on its own connections) or, for the crash
test, as a real `python -m services.cloud_provisioner` process that is SIGKILLed mid-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cloud_provisioner import core
from services.cloud_provisioner.app import DURABLE, SERVICE, Provisioner
from services.cloud_provisioner.core import ProvisionerState
from services.cloud_provisioner.providers import build_registry
from services.cloud_provisioner.providers.base import TAG_CLUSTER, ClusterContext
from services.cloud_provisioner.providers.sim import SimProvider
from services.cloud_provisioner.providers.simcloud import SimCloud
from shared.bus import Bus, IdempotentConsumer
from shared.config import Settings
from shared.embedded import ServerProcess, service_env, start_service
from shared.events import Envelope, subjects
from shared.events.factory import payload_as, subject_of
from shared.events.models import PROVISION_STEPS, ClusterProvisioned, ClusterProvisioningFailed, ClusterRequested
from shared.service import ServiceContext, open_context, redis_client
from tests.conftest import make_settings
from tests.helpers import (
    BYON,
    GCP,
    PLAIN,
    consumer_drained,
    fleet_events,
    request_envelope,
    retirement_envelope,
    wait_until,
)

ALL_KINDS = ("network", "cluster", "node_pool", "iam_role", "log_stream")


# ---------------------------------------------------------------- helpers
async def ours(bus: Bus, cluster_id: str | None = None) -> list[Envelope]:
    """What the provisioner emitted (about one cluster), in stream order."""
    return await fleet_events(bus, source=SERVICE, aggregate=cluster_id)


async def wait_for_type(bus: Bus, event_type: str, cluster_ids: list[str], within: float = 20.0) -> None:
    async def done() -> bool:
        seen = {e.subject for e in await ours(bus) if e.type == event_type}
        return set(cluster_ids) <= seen

    await wait_until(done, within)


async def drained(bus: Bus) -> bool:
    return await consumer_drained(bus, DURABLE)


def per_cluster(kinds: dict[str, int] | None = None, pools: int = 1, byon: bool = False) -> dict[str, int]:
    out = {k: 1 for k in ALL_KINDS} | {"node_pool": pools} | (kinds or {})
    if byon:
        out.pop("network")
    return out


@dataclass
class Running:
    ctx: ServiceContext
    consumers: list[IdempotentConsumer[ProvisionerState]]
    sim: SimCloud

    async def state(self, cluster_id: str) -> ProvisionerState | None:
        return (await self.ctx.store.load(cluster_id, ProvisionerState))[0]


@contextlib.asynccontextmanager
async def provisioner(settings: Settings, max_deliver: int | None = None) -> AsyncIterator[Running]:
    """The service in-process: what `serve(SPEC)` starts, minus signal handling."""
    ctx = await open_context(SERVICE, settings)
    sub = Provisioner(build_registry(settings, ctx.redis)).subscription(**({"max_deliver": max_deliver}
                                                                            if max_deliver else {}))  # fmt: skip
    consumers = [IdempotentConsumer(ctx.bus, ctx.store, SERVICE, sub)]
    for c in consumers:
        await c.start()
    try:
        yield Running(ctx, consumers, SimCloud.from_settings(ctx.redis, settings))
    finally:
        for c in consumers:
            await c.stop()
        await ctx.bus.close()
        await ctx.redis.aclose()


# ---------------------------------------------------------------- tests
async def test_provisions_every_step_once_and_repeats_change_nothing(settings: Settings, bus: Bus) -> None:
    req = request_envelope(PLAIN)
    cid = req.subject
    async with provisioner(settings) as svc:
        await bus.publish(req)
        await wait_for_type(bus, "ClusterProvisioned", [cid])
        events = await ours(bus, cid)
        assert [e.type for e in events] == ["ClusterResourceProvisioned"] * 5 + ["ClusterProvisioned"]
        assert [e.data["step"] for e in events[:5]] == list(PROVISION_STEPS)
        assert all(e.correlation_id == req.correlation_id for e in events)  # one trace per cluster lifecycle
        prov = ClusterProvisioned.model_validate(events[-1].data)
        assert prov.credential_ref == f"sim://{cid}" and prov.endpoint.startswith("https://")
        assert prov.network.owned and prov.network.network_id.startswith("vpc-") and len(prov.network.subnet_ids) == 3
        assert set(prov.resources) == set(PROVISION_STEPS)
        assert prov.subject() == f"fleet.cluster_provisioned.aws.us-east-1.{cid}"
        assert await svc.sim.inventory() == {cid: per_cluster()}
        before_stats = await svc.sim.stats()

        # The same request again: JetStream dedup (same Nats-Msg-Id), the ledger (another msg id, same
        # event id), and the state guard (the planner re-emitting it with a new event id).
        assert not await bus.publish(req)
        await bus.publish_raw(subject_of(req), req.to_bytes(), {"Nats-Msg-Id": "again-1"}, subjects.STREAM_FLEET)
        await bus.publish(request_envelope(PLAIN))
        await wait_until(lambda: drained(bus))
        assert [e.id for e in await ours(bus, cid)] == [e.id for e in events]
        assert await svc.sim.stats() == before_stats and await svc.sim.inventory() == {cid: per_cluster()}

    # Replay proof: reset the consumer to the stream's first message and re-deliver everything,
    # first with the ledger, then without it (expired): the state guards alone must hold.
    for forget_ledger in (False, True):
        await bus.js.delete_consumer(subjects.STREAM_FLEET, DURABLE)
        async with provisioner(settings) as svc:
            if forget_ledger:
                await svc.consumers[0].stop()
                ledger = [k async for k in svc.ctx.redis.scan_iter(match=f"*{{{SERVICE}}}:ledger:*")]
                assert ledger
                await svc.ctx.redis.delete(*ledger)
                await bus.js.delete_consumer(subjects.STREAM_FLEET, DURABLE)
                await svc.consumers[0].start()
            await wait_until(lambda: drained(bus))
            assert [e.id for e in await ours(bus, cid)] == [e.id for e in events]
            assert await svc.sim.stats() == before_stats


async def test_retirement_removes_everything_and_leaves_a_byon_network_alone(settings: Settings, bus: Bus) -> None:
    reqs = [request_envelope(PLAIN), request_envelope(BYON), request_envelope(GCP)]
    ids = [r.subject for r in reqs]
    async with provisioner(settings) as svc:
        for r in reqs:
            await bus.publish(r)
        await wait_for_type(bus, "ClusterProvisioned", ids)
        assert await svc.sim.inventory() == {
            ids[0]: per_cluster(), ids[1]: per_cluster(pools=3, byon=True), ids[2]: per_cluster(),
        }  # fmt: skip
        byon = ClusterProvisioned.model_validate([e for e in await ours(bus, ids[1])][-1].data)
        assert byon.network.owned is False and byon.network.subnet_ids == ["snet-a", "snet-b"]
        assert byon.network.network_id.endswith("/virtualNetworks/shared-vnet")

        for r in reqs:
            await bus.publish(retirement_envelope(r))
        await wait_for_type(bus, "ClusterDeprovisioned", ids)
        assert await svc.sim.inventory() == {}
        for cid in ids:
            steps = [e.data["step"] for e in await ours(bus, cid) if e.type == "ClusterResourceDeprovisioned"]
            expected = [s for s in reversed(PROVISION_STEPS) if not (cid == ids[1] and s == "network")]
            assert steps == expected
        stats = await svc.sim.stats()
        assert stats["created:network"] == 2 and stats.get("deleted:network") == 2  # never the byon one
        state = await svc.state(ids[0])
        assert state is not None and state.target == "absent" and state.deprovisioned and state.resources == {}


async def test_retirement_of_an_unknown_cluster_is_swept_then_deprovisioned(settings: Settings, bus: Bus) -> None:
    req = request_envelope(PLAIN, "ghost")
    async with provisioner(settings) as svc:
        await bus.publish(retirement_envelope(req))
        await wait_for_type(bus, "ClusterDeprovisioned", [req.subject])
        await bus.publish(req)  # a late request for it: ignored
        await wait_until(lambda: drained(bus))
        events = await ours(bus, req.subject)
        assert [e.type for e in events] == ["ClusterResourceDeprovisioned"] * 5 + ["ClusterDeprovisioned"]
        assert [e.data["step"] for e in events[:5]] == list(reversed(PROVISION_STEPS))
        assert await svc.sim.inventory() == {} and await svc.sim.stats() == {}  # looked up, nothing found


def crashed_request_context(req: Envelope) -> ClusterContext:
    """What the provisioner's first handling of `req` acted with (no step recorded yet)."""
    payload = payload_as(req, ClusterRequested)
    return ClusterContext(cluster_id=payload.cluster_id, clusterset=payload.clusterset, location=payload.location,
                          spec=payload.spec)  # fmt: skip


async def test_retirement_deletes_the_network_of_a_request_that_crashed_before_its_commit(
    settings: Settings, bus: Bus
) -> None:
    """The first handling of a request created the network and died before committing anything; the
    retirement is handled before the request is redelivered: the provisioner has no record of the cluster."""
    req = request_envelope(PLAIN, "crashed")
    cid = req.subject
    async with provisioner(settings) as svc:
        # What that handling left behind: the network, made by the provider itself (same name, tags, token).
        await SimProvider(svc.sim).ensure("network", crashed_request_context(req))
        assert await svc.sim.inventory() == {cid: {"network": 1}}
        await bus.publish(retirement_envelope(req))
        await wait_for_type(bus, "ClusterDeprovisioned", [cid])
        assert await svc.sim.inventory() == {}
        events = await ours(bus, cid)
        assert [e.type for e in events] == ["ClusterResourceDeprovisioned"] * 5 + ["ClusterDeprovisioned"]
        assert [e.data["step"] for e in events[:5]] == list(reversed(PROVISION_STEPS))
        stats = await svc.sim.stats()
        assert stats == {"created:network": 1, "deleted:network": 1}

        await bus.publish(req)  # the redelivered request: the cluster is retired, nothing is created
        await wait_until(lambda: drained(bus))
        assert await svc.sim.inventory() == {} and await svc.sim.stats() == stats
        assert [e.id for e in await ours(bus, cid)] == [e.id for e in events]


async def test_sweeping_an_unknown_byon_cluster_leaves_its_network_alone(settings: Settings, bus: Bus) -> None:
    """Without a spec the sweep cannot know the cluster brings its own network; it looks for one by our
    cluster-id tag, which a network we adopt never carries, so the user's network survives."""
    req = request_envelope(BYON, "ghost")
    cid = req.subject
    async with provisioner(settings) as svc:
        users = await svc.sim.create("network", "shared-vnet", tags={"Name": "shared-vnet", "team": "dataeng"})
        await bus.publish(retirement_envelope(req))
        await wait_for_type(bus, "ClusterDeprovisioned", [cid])
        await bus.publish(req)  # a late request for it: ignored
        await wait_until(lambda: drained(bus))
        steps = [e.data["step"] for e in await ours(bus, cid) if e.type == "ClusterResourceDeprovisioned"]
        assert "network" in steps  # it was looked for ...
        assert [(r.id, r.status) for r in await svc.sim.resources()] == [(users.id, "ACTIVE")]  # ... and not found
        assert TAG_CLUSTER not in users.tags
        assert await svc.sim.stats() == {"created:network": 1}


async def test_retirement_mid_way_converges_to_nothing(nats_proc: ServerProcess, redis_proc: ServerProcess,
                                                       bus: Bus) -> None:  # fmt: skip
    slow = make_settings(nats_proc.port, redis_proc.port, sim_latency_s=0.15, sim_latency_jitter=0.3)
    reqs = [request_envelope(PLAIN, f"m{i}") for i in range(3)]
    ids = [r.subject for r in reqs]
    async with provisioner(slow) as svc:
        for r in reqs:
            await bus.publish(r)

        async def started(cid: str, steps: int) -> bool:
            return sum(e.type == "ClusterResourceProvisioned" for e in await ours(bus, cid)) >= steps

        # Retire each at a different point: right away, after one step, after three.
        await bus.publish(retirement_envelope(reqs[0]))
        await wait_until(lambda: started(ids[1], 1))
        await bus.publish(retirement_envelope(reqs[1]))
        await wait_until(lambda: started(ids[2], 3))
        await bus.publish(retirement_envelope(reqs[2]))
        await wait_for_type(bus, "ClusterDeprovisioned", ids)
        await wait_until(lambda: drained(bus))
        await asyncio.sleep(0.5)  # nothing in flight may complete later and leave something behind
        assert await svc.sim.inventory() == {}
        for cid in ids:
            types = [e.type for e in await ours(bus, cid)]
            assert "ClusterProvisioned" not in types and types[-1] == "ClusterDeprovisioned"
            state = await svc.state(cid)
            assert state is not None and core.remaining_steps(state) == []


async def test_terminal_fault_fails_the_cluster_and_retirement_still_cleans_up(settings: Settings, bus: Bus) -> None:
    req = request_envelope(PLAIN, "quota")
    cid = req.subject
    async with provisioner(settings) as svc:
        await svc.sim.add_fault(kind="cluster", name_prefix=cid, code="QuotaExceeded", retryable=False)
        await bus.publish(req)
        await wait_for_type(bus, "ClusterProvisioningFailed", [cid])
        failed = ClusterProvisioningFailed.model_validate((await ours(bus, cid))[-1].data)
        assert (failed.operation, failed.step, failed.code, failed.retryable) == ("provision", "cluster",
                                                                                "QuotaExceeded", False)  # fmt: skip
        await wait_until(lambda: drained(bus))
        assert await svc.sim.inventory() == {cid: {"network": 1, "iam_role": 1}}
        assert (await svc.sim.stats())["faulted:create:cluster"] == 1  # not retried
        await bus.publish(retirement_envelope(req))
        await wait_for_type(bus, "ClusterDeprovisioned", [cid])
        assert await svc.sim.inventory() == {}


async def test_retryable_fault_is_retried_then_recorded_when_exhausted(settings: Settings, bus: Bus) -> None:
    req = request_envelope(PLAIN, "flaky")
    cid = req.subject
    async with provisioner(settings, max_deliver=4) as svc:
        # Fails a few times, then works: retried transparently.
        await svc.sim.add_fault(kind="iam_role", op="create", code="InternalError", retryable=True, times=5)
        await bus.publish(req)
        await wait_for_type(bus, "ClusterProvisioned", [cid])
        assert await svc.sim.inventory() == {cid: per_cluster()}

        other = request_envelope(PLAIN, "broken")
        await svc.sim.add_fault(kind="log_stream", name_prefix=other.subject, code="ServiceUnavailable",
                                retryable=True)  # fmt: skip
        await bus.publish(other)
        await wait_for_type(bus, "ClusterProvisioningFailed", [other.subject])
        failed = ClusterProvisioningFailed.model_validate((await ours(bus, other.subject))[-1].data)
        assert (failed.step, failed.code, failed.retryable) == ("log_stream", "ServiceUnavailable", True)
        dead = await bus.js.stream_info(subjects.STREAM_DEADLETTER)
        assert dead.state.messages == 1
        # Once the cloud recovers, asking again finishes the job.
        await svc.sim.clear_faults()
        await bus.publish(request_envelope(PLAIN, "broken"))
        await wait_for_type(bus, "ClusterProvisioned", [other.subject])
        assert (await svc.sim.inventory())[other.subject] == per_cluster()


async def test_throttling_still_converges(nats_proc: ServerProcess, redis_proc: ServerProcess, bus: Bus) -> None:
    noisy = make_settings(nats_proc.port, redis_proc.port, sim_throttle_rate=0.3, sim_failure_rate=0.05, sim_seed=42,
                          sim_latency_s=0.02)  # fmt: skip
    reqs = [request_envelope(name, "t") for name in (PLAIN, BYON, GCP)] + [
        request_envelope(PLAIN, f"t{i}") for i in range(3)
    ]
    ids = [r.subject for r in reqs]
    async with provisioner(noisy) as svc:
        for r in reqs:
            await bus.publish(r)
        await wait_for_type(bus, "ClusterProvisioned", ids, within=60)
        calm = SimCloud(svc.ctx.redis, noisy.redis_prefix)
        inventory = await calm.inventory()
        for cid in ids:
            assert inventory[cid] == per_cluster(pools=3 if BYON in cid else 1, byon=BYON in cid)
        stats = await calm.stats()
        assert sum(v for k, v in stats.items() if k.startswith("throttled:")) > 5
        for r in reqs:
            await bus.publish(retirement_envelope(r))
        await wait_for_type(bus, "ClusterDeprovisioned", ids, within=60)
        assert await calm.inventory() == {}
        steps = Counter((e.subject, e.data["step"]) for e in await ours(bus) if e.type == "ClusterResourceProvisioned")
        assert set(steps.values()) == {1}


@pytest.mark.slow
async def test_sigkill_mid_way_resumes_without_duplicates(nats_proc: ServerProcess, redis_proc: ServerProcess,
                                                          bus: Bus, tmp_path: Path) -> None:  # fmt: skip
    env = service_env(nats_proc.port, redis_proc.port, FLOTILLA_SIM_LATENCY_S="0.25", FLOTILLA_SIM_LATENCY_JITTER="0.2",
                      FLOTILLA_ACK_WAIT_S="2", FLOTILLA_BACKOFF_S="[0.05, 0.1, 0.2]", FLOTILLA_LOG_LEVEL="WARNING",
                      FLOTILLA_SHUTDOWN_GRACE_S="1")  # fmt: skip
    settings = make_settings(nats_proc.port, redis_proc.port)
    redis = redis_client(settings)
    sim = SimCloud(redis, settings.redis_prefix)
    reqs = [request_envelope(PLAIN, f"k{i}") for i in range(4)] + [request_envelope(BYON, "k")]
    ids = [r.subject for r in reqs]
    proc = start_service(SERVICE, env, tmp_path / "logs")
    try:
        for r in reqs:
            await bus.publish(r)

        async def some_progress() -> bool:
            return sum(e.type == "ClusterResourceProvisioned" for e in await ours(bus)) >= 6

        await wait_until(some_progress, within=30)
        proc.send_signal(signal.SIGKILL)  # mid-step for several clusters: creates in flight, nothing acked
        proc.wait(10)
        proc = start_service(SERVICE, env, tmp_path / "logs")
        await wait_for_type(bus, "ClusterProvisioned", ids, within=60)

        inventory = await sim.inventory()
        for cid in ids:
            assert inventory[cid] == per_cluster(pools=3 if BYON in cid else 1, byon=BYON in cid), cid
        stats = await sim.stats()
        for kind in ALL_KINDS:
            assert stats[f"created:{kind}"] == sum(v.get(kind, 0) for v in inventory.values()), kind
        published = await ours(bus)
        assert len({e.id for e in published}) == len(published)
        steps = Counter((e.subject, e.data["step"]) for e in published if e.type == "ClusterResourceProvisioned")
        assert set(steps.values()) == {1} and len(steps) == 5 * len(ids)

        # And a kill in the middle of retirements: still nothing left afterwards.
        for r in reqs:
            await bus.publish(retirement_envelope(r))

        async def some_deleted() -> bool:
            return sum(e.type == "ClusterResourceDeprovisioned" for e in await ours(bus)) >= 4

        await wait_until(some_deleted, within=30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_service(SERVICE, env, tmp_path / "logs")
        await wait_for_type(bus, "ClusterDeprovisioned", ids, within=60)
        assert await sim.inventory() == {}
    finally:
        proc.kill()  # not a graceful-shutdown test
        proc.wait(10)
        await redis.aclose()
