"""The ClusterSet document users write (see ../shared/examples) and its validation.

Validation returns every problem at once, each named by its field path, so that one
`ClusterSetRejected` tells the user everything that is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from shared.catalog import known_services

MAX_DOCUMENT_BYTES = 256 * 1024

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=58)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=63)]

REGION_PATTERNS: dict[str, str] = {
    "aws": r"^[a-z]{2}(-gov)?-[a-z]+-\d$",
    "azure": r"^[a-z]+[a-z0-9]*$",
    "gcp": r"^[a-z]+-[a-z]+\d$",
}
Cloud = Literal["aws", "azure", "gcp"]
Feature = Literal["private-connectivity", "byon", "hard-multi-tenancy"]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class Location(_Model):
    env: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][-a-z0-9]{0,30}$")]
    cloud: Cloud
    region: Annotated[str, StringConstraints(min_length=2, max_length=40)]

    @model_validator(mode="after")
    def _region_matches_cloud(self) -> Location:
        if not re.match(REGION_PATTERNS[self.cloud], self.region):
            raise ValueError(f"region {self.region!r} is not a valid {self.cloud} region name")
        return self


class Metadata(_Model):
    name: Name
    location: Location
    cluster_type: Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9-]{0,62}$")]
    labels: dict[Label, Label] = Field(default_factory=dict)
    # Deletion protection: while true, no cluster of the set is retired (scale-down or delete is refused).
    protected: bool = False


class Taint(_Model):
    key: Label
    value: Annotated[str, StringConstraints(max_length=63)] = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class NodePool(_Model):
    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)]
    instance_types: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)]
    min_count: Annotated[int, Field(ge=0, le=5000)]
    max_count: Annotated[int, Field(ge=0, le=5000)]
    spot: bool = False
    labels: dict[Label, Label] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _bounds(self) -> NodePool:
        if self.max_count < self.min_count:
            raise ValueError(f"maxCount ({self.max_count}) is below minCount ({self.min_count})")
        return self


class Network(_Model):
    vpc_id: str | None = None
    vnet_id: str | None = None
    network_id: str | None = None
    subnet_ids: Annotated[list[str], Field(min_length=1)]


class InfraServiceRef(_Model):
    name: str
    version: str | None = None
    values: dict[str, Any] = Field(default_factory=dict)


Weekday = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
WEEKDAYS: tuple[Weekday, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class MaintenanceWindow(_Model):
    """When disruptive rollout work (draining and retiring old clusters) may start. Times are UTC."""

    days: Annotated[list[Weekday], Field(min_length=1)] = Field(default_factory=lambda: list(WEEKDAYS))
    start: Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
    duration_minutes: Annotated[int, Field(ge=1, le=7 * 24 * 60)]


class UpdateStrategy(_Model):
    type: Literal["cluster-rotation", "in-place"]
    max_surge: Annotated[int, Field(ge=0, le=1000)] = 1
    max_unavailable: Annotated[int, Field(ge=0, le=1000)] = 0
    # What a rotation does when a new cluster fails: stop and wait for an operator, or put the old ones back.
    on_failure: Literal["pause", "rollback"] = "pause"
    # A drain that has not finished by then pauses the rollout; nothing is forced.
    drain_timeout_seconds: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 900
    # Empty: any time.
    maintenance_windows: list[MaintenanceWindow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _progress_possible(self) -> UpdateStrategy:
        if self.type == "cluster-rotation" and self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("maxSurge and maxUnavailable cannot both be 0: a rotation could never progress")
        return self


class ControlPlane(_Model):
    mode: Literal["managed", "self-managed"]
    ha: bool = False


class ClusterSpec(_Model):
    """What one cluster is built from: the ClusterSet spec without count and strategy."""

    kubernetes_version: Annotated[str, StringConstraints(pattern=r"^1\.\d{1,2}$")]
    features: list[Feature] = Field(default_factory=list)
    network: Network | None = None
    node_pools: Annotated[list[NodePool], Field(min_length=1)]
    infra_services: list[str | InfraServiceRef] = Field(default_factory=list)
    tags: dict[Label, Annotated[str, StringConstraints(max_length=256)]] = Field(default_factory=dict)
    control_plane: ControlPlane = ControlPlane(mode="managed")

    def infra_service_names(self) -> list[str]:
        return [s if isinstance(s, str) else s.name for s in self.infra_services]

    def config_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:8]


class ClusterSetSpec(ClusterSpec):
    count: Annotated[int, Field(ge=0, le=10_000)]
    update_strategy: UpdateStrategy = UpdateStrategy(type="cluster-rotation")

    def cluster_spec(self) -> ClusterSpec:
        return ClusterSpec.model_validate(
            self.model_dump(exclude={"count", "update_strategy"}), strict=False
        )

    @model_validator(mode="after")
    def _cross_field(self) -> ClusterSetSpec:
        problems: list[str] = []
        if len(set(self.features)) != len(self.features):
            problems.append("features: listed twice")
        if "byon" in self.features and self.network is None:
            problems.append("network: required with feature byon (bring your own network)")
        if self.network is not None and "byon" not in self.features:
            problems.append("network: only allowed with feature byon")
        names = [p.name for p in self.node_pools]
        if len(set(names)) != len(names):
            problems.append("nodePools: pool names must be unique")
        services = self.infra_service_names()
        catalog = known_services()
        unknown = [s for s in services if s not in catalog]
        if unknown:
            problems.append(f"infraServices: unknown service(s) {unknown} (known: {', '.join(catalog)})")
        for name in services:
            d = catalog.get(name)
            if d and d.requires_feature and d.requires_feature not in self.features:
                problems.append(f"infraServices: {name} needs feature {d.requires_feature}")
            if d:
                missing = [dep for dep in d.depends_on if dep not in services]
                if missing:
                    problems.append(f"infraServices: {name} depends on {missing}, which are not listed")
        if self.control_plane.ha and self.control_plane.mode == "managed":
            problems.append("controlPlane.ha: only meaningful with mode self-managed")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ClusterSet(_Model):
    api_version: Literal["flotilla.dev/v1"]
    kind: Literal["ClusterSet"]
    metadata: Metadata
    spec: ClusterSetSpec


def clusterset_document(*, name: str, location: Location, cluster_type: str, labels: dict[str, str], protected: bool,
                        spec: ClusterSpec, count: int, update_strategy: UpdateStrategy) -> dict[str, Any]:  # fmt: skip
    """The ClusterSet document an accepted set stands for (what a fleet rollout's patch is merged into)."""
    spec_doc = spec.model_dump(mode="json", by_alias=True)
    spec_doc.update(count=count, updateStrategy=update_strategy.model_dump(mode="json", by_alias=True))
    metadata = {"name": name, "location": location.model_dump(mode="json", by_alias=True), "clusterType": cluster_type,
                "labels": dict(labels), "protected": protected}  # fmt: skip
    return {"apiVersion": "flotilla.dev/v1", "kind": "ClusterSet", "metadata": metadata, "spec": spec_doc}


class FieldError(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    field: str
    message: str


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        else:
            parts.append(p)
    return ".".join(parts) or "(document)"


def _split_cross_field(path: str, message: str) -> list[FieldError]:
    """Cross-field validators report 'field: reason; field: reason' as one error: split them."""
    message = message.removeprefix("Value error, ")
    out: list[FieldError] = []
    for part in message.split("; "):
        head, sep, rest = part.partition(": ")
        if sep and re.match(r"^[A-Za-z.\[\]0-9]+$", head) and path.endswith("spec"):
            out.append(FieldError(field=f"{path}.{head}", message=rest))
        else:
            out.append(FieldError(field=path, message=part))
    return out


def validate_clusterset(document: Any) -> tuple[ClusterSet | None, list[FieldError]]:
    """Validate a raw ClusterSet document. Returns the model or every error, never raises."""
    if not isinstance(document, dict):
        return None, [FieldError(field="(document)", message="must be a mapping (a ClusterSet object)")]
    size = len(json.dumps(document, default=str))
    if size > MAX_DOCUMENT_BYTES:
        return None, [
            FieldError(
                field="(document)", message=f"document is {size} bytes; the limit is {MAX_DOCUMENT_BYTES}"
            )
        ]
    try:
        return ClusterSet.model_validate(document), []
    except ValidationError as exc:
        errors: list[FieldError] = []
        for e in exc.errors(include_url=False):
            path = _loc_to_path(tuple(e["loc"]))
            # Literal unions put the tag in the path (e.g. '...infraServices[0].str'); drop it.
            path = re.sub(r"\.(str|function-after\[[^\]]*\]|InfraServiceRef)$", "", path)
            if e["type"] == "value_error":
                errors.extend(_split_cross_field(path, e["msg"]))
            else:
                errors.append(FieldError(field=path, message=e["msg"]))
        # Unions report one error per branch; keep each (field, message) once, in order.
        unique = list({(x.field, x.message): x for x in errors}.values())
        return None, unique
