"""The infra-service bundles: determinism, ownership, order, health gates and the content that matters.

`context_for(example)` builds the RenderContext the installer would have for a cluster of an example
ClusterSet (provisioning results shaped like each cloud driver's); the schema suite uses it too.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.infra_installer.bundles import (
    BundleError,
    CustomBundleError,
    apply_phases,
    bundle_digest,
    canonical_json,
    load_custom_bundles,
    render_bundle,
)
from services.infra_installer.bundles.catalog import RENDERERS
from services.infra_installer.bundles.common import NAMESPACE_OF
from services.infra_installer.bundles.model import (
    LABEL_BUNDLE,
    LABEL_BUNDLE_VERSION,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    Bundle,
    RenderContext,
)
from services.infra_installer.bundles.secrets import (
    SECRET_KEY_ANNOTATION,
    SECRET_REF_ANNOTATION,
    redacted,
    secret_slots,
    with_secret_value,
)
from shared.catalog import CATALOG
from shared.events import validate_clusterset
from shared.events.clusterset import ClusterSpec
from tests.conftest import example_documents
from tests.helpers import sample_resources

EXAMPLES = example_documents()
SERVERLESS = "serverless-prod-gcp-europe-west4"
MODELSERVING = "modelserving-prod-aws-us-east-1"
DATAENG = "dataeng-staging-azure-westeurope"
SELFMANAGED = "core-prod-aws-eu-west-1"
REGISTRY_REF = "vault://platform/registry"


def context_for(example: str, *, spec: ClusterSpec | None = None, registry_secret_ref: str | None = REGISTRY_REF,
                resources: dict[str, dict[str, Any]] | None = None) -> RenderContext:  # fmt: skip
    cs, errors = validate_clusterset(EXAMPLES[example])
    assert cs is not None, errors
    cluster_id = f"{cs.metadata.name[:40]}-7f3a"
    loc = cs.metadata.location
    return RenderContext(
        cluster_id=cluster_id, clusterset=cs.metadata.name, cluster_type=cs.metadata.cluster_type, location=loc,
        spec=spec or cs.spec.cluster_spec(),
        resources=resources if resources is not None else sample_resources(loc.cloud, cluster_id, loc.region),
        registry_secret_ref=registry_secret_ref,
    )  # fmt: skip


def render_listed(example: str, ctx: RenderContext | None = None) -> dict[str, Bundle]:
    """Every service the example lists, at the catalog's version, with the example's values (none)."""
    ctx = ctx or context_for(example)
    return {s: render_bundle(s, CATALOG[s].version, {}, ctx) for s in ctx.spec.infra_service_names()}


def with_services(example: str, services: list[Any]) -> ClusterSpec:
    """The example's cluster spec with another infraServices list (validated like the planner would)."""
    dumped = context_for(example).spec.model_dump()
    return ClusterSpec.model_validate({**dumped, "infra_services": services}, strict=False)


def find(bundle: Bundle, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    hits = [o for o in bundle.objects if o["kind"] == kind and o["metadata"]["name"] == name
            and o["metadata"].get("namespace") == namespace]  # fmt: skip
    assert len(hits) == 1, f"{kind} {namespace}/{name}: {len(hits)} found"
    return hits[0]


def kinds(bundle: Bundle) -> list[str]:
    return [o["kind"] for o in bundle.objects]


def pod_specs(bundle: Bundle) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(o, o["spec"]["template"]["spec"]) for o in bundle.objects if o["kind"] in ("Deployment", "DaemonSet")]


ALL_CASES = [(ex, s) for ex in EXAMPLES for s in context_for(ex).spec.infra_service_names()]


# ---------------------------------------------------------------- every bundle: determinism, ownership, order
def test_every_catalog_service_has_a_renderer() -> None:
    assert set(RENDERERS) == set(CATALOG)


@pytest.mark.parametrize(("example", "service"), ALL_CASES)
def test_rendering_is_deterministic_and_pure(example: str, service: str) -> None:
    ctx = context_for(example)
    ctx_before = copy.deepcopy(ctx)
    values: dict[str, Any] = {}
    first = render_bundle(service, CATALOG[service].version, values, ctx)
    # Mutating what a render returned must not leak into the next render (nothing shared).
    for obj in first.objects:
        obj["metadata"]["labels"]["tampered"] = "yes"
        obj.setdefault("spec", {})["tampered"] = True
    again = render_bundle(service, CATALOG[service].version, values, ctx)
    third = render_bundle(service, CATALOG[service].version, dict(values), copy.deepcopy(ctx))
    assert canonical_json(again) == canonical_json(third)
    assert all("tampered" not in o["metadata"]["labels"] for o in again.objects)
    assert ctx == ctx_before and values == {}
    assert bundle_digest(again) == bundle_digest(third)


def test_output_is_byte_identical_across_processes() -> None:
    """Another interpreter, another hash seed: the same bytes (no set or dict-order accident)."""
    digests = {f"{ex}/{s}": bundle_digest(b) for ex in EXAMPLES for s, b in render_listed(ex).items()}
    script = textwrap.dedent("""
        import json
        from tests.unit.test_bundles import EXAMPLES, render_listed
        from services.infra_installer.bundles import bundle_digest
        print(json.dumps({f"{ex}/{s}": bundle_digest(b) for ex in EXAMPLES for s, b in render_listed(ex).items()}))
    """)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert json.loads(done.stdout.strip().splitlines()[-1]) == digests


def test_values_key_order_does_not_matter() -> None:
    ctx = context_for(SERVERLESS)
    a = render_bundle("tenant-isolation", "1.0.0", {"tenants": ["t1", "t2"], "allowInternetEgress": False}, ctx)
    b = render_bundle("tenant-isolation", "1.0.0", {"allowInternetEgress": False, "tenants": ["t1", "t2"]}, ctx)
    assert canonical_json(a) == canonical_json(b)


@pytest.mark.parametrize(("example", "service"), ALL_CASES)
def test_ownership_labels_on_every_object(example: str, service: str) -> None:
    bundle = render_bundle(service, CATALOG[service].version, {}, context_for(example))
    assert bundle.objects, "a bundle without objects"
    for obj in bundle.objects:
        labels = obj["metadata"]["labels"]
        assert labels[LABEL_MANAGED_BY] == MANAGED_BY
        assert labels[LABEL_BUNDLE] == service
        assert labels[LABEL_BUNDLE_VERSION] == CATALOG[service].version
    assert bundle.name == service and bundle.version == CATALOG[service].version
    assert bundle.depends_on == CATALOG[service].depends_on


def test_version_is_the_label_and_image_tag() -> None:
    bundle = render_bundle("cert-manager", "v1.16.1", {}, context_for(SERVERLESS))
    assert {o["metadata"]["labels"][LABEL_BUNDLE_VERSION] for o in bundle.objects} == {"v1.16.1"}
    images = {c["image"] for _, pod in pod_specs(bundle) for c in pod["containers"]}
    assert images == {f"quay.io/jetstack/cert-manager-{c}:v1.16.1" for c in ("controller", "cainjector", "webhook")}
    with pytest.raises(BundleError, match="label value"):
        render_bundle("cert-manager", "1.16 beta", {}, context_for(SERVERLESS))


@pytest.mark.parametrize(("example", "service"), ALL_CASES)
def test_apply_order_crds_first_custom_resources_last(example: str, service: str) -> None:
    bundle = render_bundle(service, CATALOG[service].version, {}, context_for(example))
    ks = kinds(bundle)
    crds = [i for i, k in enumerate(ks) if k == "CustomResourceDefinition"]
    assert crds == list(range(len(crds))), "CRDs must come first"
    namespaces = {o["metadata"]["name"]: i for i, o in enumerate(bundle.objects) if o["kind"] == "Namespace"}
    for i, obj in enumerate(bundle.objects):
        ns = obj["metadata"].get("namespace")
        if ns in namespaces:
            assert namespaces[ns] < i, f"{obj['kind']} {ns}/{obj['metadata']['name']} before its namespace"
    # Objects of a kind our CRDs define come after every CRD, workload and webhook configuration.
    defined = {c["spec"]["names"]["kind"] for c in bundle.objects if c["kind"] == "CustomResourceDefinition"}
    last_builtin = max((i for i, k in enumerate(ks) if k not in defined), default=-1)
    assert all(i > last_builtin for i, k in enumerate(ks) if k in defined)


def test_cert_manager_crds_precede_everything_and_issuer_waits_for_health() -> None:
    bundle = render_bundle("cert-manager", "v1.15.3", {}, context_for(MODELSERVING))
    assert kinds(bundle)[:6] == ["CustomResourceDefinition"] * 6
    names = [o["metadata"]["name"] for o in bundle.objects[:6]]
    assert {"certificates.cert-manager.io", "issuers.cert-manager.io", "clusterissuers.cert-manager.io",
            "certificaterequests.cert-manager.io"} <= set(names)  # fmt: skip
    first, later = apply_phases(bundle)
    assert [o["kind"] for o in later] == ["ClusterIssuer"]
    assert len(first) + len(later) == len(bundle.objects)
    assert kinds(bundle)[-3:] == ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "ClusterIssuer"]


# ---------------------------------------------------------------- health gates
GATE_KINDS = {"DeploymentAvailable": "Deployment", "DaemonSetRolledOut": "DaemonSet",
              "CRDEstablished": "CustomResourceDefinition", "WebhookReady": "ValidatingWebhookConfiguration"}


@pytest.mark.parametrize(("example", "service"), ALL_CASES)
def test_every_workload_is_gated_and_every_gate_names_a_rendered_object(example: str, service: str) -> None:
    bundle = render_bundle(service, CATALOG[service].version, {}, context_for(example))
    gated = {(GATE_KINDS[g.kind], g.namespace, g.name) for g in bundle.health}
    present = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in bundle.objects}
    assert gated <= present
    needs_gate = {p for p in present if p[0] in GATE_KINDS.values()}
    assert needs_gate == gated
    assert len(bundle.health) == len(set(bundle.health))


def test_cert_manager_gates() -> None:
    health = render_bundle("cert-manager", "v1.15.3", {}, context_for(SERVERLESS)).health
    by_kind: dict[str, list[str]] = {}
    for g in health:
        by_kind.setdefault(g.kind, []).append(g.name)
    assert sorted(by_kind["CRDEstablished"]) == sorted([
        "certificates.cert-manager.io", "certificaterequests.cert-manager.io", "issuers.cert-manager.io",
        "clusterissuers.cert-manager.io", "orders.acme.cert-manager.io", "challenges.acme.cert-manager.io"])
    assert by_kind["DeploymentAvailable"] == ["cert-manager", "cert-manager-cainjector", "cert-manager-webhook"]
    assert by_kind["WebhookReady"] == ["cert-manager-webhook"]
    assert {g.namespace for g in health if g.kind == "DeploymentAvailable"} == {"cert-manager"}


def test_static_bundles_have_no_gates() -> None:
    bundles = render_listed(SERVERLESS)
    for name in ("namespaces", "rbac", "registry-secrets", "tenant-isolation"):
        assert bundles[name].health == ()


# ---------------------------------------------------------------- tenant-isolation, field by field
def test_tenant_isolation_serverless_runtime_class() -> None:
    bundle = render_bundle("tenant-isolation", "1.0.0", {}, context_for(SERVERLESS))
    rc = find(bundle, "RuntimeClass", "kata")
    assert rc["apiVersion"] == "node.k8s.io/v1"
    assert rc["handler"] == "kata"
    # Bound to the pool `sandbox` (label runtime=kata, taint sandbox=kata:NoSchedule).
    assert rc["scheduling"] == {
        "nodeSelector": {"runtime": "kata"},
        "tolerations": [{"key": "sandbox", "operator": "Equal", "value": "kata", "effect": "NoSchedule"}],
    }
    assert rc["overhead"] == {"podFixed": {"cpu": "250m", "memory": "160Mi"}}


def test_tenant_isolation_serverless_namespaces_and_policies() -> None:
    bundle = render_bundle("tenant-isolation", "1.0.0", {}, context_for(SERVERLESS))
    tenants = [o["metadata"]["name"] for o in bundle.objects if o["kind"] == "Namespace"]
    assert tenants == ["tenant-a", "tenant-b"]
    for tenant in tenants:
        labels = find(bundle, "Namespace", tenant)["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
            assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "v1.30"
        assert labels["flotilla.dev/tenant"] == tenant

        policies = {o["metadata"]["name"]: o["spec"] for o in bundle.objects
                    if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == tenant}  # fmt: skip
        assert set(policies) == {"default-deny-all", "allow-dns", "allow-same-namespace", "allow-from-ingress",
                                 "allow-internet-egress"}  # fmt: skip

        assert policies["default-deny-all"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

        assert policies["allow-dns"] == {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{
                "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }],
        }  # fmt: skip

        assert policies["allow-same-namespace"] == {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
            "egress": [{"to": [{"podSelector": {}}]}],
        }

        assert policies["allow-from-ingress"] == {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}]}],
        }  # fmt: skip

        internet = policies["allow-internet-egress"]
        assert internet["podSelector"] == {} and internet["policyTypes"] == ["Egress"]
        assert "ingress" not in internet
        (rule,) = internet["egress"]
        assert "ports" not in rule
        v4, v6 = (peer["ipBlock"] for peer in rule["to"])
        assert v4["cidr"] == "0.0.0.0/0" and v6["cidr"] == "::/0"
        # The metadata endpoints are excluded explicitly.
        assert {"169.254.169.254/32", "169.254.170.2/32"} <= set(v4["except"])
        assert "fd00:ec2::254/128" in v6["except"]
        # So are the private ranges: no way to other tenants' pods, the nodes or the services through this rule.
        assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(v4["except"])


def test_tenant_policies_open_nothing_beyond_the_listed_flows() -> None:
    bundle = render_bundle("tenant-isolation", "1.0.0", {}, context_for(SERVERLESS))
    for policy in (o for o in bundle.objects if o["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: an ingress rule without peers allows everyone"
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to"), f"{policy['metadata']['name']}: an egress rule without peers allows everywhere"
            for peer in rule["to"]:
                if "ipBlock" in peer and peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0"):
                    assert peer["ipBlock"].get("except"), "open egress must exclude the metadata endpoints"


def test_tenant_runtime_enforcement_policy() -> None:
    bundle = render_bundle("tenant-isolation", "1.0.0", {}, context_for(SERVERLESS))
    policy = find(bundle, "ValidatingAdmissionPolicy", "flotilla-tenant-sandbox-runtime")
    assert policy["spec"]["validations"][0]["expression"] == (
        "has(object.spec.runtimeClassName) && object.spec.runtimeClassName == 'kata'")
    assert policy["spec"]["failurePolicy"] == "Fail"
    binding = find(bundle, "ValidatingAdmissionPolicyBinding", "flotilla-tenant-sandbox-runtime")
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"] == {
        "matchExpressions": [{"key": "flotilla.dev/tenant", "operator": "Exists"}]}
    # Before 1.30 the API is beta and off by default: no policy then.
    older = context_for(SERVERLESS, spec=context_for(SERVERLESS).spec.model_copy(update={"kubernetes_version": "1.29"}))
    assert "ValidatingAdmissionPolicy" not in kinds(render_bundle("tenant-isolation", "1.0.0", {}, older))


def test_tenant_isolation_values() -> None:
    ctx = context_for(SERVERLESS)
    bundle = render_bundle("tenant-isolation", "1.0.0", {"tenants": ["fn-1", "fn-2", "fn-3"],
                                                          "allowInternetEgress": False}, ctx)  # fmt: skip
    assert [o["metadata"]["name"] for o in bundle.objects if o["kind"] == "Namespace"] == ["fn-1", "fn-2", "fn-3"]
    assert not [o for o in bundle.objects if o["metadata"]["name"] == "allow-internet-egress"]
    with pytest.raises(BundleError, match=r"values\.tenants\[1\]"):
        render_bundle("tenant-isolation", "1.0.0", {"tenants": ["ok", "Not_OK"]}, ctx)
    with pytest.raises(BundleError, match=r"values\.tenantz"):
        render_bundle("tenant-isolation", "1.0.0", {"tenantz": ["a"]}, ctx)
    with pytest.raises(BundleError, match="platform namespace"):
        render_bundle("tenant-isolation", "1.0.0", {"tenants": ["kube-system"]}, ctx)
    with pytest.raises(BundleError, match="nodePool 'gpu' is not a node pool"):
        render_bundle("tenant-isolation", "1.0.0", {"nodePool": "gpu"}, ctx)


def test_tenant_isolation_needs_feature_and_a_sandbox_pool() -> None:
    plain = context_for(MODELSERVING)
    with pytest.raises(BundleError, match="hard-multi-tenancy"):
        render_bundle("tenant-isolation", "1.0.0", {}, plain)
    spec = plain.spec.model_copy(update={"features": ["hard-multi-tenancy"]})
    with pytest.raises(BundleError, match="no node pool is marked"):
        render_bundle("tenant-isolation", "1.0.0", {}, context_for(MODELSERVING, spec=spec))
    # A named pool without labels cannot be selected.
    with pytest.raises(BundleError, match="no common label"):
        render_bundle("tenant-isolation", "1.0.0", {"nodePool": "default"}, context_for(MODELSERVING, spec=spec))


# ---------------------------------------------------------------- logging per cloud
def shipper_config(bundle: Bundle) -> str:
    return str(find(bundle, "ConfigMap", "fluent-bit", "flotilla-logging")["data"]["fluent-bit.conf"])


def output_section(config: str) -> dict[str, str]:
    section = config.split("[OUTPUT]\n", 1)[1]
    return dict(line.strip().split(None, 1) for line in section.strip().splitlines())


def test_logging_ships_to_the_kinesis_stream_on_aws() -> None:
    ctx = context_for(MODELSERVING)
    out = output_section(shipper_config(render_bundle("logging", "3.1.0", {}, ctx)))
    assert out["Name"] == "kinesis_streams"
    assert out["stream"] == ctx.resources["log_stream"]["name"]
    assert out["region"] == "us-east-1"


def test_logging_ships_to_event_hubs_on_azure_with_a_referenced_connection_string() -> None:
    ctx = context_for(DATAENG)
    bundle = render_bundle("logging", "3.1.0", {}, ctx)
    stream = ctx.resources["log_stream"]
    out = output_section(shipper_config(bundle))
    assert out["Name"] == "kafka"
    assert out["Brokers"] == f"{stream['namespace']}.servicebus.windows.net:9093"
    assert out["Topics"] == stream["name"]
    assert out["rdkafka.sasl.password"] == "${EVENTHUBS_CONNECTION_STRING}"
    secret = find(bundle, "Secret", "log-shipper-eventhubs", "flotilla-logging")
    assert "data" not in secret and "stringData" not in secret
    assert secret["metadata"]["annotations"][SECRET_REF_ANNOTATION] == (
        f"eventhubs://{stream['resource_group']}/{stream['namespace']}/{stream['name']}")
    (env,) = [e for e in find(bundle, "DaemonSet", "fluent-bit", "flotilla-logging")["spec"]["template"]["spec"]
              ["containers"][0]["env"] if e["name"] == "EVENTHUBS_CONNECTION_STRING"]  # fmt: skip
    assert env["valueFrom"]["secretKeyRef"] == {"name": "log-shipper-eventhubs", "key": "connection-string"}


def test_logging_ships_to_pub_sub_on_gcp_through_the_forwarder() -> None:
    ctx = context_for(SERVERLESS)
    bundle = render_bundle("logging", "3.1.0", {}, ctx)
    out = output_section(shipper_config(bundle))
    assert out["Name"] == "opentelemetry"
    assert out["Host"] == "log-forwarder.flotilla-logging.svc.cluster.local"
    forwarder = yaml.safe_load(find(bundle, "ConfigMap", "log-forwarder", "flotilla-logging")["data"]["collector.yaml"])
    assert forwarder["exporters"]["googlecloudpubsub"] == {
        "project": "flotilla-prod", "topic": ctx.resources["log_stream"]["log_stream_id"]}
    assert [g.name for g in bundle.health] == ["fluent-bit", "log-forwarder"]


def test_logging_records_carry_the_cluster_identity() -> None:
    ctx = context_for(MODELSERVING)
    config = shipper_config(render_bundle("logging", "3.1.0", {}, ctx))
    assert f"Record k8s.cluster.name {ctx.cluster_id}" in config
    assert "Record cloud.region us-east-1" in config


@pytest.mark.parametrize("resources", [{}, {"log_stream": {}}])
def test_logging_without_a_log_stream_is_a_clear_error(resources: dict[str, Any]) -> None:
    with pytest.raises(BundleError, match=r"log stream is unknown.*resources\['log_stream'\]"):
        render_bundle("logging", "3.1.0", {}, context_for(MODELSERVING, resources=resources))


def test_logging_azure_without_the_event_hubs_namespace_is_a_clear_error() -> None:
    with pytest.raises(BundleError, match="Event Hubs namespace"):
        render_bundle("logging", "3.1.0", {}, context_for(DATAENG, resources={"log_stream": {"name": "x"}}))


def test_logging_config_change_rolls_the_daemonset() -> None:
    a = render_bundle("logging", "3.1.0", {}, context_for(MODELSERVING))
    other = sample_resources("aws", "other", "us-east-1")
    b = render_bundle("logging", "3.1.0", {}, context_for(MODELSERVING, resources=other))
    digest = lambda bundle: find(bundle, "DaemonSet", "fluent-bit", "flotilla-logging")["spec"]["template"][  # noqa: E731
        "metadata"]["annotations"]["flotilla.dev/config-digest"]
    assert digest(a) != digest(b)


@pytest.mark.parametrize("service", list(CATALOG))
def test_a_bundle_does_not_depend_on_which_other_services_are_listed(service: str) -> None:
    """So an in-place update that adds or removes a service never needs another bundle re-applied."""
    full = context_for(SERVERLESS)  # lists every service
    alone = context_for(SERVERLESS, spec=with_services(SERVERLESS, ["namespaces", "registry-secrets", service]))
    version = CATALOG[service].version
    assert canonical_json(render_bundle(service, version, {}, full)) == canonical_json(
        render_bundle(service, version, {}, alone))


# ---------------------------------------------------------------- registry secrets
SECRET_VALUE = b'{"auths":{"registry.example.com":{"auth":"c2VjcmV0LXVzZXI6czNjcjN0LXAwdw=="}}}'


def test_registry_secret_is_a_reference_only() -> None:
    ctx = context_for(MODELSERVING)
    bundle = render_bundle("registry-secrets", "1.0.0", {"server": "registry.example.com"}, ctx)
    secrets = [o for o in bundle.objects if o["kind"] == "Secret"]
    assert {s["metadata"]["namespace"] for s in secrets} == {
        "flotilla-system", "flotilla-observability", "flotilla-logging", "cert-manager", "ingress-nginx"}
    for s in secrets:
        assert s["type"] == "kubernetes.io/dockerconfigjson"
        assert "data" not in s and "stringData" not in s
        assert s["metadata"]["annotations"][SECRET_REF_ANNOTATION] == REGISTRY_REF
        assert s["metadata"]["annotations"][SECRET_KEY_ANNOTATION] == ".dockerconfigjson"
    slots = secret_slots(bundle.objects)
    assert [(x.namespace, x.name, x.ref, x.key) for x in slots] == [
        (s["metadata"]["namespace"], "flotilla-registry-pull", REGISTRY_REF, ".dockerconfigjson") for s in secrets]


def test_no_rendered_bundle_ever_contains_secret_material() -> None:
    for example in EXAMPLES:
        for service, bundle in render_listed(example).items():
            for obj in bundle.objects:
                if obj["kind"] == "Secret":
                    assert "data" not in obj and "stringData" not in obj, f"{example}/{service}"


def test_the_adapter_fills_the_value_outside_the_bundle_and_logs_it_redacted() -> None:
    bundle = render_bundle("registry-secrets", "1.0.0", {}, context_for(MODELSERVING))
    before = canonical_json(bundle)
    slot = secret_slots(bundle.objects)[0]
    filled = with_secret_value(bundle.objects[slot.index], SECRET_VALUE)
    assert base64.b64decode(filled["data"][".dockerconfigjson"]) == SECRET_VALUE
    assert canonical_json(bundle) == before  # the bundle itself never holds the value
    safe = json.dumps(redacted(filled))
    assert "c2VjcmV0" not in safe and base64.b64encode(SECRET_VALUE).decode() not in safe
    with pytest.raises(ValueError, match="does not ask for a secret"):
        with_secret_value(bundle.objects[slot.index] | {"kind": "ConfigMap"}, SECRET_VALUE)


def test_registry_secret_needs_a_reference_and_refuses_a_value() -> None:
    with pytest.raises(BundleError, match="no secret reference"):
        render_bundle("registry-secrets", "1.0.0", {}, context_for(MODELSERVING, registry_secret_ref=None))
    # Something that is not <scheme>://<path> may be the secret itself: refused, and not echoed back.
    with pytest.raises(BundleError) as err:
        render_bundle("registry-secrets", "1.0.0", {},
                      context_for(MODELSERVING, registry_secret_ref=SECRET_VALUE.decode()))
    assert "c2VjcmV0" not in str(err.value)
    with pytest.raises(BundleError) as err:
        render_bundle("registry-secrets", "1.0.0", {"secretRef": SECRET_VALUE.decode()}, context_for(MODELSERVING))
    assert "values.secretRef" in str(err.value) and "c2VjcmV0" not in str(err.value)
    explicit = render_bundle("registry-secrets", "1.0.0", {"secretRef": "aws-sm://prod/registry"},
                             context_for(MODELSERVING, registry_secret_ref=None))  # fmt: skip
    assert secret_slots(explicit.objects)[0].ref == "aws-sm://prod/registry"


def test_platform_pods_pull_with_the_secret_only_when_it_is_installed() -> None:
    with_secret = render_listed(MODELSERVING)  # lists registry-secrets
    for service in ("observability", "logging", "cert-manager", "ingress"):
        for _, pod in pod_specs(with_secret[service]):
            assert pod["imagePullSecrets"] == [{"name": "flotilla-registry-pull"}]
    renamed = with_services(MODELSERVING, ["namespaces", "rbac", {"name": "registry-secrets",
                                                                   "values": {"name": "pull"}}, "ingress"])
    ingress = render_bundle("ingress", "4.11.2", {}, context_for(MODELSERVING, spec=renamed))
    assert pod_specs(ingress)[0][1]["imagePullSecrets"] == [{"name": "pull"}]
    without = render_listed(DATAENG)  # does not list registry-secrets
    for service in ("observability", "logging", "ingress"):
        for _, pod in pod_specs(without[service]):
            assert "imagePullSecrets" not in pod


# ---------------------------------------------------------------- scheduling and Pod Security
def test_platform_deployments_tolerate_the_taints_only_when_every_pool_is_tainted() -> None:
    # serverless: its only pool is tainted sandbox=kata:NoSchedule, so Deployments must tolerate it.
    for bundle in render_listed(SERVERLESS).values():
        for obj, pod in pod_specs(bundle):
            if obj["kind"] == "Deployment":
                assert pod["tolerations"] == [{"key": "sandbox", "operator": "Equal", "value": "kata",
                                               "effect": "NoSchedule"}]  # fmt: skip
            else:
                assert pod["tolerations"] == [{"operator": "Exists"}]
    # dataeng: untainted pools exist, so Deployments stay off the tainted spot executors.
    for bundle in render_listed(DATAENG).values():
        for obj, pod in pod_specs(bundle):
            if obj["kind"] == "Deployment":
                assert "tolerations" not in pod


def namespace_levels(example: str) -> dict[str, str]:
    bundle = render_listed(example)["namespaces"]
    return {o["metadata"]["name"]: o["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
            for o in bundle.objects}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security `restricted` rules (v1.30) that apply to what we render."""
    problems = []
    psc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(key)
    if any("hostPath" in v for v in pod.get("volumes", [])):
        problems.append("hostPath volume")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{c['name']}: must drop ALL capabilities")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{c['name']}: adds {caps['add']}")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            problems.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            problems.append(f"{c['name']}: runs as root")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']}: seccompProfile")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{c['name']}: hostPort")
    return problems


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_platform_pods_pass_their_namespace_pod_security_level(example: str) -> None:
    levels = namespace_levels(example)
    for service, bundle in render_listed(example).items():
        for obj, pod in pod_specs(bundle):
            ns = obj["metadata"]["namespace"]
            assert ns in levels, f"{service}: {ns} is not created by the namespaces bundle"
            if levels[ns] == "restricted":
                assert restricted_violations(pod) == [], f"{service}: {obj['kind']} {obj['metadata']['name']}"
    if "flotilla-logging" in levels:  # the log shipper reads hostPath /var/log
        assert levels["flotilla-logging"] == "privileged"


def test_restricted_checker_can_fail() -> None:
    pod = render_listed(MODELSERVING)["logging"]
    (_, fluent_bit) = pod_specs(pod)[0]
    assert "hostPath volume" in restricted_violations(fluent_bit)


# ---------------------------------------------------------------- namespaces, rbac, observability, ingress
def test_namespaces_are_every_platform_namespace() -> None:
    # Also those of services the cluster does not list (yet): adding one in place finds its namespace.
    assert namespace_levels(SELFMANAGED) == {"flotilla-system": "restricted", "flotilla-observability": "restricted",
                                             "flotilla-logging": "privileged", "cert-manager": "restricted",
                                             "ingress-nginx": "restricted"}  # fmt: skip
    bundle = render_listed(MODELSERVING)["namespaces"]
    assert [o["metadata"]["name"] for o in bundle.objects] == [
        "flotilla-system", "flotilla-observability", "flotilla-logging", "cert-manager", "ingress-nginx"]
    cm = find(bundle, "Namespace", "cert-manager")["metadata"]["labels"]
    assert cm["cert-manager.io/disable-validation"] == "true"
    assert cm["pod-security.kubernetes.io/enforce-version"] == "v1.30"
    assert set(NAMESPACE_OF) == {"observability", "logging", "cert-manager", "ingress"}
    # A user label cannot weaken the Pod Security level asked for.
    weaker = {"pod-security.kubernetes.io/enforce": "privileged"}
    extra = render_bundle("namespaces", "1.0.0", {"extra": [{"name": "jobs", "podSecurity": "baseline",
                                                             "labels": weaker}]}, context_for(SELFMANAGED))
    assert find(extra, "Namespace", "jobs")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
    with pytest.raises(BundleError, match="rendered twice"):
        render_bundle("namespaces", "1.0.0", {"extra": [{"name": "flotilla-system"}]}, context_for(SELFMANAGED))


def test_rbac_groups_come_from_values() -> None:
    bundle = render_bundle("rbac", "1.0.0", {"adminGroups": ["sre"], "viewerGroups": []}, context_for(MODELSERVING))
    admins = find(bundle, "ClusterRoleBinding", "flotilla-platform-admins")
    assert admins["roleRef"]["name"] == "cluster-admin"
    assert admins["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "sre"}]
    assert not [o for o in bundle.objects if o["metadata"]["name"] == "flotilla-platform-viewers"]
    viewer = find(bundle, "ClusterRole", "flotilla-platform-viewer")
    assert all("secrets" not in r["resources"] for r in viewer["rules"])


def test_observability_stamps_the_cluster_identity() -> None:
    ctx = context_for(DATAENG)
    bundle = render_bundle("observability", "0.104.0", {"otlpEndpoint": "otlp.example.com:4317"}, ctx)
    text = find(bundle, "ConfigMap", "otel-gateway", "flotilla-observability")["data"]["collector.yaml"]
    assert "&id" not in text  # no YAML anchors/aliases: plain config a human can read
    gateway = yaml.safe_load(text)
    attrs = {a["key"]: a["value"] for a in gateway["processors"]["resource/cluster"]["attributes"]}
    assert attrs["k8s.cluster.name"] == ctx.cluster_id
    assert attrs["cloud.provider"] == "azure" and attrs["cloud.region"] == "westeurope"
    assert gateway["exporters"] == {"otlp": {"endpoint": "otlp.example.com:4317", "tls": {"insecure": False}}}
    images = {c["image"] for _, pod in pod_specs(bundle) for c in pod["containers"]}
    assert images == {"otel/opentelemetry-collector-contrib:0.104.0"}
    assert {g.kind for g in bundle.health} == {"DaemonSetRolledOut", "DeploymentAvailable"}


@pytest.mark.parametrize(("example", "annotation"), [
    (MODELSERVING, "service.beta.kubernetes.io/aws-load-balancer-internal"),
    (DATAENG, "service.beta.kubernetes.io/azure-load-balancer-internal"),
    (SERVERLESS, "networking.gke.io/load-balancer-type"),
])  # fmt: skip
def test_ingress_controller(example: str, annotation: str) -> None:
    ctx = context_for(example)
    bundle = render_bundle("ingress", "4.11.2", {}, ctx)
    (deploy, pod) = pod_specs(bundle)[0]
    assert pod["containers"][0]["image"] == "registry.k8s.io/ingress-nginx/controller:v1.11.2"
    ic = find(bundle, "IngressClass", "nginx")
    assert ic["spec"] == {"controller": "k8s.io/ingress-nginx"}
    svc = find(bundle, "Service", "ingress-nginx-controller", "ingress-nginx")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert annotation not in svc["metadata"].get("annotations", {})
    internal = render_bundle("ingress", "4.11.2", {"internal": True}, ctx)
    internal_svc = find(internal, "Service", "ingress-nginx-controller", "ingress-nginx")
    assert annotation in internal_svc["metadata"]["annotations"]
    assert [g.name for g in bundle.health] == [deploy["metadata"]["name"]]
    with pytest.raises(BundleError, match="controllerTag"):
        render_bundle("ingress", "5.0.0", {}, ctx)
    assert pod_specs(render_bundle("ingress", "5.0.0", {"controllerTag": "v2.0.0"}, ctx))[0][1]["containers"][0][
        "image"].endswith(":v2.0.0")


def test_cert_manager_acme_issuer_from_values() -> None:
    bundle = render_bundle("cert-manager", "v1.15.3", {"acme": {"email": "ops@example.com"}}, context_for(MODELSERVING))
    acme = find(bundle, "ClusterIssuer", "flotilla-acme")["spec"]["acme"]
    assert acme["email"] == "ops@example.com"
    assert acme["solvers"] == [{"http01": {"ingress": {"ingressClassName": "nginx"}}}]
    with pytest.raises(BundleError, match=r"values\.acme\.email"):
        render_bundle("cert-manager", "v1.15.3", {"acme": {"email": "nope"}}, context_for(MODELSERVING))


def test_unknown_service_is_a_clear_error() -> None:
    with pytest.raises(BundleError, match=r"unknown infra service 'mesh' \(known: namespaces, rbac"):
        render_bundle("mesh", "1.0.0", {}, context_for(MODELSERVING))


# ---------------------------------------------------------------- custom bundles
DESCRIPTOR = """\
name: node-exporter
version: 1.8.2
dependsOn: [namespaces]
defaults: {replicas: 2, port: 9100}
"""
MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata:
  name: monitoring
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: exporter
  namespace: monitoring
  labels: {cluster: "${cluster.id}"}
spec:
  replicas: ${values.replicas}
  selector: {matchLabels: {app: exporter}}
  template:
    metadata: {labels: {app: exporter}}
    spec:
      containers:
        - name: exporter
          image: quay.io/prometheus/node-exporter:v${version}
          args: ["--web.listen-address=:${values.port}", "--collector.textfile.directory=$${HOME}", "--cloud=${cloud}"]
---
"""
CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: probes.example.com}
spec:
  group: example.com
  names: {kind: Probe, plural: probes}
  scope: Namespaced
  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object}}}]
"""


def write_bundle(root: Path, descriptor: str = DESCRIPTOR, files: Mapping[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bundle.yaml").write_text(descriptor)
    # The CRD's file sorts last on disk: the bundle must still apply it first.
    for name, text in (files if files is not None else {"10-exporter.yaml": MANIFESTS, "90-crd.yaml": CRD}).items():
        (root / name).write_text(text)
    return root


def test_custom_bundle_loads_and_renders(tmp_path: Path) -> None:
    write_bundle(tmp_path / "bundles" / "node-exporter")
    custom = load_custom_bundles([tmp_path / "bundles"])
    assert list(custom) == ["node-exporter"]
    ctx = context_for(MODELSERVING)
    bundle = render_bundle("node-exporter", "1.8.2", {"port": 9200}, ctx, custom=custom)
    assert bundle.name == "node-exporter" and bundle.version == "1.8.2" and bundle.depends_on == ("namespaces",)
    assert kinds(bundle) == ["CustomResourceDefinition", "Namespace", "Deployment"]
    for obj in bundle.objects:
        assert obj["metadata"]["labels"][LABEL_BUNDLE] == "node-exporter"
        assert obj["metadata"]["labels"][LABEL_MANAGED_BY] == MANAGED_BY
        assert obj["metadata"]["labels"][LABEL_BUNDLE_VERSION] == "1.8.2"
    deploy = find(bundle, "Deployment", "exporter", "monitoring")
    assert deploy["spec"]["replicas"] == 2  # a whole-scalar value keeps its type (int, from defaults)
    assert deploy["metadata"]["labels"]["cluster"] == ctx.cluster_id
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "quay.io/prometheus/node-exporter:v1.8.2"
    assert container["args"] == ["--web.listen-address=:9200", "--collector.textfile.directory=${HOME}",
                                 "--cloud=aws"]  # fmt: skip
    # Health gates derived from the workloads and CRDs when the descriptor names none.
    assert [(g.kind, g.name, g.namespace) for g in bundle.health] == [
        ("CRDEstablished", "probes.example.com", None), ("DeploymentAvailable", "exporter", "monitoring")]
    assert canonical_json(bundle) == canonical_json(render_bundle("node-exporter", "1.8.2", {"port": 9200}, ctx,
                                                                  custom=custom))  # fmt: skip
    with pytest.raises(BundleError, match="has version 1.8.2; 2.0.0 was requested"):
        render_bundle("node-exporter", "2.0.0", {}, ctx, custom=custom)
    # Built-in names never fall back to a custom bundle, unknown names list the custom ones too.
    with pytest.raises(BundleError, match="node-exporter"):
        render_bundle("mesh", "1.0.0", {}, ctx, custom=custom)


def test_custom_bundle_explicit_health_gates_and_manifest_list(tmp_path: Path) -> None:
    descriptor = DESCRIPTOR + ("healthGates:\n  - {kind: DeploymentAvailable, name: exporter, namespace: monitoring}\n"
                               "manifests: [10-exporter.yaml]\n")  # fmt: skip
    custom = load_custom_bundles([write_bundle(tmp_path / "b", descriptor)])
    bundle = render_bundle("node-exporter", "1.8.2", {}, context_for(MODELSERVING), custom=custom)
    assert kinds(bundle) == ["Namespace", "Deployment"]
    assert [(g.kind, g.name) for g in bundle.health] == [("DeploymentAvailable", "exporter")]


@pytest.mark.parametrize(("descriptor", "message"), [
    ("name: x\n", r"bundle\.yaml: version: Field required"),
    ("name: Bad_Name\nversion: 1.0.0\n", r"bundle\.yaml: name: String should match pattern"),
    ("name: x\nversion: 1.0.0\nhealthGates: [{kind: PodReady, name: x}]\n",
     r"bundle\.yaml: healthGates\[0\]\.kind: Input should be 'DeploymentAvailable'"),
    ("name: x\nversion: 1.0.0\ndepends: [rbac]\n", r"bundle\.yaml: depends: Extra inputs are not permitted"),
    ("name: x\nversion: 1.0.0\ndependsOn: [mesh]\n", r"dependsOn: unknown bundle\(s\) \['mesh'\]"),
    ("name: ingress\nversion: 1.0.0\n", "name 'ingress' is a built-in service"),
    ("name: x\nversion: [1]\n", r"version: Input should be a valid string"),
    ("- just\n- a list\n", "must be one YAML mapping"),
    ("name: x\nversion: 1.0.0\nmanifests: [../../etc/passwd]\n", "is outside the bundle"),
    ("name: x\nversion: 1.0.0\nmanifests: [missing.yaml]\n", "'missing.yaml' does not exist"),
    ("name: x\n  version: 1.0.0\n", "not valid YAML"),
])  # fmt: skip
def test_bad_descriptor_gives_a_clear_error(tmp_path: Path, descriptor: str, message: str) -> None:
    write_bundle(tmp_path / "x", descriptor)
    with pytest.raises(CustomBundleError, match=message) as err:
        load_custom_bundles([tmp_path])
    assert str(tmp_path / "x") in str(err.value)  # names the directory / file


@pytest.mark.parametrize(("manifest", "message"), [
    ("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {password: hunter2}\n", "by reference"),
    ("kind: ConfigMap\nmetadata: {name: c}\n", "apiVersion is missing"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n", "metadata.name is missing"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: '${clusterId}'}\n",
     r"unknown variable \$\{clusterId\}"),
    ("[1, 2]\n", "must be a mapping"),
])  # fmt: skip
def test_bad_manifest_gives_a_clear_error(tmp_path: Path, manifest: str, message: str) -> None:
    write_bundle(tmp_path / "x", "name: x\nversion: 1.0.0\n", {"m.yaml": manifest})
    with pytest.raises(CustomBundleError, match=message) as err:
        load_custom_bundles([tmp_path / "x"])
    assert "m.yaml#0" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_custom_bundle_directory_problems(tmp_path: Path) -> None:
    with pytest.raises(CustomBundleError, match="not a directory"):
        load_custom_bundles([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CustomBundleError, match="no bundle.yaml"):
        load_custom_bundles([tmp_path / "empty"])
    write_bundle(tmp_path / "a" / "one")
    write_bundle(tmp_path / "b" / "two")
    with pytest.raises(CustomBundleError, match="'node-exporter' is also defined in"):
        load_custom_bundles([tmp_path / "a", tmp_path / "b"])
    write_bundle(tmp_path / "c", "name: c\nversion: 1.0.0\n", {"README.md": "no manifests"})
    with pytest.raises(CustomBundleError, match="no manifests"):
        load_custom_bundles([tmp_path / "c"])


def test_custom_bundle_render_errors(tmp_path: Path) -> None:
    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: '${values.missing}'}\n"
    custom = load_custom_bundles([write_bundle(tmp_path / "x", "name: x\nversion: 1.0.0\n", {"m.yaml": manifest})])
    with pytest.raises(BundleError, match=r"x: m.yaml#0: \$\{values.missing\} has no value"):
        render_bundle("x", "1.0.0", {}, context_for(MODELSERVING), custom=custom)
    owned = ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, labels: {flotilla.dev/bundle: other}}\n")
    custom = load_custom_bundles([write_bundle(tmp_path / "y", "name: y\nversion: 1.0.0\n", {"m.yaml": owned})])
    with pytest.raises(BundleError, match="the installer owns it"):
        render_bundle("y", "1.0.0", {}, context_for(MODELSERVING), custom=custom)
