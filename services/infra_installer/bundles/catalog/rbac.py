"""`rbac`: the platform's cluster roles and who holds them.

- `flotilla-platform-admins`: binds the built-in `cluster-admin` to the platform admin groups.
- `flotilla-platform-viewer`: read-only on workloads, networking and RBAC (deliberately not on
  Secrets), bound to the viewer groups.
- `flotilla-tenant-admin`: a namespaced admin role (no RBAC escalation, no quota changes) that
  tenant RoleBindings can reference; bound nowhere here.
Group names are values so each identity provider's group names can be used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from services.infra_installer.bundles.common import (
    Rendered,
    Values,
    cluster_role,
    cluster_role_binding,
    parse_values,
    rule,
)
from services.infra_installer.bundles.model import RenderContext

SERVICE = "rbac"
Group = Annotated[str, StringConstraints(min_length=1, max_length=253)]
READ = ["get", "list", "watch"]
WRITE = ["create", "update", "patch", "delete", "deletecollection"]


class RbacValues(Values):
    admin_groups: list[Group] = Field(default_factory=lambda: ["flotilla:platform-admins"])
    viewer_groups: list[Group] = Field(default_factory=lambda: ["flotilla:platform-viewers"])


def _groups(names: list[str]) -> list[dict[str, Any]]:
    return [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g} for g in names]


def viewer_rules() -> list[dict[str, Any]]:
    return [
        rule([""], ["configmaps", "endpoints", "events", "limitranges", "namespaces", "nodes", "persistentvolumeclaims",
                    "persistentvolumes", "pods", "pods/log", "resourcequotas", "serviceaccounts", "services"], READ),
        rule(["apps"], ["daemonsets", "deployments", "replicasets", "statefulsets"], READ),
        rule(["batch"], ["cronjobs", "jobs"], READ),
        rule(["autoscaling"], ["horizontalpodautoscalers"], READ),
        rule(["policy"], ["poddisruptionbudgets"], READ),
        rule(["networking.k8s.io"], ["ingressclasses", "ingresses", "networkpolicies"], READ),
        rule(["node.k8s.io"], ["runtimeclasses"], READ),
        rule(["rbac.authorization.k8s.io"], ["clusterrolebindings", "clusterroles", "rolebindings", "roles"], READ),
        rule(["apiextensions.k8s.io"], ["customresourcedefinitions"], READ),
        rule(["cert-manager.io"], ["certificaterequests", "certificates", "clusterissuers", "issuers"], READ),
    ]  # fmt: skip


def tenant_admin_rules() -> list[dict[str, Any]]:
    rw = READ + WRITE
    return [
        rule([""], ["configmaps", "endpoints", "persistentvolumeclaims", "pods", "secrets", "serviceaccounts",
                    "services"], rw),
        rule([""], ["pods/exec", "pods/log", "pods/portforward"], ["create", "get"]),
        rule([""], ["events", "limitranges", "resourcequotas"], READ),
        rule(["apps"], ["deployments", "replicasets", "statefulsets"], rw),
        rule(["batch"], ["cronjobs", "jobs"], rw),
        rule(["autoscaling"], ["horizontalpodautoscalers"], rw),
        rule(["policy"], ["poddisruptionbudgets"], rw),
        rule(["networking.k8s.io"], ["ingresses"], rw),
        # Read only: tenants must not open their own network policies.
        rule(["networking.k8s.io"], ["networkpolicies"], READ),
        rule(["cert-manager.io"], ["certificates"], rw),
    ]  # fmt: skip


def render(version: str, values: Mapping[str, Any], ctx: RenderContext) -> Rendered:
    v = parse_values(SERVICE, RbacValues, values)
    out = Rendered()
    out.objects += [
        cluster_role("flotilla-platform-viewer", viewer_rules()),
        cluster_role("flotilla-tenant-admin", tenant_admin_rules()),
    ]
    if v.admin_groups:
        out.objects.append(cluster_role_binding("flotilla-platform-admins", "cluster-admin", _groups(v.admin_groups)))
    if v.viewer_groups:
        out.objects.append(cluster_role_binding("flotilla-platform-viewers", "flotilla-platform-viewer",
                                                _groups(v.viewer_groups)))  # fmt: skip
    return out
