"""The simulated cloud and its driver against a real redis-server: tokens, latency, faults, inventory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    CloudError,
    ClusterContext,
    InvalidInstanceTypeError,
    NotInPlaceError,
    QuotaExceededError,
    ResourceNotFoundError,
    ThrottlingError,
    TransientCloudError,
    Updated,
)
from services.cloud_provisioner.providers.sim import SimProvider
from services.cloud_provisioner.providers.simcloud import SimCloud
from shared.embedded import ServerProcess
from shared.events import validate_clusterset
from shared.events.models import PROVISION_STEPS
from tests.conftest import example_documents
from tests.unit.test_provisioner_core import changed_spec, with_pool

EXAMPLES = example_documents()


@pytest.fixture
async def r(redis_proc: ServerProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{redis_proc.port}/0", decode_responses=True)
    yield client
    await client.aclose()


def ctx_for(name: str, cluster_id: str) -> ClusterContext:
    clusterset, errors = validate_clusterset(EXAMPLES[name])
    assert clusterset is not None, errors
    return ClusterContext(cluster_id=cluster_id, clusterset=name, location=clusterset.metadata.location,
                          spec=clusterset.spec.cluster_spec())  # fmt: skip


async def test_create_makes_new_resources_unless_the_token_was_used(r: Redis) -> None:
    sim = SimCloud(r, "t")
    a = await sim.create("network", "n", tags={TAG_CLUSTER: "c1"})
    b = await sim.create("network", "n", tags={TAG_CLUSTER: "c1"})
    assert a.id != b.id and a.id.startswith("vpc-")  # no token: like CreateVpc, a second one
    t1 = await sim.create("cluster", "c1", tags={TAG_CLUSTER: "c1"}, client_token="c1:cluster")
    t2 = await sim.create("cluster", "c1", tags={TAG_CLUSTER: "c1"}, client_token="c1:cluster")
    assert t1.id == t2.id
    # Racing clients with one token: exactly one resource (the script is atomic).
    many = await asyncio.gather(*(SimCloud(r, "t").create("iam_role", "role", tags={TAG_CLUSTER: "c2"},
                                                          client_token="c2:iam") for _ in range(20)))  # fmt: skip
    assert len({m.id for m in many}) == 1
    assert await sim.inventory() == {"c1": {"network": 2, "cluster": 1}, "c2": {"iam_role": 1}}
    assert await sim.inventory("c2") == {"c2": {"iam_role": 1}}
    assert await sim.inventory("nope") == {}
    stats = await sim.stats()
    assert (stats["created:network"], stats["created:cluster"], stats["created:iam_role"]) == (2, 1, 1)
    # Another prefix is another cloud.
    assert await SimCloud(r, "other").inventory() == {}


async def test_list_filters_by_kind_and_tags(r: Redis) -> None:
    sim = SimCloud(r, "t")
    await sim.create("node_pool", "c1-a", tags={TAG_CLUSTER: "c1", "Name": "c1-a"})
    await sim.create("node_pool", "c1-b", tags={TAG_CLUSTER: "c1", "Name": "c1-b"})
    await sim.create("node_pool", "c2-a", tags={TAG_CLUSTER: "c2", "Name": "c2-a"})
    await sim.create("log_stream", "c1-logs", tags={TAG_CLUSTER: "c1"})
    assert [x.name for x in await sim.list("node_pool", {TAG_CLUSTER: "c1"})] == ["c1-a", "c1-b"]
    assert [x.name for x in await sim.list("node_pool", {TAG_CLUSTER: "c1", "Name": "c1-b"})] == ["c1-b"]
    assert len(await sim.list(tags={TAG_CLUSTER: "c1"})) == 3
    assert len(await sim.list()) == 4
    assert await sim.list("cluster") == []


async def test_operations_complete_asynchronously(r: Redis) -> None:
    sim = SimCloud(r, "t", latency_s=0.3, latency_jitter=0.0)
    res = await sim.create("cluster", "c1", tags={TAG_CLUSTER: "c1"})
    assert res.status == "CREATING" and res.ready_at == pytest.approx(res.created_at + 0.3)
    with pytest.raises(TransientCloudError) as in_use:  # cannot delete mid-create
        await sim.delete(res.id)
    assert in_use.value.code == "ResourceInUse"
    await asyncio.sleep(0.35)
    assert (await sim.get(res.id)).status == "ACTIVE"
    deleting = await sim.delete(res.id)
    assert deleting.status == "DELETING"
    assert (await sim.get(res.id)).status == "DELETING"
    assert await sim.inventory() == {"c1": {"cluster": 1}}  # still there while deleting
    await asyncio.sleep(0.35)
    with pytest.raises(ResourceNotFoundError):
        await sim.get(res.id)
    with pytest.raises(ResourceNotFoundError):
        await sim.delete(res.id)
    assert await sim.inventory() == {} and await sim.list("cluster") == []
    # The token outlives its resource: a late create with it does not resurrect anything.
    tok = await sim.create("cluster", "c2", tags={TAG_CLUSTER: "c2"}, client_token="c2:cluster")
    await asyncio.sleep(0.35)
    await sim.delete(tok.id)
    await asyncio.sleep(0.35)
    with pytest.raises(ResourceNotFoundError):
        await sim.create("cluster", "c2", tags={TAG_CLUSTER: "c2"}, client_token="c2:cluster")
    assert await sim.inventory() == {}


async def test_latency_jitter_stays_within_bounds(r: Redis) -> None:
    sim = SimCloud(r, "t", latency_s=1.0, latency_jitter=0.5, seed=7)
    delays = []
    for i in range(30):
        res = await sim.create("log_stream", f"l{i}")
        delays.append(res.ready_at - res.created_at)
    assert all(0.5 <= d <= 1.5 for d in delays) and max(delays) - min(delays) > 0.2


async def test_fault_rules_are_shared_and_counted(r: Redis) -> None:
    sim = SimCloud(r, "t")
    other = SimCloud(r, "t")  # e.g. the provisioner process: rules live in Redis, not in this object
    rule = await sim.add_fault(kind="cluster", name_prefix="x", code="QuotaExceeded", retryable=False, times=2)
    for _ in range(2):
        with pytest.raises(QuotaExceededError) as err:
            await other.create("cluster", "x-1")
        assert not err.value.retryable and err.value.code == "QuotaExceeded"
    assert (await other.create("cluster", "x-1")).kind == "cluster"  # used up
    assert await sim.faults() == []
    await sim.add_fault(kind="node_pool", code="InvalidInstanceType", retryable=False)  # until removed
    await other.create("cluster", "y-1")  # other kinds unaffected
    for _ in range(3):
        with pytest.raises(InvalidInstanceTypeError):
            await other.create("node_pool", "y-1-default")
    await sim.add_fault(kind="*", op="delete", code="Throttling", retryable=True, times=1)
    victim = await other.create("iam_role", "z")
    with pytest.raises(ThrottlingError):
        await other.delete(victim.id)
    await other.delete(victim.id)
    await sim.clear_faults()
    await other.create("node_pool", "y-1-default")
    assert rule and (await sim.stats())["faulted:create:cluster"] == 2


async def test_rates_are_seeded_and_failures_can_follow_the_effect(r: Redis) -> None:
    async def pattern(seed: int) -> list[bool]:
        sim = SimCloud(r, f"p{seed}-{time.monotonic_ns()}", throttle_rate=0.5, seed=seed)
        out = []
        for i in range(40):
            try:
                await sim.create("log_stream", f"l{i}")
                out.append(True)
            except ThrottlingError:
                out.append(False)
        return out

    first, again = await pattern(3), await pattern(3)
    assert first == again and 5 < first.count(False) < 35
    # A server error after the effect: the resource exists, and the same token finds it again.
    flaky = SimCloud(r, "f", failure_rate=1.0, seed=1)
    with pytest.raises(TransientCloudError) as err:
        await flaky.create("cluster", "c9", tags={TAG_CLUSTER: "c9"}, client_token="c9:cluster")
    assert err.value.retryable and err.value.code == "InternalError"
    calm = SimCloud(r, "f")
    assert await calm.inventory() == {"c9": {"cluster": 1}}
    again_res = await calm.create("cluster", "c9", tags={TAG_CLUSTER: "c9"}, client_token="c9:cluster")
    assert await calm.inventory() == {"c9": {"cluster": 1}} and again_res.name == "c9"


# ---------------------------------------------------------------- the sim driver
async def test_provider_ensure_is_idempotent_and_delete_removes_everything(r: Redis) -> None:
    sim = SimCloud(r, "t", latency_s=0.05, latency_jitter=0.5)
    provider = SimProvider(sim, poll_s=0.01, timeout_s=5)
    ctx = ctx_for("dataeng-staging-azure-westeurope", "de-1")  # byon, three node pools
    plain = ctx_for("modelserving-prod-aws-us-east-1", "ms-1")
    done = {}
    for step in PROVISION_STEPS:
        done[step] = await provider.ensure(step, plain)
        assert await provider.ensure(step, plain) == done[step]  # adopted, not re-created
    assert done["network"]["owned"] and len(done["network"]["subnet_ids"]) == 3
    assert done["cluster"]["endpoint"].startswith("https://") and done["cluster"]["credential_ref"] == "sim://ms-1"
    assert "secret" not in str(done).lower()
    assert await sim.inventory("ms-1") == {"ms-1": {"network": 1, "cluster": 1, "node_pool": 1, "iam_role": 1,
                                                    "log_stream": 1}}  # fmt: skip
    byon = await provider.ensure("network", ctx)
    assert byon["owned"] is False and byon["subnet_ids"] == ["snet-a", "snet-b"]
    pools = await provider.ensure("node_pools", ctx)
    assert set(pools["node_pools"]) == {"infra", "spark-driver", "spark-executor"}
    assert await sim.inventory("de-1") == {"de-1": {"node_pool": 3}}  # the byon network was never created
    for step in reversed(PROVISION_STEPS):
        await provider.delete(step, plain, done[step])
        await provider.delete(step, plain, done[step])  # not found = done
    await provider.delete("network", ctx, byon)  # adopted: untouched, no error
    await provider.delete("node_pools", ctx, None)  # unknown result: found by tag
    assert await sim.inventory() == {}
    created = await sim.stats()
    assert created["created:node_pool"] == 4 and created["created:network"] == 1


async def test_two_replicas_racing_and_a_restart_mid_create_make_one_resource(r: Redis) -> None:
    ctx = ctx_for("modelserving-prod-aws-us-east-1", "ms-2")
    a = SimProvider(SimCloud(r, "t", latency_s=0.3), poll_s=0.02, timeout_s=5)
    b = SimProvider(SimCloud(r, "t", latency_s=0.3), poll_s=0.02, timeout_s=5)
    results = await asyncio.gather(*(p.ensure("network", ctx) for p in (a, b, a, b)))
    assert len({x["network_id"] for x in results}) == 1
    # A "crash" mid-create: the task is cancelled while the cluster is CREATING; a restart adopts it.
    task = asyncio.create_task(a.ensure("cluster", ctx))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await a.cloud.list("cluster", {TAG_CLUSTER: "ms-2"}))[0].status == "CREATING"
    started = time.monotonic()
    adopted = await b.ensure("cluster", ctx)
    assert time.monotonic() - started < 0.35  # it waited for the running create, not a new one
    assert adopted["resource_id"] == (await a.cloud.list("cluster"))[0].id
    assert await a.cloud.inventory("ms-2") == {"ms-2": {"network": 1, "cluster": 1}}
    assert (await a.cloud.stats())["created:cluster"] == 1


async def test_provider_surfaces_terminal_errors_and_retries_throttling(r: Redis) -> None:
    ctx = ctx_for("dataeng-staging-azure-westeurope", "de-2")
    sim = SimCloud(r, "t")
    provider = SimProvider(sim, poll_s=0.01, timeout_s=5)
    await sim.add_fault(kind="node_pool", name_prefix="de-2-spark-executor", code="InvalidInstanceType",
                        retryable=False)  # fmt: skip
    with pytest.raises(InvalidInstanceTypeError):  # one pool fails: a plain CloudError, not an ExceptionGroup
        await provider.ensure("node_pools", ctx)
    await sim.clear_faults()
    # Two throttles are absorbed by the driver's own retries (as the cloud SDKs do) ...
    await sim.add_fault(kind="iam_role", op="*", code="Throttling", retryable=True, times=2)
    assert (await provider.ensure("iam", ctx))["role_name"] == "de-2-nodes"
    # ... more reach the caller as retryable errors.
    await sim.add_fault(kind="log_stream", op="list", code="Throttling", retryable=True, times=5)
    with pytest.raises(CloudError) as err:
        await provider.ensure("log_stream", ctx)
    assert err.value.retryable


async def test_provider_converges_under_random_throttling(r: Redis) -> None:
    ctx = ctx_for("modelserving-prod-aws-us-east-1", "ms-3")
    provider = SimProvider(SimCloud(r, "t", throttle_rate=0.3, failure_rate=0.1, seed=11), poll_s=0.01, timeout_s=5)
    failures = 0
    for step in PROVISION_STEPS:
        while True:  # what the consumer runtime's redeliveries do
            try:
                await provider.ensure(step, ctx)
                break
            except CloudError as exc:
                assert exc.retryable
                failures += 1
                assert failures < 100
    calm = SimCloud(r, "t")
    assert await calm.inventory("ms-3") == {"ms-3": {k: 1 for k in ("network", "cluster", "node_pool", "iam_role",
                                                                    "log_stream")}}  # fmt: skip
    stats = await calm.stats()
    assert stats.get("throttled:list", 0) + stats.get("throttled:create", 0) > 0


# ---------------------------------------------------------------- in-place updates
async def test_update_changes_attributes_and_tags_in_place_asynchronously(r: Redis) -> None:
    sim = SimCloud(r, "t", latency_s=0.2, latency_jitter=0.0)
    res = await sim.create("node_pool", "c1-a", tags={TAG_CLUSTER: "c1", "team": "a"}, attrs={"max_count": 3})
    with pytest.raises(TransientCloudError) as in_use:  # not while it is being created
        await sim.update(res.id, attrs={"max_count": 5})
    assert in_use.value.code == "ResourceInUse"
    await asyncio.sleep(0.25)
    updated = await sim.update(res.id, attrs={"max_count": 5}, tags={TAG_CLUSTER: "c1", "team": "b"})
    assert updated.id == res.id and updated.status == "UPDATING" and updated.attrs == {"max_count": 5}
    with pytest.raises(TransientCloudError):  # one operation at a time
        await sim.update(res.id, attrs={"max_count": 6})
    # The tag index follows: found by its new tags, no longer by the old ones.
    assert [x.id for x in await sim.list("node_pool", {"team": "b"})] == [res.id]
    assert await sim.list("node_pool", {"team": "a"}) == []
    await asyncio.sleep(0.25)
    assert (await sim.get(res.id)).status == "ACTIVE"
    stats = await sim.stats()
    assert (stats["created:node_pool"], stats["updated:node_pool"]) == (1, 1)
    await sim.add_fault(kind="node_pool", op="update", code="Throttling", times=1)
    with pytest.raises(ThrottlingError):
        await sim.update(res.id, attrs={"max_count": 7})
    await sim.delete(res.id)
    with pytest.raises(TransientCloudError) as deleting:
        await sim.update(res.id, attrs={"max_count": 7})
    assert deleting.value.code == "ResourceBeingDeleted"
    with pytest.raises(ResourceNotFoundError):
        await sim.update("np-missing", attrs={})


async def test_provider_update_converges_existing_pools_and_creates_nothing(r: Redis) -> None:
    sim = SimCloud(r, "t", latency_s=0.05)
    provider = SimProvider(sim, poll_s=0.01, timeout_s=5)
    ctx = ctx_for("dataeng-staging-azure-westeurope", "de-3")  # three node pools
    before = await provider.ensure("node_pools", ctx)
    assert ctx.spec is not None
    assert (await provider.update("node_pools", ctx)) == Updated(before, False)  # nothing differs
    spec = changed_spec(ctx.spec, {**ctx.spec.tags, "owner": "data"}, maxCount=40, labels={"tier": "gold"}, taints=[])
    new = ClusterContext(ctx.cluster_id, ctx.clusterset, ctx.location, spec, {"node_pools": before})
    updated = await provider.update("node_pools", new)
    assert updated.changed and updated.resources == before  # the same pools, by id
    first = spec.node_pools[0]
    pool = (await sim.list("node_pool", {TAG_CLUSTER: "de-3", "Name": f"de-3-{first.name}"}))[0]
    assert pool.status == "ACTIVE" and pool.attrs["max_count"] == 40 and pool.attrs["labels"] == {"tier": "gold"}
    assert pool.attrs["taints"] == [] and pool.tags["owner"] == "data"
    stats = await sim.stats()
    assert stats["created:node_pool"] == 3 and stats["updated:node_pool"] == 3  # the tag is on every pool
    assert not (await provider.update("node_pools", new)).changed
    # ensure with a newer spec converges the same way (an update that arrived while provisioning ran).
    newer = ClusterContext(ctx.cluster_id, ctx.clusterset, ctx.location, changed_spec(spec, minCount=2), {})
    assert await provider.ensure("node_pools", newer) == before
    assert (await sim.get(pool.id)).attrs["min_count"] == 2 and (await sim.stats())["created:node_pool"] == 3


async def test_provider_update_refuses_what_only_a_rotation_can_do(r: Redis) -> None:
    sim = SimCloud(r, "t")
    provider = SimProvider(sim, poll_s=0.01, timeout_s=5)
    ctx = ctx_for("modelserving-prod-aws-us-east-1", "ms-4")
    await provider.ensure("node_pools", ctx)
    assert ctx.spec is not None
    other_type = ClusterContext(ctx.cluster_id, ctx.clusterset, ctx.location,
                                changed_spec(ctx.spec, instanceTypes=["m7i.4xlarge"]))  # fmt: skip
    with pytest.raises(NotInPlaceError) as err:
        await provider.update("node_pools", other_type)
    assert err.value.code == "NotInPlace" and not err.value.retryable
    added = ClusterContext(ctx.cluster_id, ctx.clusterset, ctx.location, with_pool(ctx.spec, "gpu"))
    with pytest.raises(NotInPlaceError):
        await provider.update("node_pools", added)
    assert await sim.inventory("ms-4") == {"ms-4": {"node_pool": 1}} and "updated:node_pool" not in await sim.stats()
