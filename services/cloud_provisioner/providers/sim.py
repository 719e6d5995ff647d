"""The `sim` driver: provisions a cluster's steps in the simulated cloud (see simcloud.py).

It is written the way the real drivers must be: look up by tag and name, adopt what exists
(waiting while it is still CREATING), otherwise create with a deterministic client token;
poll with async sleeps until the operation finished; retry throttling a few times locally
(as the cloud SDKs do) before giving the error to the consumer runtime.

What an existing resource can change in place (tags; a node pool's counts, labels and taints) is
converged by `ensure` on what it adopts and by `update` (in-place updates), as a sim operation with
latency like a create. `update` creates nothing: a missing pool or other instance types / spot is a
NotInPlaceError (a rotation's job); `ensure` adopts such a pool as it is.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    CloudError,
    ClusterContext,
    NotInPlaceError,
    ResourceNotFoundError,
    ThrottlingError,
    TransientCloudError,
    Updated,
    gather_calls,
    unchanged,
)
from services.cloud_provisioner.providers.simcloud import SimCloud, SimResource
from shared.config import Settings
from shared.events.clusterset import Network
from shared.events.models import ProvisionStep

log = logging.getLogger("flotilla.cloud_provisioner.sim")
T = TypeVar("T")

# Which kinds of resource each step makes (one node_pool per pool in the spec).
STEP_KINDS: dict[ProvisionStep, tuple[str, ...]] = {
    "network": ("network",),
    "cluster": ("cluster",),
    "node_pools": ("node_pool",),
    "iam": ("iam_role",),
    "log_stream": ("log_stream",),
}

# Attributes an existing resource changes in place (its tags too, whatever the kind), and those that only a
# new resource can have (a rotation): an update refuses to touch them, an ensure adopts the resource as it is.
IN_PLACE: dict[str, tuple[str, ...]] = {"node_pool": ("min_count", "max_count", "labels", "taints")}
FIXED: dict[str, tuple[str, ...]] = {"node_pool": ("instance_types", "spot")}


@dataclass(frozen=True)
class Planned:
    """One resource a step needs: found again by (cluster tag, Name), created with `token`."""

    kind: str
    name: str
    token: str
    attrs: dict[str, Any] = field(default_factory=dict)
    part: str = ""


def plan(step: ProvisionStep, ctx: ClusterContext) -> list[Planned]:
    cid = ctx.cluster_id
    spec = ctx.spec
    if spec is None:
        raise CloudError("InvalidRequest", f"cluster {cid} has no spec: nothing to provision", retryable=False)
    region = {"region": ctx.location.region, "cloud": ctx.location.cloud}
    match step:
        case "network":
            return [Planned("network", f"{cid}-net", ctx.client_token(step), {**region, "cidr": "10.0.0.0/16",
                                                                              "subnet_count": 3})]  # fmt: skip
        case "cluster":
            network_id = ctx.resources.get("network", {}).get("network_id", "")
            attrs = {**region, "kubernetes_version": spec.kubernetes_version, "network_id": network_id,
                     "control_plane": spec.control_plane.mode, "features": list(spec.features)}  # fmt: skip
            return [Planned("cluster", cid, ctx.client_token(step), attrs)]
        case "node_pools":
            return [
                Planned("node_pool", f"{cid}-{pool.name}", ctx.client_token(step, pool.name),
                        {"instance_types": list(pool.instance_types), "min_count": pool.min_count,
                         "max_count": pool.max_count, "spot": pool.spot, "labels": dict(pool.labels),
                         "taints": [t.model_dump(mode="json") for t in pool.taints]}, part=pool.name)
                for pool in spec.node_pools
            ]  # fmt: skip
        case "iam":
            return [Planned("iam_role", f"{cid}-nodes", ctx.client_token(step), region)]
        case "log_stream":
            return [Planned("log_stream", f"{cid}-logs", ctx.client_token(step), region)]
    raise ValueError(f"unknown step {step!r}")


def report(step: ProvisionStep, ctx: ClusterContext, made: list[tuple[Planned, SimResource]]) -> dict[str, Any]:
    """What a step reports in ClusterResourceProvisioned: ids and facts, never secrets."""
    first = made[0][1]
    match step:
        case "network":
            return {"network_id": first.id, "subnet_ids": list(first.attrs["subnet_ids"]), "owned": True}
        case "cluster":
            return {"resource_id": first.id, "name": first.name, "endpoint": first.attrs["endpoint"],
                    "ca_fingerprint": first.attrs["ca_fingerprint"], "credential_ref": f"sim://{ctx.cluster_id}",
                    "kubernetes_version": first.attrs.get("kubernetes_version")}  # fmt: skip
        case "node_pools":
            return {"node_pools": {p.part: r.id for p, r in made}}
        case "iam":
            return {"role_id": first.id, "role_name": first.name}
        case "log_stream":
            return {"log_stream_id": first.id, "name": first.name}
    raise ValueError(f"unknown step {step!r}")


class SimProvider:
    """`CloudProvider` on the simulated cloud."""

    name = "sim"

    def __init__(self, cloud: SimCloud, *, poll_s: float = 0.05, timeout_s: float = 60.0, api_attempts: int = 3
                 ) -> None:  # fmt: skip
        self.cloud = cloud
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.api_attempts = api_attempts

    @classmethod
    def from_settings(cls, cloud: SimCloud, settings: Settings) -> SimProvider:
        latency = settings.sim_latency_s * (1 + settings.sim_latency_jitter)
        # Poll a few times per expected operation, never busy-spin, give up well after it should be done.
        return cls(cloud, poll_s=min(max(settings.sim_latency_s / 4, 0.02), 1.0), timeout_s=max(30.0, latency * 20))

    # ------------------------------------------------------------------ the port
    async def ensure(self, step: ProvisionStep, ctx: ClusterContext) -> dict[str, Any]:
        net = _byon_network(step, ctx)
        if net is not None:  # bring your own network: adopt, never create
            return {"network_id": net.vpc_id or net.vnet_id or net.network_id or "",
                    "subnet_ids": list(net.subnet_ids), "owned": False}  # fmt: skip
        planned = plan(step, ctx)
        tags = ctx.tags(step)
        made = await gather_calls([self._ensure_one(p, tags, ctx.cluster_id) for p in planned])
        return report(step, ctx, list(zip(planned, made, strict=True)))

    async def update(self, step: ProvisionStep, ctx: ClusterContext) -> Updated:
        if _byon_network(step, ctx) is not None or ctx.resources.get(step, {}).get("owned") is False:
            return unchanged(step, ctx)  # adopted: never ours to change
        planned = plan(step, ctx)
        tags = ctx.tags(step)
        results = await gather_calls([self._update_one(p, tags, ctx.cluster_id) for p in planned])
        made = [(p, res) for p, (res, _) in zip(planned, results, strict=True)]
        return Updated(report(step, ctx, made), any(changed for _, changed in results))

    async def delete(self, step: ProvisionStep, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        if resources is not None and resources.get("owned") is False:
            return  # adopted, not ours
        if resources is None and step == "network" and ctx.spec is not None and "byon" in ctx.spec.features:
            return
        # Everything of the step's kinds tagged with this cluster: covers a create we never heard back from.
        targets: dict[str, SimResource] = {}
        for kind in STEP_KINDS[step]:
            found = await self._api(partial(self.cloud.list, kind, {TAG_CLUSTER: ctx.cluster_id}))
            targets.update({r.id: r for r in found})
        await gather_calls([self._delete_one(res) for res in targets.values()])

    # ------------------------------------------------------------------ one resource
    async def _find(self, p: Planned, cluster_id: str) -> SimResource | None:
        found = await self._api(lambda: self.cloud.list(p.kind, {TAG_CLUSTER: cluster_id, "Name": p.name}))
        live = [r for r in found if r.status != "DELETING"]
        if live:
            if len(live) > 1:
                log.warning("%d %s resources named %s: adopting the oldest", len(live), p.kind, p.name)
            return live[0]
        if found:
            raise TransientCloudError("ResourceBeingDeleted", f"{p.kind} {p.name} is being deleted")
        return None

    async def _ensure_one(self, p: Planned, step_tags: dict[str, str], cluster_id: str) -> SimResource:
        tags = {**step_tags, "Name": p.name}
        res = await self._find(p, cluster_id)
        if res is None:
            try:
                res = await self._api(lambda: self.cloud.create(p.kind, p.name, tags=tags, attrs=p.attrs,
                                                                client_token=p.token))  # fmt: skip
            except ResourceNotFoundError as exc:
                # Our token's resource was deleted meanwhile (a retirement won a race): not a terminal error.
                raise TransientCloudError("ResourceGone", exc.message) from None
            return await self._wait(res, "ACTIVE")
        converged, _ = await self._converge(await self._wait(res, "ACTIVE"), p, tags, strict=False)
        return converged

    async def _update_one(self, p: Planned, step_tags: dict[str, str], cluster_id: str) -> tuple[SimResource, bool]:
        res = await self._find(p, cluster_id)
        if res is None:
            raise NotInPlaceError(f"{p.kind} {p.name} does not exist: adding it takes a rotation, not an update")
        return await self._converge(await self._wait(res, "ACTIVE"), p, {**step_tags, "Name": p.name}, strict=True)

    async def _converge(self, res: SimResource, p: Planned, tags: dict[str, str], *, strict: bool
                        ) -> tuple[SimResource, bool]:  # fmt: skip
        """Change in place what differs from the plan (tags, IN_PLACE attributes); True if anything was changed."""
        fixed = [k for k in FIXED.get(p.kind, ()) if k in p.attrs and res.attrs.get(k) != p.attrs[k]]
        if fixed and strict:
            raise NotInPlaceError(f"{p.kind} {p.name}: {', '.join(fixed)} cannot change in place (a rotation can)")
        if fixed:
            log.warning("%s %s differs in %s from the spec: adopted as it is", p.kind, p.name, fixed)
        deadline = time.monotonic() + self.timeout_s
        changed = False
        while True:
            attrs = {**res.attrs, **{k: p.attrs[k] for k in IN_PLACE.get(p.kind, ()) if k in p.attrs}}
            if attrs == res.attrs and tags == res.tags:
                return res, changed
            try:
                res = await self._api(partial(self.cloud.update, res.id, attrs=attrs, tags=tags))
            except ResourceNotFoundError:
                raise TransientCloudError("ResourceGone", f"{p.kind} {res.id} disappeared while updating") from None
            except TransientCloudError as exc:
                # Another operation runs on it (a second replica converging too): wait, then look again.
                if exc.code != "ResourceInUse" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.poll_s)
                res = await self._wait(await self._api(partial(self.cloud.get, res.id)), "ACTIVE")
                continue
            log.info("updating %s %s in place", p.kind, p.name)
            res = await self._wait(res, "ACTIVE")
            changed = True

    async def _delete_one(self, res: SimResource) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if res.status in ("CREATING", "UPDATING"):
                    res = await self._wait(res, "ACTIVE")  # most clouds refuse to delete mid-operation
                if res.status != "DELETING":
                    res = await self._api(partial(self.cloud.delete, res.id))
                await self._wait(res, "GONE")
                return
            except ResourceNotFoundError:
                return  # already gone: done
            except TransientCloudError as exc:
                if exc.code not in ("ResourceInUse", "ResourceBeingDeleted") or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.poll_s)
                try:
                    res = await self._api(partial(self.cloud.get, res.id))
                except ResourceNotFoundError:
                    return

    async def _wait(self, res: SimResource, until: Literal["ACTIVE", "GONE"]) -> SimResource:
        """Poll until the resource is ACTIVE (or gone, for deletes). Async sleeps; bounded."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            if until == "ACTIVE" and res.status == "ACTIVE":
                return res
            if until == "ACTIVE" and res.status == "DELETING":
                raise TransientCloudError("ResourceBeingDeleted", f"{res.kind} {res.id} is being deleted")
            if time.monotonic() > deadline:
                raise TransientCloudError("Timeout", f"{res.kind} {res.id} still {res.status} after {self.timeout_s}s")
            await asyncio.sleep(self.poll_s)
            try:
                res = await self._api(partial(self.cloud.get, res.id))
            except ResourceNotFoundError:
                if until == "GONE":
                    return res
                raise TransientCloudError("ResourceGone", f"{res.kind} {res.id} disappeared while creating") from None

    async def _api(self, call: Callable[[], Awaitable[T]]) -> T:
        """One cloud call, retried on throttling / server errors a few times (like the SDKs' retry mode)."""
        for attempt in range(1, self.api_attempts + 1):
            try:
                return await call()
            except (ThrottlingError, TransientCloudError) as exc:
                if attempt == self.api_attempts or exc.code not in ("Throttling", "InternalError"):
                    raise
                await asyncio.sleep(min(0.02 * 2**attempt, 0.5) * (0.5 + random.random()))
        raise AssertionError("unreachable")




def _byon_network(step: ProvisionStep, ctx: ClusterContext) -> Network | None:
    """The given network when `step` is the network of a bring-your-own-network cluster."""
    if step == "network" and ctx.spec is not None and "byon" in ctx.spec.features:
        return ctx.spec.network
    return None
