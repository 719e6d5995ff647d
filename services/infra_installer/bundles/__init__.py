"""Infra-service bundles: versioned sets of Kubernetes manifests rendered per cluster.

`render_bundle(service, version, values, ctx)` renders a built-in service (bundles/catalog) or a
user-added one (`load_custom_bundles`, bundles/custom.py); see bundles/README.md.
"""

from services.infra_installer.bundles.common import BundleError
from services.infra_installer.bundles.custom import CustomBundle, CustomBundleError, load_custom_bundles
from services.infra_installer.bundles.render import apply_phases, bundle_digest, canonical_json, render_bundle

__all__ = ["BundleError", "CustomBundle", "CustomBundleError", "apply_phases", "bundle_digest", "canonical_json",
           "load_custom_bundles", "render_bundle"]  # fmt: skip
