"""The installer service on the real-client path: the official `kubernetes` client against a local API endpoint.

Events in (real NATS + Redis, the real consumer runtime), server-side apply out: the full catalog of
every example ClusterSet is installed and health-gated; a re-run changes nothing; a gate that never
passes fails the cluster naming its object and recovers; drift is corrected and reported.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
from collections.abc import AsyncIterator, Awaitable, Collection, Iterator, Mapping
from typing import Any

import pytest
from kubernetes.client import ApiClient

from services.infra_installer.app import DURABLE, SERVICE, Installer, filter_subjects, reconcile_pass, render_for
from services.infra_installer.bundles.custom import CustomBundle, load_custom_bundles
from services.infra_installer.bundles.model import Bundle
from services.infra_installer.core import InstallerState
from services.infra_installer.targets.base import ClusterRef
from services.infra_installer.targets.kubernetes import KubernetesApiTarget
from shared.bus import Bus, IdempotentConsumer, Subscription
from shared.catalog import install_order, read_custom_defs, register_custom
from shared.config import Settings
from shared.events import Envelope, decode_payload, new_event, subjects, validate_clusterset
from shared.events.models import (
    ClusterDrained,
    ClusterDrainRequested,
    ClusterInfraFailed,
    ClusterReady,
    InfraDriftCorrected,
    InfraServiceInstalled,
)
from shared.service import ServiceContext, open_context
from tests.conftest import make_settings
from tests.fakes.k8s_api import FakeKubeApi, edit, running
from tests.helpers import (
    EXAMPLES,
    cluster_provisioned,
    cluster_requested,
    fleet_events,
    from_planner,
    sample_resources,
    wait_until,
)
from tests.integration.test_drain import node, pdb, pod

REGISTRY_REF = "env://REGISTRY"
DOCKERCONFIG = json.dumps({"auths": {"registry.example": {"auth": base64.b64encode(b"u:p").decode()}}}).encode()


def resolve(ref: str) -> bytes:
    """The test's secret store (the deployment's resolver, secret_refs.py, is unit-tested on its own)."""
    return DOCKERCONFIG if ref == REGISTRY_REF else b"Endpoint=sb://test/;SharedAccessKeyName=k;SharedAccessKey=v"


class Clusters:
    """One local API server per cluster, started on first use (each cluster has its own API server)."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack, self.apis, self.clients = stack, dict[str, FakeKubeApi](), dict[str, ApiClient]()

    def api(self, cluster_id: str) -> FakeKubeApi:
        if cluster_id not in self.apis:
            self.apis[cluster_id] = self.stack.enter_context(running())
            self.clients[cluster_id] = self.apis[cluster_id].api_client()
        return self.apis[cluster_id]

    def client_for(self, ref: ClusterRef) -> ApiClient:
        self.api(ref.cluster_id)
        return self.clients[ref.cluster_id]


@pytest.fixture
def kubes() -> Iterator[Clusters]:
    with contextlib.ExitStack() as stack:
        yield Clusters(stack)


@contextlib.asynccontextmanager
async def installer(settings: Settings, kubes: Clusters, health_timeout_s: float = 30,
                    custom: Mapping[str, CustomBundle] | None = None,
                    ) -> AsyncIterator[tuple[ServiceContext, IdempotentConsumer[InstallerState]]]:  # fmt: skip
    """The installer's subscription with the real adapter; credentials are each fake's plain client."""
    ctx = await open_context(SERVICE, settings)

    def render(service: str, version: str, values: Mapping[str, Any], cluster: ClusterRef) -> Bundle:
        return render_for(service, version, values, cluster, custom)

    target = KubernetesApiTarget(client_for=kubes.client_for, render=render, resolve_secret=resolve,
                                 health_timeout_s=health_timeout_s)  # fmt: skip
    runner = Installer(target, health_timeout_s, registry_secret_ref=REGISTRY_REF)
    sub = Subscription(durable=DURABLE, stream=subjects.STREAM_FLEET, filter_subjects=filter_subjects(),
                       state_model=InstallerState, handle=runner.handle, on_exhausted=runner.on_exhausted)  # fmt: skip
    consumer = IdempotentConsumer(ctx.bus, ctx.store, SERVICE, sub)
    await consumer.start()
    try:
        yield ctx, consumer
    finally:
        await consumer.stop()
        await ctx.bus.close()
        await ctx.redis.aclose()


async def publish_cluster(bus: Bus, name: str) -> tuple[str, list[str]]:
    req = cluster_requested(name)
    prov = cluster_provisioned(req).model_copy(update={
        "resources": sample_resources(req.location.cloud, req.cluster_id, req.location.region)})
    env = from_planner(req)
    await bus.publish(env)
    await bus.publish(new_event(prov, source="cloud_provisioner", cause=env))
    return req.cluster_id, install_order(req.spec.infra_service_names())


async def of_type(bus: Bus, event_type: str) -> list[Envelope]:
    return [e for e in await fleet_events(bus) if e.type == event_type]


async def ready_ids(bus: Bus) -> set[str]:
    return {e.subject for e in await of_type(bus, ClusterReady.type_name())}


def versions(kube: FakeKubeApi) -> dict[str, str]:
    """resourceVersion of every object we manage: a re-run must leave them all as they are."""
    out = {}
    for kind in ("Namespace", "Deployment", "DaemonSet", "ConfigMap", "Secret", "NetworkPolicy", "RuntimeClass",
                 "CustomResourceDefinition", "ClusterRole", "Service"):  # fmt: skip
        for obj in kube.objects(kind, "app.kubernetes.io/managed-by=flotilla"):
            meta = obj["metadata"]
            out[f"{kind} {meta.get('namespace', '')}/{meta['name']}"] = meta["resourceVersion"]
    return out


async def test_the_full_catalog_installs_for_every_example_and_a_rerun_changes_nothing(
    settings: Settings, bus: Bus, kubes: Clusters
) -> None:
    async with installer(settings, kubes) as (ctx, consumer):
        clusters = dict([await publish_cluster(bus, name) for name in sorted(EXAMPLES)])
        await wait_until(lambda: _equals(ready_ids(bus), set(clusters)), within=120)
        installed = await of_type(bus, InfraServiceInstalled.type_name())
        for cid, order in clusters.items():
            assert [decode_payload(e).service for e in installed if e.subject == cid] == order  # type: ignore[attr-defined]
            kube = kubes.api(cid)
            assert kube.objects("Namespace", "app.kubernetes.io/managed-by=flotilla")
            if "registry-secrets" in order:
                pull = kube.objects("Secret", "flotilla.dev/bundle=registry-secrets")
                assert pull and all(".dockerconfigjson" in s.get("data", {}) for s in pull)
            if "cert-manager" in order:
                assert kube.get("Deployment", "cert-manager-webhook", "cert-manager") is not None
        # What hard multi-tenancy promised on the serverless clusters, owned by us.
        serverless = next(cid for cid in clusters if cid.startswith("serverless"))
        kata = kubes.api(serverless).get("RuntimeClass", "kata")
        assert kata is not None and kata["handler"] == "kata"
        assert kata["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "flotilla"
        assert all(kubes.api(cid).get("RuntimeClass", "kata") is None for cid in clusters if cid != serverless)
        # A re-run (the periodic pass re-applies every READY cluster's bundles): nothing changes.
        before = {cid: versions(kubes.api(cid)) for cid in clusters}
        assert all(len(v) > 10 for v in before.values())
        await reconcile_pass(ctx, consumer, bucket=1)
        assert {cid: versions(kubes.api(cid)) for cid in clusters} == before
        assert await of_type(bus, InfraDriftCorrected.type_name()) == []


async def test_a_failing_gate_names_its_object_then_recovers_and_drift_is_corrected(
    nats_proc, redis_proc, bus: Bus, kubes: Clusters
) -> None:
    settings = make_settings(nats_proc.port, redis_proc.port, max_deliver=2)
    kube = kubes.api(cluster_requested("modelserving-prod-aws-us-east-1").cluster_id)
    kube.stall("Deployment", "ingress-nginx-controller", "ingress-nginx")
    async with installer(settings, kubes, health_timeout_s=0.5) as (ctx, consumer):
        cid, _ = await publish_cluster(bus, "modelserving-prod-aws-us-east-1")
        await wait_until(lambda: of_type(bus, ClusterInfraFailed.type_name()), within=60)
        (failed,) = [decode_payload(e) for e in await of_type(bus, ClusterInfraFailed.type_name())]
        assert isinstance(failed, ClusterInfraFailed) and failed.service == "ingress" and failed.retryable
        assert failed.object == "Deployment ingress-nginx/ingress-nginx-controller"
        assert cid not in await ready_ids(bus)
        # The controller recovers; the periodic pass retries and the cluster goes READY.
        kube.recover("Deployment", "ingress-nginx-controller", "ingress-nginx")
        await reconcile_pass(ctx, consumer, bucket=1)
        await wait_until(lambda: _contains(ready_ids(bus), cid), within=60)
        # Drift: an object we own is edited behind our back; the next pass re-applies it and reports it.
        edit(kube, "v1", "ConfigMap", "otel-gateway", "flotilla-observability",
             {"data": {"collector.yaml": "receivers: {}"}})
        await reconcile_pass(ctx, consumer, bucket=2)
        await wait_until(lambda: of_type(bus, InfraDriftCorrected.type_name()), within=30)
        (drift,) = [decode_payload(e) for e in await of_type(bus, InfraDriftCorrected.type_name())]
        assert isinstance(drift, InfraDriftCorrected) and drift.service == "observability"
        assert any("ConfigMap flotilla-observability/otel-gateway" in o for o in drift.objects)
        restored = kube.get("ConfigMap", "otel-gateway", "flotilla-observability")
        assert restored is not None and restored["data"]["collector.yaml"] != "receivers: {}"


async def test_a_drain_request_cordons_and_evicts_within_the_budgets_and_is_answered_once(
    settings: Settings, bus: Bus, kubes: Clusters
) -> None:
    name = "core-prod-aws-eu-west-1"
    kube = kubes.api(cluster_requested(name).cluster_id)
    for i in range(3):
        kube.seed(node(f"node-{i}"))
        kube.seed(pod(f"web-{i}", "shop", {"app": "web"}, f"node-{i}"))
    kube.seed(pdb("web", "shop", {"app": "web"}, minAvailable=2))
    kube.seed(pod("agent-node-1", "kube-system", {"app": "agent"}, "node-1", owner="DaemonSet"))
    async with installer(settings, kubes) as (ctx, consumer):
        cid, _ = await publish_cluster(bus, name)
        await wait_until(lambda: _contains(ready_ids(bus), cid), within=60)
        req = cluster_requested(name)
        await bus.publish(new_event(ClusterDrainRequested(location=req.location, cluster_id=cid,
                                                          clusterset=req.clusterset, rollout_id="r-1",
                                                          timeout_seconds=600), source="rotation"))  # fmt: skip
        # The first pass runs as the request is handled: every node cordoned, one replica evicted, two held.
        await wait_until(lambda: len(kube.calls("POST", r"/eviction$")) == 1, within=30)
        assert all(kube.get("Node", f"node-{i}")["spec"]["unschedulable"] for i in range(3))  # type: ignore[index]
        assert await reconcile_pass(ctx, consumer, bucket=1, reasons=("drain",)) == 1
        assert len(kube.calls("POST", r"/eviction$")) == 1 and await of_type(bus, ClusterDrained.type_name()) == []
        # The application owner relaxes the budget: the next pass finishes the drain.
        edit(kube, "policy/v1", "PodDisruptionBudget", "web", "shop", {"spec": {"minAvailable": 0}})
        await reconcile_pass(ctx, consumer, bucket=2, reasons=("drain",))
        await wait_until(lambda: of_type(bus, ClusterDrained.type_name()), within=30)
        (answer,) = [decode_payload(e) for e in await of_type(bus, ClusterDrained.type_name())]
        assert isinstance(answer, ClusterDrained)
        assert (answer.timed_out, answer.evicted, answer.remaining, answer.rollout_id) == (False, 3, 0, "r-1")
        assert [p["metadata"]["name"] for p in kube.objects("Pod")] == ["agent-node-1"]
        assert kube.calls("DELETE", r"/pods/") == []
        # Drained: later passes have nothing to do.
        assert await reconcile_pass(ctx, consumer, bucket=3, reasons=("drain",)) == 0


async def _equals(got: Awaitable[object], expected: object) -> bool:
    return await got == expected


async def _contains(got: Awaitable[Collection[str]], item: str) -> bool:
    return item in await got


AGENT_DESCRIPTOR = """\
name: my-agent
version: 1.2.0
dependsOn: [namespaces]
defaults: {replicas: 2}
"""
AGENT_MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: my-agent, namespace: flotilla-system}
spec:
  replicas: ${values.replicas}
  selector: {matchLabels: {app: my-agent}}
  template:
    metadata: {labels: {app: my-agent}}
    spec:
      containers:
        - name: agent
          image: "registry.example/my-agent:${version}"
          env: [{name: CLUSTER, value: "${cluster.id}"}]
"""


@pytest.fixture
def custom_bundle(tmp_path) -> Iterator[str]:
    """A user's bundle directory, registered like the services do at start-up (settings.custom_bundle_dirs)."""
    root = tmp_path / "bundles" / "my-agent"
    root.mkdir(parents=True)
    (root / "bundle.yaml").write_text(AGENT_DESCRIPTOR)
    (root / "10-agent.yaml").write_text(AGENT_MANIFEST)
    register_custom(read_custom_defs([str(root.parent)]))
    yield str(root.parent)
    register_custom({})


async def test_a_user_bundle_is_accepted_in_a_clusterset_and_installed_after_its_dependencies(
    settings: Settings, bus: Bus, kubes: Clusters, custom_bundle: str
) -> None:
    doc = copy.deepcopy(EXAMPLES["core-prod-aws-eu-west-1"])
    doc["spec"]["infraServices"] = ["my-agent", "namespaces"]
    cs, errors = validate_clusterset(doc)
    assert cs is not None, errors
    custom = load_custom_bundles([custom_bundle])
    async with installer(settings, kubes, custom=custom):
        req = cluster_requested("core-prod-aws-eu-west-1", spec=cs.spec.cluster_spec())
        env = from_planner(req)
        await bus.publish(env)
        await bus.publish(new_event(cluster_provisioned(req), source="cloud_provisioner", cause=env))
        await wait_until(lambda: _contains(ready_ids(bus), req.cluster_id), within=60)
        installed = [decode_payload(e) for e in await of_type(bus, InfraServiceInstalled.type_name())]
        assert [(e.service, e.version) for e in installed] == [("namespaces", "1.0.0"), ("my-agent", "1.2.0")]  # type: ignore[attr-defined]
        agent = kubes.api(req.cluster_id).get("Deployment", "my-agent", "flotilla-system")
        assert agent is not None and agent["spec"]["replicas"] == 2
        assert agent["metadata"]["labels"]["flotilla.dev/bundle"] == "my-agent"
    register_custom({})
    assert validate_clusterset(doc)[0] is None  # unknown again once the bundle is not registered
