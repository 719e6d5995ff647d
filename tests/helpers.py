"""Helpers the unit and integration suites share: polling, reading FLEET back, example cluster events.

One version of each, so that a change to an event's fields or to the stream layout is made once.
The fixtures themselves (servers, settings, bus) stay in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from services.cloud_provisioner.app import SERVICE as PROVISIONER
from services.cloud_provisioner.app import Provisioner
from services.cloud_provisioner.providers import ProviderRegistry
from services.cloud_provisioner.providers.base import ClusterContext
from shared.bus import Bus, IdempotentConsumer
from shared.config import Settings
from shared.events import ClusterSpec, Envelope, new_event, subjects, validate_clusterset
from shared.events.factory import payload_as
from shared.events.models import ClusterProvisioned, ClusterRequested, ClusterRetirementRequested, Event, NetworkInfo
from shared.service import ServiceContext, open_context
from tests.conftest import example_documents

EXAMPLES = example_documents()
# Example ClusterSets by what makes them interesting to a test.
PLAIN = "modelserving-prod-aws-us-east-1"  # aws, one node pool, network created by us
BYON = "dataeng-staging-azure-westeurope"  # azure, bring-your-own network (never ours to delete)
GCP = "serverless-prod-gcp-europe-west4"


# ---------------------------------------------------------------- polling
async def wait_until(predicate: Callable[[], object | Awaitable[object]], within: float = 20.0,
                     interval: float = 0.05) -> None:  # fmt: skip
    """Poll `predicate` (sync, or returning an awaitable) until it is truthy; AssertionError after `within` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s (last value {result!r})")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- reading FLEET back
async def fleet_messages(bus: Bus, *, source: str | None = None, aggregate: str | None = None
                         ) -> list[tuple[str, Envelope]]:  # fmt: skip
    """Every message in FLEET, in stream order, as (NATS subject, envelope).

    `source` / `aggregate` keep only the events emitted by that service / about that cluster.
    Reads by sequence (no consumer is created, so it cannot disturb the services' consumers).
    """
    info = await bus.js.stream_info(subjects.STREAM_FLEET)
    out: list[tuple[str, Envelope]] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg(subjects.STREAM_FLEET, seq)
        assert msg.subject is not None and msg.data is not None
        env = Envelope.from_bytes(msg.data)
        if (source is None or env.source == source) and (aggregate is None or env.subject == aggregate):
            out.append((msg.subject, env))
    return out


async def fleet_events(bus: Bus, *, source: str | None = None, aggregate: str | None = None) -> list[Envelope]:
    """`fleet_messages` without the subjects."""
    return [env for _, env in await fleet_messages(bus, source=source, aggregate=aggregate)]


async def consumer_drained(bus: Bus, durable: str, stream: str = subjects.STREAM_FLEET) -> bool:
    """True when the durable consumer has nothing pending and nothing awaiting an ack."""
    info = await bus.js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


# ---------------------------------------------------------------- example cluster events
def example_spec(name: str) -> ClusterSpec:
    """The cluster spec of the example ClusterSet `name`."""
    clusterset, errors = validate_clusterset(EXAMPLES[name])
    assert clusterset is not None, errors
    return clusterset.spec.cluster_spec()


def cluster_context(name: str, suffix: str = "0001") -> ClusterContext:
    """What a cloud driver gets for cluster `<name>-<suffix>` of the example ClusterSet `name`."""
    req = cluster_requested(name, suffix)
    return ClusterContext(cluster_id=req.cluster_id, clusterset=name, location=req.location, spec=req.spec)


@contextlib.asynccontextmanager
async def provisioner_service(settings: Settings, registry: ProviderRegistry, max_deliver: int | None = None
                              ) -> AsyncIterator[ServiceContext]:  # fmt: skip
    """The cloud_provisioner service in-process with the given drivers, on the real consumer runtime."""
    ctx = await open_context(PROVISIONER, settings)
    sub = Provisioner(registry).subscription(**({"max_deliver": max_deliver} if max_deliver else {}))
    consumer = IdempotentConsumer(ctx.bus, ctx.store, PROVISIONER, sub)
    await consumer.start()
    try:
        yield ctx
    finally:
        await consumer.stop()
        await ctx.bus.close()
        await ctx.redis.aclose()


def cluster_requested(name: str, suffix: str = "0001", *, spec: ClusterSpec | None = None,
                      generation: int = 1) -> ClusterRequested:  # fmt: skip
    """The planner's request for cluster `<name>-<suffix>` of the example ClusterSet `name` (its spec unless given)."""
    clusterset, errors = validate_clusterset(EXAMPLES[name])
    assert clusterset is not None, errors
    spec = spec or clusterset.spec.cluster_spec()
    return ClusterRequested(
        cluster_id=f"{name}-{suffix}", clusterset=name, location=clusterset.metadata.location,
        cluster_type=clusterset.metadata.cluster_type, generation=generation, config_hash=spec.config_hash(),
        spec=spec, serial=0,
    )  # fmt: skip


def cluster_provisioned(req: ClusterRequested) -> ClusterProvisioned:
    """What the provisioner reports for `req` (a made-up endpoint and network): the installer's input."""
    cid = req.cluster_id
    return ClusterProvisioned(
        cluster_id=cid, clusterset=req.clusterset, location=req.location, endpoint=f"https://{cid}.example",
        ca_fingerprint="sha256:00", network=NetworkInfo(network_id="net-1", subnet_ids=["subnet-1"]), resources={},
        credential_ref=f"sim://{cid}",
    )  # fmt: skip


RetirementReason = Literal["scale-down", "clusterset-deleted", "rotation", "manual"]


def retirement_requested(req: ClusterRequested, reason: RetirementReason = "scale-down") -> ClusterRetirementRequested:
    """The planner retiring the cluster `req` asked for."""
    return ClusterRetirementRequested(cluster_id=req.cluster_id, clusterset=req.clusterset, location=req.location,
                                      reason=reason)  # fmt: skip


def from_planner(payload: Event) -> Envelope:
    """`payload` as the planner publishes it: a new envelope (fresh id), no cause."""
    return new_event(payload, source="planner")


def request_envelope(name: str, suffix: str = "0001") -> Envelope:
    """`cluster_requested(name, suffix)` as published by the planner."""
    return from_planner(cluster_requested(name, suffix))


def retirement_envelope(request: Envelope) -> Envelope:
    """The planner's retirement of the cluster that the ClusterRequested envelope `request` asked for."""
    return from_planner(retirement_requested(payload_as(request, ClusterRequested)))


def sample_resources(cloud: str, cluster_id: str, region: str) -> dict[str, dict[str, Any]]:
    """Provisioning results as each real cloud driver records them (never secrets)."""
    match cloud:
        case "aws":
            arn = f"arn:aws:kinesis:{region}:123456789012:stream/{cluster_id}-logs"
            return {"log_stream": {"log_stream_id": arn, "name": f"{cluster_id}-logs", "arn": arn, "region": region,
                                   "mode": "ON_DEMAND"}}  # fmt: skip
        case "azure":
            return {"log_stream": {"log_stream_id": f"/subscriptions/0/.../eventhubs/{cluster_id}-logs",
                                   "name": f"{cluster_id}-logs", "namespace": f"{cluster_id}-ehns",
                                   "namespace_id": "/subscriptions/0/...", "resource_group": f"{cluster_id}-rg"}}
        case _:
            topic = f"projects/flotilla-prod/topics/{cluster_id}-logs"
            return {"log_stream": {"log_stream_id": topic, "name": f"{cluster_id}-logs"}}
