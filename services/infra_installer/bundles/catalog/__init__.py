"""The built-in bundles: one renderer per service of shared/catalog.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from services.infra_installer.bundles.catalog import (
    cert_manager,
    ingress,
    log_shipping,
    namespaces,
    observability,
    rbac,
    registry_secrets,
    tenant_isolation,
)
from services.infra_installer.bundles.common import Rendered
from services.infra_installer.bundles.model import RenderContext

Renderer = Callable[[str, Mapping[str, Any], RenderContext], Rendered]

RENDERERS: dict[str, Renderer] = {
    "namespaces": namespaces.render,
    "rbac": rbac.render,
    "registry-secrets": registry_secrets.render,
    "observability": observability.render,
    "logging": log_shipping.render,
    "cert-manager": cert_manager.render,
    "ingress": ingress.render,
    "tenant-isolation": tenant_isolation.render,
}
