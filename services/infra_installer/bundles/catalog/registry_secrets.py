"""`registry-secrets`: the image pull Secret, by reference only (see bundles/secrets.py for why).

One `kubernetes.io/dockerconfigjson` Secret per platform namespace (they always exist), with
no data: the adapter resolves `flotilla.dev/secret-ref` at apply time and fills `.dockerconfigjson`.
The reference comes from `values.secretRef`, else from the installer's `RenderContext.registry_secret_ref`.
Platform pods name this Secret in `imagePullSecrets` (common.pull_secrets).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import StringConstraints

from services.infra_installer.bundles.common import (
    DNS_LABEL,
    PLATFORM_NAMESPACES,
    REGISTRY_SECRET_DEFAULT_NAME,
    BundleError,
    Rendered,
    Values,
    meta,
    parse_values,
)
from services.infra_installer.bundles.model import RenderContext
from services.infra_installer.bundles.secrets import secret_ref

SERVICE = "registry-secrets"
REGISTRY_SERVER_ANNOTATION = "flotilla.dev/registry-server"
# A reference names a store and a path ("vault://platform/registry", "aws-sm://..."), never a value.
REF_PATTERN = r"^[a-z][a-z0-9+.-]*://\S+$"


class RegistryValues(Values):
    name: Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)] = REGISTRY_SECRET_DEFAULT_NAME
    secret_ref: Annotated[str, StringConstraints(pattern=REF_PATTERN, max_length=512)] | None = None
    # Informational (the resolver may use it): which registry the credentials are for.
    server: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None


def render(version: str, values: Mapping[str, Any], ctx: RenderContext) -> Rendered:
    v = parse_values(SERVICE, RegistryValues, values)
    ref = v.secret_ref or ctx.registry_secret_ref
    if not ref:
        raise BundleError(f"{SERVICE}: no secret reference: set values.secretRef (e.g. vault://platform/registry) "
                          "or the installer's registry secret reference")  # fmt: skip
    if not re.match(REF_PATTERN, ref):
        # Refuse anything that does not look like a reference: it might be the secret itself.
        raise BundleError(f"{SERVICE}: the registry secret reference must look like <scheme>://<path>")
    annotations = secret_ref(ref, ".dockerconfigjson")
    if v.server:
        annotations[REGISTRY_SERVER_ANNOTATION] = v.server
    out = Rendered()
    for ns in PLATFORM_NAMESPACES:
        out.objects.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                                "metadata": meta(v.name, ns.name, None, annotations)})  # fmt: skip
    return out
