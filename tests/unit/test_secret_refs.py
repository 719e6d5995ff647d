"""Secret references resolved at run time: env:// and file://, clear errors for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.infra_installer.secret_refs import SecretRefError, resolve_secret_ref
from services.infra_installer.targets.base import InstallError


def test_env_and_file_references_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_TEST_PULL", '{"auths": {}}')
    assert resolve_secret_ref("env://FLOTILLA_TEST_PULL") == b'{"auths": {}}'
    secret = tmp_path / "dockerconfig.json"
    secret.write_text('{"auths": {"r": {}}}\n')
    assert resolve_secret_ref(f"file://{secret}") == b'{"auths": {"r": {}}}'


@pytest.mark.parametrize(("ref", "says"), [
    ("env://FLOTILLA_TEST_NOT_SET", "is not set"),
    ("file:///nonexistent/secret", "does not exist"),
    ("vault://platform/registry", "no resolver for vault://"),
    ("just-a-string", "looks like"),
])  # fmt: skip
def test_unresolvable_references_fail_retryably_without_echoing_a_value(ref: str, says: str) -> None:
    with pytest.raises(SecretRefError) as err:
        resolve_secret_ref(ref)
    assert says in str(err.value) and isinstance(err.value, InstallError)
