"""`ingress`: the ingress-nginx controller (Deployment, LoadBalancer Service, IngressClass `nginx`).

The bundle version is the chart version (4.x.y); the controller image is the matching
controller release (v1.x.y), or `values.controllerTag`. Upstream's admission webhook is left
out (one less webhook that can block applies); the controller runs Pod Security `restricted`.
The load balancer is internal when `values.internal` is set, with each cloud's annotation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from services.infra_installer.bundles import common as c
from services.infra_installer.bundles.model import HealthGate, RenderContext

SERVICE = "ingress"
NS = c.NAMESPACE_OF[SERVICE]
NAME = "ingress-nginx-controller"
SA = "ingress-nginx"
IMAGE = "registry.k8s.io/ingress-nginx/controller"
CONTROLLER_CLASS = "k8s.io/ingress-nginx"
UID = 101  # www-data in the controller image
ELECTION_ID = "ingress-nginx-leader"
READ = ["get", "list", "watch"]

INTERNAL_LB: dict[str, dict[str, str]] = {
    "aws": {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"},
    "azure": {"service.beta.kubernetes.io/azure-load-balancer-internal": "true"},
    "gcp": {"networking.gke.io/load-balancer-type": "Internal"},
}
CLOUD_LB: dict[str, dict[str, str]] = {
    # A Network Load Balancer keeps client IPs and scales without pre-warming.
    "aws": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
    "azure": {},
    "gcp": {},
}


class IngressValues(c.Values):
    image: Annotated[str, StringConstraints(min_length=1)] = IMAGE
    controller_tag: Annotated[str, StringConstraints(min_length=1)] | None = None
    replicas: Annotated[int, Field(ge=1, le=100)] = 2
    internal: bool = False
    default_class: bool = True
    class_name: Annotated[str, StringConstraints(pattern=c.DNS_LABEL, max_length=63)] = "nginx"
    config: dict[str, str] = Field(default_factory=dict)


def controller_tag(version: str, v: IngressValues) -> str:
    if v.controller_tag:
        return v.controller_tag
    m = re.fullmatch(r"4\.(\d+)\.(\d+)", version)
    if not m:
        raise c.BundleError(f"{SERVICE}: cannot derive the controller image from chart version {version!r}; "
                            "set values.controllerTag")  # fmt: skip
    return f"v1.{m[1]}.{m[2]}"


def cluster_rules() -> list[dict[str, Any]]:
    return [
        c.rule([""], ["configmaps", "endpoints", "nodes", "pods", "secrets", "namespaces"], ["list", "watch"]),
        c.rule(["coordination.k8s.io"], ["leases"], ["list", "watch"]),
        c.rule([""], ["nodes"], ["get"]),
        c.rule([""], ["services"], READ),
        c.rule(["networking.k8s.io"], ["ingresses", "ingressclasses"], READ),
        c.rule(["networking.k8s.io"], ["ingresses/status"], ["update"]),
        c.rule([""], ["events"], ["create", "patch"]),
        c.rule(["discovery.k8s.io"], ["endpointslices"], READ),
    ]


def namespace_rules() -> list[dict[str, Any]]:
    return [
        c.rule([""], ["namespaces"], ["get"]),
        c.rule([""], ["configmaps", "pods", "secrets", "endpoints", "services"], READ),
        c.rule(["networking.k8s.io"], ["ingresses", "ingressclasses"], READ),
        c.rule(["networking.k8s.io"], ["ingresses/status"], ["update"]),
        c.rule(["coordination.k8s.io"], ["leases"], ["get", "update"], [ELECTION_ID]),
        c.rule(["coordination.k8s.io"], ["leases"], ["create"]),
        c.rule([""], ["events"], ["create", "patch"]),
        c.rule(["discovery.k8s.io"], ["endpointslices"], READ),
    ]


def render(version: str, values: Mapping[str, Any], ctx: RenderContext) -> c.Rendered:
    v = c.parse_values(SERVICE, IngressValues, values)
    image = f"{v.image}:{controller_tag(version, v)}"
    sel = c.app_labels("ingress-nginx", "controller")
    config = {"allow-snippet-annotations": "false", "use-forwarded-headers": "false", **dict(sorted(v.config.items()))}
    container = {
        "name": "controller",
        "image": image,
        "args": [
            "/nginx-ingress-controller",
            f"--publish-service=$(POD_NAMESPACE)/{NAME}",
            f"--election-id={ELECTION_ID}",
            f"--controller-class={CONTROLLER_CLASS}",
            f"--ingress-class={v.class_name}",
            f"--configmap=$(POD_NAMESPACE)/{NAME}",
            "--watch-ingress-without-class=false",
        ],
        "env": [c.env_from_field("POD_NAME", "metadata.name"), c.env_from_field("POD_NAMESPACE", "metadata.namespace"),
                {"name": "LD_PRELOAD", "value": "/usr/local/lib/libmimalloc.so"}],
        "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"},
                  {"name": "https", "containerPort": 443, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 10254, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 10254, "scheme": "HTTP"}, "initialDelaySeconds": 10,
                          "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 5},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 10254, "scheme": "HTTP"}, "initialDelaySeconds": 10,
                           "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3},
        "lifecycle": {"preStop": {"exec": {"command": ["/wait-shutdown"]}}},
        "resources": c.resources("100m", "90Mi", "512Mi"),
        # nginx writes its runtime files, so the root filesystem stays writable; binding :80/:443 needs the capability.
        "securityContext": {**c.restricted_container_security(read_only_root=False, add=("NET_BIND_SERVICE",)),
                            "runAsUser": UID, "runAsGroup": 82},
    }  # fmt: skip
    pod = c.pod_spec(ctx, service_account=SA, containers=[container], security={
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        extra={"terminationGracePeriodSeconds": 300, "dnsPolicy": "ClusterFirst"})  # fmt: skip
    annotations = {**CLOUD_LB[ctx.location.cloud], **(INTERNAL_LB[ctx.location.cloud] if v.internal else {})}
    ingress_class: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": c.meta(v.class_name, None, sel,
                           {"ingressclass.kubernetes.io/is-default-class": "true"} if v.default_class else None),
        "spec": {"controller": CONTROLLER_CLASS},
    }  # fmt: skip
    out = c.Rendered()
    out.objects += [
        c.service_account(SA, NS, sel),
        c.config_map(NAME, NS, config, sel),
        c.cluster_role("flotilla-ingress-nginx", cluster_rules()),
        c.cluster_role_binding("flotilla-ingress-nginx", "flotilla-ingress-nginx", [c.sa_subject(SA, NS)]),
        c.role(SA, NS, namespace_rules()),
        c.role_binding(SA, NS, SA, [c.sa_subject(SA, NS)]),
        c.service(NAME, NS, sel, [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                                  {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}],
                  type_="LoadBalancer", annotations=annotations or None,
                  # Local keeps the client's source address and skips a second hop.
                  extra={"externalTrafficPolicy": "Local"}),
        c.service(f"{NAME}-metrics", NS, sel, [{"name": "metrics", "port": 10254, "targetPort": "metrics",
                                                "protocol": "TCP"}]),
        c.deployment(NAME, NS, sel, pod, v.replicas),
        ingress_class,
    ]  # fmt: skip
    out.health.append(HealthGate("DeploymentAvailable", NAME, NS))
    return out
