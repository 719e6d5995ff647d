"""Resolving secret *references* at run time (the values never travel in events, state or logs).

Supported schemes: `env://NAME` (an environment variable of the installer) and `file:///path`
(a mounted file, e.g. a Kubernetes Secret volume). Others (vault://, eventhubs://) need a resolver
this deployment does not have: the install fails with a clear, retryable error.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.infra_installer.targets.base import InstallError


class SecretRefError(InstallError):
    pass


def resolve_secret_ref(ref: str) -> bytes:
    scheme, sep, rest = ref.partition("://")
    if not sep or not rest:
        raise SecretRefError("a secret reference looks like env://NAME or file:///path")
    if scheme == "env":
        value = os.environ.get(rest)
        if value is None:
            raise SecretRefError(f"environment variable {rest} (from a secret reference) is not set")
        return value.encode()
    if scheme == "file":
        path = Path(rest)
        if not path.is_file():
            raise SecretRefError(f"secret file {path} does not exist")
        return path.read_bytes().strip()
    raise SecretRefError(f"no resolver for {scheme}:// secret references in this deployment")
