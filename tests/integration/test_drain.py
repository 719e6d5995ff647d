"""Draining clusters: the real adapter against a local API server, and the installer service with the sim target.

The Kubernetes part checks what a drain sends over the wire: nodes cordoned once, every pod removed through the
Eviction subresource (never a DELETE), never more evictions than a PodDisruptionBudget allows, and a budget that
blocks keeps pods in place until it is relaxed or the pods leave by themselves. The service part runs real NATS
and Redis: ClusterDrainRequested → passes (the first one at once, the rest from the periodic loop) →
exactly one ClusterDrained per request, timed out when the sim's budget never lets anything go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client import CoreV1Api, V1Eviction, V1ObjectMeta
from kubernetes.client.rest import ApiException

from services.infra_installer.bundles.model import Bundle
from services.infra_installer.targets.base import ClusterRef, DrainReport
from services.infra_installer.targets.k8s_drain import CORDONED_BY
from services.infra_installer.targets.kubernetes import KubernetesApiTarget
from services.infra_installer.targets.sim import default_pods
from shared.bus import Bus
from shared.config import Settings
from shared.events import Envelope, decode_payload, derive_id, new_event
from shared.events.models import ClusterDrained, ClusterDrainRequested, ClusterUncordoned, ClusterUncordonRequested
from tests.conftest import make_settings
from tests.fakes.k8s_api import PDB_REFUSAL, FakeKubeApi, edit, running
from tests.helpers import fleet_events, wait_until
from tests.integration.test_installer import (
    Cluster,
    async_eq,
    cluster,
    drained,
    installer,
    installer_state,
    readies,
)

Json = dict[str, Any]
REF = ClusterRef(cluster_id="eks-prod-euw1-0007", endpoint="https://unused", cloud="aws", region="eu-west-1")
EVICTION = r"^/api/v1/namespaces/[^/]+/pods/[^/]+/eviction$"


# ---------------------------------------------------------------- cluster objects
def node(name: str) -> Json:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
            "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip


def pod(name: str, ns: str, labels: dict[str, str], node_name: str = "node-0", *, owner: str | None = "ReplicaSet",
        phase: str = "Running", ready: bool = True, annotations: dict[str, str] | None = None) -> Json:  # fmt: skip
    meta: Json = {"name": name, "namespace": ns, "labels": labels}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner, "name": f"{name}-owner",
                                    "uid": f"uid-{name}", "controller": True}]  # fmt: skip
    if annotations:
        meta["annotations"] = annotations
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    spec: Json = {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def pdb(name: str, ns: str, labels: dict[str, str], **spec: Any) -> Json:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": labels}, **spec}}  # fmt: skip


def shop(fake: FakeKubeApi, **budget: Any) -> None:
    """Three nodes; a 3-replica web app under a budget; what a drain must leave alone; a pod with no budget."""
    for i in range(3):
        fake.seed(node(f"node-{i}"))
        fake.seed(pod(f"web-{i}", "shop", {"app": "web"}, f"node-{i}"))
    fake.seed(pdb("web", "shop", {"app": "web"}, **(budget or {"minAvailable": 2})))
    fake.seed(pod("agent-node-0", "kube-system", {"app": "agent"}, owner="DaemonSet"))
    fake.seed(pod("kube-apiserver-node-0", "kube-system", {"component": "kube-apiserver"}, owner="Node",
                  annotations={"kubernetes.io/config.mirror": "3f2a"}))  # fmt: skip
    fake.seed(pod("migrate-1", "shop", {"job": "migrate"}, "node-1", owner="Job", phase="Succeeded", ready=False))
    fake.seed(pod("web-surge", "shop", {"app": "web"}, "", phase="Pending", ready=False))  # nowhere to go
    fake.seed(pod("debug", "shop", {"app": "debug"}, "node-2", owner=None))


def target_for(fake: FakeKubeApi) -> KubernetesApiTarget:
    client = fake.api_client()

    def render(service: str, version: str, values: Any, cluster: ClusterRef) -> Bundle:
        raise AssertionError("a drain renders nothing")

    return KubernetesApiTarget(client_for=lambda _ref: client, render=render)


def pod_names(fake: FakeKubeApi) -> set[str]:
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in fake.objects("Pod")}


LEFT_ALONE = {"kube-system/agent-node-0", "kube-system/kube-apiserver-node-0", "shop/migrate-1", "shop/web-surge"}


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    with running() as api:
        yield api


# ---------------------------------------------------------------- the Kubernetes target
async def test_a_budget_lets_one_replica_go_per_pass_and_holds_the_rest_until_relaxed(fake: FakeKubeApi) -> None:
    shop(fake)
    target = target_for(fake)
    first = await target.drain(REF)
    # Every node cordoned; the pod with no budget and one web replica evicted; two held by minAvailable: 2.
    assert first == DrainReport(evicted=2, remaining=2, blocked=2, cordoned=3)
    assert all(fake.get("Node", f"node-{i}")["spec"]["unschedulable"] is True for i in range(3))  # type: ignore[index]
    assert pod_names(fake) == LEFT_ALONE | {"shop/web-1", "shop/web-2"}
    status = fake.get("PodDisruptionBudget", "web", "shop")["status"]  # type: ignore[index]
    assert (status["currentHealthy"], status["desiredHealthy"], status["disruptionsAllowed"]) == (2, 2, 0)

    # Nothing changed: nothing is asked for (the plan knows the budget allows nothing) and no node is patched again.
    assert await target.drain(REF) == DrainReport(evicted=0, remaining=2, blocked=2, cordoned=0)
    # The budget is relaxed: the rest go.
    edit(fake, "policy/v1", "PodDisruptionBudget", "web", "shop", {"spec": {"minAvailable": 0}})
    assert await target.drain(REF) == DrainReport(evicted=2, remaining=0, blocked=0, cordoned=0)
    assert pod_names(fake) == LEFT_ALONE

    # On the wire: one merge patch per node, and every pod left through the Eviction subresource.
    patches = fake.calls("PATCH", r"^/api/v1/nodes/")
    assert sorted(r.path for r in patches) == [f"/api/v1/nodes/node-{i}" for i in range(3)]
    assert all(r.content_type == "application/merge-patch+json" and r.body == {
        "metadata": {"annotations": {CORDONED_BY: "true"}}, "spec": {"unschedulable": True}} for r in patches)
    evictions = fake.calls("POST", EVICTION)
    assert sorted(r.path.split("/")[-2] for r in evictions) == ["debug", "web-0", "web-1", "web-2"]
    assert all(r.status == 201 and r.body["kind"] == "Eviction" and r.body["apiVersion"] == "policy/v1"
               for r in evictions)  # fmt: skip
    assert fake.calls("DELETE") == []


async def test_an_uncordon_gives_back_only_the_nodes_the_drain_cordoned(fake: FakeKubeApi) -> None:
    shop(fake)
    maintenance = node("node-9")
    maintenance["spec"] = {"unschedulable": True}  # cordoned by someone else, for their own reasons
    fake.seed(maintenance)
    target = target_for(fake)
    assert (await target.drain(REF)).cordoned == 3
    assert await target.uncordon(REF) == 3
    for i in range(3):
        n = fake.get("Node", f"node-{i}")
        assert n is not None and not n["spec"].get("unschedulable")
        assert CORDONED_BY not in (n["metadata"].get("annotations") or {})
    assert fake.get("Node", "node-9")["spec"]["unschedulable"] is True  # type: ignore[index]
    assert await target.uncordon(REF) == 0  # done already: nothing patched
    assert len(fake.calls("PATCH", r"^/api/v1/nodes/")) == 6


async def test_a_blocked_drain_finishes_when_the_pods_leave_by_themselves(fake: FakeKubeApi) -> None:
    shop(fake, maxUnavailable=0)
    target = target_for(fake)
    assert await target.drain(REF) == DrainReport(evicted=1, remaining=3, blocked=3, cordoned=3)
    # The application moved to the new cluster and its owner scaled the old replicas away.
    core = CoreV1Api(fake.api_client())
    for i in range(3):
        core.delete_namespaced_pod(f"web-{i}", "shop")
    assert await target.drain(REF) == DrainReport(evicted=0, remaining=0, blocked=0, cordoned=0)
    assert [r.path.split("/")[-2] for r in fake.calls("POST", EVICTION)] == ["debug"]


async def test_the_api_refuses_an_eviction_the_budget_does_not_allow_and_the_pass_counts_it_as_blocked() -> None:
    # No disruption controller: the budget's status says (wrongly) that 3 disruptions are allowed, so the plan
    # asks for all three; the API server counts the healthy pods itself and refuses the second and the third.
    with running(controllers=False) as fake:
        for i in range(3):
            fake.seed(node(f"node-{i}"))
            fake.seed(pod(f"web-{i}", "shop", {"app": "web"}, f"node-{i}"))
        fake.seed({**pdb("web", "shop", {"app": "web"}, minAvailable=2),
                   "status": {"observedGeneration": 1, "disruptionsAllowed": 3, "currentHealthy": 3,
                              "desiredHealthy": 2, "expectedPods": 3}})  # fmt: skip
        report = await target_for(fake).drain(REF)
        assert report == DrainReport(evicted=1, remaining=2, blocked=2, cordoned=3)
        statuses = [r.status for r in fake.calls("POST", EVICTION)]
        assert statuses == [201, 429, 429]
        # The refusal, as the official client sees it.
        core = CoreV1Api(fake.api_client())
        body = V1Eviction(metadata=V1ObjectMeta(name="web-1", namespace="shop"))
        with pytest.raises(ApiException) as refused:
            core.create_namespaced_pod_eviction("web-1", "shop", body)
        assert refused.value.status == 429
        assert f'"message":"{PDB_REFUSAL}"' in refused.value.body.replace(": ", ":")
        assert '"reason":"TooManyRequests"' in refused.value.body.replace(": ", ":")
        assert "needs 2 healthy pods and has 2 currently" in refused.value.body


async def test_evicted_pods_count_until_their_termination_ends() -> None:
    with running(graceful_eviction=True) as fake:
        fake.seed(node("node-0"))
        for i in range(2):
            fake.seed(pod(f"batch-{i}", "jobs", {"app": "batch"}))
        target = target_for(fake)
        assert await target.drain(REF) == DrainReport(evicted=2, remaining=2, blocked=0, cordoned=1)
        # Still terminating: waited for, not evicted again.
        assert await target.drain(REF) == DrainReport(evicted=0, remaining=2, blocked=0, cordoned=0)
        assert len(fake.calls("POST", EVICTION)) == 2
        assert sorted(fake.reap()) == ["jobs/batch-0", "jobs/batch-1"]
        assert (await target.drain(REF)).done


async def test_an_unreachable_api_fails_the_pass(fake: FakeKubeApi) -> None:
    from services.infra_installer.targets.base import InstallError

    shop(fake)
    fake.fail("GET", r"^/api/v1/pods$", code=503, message="etcd leader changed")
    with pytest.raises(InstallError, match="etcd leader changed"):
        await target_for(fake).drain(REF)


# ---------------------------------------------------------------- the installer service, sim target
def drain_request(c: Cluster, timeout_s: float = 30, rollout: str = "rollout-1") -> Envelope:
    p = c.payload
    payload = ClusterDrainRequested(location=p.location, cluster_id=c.id, clusterset=p.clusterset, rollout_id=rollout,
                                    timeout_seconds=timeout_s)  # fmt: skip
    return new_event(payload, source="rotation")


async def drained_events(bus: Bus, c: Cluster) -> list[Envelope]:
    return [e for e in await fleet_events(bus, aggregate=c.id) if e.type == ClusterDrained.type_name()]


def the_answer(envs: list[Envelope]) -> ClusterDrained:
    (env,) = envs
    payload = decode_payload(env)
    assert isinstance(payload, ClusterDrained)
    return payload


async def ready_cluster(bus: Bus, name: str = "core-prod-aws-eu-west-1") -> Cluster:
    c = cluster(name)
    await bus.publish(c.requested)
    await bus.publish(c.provisioned)
    await wait_until(async_eq(lambda: readies(bus), {c.id}))
    return c


async def test_a_drain_request_is_answered_once_after_one_pass_by_default(settings: Settings, bus: Bus) -> None:
    async with installer(settings) as run:
        c = await ready_cluster(bus)
        request = drain_request(c)
        await bus.publish(request)
        await wait_until(lambda: drained_events(bus, c))
        envs = await drained_events(bus, c)
        answer = the_answer(envs)
        assert (answer.timed_out, answer.evicted, answer.remaining, answer.rollout_id) == (
            False, default_pods(c.id), 0, "rollout-1")  # fmt: skip
        assert envs[0].id == derive_id(request.id, "ClusterDrained") and envs[0].causation_id == request.id
        assert await run.target.pods(c.id) == []
        assert await run.target.drain_status(c.id) == {"seeded": 1, "cordoned": 1, "evicted": default_pods(c.id),
                                                       "passes": 1}  # fmt: skip
        # Another request for the drained cluster is answered without touching it again.
        await bus.publish(drain_request(c, rollout="rollout-2"))
        await wait_until(async_eq(lambda: _count(drained_events(bus, c)), 2))
        assert (await run.target.drain_status(c.id))["passes"] == 1
        await wait_until(lambda: drained(bus))
        before = [e.id for e in await fleet_events(bus)]

    # Replay from the first message: nothing new is emitted and the cluster is not touched.
    await bus.js.delete_consumer("FLEET", "infra_installer")
    async with installer(settings) as run:
        await wait_until(lambda: drained(bus))
        await asyncio.sleep(0.2)
        assert [e.id for e in await fleet_events(bus)] == before
        assert (await run.target.drain_status(c.id))["passes"] == 1


async def test_an_uncordon_request_calls_a_drain_off_and_the_workload_comes_back(settings: Settings, bus: Bus) -> None:
    async with installer(settings) as run:
        c = await ready_cluster(bus)
        await run.target.block_evictions(cluster_id=c.id)  # the drain cannot finish
        await bus.publish(drain_request(c, timeout_s=600))
        await wait_until(lambda: cordoned(run, c))
        p = c.payload
        ask = ClusterUncordonRequested(location=p.location, cluster_id=c.id, clusterset=p.clusterset,
                                       rollout_id="rollout-1", reason="rolled back")  # fmt: skip
        await bus.publish(new_event(ask, source="rotation"))

        async def uncordoned() -> list[Envelope]:
            return [e for e in await fleet_events(bus, aggregate=c.id) if e.type == ClusterUncordoned.type_name()]

        await wait_until(uncordoned)
        (env,) = await uncordoned()
        answer = decode_payload(env)
        assert isinstance(answer, ClusterUncordoned) and answer.nodes == 1 and answer.rollout_id == "rollout-1"
        status = await run.target.drain_status(c.id)
        assert "cordoned" not in status and status["uncordoned"] == 1
        await wait_until(lambda: drained(bus))
        assert await drained_events(bus, c) == [], "the called-off drain is never answered"


async def cordoned(run: Any, c: Cluster) -> bool:
    return "cordoned" in await run.target.drain_status(c.id)


async def _count(envs: Any) -> int:
    return len(await envs)


async def test_a_budget_makes_the_periodic_loop_come_back_until_the_drain_is_done(nats_proc, redis_proc,
                                                                                 bus: Bus) -> None:  # fmt: skip
    settings = make_settings(nats_proc.port, redis_proc.port, installer_reconcile_interval_s=0.2)
    async with installer(settings, background=True) as run:
        c = await ready_cluster(bus)
        await run.target.configure_workload(pods=5, evictions_per_pass=2, cluster_id=c.id)
        await bus.publish(drain_request(c))
        await wait_until(lambda: drained_events(bus, c), within=10)
        answer = the_answer(await drained_events(bus, c))
        assert (answer.timed_out, answer.evicted, answer.remaining) == (False, 5, 0)
        assert (await run.target.drain_status(c.id))["passes"] == 3  # 2 + 2 + 1
        await asyncio.sleep(0.8)  # several more loop turns: nothing more happens
        assert len(await drained_events(bus, c)) == 1
        assert (await run.target.drain_status(c.id))["passes"] == 3
        state = await installer_state(run.ctx, c.id)
        assert state is not None and state.drain.drained and state.drain.evicted == 5


async def test_a_drain_that_cannot_evict_times_out_once_and_forces_nothing(nats_proc, redis_proc,
                                                                          bus: Bus) -> None:  # fmt: skip
    settings = make_settings(nats_proc.port, redis_proc.port, installer_reconcile_interval_s=0.2)
    async with installer(settings, background=True) as run:
        c = await ready_cluster(bus)
        await run.target.configure_workload(pods=3, cluster_id=c.id)
        await run.target.block_evictions(cluster_id=c.id)
        await bus.publish(drain_request(c, timeout_s=1.0))
        await wait_until(lambda: drained_events(bus, c), within=10)
        answer = the_answer(await drained_events(bus, c))
        assert (answer.timed_out, answer.evicted, answer.remaining) == (True, 0, 3)
        assert len(await run.target.pods(c.id)) == 3
        passes = (await run.target.drain_status(c.id))["passes"]
        assert passes >= 2  # the first at once, then the loop until the deadline
        await asyncio.sleep(0.8)
        assert len(await drained_events(bus, c)) == 1
        assert (await run.target.drain_status(c.id))["passes"] == passes  # answered: no more passes


async def test_a_drain_survives_an_installer_restart(nats_proc, redis_proc, bus: Bus) -> None:
    settings = make_settings(nats_proc.port, redis_proc.port, installer_reconcile_interval_s=0.2)
    async with installer(settings) as run:  # no periodic loop: only the first pass
        c = await ready_cluster(bus)
        await run.target.configure_workload(pods=4, evictions_per_pass=1, cluster_id=c.id)
        await bus.publish(drain_request(c))
        await wait_until(async_eq(lambda: _evicted(run, c), 1))
        await wait_until(lambda: drained(bus))
    async with installer(settings, background=True) as run:
        await wait_until(lambda: drained_events(bus, c), within=10)
        answer = the_answer(await drained_events(bus, c))
        assert (answer.timed_out, answer.evicted) == (False, 4)


async def _evicted(run: Any, c: Cluster) -> int:
    return (await run.target.drain_status(c.id)).get("evicted", 0)


async def test_a_retired_cluster_is_not_drained(settings: Settings, bus: Bus) -> None:
    async with installer(settings) as run:
        c = await ready_cluster(bus)
        await bus.publish(c.retirement())
        await wait_until(lambda: _retired(run, c))
        await bus.publish(drain_request(c))
        await wait_until(lambda: drained(bus))
        await asyncio.sleep(0.2)
        assert await drained_events(bus, c) == []
        assert await run.target.drain_status(c.id) == {}


async def _retired(run: Any, c: Cluster) -> bool:
    state = await installer_state(run.ctx, c.id)
    return state is not None and state.retired
