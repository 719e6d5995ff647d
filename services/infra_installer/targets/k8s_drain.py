"""One drain pass over a cluster's API with the official client (synchronous: the adapter runs it in a thread).

1. Cordon: every node gets `spec.unschedulable: true` (a merge patch, only for nodes not cordoned yet).
2. Read every pod (all namespaces) and every policy/v1 PodDisruptionBudget, page by page.
3. Plan (drain_plan.py, pure) and ask for each planned eviction through the Eviction subresource
   (`create_namespaced_pod_eviction`, policy/v1 Eviction). The API server enforces the budgets again: a 429
   means a budget does not allow it right now (someone else evicted meanwhile) and the pod stays for a later
   pass; 404 means it is gone already. Pods are never deleted directly and nothing is forced.
4. Count what is left: after any eviction the pods are read again, since an evicted pod is only gone once its
   graceful termination has ended (until then it is "terminating" and still has to leave).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, PolicyV1Api, V1Eviction, V1ObjectMeta
from kubernetes.client.rest import ApiException

from services.infra_installer.drain_plan import Budget, DrainReport, Pod, plan_evictions
from services.infra_installer.targets.base import FIELD_MANAGER

log = logging.getLogger("flotilla.infra_installer.drain")

Json = dict[str, Any]
PAGE = 500
MERGE_PATCH = "application/merge-patch+json"


def list_all(list_fn: Callable[..., Any], timeout_s: float) -> list[Json]:
    """Every item of a list call, following `continue` tokens; raw JSON (the API's own field names)."""
    items: list[Json] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": PAGE, "_preload_content": False, "_request_timeout": timeout_s}
        if token:
            kwargs["_continue"] = token
        page = json.loads(list_fn(**kwargs).data or b"{}")
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items


# Marks the nodes a drain cordoned, so that an uncordon gives back only those.
CORDONED_BY = "flotilla.dev/cordoned-by-drain"


def cordon(core: CoreV1Api, timeout_s: float) -> int:
    """Mark every schedulable node unschedulable (and as cordoned by us); returns how many were changed."""
    changed = 0
    for node in list_all(core.list_node, timeout_s):
        if (node.get("spec") or {}).get("unschedulable"):
            continue
        name = node["metadata"]["name"]
        # The client would send a dict body as a JSON patch: say it is a merge patch.
        core.patch_node(name, {"metadata": {"annotations": {CORDONED_BY: "true"}}, "spec": {"unschedulable": True}},
                        field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH, _request_timeout=timeout_s)  # fmt: skip
        changed += 1
    return changed


def uncordon(api: ApiClient, timeout_s: float) -> int:
    """Make schedulable again the nodes `cordon` marked (a node cordoned by someone else stays cordoned)."""
    core = CoreV1Api(api)
    changed = 0
    for node in list_all(core.list_node, timeout_s):
        if ((node.get("metadata") or {}).get("annotations") or {}).get(CORDONED_BY) is None:
            continue
        core.patch_node(node["metadata"]["name"],
                        {"metadata": {"annotations": {CORDONED_BY: None}}, "spec": {"unschedulable": None}},
                        field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH, _request_timeout=timeout_s)  # fmt: skip
        changed += 1
    return changed


def _pods(core: CoreV1Api, timeout_s: float) -> list[Pod]:
    return [Pod.from_api(p) for p in list_all(core.list_pod_for_all_namespaces, timeout_s)]


def drain_pass(api: ApiClient, timeout_s: float, cluster_id: str = "") -> DrainReport:
    core, policy = CoreV1Api(api), PolicyV1Api(api)
    cordoned = cordon(core, timeout_s)
    pods = _pods(core, timeout_s)
    budgets = [Budget.from_api(b) for b in list_all(policy.list_pod_disruption_budget_for_all_namespaces, timeout_s)]
    plan = plan_evictions(pods, budgets)
    evicted, refused = 0, 0
    for pod in plan.evict:
        body = V1Eviction(api_version="policy/v1", kind="Eviction",
                          metadata=V1ObjectMeta(name=pod.name, namespace=pod.namespace))  # fmt: skip
        try:
            core.create_namespaced_pod_eviction(pod.name, pod.namespace, body, _request_timeout=timeout_s)
            evicted += 1
        except ApiException as exc:
            if exc.status == 404:
                continue  # gone already
            if exc.status == 429 or (exc.status is not None and exc.status >= 500):
                # A budget says not now (429), or the API could not decide (5xx): the pod stays for a later pass.
                refused += 1
                log.info("eviction of %s on %s refused: %s %s", pod.key, cluster_id, exc.status, exc.reason,
                         extra={"cluster_id": cluster_id})  # fmt: skip
                continue
            raise
    for pod, why in plan.blocked:
        log.info("not evicting %s on %s: %s", pod.key, cluster_id, why, extra={"cluster_id": cluster_id})
    remaining = plan_evictions(_pods(core, timeout_s), budgets).remaining if evicted else plan.remaining
    return DrainReport(evicted=evicted, remaining=remaining, blocked=len(plan.blocked) + refused, cordoned=cordoned)
