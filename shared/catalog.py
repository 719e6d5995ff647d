"""The infra-service catalog: names, default versions and install order.

One source of truth for the planner (which validates `spec.infraServices`) and the
infra_installer (which installs them in dependency order).
"""

from __future__ import annotations

from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path

import yaml


@dataclass(frozen=True)
class InfraServiceDef:
    name: str
    version: str
    depends_on: tuple[str, ...] = ()
    # Installed after these when they are listed too, but they are not required.
    after: tuple[str, ...] = ()
    requires_feature: str | None = None


CATALOG: dict[str, InfraServiceDef] = {
    d.name: d
    for d in (
        InfraServiceDef("namespaces", "1.0.0"),
        InfraServiceDef("rbac", "1.0.0", ("namespaces",)),
        InfraServiceDef("registry-secrets", "1.0.0", ("namespaces",)),
        InfraServiceDef("observability", "0.104.0", ("namespaces", "rbac")),
        InfraServiceDef("logging", "3.1.0", ("namespaces", "rbac")),
        InfraServiceDef("cert-manager", "v1.15.3", ("namespaces", "rbac")),
        InfraServiceDef("ingress", "4.11.2", ("namespaces", "rbac"), after=("cert-manager",)),
        InfraServiceDef(
            "tenant-isolation", "1.0.0", ("namespaces", "rbac"), requires_feature="hard-multi-tenancy"
        ),
    )
}


# Bundles users add (a directory with a bundle.yaml, see services/infra_installer/bundles/custom.py),
# registered at start-up from settings.custom_bundle_dirs by every service that validates or installs
# infra services, so that a ClusterSet may list them.
_CUSTOM: dict[str, InfraServiceDef] = {}


def known_services() -> dict[str, InfraServiceDef]:
    """The built-in catalog plus the registered custom bundles."""
    return {**CATALOG, **_CUSTOM}


def register_custom(defs: dict[str, InfraServiceDef]) -> None:
    clash = sorted(set(defs) & set(CATALOG))
    if clash:
        raise ValueError(f"custom bundle(s) {clash} would replace built-in services")
    _CUSTOM.clear()
    _CUSTOM.update(defs)


def read_custom_defs(dirs: list[str]) -> dict[str, InfraServiceDef]:
    """name, version and dependsOn of each bundle.yaml under `dirs` (the installer validates the rest)."""
    defs: dict[str, InfraServiceDef] = {}
    for root in map(Path, dirs):
        candidates = [root] if (root / "bundle.yaml").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
        for directory in candidates:
            descriptor = directory / "bundle.yaml"
            if not descriptor.is_file():
                continue
            doc = yaml.safe_load(descriptor.read_text()) or {}
            try:
                defs[str(doc["name"])] = InfraServiceDef(str(doc["name"]), str(doc["version"]),
                                                         tuple(doc.get("dependsOn") or ()))  # fmt: skip
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{descriptor}: needs name and version ({exc})") from None
    return defs


def install_order(names: list[str]) -> list[str]:
    """Topological order of the requested services, dependencies that are also requested first.

    Ties are broken by catalog order so the order is stable across processes.
    """
    requested = set(names)
    catalog = known_services()
    catalog_rank = {n: i for i, n in enumerate(catalog)}
    graph = {n: [d for d in (*catalog[n].depends_on, *catalog[n].after) if d in requested] for n in names}
    sorter = TopologicalSorter(graph)
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda n: catalog_rank.get(n, len(catalog_rank)))
        for n in ready:
            order.append(n)
            sorter.done(n)
    return order
