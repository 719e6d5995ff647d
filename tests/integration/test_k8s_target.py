"""The real Kubernetes adapter (official client, DynamicClient, server-side apply) against a local API server.

The fake (tests/fakes/k8s_api.py) speaks the API's HTTP: discovery, apply with field managers and conflicts,
label selectors, delete, /status. Bundles here are small and hand-written with bundles/model.py; the catalog's
own bundles are exercised by the catalog's tests.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from kubernetes.client import ApiClient, Configuration
from kubernetes.dynamic.exceptions import ConflictError

from services.infra_installer.bundles.common import AFTER_HEALTH, APPLY_PHASE_ANNOTATION
from services.infra_installer.bundles.model import (
    LABEL_BUNDLE,
    LABEL_BUNDLE_VERSION,
    LABEL_MANAGED_BY,
    Bundle,
    HealthGate,
)
from services.infra_installer.bundles.secrets import secret_ref
from services.infra_installer.targets.base import FIELD_MANAGER, ClusterRef, HealthTimeout, InstallError
from services.infra_installer.targets.k8s_objects import drift_paths
from services.infra_installer.targets.kubernetes import GateTimeout, KubernetesApiTarget, dynamic_client
from tests.fakes.k8s_api import FakeKubeApi, edit, running
from tests.helpers import wait_until

CLUSTER = ClusterRef(cluster_id="eks-prod-euw1-0001", endpoint="https://unused", cloud="aws", region="eu-west-1")
NS = "team-a"
REGISTRY_REF = "vault://platform/registry"
Json = dict[str, Any]


# ---------------------------------------------------------------- bundles
def namespace(name: str) -> Json:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}  # fmt: skip


def deployment(name: str, image: str, replicas: int | None = 2, annotations: Mapping[str, str] | None = None) -> Json:
    spec: Json = {
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}},
                     "spec": {"containers": [{"name": name, "image": image,
                                              "env": [{"name": "MODE", "value": "prod"}]}]}},
    }  # fmt: skip
    if replicas is not None:
        spec["replicas"] = replicas
    meta: Json = {"name": name, "namespace": NS}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def service(name: str) -> Json:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": name}, "ports": [{"port": 443, "targetPort": 8443}]}}  # fmt: skip


def config_map(name: str, data: Mapping[str, str], namespace_: str = NS) -> Json:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace_},
            "data": dict(data)}


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {"group": "example.com", "scope": "Cluster",
             "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}},
                           "subresources": {"status": {}}}]},
}  # fmt: skip
WIDGET = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "default"}, "spec": {"size": 3}}

WEBHOOK = {
    "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
    "metadata": {"name": "widgets-webhook", "annotations": {"cert-manager.io/inject-ca-from": f"{NS}/webhook-cert"}},
    "webhooks": [{"name": "widgets.example.com", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                  "clientConfig": {"service": {"name": "webhook", "namespace": NS, "path": "/validate"}},
                  "rules": [{"apiGroups": ["example.com"], "apiVersions": ["v1"], "operations": ["CREATE"],
                             "resources": ["widgets"]}]}],
}  # fmt: skip

BUNDLES: dict[tuple[str, str], Bundle] = {
    ("namespaces", "1.0.0"): Bundle("namespaces", "1.0.0", (), (namespace(NS),)),
    ("app", "1.0.0"): Bundle("app", "1.0.0", ("namespaces",), (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": NS}},
        config_map("web-settings", {"level": "info", "color": "blue"}),
        deployment("web", "registry.example.com/web:1.0", annotations={"flotilla.dev/note": "first"}),
        service("web"),
    ), (HealthGate("DeploymentAvailable", "web", NS),)),
    ("app", "2.0.0"): Bundle("app", "2.0.0", ("namespaces",), (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": NS}},
        config_map("web-settings", {"level": "debug", "color": "blue"}),
        config_map("web-extra", {"feature": "on"}),
        deployment("web", "registry.example.com/web:2.0"),  # the annotation is no longer declared
    ), (HealthGate("DeploymentAvailable", "web", NS),)),  # no Service at all: its kind must still be pruned
    ("widgets", "1.0.0"): Bundle("widgets", "1.0.0", ("namespaces",), (
        copy.deepcopy(WIDGET),  # listed before its CRD on purpose: CRDs go first anyway
        copy.deepcopy(CRD),
        deployment("widget-controller", "registry.example.com/widgets:1.0", replicas=None),
        service("webhook"),
        deployment("webhook", "registry.example.com/widgets-webhook:1.0", replicas=1),
        copy.deepcopy(WEBHOOK),
    ), (HealthGate("CRDEstablished", "widgets.example.com"),
        HealthGate("DeploymentAvailable", "widget-controller", NS),
        HealthGate("WebhookReady", "widgets-webhook"))),
    ("agent", "1.0.0"): Bundle("agent", "1.0.0", ("namespaces",), (
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": NS},
         "spec": {"selector": {"matchLabels": {"app": "agent"}},
                  "template": {"metadata": {"labels": {"app": "agent"}},
                               "spec": {"containers": [{"name": "agent", "image": "registry.example.com/agent:1"}]}}}},
        deployment("collector", "registry.example.com/collector:1", replicas=2),
    ), (HealthGate("DeploymentAvailable", "collector", NS), HealthGate("DaemonSetRolledOut", "agent", NS))),
    ("issuer", "1.0.0"): Bundle("issuer", "1.0.0", ("namespaces",), (
        deployment("issuer-webhook", "registry.example.com/issuer:1", replicas=1),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "issuer", "namespace": NS, "annotations": {APPLY_PHASE_ANNOTATION: AFTER_HEALTH}},
         "data": {"acme": "https://acme.example.com"}},
    ), (HealthGate("DeploymentAvailable", "issuer-webhook", NS),)),
    ("registry-secrets", "1.0.0"): Bundle("registry-secrets", "1.0.0", ("namespaces",), (
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
         "metadata": {"name": "pull", "namespace": NS, "annotations": secret_ref(REGISTRY_REF, ".dockerconfigjson")}},
    )),
    ("pull-secret", "1.0.0"): Bundle("pull-secret", "1.0.0", ("namespaces",), (
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "registry", "namespace": NS},
         "type": "Opaque", "stringData": {"token": "s3cr3t-value"}},
    )),
}  # fmt: skip


def render(service_name: str, version: str, values: Mapping[str, Any], cluster: ClusterRef) -> Bundle:
    return BUNDLES[(service_name, version)]


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    """A fake API server whose simulated controllers roll workloads out and establish CRDs."""
    with running() as fake:
        yield fake


@pytest.fixture
def bare_api() -> Iterator[FakeKubeApi]:
    """No simulated controllers: nothing becomes ready unless the test writes its status."""
    with running(controllers=False) as fake:
        yield fake


def target_for(fake: FakeKubeApi, **kwargs: Any) -> KubernetesApiTarget:
    client = fake.api_client()  # one ApiClient per cluster, as a credentials module would keep it
    target = KubernetesApiTarget(lambda cluster: client, render, **kwargs)
    target.health_poll_s = 0.02
    return target


@pytest.fixture
def target(api: FakeKubeApi) -> KubernetesApiTarget:
    return target_for(api, crd_timeout_s=5)


async def install(target: KubernetesApiTarget, *services: tuple[str, str], timeout_s: float = 5) -> None:
    for name, version in services:
        await target.apply_service(CLUSTER, name, version, {})
        await target.wait_healthy(CLUSTER, name, timeout_s)


def set_status(client: ApiClient, api_version: str, kind: str, name: str, namespace: str | None, status: Json) -> None:
    """What a controller does: write `.status` through the /status subresource with the official client."""
    dyn = dynamic_client(client)
    group, _, version = api_version.rpartition("/")
    resource = dyn.resources.get(prefix="apis" if group else "api", group=group or None, api_version=version,
                                 kind=kind)  # fmt: skip
    dyn.patch(resource.status, body={"status": status}, name=name, namespace=namespace,
              content_type="application/merge-patch+json")  # fmt: skip


def resource_versions(fake: FakeKubeApi) -> dict[tuple[str, str, str, str], str]:
    with fake.lock:
        return {key: s.obj["metadata"]["resourceVersion"] for key, s in fake.store.items()}


# ---------------------------------------------------------------- install
async def test_install_creates_objects_with_fields_labels_and_one_field_manager(
    api: FakeKubeApi, target: KubernetesApiTarget
) -> None:
    await install(target, ("namespaces", "1.0.0"), ("app", "1.0.0"), ("widgets", "1.0.0"), ("agent", "1.0.0"))

    dep = api.get("Deployment", "web", NS)
    assert dep is not None
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/web:1.0"
    assert dep["metadata"]["annotations"] == {"flotilla.dev/note": "first"}
    assert api.get("ConfigMap", "web-settings", NS)["data"] == {"level": "info", "color": "blue"}  # type: ignore[index]
    svc = api.get("Service", "web", NS)
    assert svc is not None and svc["spec"]["ports"][0]["targetPort"] == 8443
    ns = api.get("Namespace", NS)
    assert ns is not None and ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert api.get("Widget", "default") is not None and api.get("Widget", "default")["spec"] == {"size": 3}  # type: ignore[index]

    # Ownership labels on every object we applied, with the bundle and its version.
    expected: dict[tuple[str, str], list[tuple[str, str, str | None]]] = {
        ("namespaces", "1.0.0"): [("Namespace", NS, None)],
        ("app", "1.0.0"): [("ServiceAccount", "web", NS), ("ConfigMap", "web-settings", NS),
                           ("Deployment", "web", NS), ("Service", "web", NS)],
        ("widgets", "1.0.0"): [("CustomResourceDefinition", "widgets.example.com", None),
                               ("Widget", "default", None), ("Deployment", "widget-controller", NS),
                               ("ValidatingWebhookConfiguration", "widgets-webhook", None)],
        ("agent", "1.0.0"): [("DaemonSet", "agent", NS), ("Deployment", "collector", NS)]}  # fmt: skip
    for (bundle, version), objects in expected.items():
        for kind, name, namespace_ in objects:
            obj = api.get(kind, name, namespace_)
            assert obj is not None, (kind, name)
            labels = obj["metadata"]["labels"]
            assert labels[LABEL_MANAGED_BY] == "flotilla", (kind, name)
            assert labels[LABEL_BUNDLE] == bundle and labels[LABEL_BUNDLE_VERSION] == version, (kind, name)
            # Server-side apply with our one field manager (an "Apply" entry in managedFields).
            assert any(m["manager"] == FIELD_MANAGER and m["operation"] == "Apply"
                       for m in obj["metadata"]["managedFields"]), (kind, name)  # fmt: skip

    # Every write was a server-side apply with our manager; force was never needed on a fresh cluster.
    for r in api.writes():
        assert r.method == "PATCH" and r.content_type == "application/apply-patch+yaml", (r.method, r.path)
        assert r.query["fieldManager"] == FIELD_MANAGER
        if r.query.get("force"):  # only the inventory, which is ours alone by construction
            assert r.path.startswith("/api/v1/namespaces/kube-system/configmaps/flotilla-bundle-"), r.path
    # The CRD went in first and the Widget only once the API served its kind.
    paths = [r.path for r in api.writes()]
    crd_at = paths.index("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com")
    widget_at = paths.index("/apis/example.com/v1/widgets/default")
    assert crd_at < widget_at
    assert all("example.com/v1/widgets" not in p for p in paths[:crd_at])
    # The webhook's CA was injected by another manager; the gate saw it and the service's ready endpoints.
    hook = api.get("ValidatingWebhookConfiguration", "widgets-webhook")
    assert hook is not None and hook["webhooks"][0]["clientConfig"]["caBundle"]
    assert await target.service_healthy(CLUSTER, "widgets")


async def test_reapplying_unchanged_bundles_changes_nothing(api: FakeKubeApi, target: KubernetesApiTarget) -> None:
    services = [("namespaces", "1.0.0"), ("app", "1.0.0"), ("widgets", "1.0.0"), ("agent", "1.0.0")]
    await install(target, *services)
    before = resource_versions(api)
    writes = len(api.writes())

    for name, version in services:
        report = await target.apply(CLUSTER, name, version, {})
        assert not report.changed and not report.forced and not report.pruned, (name, report)
        assert report.unchanged
    # Same resourceVersion everywhere (CRD, CR, webhook with its injected CA, statuses included); nothing deleted.
    assert resource_versions(api) == before
    assert not [r for r in api.writes()[writes:] if r.method != "PATCH"]
    # A fresh adapter (another replica, a restart) agrees: discovery is rebuilt, still nothing changes.
    again = target_for(api)
    for name, version in services:
        assert not (await again.apply(CLUSTER, name, version, {})).changed
    assert resource_versions(api) == before


# ---------------------------------------------------------------- version bump and prune
async def test_version_bump_updates_changed_objects_and_prunes_removed_ones(
    api: FakeKubeApi, target: KubernetesApiTarget
) -> None:
    await install(target, ("namespaces", "1.0.0"), ("app", "1.0.0"), ("agent", "1.0.0"))
    # Someone else's ConfigMap in the same namespace (no labels): never pruned.
    edit_free = api.api_client()
    dynamic_client(edit_free).resources.get(prefix="api", api_version="v1", kind="ConfigMap").create(
        body=config_map("hand-made", {"a": "b"}), namespace=NS)  # fmt: skip
    dep_rv = api.resource_version("Deployment", "web", NS)
    agent_rv = api.resource_version("DaemonSet", "agent", NS)

    report = await target.apply(CLUSTER, "app", "2.0.0", {})
    await target.wait_healthy(CLUSTER, "app", 5)

    assert sorted(report.updated) == ["ConfigMap team-a/web-settings", "Deployment team-a/web",
                                      "ServiceAccount team-a/web"]  # fmt: skip
    assert report.created == ["ConfigMap team-a/web-extra"]
    assert report.pruned == ["Service team-a/web"]
    assert api.get("ConfigMap", "web-settings", NS)["data"] == {"level": "debug", "color": "blue"}  # type: ignore[index]
    dep = api.get("Deployment", "web", NS)
    assert dep is not None and dep["metadata"]["resourceVersion"] != dep_rv
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/web:2.0"
    assert "annotations" not in dep["metadata"]  # a field the bundle stopped declaring is removed
    assert dep["metadata"]["labels"][LABEL_BUNDLE_VERSION] == "2.0.0"
    assert api.get("Service", "web", NS) is None  # its kind is gone from the bundle: found through the inventory
    assert api.get("ConfigMap", "web-extra", NS) is not None
    assert api.get("ConfigMap", "hand-made", NS) is not None
    assert api.get("Namespace", NS) is not None
    assert api.resource_version("DaemonSet", "agent", NS) == agent_rv  # another bundle: untouched
    inventory = api.get("ConfigMap", "flotilla-bundle-app", "kube-system")
    assert inventory is not None and inventory["data"]["version"] == "2.0.0"
    assert json.loads(inventory["data"]["kinds"]) == ["apps/v1 Deployment", "v1 ConfigMap", "v1 ServiceAccount"]

    # Once more: nothing left to do.
    again = await target.apply(CLUSTER, "app", "2.0.0", {})
    assert not again.changed


async def test_removing_a_service_deletes_its_objects_and_not_found_is_done(
    api: FakeKubeApi, target: KubernetesApiTarget
) -> None:
    await install(target, ("namespaces", "1.0.0"), ("app", "1.0.0"), ("widgets", "1.0.0"))
    await target.remove_service(CLUSTER, "widgets")
    assert api.get("CustomResourceDefinition", "widgets.example.com") is None
    assert api.get("Deployment", "widget-controller", NS) is None
    assert api.get("ValidatingWebhookConfiguration", "widgets-webhook") is None
    assert api.get("ConfigMap", "flotilla-bundle-widgets", "kube-system") is None
    assert "example.com/v1 Widget" not in api.served()
    assert api.get("Deployment", "web", NS) is not None  # other bundles stay
    await target.remove_service(CLUSTER, "widgets")  # already gone: done
    await target.remove_service(CLUSTER, "never-installed")
    assert not await target.service_healthy(CLUSTER, "widgets")


async def test_a_crd_deleted_behind_our_back_does_not_wedge_prune_or_apply(
    api: FakeKubeApi, target: KubernetesApiTarget
) -> None:
    await install(target, ("namespaces", "1.0.0"), ("widgets", "1.0.0"))
    crds = dynamic_client(api.api_client()).resources.get(
        prefix="apis", group="apiextensions.k8s.io", api_version="v1", kind="CustomResourceDefinition")  # fmt: skip
    crds.delete(name="widgets.example.com")  # the adapter's discovery still lists Widget
    assert await target.detect_drift(CLUSTER, "widgets", "1.0.0", {}) == [
        "CustomResourceDefinition widgets.example.com: missing", "Widget default: missing"]  # fmt: skip
    await target.apply_service(CLUSTER, "widgets", "1.0.0", {})  # re-creates both
    assert api.get("Widget", "default") is not None
    crds.delete(name="widgets.example.com")
    await target.remove_service(CLUSTER, "widgets")
    assert api.get("Deployment", "widget-controller", NS) is None


async def test_clusters_are_served_concurrently() -> None:
    with running() as one, running() as two, running() as three:
        clients = {f"c{i}": fake.api_client() for i, fake in enumerate((one, two, three))}
        target = KubernetesApiTarget(lambda cluster: clients[cluster.cluster_id], render)
        target.health_poll_s = 0.02
        clusters = [ClusterRef(cluster_id=cid, endpoint="") for cid in clients]

        async def everything(cluster: ClusterRef) -> None:
            for name in ("namespaces", "app", "widgets", "agent"):
                await target.apply_service(cluster, name, "1.0.0", {})
                await target.wait_healthy(cluster, name, 5)

        await asyncio.gather(*(everything(c) for c in clusters))
        for fake in (one, two, three):
            assert fake.get("Widget", "default") is not None and fake.get("DaemonSet", "agent", NS) is not None


# ---------------------------------------------------------------- health gates
async def test_a_deployment_that_never_becomes_available_fails_its_gate_naming_it_then_recovers(
    bare_api: FakeKubeApi,
) -> None:
    target = target_for(bare_api)
    client = bare_api.api_client()
    await target.apply_service(CLUSTER, "namespaces", "1.0.0", {})
    await target.apply_service(CLUSTER, "agent", "1.0.0", {})

    with pytest.raises(GateTimeout) as failed:
        await target.wait_healthy(CLUSTER, "agent", 0.2)
    assert isinstance(failed.value, HealthTimeout)  # the installer retries it like any health timeout
    assert failed.value.object == "Deployment team-a/collector"
    assert "generation 1 not observed" in failed.value.reason
    assert "agent on eks-prod-euw1-0001" in str(failed.value) and "Deployment team-a/collector" in str(failed.value)
    assert "1 more gate(s) failing" in failed.value.reason  # the DaemonSet is not rolled out either

    # The controller observes it but the pods never become available.
    set_status(client, "apps/v1", "Deployment", "collector", NS, {
        "observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "unavailableReplicas": 2,
        "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                        "message": "Deployment does not have minimum availability."}]})  # fmt: skip
    with pytest.raises(GateTimeout) as failed:
        await target.wait_healthy(CLUSTER, "agent", 0.2)
    assert failed.value.object == "Deployment team-a/collector"
    assert failed.value.reason.startswith("0 of 2 replicas available (MinimumReplicasUnavailable")

    # It recovers; now the DaemonSet is what is missing.
    set_status(client, "apps/v1", "Deployment", "collector", NS, {
        "observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2,
        "unavailableReplicas": None,
        "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]})  # fmt: skip
    set_status(client, "apps/v1", "DaemonSet", "agent", NS, {
        "observedGeneration": 1, "desiredNumberScheduled": 3, "currentNumberScheduled": 3,
        "updatedNumberScheduled": 3, "numberReady": 1, "numberAvailable": 1})  # fmt: skip
    with pytest.raises(GateTimeout) as failed:
        await target.wait_healthy(CLUSTER, "agent", 0.2)
    assert (failed.value.object, failed.value.reason) == ("DaemonSet team-a/agent", "1 of 3 pods available")

    set_status(client, "apps/v1", "DaemonSet", "agent", NS, {"numberReady": 3, "numberAvailable": 3})
    await target.wait_healthy(CLUSTER, "agent", 5)
    assert await target.service_healthy(CLUSTER, "agent")


async def test_a_stalled_rollout_times_out_and_passes_once_recovered(api: FakeKubeApi) -> None:
    target = target_for(api)
    await install(target, ("namespaces", "1.0.0"))
    api.stall("Deployment", "web", NS)
    await target.apply_service(CLUSTER, "app", "1.0.0", {})

    async def recover_later() -> None:
        await asyncio.sleep(0.3)
        api.recover("Deployment", "web", NS)

    with pytest.raises(GateTimeout, match=r"Deployment team-a/web: 0 of 2 replicas available"):
        await target.wait_healthy(CLUSTER, "app", 0.15)
    recovering = asyncio.create_task(recover_later())
    await target.wait_healthy(CLUSTER, "app", 3)
    await recovering


async def test_objects_using_a_crd_wait_until_it_is_established(bare_api: FakeKubeApi) -> None:
    target = target_for(bare_api, crd_timeout_s=5)
    client = bare_api.api_client()
    await target.apply_service(CLUSTER, "namespaces", "1.0.0", {})
    applying = asyncio.create_task(target.apply_service(CLUSTER, "widgets", "1.0.0", {}))
    await wait_until(lambda: bare_api.get("CustomResourceDefinition", "widgets.example.com"), within=5, interval=0.01)
    await asyncio.sleep(0.2)
    assert not applying.done()
    assert bare_api.get("Deployment", "widget-controller", NS) is None  # nothing after the CRD yet
    assert not bare_api.calls("PATCH", "/widgets/")

    set_status(client, "apiextensions.k8s.io/v1", "CustomResourceDefinition", "widgets.example.com", None,
               {"conditions": [{"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                               {"type": "Established", "status": "True"}]})  # fmt: skip
    await asyncio.wait_for(applying, 5)
    assert bare_api.get("Widget", "default") is not None

    # The webhook gate: the service has no ready endpoints and nobody injected a CA.
    set_status(client, "apps/v1", "Deployment", "widget-controller", NS, {
        "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1})  # fmt: skip
    with pytest.raises(GateTimeout) as failed:
        await target.wait_healthy(CLUSTER, "widgets", 0.1)
    assert failed.value.object == "ValidatingWebhookConfiguration widgets-webhook"
    assert "caBundle is empty" in failed.value.reason


async def test_a_crd_that_never_becomes_established_fails_naming_it(bare_api: FakeKubeApi) -> None:
    target = target_for(bare_api, crd_timeout_s=0.2)
    await target.apply_service(CLUSTER, "namespaces", "1.0.0", {})
    with pytest.raises(GateTimeout) as failed:
        await target.apply_service(CLUSTER, "widgets", "1.0.0", {})
    assert failed.value.object == "CustomResourceDefinition widgets.example.com"
    assert failed.value.reason == "not Established"


async def test_health_gates_are_known_to_a_fresh_adapter_through_the_inventory(
    api: FakeKubeApi, target: KubernetesApiTarget
) -> None:
    await install(target, ("namespaces", "1.0.0"), ("agent", "1.0.0"))
    restarted = target_for(api)
    assert await restarted.service_healthy(CLUSTER, "agent")
    api.stall("DaemonSet", "agent", NS)
    with pytest.raises(GateTimeout, match=r"DaemonSet team-a/agent: 0 of 3 pods available"):
        await restarted.wait_healthy(CLUSTER, "agent", 0.1)
    assert not await target_for(api).service_healthy(CLUSTER, "never-installed")


# ---------------------------------------------------------------- drift
async def test_drift_is_detected_on_fields_we_own_and_corrected(api: FakeKubeApi, target: KubernetesApiTarget) -> None:
    await install(target, ("namespaces", "1.0.0"), ("app", "1.0.0"))
    assert await target.detect_drift(CLUSTER, "app", "1.0.0", {}) == []

    # Edited behind our back: an image through `kubectl edit`, a config value, our label removed, and a
    # field taken over with a forced apply by another tool.
    edit(api, "apps/v1", "Deployment", "web", NS,
         {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "evil:latest",
                                                         "env": [{"name": "MODE", "value": "prod"}]}]}}}})  # fmt: skip
    edit(api, "v1", "ConfigMap", "web-settings", NS, {"data": {"level": "trace"}})
    edit(api, "v1", "ServiceAccount", "web", NS, {"metadata": {"labels": {LABEL_BUNDLE_VERSION: None}}})
    helm = dynamic_client(api.api_client())
    helm.server_side_apply(helm.resources.get(prefix="api", api_version="v1", kind="Service"),
                           body={"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
                                 "spec": {"ports": [{"port": 8080}]}},
                           field_manager="helm", force_conflicts=True)  # fmt: skip
    assert "helm" in api.managers("Service", "web", NS)

    drift = await target.detect_drift(CLUSTER, "app", "1.0.0", {})
    assert sorted(drift) == sorted([
        'Deployment team-a/web: .spec.template.spec.containers[name="web"].image',
        "ConfigMap team-a/web-settings: .data.level",
        f"ServiceAccount team-a/web: .metadata.labels.{LABEL_BUNDLE_VERSION}",
        "Service team-a/web: .spec.ports",
    ])  # fmt: skip

    corrected = await target.correct_drift(CLUSTER, "app", "1.0.0", {})
    assert sorted(corrected) == sorted(drift)
    dep = api.get("Deployment", "web", NS)
    assert dep is not None
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/web:1.0"
    assert api.get("ConfigMap", "web-settings", NS)["data"]["level"] == "info"  # type: ignore[index]
    assert api.get("ServiceAccount", "web", NS)["metadata"]["labels"][LABEL_BUNDLE_VERSION] == "1.0.0"  # type: ignore[index]
    assert api.get("Service", "web", NS)["spec"]["ports"][0]["port"] == 443  # type: ignore[index]
    # The fields are ours again: the other managers no longer own them.
    assert '.spec.template.spec.containers[name="web"].image' in api.managers("Deployment", "web", NS)[FIELD_MANAGER]
    assert "kubectl-edit" not in api.managers("Deployment", "web", NS)
    assert "kubectl-edit" not in api.managers("ConfigMap", "web-settings", NS)
    assert await target.detect_drift(CLUSTER, "app", "1.0.0", {}) == []
    assert await target.correct_drift(CLUSTER, "app", "1.0.0", {}) == []


async def test_a_deleted_object_is_drift_and_comes_back(api: FakeKubeApi, target: KubernetesApiTarget) -> None:
    await install(target, ("namespaces", "1.0.0"), ("app", "1.0.0"))
    dynamic_client(api.api_client()).resources.get(prefix="api", api_version="v1", kind="ConfigMap").delete(
        name="web-settings", namespace=NS)  # fmt: skip
    assert await target.detect_drift(CLUSTER, "app", "1.0.0", {}) == ["ConfigMap team-a/web-settings: missing"]
    assert await target.correct_drift(CLUSTER, "app", "1.0.0", {}) == ["ConfigMap team-a/web-settings: missing"]
    assert api.get("ConfigMap", "web-settings", NS) is not None


async def test_fields_owned_by_another_manager_and_not_by_us_are_left_alone(
    api: FakeKubeApi, target: KubernetesApiTarget
) -> None:
    await install(target, ("namespaces", "1.0.0"), ("app", "1.0.0"), ("widgets", "1.0.0"))
    # An autoscaler sets replicas on a Deployment whose bundle does not declare them; a team annotates our
    # ConfigMap; cert-manager's cainjector filled the webhook's caBundle (checked below).
    edit(api, "apps/v1", "Deployment", "widget-controller", NS, {"spec": {"replicas": 5}}, manager="hpa-controller")
    edit(api, "v1", "ConfigMap", "web-settings", NS,
         {"metadata": {"annotations": {"team.example.com/owner": "alice"}}, "data": {"extra": "x"}},
         manager="team-tool")  # fmt: skip
    ca_before = api.get("ValidatingWebhookConfiguration", "widgets-webhook")["webhooks"][0]["clientConfig"]["caBundle"]  # type: ignore[index]
    assert "cainjector" in api.managers("ValidatingWebhookConfiguration", "widgets-webhook")

    assert await target.detect_drift(CLUSTER, "widgets", "1.0.0", {}) == []
    assert await target.detect_drift(CLUSTER, "app", "1.0.0", {}) == []
    for name in ("app", "widgets"):
        report = await target.apply(CLUSTER, name, "1.0.0", {})
        assert not report.changed and not report.forced, report
        assert await target.correct_drift(CLUSTER, name, "1.0.0", {}) == []

    assert api.get("Deployment", "widget-controller", NS)["spec"]["replicas"] == 5  # type: ignore[index]
    cm = api.get("ConfigMap", "web-settings", NS)
    assert cm is not None and cm["metadata"]["annotations"] == {"team.example.com/owner": "alice"}
    assert cm["data"] == {"level": "info", "color": "blue", "extra": "x"}
    hook = api.get("ValidatingWebhookConfiguration", "widgets-webhook")
    assert hook is not None and hook["webhooks"][0]["clientConfig"]["caBundle"] == ca_before
    assert ".spec.replicas" in api.managers("Deployment", "widget-controller", NS)["hpa-controller"]
    assert await target.service_healthy(CLUSTER, "widgets")


async def test_secret_values_are_applied_as_data_and_never_reported(
    api: FakeKubeApi, target: KubernetesApiTarget
) -> None:
    await install(target, ("namespaces", "1.0.0"), ("pull-secret", "1.0.0"))
    secret = api.get("Secret", "registry", NS)
    assert secret is not None and base64.b64decode(secret["data"]["token"]) == b"s3cr3t-value"
    assert "stringData" not in secret
    assert await target.detect_drift(CLUSTER, "pull-secret", "1.0.0", {}) == []
    edit(api, "v1", "Secret", "registry", NS, {"data": {"token": base64.b64encode(b"other").decode()}})
    drift = await target.detect_drift(CLUSTER, "pull-secret", "1.0.0", {})
    assert drift == ["Secret team-a/registry: .data.token"]
    assert await target.correct_drift(CLUSTER, "pull-secret", "1.0.0", {}) == drift
    assert base64.b64decode(api.get("Secret", "registry", NS)["data"]["token"]) == b"s3cr3t-value"  # type: ignore[index]


async def test_objects_marked_after_health_wait_for_the_gates(bare_api: FakeKubeApi) -> None:
    target = target_for(bare_api, health_timeout_s=5)
    await target.apply_service(CLUSTER, "namespaces", "1.0.0", {})
    applying = asyncio.create_task(target.apply_service(CLUSTER, "issuer", "1.0.0", {}))
    await wait_until(lambda: bare_api.get("Deployment", "issuer-webhook", NS), within=5, interval=0.01)
    await asyncio.sleep(0.1)
    assert not applying.done() and bare_api.get("ConfigMap", "issuer", NS) is None
    set_status(bare_api.api_client(), "apps/v1", "Deployment", "issuer-webhook", NS, {
        "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1})  # fmt: skip
    await asyncio.wait_for(applying, 5)
    assert bare_api.get("ConfigMap", "issuer", NS)["data"] == {"acme": "https://acme.example.com"}  # type: ignore[index]

    slow = target_for(bare_api, health_timeout_s=0.1)
    set_status(bare_api.api_client(), "apps/v1", "Deployment", "issuer-webhook", NS, {"availableReplicas": 0})
    with pytest.raises(GateTimeout, match=r"Deployment team-a/issuer-webhook: 0 of 1 replicas available"):
        await slow.apply_service(CLUSTER, "issuer", "1.0.0", {})


async def test_secret_references_are_resolved_at_apply_time_and_never_reported(api: FakeKubeApi) -> None:
    store = {REGISTRY_REF: b'{"auths":{"registry.example.com":{"auth":"dG9rZW4="}}}'}
    asked: list[str] = []

    def resolve(ref: str) -> bytes:
        asked.append(ref)
        return store[ref]

    client = api.api_client()
    target = KubernetesApiTarget(lambda cluster: client, render, resolve_secret=resolve)
    await install(target, ("namespaces", "1.0.0"), ("registry-secrets", "1.0.0"))
    secret = api.get("Secret", "pull", NS)
    assert secret is not None and base64.b64decode(secret["data"][".dockerconfigjson"]) == store[REGISTRY_REF]
    assert asked == [REGISTRY_REF]
    assert await target.detect_drift(CLUSTER, "registry-secrets", "1.0.0", {}) == []

    # The value was rotated in the store: that is drift on the key, reported without any value.
    store[REGISTRY_REF] = b'{"auths":{"registry.example.com":{"auth":"bmV3"}}}'
    drift = await target.correct_drift(CLUSTER, "registry-secrets", "1.0.0", {})
    assert drift == ["Secret team-a/pull: .data..dockerconfigjson"]
    assert base64.b64decode(api.get("Secret", "pull", NS)["data"][".dockerconfigjson"]) == store[REGISTRY_REF]  # type: ignore[index]

    del store[REGISTRY_REF]
    with pytest.raises(InstallError, match=r"resolving vault://platform/registry for Secret team-a/pull failed"):
        await target.apply_service(CLUSTER, "registry-secrets", "1.0.0", {})
    with pytest.raises(InstallError, match="no secret resolver"):
        await target_for(api).apply_service(CLUSTER, "registry-secrets", "1.0.0", {})


# ---------------------------------------------------------------- ownership and errors
async def test_objects_we_did_not_create_are_never_taken_over(api: FakeKubeApi, target: KubernetesApiTarget) -> None:
    await install(target, ("namespaces", "1.0.0"))
    dyn = dynamic_client(api.api_client())
    cms = dyn.resources.get(prefix="api", api_version="v1", kind="ConfigMap")
    cms.create(body=config_map("web-settings", {"level": "theirs"}), namespace=NS)
    with pytest.raises(InstallError, match=r"ConfigMap team-a/web-settings exists and is not managed by flotilla"):
        await target.apply_service(CLUSTER, "app", "1.0.0", {})
    assert api.get("ConfigMap", "web-settings", NS)["data"] == {"level": "theirs"}  # type: ignore[index]
    assert not [r for r in api.calls("PATCH", "web-settings") if r.query.get("force")]

    # An object of another bundle of ours is refused too (two bundles declaring one object is a catalog bug).
    cms.delete(name="web-settings", namespace=NS)
    other = config_map("web-settings", {"level": "x"})
    other["metadata"]["labels"] = {LABEL_MANAGED_BY: "flotilla", LABEL_BUNDLE: "logging"}
    cms.create(body=other, namespace=NS)
    with pytest.raises(InstallError, match=r"belongs to bundle 'logging'"):
        await target.apply_service(CLUSTER, "app", "1.0.0", {})


async def test_api_errors_and_an_unreachable_server_are_install_errors(api: FakeKubeApi) -> None:
    target = target_for(api)
    await install(target, ("namespaces", "1.0.0"))
    api.fail("PATCH", r"/deployments/web$", 500, "etcdserver: request timed out")
    with pytest.raises(InstallError, match=r"500 .*etcdserver: request timed out"):
        await target.apply_service(CLUSTER, "app", "1.0.0", {})
    await target.apply_service(CLUSTER, "app", "1.0.0", {})  # the retry converges
    assert api.get("Deployment", "web", NS) is not None

    with running() as other:
        dead_url = other.url
    cfg = Configuration()
    cfg.host, cfg.retries = dead_url, 0  # nothing listens there any more
    dead = ApiClient(cfg)
    unreachable = KubernetesApiTarget(lambda cluster: dead, render, request_timeout_s=2)
    with pytest.raises(InstallError, match="unreachable"):
        await unreachable.apply_service(CLUSTER, "namespaces", "1.0.0", {})
    assert not await unreachable.service_healthy(CLUSTER, "namespaces")


async def test_a_kind_the_cluster_does_not_serve_is_an_install_error(api: FakeKubeApi) -> None:
    BUNDLES[("orphan", "1.0.0")] = Bundle("orphan", "1.0.0", (), (copy.deepcopy(WIDGET),))
    try:
        with pytest.raises(InstallError, match=r"example.com/v1 Widget is not served"):
            await target_for(api).apply_service(CLUSTER, "orphan", "1.0.0", {})
    finally:
        del BUNDLES[("orphan", "1.0.0")]


# ---------------------------------------------------------------- the fake answers like an API server
def test_fake_conflicts_selectors_and_validation(api: FakeKubeApi) -> None:
    dyn = dynamic_client(api.api_client())
    cms = dyn.resources.get(prefix="api", api_version="v1", kind="ConfigMap")
    body = config_map("c", {"k": "1"}, "default")
    body["metadata"]["labels"] = {"tier": "a"}
    dyn.server_side_apply(cms, body=body, field_manager="one", namespace="default")
    first = api.resource_version("ConfigMap", "c", "default")
    dyn.server_side_apply(cms, body=body, field_manager="one", namespace="default")
    assert api.resource_version("ConfigMap", "c", "default") == first  # no-op apply
    clash = copy.deepcopy(body)
    clash["data"]["k"] = "2"
    with pytest.raises(ConflictError) as conflict:
        dyn.server_side_apply(cms, body=clash, field_manager="two", namespace="default")
    assert 'conflict with \\"one\\": .data.k' in conflict.value.body
    same = copy.deepcopy(body)
    dyn.server_side_apply(cms, body=same, field_manager="two", namespace="default")  # same value: co-owned
    assert {m for m, paths in api.managers("ConfigMap", "c", "default").items() if ".data.k" in paths} == {"one", "two"}

    other = config_map("d", {}, "default")
    other["metadata"]["labels"] = {"tier": "b"}
    dyn.server_side_apply(cms, body=other, field_manager="one", namespace="default")
    names = lambda sel: sorted(i.metadata.name for i in cms.get(namespace="default", label_selector=sel).items)  # noqa: E731
    assert names("tier in (a,b)") == ["c", "d"]
    assert names("tier notin (a)") == ["d"]
    assert names("tier!=a") == ["d"]
    assert names("tier=b") == ["d"]
    assert names("!tier") == []

    bad = config_map("e", {}, "default")
    bad["metadata"]["labels"] = {"v": "1.0+build"}
    with pytest.raises(Exception, match="422"):
        dyn.server_side_apply(cms, body=bad, field_manager="one", namespace="default")
    with pytest.raises(Exception, match="404"):
        dyn.server_side_apply(cms, body=config_map("f", {}, "no-such-namespace"), field_manager="one")


def test_drift_comparison_ignores_defaults_and_other_fields() -> None:
    desired = {"spec": {"replicas": 2, "ports": [{"port": 443}], "containers": [{"name": "a", "image": "x"}]}}
    live: Json = {"spec": {"replicas": 2, "ports": [{"port": 443, "protocol": "TCP"}], "type": "ClusterIP",
                     "containers": [{"name": "b", "image": "y"},
                                    {"name": "a", "image": "x", "imagePullPolicy": "Always"}]}}  # fmt: skip
    assert drift_paths(desired, live) == []
    live["spec"]["ports"].append({"port": 80})
    live["spec"]["containers"][1]["image"] = "z"
    assert drift_paths(desired, live) == [".spec.ports", '.spec.containers[name="a"].image']
