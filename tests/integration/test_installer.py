"""infra_installer against real nats-server and redis-server, with the Redis-backed sim Kubernetes target."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from nats.js import api as jsapi

from services.infra_installer import core
from services.infra_installer.app import DURABLE, SERVICE, SPEC, build_subscriptions, reconcile_pass
from services.infra_installer.core import InstallerState
from services.infra_installer.targets.sim import SimKubernetesTarget
from shared.bus import Bus, IdempotentConsumer
from shared.catalog import CATALOG, install_order
from shared.config import Settings
from shared.events import Envelope, decode_payload, new_event, subjects
from shared.events.factory import payload_as
from shared.events.models import (
    ClusterInfraFailed,
    ClusterReady,
    ClusterRequested,
    ClusterResourcesUpdated,
    ClusterUpdateRequested,
    Event,
    InfraDriftCorrected,
    InfraServiceInstalled,
    InfraServiceRemoved,
)
from shared.service import ServiceContext, open_context
from tests.conftest import make_settings
from tests.helpers import (
    EXAMPLES,
    cluster_provisioned,
    cluster_requested,
    consumer_drained,
    fleet_events,
    fleet_messages,
    from_planner,
    retirement_envelope,
    wait_until,
)


# ---------------------------------------------------------------- helpers
@dataclass
class Cluster:
    requested: Envelope
    provisioned: Envelope

    @property
    def id(self) -> str:
        return self.requested.subject

    @property
    def payload(self) -> ClusterRequested:
        return payload_as(self.requested, ClusterRequested)

    def retirement(self) -> Envelope:
        return retirement_envelope(self.requested)


def cluster(name: str, suffix: str = "0001") -> Cluster:
    requested = cluster_requested(name, suffix)
    req_env = from_planner(requested)
    return Cluster(req_env, new_event(cluster_provisioned(requested), source="cloud_provisioner", cause=req_env))


async def events_for(bus: Bus, cluster_id: str, source: str = SERVICE) -> list[tuple[str, Event]]:
    return [(subj, decode_payload(env)) for subj, env in await fleet_messages(bus, source=source, aggregate=cluster_id)]


async def the_failure(bus: Bus, cluster_id: str) -> ClusterInfraFailed:
    """Wait for the cluster's ClusterInfraFailed; there must be exactly one."""

    async def failures() -> list[ClusterInfraFailed]:
        return [e for _, e in await events_for(bus, cluster_id) if isinstance(e, ClusterInfraFailed)]

    await wait_until(failures)
    (failure,) = await failures()
    return failure


async def readies(bus: Bus) -> set[str]:
    return {env.subject for env in await fleet_events(bus) if env.type == "ClusterReady"}


async def installer_state(ctx: ServiceContext, cluster_id: str) -> InstallerState | None:
    return (await ctx.store.load(cluster_id, InstallerState))[0]


async def drained(bus: Bus) -> bool:
    return await consumer_drained(bus, DURABLE)


@dataclass
class Running:
    ctx: ServiceContext
    target: SimKubernetesTarget
    consumers: list[IdempotentConsumer[InstallerState]]
    background: list[asyncio.Task[None]]

    async def stop(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in self.consumers))
        with contextlib.suppress(Exception):
            await self.ctx.bus.close()
        await self.ctx.redis.aclose()


async def start_installer(settings: Settings, health_timeout_s: float | None = None,
                          background: bool = False) -> Running:  # fmt: skip
    """The service's subscriptions, in-process, each run by the real idempotent-consumer runtime; with
    `background`, its periodic pass too (as `serve` runs it)."""
    ctx = await open_context(SERVICE, settings)
    target = SimKubernetesTarget(ctx.redis, settings)
    if health_timeout_s is None:
        subs = SPEC.subscriptions(ctx)
    else:
        subs = build_subscriptions(ctx, target, health_timeout_s=health_timeout_s)
    consumers = [IdempotentConsumer(ctx.bus, ctx.store, SPEC.name, s) for s in subs]
    for c in consumers:
        await c.start()
    jobs = [asyncio.create_task(job(ctx, consumers)) for job in SPEC.background] if background else []
    return Running(ctx, target, consumers, jobs)


@contextlib.asynccontextmanager
async def installer(settings: Settings, health_timeout_s: float | None = None,
                    background: bool = False) -> AsyncIterator[Running]:  # fmt: skip
    running = await start_installer(settings, health_timeout_s, background)
    try:
        yield running
    finally:
        await running.stop()


def expected_order(c: Cluster) -> list[str]:
    return install_order(c.payload.spec.infra_service_names())


# ---------------------------------------------------------------- tests
async def test_examples_install_in_dependency_order_then_ready(settings: Settings, bus: Bus) -> None:
    clusters = [cluster(name) for name in sorted(EXAMPLES)]
    async with installer(settings) as run:
        for i, c in enumerate(clusters):
            # Either arrival order must work: provisioning first for every other cluster.
            first, second = (c.requested, c.provisioned) if i % 2 == 0 else (c.provisioned, c.requested)
            assert await bus.publish(first) and await bus.publish(second)
        await wait_until(async_eq(lambda: readies(bus), {c.id for c in clusters}), within=20)

        for c in clusters:
            p, order = c.payload, expected_order(c)
            events = await events_for(bus, c.id)
            installed = [e for _, e in events if isinstance(e, InfraServiceInstalled)]
            assert [(e.service, e.version) for e in installed] == [(s, CATALOG[s].version) for s in order]
            subject, ready = events[-1]
            assert isinstance(ready, ClusterReady) and len(events) == len(order) + 1
            assert subject == f"fleet.cluster_ready.{p.location.cloud}.{p.location.region}.{c.id}"
            assert (ready.cluster_type, ready.config_hash) == (p.cluster_type, p.config_hash)
            assert ready.endpoint == f"https://{c.id}.example"
            assert ready.infra_services == [{"name": s, "version": CATALOG[s].version} for s in order]
            # What is on the (simulated) cluster, in the order it was written.
            assert await run.target.write_log(c.id) == [f"{s}@{CATALOG[s].version}" for s in order]
            assert set(await run.target.installed(c.id)) == set(order)
            # The installer's stored state is exactly a replay of the cluster's history in FLEET.
            history = [decode_payload(env) for env in await fleet_events(bus) if env.subject == c.id]
            assert await installer_state(run.ctx, c.id) == core.replay(history)

    # The routing promise: one wildcard selects every AWS cluster that became ready.
    sub = await bus.js.pull_subscribe("fleet.cluster_ready.aws.>", stream=subjects.STREAM_FLEET)
    msgs = await sub.fetch(10, timeout=2)
    aws = {c.id for c in clusters if c.payload.location.cloud == "aws"}
    assert {Envelope.from_bytes(m.data).subject for m in msgs} == aws and len(aws) == 2


def async_eq(fn: Callable[[], object], expected: object) -> Callable[[], object]:
    async def check() -> bool:
        return await fn() == expected  # type: ignore[misc]

    return check


async def test_republish_and_full_replay_create_no_new_event_and_reapply_nothing(settings: Settings, bus: Bus) -> None:
    c = cluster("modelserving-prod-aws-us-east-1")
    async with installer(settings) as run:
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        await wait_until(async_eq(lambda: readies(bus), {c.id}))
        await wait_until(lambda: drained(bus))
        before = [env.id for env in await fleet_events(bus)]
        stats = await run.target.stats(c.id)
        assert stats == {**{f"apply:{s}": 1 for s in expected_order(c)}, **{f"write:{s}": 1 for s in expected_order(c)}}

        # Same ids inside the duplicate window: JetStream drops them.
        assert await bus.publish(c.requested) is False
        assert await bus.publish(c.provisioned) is False
        # Same events as new messages (beyond the window): the installer's ledger skips them.
        for env in (c.requested, c.provisioned):
            subject = decode_payload(env).subject()
            await bus.publish_raw(subject, env.to_bytes(), {"Nats-Msg-Id": f"again-{env.id}"}, subjects.STREAM_FLEET)
        await wait_until(lambda: drained(bus))
        after = [env.id for env in await fleet_events(bus)]
        assert after == before + [c.requested.id, c.provisioned.id]  # only the two raw copies were added
        assert await run.target.stats(c.id) == stats

    # Replay: reset the consumer to the stream's first message and redeliver everything.
    await bus.js.delete_consumer(subjects.STREAM_FLEET, DURABLE)
    async with installer(settings) as run:
        handled = sum(1 for env in await fleet_events(bus) if env.type in {"ClusterRequested", "ClusterProvisioned",
                                                                       "InfraServiceInstalled"})  # fmt: skip
        await wait_until(lambda: sum(x.processed for x in run.consumers) == handled)
        await wait_until(lambda: drained(bus))
        assert [env.id for env in await fleet_events(bus)] == after
        assert await run.target.stats(c.id) == stats


async def test_transient_install_failure_is_retried_then_ready(settings: Settings, bus: Bus) -> None:
    c = cluster("modelserving-prod-aws-us-east-1")
    async with installer(settings) as run:
        await run.target.add_fault(service="ingress", times=2)
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        await wait_until(async_eq(lambda: readies(bus), {c.id}))
        stats = await run.target.stats(c.id)
        assert (stats["apply:ingress"], stats["write:ingress"]) == (3, 1)
        events = await events_for(bus, c.id)
        assert [e.service for _, e in events if isinstance(e, InfraServiceInstalled)] == expected_order(c)
        assert not any(isinstance(e, ClusterInfraFailed) for _, e in events)


async def test_exhausted_retries_emit_cluster_infra_failed(nats_proc, redis_proc, bus: Bus) -> None:
    settings = make_settings(nats_proc.port, redis_proc.port, max_deliver=3)
    c = cluster("modelserving-prod-aws-us-east-1")
    async with installer(settings) as run:
        await run.target.add_fault(service="cert-manager", times=1000)
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        failure = await the_failure(bus, c.id)
        assert failure.service == "cert-manager" and failure.retryable is True
        assert "injected fault" in failure.reason
        await wait_until(lambda: drained(bus))
        events = await events_for(bus, c.id)
        order = expected_order(c)
        installed = [e.service for _, e in events if isinstance(e, InfraServiceInstalled)]
        assert installed == order[: order.index("cert-manager")]
        assert not any(isinstance(e, ClusterReady) for _, e in events)
        assert (await run.target.stats(c.id))["apply:cert-manager"] == 3
        state = await installer_state(run.ctx, c.id)
        assert state is not None and state.failure is not None and core.next_action(state) is None
    dl = await bus.js.pull_subscribe("deadletter.>", stream=subjects.STREAM_DEADLETTER)
    (msg,) = await dl.fetch(1, timeout=2)
    assert msg.headers is not None and msg.headers["Flotilla-Service"] == SERVICE


async def test_health_timeout_fails_through_the_same_path(nats_proc, redis_proc, bus: Bus) -> None:
    settings = make_settings(nats_proc.port, redis_proc.port, max_deliver=2)
    c = cluster("core-prod-aws-eu-west-1")
    async with installer(settings, health_timeout_s=0.1) as run:
        await run.target.add_fault(service="logging", times=10**6, kind="unhealthy")
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        failure = await the_failure(bus, c.id)
        assert failure.service == "logging" and failure.retryable and "HealthTimeout" in failure.reason
        # Applied once; the retry re-applied identical content, which is a no-op.
        stats = await run.target.stats(c.id)
        assert (stats["apply:logging"], stats["write:logging"]) == (2, 1)


async def test_retirement_mid_way_stops_the_chain(nats_proc, redis_proc, bus: Bus) -> None:
    # Enough attempts that the stalled message is still being retried when the retirement lands.
    settings = make_settings(nats_proc.port, redis_proc.port, max_deliver=200)
    c = cluster("modelserving-prod-aws-us-east-1")
    order = expected_order(c)
    async with installer(settings) as run:
        # Stall the chain at observability: the message keeps failing and being redelivered.
        await run.target.add_fault(service="observability", times=10**6)
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        await wait_until(lambda: _applies(run, c.id, "observability", 2))
        await bus.publish(c.retirement())
        await wait_until(lambda: _retired(run, c.id))
        # The in-flight chain message is redelivered after retirement and now would succeed: it must do nothing.
        await run.target.clear_faults()
        await wait_until(lambda: drained(bus))
        await asyncio.sleep(0.5)  # longer than the largest backoff: any late redelivery has come and gone
        events = await events_for(bus, c.id)
        installed = [e.service for _, e in events if isinstance(e, InfraServiceInstalled)]
        assert installed == order[: order.index("observability")]
        assert not any(isinstance(e, ClusterReady | ClusterInfraFailed) for _, e in events)
        assert set(await run.target.installed(c.id)) == set(installed)


async def _applies(run: Running, cluster_id: str, service: str, at_least: int) -> bool:
    return (await run.target.stats(cluster_id)).get(f"apply:{service}", 0) >= at_least


async def _retired(run: Running, cluster_id: str) -> bool:
    state = await installer_state(run.ctx, cluster_id)
    return state is not None and state.retired


async def test_restart_mid_chain_resumes_at_the_next_service(settings: Settings, bus: Bus) -> None:
    c = cluster("serverless-prod-gcp-europe-west4")
    order = expected_order(c)
    run = await start_installer(settings)
    try:
        await run.target.add_fault(service="cert-manager", times=10**6)
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        await wait_until(lambda: _applies(run, c.id, "cert-manager", 1))
    finally:
        await run.stop()  # the process goes away mid-chain
    async with installer(settings) as run:
        await run.target.clear_faults()
        await wait_until(async_eq(lambda: readies(bus), {c.id}))
        stats = await run.target.stats(c.id)
        assert all(stats[f"write:{s}"] == 1 for s in order)  # nothing installed twice
        assert all(stats[f"apply:{s}"] == 1 for s in order if s != "cert-manager")
        events = await events_for(bus, c.id)
        assert [e.service for _, e in events if isinstance(e, InfraServiceInstalled)] == order


async def test_consumer_config_filters_only_what_the_installer_folds(settings: Settings, bus: Bus) -> None:
    async with installer(settings):
        info = await bus.js.consumer_info(subjects.STREAM_FLEET, DURABLE)
    assert info.config.ack_policy == jsapi.AckPolicy.EXPLICIT
    assert sorted(info.config.filter_subjects or []) == sorted(
        subjects.fleet_filter(t) for t in ("ClusterRequested", "ClusterProvisioned", "InfraServiceInstalled",
                                           "ClusterRetirementRequested", "ClusterUpdateRequested",
                                           "InfraServiceRemoved", "ClusterResourcesUpdated",
                                           "ClusterDrainRequested", "ClusterUncordonRequested"))  # fmt: skip


# ---------------------------------------------------------------- in-place update, drift, retry of failures
def update_request(c: Cluster, services: list[str], generation: int = 2) -> Envelope:
    """The planner's ClusterUpdateRequested for a new infraServices list."""
    spec = c.payload.spec.model_copy(update={"infra_services": services})
    payload = ClusterUpdateRequested(location=c.payload.location, cluster_id=c.id, clusterset=c.payload.clusterset,
                                     generation=generation, config_hash=spec.config_hash(), spec=spec,
                                     changes=["spec.infraServices"])  # fmt: skip
    return from_planner(payload)


def resources_updated(c: Cluster, generation: int = 2, resources: dict[str, dict[str, Any]] | None = None
                      ) -> Envelope:  # fmt: skip
    """The provisioner's word that the update's cloud side (node pools, tags) is done."""
    payload = ClusterResourcesUpdated(location=c.payload.location, cluster_id=c.id, clusterset=c.payload.clusterset,
                                      generation=generation, config_hash="", resources=resources or {},
                                      changed=["node_pools"])  # fmt: skip
    return new_event(payload, source="cloud_provisioner")


async def ready_for(bus: Bus, c: Cluster, config_hash: str) -> list[ClusterReady]:
    return [e for _, e in await events_for(bus, c.id) if isinstance(e, ClusterReady) and e.config_hash == config_hash]


async def test_in_place_update_installs_the_difference_prunes_removed_services_and_is_ready_again(
    settings: Settings, bus: Bus
) -> None:
    c = cluster("modelserving-prod-aws-us-east-1")
    async with installer(settings) as run:
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        await wait_until(async_eq(lambda: readies(bus), {c.id}))
        before = set(await run.target.installed(c.id))
        keep = [s for s in c.payload.spec.infra_service_names() if s not in ("ingress", "registry-secrets")]
        update = update_request(c, keep)
        spec = payload_as(update, ClusterUpdateRequested).spec
        await bus.publish(update)
        await bus.publish(resources_updated(c))
        await wait_until(lambda: ready_for(bus, c, spec.config_hash()))
        events = await events_for(bus, c.id)
        removed = [e.service for _, e in events if isinstance(e, InfraServiceRemoved)]
        assert removed == ["ingress", "registry-secrets"]  # dependents first, reverse install order
        assert set(await run.target.installed(c.id)) == before - {"ingress", "registry-secrets"}
        # Nothing that stayed was re-applied.
        stats = await run.target.stats(c.id)
        assert all(stats[f"write:{s}"] == 1 for s in keep)


async def test_in_place_update_is_ready_only_once_the_cloud_side_is_done_too(settings: Settings, bus: Bus) -> None:
    c = cluster("serverless-prod-gcp-europe-west4")
    async with installer(settings) as run:
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        await wait_until(async_eq(lambda: readies(bus), {c.id}))
        # Same services, new node pools (say): every service is re-applied for the new spec at once ...
        spec = c.payload.spec.model_copy(update={"tags": {**c.payload.spec.tags, "cost-center": "42"}})
        update = from_planner(ClusterUpdateRequested(
            location=c.payload.location, cluster_id=c.id, clusterset=c.payload.clusterset, generation=2,
            config_hash=spec.config_hash(), spec=spec, changes=["spec.tags"]))  # fmt: skip
        await bus.publish(update)
        order = expected_order(c)

        async def reapplied() -> bool:
            state = await installer_state(run.ctx, c.id)
            return state is not None and all(state.installed_for.get(s) == spec.config_hash() for s in order)

        await wait_until(reapplied)
        await wait_until(lambda: drained(bus))
        stats = await run.target.stats(c.id)
        assert all(stats[f"apply:{s}"] == 2 for s in order)
        # ... but READY waits for the provisioner: nothing yet, even after everything else was handled.
        await asyncio.sleep(0.3)
        assert await ready_for(bus, c, spec.config_hash()) == []
        state = await installer_state(run.ctx, c.id)
        assert state is not None and not state.ready
        # An older generation's results do not count; this generation's (new log stream) do, and what the
        # bundles render from changed, so every service is applied once more before READY.
        await bus.publish(resources_updated(c, generation=1))
        await wait_until(lambda: drained(bus))
        assert await ready_for(bus, c, spec.config_hash()) == []
        stream = {"log_stream": {"name": f"{c.id}-logs-v2", "topic": f"projects/p/topics/{c.id}-logs-v2"}}
        await bus.publish(resources_updated(c, generation=2, resources=stream))
        await wait_until(lambda: ready_for(bus, c, spec.config_hash()))
        await wait_until(lambda: drained(bus))
        assert len(await ready_for(bus, c, spec.config_hash())) == 1
        state = await installer_state(run.ctx, c.id)
        assert state is not None and state.ready and state.resources["log_stream"]["name"] == f"{c.id}-logs-v2"
        stats = await run.target.stats(c.id)
        assert all(stats[f"apply:{s}"] == 3 for s in order)
        # Redelivered (a new message with the same content): nothing more.
        await bus.publish(resources_updated(c, generation=2, resources=stream))
        await wait_until(lambda: drained(bus))
        assert len(await ready_for(bus, c, spec.config_hash())) == 1


async def test_drift_is_corrected_and_reported_by_the_periodic_pass(settings: Settings, bus: Bus) -> None:
    c = cluster("serverless-prod-gcp-europe-west4")
    async with installer(settings) as run:
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        await wait_until(async_eq(lambda: readies(bus), {c.id}))
        await run.target.tamper(c.id, "tenant-isolation", {"defaultDeny": False})
        assert await reconcile_pass(run.ctx, run.consumers[0], bucket=1) == 1

        async def corrected() -> list[InfraDriftCorrected]:
            return [e for _, e in await events_for(bus, c.id) if isinstance(e, InfraDriftCorrected)]

        await wait_until(corrected)
        (drift,) = await corrected()
        assert drift.service == "tenant-isolation" and drift.objects == ["tenant-isolation"]
        restored = (await run.target.installed(c.id))["tenant-isolation"]
        assert restored.values == {} and restored.manager == "flotilla-infra-installer"
        # The same pass again (another replica, same bucket) and a pass with nothing drifted report nothing.
        await reconcile_pass(run.ctx, run.consumers[0], bucket=1)
        await reconcile_pass(run.ctx, run.consumers[0], bucket=2)
        await asyncio.sleep(0.3)
        assert len(await corrected()) == 1


async def test_a_retryable_failure_is_retried_by_the_periodic_pass_until_ready(nats_proc, redis_proc,
                                                                               bus: Bus) -> None:  # fmt: skip
    settings = make_settings(nats_proc.port, redis_proc.port, max_deliver=2)
    c = cluster("dataeng-staging-azure-westeurope")
    async with installer(settings) as run:
        await run.target.add_fault(service="logging", times=2)
        await bus.publish(c.requested)
        await bus.publish(c.provisioned)
        failure = await the_failure(bus, c.id)
        assert failure.service == "logging"
        # The fault is gone now (it fired twice): the next pass retries and the cluster goes READY.
        await reconcile_pass(run.ctx, run.consumers[0], bucket=7)
        await wait_until(async_eq(lambda: readies(bus), {c.id}))
        state = await installer_state(run.ctx, c.id)
        assert state is not None and state.ready and state.failure is None
