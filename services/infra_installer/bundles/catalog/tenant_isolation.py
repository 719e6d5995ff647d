"""`tenant-isolation` (feature `hard-multi-tenancy`): sandboxed runtime and default-deny networking.

- RuntimeClass `kata` (handler `kata`, pod overhead) whose `scheduling` binds every pod that uses it
  to the sandbox node pool: nodeSelector = the labels that mark the pool, tolerations = its taints.
  The pool is `values.nodePool`, else the pool(s) marked for the handler: a label or taint whose value
  is the handler (e.g. `runtime=kata`, `sandbox=kata:NoSchedule`), or a pool named `sandbox`.
- Per tenant namespace (`values.tenants`): Pod Security `restricted` (enforce, audit, warn) and
  NetworkPolicies: `default-deny-all` (ingress + egress), `allow-dns` (to kube-dns in kube-system),
  `allow-same-namespace`, `allow-from-ingress` (the ingress controller's pods) and
  `allow-internet-egress` (when allowed) whose ipBlocks exclude the cloud metadata endpoints and the
  private ranges (so a CNI that applies ipBlocks to pod IPs cannot open other tenants or the nodes).
- On Kubernetes >= 1.30, a ValidatingAdmissionPolicy refuses tenant pods that do not use the
  sandbox runtime (without it a tenant could tolerate the taint and run under runc).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from services.infra_installer.bundles import common as c
from services.infra_installer.bundles.model import RenderContext
from shared.events.clusterset import NodePool

SERVICE = "tenant-isolation"
TENANT_LABEL = "flotilla.dev/tenant"
# Instance metadata endpoints: IMDS/GCE/Azure IMDS, ECS task metadata, the IPv6 IMDS, Azure's WireServer.
METADATA_V4 = ("169.254.169.254/32", "169.254.170.2/32", "168.63.129.16/32")
METADATA_V6 = ("fd00:ec2::254/128",)
# Private and link-local ranges: node, pod and service addresses of every cloud's default layouts.
PRIVATE_V4 = ("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")
PRIVATE_V6 = ("fc00::/7", "fe80::/10")
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
Name = Annotated[str, StringConstraints(pattern=c.DNS_LABEL, max_length=63)]


class Overhead(c.Values):
    cpu: Annotated[str, StringConstraints(pattern=r"^\d+(\.\d+)?m?$")] = "250m"
    memory: Annotated[str, StringConstraints(pattern=r"^\d+(Ki|Mi|Gi)?$")] = "160Mi"


class TenantValues(c.Values):
    tenants: Annotated[list[Name], Field(min_length=1)] = Field(default_factory=lambda: ["tenant-a", "tenant-b"])
    runtime_class: Name = "kata"
    handler: Name = "kata"
    node_pool: str | None = None
    overhead: Overhead = Overhead()
    allow_internet_egress: bool = True
    enforce_runtime_class: bool = True


# ---------------------------------------------------------------- the sandbox pool
def _marks(pool: NodePool, handler: str) -> bool:
    return (pool.name == "sandbox" or handler in pool.labels.values()
            or any(t.value == handler for t in pool.taints))  # fmt: skip


def sandbox_pools(ctx: RenderContext, v: TenantValues) -> list[NodePool]:
    pools = ctx.spec.node_pools
    if v.node_pool is not None:
        chosen = [p for p in pools if p.name == v.node_pool]
        if not chosen:
            raise c.BundleError(f"{SERVICE}: values.nodePool {v.node_pool!r} is not a node pool of the spec "
                                f"({', '.join(p.name for p in pools)})")  # fmt: skip
        return chosen
    chosen = [p for p in pools if _marks(p, v.handler)]
    if not chosen:
        raise c.BundleError(f"{SERVICE}: no node pool is marked for the {v.handler!r} runtime: give the sandbox pool "
                            f"a label such as runtime={v.handler} (and a taint), or set values.nodePool")  # fmt: skip
    return chosen


def sandbox_node_selector(pools: list[NodePool]) -> dict[str, str]:
    """The labels every sandbox pool has (a nodeSelector is an AND: it must match them all)."""
    common = dict(pools[0].labels)
    for pool in pools[1:]:
        common = {k: val for k, val in common.items() if pool.labels.get(k) == val}
    if not common:
        names = ", ".join(p.name for p in pools)
        raise c.BundleError(f"{SERVICE}: the sandbox node pool(s) {names} have no common label to select them by "
                            "(e.g. runtime=kata)")  # fmt: skip
    return dict(sorted(common.items()))


def runtime_class(ctx: RenderContext, v: TenantValues) -> dict[str, Any]:
    pools = sandbox_pools(ctx, v)
    scheduling: dict[str, Any] = {"nodeSelector": sandbox_node_selector(pools)}
    tolerations = c.pool_tolerations(pools)
    if tolerations:
        scheduling["tolerations"] = tolerations
    return {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": c.meta(v.runtime_class),
        "handler": v.handler,
        # What the micro-VM costs on top of the containers: counted by the scheduler and quotas.
        "overhead": {"podFixed": {"cpu": v.overhead.cpu, "memory": v.overhead.memory}},
        "scheduling": scheduling,
    }


# ---------------------------------------------------------------- tenant namespaces
def network_policy(name: str, namespace: str, policy_types: list[str], ingress: list[dict[str, Any]] | None = None,
                   egress: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {"podSelector": {}, "policyTypes": policy_types}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": c.meta(name, namespace),
            "spec": spec}  # fmt: skip


def namespace_peer(namespace: str, pod_labels: Mapping[str, str]) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "podSelector": {"matchLabels": dict(pod_labels)}}  # fmt: skip


def internet_egress() -> list[dict[str, Any]]:
    v4_except = list(METADATA_V4) + [r for r in PRIVATE_V4 if r not in METADATA_V4]
    v6_except = list(METADATA_V6) + [r for r in PRIVATE_V6 if r not in METADATA_V6]
    return [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": v4_except}},
                    {"ipBlock": {"cidr": "::/0", "except": v6_except}}]}]  # fmt: skip


def tenant_objects(tenant: str, ctx: RenderContext, v: TenantValues) -> list[dict[str, Any]]:
    labels = {TENANT_LABEL: tenant, **c.pod_security_labels("restricted", ctx)}
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": c.meta(tenant, None, labels)},
        # Nothing in, nothing out, unless one of the policies below allows it.
        network_policy("default-deny-all", tenant, ["Ingress", "Egress"]),
        network_policy("allow-dns", tenant, ["Egress"], egress=[
            {"to": [namespace_peer("kube-system", {"k8s-app": "kube-dns"})], "ports": DNS_PORTS}]),
        network_policy("allow-same-namespace", tenant, ["Ingress", "Egress"],
                       ingress=[{"from": [{"podSelector": {}}]}], egress=[{"to": [{"podSelector": {}}]}]),
    ]  # fmt: skip
    # Whether or not `ingress` is listed (no controller pods, no traffic): the content must not depend on
    # other services, or adding the ingress later would leave tenants unreachable until a re-apply.
    objects.append(network_policy("allow-from-ingress", tenant, ["Ingress"], ingress=[
        {"from": [namespace_peer(c.NAMESPACE_OF["ingress"], {"app.kubernetes.io/name": "ingress-nginx"})]}]))
    if v.allow_internet_egress:
        objects.append(network_policy("allow-internet-egress", tenant, ["Egress"], egress=internet_egress()))
    return objects


# ---------------------------------------------------------------- runtime enforcement
def _minor(ctx: RenderContext) -> int:
    return int(ctx.spec.kubernetes_version.split(".")[1])


def runtime_policy(v: TenantValues) -> list[dict[str, Any]]:
    name = "flotilla-tenant-sandbox-runtime"
    expression = f"has(object.spec.runtimeClassName) && object.spec.runtimeClassName == '{v.runtime_class}'"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": c.meta(name),
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                    "operations": ["CREATE", "UPDATE"], "resources": ["pods"]}]},
            "validations": [{"expression": expression,
                             "message": f"tenant pods must use runtimeClassName {v.runtime_class}",
                             "reason": "Forbidden"}],
        },
    }  # fmt: skip
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": c.meta(name),
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchExpressions": [
                     {"key": TENANT_LABEL, "operator": "Exists"}]}}},
    }  # fmt: skip
    return [policy, binding]


def render(version: str, values: Mapping[str, Any], ctx: RenderContext) -> c.Rendered:
    if "hard-multi-tenancy" not in ctx.spec.features:
        raise c.BundleError(f"{SERVICE}: needs feature hard-multi-tenancy")
    v = c.parse_values(SERVICE, TenantValues, values)
    if len(set(v.tenants)) != len(v.tenants):
        raise c.BundleError(f"{SERVICE}: values.tenants lists a namespace twice")
    platform = {ns.name for ns in c.PLATFORM_NAMESPACES} | {"default", "kube-system", "kube-public", "kube-node-lease"}
    clash = sorted(set(v.tenants) & platform)
    if clash:
        raise c.BundleError(f"{SERVICE}: values.tenants names platform namespace(s) {clash}")
    out = c.Rendered()
    out.objects.append(runtime_class(ctx, v))
    for tenant in v.tenants:
        out.objects += tenant_objects(tenant, ctx, v)
    # ValidatingAdmissionPolicy is GA (admissionregistration.k8s.io/v1, on by default) from 1.30; before that
    # it is a beta API that is off by default, so older clusters rely on the taint alone.
    if v.enforce_runtime_class and _minor(ctx) >= 30:
        out.objects += runtime_policy(v)
    return out
