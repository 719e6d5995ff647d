"""Which pods one drain pass evicts: pure, from the API's own JSON (pods and policy/v1 PodDisruptionBudgets).

A pass asks only for evictions the Eviction API (`pods/<name>/eviction`) will grant, by the same rules the API
server applies (pkg/registry/core/pod/storage/eviction.go) and `kubectl drain` uses to pick pods:
- never evicted: mirror pods (the kubelet's static pods, annotation `kubernetes.io/config.mirror`: the API
  cannot remove them), DaemonSet-owned pods (their controller ignores cordons and would put them straight back),
  finished pods (Succeeded/Failed: nothing runs) and pods bound to no node (nothing runs there either; a
  replacement that cannot schedule because every node is cordoned must not keep a drain from finishing);
- terminating pods (deletionTimestamp set) are leaving already: waited for, never evicted again;
- a pod no budget covers is evicted; one covered by more than one budget is blocked (the API refuses it);
- a pod that is not Running (Pending) is evicted without using budget (the API ignores budgets for it); so is a
  Running pod that is not Ready when its budget is healthy (`unhealthyPodEvictionPolicy` IfHealthyBudget, the
  default: currentHealthy >= desiredHealthy > 0; AlwaysAllow: always);
- every other pod uses one of its budget's allowed disruptions and is blocked once they are used up, so a pass
  never plans more evictions per budget than the budget allows.

A budget's allowance is its `status.disruptionsAllowed` when the disruption controller has written one (the API
refuses every eviction while that status is older than the budget: `observedGeneration < generation`).
Without a status it is computed the controller's way from the pods it covers: desiredHealthy from minAvailable
(an int, or a percent of the expected pods rounded up) or expected - maxUnavailable (likewise), allowed =
healthy - desiredHealthy. Expected pods are the covered pods that have not finished (the controller asks their
owners' scale; we only see the pods). As in the Eviction API, a budget with an empty or invalid selector covers
no pod.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
FINISHED = ("Succeeded", "Failed")
ALWAYS_ALLOW = "AlwaysAllow"


@dataclass(frozen=True)
class DrainReport:
    """What one drain pass did and what is left."""

    evicted: int  # evictions the API accepted in this pass
    remaining: int  # pods still to leave: not evicted yet, blocked, or still terminating
    blocked: int = 0  # pods a disruption budget kept in this pass (withheld by the plan or refused with 429)
    cordoned: int = 0  # nodes this pass marked unschedulable

    @property
    def done(self) -> bool:
        return self.remaining == 0


# ---------------------------------------------------------------- pods
@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str = ""
    phase: str = "Running"
    ready: bool = True
    terminating: bool = False
    # Kinds of the controlling owners (ownerReferences with controller: true).
    controllers: tuple[str, ...] = ()
    mirror: bool = False

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> Pod:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        conditions = status.get("conditions") or []
        return cls(
            namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
            labels=dict(meta.get("labels") or {}), node=str(spec.get("nodeName") or ""),
            phase=str(status.get("phase") or "Pending"),
            ready=any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions),
            terminating=bool(meta.get("deletionTimestamp")),
            controllers=tuple(str(o.get("kind", "")) for o in meta.get("ownerReferences") or [] if o.get("controller")),
            mirror=MIRROR_ANNOTATION in (meta.get("annotations") or {}),
        )  # fmt: skip

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def healthy(self) -> bool:
        """What a disruption budget counts as healthy: running, Ready, not being deleted."""
        return self.phase == "Running" and self.ready and not self.terminating


def skip_reason(pod: Pod) -> str | None:
    """Why a drain leaves this pod alone, or None when it has to leave."""
    if pod.mirror:
        return "mirror pod"
    if "DaemonSet" in pod.controllers:
        return "DaemonSet pod"
    if pod.phase in FINISHED:
        return "finished"
    if not pod.node:
        return "not on a node"
    return None


# ---------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.operator:
            case "In":
                return labels.get(self.key) in self.values
            case "NotIn":
                return labels.get(self.key) not in self.values
            case "Exists":
                return self.key in labels
            case _:
                return self.key not in labels


@dataclass(frozen=True)
class Selector:
    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[Requirement, ...] = ()

    @classmethod
    def from_api(cls, obj: Mapping[str, Any] | None) -> Selector | None:
        """None for a selector that selects nothing: absent, empty, or invalid (as the Eviction API treats them)."""
        if not obj:
            return None
        exprs = []
        for e in obj.get("matchExpressions") or []:
            op, values = e.get("operator"), tuple(str(v) for v in e.get("values") or [])
            if op not in ("In", "NotIn", "Exists", "DoesNotExist") or (op in ("In", "NotIn")) != bool(values):
                return None
            exprs.append(Requirement(str(e.get("key", "")), op, values))
        selector = cls(dict(obj.get("matchLabels") or {}), tuple(exprs))
        return selector if selector.match_labels or selector.match_expressions else None

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.match_expressions)  # fmt: skip


IntOrPercent = int | str


@dataclass(frozen=True)
class Budget:
    """A policy/v1 PodDisruptionBudget, with the status fields the Eviction API decides by."""

    namespace: str
    name: str
    selector: Selector | None
    min_available: IntOrPercent | None = None
    max_unavailable: IntOrPercent | None = None
    unhealthy_policy: str = "IfHealthyBudget"
    generation: int = 1
    observed_generation: int | None = None
    disruptions_allowed: int | None = None  # None: no status written yet
    current_healthy: int | None = None
    desired_healthy: int | None = None

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> Budget:
        meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}

        def opt_int(value: Any) -> int | None:
            return None if value is None else int(value)

        return cls(
            namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
            selector=Selector.from_api(spec.get("selector")), min_available=spec.get("minAvailable"),
            max_unavailable=spec.get("maxUnavailable"),
            unhealthy_policy=str(spec.get("unhealthyPodEvictionPolicy") or "IfHealthyBudget"),
            generation=int(meta.get("generation") or 1), observed_generation=opt_int(status.get("observedGeneration")),
            disruptions_allowed=opt_int(status.get("disruptionsAllowed")),
            current_healthy=opt_int(status.get("currentHealthy")),
            desired_healthy=opt_int(status.get("desiredHealthy")),
        )  # fmt: skip

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def covers(self, pod: Pod) -> bool:
        return self.selector is not None and pod.namespace == self.namespace and self.selector.matches(pod.labels)


def scaled(value: IntOrPercent, total: int) -> int:
    """An IntOrString count: an int as it is, "N%" of `total` rounded up (as the disruption controller does)."""
    if isinstance(value, bool):
        raise ValueError(f"not a count: {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text.endswith("%") or not text[:-1].isdigit():
        raise ValueError(f"not an int or a percentage: {value!r}")
    return -(-int(text[:-1]) * total // 100)


def desired_healthy(budget: Budget, expected: int) -> int:
    """How many covered pods must stay healthy, from the spec (raises ValueError for a value it cannot read)."""
    if budget.max_unavailable is not None:
        return max(0, expected - scaled(budget.max_unavailable, expected))
    if budget.min_available is not None:
        return scaled(budget.min_available, expected)
    return 0


@dataclass(frozen=True)
class Allowance:
    allowed: int  # evictions of healthy pods the budget permits now
    healthy: int  # covered pods healthy now
    desired: int  # covered pods that must stay healthy


def allowance(budget: Budget, pods: Iterable[Pod]) -> Allowance:
    covered = [p for p in pods if budget.covers(p)]
    healthy = sum(p.healthy for p in covered)
    expected = sum(p.phase not in FINISHED for p in covered)
    try:
        desired = desired_healthy(budget, expected)
    except ValueError:  # the controller cannot evaluate it either: it allows nothing
        return Allowance(0, healthy, expected)
    if budget.disruptions_allowed is None:
        return Allowance(max(0, healthy - desired), healthy, desired)
    current = budget.current_healthy if budget.current_healthy is not None else healthy
    wanted = budget.desired_healthy if budget.desired_healthy is not None else desired
    if budget.observed_generation is None or budget.observed_generation < budget.generation:
        return Allowance(0, current, wanted)  # the API refuses evictions until the controller has caught up
    return Allowance(max(0, budget.disruptions_allowed), current, wanted)


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class EvictionPlan:
    evict: tuple[Pod, ...] = ()
    blocked: tuple[tuple[Pod, str], ...] = ()  # (pod, why)
    waiting: tuple[Pod, ...] = ()  # terminating already
    skipped: tuple[tuple[Pod, str], ...] = ()  # (pod, why it stays)

    @property
    def remaining(self) -> int:
        """Pods that still have to leave the cluster (before this plan's evictions happen)."""
        return len(self.evict) + len(self.blocked) + len(self.waiting)


def plan_evictions(pods: Iterable[Pod], budgets: Iterable[Budget]) -> EvictionPlan:
    """The evictions one pass may ask for, pod by pod in a deterministic order (see the module docstring)."""
    pods = sorted(pods, key=lambda p: (p.namespace, p.name))
    budgets = sorted(budgets, key=lambda b: b.key)
    allowances = {b.key: allowance(b, pods) for b in budgets}
    left = {k: a.allowed for k, a in allowances.items()}
    healthy = {k: a.healthy for k, a in allowances.items()}
    evict: list[Pod] = []
    blocked: list[tuple[Pod, str]] = []
    waiting: list[Pod] = []
    skipped: list[tuple[Pod, str]] = []
    candidates: list[Pod] = []
    for pod in pods:
        if reason := skip_reason(pod):
            skipped.append((pod, reason))
        elif pod.terminating:
            waiting.append(pod)
        else:
            candidates.append(pod)
    # Pods that use no budget first: evicting healthy ones first could leave a budget too unhealthy for them.
    for pod in sorted(candidates, key=lambda p: (p.healthy, p.namespace, p.name)):
        covering = [b for b in budgets if b.covers(pod)]
        if not covering or pod.phase != "Running":
            evict.append(pod)
            continue
        if len(covering) > 1:
            blocked.append((pod, "covered by more than one PodDisruptionBudget: "
                                 + ", ".join(b.name for b in covering)))  # fmt: skip
            continue
        budget = covering[0]
        need = allowances[budget.key].desired
        if not pod.ready and (budget.unhealthy_policy == ALWAYS_ALLOW or healthy[budget.key] >= need > 0):
            evict.append(pod)  # an unhealthy pod of a healthy budget: the API lets it go without using budget
            continue
        if left[budget.key] <= 0:
            blocked.append((pod, f"PodDisruptionBudget {budget.key} allows no more disruptions now"))
            continue
        left[budget.key] -= 1
        healthy[budget.key] -= pod.healthy
        evict.append(pod)
    return EvictionPlan(tuple(evict), tuple(blocked), tuple(waiting), tuple(skipped))
