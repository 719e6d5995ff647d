"""Every rendered manifest validates against the Kubernetes OpenAPI schema of its cluster's version.

For each example ClusterSet and each service it lists, every object of the bundle is checked with
`kubernetes_validate` (strict: unknown fields are errors) at the example's `kubernetesVersion`.
Kinds defined by a CRD we ship (cert-manager's ClusterIssuer, ...) are not in Kubernetes' schema:
they are validated against the openAPIV3Schema of that CRD instead, as the API server would.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from services.infra_installer.bundles import render_bundle
from services.infra_installer.bundles.model import Bundle
from shared.catalog import CATALOG
from tests.unit.test_bundles import EXAMPLES, MODELSERVING, context_for

CASES = [(ex, s) for ex in EXAMPLES for s in context_for(ex).spec.infra_service_names()]


def shipped_crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group/version, kind) -> openAPIV3Schema, for every CRD of every built-in bundle."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    ctx = context_for("serverless-prod-gcp-europe-west4")  # lists every built-in service
    for service in CATALOG:
        for obj in render_bundle(service, CATALOG[service].version, {}, ctx).objects:
            if obj["kind"] == "CustomResourceDefinition":
                spec = obj["spec"]
                for version in spec["versions"]:
                    out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = \
                        version["schema"]["openAPIV3Schema"]
    return out


CRD_SCHEMAS = shipped_crds()


def strict_json_schema(node: Any) -> Any:
    """A CRD schema as JSON Schema that, like kubernetes_validate's strict mode, refuses unknown fields.

    The API server would silently prune them; a field we render that the CRD does not know is a bug.
    """
    if isinstance(node, list):
        return [strict_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def validate_custom_resource(obj: dict[str, Any]) -> None:
    schema = CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft202012Validator(strict_json_schema(schema)).validate(obj)


def validate(obj: dict[str, Any], kubernetes_version: str) -> None:
    if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
        validate_custom_resource(obj)
    else:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)


@pytest.mark.parametrize(("example", "service"), CASES)
def test_every_manifest_validates_against_the_clusters_kubernetes_schema(example: str, service: str) -> None:
    ctx = context_for(example)
    bundle: Bundle = render_bundle(service, CATALOG[service].version, {}, ctx)
    problems = []
    for obj in bundle.objects:
        ref = f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
        try:
            validate(obj, ctx.spec.kubernetes_version)
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{ref}: {exc.message}")
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            problems.append(f"{ref}: {exc.message} at {'.'.join(map(str, exc.absolute_path))}")
    assert problems == []


def test_non_default_values_still_validate() -> None:
    ctx = context_for(MODELSERVING)
    for service, vals in (("cert-manager", {"acme": {"email": "ops@example.com"}, "replicas": 2}),
                          ("ingress", {"internal": True, "config": {"proxy-body-size": "8m"}}),
                          ("observability", {"otlpEndpoint": "otlp.example.com:4317"}),
                          ("namespaces", {"extra": [{"name": "jobs", "podSecurity": "baseline"}]}),
                          ("rbac", {"adminGroups": ["sre"], "viewerGroups": ["dev", "qa"]})):  # fmt: skip
        for obj in render_bundle(service, CATALOG[service].version, vals, ctx).objects:
            validate(obj, "1.29")


# ---------------------------------------------------------------- the validators can fail
def test_kubernetes_validation_rejects_a_broken_manifest() -> None:
    ctx = context_for(MODELSERVING)
    bundle = render_bundle("ingress", "4.11.2", {}, ctx)
    deploy = copy.deepcopy(next(o for o in bundle.objects if o["kind"] == "Deployment"))
    deploy["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deploy, "1.30")
    deploy = copy.deepcopy(next(o for o in bundle.objects if o["kind"] == "Deployment"))
    deploy["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}  # unknown field: strict refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deploy, "1.30")


def test_crd_validation_rejects_a_broken_custom_resource() -> None:
    issuer = next(o for o in render_bundle("cert-manager", "v1.15.3", {"acme": {"email": "a@b.c"}},
                                           context_for(MODELSERVING)).objects if o["kind"] == "ClusterIssuer"
                  and "acme" in o["spec"])  # fmt: skip
    validate(issuer, "1.30")
    broken = copy.deepcopy(issuer)
    del broken["spec"]["acme"]["privateKeySecretRef"]
    with pytest.raises(jsonschema.ValidationError, match="privateKeySecretRef"):
        validate(broken, "1.30")
    broken = copy.deepcopy(issuer)
    broken["spec"]["selfSigned"] = {"crlDistributionPoint": "typo"}
    with pytest.raises(jsonschema.ValidationError, match="crlDistributionPoint"):
        validate(broken, "1.30")
    spec: dict[str, Any] = {"secretName": "c-tls", "dnsNames": ["a.example.com"],
                            "issuerRef": {"name": "flotilla-selfsigned", "kind": "ClusterIssuer"},
                            "privateKey": {"algorithm": "ECDSA", "size": 256}}
    certificate = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "c"}, "spec": spec}
    validate(certificate, "1.30")
    spec["privateKey"]["algorithm"] = "DSA"
    with pytest.raises(jsonschema.ValidationError, match="DSA"):
        validate(certificate, "1.30")


# ---------------------------------------------------------------- the CRDs themselves
def untyped_nodes(schema: Any, path: str = "") -> list[str]:
    """Nodes of a CRD schema without a `type`: a structural schema has none (apiextensions rule)."""
    if not isinstance(schema, dict):
        return []
    bad = [] if ("type" in schema or schema.get("x-kubernetes-int-or-string")) else [path or "(root)"]
    for key, sub in (schema.get("properties") or {}).items():
        bad += untyped_nodes(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        bad += untyped_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        bad += untyped_nodes(schema["additionalProperties"], f"{path}{{}}")
    return bad


def test_shipped_crds_are_structural_and_cover_cert_manager() -> None:
    kinds = {kind for (_, kind) in CRD_SCHEMAS}
    assert {"Certificate", "Issuer", "ClusterIssuer", "CertificateRequest"} <= kinds
    for (gv, kind), schema in CRD_SCHEMAS.items():
        assert untyped_nodes(schema) == [], f"{gv} {kind}"
        # metadata may only be typed as an object (the API server owns its schema).
        assert schema["properties"]["metadata"] == {"type": "object"}
        assert schema["properties"]["spec"]["type"] == "object"
