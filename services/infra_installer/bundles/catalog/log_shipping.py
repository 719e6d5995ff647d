"""`logging`: Fluent Bit on every node, shipping container logs to the cluster's log stream.

The stream is the one provisioning created (`ctx.resources["log_stream"]`), so the output is
cloud-specific:
- aws: Fluent Bit's `kinesis_streams` output to the Kinesis stream (`name`, `region`); the node
  role's credentials sign the requests.
- azure: the `kafka` output to the Event Hubs namespace's Kafka endpoint (`namespace`, hub =
  `name`). Event Hubs wants a connection string as SASL password: it comes from the Secret
  `log-shipper-eventhubs`, filled by reference (bundles/secrets.py) from `values.connectionStringRef`,
  by default `eventhubs://<resource_group>/<namespace>/<hub>` (the resolver fetches the hub's key).
- gcp: Fluent Bit has no Pub/Sub output, so it sends OTLP to a small `log-forwarder` Deployment
  (OpenTelemetry collector) whose `googlecloudpubsub` exporter publishes to the topic
  (`log_stream_id` = `projects/<p>/topics/<t>`) with the node service account.
Every record carries the cluster's identity. The bundle version is Fluent Bit's image tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import yaml
from pydantic import StringConstraints

from services.infra_installer.bundles import common as c
from services.infra_installer.bundles.model import HealthGate, RenderContext
from services.infra_installer.bundles.secrets import secret_ref
from shared.catalog import CATALOG

SERVICE = "logging"
NS = c.NAMESPACE_OF[SERVICE]
IMAGE = "cr.fluentbit.io/fluent/fluent-bit"
FORWARDER_IMAGE = "otel/opentelemetry-collector-contrib"
SHIPPER, FORWARDER = "fluent-bit", "log-forwarder"
EVENTHUBS_SECRET = "log-shipper-eventhubs"
FORWARDER_UID = 10001


class LoggingValues(c.Values):
    image: Annotated[str, StringConstraints(min_length=1)] = IMAGE
    # azure: where the Event Hubs connection string comes from (a reference, never the string).
    connection_string_ref: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9+.-]*://\S+$")] | None = None
    # gcp: the forwarder's collector version (defaults to the catalog's observability version).
    forwarder_version: Annotated[str, StringConstraints(min_length=1)] | None = None


def log_stream(ctx: RenderContext) -> dict[str, Any]:
    stream = ctx.resources.get("log_stream") or {}
    if not stream.get("name"):
        raise c.BundleError(f"{SERVICE}: the cluster's log stream is unknown (provisioning result "
                            "resources['log_stream'] with at least 'name')")  # fmt: skip
    return stream


def _section(name: str, items: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in items)
    return f"[{name}]\n" + "".join(f"    {k.ljust(width)} {v}\n" for k, v in items)


def output(ctx: RenderContext, stream: dict[str, Any]) -> list[tuple[str, str]]:
    match ctx.location.cloud:
        case "aws":
            return [("Name", "kinesis_streams"), ("Match", "*"),
                    ("region", str(stream.get("region") or ctx.location.region)), ("stream", str(stream["name"])),
                    ("time_key", "time"), ("time_key_format", "%Y-%m-%dT%H:%M:%S.%3NZ")]  # fmt: skip
        case "azure":
            namespace = _required(stream, "namespace", "the Event Hubs namespace")
            return [("Name", "kafka"), ("Match", "*"),
                    ("Brokers", f"{namespace}.servicebus.windows.net:9093"), ("Topics", str(stream["name"])),
                    ("Format", "json"), ("rdkafka.security.protocol", "SASL_SSL"),
                    ("rdkafka.sasl.mechanism", "PLAIN"), ("rdkafka.sasl.username", "$ConnectionString"),
                    # Fluent Bit expands ${...} from the environment, which the Secret feeds.
                    ("rdkafka.sasl.password", "${EVENTHUBS_CONNECTION_STRING}"),
                    ("rdkafka.request.timeout.ms", "60000")]  # fmt: skip
        case "gcp":
            return [("Name", "opentelemetry"), ("Match", "*"), ("Host", f"{FORWARDER}.{NS}.svc.cluster.local"),
                    ("Port", "4318"), ("Logs_uri", "/v1/logs"), ("Tls", "Off")]  # fmt: skip
    raise c.BundleError(f"{SERVICE}: no log output for cloud {ctx.location.cloud!r}")


def _required(stream: dict[str, Any], key: str, what: str) -> str:
    if not stream.get(key):
        raise c.BundleError(f"{SERVICE}: {what} is unknown (resources['log_stream']['{key}'])")
    return str(stream[key])


def fluent_bit_config(ctx: RenderContext, stream: dict[str, Any]) -> str:
    record = [("Name", "record_modifier"), ("Match", "*")]
    record += [("Record", f"{key} {value}") for key, value in c.cluster_attributes(ctx)]
    return "\n".join([
        _section("SERVICE", [("Flush", "5"), ("Log_Level", "info"), ("Daemon", "off"),
                             ("Parsers_File", "/fluent-bit/etc/parsers.conf"), ("HTTP_Server", "On"),
                             ("HTTP_Listen", "0.0.0.0"), ("HTTP_Port", "2020"), ("Health_Check", "On"),
                             ("storage.path", "/var/fluent-bit/state/buffer")]),
        _section("INPUT", [("Name", "tail"), ("Tag", "kube.*"), ("Path", "/var/log/containers/*.log"),
                           ("multiline.parser", "docker, cri"), ("DB", "/var/fluent-bit/state/tail.db"),
                           ("Mem_Buf_Limit", "50MB"), ("Skip_Long_Lines", "On"), ("storage.type", "filesystem")]),
        _section("FILTER", [("Name", "kubernetes"), ("Match", "kube.*"), ("Merge_Log", "On"), ("Keep_Log", "Off"),
                            ("K8S-Logging.Parser", "On"), ("K8S-Logging.Exclude", "On")]),
        _section("FILTER", record),
        _section("OUTPUT", output(ctx, stream)),
    ])  # fmt: skip


def forwarder_config(ctx: RenderContext, stream: dict[str, Any]) -> str:
    topic = str(stream.get("log_stream_id") or "")
    if not topic.startswith("projects/") or "/topics/" not in topic:
        raise c.BundleError(f"{SERVICE}: the Pub/Sub topic is unknown (resources['log_stream']['log_stream_id'] "
                            "must be projects/<project>/topics/<topic>)")  # fmt: skip
    project = topic.split("/")[1]
    config = {
        "extensions": {"health_check": {"endpoint": "${env:MY_POD_IP}:13133"}},
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": "${env:MY_POD_IP}:4318"}}}},
        "processors": {"memory_limiter": {"check_interval": "1s", "limit_percentage": 80,
                                          "spike_limit_percentage": 25}, "batch": {}},
        "exporters": {"googlecloudpubsub": {"project": project, "topic": topic}},
        "service": {"extensions": ["health_check"], "pipelines": {"logs": {
            "receivers": ["otlp"], "processors": ["memory_limiter", "batch"], "exporters": ["googlecloudpubsub"]}}},
    }  # fmt: skip
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False)


def shipper_container(image: str, azure: bool) -> dict[str, Any]:
    env = [c.env_from_field("NODE_NAME", "spec.nodeName")]
    if azure:
        env.append({"name": "EVENTHUBS_CONNECTION_STRING",
                    "valueFrom": {"secretKeyRef": {"name": EVENTHUBS_SECRET, "key": "connection-string"}}})
    return {
        "name": "fluent-bit",
        "image": image,
        "args": ["--config=/fluent-bit/etc/conf/fluent-bit.conf"],
        "env": env,
        "ports": [{"name": "http", "containerPort": 2020, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/api/v1/health", "port": "http"}, "periodSeconds": 10},
        "resources": c.resources("50m", "64Mi", "256Mi"),
        # Root to read the root-owned log files of every pod; nothing more: no capabilities, no escalation.
        "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "config", "mountPath": "/fluent-bit/etc/conf", "readOnly": True},
            {"name": "varlog", "mountPath": "/var/log", "readOnly": True},
            {"name": "state", "mountPath": "/var/fluent-bit/state"},
        ],
    }  # fmt: skip


def forwarder_objects(ctx: RenderContext, v: LoggingValues, config: str) -> list[dict[str, Any]]:
    sel = c.app_labels(FORWARDER, "forwarder", "logging")
    version = v.forwarder_version or CATALOG["observability"].version
    probe = {"httpGet": {"path": "/", "port": 13133}, "periodSeconds": 10}
    container = {
        "name": "otel-collector",
        "image": f"{FORWARDER_IMAGE}:{version}",
        "args": ["--config=/conf/collector.yaml"],
        "env": [c.env_from_field("MY_POD_IP", "status.podIP")],
        "ports": [{"name": "otlp-http", "containerPort": 4318, "protocol": "TCP"}],
        "livenessProbe": probe,
        "readinessProbe": probe,
        "resources": c.resources("100m", "128Mi", "512Mi"),
        "securityContext": c.restricted_container_security(),
        "volumeMounts": [{"name": "config", "mountPath": "/conf", "readOnly": True}],
    }
    pod = c.pod_spec(ctx, service_account=FORWARDER, containers=[container],
                     security=c.restricted_pod_security(FORWARDER_UID),
                     volumes=[{"name": "config", "configMap": {"name": FORWARDER}}])  # fmt: skip
    return [
        c.service_account(FORWARDER, NS, sel),
        c.config_map(FORWARDER, NS, {"collector.yaml": config}, sel),
        c.service(FORWARDER, NS, sel, [{"name": "otlp-http", "port": 4318, "targetPort": "otlp-http",
                                        "protocol": "TCP"}]),  # fmt: skip
        c.deployment(FORWARDER, NS, sel, pod, 2, {c.CONFIG_DIGEST: c.digest(config)}),
    ]


def render(version: str, values: Mapping[str, Any], ctx: RenderContext) -> c.Rendered:
    v = c.parse_values(SERVICE, LoggingValues, values)
    stream = log_stream(ctx)
    cloud = ctx.location.cloud
    config = fluent_bit_config(ctx, stream)
    sel = c.app_labels(SHIPPER, "shipper", "logging")
    out = c.Rendered()
    out.objects += [
        c.service_account(SHIPPER, NS, sel),
        c.cluster_role("flotilla-log-shipper", [c.rule([""], ["namespaces", "pods"], ["get", "list", "watch"])]),
        c.cluster_role_binding("flotilla-log-shipper", "flotilla-log-shipper", [c.sa_subject(SHIPPER, NS)]),
        c.config_map(SHIPPER, NS, {"fluent-bit.conf": config}, sel),
    ]
    if cloud == "azure":
        ref = v.connection_string_ref or "eventhubs://{}/{}/{}".format(
            _required(stream, "resource_group", "the Event Hubs resource group"),
            _required(stream, "namespace", "the Event Hubs namespace"), stream["name"])
        out.objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                            "metadata": c.meta(EVENTHUBS_SECRET, NS, sel, secret_ref(ref, "connection-string"))})
    volumes = [
        {"name": "config", "configMap": {"name": SHIPPER}},
        {"name": "varlog", "hostPath": {"path": "/var/log", "type": "Directory"}},
        {"name": "state", "hostPath": {"path": "/var/fluent-bit/state", "type": "DirectoryOrCreate"}},
    ]
    pod = c.pod_spec(ctx, service_account=SHIPPER, daemon=True, containers=[shipper_container(
        f"{v.image}:{version}", cloud == "azure")], volumes=volumes)  # fmt: skip
    out.objects.append(c.daemonset(SHIPPER, NS, sel, pod, {c.CONFIG_DIGEST: c.digest(config)}))
    out.health.append(HealthGate("DaemonSetRolledOut", SHIPPER, NS))
    if cloud == "gcp":
        out.objects += forwarder_objects(ctx, v, forwarder_config(ctx, stream))
        out.health.append(HealthGate("DeploymentAvailable", FORWARDER, NS))
    return out
