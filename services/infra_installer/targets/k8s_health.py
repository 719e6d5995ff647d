"""Health gates evaluated on live objects (pure: the adapter fetches, these decide).

Each check returns (ok, reason); the reason says what is missing in words an operator can act on, and is
what `ClusterInfraFailed` carries when a gate times out.

- DeploymentAvailable: the controller observed the current generation, every replica is updated and
  available, no replicas of an older ReplicaSet remain, `Available` is True and the rollout has not hit
  its progress deadline (what `kubectl rollout status` waits for).
- DaemonSetRolledOut: observedGeneration is current, updatedNumberScheduled and numberAvailable both reach
  desiredNumberScheduled (0 desired counts as rolled out: a DaemonSet for a node pool that has no nodes yet).
- CRDEstablished: the `Established` condition is True (the API serves the kind).
- WebhookReady: for every webhook of the configuration that calls an in-cluster Service, the Service has at
  least one ready endpoint (an EndpointSlice labelled kubernetes.io/service-name) AND `caBundle` is filled
  (the API server cannot call a TLS webhook whose CA it does not know; cert-manager's cainjector fills it).
  Both are needed for the webhook to answer, so both are required. A webhook called by URL is outside the
  cluster: nothing here can see it, so it passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.infra_installer.bundles.model import HealthGate

Json = dict[str, Any]

WEBHOOK_KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
GATE_KIND = {
    "DeploymentAvailable": ("apps/v1", "Deployment"),
    "DaemonSetRolledOut": ("apps/v1", "DaemonSet"),
    "CRDEstablished": ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
}


@dataclass(frozen=True)
class GateResult:
    gate: HealthGate | None  # None: no gate to evaluate (the bundle was never applied, the API is unreachable)
    ok: bool
    object: str  # "Deployment ingress/ingress-nginx-controller"
    reason: str


def gate_object(gate: HealthGate, kind: str | None = None) -> str:
    kind = kind or (GATE_KIND[gate.kind][1] if gate.kind in GATE_KIND else "WebhookConfiguration")
    return f"{kind} {gate.namespace}/{gate.name}" if gate.namespace else f"{kind} {gate.name}"


def _conditions(status: Mapping[str, Any]) -> dict[str, Json]:
    return {c.get("type", ""): c for c in status.get("conditions") or [] if isinstance(c, dict)}


def _why(cond: Json | None) -> str:
    if not cond:
        return ""
    parts = [p for p in (cond.get("reason"), cond.get("message")) if p]
    return f" ({': '.join(parts)})" if parts else ""


def _generation(obj: Mapping[str, Any]) -> tuple[int, int]:
    return int((obj.get("metadata") or {}).get("generation") or 0), int((obj.get("status") or {}).get(
        "observedGeneration") or 0)  # fmt: skip


def deployment_available(obj: Mapping[str, Any] | None) -> tuple[bool, str]:
    if obj is None:
        return False, "not found"
    status = obj.get("status") or {}
    gen, observed = _generation(obj)
    if observed < gen:
        return False, f"generation {gen} not observed by the controller yet (observed {observed})"
    conds = _conditions(status)
    progressing = conds.get("Progressing")
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return False, f"rollout stuck{_why(progressing)}"
    desired = int((obj.get("spec") or {}).get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available_cond = conds.get("Available")
    if updated < desired:
        return False, f"{updated} of {desired} replicas updated{_why(available_cond)}"
    if total > updated:
        return False, f"{total - updated} old replicas pending termination"
    if available < desired:
        return False, f"{available} of {desired} replicas available{_why(available_cond)}"
    if available_cond is not None and available_cond.get("status") != "True":
        return False, f"Available={available_cond.get('status')}{_why(available_cond)}"
    return True, f"{available} of {desired} replicas available"


def daemonset_rolled_out(obj: Mapping[str, Any] | None) -> tuple[bool, str]:
    if obj is None:
        return False, "not found"
    status = obj.get("status") or {}
    gen, observed = _generation(obj)
    if observed < gen or "desiredNumberScheduled" not in status:
        return False, f"generation {gen} not observed by the controller yet (observed {observed})"
    desired = int(status.get("desiredNumberScheduled") or 0)
    updated = int(status.get("updatedNumberScheduled") or 0)
    available = int(status.get("numberAvailable") or 0)
    if updated < desired:
        return False, f"{updated} of {desired} pods updated"
    if available < desired:
        return False, f"{available} of {desired} pods available"
    return True, f"{available} of {desired} pods available"


def crd_established(obj: Mapping[str, Any] | None) -> tuple[bool, str]:
    if obj is None:
        return False, "not found"
    conds = _conditions(obj.get("status") or {})
    names = conds.get("NamesAccepted")
    if names is not None and names.get("status") == "False":
        return False, f"names not accepted{_why(names)}"
    established = conds.get("Established")
    if established is None or established.get("status") != "True":
        return False, f"not Established{_why(established)}"
    return True, "Established"


def _has_ready_endpoint(slices: Sequence[Mapping[str, Any]]) -> bool:
    for s in slices:
        for ep in s.get("endpoints") or []:
            # The API: a nil `ready` is to be read as ready.
            if (ep.get("conditions") or {}).get("ready") is not False and ep.get("addresses"):
                return True
    return False


def webhook_ready(config: Mapping[str, Any], slices: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]]
                  ) -> tuple[bool, str]:  # fmt: skip
    """`slices` maps (namespace, service) to the EndpointSlices labelled with that service."""
    for hook in config.get("webhooks") or []:
        cc = hook.get("clientConfig") or {}
        svc = cc.get("service")
        if not svc:
            continue
        target = (svc.get("namespace") or "default", svc.get("name") or "")
        if not cc.get("caBundle"):
            return False, f"webhook {hook.get('name')}: caBundle is empty (CA not injected yet)"
        if not _has_ready_endpoint(slices.get(target, ())):
            return False, f"webhook {hook.get('name')}: service {target[0]}/{target[1]} has no ready endpoints"
    return True, "webhooks answering"


def webhook_services(config: Mapping[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for hook in config.get("webhooks") or []:
        svc = (hook.get("clientConfig") or {}).get("service")
        if svc:
            out.add((svc.get("namespace") or "default", svc.get("name") or ""))
    return out
