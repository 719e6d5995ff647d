"""The infra-service catalog: names, default versions and install order.

One source of truth for the planner (which validates `spec.infraServices`) and the
infra_installer (which installs them in dependency order).
"""

from __future__ import annotations

from dataclasses import dataclass
from graphlib import TopologicalSorter


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


def install_order(names: list[str]) -> list[str]:
    """Topological order of the requested services, dependencies that are also requested first.

    Ties are broken by catalog order so the order is stable across processes.
    """
    requested = set(names)
    catalog_rank = {n: i for i, n in enumerate(CATALOG)}
    graph = {n: [d for d in (*CATALOG[n].depends_on, *CATALOG[n].after) if d in requested] for n in names}
    sorter = TopologicalSorter(graph)
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda n: catalog_rank.get(n, len(catalog_rank)))
        for n in ready:
            order.append(n)
            sorter.done(n)
    return order
