"""Building blocks shared by the catalog renderers: errors, values parsing, names, pod scheduling/security.

Everything here is pure: the same context gives the same dicts, built fresh on every call.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from services.infra_installer.bundles.model import HealthGate, RenderContext
from shared.events.clusterset import InfraServiceRef, NodePool

Obj = dict[str, Any]
PodSecurityLevel = Literal["restricted", "baseline", "privileged"]

# Kubernetes names: a DNS-1123 label (namespaces, services) / subdomain (most other objects).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Label values: what the bundle-version label (and so a bundle version) may look like.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# The platform namespace each catalog service runs in, with its Pod Security level. The `namespaces` bundle
# creates all of them; `flotilla-system` holds platform-wide objects (e.g. the registry pull secret).
SYSTEM_NAMESPACE = "flotilla-system"


@dataclass(frozen=True)
class PlatformNamespace:
    name: str
    pod_security: PodSecurityLevel
    service: str | None  # the catalog service that runs there
    labels: tuple[tuple[str, str], ...] = ()


PLATFORM_NAMESPACES: tuple[PlatformNamespace, ...] = (
    PlatformNamespace(SYSTEM_NAMESPACE, "restricted", None),
    PlatformNamespace("flotilla-observability", "restricted", "observability"),
    # The log shipper reads the node's /var/log through hostPath, which only `privileged` admits.
    PlatformNamespace("flotilla-logging", "privileged", "logging"),
    # cert-manager's webhook must not validate its own namespace (it could never start): upstream's label.
    PlatformNamespace("cert-manager", "restricted", "cert-manager", (("cert-manager.io/disable-validation", "true"),)),
    PlatformNamespace("ingress-nginx", "restricted", "ingress"),
)
NAMESPACE_OF: dict[str, str] = {ns.service: ns.name for ns in PLATFORM_NAMESPACES if ns.service}


class BundleError(ValueError):
    """A bundle cannot be rendered from this input (bad values, missing provisioning result, unknown name).

    Not retryable: the same input renders the same way, so the message says what to change.
    """


# ---------------------------------------------------------------- values
class Values(BaseModel):
    """Base for a bundle's `values` (InfraServiceRef.values): camelCase keys, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=True,
                              frozen=True)  # fmt: skip


V = TypeVar("V", bound=Values)


def parse_values(service: str, model: type[V], values: Mapping[str, Any]) -> V:
    """Validate a bundle's values; a BundleError names every bad key (e.g. `values.tenants[1]`)."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            path = "values" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
            problems.append(f"{path}: {e['msg']}")
        raise BundleError(f"{service}: " + "; ".join(problems)) from None


# ---------------------------------------------------------------- what a renderer returns
@dataclass
class Rendered:
    objects: list[Obj] = field(default_factory=list)
    health: list[HealthGate] = field(default_factory=list)


# ---------------------------------------------------------------- metadata
def meta(name: str, namespace: str | None = None, labels: Mapping[str, str] | None = None,
         annotations: Mapping[str, str] | None = None) -> Obj:  # fmt: skip
    m: Obj = {"name": name}
    if namespace is not None:
        m["namespace"] = namespace
    if labels:
        m["labels"] = dict(sorted(labels.items()))
    if annotations:
        m["annotations"] = dict(sorted(annotations.items()))
    return m


def app_labels(name: str, component: str | None = None, part_of: str | None = None) -> dict[str, str]:
    """Selector labels: stable across versions (a Deployment's selector is immutable)."""
    labels = {"app.kubernetes.io/name": name}
    if component:
        labels["app.kubernetes.io/component"] = component
    if part_of:
        labels["app.kubernetes.io/part-of"] = part_of
    return labels


def pod_security_labels(level: PodSecurityLevel, ctx: RenderContext) -> dict[str, str]:
    """Pod Security Admission labels, pinned to the cluster's minor version so an upgrade changes nothing silently."""
    version = f"v{ctx.spec.kubernetes_version}"
    return {
        f"pod-security.kubernetes.io/{mode}{suffix}": value
        for mode in ("enforce", "audit", "warn")
        for suffix, value in (("", level), ("-version", version))
    }


def service_names(ctx: RenderContext) -> list[str]:
    return ctx.spec.infra_service_names()


def service_values(ctx: RenderContext, service: str) -> dict[str, Any]:
    """The values the spec gives another service (e.g. the registry secret's name for imagePullSecrets)."""
    for entry in ctx.spec.infra_services:
        if isinstance(entry, InfraServiceRef) and entry.name == service:
            return dict(entry.values)
    return {}


# ---------------------------------------------------------------- pods
LINUX = {"kubernetes.io/os": "linux"}
REGISTRY_SECRET_DEFAULT_NAME = "flotilla-registry-pull"


def pull_secrets(ctx: RenderContext) -> list[Obj]:
    """imagePullSecrets for platform pods: the registry secret when `registry-secrets` is installed too.

    The one place where a bundle depends on another service being listed: referencing a Secret that is
    not there would put a warning on every pod start. Adding `registry-secrets` later breaks nothing (the
    pods keep pulling as before) and the next re-apply of the other bundles adds the reference.
    """
    if "registry-secrets" not in service_names(ctx):
        return []
    name = service_values(ctx, "registry-secrets").get("name") or REGISTRY_SECRET_DEFAULT_NAME
    return [{"name": str(name)}]


def toleration(pool_taint: Any) -> Obj:
    t: Obj = {"key": pool_taint.key, "operator": "Equal", "effect": pool_taint.effect}
    if pool_taint.value:
        t["value"] = pool_taint.value
    return t


def pool_tolerations(pools: Iterable[NodePool]) -> list[Obj]:
    """Tolerations for every taint of these pools, each once, in spec order."""
    out: list[Obj] = []
    for pool in pools:
        for taint in pool.taints:
            t = toleration(taint)
            if t not in out:
                out.append(t)
    return out


def deployment_tolerations(ctx: RenderContext) -> list[Obj]:
    """Where platform Deployments may run.

    On untainted pools when there is one (platform pods stay off tainted spot executors, GPU pools...).
    When every pool is tainted (e.g. a sandbox-only serverless cluster) they tolerate those taints,
    otherwise they could never be scheduled and the health gate would never pass.
    """
    pools = ctx.spec.node_pools
    if any(not p.taints for p in pools):
        return []
    return pool_tolerations(pools)


# Node agents (log shipper, metrics agent) belong on every node, whatever its taints.
DAEMONSET_TOLERATIONS: tuple[Obj, ...] = ({"operator": "Exists"},)


def restricted_pod_security(run_as_user: int) -> Obj:
    """A pod securityContext that satisfies Pod Security `restricted`."""
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "runAsGroup": run_as_user,
        "fsGroup": run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_container_security(read_only_root: bool = True, add: tuple[str, ...] = ()) -> Obj:
    caps: Obj = {"drop": ["ALL"]}
    if add:
        caps["add"] = list(add)
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": caps,
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(cpu: str, memory: str, memory_limit: str | None = None) -> Obj:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory_limit or memory}}


def env_from_field(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def pod_spec(ctx: RenderContext, *, service_account: str, containers: list[Obj], daemon: bool = False,
             security: Obj | None = None, volumes: list[Obj] | None = None,
             extra: Obj | None = None) -> Obj:  # fmt: skip
    """A pod spec with the platform's scheduling, pull secrets and security defaults."""
    spec: Obj = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": True,
        "nodeSelector": dict(LINUX),
        "containers": containers,
    }
    tolerations = [dict(t) for t in DAEMONSET_TOLERATIONS] if daemon else deployment_tolerations(ctx)
    if tolerations:
        spec["tolerations"] = tolerations
    if security is not None:
        spec["securityContext"] = security
    secrets = pull_secrets(ctx)
    if secrets:
        spec["imagePullSecrets"] = secrets
    if volumes:
        spec["volumes"] = volumes
    spec.update(extra or {})
    return spec


def _pod_template(selector: Mapping[str, str], pod: Obj, pod_annotations: Mapping[str, str] | None) -> Obj:
    template_meta: Obj = {"labels": dict(selector)}
    if pod_annotations:
        template_meta["annotations"] = dict(sorted(pod_annotations.items()))
    return {"metadata": template_meta, "spec": pod}


def deployment(name: str, namespace: str, selector: Mapping[str, str], pod: Obj, replicas: int = 1,
               pod_annotations: Mapping[str, str] | None = None) -> Obj:  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, namespace, selector),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(selector)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": _pod_template(selector, pod, pod_annotations),
        },
    }


def daemonset(name: str, namespace: str, selector: Mapping[str, str], pod: Obj,
              pod_annotations: Mapping[str, str] | None = None) -> Obj:  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta(name, namespace, selector),
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": _pod_template(selector, pod, pod_annotations),
        },
    }


def service_account(name: str, namespace: str, labels: Mapping[str, str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name, namespace, labels)}


def config_map(name: str, namespace: str, data: Mapping[str, str], labels: Mapping[str, str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(name, namespace, labels),
            "data": dict(sorted(data.items()))}  # fmt: skip


def service(name: str, namespace: str, selector: Mapping[str, str], ports: list[Obj], *, type_: str = "ClusterIP",
            annotations: Mapping[str, str] | None = None, extra: Obj | None = None) -> Obj:  # fmt: skip
    spec: Obj = {"type": type_, "selector": dict(selector), "ports": ports}
    spec.update(extra or {})
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, namespace, selector, annotations),
            "spec": spec}  # fmt: skip


def rule(groups: list[str], resources_: list[str], verbs: list[str], names: list[str] | None = None) -> Obj:
    r: Obj = {"apiGroups": groups, "resources": resources_, "verbs": verbs}
    if names:
        r["resourceNames"] = names
    return r


def cluster_role(name: str, rules: list[Obj], labels: Mapping[str, str] | None = None) -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta(name, None, labels),
            "rules": rules}  # fmt: skip


def role(name: str, namespace: str, rules: list[Obj], labels: Mapping[str, str] | None = None) -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(name, namespace, labels),
            "rules": rules}  # fmt: skip


def sa_subject(name: str, namespace: str) -> Obj:
    return {"kind": "ServiceAccount", "name": name, "namespace": namespace}


def cluster_role_binding(name: str, role_name: str, subjects: list[Obj],
                         labels: Mapping[str, str] | None = None) -> Obj:  # fmt: skip
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": meta(name, None, labels),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": subjects,
    }


def role_binding(name: str, namespace: str, role_name: str, subjects: list[Obj],
                 labels: Mapping[str, str] | None = None) -> Obj:  # fmt: skip
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta(name, namespace, labels),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": subjects,
    }


# Objects that can only be admitted once the bundle's workloads answer (e.g. a ClusterIssuer, checked by
# cert-manager's webhook) carry this annotation: the adapter applies them after the health gates pass.
APPLY_PHASE_ANNOTATION = "flotilla.dev/apply-phase"
AFTER_HEALTH = "after-health"

# Pod-template annotation carrying the digest of the pod's configuration, so a config change rolls the pods.
CONFIG_DIGEST = "flotilla.dev/config-digest"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cluster_attributes(ctx: RenderContext) -> list[tuple[str, str]]:
    """What identifies this cluster in telemetry and logs (never a secret)."""
    return [
        ("k8s.cluster.name", ctx.cluster_id),
        ("flotilla.clusterset", ctx.clusterset),
        ("flotilla.cluster_type", ctx.cluster_type),
        ("cloud.provider", ctx.location.cloud),
        ("cloud.region", ctx.location.region),
        ("deployment.environment", ctx.location.env),
    ]
