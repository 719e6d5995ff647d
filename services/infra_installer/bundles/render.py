"""`render_bundle`: a service name + version + values + the cluster's context -> a `Bundle`.

Pure and deterministic: no I/O, no clock, no randomness, nothing read from the environment; the
same input gives byte-identical output (objects are canonical JSON-able dicts, freshly built).
Every object gets the ownership labels of bundles/model.py, and the objects come in apply order:
CustomResourceDefinitions first, then namespaces, then what the workloads need, the workloads,
webhook configurations, and custom resources last.

Built-in services come from bundles/catalog; any other name is looked up in `custom` (bundles a
user added, see bundles/custom.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from services.infra_installer.bundles.catalog import RENDERERS
from services.infra_installer.bundles.common import (
    AFTER_HEALTH,
    APPLY_PHASE_ANNOTATION,
    LABEL_VALUE,
    BundleError,
)
from services.infra_installer.bundles.model import (
    LABEL_BUNDLE,
    LABEL_BUNDLE_VERSION,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    Bundle,
    HealthGate,
    RenderContext,
)
from shared.catalog import CATALOG

OWNERSHIP_LABELS = (LABEL_MANAGED_BY, LABEL_BUNDLE, LABEL_BUNDLE_VERSION)

# Apply order by kind (Helm's install order, CRDs moved to the front). Kinds not listed (custom
# resources) go last, because their CRDs and controllers must exist first.
KIND_ORDER: tuple[str, ...] = (
    "CustomResourceDefinition", "Namespace", "PriorityClass", "RuntimeClass", "ResourceQuota", "LimitRange",
    "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "ConfigMap", "StorageClass",
    "PersistentVolume", "PersistentVolumeClaim", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
    "Service", "DaemonSet", "Pod", "ReplicaSet", "Deployment", "StatefulSet", "HorizontalPodAutoscaler", "Job",
    "CronJob", "IngressClass", "Ingress", "APIService", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
)  # fmt: skip
_RANK = {kind: i for i, kind in enumerate(KIND_ORDER)}


# Renders one user-added bundle: (version, values, ctx) -> Bundle (bundles/custom.CustomBundle is one).
BundleLoader = Callable[[str, Mapping[str, Any], RenderContext], Bundle]


def render_bundle(service: str, version: str, values: Mapping[str, Any], ctx: RenderContext, *,
                  custom: Mapping[str, BundleLoader] | None = None) -> Bundle:  # fmt: skip
    """Render `service` at `version` for the cluster in `ctx`. Raises BundleError with what to fix."""
    if not version or not LABEL_VALUE.match(version) or len(version) > 63:
        raise BundleError(f"{service}: version {version!r} is not usable as a label value "
                          "(letters, digits, '-', '_', '.'; at most 63)")  # fmt: skip
    renderer = RENDERERS.get(service)
    if renderer is None:
        loader = (custom or {}).get(service)
        if loader is None:
            known = ", ".join([*CATALOG, *sorted(custom or {})])
            raise BundleError(f"unknown infra service {service!r} (known: {known})")
        return loader(version, values, ctx)
    rendered = renderer(version, values, ctx)
    return finalize(service, version, CATALOG[service].depends_on, rendered.objects, rendered.health)


def finalize(name: str, version: str, depends_on: tuple[str, ...], objects: list[dict[str, Any]],
             health: list[HealthGate]) -> Bundle:  # fmt: skip
    """Canonical copies with ownership labels, in apply order; refuses duplicates and foreign labels."""
    ownership = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_BUNDLE: name, LABEL_BUNDLE_VERSION: version}
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        # A JSON round trip: plain dicts/lists/str/int/bool only, nothing shared between objects or with the caller.
        copy: dict[str, Any] = json.loads(json.dumps(obj))
        md = copy.setdefault("metadata", {})
        api_version = str(copy.get("apiVersion", ""))
        group = api_version.split("/")[0] if "/" in api_version else ""  # the core group has no slash
        key = (group, str(copy.get("kind")), str(md.get("namespace", "")), str(md.get("name")))
        if key in seen:
            raise BundleError(f"{name}: {key[1]} {key[2] + '/' if key[2] else ''}{key[3]} is rendered twice")
        seen.add(key)
        labels = md.setdefault("labels", {})
        for label, value in ownership.items():
            if labels.get(label, value) != value:
                raise BundleError(f"{name}: {key[1]} {key[3]} sets {label}={labels[label]!r}; the installer owns it")
        md["labels"] = dict(sorted({**labels, **ownership}.items()))
        out.append(copy)
    out.sort(key=lambda o: _RANK.get(o["kind"], len(_RANK)))  # stable: render order within a kind
    return Bundle(name=name, version=version, depends_on=tuple(depends_on), objects=tuple(out), health=tuple(health))


# ---------------------------------------------------------------- helpers for the adapter
def is_after_health(obj: Mapping[str, Any]) -> bool:
    """Whether `obj` must wait until the bundle's health gates pass (see common.APPLY_PHASE_ANNOTATION)."""
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(APPLY_PHASE_ANNOTATION) == AFTER_HEALTH


def apply_phases(bundle: Bundle) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """(apply now, apply once the health gates pass), each in apply order."""
    first = tuple(o for o in bundle.objects if not is_after_health(o))
    later = tuple(o for o in bundle.objects if is_after_health(o))
    return first, later


def canonical_json(bundle: Bundle) -> str:
    """The bundle as one canonical JSON text (what 'byte-identical' is measured on)."""
    body = {"name": bundle.name, "version": bundle.version, "dependsOn": list(bundle.depends_on),
            "objects": list(bundle.objects),
            "health": [{"kind": g.kind, "name": g.name, "namespace": g.namespace} for g in bundle.health]}  # fmt: skip
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def bundle_digest(bundle: Bundle) -> str:
    """A short digest of the rendered content: equal digests mean nothing to apply.

    A bundle's content depends on more than its version (the listed services, node pools, values), so an
    installer that skips unchanged bundles should compare this, not the version.
    """
    return hashlib.sha256(canonical_json(bundle).encode()).hexdigest()[:16]


def object_ref(obj: Mapping[str, Any]) -> str:
    """`Kind namespace/name` for messages (e.g. the object a failed health gate or apply names)."""
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    return f"{obj.get('kind')} {ns + '/' if ns else ''}{md.get('name')}"
