"""What a rendered bundle is. Shared by the renderers (catalog) and the Kubernetes adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from shared.events import ClusterSpec, Location

# Labels on every object we apply: how we find (and prune) what belongs to a bundle.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "flotilla"
LABEL_BUNDLE = "flotilla.dev/bundle"
LABEL_BUNDLE_VERSION = "flotilla.dev/bundle-version"


@dataclass(frozen=True)
class RenderContext:
    """Everything a bundle may be rendered from: the cluster's spec and what provisioning produced."""

    cluster_id: str
    clusterset: str
    cluster_type: str
    location: Location
    spec: ClusterSpec
    # Provisioning results per step (e.g. resources["log_stream"]["name"]); never secrets.
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Where the registry pull secret comes from (e.g. "vault://platform/registry"); resolved at run time.
    registry_secret_ref: str | None = None


@dataclass(frozen=True)
class HealthGate:
    """A condition the bundle must reach before it counts as installed."""

    kind: Literal["DeploymentAvailable", "DaemonSetRolledOut", "CRDEstablished", "WebhookReady"]
    name: str
    namespace: str | None = None


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    depends_on: tuple[str, ...]
    # Manifests as dicts, in apply order (CustomResourceDefinitions first).
    objects: tuple[dict[str, Any], ...]
    health: tuple[HealthGate, ...] = ()
