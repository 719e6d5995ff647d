"""Deployment files: they parse, name the six services, and set only real settings.

There is no helm, docker engine or Kubernetes here, so Helm templates are checked by
stripping their `{{ }}` actions (whole-line actions are dropped, inline ones become a
placeholder) and parsing what remains as YAML, plus checks that every `.Values` path they
read exists, every `include` is defined and every block is closed. NATS configurations are
checked by nats-server itself (`-t`).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import Settings
from shared.embedded import find_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "flotilla"
COMPOSE = REPO / "docker-compose.yml"
SERVICES = ("planner", "cloud_provisioner", "infra_installer", "rotation", "etcd_migration", "status_projector")
FIELDS = {f"FLOTILLA_{name.upper()}" for name in Settings.model_fields}
ENV_VAR = re.compile(r"\bFLOTILLA_[A-Z0-9_]+")  # not NATS_FLOTILLA_PASSWORD (a NATS server variable)


def _settings_from(env: dict[str, Any]) -> Settings:
    """Validate env values the way the services will read them (raises on a bad value)."""
    return Settings(**{k.removeprefix("FLOTILLA_").lower(): v for k, v in env.items()})  # type: ignore[arg-type]


# ---------------------------------------------------------------- Helm templates, stripped
_COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.S)
_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
_ONLY_ACTIONS = re.compile(r"^\s*(\{\{.*?\}\}\s*)+$")
_OPENS = {"if", "range", "with", "define", "block"}


def strip_template(text: str) -> str:
    """A template minus its actions: lines holding only actions go, inline actions become a placeholder."""
    text = _COMMENT.sub("", text)
    kept = [_ACTION.sub("TEMPLATED", line) for line in text.splitlines() if not _ONLY_ACTIONS.match(line)]
    return "\n".join(kept)


def _actions(text: str) -> list[str]:
    return [m.group(1) for m in _ACTION.finditer(_COMMENT.sub("", text))]


def blocks_balanced(text: str) -> bool:
    """Every if/range/with/define has its `end`, and no `end` comes first."""
    depth = 0
    for action in _actions(text):
        word = action.split(" ", 1)[0]
        depth += (word in _OPENS) - (word == "end")
        if depth < 0:
            return False
    return depth == 0


def _templates() -> list[Path]:
    return sorted((CHART / "templates").glob("*.yaml"))


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _rendered(name: str) -> list[dict[str, Any]]:
    docs = yaml.safe_load_all(strip_template((CHART / "templates" / name).read_text()))
    return [d for d in docs if d]


def test_chart_metadata_and_values_parse() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "flotilla" and chart["version"]
    values = _values()
    assert set(values["services"]) == set(SERVICES)
    assert values["replicas"] >= 2, "the design requires two replicas of every service"
    assert all(svc.get("replicas", values["replicas"]) >= 2 for svc in values["services"].values())
    assert all(svc["enabled"] for svc in values["services"].values())


def test_every_template_parses_once_stripped() -> None:
    kinds: set[str] = set()
    for path in _templates():
        docs = _rendered(path.name)
        assert docs, f"{path.name} renders nothing"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path.name
            kinds.add(doc["kind"])
    assert kinds == {"Deployment", "ServiceAccount", "PodDisruptionBudget", "Service"}


def test_template_blocks_are_closed_and_references_exist() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    defined = set(re.findall(r'define "([^"]+)"', helpers))
    values = _values()
    svc_keys = {k for svc in values["services"].values() for k in svc}
    for path in [*_templates(), CHART / "templates" / "_helpers.tpl", CHART / "templates" / "NOTES.txt"]:
        text = path.read_text()
        assert blocks_balanced(text), f"{path.name}: a block is not closed, or an `end` has no block"
        for name in re.findall(r'include "([^"]+)"', text):
            assert name in defined, f"{path.name}: include {name!r} is not defined"
        for dotted in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            node: Any = values
            for part in dotted.strip(".").split("."):
                assert isinstance(node, dict) and part in node, f"{path.name}: .Values{dotted} is not in values.yaml"
                node = node[part]
        guarded = set(re.findall(r'hasKey \$svc "(\w+)"', text))
        for key in re.findall(r"\$svc\.(\w+)", text):
            assert key in svc_keys | guarded, f"{path.name}: $svc.{key} is not set for any service"


def test_deployment_runs_each_service_safely() -> None:
    (deployment,) = _rendered("deployments.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "services.TEMPLATED"]
    assert '"-m", "services.{{ $name }}"' in (CHART / "templates" / "deployments.yaml").read_text()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    values = _values()
    assert values["podSecurityContext"]["runAsNonRoot"] is True and values["podSecurityContext"]["runAsUser"] != 0
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert values["securityContext"]["allowPrivilegeEscalation"] is False
    assert values["podDisruptionBudget"]["enabled"] is True
    assert values["terminationGracePeriodSeconds"] > Settings().shutdown_grace_s
    (service,) = _rendered("service.yaml")
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"] == "http"


def test_chart_env_is_real_settings() -> None:
    text = "\n".join(p.read_text() for p in [CHART / "values.yaml", *(CHART / "templates").iterdir()])
    assert set(ENV_VAR.findall(text)) <= FIELDS, set(ENV_VAR.findall(text)) - FIELDS
    values = _values()
    assert values["env"]["FLOTILLA_STREAM_REPLICAS"] == "3"
    for name, svc in values["services"].items():
        settings = _settings_from({**values["env"], **svc.get("env", {})})
        assert settings.stream_replicas == 3, name
    assert set(values.get("secretEnv") or {}) <= FIELDS


# ---------------------------------------------------------------- docker-compose.yml and the Dockerfile
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_the_six_services_on_nats_and_redis() -> None:
    services = _compose()["services"]
    assert set(services) == {"nats", "redis", *SERVICES}
    assert "-js" in services["nats"]["command"]
    for name in SERVICES:
        svc = services[name]
        assert svc["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}, name
        assert svc["command"] == ["python", "-m", f"services.{name}"], name
        assert str(svc["user"]).split(":")[0] not in ("0", "root") and svc["read_only"] is True, name
        assert set(svc["depends_on"]) == {"nats", "redis"}, name
        env = svc["environment"]
        assert set(env) <= FIELDS, (name, set(env) - FIELDS)
        settings = _settings_from(env)
        assert settings.nats_url == "nats://nats:4222" and settings.redis_url.startswith("redis://redis:"), name
    projector = _settings_from(services["status_projector"]["environment"])
    assert projector.api_host == "0.0.0.0"
    assert services["status_projector"]["ports"] == [f"{projector.api_port}:{projector.api_port}"]


def test_dockerfile_builds_a_non_root_python_311_image() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install (--no-deps )?\.\s", text)
    (user,) = re.findall(r"^USER (\S+)", text, re.M)
    assert user.split(":")[0] not in ("0", "root")
    assert str(_values()["podSecurityContext"]["runAsUser"]) == user.split(":")[0]


def test_each_service_is_a_runnable_module() -> None:
    # The chart and compose run `python -m services.<name>`: the module must exist.
    missing = [name for name in SERVICES if not (REPO / "services" / name / "__main__.py").exists()]
    assert not missing, f"no services/<name>/__main__.py for {missing}"


# ---------------------------------------------------------------- every file parses; every FLOTILLA_ var is real
def test_every_yaml_file_parses() -> None:
    files = [COMPOSE, *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    plain = [f for f in files if "templates" not in f.parts]
    assert COMPOSE in plain and (DEPLOY / "nats" / "helm-values.yaml") in plain
    for path in plain:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_every_flotilla_variable_mentioned_is_a_setting_and_every_setting_is_documented() -> None:
    texts = {p: p.read_text() for p in [COMPOSE, *DEPLOY.rglob("*")] if p.is_file()}
    for path, text in texts.items():
        unknown = set(ENV_VAR.findall(text)) - FIELDS
        assert not unknown, f"{path.relative_to(REPO)} mentions {unknown}, which are not Settings fields"
    undocumented = FIELDS - set(ENV_VAR.findall(texts[DEPLOY / "README.md"]))
    assert not undocumented, f"deploy/README.md does not document {undocumented}"


def test_nats_cluster_configs_are_valid_for_nats_server(tmp_path: Path) -> None:
    helm_values = yaml.safe_load((DEPLOY / "nats" / "helm-values.yaml").read_text())
    assert helm_values["config"]["cluster"]["replicas"] == 3 and helm_values["config"]["jetstream"]["enabled"]
    configs = sorted((DEPLOY / "nats").glob("nats-*.conf"))
    assert [p.name for p in configs] == ["nats-1.conf", "nats-2.conf", "nats-3.conf"]
    env = {**os.environ, "NATS_FLOTILLA_PASSWORD": "p1", "NATS_SYS_PASSWORD": "p2"}
    names = set()
    for conf in configs:
        result = subprocess.run([find_binary("nats-server"), "-t", "-c", str(conf)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert result.returncode == 0, (conf.name, result.stdout, result.stderr)
        names.update(re.findall(r"^server_name:\s*(\S+)", conf.read_text(), re.M))
    assert names == {"nats-1", "nats-2", "nats-3"}
    routes = re.findall(r"nats-route://\S+", (DEPLOY / "nats" / "cluster.conf").read_text())
    assert len(routes) == 3


@pytest.mark.parametrize("broken", ["{{- if .Values.x }}\nkey: v\n", "a: {{ .Values.y }}\n{{- end }}\n{{- end }}\n"])
def test_template_checks_can_fail(broken: str) -> None:
    assert not blocks_balanced(broken)
    assert blocks_balanced("{{- if .a }}{{ with .b }}x{{ end }}{{- end }}")
    assert strip_template("a: {{ .x }}\n{{- if .y }}\nb: 1\n{{- end }}\n") == "a: TEMPLATED\nb: 1"
