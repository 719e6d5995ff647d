"""Bundles users add: a directory with a `bundle.yaml` descriptor and manifest YAML files.

    my-agent/
      bundle.yaml          name, version, dependsOn, healthGates (optional), manifests (optional), defaults
      00-namespace.yaml    any number of manifests, multi-document files allowed
      10-agent.yaml

`bundle.yaml`:

    name: my-agent                 # DNS label; must not be a built-in service
    version: 1.2.0                 # the only version this directory renders
    dependsOn: [namespaces]        # built-in or other custom bundles
    healthGates:                   # optional; when omitted: every Deployment, DaemonSet and CRD of the bundle
      - {kind: DeploymentAvailable, name: my-agent, namespace: my-agent}
    manifests: [00-namespace.yaml] # optional; default: every *.yaml / *.yml but bundle.yaml, by file name
    defaults: {replicas: 2}        # values used when the ClusterSet gives none

String values in manifests may use `${cluster.id}`, `${cluster.set}`, `${cluster.type}`, `${cloud}`,
`${region}`, `${env}`, `${kubernetesVersion}`, `${version}` and `${values.<key>[.<key>...]}`; `$${` is a
literal `${`. A scalar that is exactly one `${values...}` keeps the value's type (e.g. an int replica count).
Substitution happens after YAML parsing, so a value can never inject YAML structure.

Everything is read and checked when loading (`load_custom_bundles`), so a broken bundle fails at
start-up with the file and the field; rendering is then pure. Secrets with `data`/`stringData` are
refused: a custom bundle asks for secret values by reference like the built-ins (bundles/secrets.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel

from services.infra_installer.bundles.common import DNS_LABEL, BundleError
from services.infra_installer.bundles.model import Bundle, HealthGate, RenderContext
from services.infra_installer.bundles.render import finalize
from shared.catalog import CATALOG

DESCRIPTOR = "bundle.yaml"
VARIABLE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
CONTEXT_VARIABLES = ("cluster.id", "cluster.set", "cluster.type", "cloud", "region", "env", "kubernetesVersion",
                     "version")  # fmt: skip


class CustomBundleError(BundleError):
    """A custom bundle directory is unusable; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=True,
                              frozen=True)  # fmt: skip


class HealthGateSpec(_Model):
    kind: Literal["DeploymentAvailable", "DaemonSetRolledOut", "CRDEstablished", "WebhookReady"]
    name: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    namespace: Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)] | None = None


class Descriptor(_Model):
    name: Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)]
    version: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", max_length=63)]
    depends_on: list[Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)]] = Field(default_factory=list)
    health_gates: list[HealthGateSpec] | None = None
    manifests: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)] | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    source: str  # "file.yaml#2" for messages
    document: dict[str, Any]


@dataclass(frozen=True)
class CustomBundle:
    """A loaded custom bundle; calling it renders the bundle (the `BundleLoader` protocol of render.py)."""

    name: str
    version: str
    depends_on: tuple[str, ...]
    manifests: tuple[Manifest, ...]
    health_gates: tuple[HealthGate, ...] | None
    defaults: Mapping[str, Any]
    directory: str

    def __call__(self, version: str, values: Mapping[str, Any], ctx: RenderContext) -> Bundle:
        if version != self.version:
            raise BundleError(f"custom bundle {self.name!r} ({self.directory}) has version {self.version}; "
                              f"{version} was requested")  # fmt: skip
        variables = context_variables(ctx, version)
        merged = {**self.defaults, **values}
        objects = [substitute(m.document, variables, merged, f"{self.name}: {m.source}") for m in self.manifests]
        bundle = finalize(self.name, self.version, self.depends_on, objects, list(self.health_gates or ()))
        if self.health_gates is None:  # derived in apply order (CRDs first)
            bundle = replace(bundle, health=derived_health(bundle.objects))
        return bundle


# ---------------------------------------------------------------- rendering
def context_variables(ctx: RenderContext, version: str) -> dict[str, str]:
    return {"cluster.id": ctx.cluster_id, "cluster.set": ctx.clusterset, "cluster.type": ctx.cluster_type,
            "cloud": ctx.location.cloud, "region": ctx.location.region, "env": ctx.location.env,
            "kubernetesVersion": ctx.spec.kubernetes_version, "version": version}  # fmt: skip


def _lookup(name: str, variables: Mapping[str, str], values: Mapping[str, Any], where: str) -> Any:
    if name in variables:
        return variables[name]
    if name.startswith("values."):
        node: Any = values
        for part in name.split(".")[1:]:
            if not isinstance(node, Mapping) or part not in node:
                raise BundleError(f"{where}: ${{{name}}} has no value (set it in the ClusterSet's values or in "
                                  "bundle.yaml defaults)")  # fmt: skip
            node = node[part]
        return node
    raise BundleError(f"{where}: unknown variable ${{{name}}} (known: {', '.join(CONTEXT_VARIABLES)}, values.<key>)")


def _substitute_string(text: str, variables: Mapping[str, str], values: Mapping[str, Any], where: str) -> Any:
    whole = VARIABLE.fullmatch(text)
    if whole and not whole[1]:
        return _lookup(whole[2], variables, values, where)  # keeps the value's type

    def one(m: re.Match[str]) -> str:
        if m[1]:  # "$${x}" is the literal "${x}"
            return "${" + m[2] + "}"
        found = _lookup(m[2], variables, values, where)
        if isinstance(found, dict | list):
            raise BundleError(f"{where}: ${{{m[2]}}} is a {type(found).__name__}; only a whole scalar can take one")
        return str(found).lower() if isinstance(found, bool) else str(found)

    return VARIABLE.sub(one, text)


def substitute(node: Any, variables: Mapping[str, str], values: Mapping[str, Any], where: str) -> Any:
    """A fresh copy of `node` with every variable in its string scalars replaced."""
    if isinstance(node, dict):
        return {k: substitute(v, variables, values, where) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, variables, values, where) for v in node]
    if isinstance(node, str) and "${" in node:
        return _substitute_string(node, variables, values, where)
    return node


def derived_health(objects: Iterable[dict[str, Any]]) -> tuple[HealthGate, ...]:
    gates = []
    for obj in objects:
        md = obj.get("metadata") or {}
        match obj.get("kind"):
            case "Deployment":
                gates.append(HealthGate("DeploymentAvailable", md["name"], md.get("namespace")))
            case "DaemonSet":
                gates.append(HealthGate("DaemonSetRolledOut", md["name"], md.get("namespace")))
            case "CustomResourceDefinition":
                gates.append(HealthGate("CRDEstablished", md["name"]))
    return tuple(gates)


# ---------------------------------------------------------------- loading
def _format_errors(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors(include_url=False):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "(document)"
        parts.append(f"{path}: {e['msg']}")
    return "; ".join(parts)


def _read_yaml(path: Path) -> list[Any]:
    try:
        return list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise CustomBundleError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CustomBundleError(f"{path}: cannot be read: {exc}") from None


def read_descriptor(directory: Path) -> Descriptor:
    path = directory / DESCRIPTOR
    docs = [d for d in _read_yaml(path) if d is not None]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise CustomBundleError(f"{path}: must be one YAML mapping (name, version, dependsOn, healthGates, ...)")
    try:
        return Descriptor.model_validate(docs[0])
    except ValidationError as exc:
        raise CustomBundleError(f"{path}: {_format_errors(exc)}") from None


def _check_manifest(doc: Any, source: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise CustomBundleError(f"{source}: a manifest must be a mapping (a Kubernetes object)")
    for key in ("apiVersion", "kind"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise CustomBundleError(f"{source}: {key} is missing")
    md = doc.get("metadata")
    if not isinstance(md, dict) or not isinstance(md.get("name"), str) or not md["name"]:
        raise CustomBundleError(f"{source}: metadata.name is missing")
    if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
        raise CustomBundleError(f"{source}: Secret {md['name']} holds values; ask for them by reference "
                                "instead (annotations flotilla.dev/secret-ref and flotilla.dev/secret-key, "
                                "no data)")  # fmt: skip
    for text in _strings(doc):
        for m in VARIABLE.finditer(text):
            if not m[1] and m[2] not in CONTEXT_VARIABLES and not m[2].startswith("values."):
                raise CustomBundleError(f"{source}: unknown variable ${{{m[2]}}} "
                                        f"(known: {', '.join(CONTEXT_VARIABLES)}, values.<key>)")  # fmt: skip
    return doc


def _strings(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def load_bundle_dir(directory: Path) -> CustomBundle:
    descriptor = read_descriptor(directory)
    if descriptor.name in CATALOG:
        raise CustomBundleError(f"{directory / DESCRIPTOR}: name {descriptor.name!r} is a built-in service")
    if descriptor.name in descriptor.depends_on:
        raise CustomBundleError(f"{directory / DESCRIPTOR}: dependsOn: {descriptor.name!r} depends on itself")
    if descriptor.manifests is not None:
        files = []
        for name in descriptor.manifests:
            path = (directory / name).resolve()
            if directory.resolve() not in path.parents:
                raise CustomBundleError(f"{directory / DESCRIPTOR}: manifests: {name!r} is outside the bundle")
            if not path.is_file():
                raise CustomBundleError(f"{directory / DESCRIPTOR}: manifests: {name!r} does not exist")
            files.append(path)
    else:
        files = sorted(p for p in directory.iterdir()
                       if p.is_file() and p.suffix in (".yaml", ".yml") and p.name != DESCRIPTOR)  # fmt: skip
    manifests: list[Manifest] = []
    for path in files:
        for i, doc in enumerate(_read_yaml(path)):
            if doc is None:
                continue  # an empty document (e.g. a trailing ---)
            source = f"{path.name}#{i}"
            manifests.append(Manifest(source, _check_manifest(doc, f"{path}#{i}")))
    if not manifests:
        raise CustomBundleError(f"{directory}: no manifests (YAML files besides {DESCRIPTOR})")
    gates = None
    if descriptor.health_gates is not None:
        gates = tuple(HealthGate(g.kind, g.name, g.namespace) for g in descriptor.health_gates)
    return CustomBundle(name=descriptor.name, version=descriptor.version, depends_on=tuple(descriptor.depends_on),
                        manifests=tuple(manifests), health_gates=gates, defaults=dict(descriptor.defaults),
                        directory=str(directory))  # fmt: skip


def _bundle_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise CustomBundleError(f"{root}: not a directory")
    if (root / DESCRIPTOR).is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / DESCRIPTOR).is_file())
    if not found:
        raise CustomBundleError(f"{root}: no {DESCRIPTOR} here nor in any subdirectory")
    return found


def load_custom_bundles(dirs: Iterable[str | Path]) -> dict[str, CustomBundle]:
    """Load every bundle under `dirs` (each a bundle directory, or a directory of bundle directories).

    Raises CustomBundleError naming the file and field of the first problem.
    """
    bundles: dict[str, CustomBundle] = {}
    for root in dirs:
        for directory in _bundle_dirs(Path(root)):
            bundle = load_bundle_dir(directory)
            if bundle.name in bundles:
                raise CustomBundleError(f"{directory}: bundle {bundle.name!r} is also defined in "
                                        f"{bundles[bundle.name].directory}")  # fmt: skip
            bundles[bundle.name] = bundle
    for bundle in bundles.values():
        unknown = [d for d in bundle.depends_on if d not in CATALOG and d not in bundles]
        if unknown:
            raise CustomBundleError(f"{bundle.directory}/{DESCRIPTOR}: dependsOn: unknown bundle(s) {unknown}")
    return bundles
