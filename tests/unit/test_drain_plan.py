"""The eviction plan of a drain pass: which pods stay, which go now, which a disruption budget holds back."""

from __future__ import annotations

from typing import Any

import pytest

from services.infra_installer.drain_plan import (
    Budget,
    DrainReport,
    Pod,
    Selector,
    allowance,
    desired_healthy,
    plan_evictions,
    scaled,
    skip_reason,
)

Json = dict[str, Any]


def pod(name: str, app: str = "web", ns: str = "shop", *, node: str = "node-0", phase: str = "Running",
        ready: bool = True, owner: str | None = "ReplicaSet", annotations: dict[str, str] | None = None,
        terminating: bool = False) -> Json:  # fmt: skip
    meta: Json = {"name": name, "namespace": ns, "labels": {"app": app}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner, "name": f"{app}-1", "uid": "u",
                                    "controller": True}]  # fmt: skip
    if annotations:
        meta["annotations"] = annotations
    if terminating:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status: Json = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": status}


def pdb(name: str = "web", app: str = "web", ns: str = "shop", *, min_available: Any = None,
        max_unavailable: Any = None, status: Json | None = None, generation: int = 1,
        selector: Json | None = None, **spec: Any) -> Budget:  # fmt: skip
    body: Json = {"selector": selector if selector is not None else {"matchLabels": {"app": app}}, **spec}
    if min_available is not None:
        body["minAvailable"] = min_available
    if max_unavailable is not None:
        body["maxUnavailable"] = max_unavailable
    obj: Json = {"metadata": {"name": name, "namespace": ns, "generation": generation}, "spec": body}
    if status is not None:
        obj["status"] = status
    return Budget.from_api(obj)


def replicas(n: int, app: str = "web", ns: str = "shop", **kw: Any) -> list[Pod]:
    return [Pod.from_api(pod(f"{app}-{i}", app, ns, node=f"node-{i % 3}", **kw)) for i in range(n)]


def names(pods: Any) -> list[str]:
    return [p.name if isinstance(p, Pod) else p[0].name for p in pods]


# ---------------------------------------------------------------- what never leaves
def test_daemonset_mirror_finished_and_unscheduled_pods_are_skipped() -> None:
    pods = [
        Pod.from_api(pod("agent-x", "agent", "kube-system", owner="DaemonSet")),
        Pod.from_api(pod("etcd-node-0", "etcd", "kube-system", owner=None,
                         annotations={"kubernetes.io/config.mirror": "abc"})),  # fmt: skip
        Pod.from_api(pod("job-done", "job", phase="Succeeded", owner="Job")),
        Pod.from_api(pod("job-failed", "job", phase="Failed", owner="Job")),
        Pod.from_api(pod("web-new", node="", phase="Pending")),  # a replacement no node will take
        Pod.from_api(pod("web-0")),
    ]
    plan = plan_evictions(pods, [])
    assert dict((p.name, why) for p, why in plan.skipped) == {
        "agent-x": "DaemonSet pod", "etcd-node-0": "mirror pod", "job-done": "finished", "job-failed": "finished",
        "web-new": "not on a node"}  # fmt: skip
    assert names(plan.evict) == ["web-0"] and plan.remaining == 1


def test_a_daemonset_that_only_owns_without_controlling_does_not_protect_the_pod() -> None:
    obj = pod("sidecar")
    obj["metadata"]["ownerReferences"][0].update(kind="DaemonSet", controller=False)
    p = Pod.from_api(obj)
    assert p.controllers == () and skip_reason(p) is None


def test_terminating_pods_are_waited_for_not_evicted_again() -> None:
    pods = [Pod.from_api(pod("web-0", terminating=True)), Pod.from_api(pod("web-1"))]
    plan = plan_evictions(pods, [pdb(min_available=0)])
    assert names(plan.waiting) == ["web-0"] and names(plan.evict) == ["web-1"] and plan.remaining == 2


def test_pods_without_a_budget_all_go_in_one_pass() -> None:
    plan = plan_evictions(replicas(5), [pdb("other", "other", min_available=5)])
    assert names(plan.evict) == [f"web-{i}" for i in range(5)] and not plan.blocked


# ---------------------------------------------------------------- each budget form
@pytest.mark.parametrize(("form", "value", "evicted"), [
    ("min_available", 2, 1),  # 3 healthy, 2 must stay
    ("min_available", 3, 0),
    ("min_available", 0, 3),
    ("min_available", "50%", 1),  # ceil(1.5) = 2 must stay
    ("min_available", "100%", 0),
    ("max_unavailable", 1, 1),
    ("max_unavailable", 0, 0),
    ("max_unavailable", "34%", 2),  # ceil(1.02) = 2 may be unavailable
    ("max_unavailable", "100%", 3),
])  # fmt: skip
def test_each_budget_form_limits_one_pass(form: str, value: Any, evicted: int) -> None:
    plan = plan_evictions(replicas(3), [pdb(**{form: value})])
    assert len(plan.evict) == evicted and len(plan.blocked) == 3 - evicted
    assert all("PodDisruptionBudget shop/web allows no more disruptions now" == why for _, why in plan.blocked)


def test_the_status_written_by_the_disruption_controller_wins_over_counting() -> None:
    status = {"observedGeneration": 1, "disruptionsAllowed": 2, "currentHealthy": 3, "desiredHealthy": 1}
    # The spec alone would allow none; the controller (which knows the owners' scale) allows two.
    assert len(plan_evictions(replicas(3), [pdb(min_available=3, status=status)]).evict) == 2


def test_a_status_older_than_the_budget_allows_nothing_as_the_api_refuses_then() -> None:
    status = {"observedGeneration": 1, "disruptionsAllowed": 2, "currentHealthy": 3, "desiredHealthy": 1}
    plan = plan_evictions(replicas(3), [pdb(min_available=0, status=status, generation=2)])
    assert not plan.evict and len(plan.blocked) == 3


def test_budget_arithmetic() -> None:
    assert (scaled(2, 10), scaled("25%", 10), scaled("0%", 10), scaled("1%", 1)) == (2, 3, 0, 1)
    for bad in ("2", "x%", True):
        with pytest.raises(ValueError):
            scaled(bad, 3)  # type: ignore[arg-type]
    assert desired_healthy(pdb(), 4) == 0  # neither field: nothing has to stay
    assert desired_healthy(pdb(max_unavailable=5), 3) == 0
    # A value the controller cannot read allows no disruption at all.
    assert allowance(pdb(min_available="half"), replicas(3)).allowed == 0


def test_unready_and_pending_pods_do_not_use_up_a_budget() -> None:
    pods = [*replicas(3), Pod.from_api(pod("web-sick", ready=False)), Pod.from_api(pod("web-new", phase="Pending"))]
    plan = plan_evictions(pods, [pdb(min_available=2)])
    # The API ignores budgets for Pending pods, and lets a not-Ready pod go while the budget is healthy (3 >= 2).
    assert names(plan.evict) == ["web-new", "web-sick", "web-0"] and names(plan.blocked) == ["web-1", "web-2"]


def test_an_unready_pod_of_an_unhealthy_budget_needs_budget_unless_always_allowed() -> None:
    pods = [*replicas(1), Pod.from_api(pod("web-sick", ready=False))]
    assert names(plan_evictions(pods, [pdb(min_available=2)]).blocked) == ["web-sick", "web-0"]
    always = pdb(min_available=2, unhealthyPodEvictionPolicy="AlwaysAllow")
    assert names(plan_evictions(pods, [always]).evict) == ["web-sick"]


def test_several_budgets_each_limit_their_own_pods() -> None:
    pods = [*replicas(3, "web"), *replicas(4, "api"), *replicas(2, "db", ns="data")]
    budgets = [pdb("web", "web", min_available=2), pdb("api", "api", max_unavailable="50%"),
               pdb("db", "db", ns="data", max_unavailable=0)]  # fmt: skip
    plan = plan_evictions(pods, budgets)
    assert names(plan.evict) == ["api-0", "api-1", "web-0"]
    assert sorted(names(plan.blocked)) == ["api-2", "api-3", "db-0", "db-1", "web-1", "web-2"]


def test_a_pod_under_two_budgets_is_blocked_as_the_api_refuses_it() -> None:
    budgets = [pdb("web", min_available=0), pdb("everything", selector={"matchExpressions": [
        {"key": "app", "operator": "Exists"}]})]  # fmt: skip
    plan = plan_evictions(replicas(2), budgets)
    assert not plan.evict and all(why.startswith("covered by more than one") for _, why in plan.blocked)


def test_a_budget_covers_only_its_namespace_and_never_with_an_empty_or_invalid_selector() -> None:
    pods = replicas(2)
    assert len(plan_evictions(pods, [pdb(ns="elsewhere", min_available=5)]).evict) == 2
    assert len(plan_evictions(pods, [pdb(selector={}, min_available=5)]).evict) == 2
    bad = {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["web"]}]}
    assert len(plan_evictions(pods, [pdb(selector=bad, min_available=5)]).evict) == 2


def test_selector_expressions() -> None:
    sel = Selector.from_api({"matchLabels": {"tier": "front"}, "matchExpressions": [
        {"key": "app", "operator": "In", "values": ["web", "api"]}, {"key": "canary", "operator": "DoesNotExist"},
        {"key": "env", "operator": "NotIn", "values": ["dev"]}]})  # fmt: skip
    assert sel is not None
    assert sel.matches({"tier": "front", "app": "api"})
    assert not sel.matches({"tier": "front", "app": "db"})
    assert not sel.matches({"tier": "front", "app": "web", "canary": "1"})
    assert not sel.matches({"tier": "front", "app": "web", "env": "dev"})
    assert Selector.from_api({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}) is None


def test_the_plan_is_deterministic_whatever_the_listing_order() -> None:
    pods = replicas(6)
    budgets = [pdb(max_unavailable=2)]
    assert plan_evictions(pods, budgets) == plan_evictions(list(reversed(pods)), budgets)


def test_a_report_is_done_when_nothing_is_left() -> None:
    assert DrainReport(evicted=3, remaining=0).done and not DrainReport(evicted=3, remaining=1, blocked=1).done
