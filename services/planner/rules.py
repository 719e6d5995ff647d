"""The rule table: which ClusterSet spec changes are applied in place and which replace clusters.

Small changes that a running cluster can take without a new control plane, network or node image
are applied in place (`ClusterUpdateRequested`); anything that changes what a cluster *is* is made
by rotation (new clusters with the new config replace the old ones). `count` is neither: it scales.
`updateStrategy` and metadata change no cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.events.clusterset import ClusterSpec, NodePool

Kind = Literal["in-place", "rotation", "control-plane"]


@dataclass(frozen=True)
class Rule:
    field: str
    kind: Kind
    why: str


# One row per spec field (node pool fields per pool). Order is the README's table order.
RULES: tuple[Rule, ...] = (
    Rule("kubernetesVersion", "rotation", "a minor version is a new control plane and node image"),
    Rule("kubernetesVersion (self-managed)", "control-plane",
         "a control plane we run is upgraded one node at a time, keeping quorum (etcd_migration)"),
    Rule("features", "rotation", "networking and isolation features are fixed when a cluster is created"),
    Rule("network", "rotation", "a cluster cannot move to another network"),
    Rule("controlPlane.mode", "rotation", "managed and self-managed control planes are different clusters"),
    Rule("controlPlane.ha", "control-plane", "one node to three is a control-plane migration (etcd_migration)"),
    Rule("nodePools", "rotation", "adding, removing or renaming a pool changes the cluster's shape"),
    Rule("nodePools[].instanceTypes", "rotation", "new machine families mean new nodes"),
    Rule("nodePools[].spot", "rotation", "spot and on-demand capacity are separate pools"),
    Rule("nodePools[].minCount", "in-place", "scaling bounds are changed on the running pool"),
    Rule("nodePools[].maxCount", "in-place", "scaling bounds are changed on the running pool"),
    Rule("nodePools[].labels", "in-place", "labels are updated on the pool"),
    Rule("nodePools[].taints", "in-place", "taints apply to nodes created after the change"),
    Rule("infraServices", "in-place", "the installer re-applies services and versions"),
    Rule("tags", "in-place", "cloud tags are updated on the existing resources"),
)
RULE_BY_FIELD: dict[str, Rule] = {r.field: r for r in RULES}


@dataclass(frozen=True)
class Change:
    field: str  # the concrete path, e.g. "nodePools[spark-driver].maxCount"
    rule: Rule

    @property
    def kind(self) -> Kind:
        return self.rule.kind


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


_POOL_FIELDS = ("instanceTypes", "spot", "minCount", "maxCount", "labels", "taints")


def _pool_changes(old: NodePool, new: NodePool) -> list[Change]:
    before, after = _dump(old), _dump(new)
    return [Change(f"nodePools[{new.name}].{f}", RULE_BY_FIELD[f"nodePools[].{f}"])
            for f in _POOL_FIELDS if before.get(f) != after.get(f)]  # fmt: skip


def diff(old: ClusterSpec, new: ClusterSpec) -> list[Change]:
    """Every changed field between two cluster specs, with the rule that applies to it."""
    changes: list[Change] = []
    self_managed = old.control_plane.mode == new.control_plane.mode == "self-managed"
    if old.kubernetes_version != new.kubernetes_version:
        version_rule = "kubernetesVersion (self-managed)" if self_managed else "kubernetesVersion"
        changes.append(Change("kubernetesVersion", RULE_BY_FIELD[version_rule]))
    simple = {
        "features": (sorted(old.features), sorted(new.features)),
        "network": (_dump(old.network), _dump(new.network)),
        "controlPlane.mode": (old.control_plane.mode, new.control_plane.mode),
        "controlPlane.ha": (old.control_plane.ha, new.control_plane.ha),
        "infraServices": (_dump(old.infra_services), _dump(new.infra_services)),
        "tags": (old.tags, new.tags),
    }
    for field, (before, after) in simple.items():
        if before != after:
            changes.append(Change(field, RULE_BY_FIELD[field]))
    old_pools = {p.name: p for p in old.node_pools}
    new_pools = {p.name: p for p in new.node_pools}
    if set(old_pools) != set(new_pools):
        changes.append(Change("nodePools", RULE_BY_FIELD["nodePools"]))
    for name in sorted(set(old_pools) & set(new_pools)):
        changes.extend(_pool_changes(old_pools[name], new_pools[name]))
    order = {r.field: i for i, r in enumerate(RULES)}
    return sorted(changes, key=lambda c: (order[c.rule.field], c.field))


def control_plane_operation(changes: list[Change]) -> str | None:
    """`migrate` (one node to three) or `upgrade` when the changes are a control-plane operation."""
    kinds = {c.rule.field for c in changes if c.kind == "control-plane"}
    if "controlPlane.ha" in kinds:
        return "migrate"
    return "upgrade" if kinds else None


def needs_rotation(changes: list[Change]) -> bool:
    return any(c.kind == "rotation" for c in changes)


def fields(changes: list[Change], kind: Kind | None = None) -> list[str]:
    return [c.field for c in changes if kind is None or c.kind == kind]
