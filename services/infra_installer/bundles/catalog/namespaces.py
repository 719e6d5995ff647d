"""`namespaces`: every platform namespace, with Pod Security labels.

All of them, whichever services the cluster lists: a bundle's content never depends on which other
services are listed, so adding one later (an in-place update installs just that service) finds its
namespace already there instead of failing until something re-applies this bundle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from services.infra_installer.bundles.common import (
    DNS_LABEL,
    PLATFORM_NAMESPACES,
    PodSecurityLevel,
    Rendered,
    Values,
    meta,
    parse_values,
    pod_security_labels,
)
from services.infra_installer.bundles.model import RenderContext

SERVICE = "namespaces"


class ExtraNamespace(Values):
    name: Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)]
    pod_security: PodSecurityLevel = "restricted"
    labels: dict[str, str] = Field(default_factory=dict)


class NamespacesValues(Values):
    # More platform namespaces the user wants managed with the same labels.
    extra: list[ExtraNamespace] = Field(default_factory=list)


def namespace(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta(name, None, labels)}


def render(version: str, values: Mapping[str, Any], ctx: RenderContext) -> Rendered:
    v = parse_values(SERVICE, NamespacesValues, values)
    out = Rendered()
    for ns in PLATFORM_NAMESPACES:
        out.objects.append(namespace(ns.name, {**dict(ns.labels), **pod_security_labels(ns.pod_security, ctx)}))
    for extra in v.extra:
        # Pod Security labels last: a user label cannot weaken the level asked for.
        out.objects.append(namespace(extra.name, {**extra.labels, **pod_security_labels(extra.pod_security, ctx)}))
    return out
