"""Secrets by reference: how a bundle asks for a secret value without ever holding it.

The choice (documented in bundles/README.md): a bundle renders a plain `v1/Secret` with **no
`data`** and two annotations,

    flotilla.dev/secret-ref: vault://platform/registry      # where the value comes from
    flotilla.dev/secret-key: .dockerconfigjson              # which data key it fills

The Kubernetes adapter, just before the server-side apply, resolves the reference and fills
exactly that key (`with_secret_value`). So the value exists only in the adapter's memory and in
the apply request: never in the rendered bundle, an event, the installer's state or a log line
(log `redacted(obj)`, never the filled object).

Why not an ExternalSecret: it needs the external-secrets operator and its CRDs on every cluster,
and a cluster that cannot reach the secret store would still go READY with a missing pull secret.
Here a reference the adapter cannot resolve fails the install (retried with backoff), and a
`kubernetes.io/dockerconfigjson` Secret without its key is rejected by the API server, so an
unfilled placeholder can never be applied by mistake.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SECRET_REF_ANNOTATION = "flotilla.dev/secret-ref"
SECRET_KEY_ANNOTATION = "flotilla.dev/secret-key"
REDACTED = "<redacted>"


@dataclass(frozen=True)
class SecretSlot:
    """One value the adapter must resolve and fill before applying `objects[index]`."""

    index: int
    namespace: str | None
    name: str
    ref: str
    key: str


def secret_ref(ref: str, key: str) -> dict[str, str]:
    """The annotations a Secret carries to ask for `ref`'s value under data[`key`]."""
    return {SECRET_REF_ANNOTATION: ref, SECRET_KEY_ANNOTATION: key}


def secret_slots(objects: Iterable[dict[str, Any]]) -> list[SecretSlot]:
    """Every Secret in `objects` that asks for a value by reference, with its position."""
    slots = []
    for i, obj in enumerate(objects):
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        if obj.get("kind") == "Secret" and SECRET_REF_ANNOTATION in annotations:
            md = obj["metadata"]
            slots.append(SecretSlot(index=i, namespace=md.get("namespace"), name=md["name"],
                                    ref=annotations[SECRET_REF_ANNOTATION],
                                    key=annotations.get(SECRET_KEY_ANNOTATION, "value")))  # fmt: skip
    return slots


def with_secret_value(obj: dict[str, Any], value: bytes) -> dict[str, Any]:
    """A copy of the Secret `obj` with its referenced key filled. Apply it; never log or store it."""
    annotations = obj["metadata"].get("annotations") or {}
    if obj.get("kind") != "Secret" or SECRET_REF_ANNOTATION not in annotations:
        raise ValueError(f"{obj.get('kind')}/{obj['metadata'].get('name')} does not ask for a secret by reference")
    filled = copy.deepcopy(obj)
    key = annotations.get(SECRET_KEY_ANNOTATION, "value")
    filled["data"] = {**(filled.get("data") or {}), key: base64.b64encode(value).decode("ascii")}
    return filled


def redacted(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to log: Secret data/stringData values replaced."""
    if obj.get("kind") != "Secret":
        return obj
    out = copy.deepcopy(obj)
    for field in ("data", "stringData"):
        if isinstance(out.get(field), dict):
            out[field] = {k: REDACTED for k in out[field]}
    return out
