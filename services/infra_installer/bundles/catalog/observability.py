"""`observability`: OpenTelemetry collectors, an agent per node and a gateway.

- `otel-agent` DaemonSet: OTLP from the node's pods plus kubelet stats (through the kubelet API with
  its service account: no hostPath, so the namespace stays Pod Security `restricted`); sends to the gateway.
- `otel-gateway` Deployment + Service: batches, stamps the cluster's identity (cluster, clusterset,
  cloud, region, env) on every resource and exports to `values.otlpEndpoint` (or `debug` when unset).
The bundle version is the collector's (contrib distribution) image tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import yaml
from pydantic import Field, StringConstraints

from services.infra_installer.bundles import common as c
from services.infra_installer.bundles.model import HealthGate, RenderContext

SERVICE = "observability"
NS = c.NAMESPACE_OF[SERVICE]
IMAGE = "otel/opentelemetry-collector-contrib"
UID = 10001  # the contrib image's user
AGENT, GATEWAY = "otel-agent", "otel-gateway"


class ObservabilityValues(c.Values):
    image: Annotated[str, StringConstraints(min_length=1)] = IMAGE
    gateway_replicas: Annotated[int, Field(ge=1, le=50)] = 2
    # Where the gateway sends everything (OTLP/gRPC, e.g. "otlp.example.com:4317"); unset = debug exporter.
    otlp_endpoint: Annotated[str, StringConstraints(min_length=1)] | None = None
    otlp_insecure: bool = False


def collector_config(receivers: dict[str, Any], exporters: dict[str, Any], metrics_receivers: list[str],
                     processors: dict[str, Any]) -> str:  # fmt: skip
    pipeline_processors = ["memory_limiter", *[p for p in processors if p not in ("memory_limiter", "batch")], "batch"]
    config = {
        "extensions": {"health_check": {"endpoint": "${env:MY_POD_IP}:13133"}},
        "receivers": receivers,
        "processors": processors,
        "exporters": exporters,
        "service": {
            "extensions": ["health_check"],
            "telemetry": {"metrics": {"address": "${env:MY_POD_IP}:8888"}},
            "pipelines": {
                # Separate lists: a shared one would be dumped as a YAML anchor/alias.
                "metrics": {"receivers": metrics_receivers, "processors": list(pipeline_processors),
                            "exporters": list(exporters)},
                "traces": {"receivers": ["otlp"], "processors": list(pipeline_processors),
                           "exporters": list(exporters)},
                "logs": {"receivers": ["otlp"], "processors": list(pipeline_processors), "exporters": list(exporters)},
            },
        },
    }  # fmt: skip
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False)


def otlp_receiver() -> dict[str, Any]:
    return {"otlp": {"protocols": {"grpc": {"endpoint": "${env:MY_POD_IP}:4317"},
                                   "http": {"endpoint": "${env:MY_POD_IP}:4318"}}}}  # fmt: skip


def base_processors() -> dict[str, Any]:
    return {"memory_limiter": {"check_interval": "1s", "limit_percentage": 80, "spike_limit_percentage": 25},
            "batch": {}}  # fmt: skip


def agent_config() -> str:
    receivers = {
        **otlp_receiver(),
        "kubeletstats": {"collection_interval": "30s", "auth_type": "serviceAccount",
                         "endpoint": "https://${env:K8S_NODE_IP}:10250",
                         # Kubelet serving certificates are self-signed on most managed clusters.
                         "insecure_skip_verify": True},
    }  # fmt: skip
    exporters = {"otlp": {"endpoint": f"{GATEWAY}.{NS}.svc.cluster.local:4317", "tls": {"insecure": True}}}
    processors = {**base_processors(), "resource/node": {"attributes": [
        {"key": "k8s.node.name", "value": "${env:K8S_NODE_NAME}", "action": "upsert"}]}}
    return collector_config(receivers, exporters, ["otlp", "kubeletstats"], processors)


def gateway_config(v: ObservabilityValues, ctx: RenderContext) -> str:
    exporters: dict[str, Any]
    if v.otlp_endpoint:
        exporters = {"otlp": {"endpoint": v.otlp_endpoint, "tls": {"insecure": v.otlp_insecure}}}
    else:
        exporters = {"debug": {"verbosity": "basic"}}
    attributes = [{"key": k, "value": val, "action": "upsert"} for k, val in c.cluster_attributes(ctx)]
    processors = {**base_processors(), "resource/cluster": {"attributes": attributes}}
    return collector_config(otlp_receiver(), exporters, ["otlp"], processors)


def container(name: str, image: str, ports: list[dict[str, Any]], cpu: str, memory: str,
              node_env: bool) -> dict[str, Any]:  # fmt: skip
    env = [c.env_from_field("MY_POD_IP", "status.podIP"), {"name": "GOMEMLIMIT", "value": "400MiB"}]
    if node_env:
        env += [c.env_from_field("K8S_NODE_NAME", "spec.nodeName"), c.env_from_field("K8S_NODE_IP", "status.hostIP")]
    probe = {"httpGet": {"path": "/", "port": 13133}, "periodSeconds": 10}
    return {
        "name": name,
        "image": image,
        "args": ["--config=/conf/collector.yaml"],
        "env": env,
        "ports": ports,
        "livenessProbe": probe,
        "readinessProbe": probe,
        "resources": c.resources(cpu, memory, "512Mi"),
        "securityContext": c.restricted_container_security(),
        "volumeMounts": [{"name": "config", "mountPath": "/conf", "readOnly": True}],
    }


OTLP_PORTS = [{"name": "otlp-grpc", "containerPort": 4317, "protocol": "TCP"},
              {"name": "otlp-http", "containerPort": 4318, "protocol": "TCP"}]  # fmt: skip


SERVICE_PORTS = [{"name": "otlp-grpc", "port": 4317, "targetPort": "otlp-grpc", "protocol": "TCP"},
                 {"name": "otlp-http", "port": 4318, "targetPort": "otlp-http", "protocol": "TCP"}]  # fmt: skip


def render(version: str, values: Mapping[str, Any], ctx: RenderContext) -> c.Rendered:
    v = c.parse_values(SERVICE, ObservabilityValues, values)
    image = f"{v.image}:{version}"
    out = c.Rendered()
    agent_sel = c.app_labels(AGENT, "agent", "opentelemetry")
    gateway_sel = c.app_labels(GATEWAY, "gateway", "opentelemetry")
    agent_cfg, gateway_cfg = agent_config(), gateway_config(v, ctx)
    out.objects += [
        c.service_account(AGENT, NS, agent_sel),
        c.service_account(GATEWAY, NS, gateway_sel),
        c.config_map(AGENT, NS, {"collector.yaml": agent_cfg}, agent_sel),
        c.config_map(GATEWAY, NS, {"collector.yaml": gateway_cfg}, gateway_sel),
        c.cluster_role("flotilla-otel-agent", [
            c.rule([""], ["nodes", "nodes/stats", "nodes/proxy"], ["get", "list", "watch"]),
            c.rule([""], ["pods", "namespaces"], ["get", "list", "watch"]),
        ]),
        c.cluster_role_binding("flotilla-otel-agent", "flotilla-otel-agent", [c.sa_subject(AGENT, NS)]),
        c.service(GATEWAY, NS, gateway_sel, SERVICE_PORTS),
        # Pods send to the agent on their own node (no hostPort, which Pod Security forbids).
        c.service(AGENT, NS, agent_sel, SERVICE_PORTS, extra={"internalTrafficPolicy": "Local"}),
    ]  # fmt: skip
    volumes = lambda name: [{"name": "config", "configMap": {"name": name}}]  # noqa: E731
    # A config change must roll the pods: the ConfigMap's digest is a pod annotation.
    agent_pod = c.pod_spec(ctx, service_account=AGENT, daemon=True, security=c.restricted_pod_security(UID),
                           containers=[container("otel-collector", image, OTLP_PORTS, "50m", "128Mi", True)],
                           volumes=volumes(AGENT))  # fmt: skip
    gateway_pod = c.pod_spec(ctx, service_account=GATEWAY, security=c.restricted_pod_security(UID),
                             containers=[container("otel-collector", image, OTLP_PORTS, "100m", "256Mi", False)],
                             volumes=volumes(GATEWAY))  # fmt: skip
    out.objects += [
        c.daemonset(AGENT, NS, agent_sel, agent_pod, {c.CONFIG_DIGEST: c.digest(agent_cfg)}),
        c.deployment(GATEWAY, NS, gateway_sel, gateway_pod, v.gateway_replicas,
                     {c.CONFIG_DIGEST: c.digest(gateway_cfg)}),
    ]
    out.health += [
        HealthGate("DaemonSetRolledOut", AGENT, NS),
        HealthGate("DeploymentAvailable", GATEWAY, NS),
    ]
    return out
