"""`cert-manager`: CRDs, controller, cainjector, webhook (Deployment, Service, webhook configurations), a ClusterIssuer.

Laid out like upstream's static manifest for the same version (images tagged with the bundle
version), with RBAC condensed to one ClusterRole per component. The webhook serves a certificate
from its own CA (`cert-manager-webhook-ca`), which cainjector copies into the webhook configurations.

The ClusterIssuer can only be admitted once that webhook answers, so it carries
`flotilla.dev/apply-phase: after-health` (common.APPLY_PHASE_ANNOTATION): the adapter applies it
after the bundle's health gates pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from services.infra_installer.bundles import common as c
from services.infra_installer.bundles.catalog.cert_manager_crds import ACME_GROUP, GROUP, crds
from services.infra_installer.bundles.model import HealthGate, RenderContext

SERVICE = "cert-manager"
NS = c.NAMESPACE_OF[SERVICE]
REGISTRY = "quay.io/jetstack"
UID = 1000
CONTROLLER, WEBHOOK, CAINJECTOR = "cert-manager", "cert-manager-webhook", "cert-manager-cainjector"
WEBHOOK_CA_SECRET = "cert-manager-webhook-ca"
# cert-manager elects its leaders in kube-system (upstream default).
LEADER_NS = "kube-system"
ALL = ["create", "delete", "get", "list", "patch", "update", "watch"]
READ = ["get", "list", "watch"]


class AcmeValues(c.Values):
    email: Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")]
    server: Annotated[str, StringConstraints(pattern=r"^https://\S+$")] = (
        "https://acme-v02.api.letsencrypt.org/directory")
    ingress_class: Annotated[str, StringConstraints(min_length=1)] = "nginx"


class CertManagerValues(c.Values):
    registry: Annotated[str, StringConstraints(min_length=1)] = REGISTRY
    replicas: Annotated[int, Field(ge=1, le=10)] = 1
    webhook_replicas: Annotated[int, Field(ge=1, le=10)] = 2
    # Always a self-signed ClusterIssuer; with `acme` also a Let's Encrypt-style one (HTTP-01 via the ingress).
    acme: AcmeValues | None = None


def _labels(name: str, component: str) -> dict[str, str]:
    return c.app_labels(name, component, "cert-manager")


def controller_rules() -> list[dict[str, Any]]:
    return [
        c.rule([GROUP], ["certificates", "certificaterequests", "issuers", "clusterissuers"], ALL),
        c.rule([GROUP], ["certificates/status", "certificaterequests/status", "issuers/status",
                         "clusterissuers/status"], ["patch", "update"]),
        c.rule([GROUP], ["certificates/finalizers", "certificaterequests/finalizers"], ["update"]),
        c.rule([GROUP], ["signers"], ["approve"], ["issuers.cert-manager.io/*", "clusterissuers.cert-manager.io/*"]),
        c.rule([ACME_GROUP], ["orders", "challenges"], ALL),
        c.rule([ACME_GROUP], ["orders/status", "challenges/status"], ["patch", "update"]),
        c.rule([ACME_GROUP], ["orders/finalizers", "challenges/finalizers"], ["update"]),
        c.rule([""], ["secrets"], ALL),
        c.rule([""], ["events"], ["create", "patch"]),
        c.rule([""], ["pods", "services"], ALL),
        c.rule(["networking.k8s.io"], ["ingresses"], ALL),
        c.rule(["networking.k8s.io"], ["ingresses/finalizers"], ["update"]),
        c.rule(["gateway.networking.k8s.io"], ["gateways", "httproutes"], ALL),
        c.rule(["gateway.networking.k8s.io"], ["gateways/finalizers", "httproutes/finalizers"], ["update"]),
        c.rule(["certificates.k8s.io"], ["certificatesigningrequests"], READ + ["update"]),
        c.rule(["certificates.k8s.io"], ["certificatesigningrequests/status"], ["patch", "update"]),
        c.rule(["certificates.k8s.io"], ["signers"], ["sign"], ["issuers.cert-manager.io/*",
                                                                 "clusterissuers.cert-manager.io/*"]),
        c.rule(["authorization.k8s.io"], ["subjectaccessreviews"], ["create"]),
    ]  # fmt: skip


def cainjector_rules() -> list[dict[str, Any]]:
    return [
        c.rule([GROUP], ["certificates"], READ),
        c.rule([""], ["secrets"], READ),
        c.rule([""], ["events"], ["create", "patch"]),
        c.rule(["admissionregistration.k8s.io"], ["validatingwebhookconfigurations",
                                                  "mutatingwebhookconfigurations"], READ + ["patch", "update"]),
        c.rule(["apiregistration.k8s.io"], ["apiservices"], READ + ["patch", "update"]),
        c.rule(["apiextensions.k8s.io"], ["customresourcedefinitions"], READ + ["patch", "update"]),
    ]  # fmt: skip


def leader_election(name: str, lease: str) -> list[dict[str, Any]]:
    role_name = f"{name}:leaderelection"
    rules = [c.rule(["coordination.k8s.io"], ["leases"], ["get", "update", "patch"], [lease]),
             c.rule(["coordination.k8s.io"], ["leases"], ["create"])]  # fmt: skip
    return [c.role(role_name, LEADER_NS, rules),
            c.role_binding(role_name, LEADER_NS, role_name, [c.sa_subject(name, NS)])]  # fmt: skip


def container(name: str, image: str, args: list[str], ports: list[dict[str, Any]],
              probes: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "image": image,
        "args": args,
        "env": [c.env_from_field("POD_NAMESPACE", "metadata.namespace")],
        "ports": ports,
        **(probes or {}),
        "resources": c.resources("10m", "64Mi", "256Mi"),
        "securityContext": c.restricted_container_security(),
    }


def workloads(v: CertManagerValues, version: str, ctx: RenderContext) -> list[dict[str, Any]]:
    img = lambda component: f"{v.registry}/cert-manager-{component}:{version}"  # noqa: E731
    security = c.restricted_pod_security(UID)
    controller = container("cert-manager-controller", img("controller"), [
        "--v=2", "--cluster-resource-namespace=$(POD_NAMESPACE)", f"--leader-election-namespace={LEADER_NS}",
        f"--acme-http01-solver-image={img('acmesolver')}", "--max-concurrent-challenges=60",
    ], [{"name": "http-metrics", "containerPort": 9402, "protocol": "TCP"},
        {"name": "http-healthz", "containerPort": 9403, "protocol": "TCP"}],
        {"livenessProbe": {"httpGet": {"path": "/livez", "port": "http-healthz"}, "initialDelaySeconds": 10,
                           "periodSeconds": 10, "timeoutSeconds": 15, "failureThreshold": 8}})  # fmt: skip
    cainjector = container("cert-manager-cainjector", img("cainjector"),
                           ["--v=2", f"--leader-election-namespace={LEADER_NS}"], [])  # fmt: skip
    dns_names = ",".join([WEBHOOK, f"{WEBHOOK}.$(POD_NAMESPACE)", f"{WEBHOOK}.$(POD_NAMESPACE).svc"])
    webhook = container("cert-manager-webhook", img("webhook"), [
        "--v=2", "--secure-port=10250", "--dynamic-serving-ca-secret-namespace=$(POD_NAMESPACE)",
        f"--dynamic-serving-ca-secret-name={WEBHOOK_CA_SECRET}", f"--dynamic-serving-dns-names={dns_names}",
    ], [{"name": "https", "containerPort": 10250, "protocol": "TCP"},
        {"name": "healthcheck", "containerPort": 6080, "protocol": "TCP"}],
        {"livenessProbe": {"httpGet": {"path": "/livez", "port": 6080}, "initialDelaySeconds": 60,
                           "periodSeconds": 10, "failureThreshold": 3},
         "readinessProbe": {"httpGet": {"path": "/healthz", "port": 6080}, "initialDelaySeconds": 5,
                            "periodSeconds": 5, "failureThreshold": 3}})  # fmt: skip
    out = []
    for name, component, cont, replicas in ((CONTROLLER, "controller", controller, v.replicas),
                                            (CAINJECTOR, "cainjector", cainjector, 1),
                                            (WEBHOOK, "webhook", webhook, v.webhook_replicas)):  # fmt: skip
        pod = c.pod_spec(ctx, service_account=name, containers=[cont], security=security)
        out.append(c.deployment(name, NS, _labels(name, component), pod, replicas))
    return out


def webhook_configs() -> list[dict[str, Any]]:
    annotations = {"cert-manager.io/inject-ca-from-secret": f"{NS}/{WEBHOOK_CA_SECRET}"}
    # The webhook must never judge its own namespace: it could not start otherwise.
    namespace_selector = {"matchExpressions": [
        {"key": "cert-manager.io/disable-validation", "operator": "NotIn", "values": ["true"]}]}
    rules = [{"apiGroups": [GROUP, ACME_GROUP], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
              "resources": ["*/*"]}]

    def hook(name: str, path: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "admissionReviewVersions": ["v1"], "matchPolicy": "Equivalent", "timeoutSeconds": 30,
                "failurePolicy": "Fail", "sideEffects": "None",
                "clientConfig": {"service": {"name": WEBHOOK, "namespace": NS, "path": path, "port": 443}},
                **extra}  # fmt: skip

    sel = _labels(WEBHOOK, "webhook")
    mutating_rules = [{**rules[0], "apiGroups": [GROUP], "operations": ["CREATE"],
                       "resources": ["certificaterequests"]}]  # fmt: skip
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
         "metadata": c.meta(WEBHOOK, None, sel, annotations),
         "webhooks": [hook("webhook.cert-manager.io", "/mutate", rules=mutating_rules)]},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
         "metadata": c.meta(WEBHOOK, None, sel, annotations),
         "webhooks": [hook("webhook.cert-manager.io", "/validate", rules=rules,
                           namespaceSelector=namespace_selector)]},
    ]  # fmt: skip


def cluster_issuers(v: CertManagerValues) -> list[dict[str, Any]]:
    after = {c.APPLY_PHASE_ANNOTATION: c.AFTER_HEALTH}
    issuers: list[dict[str, Any]] = [
        {"apiVersion": f"{GROUP}/v1", "kind": "ClusterIssuer", "metadata": c.meta("flotilla-selfsigned", None, None,
                                                                                  after),
         "spec": {"selfSigned": {}}},
    ]  # fmt: skip
    if v.acme is not None:
        solver = {"http01": {"ingress": {"ingressClassName": v.acme.ingress_class}}}
        issuers.append({"apiVersion": f"{GROUP}/v1", "kind": "ClusterIssuer",
                        "metadata": c.meta("flotilla-acme", None, None, after),
                        "spec": {"acme": {"email": v.acme.email, "server": v.acme.server,
                                          "privateKeySecretRef": {"name": "flotilla-acme-account-key"},
                                          "solvers": [solver]}}})  # fmt: skip
    return issuers


def render(version: str, values: Mapping[str, Any], ctx: RenderContext) -> c.Rendered:
    v = c.parse_values(SERVICE, CertManagerValues, values)
    out = c.Rendered()
    out.objects += crds()
    for name, component in ((CONTROLLER, "controller"), (CAINJECTOR, "cainjector"), (WEBHOOK, "webhook")):
        out.objects.append(c.service_account(name, NS, _labels(name, component)))
    out.objects += [
        c.cluster_role("flotilla-cert-manager-controller", controller_rules()),
        c.cluster_role_binding("flotilla-cert-manager-controller", "flotilla-cert-manager-controller",
                               [c.sa_subject(CONTROLLER, NS)]),
        c.cluster_role("flotilla-cert-manager-cainjector", cainjector_rules()),
        c.cluster_role_binding("flotilla-cert-manager-cainjector", "flotilla-cert-manager-cainjector",
                               [c.sa_subject(CAINJECTOR, NS)]),
        c.cluster_role("flotilla-cert-manager-webhook", [
            c.rule(["authorization.k8s.io"], ["subjectaccessreviews"], ["create"])]),
        c.cluster_role_binding("flotilla-cert-manager-webhook", "flotilla-cert-manager-webhook",
                               [c.sa_subject(WEBHOOK, NS)]),
        # The webhook keeps its serving CA in a Secret of its own namespace.
        c.role(f"{WEBHOOK}:dynamic-serving", NS, [
            c.rule([""], ["secrets"], ["get", "list", "watch", "update"], [WEBHOOK_CA_SECRET]),
            c.rule([""], ["secrets"], ["create"])]),
        c.role_binding(f"{WEBHOOK}:dynamic-serving", NS, f"{WEBHOOK}:dynamic-serving",
                       [c.sa_subject(WEBHOOK, NS)]),
        *leader_election(CONTROLLER, "cert-manager-controller"),
        *leader_election(CAINJECTOR, "cert-manager-cainjector-leader-election"),
        c.service(CONTROLLER, NS, _labels(CONTROLLER, "controller"),
                  [{"name": "tcp-prometheus-servicemonitor", "port": 9402, "targetPort": "http-metrics",
                    "protocol": "TCP"}]),
        c.service(WEBHOOK, NS, _labels(WEBHOOK, "webhook"),
                  [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]),
    ]  # fmt: skip
    out.objects += workloads(v, version, ctx)
    out.objects += webhook_configs()
    out.objects += cluster_issuers(v)
    out.health += [HealthGate("CRDEstablished", o["metadata"]["name"]) for o in out.objects
                   if o["kind"] == "CustomResourceDefinition"]  # fmt: skip
    out.health += [HealthGate("DeploymentAvailable", n, NS) for n in (CONTROLLER, CAINJECTOR, WEBHOOK)]
    out.health += [HealthGate("WebhookReady", WEBHOOK)]
    return out
