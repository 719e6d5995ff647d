"""Pure helpers for the Kubernetes adapter: object identity, ownership labels, apply order, drift comparison.

No I/O here, so every rule the adapter relies on (what is ours, what counts as drift) is testable directly.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.infra_installer.bundles.model import (
    LABEL_BUNDLE,
    LABEL_BUNDLE_VERSION,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    Bundle,
)
from services.infra_installer.targets.base import FIELD_MANAGER

Json = dict[str, Any]

CRD_KIND = "CustomResourceDefinition"
# Marks the ConfigMap that records which kinds a bundle used (so a later version can prune a kind it dropped).
LABEL_INVENTORY = "flotilla.dev/inventory"
_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class ObjectRef:
    """Which object: printed the way errors and drift reports name it ("Deployment ingress/controller")."""

    api_version: str
    kind: str
    name: str
    namespace: str | None = None

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def identity(self) -> tuple[str, str, str, str]:
        """Version-independent: the same object whatever apiVersion it is read through."""
        return self.group, self.kind, self.namespace or "", self.name

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"

    @classmethod
    def of(cls, obj: Mapping[str, Any], api_version: str | None = None, kind: str | None = None) -> ObjectRef:
        meta = obj.get("metadata") or {}
        return cls(api_version or str(obj.get("apiVersion") or ""), kind or str(obj.get("kind") or ""),
                   str(meta.get("name") or ""), meta.get("namespace") or None)  # fmt: skip


class BundleError(ValueError):
    """A rendered bundle that cannot be applied as it is (a renderer bug, not a cluster problem)."""


def label_value(text: str) -> str:
    """`text` as a valid label value (63 characters, alphanumerics and -_. inside, alphanumeric at the ends)."""
    return _LABEL_VALUE_BAD.sub("_", text)[:63].strip("-_.")


def bundle_selector(service: str) -> str:
    """The label selector for every object of one bundle (what prune and drift look for)."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_BUNDLE}={label_value(service)}"


def prepare(bundle: Bundle, service: str, version: str) -> list[Json]:
    """The objects to apply: copies with our ownership labels stamped on, in apply order.

    Order: CustomResourceDefinitions, then Namespaces, then the rest as the bundle lists them (the bundle's
    own order already puts what others use first). A Secret's `stringData` is folded into `data`: the API
    server never stores stringData, so leaving it would read as drift forever.
    """
    out: list[Json] = []
    seen: set[tuple[str, str, str, str]] = set()
    for raw in bundle.objects:
        obj = copy.deepcopy(dict(raw))
        meta = obj.get("metadata")
        if not obj.get("apiVersion") or not obj.get("kind") or not isinstance(meta, dict) or not meta.get("name"):
            raise BundleError(f"bundle {service} {version}: an object lacks apiVersion, kind or metadata.name")
        ref = ObjectRef.of(obj)
        if ref.identity in seen:
            raise BundleError(f"bundle {service} {version}: {ref} is listed twice")
        seen.add(ref.identity)
        meta["labels"] = {**(meta.get("labels") or {}), LABEL_MANAGED_BY: MANAGED_BY,
                          LABEL_BUNDLE: label_value(service), LABEL_BUNDLE_VERSION: label_value(version)}  # fmt: skip
        if obj["kind"] == "Secret" and obj.get("stringData"):
            data = dict(obj.get("data") or {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj["data"] = data
        out.append(obj)
    rank = {CRD_KIND: 0, "Namespace": 1}
    return sorted(out, key=lambda o: rank.get(o["kind"], 2))  # stable: keeps the bundle's order within a rank


def kinds_of(objects: Iterable[Mapping[str, Any]]) -> set[str]:
    """'<apiVersion> <Kind>' for each kind used (what the inventory records)."""
    return {f"{o['apiVersion']} {o['kind']}" for o in objects}


def split_kind(entry: str) -> tuple[str, str]:
    api_version, _, kind = entry.partition(" ")
    return api_version, kind


def prune_rank(kind: str) -> int:
    """Delete in reverse apply order: ordinary objects, then Namespaces, then CRDs (which take their CRs)."""
    return {"Namespace": 1, CRD_KIND: 2}.get(kind, 0)


def ownership_problem(live: Mapping[str, Any], service: str) -> str | None:
    """Why we must not apply over this live object, or None when it is ours.

    Ours: it carries our managed-by label and this bundle's label, or (labels stripped behind our back) our
    field manager has applied to it before. An object of another bundle, or one we never created, is left
    alone: taking it over would let a later prune delete something we do not own.
    """
    meta = live.get("metadata") or {}
    labels = meta.get("labels") or {}
    ours_by_label = labels.get(LABEL_MANAGED_BY) == MANAGED_BY
    bundle = labels.get(LABEL_BUNDLE)
    if ours_by_label and bundle not in (None, label_value(service)):
        return f"belongs to bundle {bundle!r}"
    if ours_by_label and bundle == label_value(service):
        return None
    applied_by_us = any(m.get("manager") == FIELD_MANAGER and m.get("operation") == "Apply"
                        for m in meta.get("managedFields") or [])  # fmt: skip
    if applied_by_us:
        return None
    return "exists and is not managed by flotilla; refusing to take it over"


# ---------------------------------------------------------------------------------------------- drift
def owned_part(obj: Mapping[str, Any]) -> Json:
    """The fields an apply declares: everything but apiVersion/kind/status and metadata except labels/annotations."""
    out = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    meta = obj.get("metadata") or {}
    picked = {k: meta[k] for k in ("labels", "annotations") if meta.get(k)}
    if picked:
        out["metadata"] = picked
    return out


def _named(items: list[Any]) -> bool:
    names = [i.get("name") if isinstance(i, dict) else None for i in items]
    return bool(items) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    # A quantity or port the API server normalised ("1" vs 1) is the same value.
    if isinstance(want, int | float | str) and isinstance(have, int | float | str) and not isinstance(want, bool):
        return str(want) == str(have)
    return False


def drift_paths(desired: Any, live: Any, path: str = "") -> list[str]:
    """Paths where `live` does not hold what `desired` declares. Fields `desired` does not mention (defaults,
    other managers' fields) are ignored; lists of named items are matched by name, other lists item by item."""
    if desired is None:
        return []
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [path or "."]
        out: list[str] = []
        for key, want in desired.items():
            sub = f"{path}.{key}"
            if want is None:
                continue
            if key not in live:
                out.append(sub)
            else:
                out.extend(drift_paths(want, live[key], sub))
        return out
    if isinstance(desired, list):
        if not isinstance(live, list):
            return [path]
        if _named(desired):
            by_name = {i.get("name"): i for i in live if isinstance(i, dict)}
            out = []
            for item in desired:
                sub = f'{path}[name="{item["name"]}"]'
                out.extend([sub] if item["name"] not in by_name else drift_paths(item, by_name[item["name"]], sub))
            return out
        if len(desired) != len(live):
            return [path]
        return [path] if any(drift_paths(w, h, path) for w, h in zip(desired, live, strict=True)) else []
    return [] if _same_scalar(desired, live) else [path]
