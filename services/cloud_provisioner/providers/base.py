"""The cloud port: what the provisioner needs from a cloud, and how cloud errors are classified.

A driver (sim today; aws/azure/gcp with boto3 / azure-mgmt-* / google-cloud-container next)
implements `CloudProvider`. Both operations are *ensures*:
- `ensure(step, ctx)` looks the step's resources up (deterministic name / cluster tag) and
  adopts them, creates only what is missing (with a client request token derived from the
  cluster id and step), waits until they are usable and returns what the step produced
  (ids, endpoint, ...). Called again after a crash or by a second replica it creates nothing.
- `delete(step, ctx, resources)` removes the step's resources, found by the ids it reported
  or, when `resources` is None (a step that may have been in flight), by the cluster tag;
  "not found" counts as done. It returns when they are gone. `ctx.spec` may be None (a
  cluster retired before any request was recorded): a delete by tag must not need it, and
  must find only what carries this cluster's id tag, which an adopted (byon) network never
  does, so such a sweep cannot touch it.
- `update(step, ctx)` (in-place updates) converges the step's *existing* resources to `ctx.spec`
  where the cloud changes them in place: node pool scaling, labels and taints, and tags. It never
  creates: a spec pool that does not exist, or one whose instance types or spot setting differ,
  raises `NotInPlaceError` (terminal) because only a new pool, i.e. a rotation, can do that. Steps
  with nothing to change in place return what they reported before. `ensure` converges the same
  fields on what it finds, so an update that arrived while provisioning ran is also applied by it.

Errors: raise `CloudError` subclasses. Retryable ones (throttling, transient server errors,
an operation still running elsewhere) are retried by the consumer runtime with backoff;
terminal ones (quota, invalid instance type, access denied) fail the cluster at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from shared.events import ClusterSpec, Location
from shared.events.models import ProvisionStep

# Tags every resource carries, so it can be found again without any local state.
TAG_CLUSTER = "flotilla.dev/cluster-id"
TAG_CLUSTERSET = "flotilla.dev/clusterset"
TAG_STEP = "flotilla.dev/step"
TAG_MANAGED_BY = "flotilla.dev/managed-by"


@dataclass(frozen=True)
class ClusterContext:
    """Everything a driver needs to act on one cluster's step."""

    cluster_id: str
    clusterset: str
    location: Location
    spec: ClusterSpec | None
    # What earlier steps reported (e.g. the network id the cluster goes into).
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tags(self, step: ProvisionStep) -> dict[str, str]:
        user = dict(self.spec.tags) if self.spec is not None else {}
        return {**user, TAG_CLUSTER: self.cluster_id, TAG_CLUSTERSET: self.clusterset, TAG_STEP: step,
                TAG_MANAGED_BY: "flotilla"}  # fmt: skip

    def client_token(self, step: ProvisionStep, part: str = "") -> str:
        """Deterministic idempotency token: a retried create returns the first one's resource."""
        return f"{self.cluster_id}:{step}" + (f":{part}" if part else "")


# ---------------------------------------------------------------- errors
class CloudError(Exception):
    """A classified cloud API error. `code` is the provider's error code (e.g. 'QuotaExceeded')."""

    retryable: bool = False
    # The step an action covering several steps (an update) was at when it failed; set by the caller.
    step: ProvisionStep | None = None

    def __init__(self, code: str, message: str = "", retryable: bool | None = None) -> None:
        self.code = code
        self.message = message or code
        if retryable is not None:
            self.retryable = retryable
        super().__init__(f"[{code}] {self.message}")


class ThrottlingError(CloudError):
    """Rate limited (Throttling, RequestLimitExceeded, 429): retry later."""

    retryable = True


class TransientCloudError(CloudError):
    """Server-side hiccup or an operation still in progress elsewhere: retry later."""

    retryable = True


class TerminalCloudError(CloudError):
    """Retrying will not help until someone changes something (quota, spec, permissions)."""

    retryable = False


class QuotaExceededError(TerminalCloudError):
    pass


class InvalidInstanceTypeError(TerminalCloudError):
    pass


class NotInPlaceError(TerminalCloudError):
    """The change cannot be made to the existing resource (a missing pool, other instance types): a rotation can."""

    def __init__(self, message: str) -> None:
        super().__init__("NotInPlace", message)


class ResourceNotFoundError(CloudError):
    """The resource does not exist (any more). Deletes treat it as done."""

    retryable = False


_BY_CODE: dict[str, type[CloudError]] = {
    "Throttling": ThrottlingError,
    "ThrottlingException": ThrottlingError,
    "RequestLimitExceeded": ThrottlingError,
    "TooManyRequests": ThrottlingError,
    "QuotaExceeded": QuotaExceededError,
    "LimitExceeded": QuotaExceededError,
    "InvalidInstanceType": InvalidInstanceTypeError,
    "NotFound": ResourceNotFoundError,
    "ResourceNotFound": ResourceNotFoundError,
}


def cloud_error(code: str, message: str = "", retryable: bool | None = None) -> CloudError:
    """The error class for a code; `retryable` (when given) overrides the class default."""
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = TransientCloudError if retryable else TerminalCloudError
    return cls(code, message, retryable)


def managed_spec(ctx: ClusterContext, service: str) -> ClusterSpec:
    """The spec a real driver builds from, refused before anything is created when it cannot be built.

    Managed Kubernetes services (EKS, AKS, GKE) run their own control plane; a self-managed one needs
    VMs, load balancers and etcd, which is etcd_migration's ControlPlaneDriver, not these drivers."""
    if ctx.spec is None:
        raise TerminalCloudError("InvalidRequest", f"cluster {ctx.cluster_id} has no spec: nothing to provision")
    if ctx.spec.control_plane.mode == "self-managed":
        raise TerminalCloudError(
            "UnsupportedControlPlane",
            f"controlPlane.mode self-managed is not provisioned on {service} (a managed control plane); "
            "use mode managed",
        )
    return ctx.spec


T = TypeVar("T")


async def gather_calls(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run cloud calls concurrently; if any fails, cancel the rest and raise the most telling error
    (a terminal CloudError before a retryable one) rather than an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in calls]
    except BaseExceptionGroup as group:
        errors = list(_leaves(group))
        terminal = [e for e in errors if isinstance(e, CloudError) and not e.retryable]
        raise (terminal or errors)[0] from None
    return [t.result() for t in tasks]


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


# ---------------------------------------------------------------- the port
@dataclass(frozen=True)
class Updated:
    """What `update` did to one step: what the step reports now, and whether anything was changed."""

    resources: dict[str, Any]
    changed: bool


def unchanged(step: ProvisionStep, ctx: ClusterContext) -> Updated:
    """The answer for a step that has nothing to change in place."""
    return Updated(dict(ctx.resources.get(step, {})), False)


@runtime_checkable
class CloudProvider(Protocol):
    name: str

    async def ensure(self, step: ProvisionStep, ctx: ClusterContext) -> dict[str, Any]:
        """Make the step's resources exist and be ready; return what it produced (JSON-able)."""
        ...

    async def delete(self, step: ProvisionStep, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        """Make the step's resources absent; not-found is done."""
        ...

    async def update(self, step: ProvisionStep, ctx: ClusterContext) -> Updated:
        """Converge the step's existing resources to `ctx.spec` in place; create nothing (see the module doc)."""
        ...
