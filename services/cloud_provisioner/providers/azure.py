"""The `azure` driver: AKS and what it needs, through the azure-mgmt-* SDKs.

Per cluster, everything we create lives in one resource group, `flotilla-<cluster-id>` (see
azure_mapping.py for names and request bodies):
- network: the resource group, an NSG and a VNet with two subnets ('system', 'user') using it.
  With `byon` the core adopts the given VNet without calling us; we never write to it.
- iam: a user-assigned managed identity (the AKS control-plane identity) and a Network
  Contributor role assignment for it on our VNet, or on each given subnet of a byon network.
- cluster: the AKS managed cluster with a small System pool; returns the endpoint, the SHA-256
  fingerprint of the cluster CA (from the kubeconfig of listClusterUserCredential, which for
  an AAD cluster with local accounts disabled holds no secret; we keep only the fingerprint)
  and a credential reference `aks://<subscription>/<resourceGroup>/<name>` that the installer
  resolves through Azure AD.
- node_pools: one User agent pool per spec pool (converges scaling, labels, taints and tags of an
  existing pool with one PUT of the whole pool, as AKS updates pools).
- log_stream: an Event Hubs namespace and hub.

In-place updates (`update`): the agent pools as above, but none is created (a missing pool or another VM
size / priority is NotInPlace: a rotation's job), and the managed cluster's tags (PATCH updateTags).
Tags of the network, identity and Event Hubs stay as created.

Every step is an ensure: GET by deterministic name, adopt what exists (waiting while its
provisioningState is in progress, re-PUT if it ended Failed), PUT only what is missing. Deletes
GET first, leave alone what lacks our cluster-id tag, and treat 404 as done. The resource group
goes last and only if it carries our tag: in the network step, or, for a byon cluster (no
network step to delete), in the iam step.

The SDK clients are synchronous: every call runs in `asyncio.to_thread`. Long-running
operations use the SDK's own pollers (`begin_*`), which poll in their own thread; we await
them with `asyncio.sleep(poll_s)` instead of parking a worker thread on `.result()`, so a
thousand clusters creating at once do not starve the default executor.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import ssl
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import yaml
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.polling import LROPoller
from azure.mgmt.containerservice import ContainerServiceClient
from azure.mgmt.eventhub import EventHubManagementClient
from azure.mgmt.msi import ManagedServiceIdentityClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient

from services.cloud_provisioner.providers import azure_mapping as m
from services.cloud_provisioner.providers.base import (
    CloudError,
    ClusterContext,
    InvalidInstanceTypeError,
    NotInPlaceError,
    QuotaExceededError,
    ResourceNotFoundError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
    Updated,
    managed_spec,
    unchanged,
)
from shared.config import Settings
from shared.events.models import ProvisionStep

log = logging.getLogger("flotilla.cloud_provisioner.azure")
T = TypeVar("T")

# ---------------------------------------------------------------- error classification
_QUOTA_CODES = {"quotaexceeded", "insufficientvcpuquota", "errcode_insufficientvcpuquota", "subscriptionquotaexceeded",
                "operationnotallowed"}  # fmt: skip
_SKU_CODES = {"skunotavailable", "invalidvmsize", "vmsizenotsupported", "invalidvmsizeforregion",
              "vmsizenotavailableinregion", "invalidtemplatedeployment_skunotavailable"}  # fmt: skip
_DENIED_CODES = {"authorizationfailed", "linkedauthorizationfailed", "forbidden", "invalidauthenticationtoken",
                 "authenticationfailed", "expiredauthenticationtoken"}  # fmt: skip
_VERSION_CODES = {"k8sversionnotsupported", "agentpoolk8sversionnotsupported", "versionnotsupported",
                  "unsupportedkubernetesversion"}  # fmt: skip
_NOT_FOUND_CODES = {"resourcenotfound", "resourcegroupnotfound", "notfound", "parentresourcenotfound"}
# Eventual consistency and work in progress elsewhere: the same request succeeds a little later.
_RETRY_CODES = {"principalnotfound", "anotheroperationinprogress", "operationpreempted", "retryableerror",
                "conflict", "resourcegroupbeingdeleted", "inusesubnetcannotbedeleted", "internalservererror",
                "internaloperationerror", "serviceunavailable", "gatewaytimeout", "toomanyrequests",
                "canceled", "operationcanceled"}  # fmt: skip


def _error_code(exc: HttpResponseError) -> tuple[str, str]:
    """(Azure error code, message) of an SDK error; the code is '' when the body had none."""
    err = exc.error
    code = str(getattr(err, "code", "") or "")
    message = str(getattr(err, "message", "") or exc.message or exc.reason or "")
    return code, message


def classify(exc: BaseException) -> CloudError:
    """One classification of Azure SDK errors into the port's CloudError kinds.

    Retryable: 429 (ThrottlingError, Retry-After noted), 5xx, 409 conflicts with an operation in
    progress, principal-not-found right after creating an identity, connection errors, and a
    long-running operation that failed with an unknown code (ARM heals most of these on re-PUT,
    which the ensure does). Terminal: quota, unavailable VM size, permission denied, unsupported
    Kubernetes version, other 4xx. 404 is ResourceNotFoundError (deletes count it as done).
    """
    if isinstance(exc, CloudError):
        return exc
    if isinstance(exc, ServiceRequestError | ServiceResponseError) and not isinstance(exc, HttpResponseError):
        return TransientCloudError("ConnectionError", str(exc)[:500])
    if not isinstance(exc, HttpResponseError):
        return TransientCloudError(type(exc).__name__, str(exc)[:500])
    status = exc.status_code or 0
    code, message = _error_code(exc)
    low = code.lower()
    text = f"{code}: {message}" if code else message
    if status == 429 or low in ("toomanyrequests", "throttled", "throttling"):
        headers = getattr(exc.response, "headers", None) or {}
        retry_after = headers.get("Retry-After")
        return ThrottlingError("Throttling", text + (f" (Retry-After {retry_after}s)" if retry_after else ""))
    if low in _QUOTA_CODES and (low != "operationnotallowed" or "quota" in message.lower()):
        return QuotaExceededError("QuotaExceeded", text)
    if low in _SKU_CODES:
        return InvalidInstanceTypeError("InvalidInstanceType", text)
    if low in _DENIED_CODES or status in (401, 403):
        return TerminalCloudError("PermissionDenied", text)
    if low in _VERSION_CODES:
        return TerminalCloudError("UnsupportedVersion", text)
    if status == 404 or low in _NOT_FOUND_CODES:
        return ResourceNotFoundError("ResourceNotFound", text)
    if status >= 500 or status == 409 or status == 408 or low in _RETRY_CODES:
        return TransientCloudError(code or f"Http{status}", text)
    if status < 400:
        # A long-running operation that ended Failed (the poll itself answered 200).
        return TransientCloudError(code or "OperationFailed", text)
    return TerminalCloudError(code or f"Http{status}", text)


# ---------------------------------------------------------------- helpers
# provisioningState values after which no operation runs ("created": older Event Hubs namespaces).
_IN_PROGRESS_DONE = {"succeeded", "failed", "canceled", "created", ""}


def _state(resource: dict[str, Any]) -> str:
    return str((resource.get("properties") or {}).get("provisioningState") or "").lower()


def _as_json(obj: Any) -> dict[str, Any]:
    """An SDK model as the ARM JSON it came from (REST key names)."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    serialize = getattr(obj, "serialize", None)
    if callable(serialize):  # msrest-style models (azure-mgmt-msi)
        return dict(serialize(keep_readonly=True))
    return dict(obj.as_dict())


def ca_fingerprint(kubeconfig: bytes) -> str:
    """'sha256:<hex>' of the first cluster CA certificate in a kubeconfig (DER bytes hashed)."""
    doc = yaml.safe_load(kubeconfig) or {}
    clusters = doc.get("clusters") or []
    for entry in clusters:
        data = (entry.get("cluster") or {}).get("certificate-authority-data")
        if data:
            pem = base64.b64decode(data).decode()
            der = ssl.PEM_cert_to_DER_cert(pem)
            return "sha256:" + hashlib.sha256(der).hexdigest()
    raise TransientCloudError("NoClusterCA", "the cluster's kubeconfig has no certificate-authority-data yet")


def _name_of(arm_id: str) -> str:
    return arm_id.rstrip("/").rsplit("/", 1)[-1]


def build(settings: Settings) -> AzureProvider:
    """The driver with Azure's standard credential chain (env, workload identity, managed identity, CLI)."""
    from azure.identity import DefaultAzureCredential

    if not settings.azure_subscription_id:
        raise ValueError("the azure driver needs FLOTILLA_AZURE_SUBSCRIPTION_ID")
    return AzureProvider(DefaultAzureCredential(), settings.azure_subscription_id, base_url=settings.azure_base_url,
                         poll_s=settings.cloud_poll_s)


class AzureProvider:
    """`CloudProvider` on Azure Resource Manager."""

    name = "azure"

    def __init__(self, credential: TokenCredential, subscription_id: str, *, base_url: str | None = None,
                 poll_s: float = 10.0, timeout_s: float = 3600.0, client_kwargs: dict[str, Any] | None = None,
                 system_vm_size: str = m.SYSTEM_VM_SIZE, assign_network_role: bool = True) -> None:  # fmt: skip
        """`client_kwargs` go to every SDK client (e.g. `connection_verify`, `retry_total` in tests).
        `poll_s` is both the SDK pollers' interval and our wait between status checks."""
        self.subscription_id = subscription_id
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.system_vm_size = system_vm_size
        self.assign_network_role = assign_network_role
        kwargs: dict[str, Any] = {"polling_interval": poll_s, **(client_kwargs or {})}
        if base_url:
            kwargs["base_url"] = base_url
        self.arm = ResourceManagementClient(credential, subscription_id, **kwargs)
        self.network = NetworkManagementClient(credential, subscription_id, **kwargs)
        self.msi = ManagedServiceIdentityClient(credential, subscription_id, **kwargs)
        self.aks = ContainerServiceClient(credential, subscription_id, **kwargs)
        self.eventhub = EventHubManagementClient(credential, subscription_id, **kwargs)

    def close(self) -> None:
        for client in (self.arm, self.network, self.msi, self.aks, self.eventhub):
            client.close()

    def names(self, ctx: ClusterContext) -> m.AzureNames:
        return m.AzureNames(self.subscription_id, ctx.cluster_id)

    # ------------------------------------------------------------------ the port
    async def ensure(self, step: ProvisionStep, ctx: ClusterContext) -> dict[str, Any]:
        managed_spec(ctx, "AKS")  # before the first step creates anything
        match step:
            case "network":
                return await self._ensure_network(ctx)
            case "iam":
                return await self._ensure_iam(ctx)
            case "cluster":
                return await self._ensure_cluster(ctx)
            case "node_pools":
                return (await self._ensure_node_pools(ctx)).resources
            case "log_stream":
                return await self._ensure_log_stream(ctx)
        raise ValueError(f"unknown step {step!r}")

    async def update(self, step: ProvisionStep, ctx: ClusterContext) -> Updated:
        managed_spec(ctx, "AKS")
        match step:
            case "cluster":
                return await self._update_cluster_tags(ctx)
            case "node_pools":
                return await self._ensure_node_pools(ctx, create=False)
        return unchanged(step, ctx)

    async def delete(self, step: ProvisionStep, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        if resources is not None and resources.get("owned") is False:
            return  # adopted (byon): not ours
        match step:
            case "log_stream":
                await self._delete_log_stream(ctx)
            case "node_pools":
                await self._delete_node_pools(ctx, resources)
            case "cluster":
                await self._delete_cluster(ctx)
            case "iam":
                await self._delete_iam(ctx, resources)
            case "network":
                await self._delete_network(ctx)
            case _:
                raise ValueError(f"unknown step {step!r}")

    # ------------------------------------------------------------------ network
    def _network_of(self, ctx: ClusterContext) -> dict[str, Any]:
        """What the network step reported, or what it must have been (byon spec, else our deterministic VNet)."""
        if "network" in ctx.resources:
            return ctx.resources["network"]
        if ctx.spec is not None and "byon" in ctx.spec.features and ctx.spec.network is not None:
            net = ctx.spec.network
            return {"network_id": net.vnet_id or net.network_id or "", "subnet_ids": list(net.subnet_ids),
                    "owned": False}  # fmt: skip
        names = self.names(ctx)
        return {"network_id": names.vnet_id, "subnet_ids": [f"{names.vnet_id}/subnets/{s}" for s, _ in m.SUBNETS],
                "owned": True}  # fmt: skip

    def _byon(self, ctx: ClusterContext) -> bool:
        return self._network_of(ctx).get("owned") is False

    async def _ensure_group(self, ctx: ClusterContext) -> str:
        """The cluster's resource group; an existing one without our tag is used as is (never tagged, never deleted)."""
        names = self.names(ctx)
        rg = names.resource_group
        await self._ensure_resource(
            f"resource group {rg}",
            get=lambda: self.arm.resource_groups.get(rg),
            create=lambda: self.arm.resource_groups.create_or_update(
                rg, _json_body(m.resource_group_body(ctx.location.region, ctx.tags("network")))),
        )
        return rg

    async def _ensure_network(self, ctx: ClusterContext) -> dict[str, Any]:
        if self._byon(ctx):
            return self._network_of(ctx)  # the core adopts it without us; nothing to create either way
        names, region, tags = self.names(ctx), ctx.location.region, ctx.tags("network")
        rg = await self._ensure_group(ctx)
        nsg = await self._ensure_resource(
            f"NSG {names.nsg}",
            get=lambda: self.network.network_security_groups.get(rg, names.nsg),
            create=lambda: self.network.network_security_groups.begin_create_or_update(
                rg, names.nsg, _json_body(m.nsg_body(region, tags))),
        )
        want = m.vnet_body(region, tags, nsg["id"])
        vnet = await self._ensure_resource(
            f"VNet {names.vnet}",
            get=lambda: self.network.virtual_networks.get(rg, names.vnet),
            create=lambda: self.network.virtual_networks.begin_create_or_update(rg, names.vnet, _json_body(want)),
            # An adopted VNet that lost one of our subnets gets them back.
            converge=lambda found: not {s for s, _ in m.SUBNETS} <= _subnet_names(found),
        )
        by_name = {s["name"]: s["id"] for s in (vnet.get("properties") or {}).get("subnets") or []}
        return {"network_id": vnet["id"], "subnet_ids": [by_name[s] for s, _ in m.SUBNETS if s in by_name],
                "owned": True, "resource_group": rg, "nsg_id": nsg["id"]}  # fmt: skip

    async def _delete_network(self, ctx: ClusterContext) -> None:
        names = self.names(ctx)
        rg = names.resource_group
        await self._delete_resource(f"VNet {names.vnet}", ctx,
                                    get=lambda: self.network.virtual_networks.get(rg, names.vnet),
                                    delete=lambda: self.network.virtual_networks.begin_delete(rg, names.vnet))
        await self._delete_resource(f"NSG {names.nsg}", ctx,
                                    get=lambda: self.network.network_security_groups.get(rg, names.nsg),
                                    delete=lambda: self.network.network_security_groups.begin_delete(rg, names.nsg))
        await self._delete_group(ctx)  # fmt: skip

    async def _delete_group(self, ctx: ClusterContext) -> None:
        rg = self.names(ctx).resource_group
        await self._delete_resource(f"resource group {rg}", ctx, get=lambda: self.arm.resource_groups.get(rg),
                                    delete=lambda: self.arm.resource_groups.begin_delete(rg))  # fmt: skip

    # ------------------------------------------------------------------ iam
    async def _ensure_iam(self, ctx: ClusterContext) -> dict[str, Any]:
        names, region, tags = self.names(ctx), ctx.location.region, ctx.tags("iam")
        rg = await self._ensure_group(ctx)
        identity = await self._ensure_resource(
            f"identity {names.identity}",
            get=lambda: self.msi.user_assigned_identities.get(rg, names.identity),
            create=lambda: self.msi.user_assigned_identities.create_or_update(
                rg, names.identity, _json_body(m.identity_body(region, tags))),
        )
        props = identity.get("properties") or {}
        principal = str(props.get("principalId") or "")
        assignments: list[str] = []
        if self.assign_network_role and not principal:
            raise TransientCloudError("PrincipalNotReady", f"identity {names.identity} has no principal id yet")
        if self.assign_network_role:
            for scope in m.role_scopes(self._network_of(ctx)):
                assignments.append(await self._ensure_role_assignment(names, scope, principal))
        return {"identity_id": identity["id"], "principal_id": principal, "client_id": props.get("clientId"),
                "role_assignments": assignments, "resource_group": rg}  # fmt: skip

    async def _ensure_role_assignment(self, names: m.AzureNames, scope: str, principal: str) -> str:
        ra_id = names.role_assignment_id(scope)
        api = m.ROLE_ASSIGNMENT_API_VERSION
        found = await self._get(lambda: self.arm.resources.get_by_id(ra_id, api_version=api))
        if found is not None:
            if (found.get("properties") or {}).get("principalId") == principal:
                return ra_id
            # The identity was re-created (new principal): an assignment cannot be updated, only replaced.
            await self._lro(lambda: self.arm.resources.begin_delete_by_id(ra_id, api_version=api))
        body = m.role_assignment_body(self.subscription_id, principal, names.cluster_id)
        await self._lro(partial(self.arm.resources.begin_create_or_update_by_id, ra_id, api_version=api,
                                parameters=_json_body(body)))
        return ra_id

    async def _delete_iam(self, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        names = self.names(ctx)
        rg = names.resource_group
        api = m.ROLE_ASSIGNMENT_API_VERSION
        ids = list((resources or {}).get("role_assignments") or [])
        if resources is None:
            ids = [names.role_assignment_id(s) for s in m.role_scopes(self._network_of(ctx))]
        marker = m.role_assignment_marker(ctx.cluster_id)
        for ra_id in ids:
            found = await self._get(partial(self.arm.resources.get_by_id, ra_id, api_version=api))
            if found is None:
                continue
            if (found.get("properties") or {}).get("description") != marker:
                log.warning("role assignment %s is not marked as ours: left alone", ra_id)
                continue
            await self._lro_gone(partial(self.arm.resources.begin_delete_by_id, ra_id, api_version=api))
        await self._delete_resource(f"identity {names.identity}", ctx,
                                    get=lambda: self.msi.user_assigned_identities.get(rg, names.identity),
                                    delete=lambda: self.msi.user_assigned_identities.delete(rg, names.identity),
                                    lro=False)  # fmt: skip
        if self._byon(ctx):
            await self._delete_group(ctx)  # no network step will be deleted after us: the group goes now

    # ------------------------------------------------------------------ cluster
    async def _ensure_cluster(self, ctx: ClusterContext) -> dict[str, Any]:
        assert ctx.spec is not None
        names, spec = self.names(ctx), ctx.spec
        rg = await self._ensure_group(ctx)
        identity_id = str(ctx.resources.get("iam", {}).get("identity_id") or names.identity_id)
        subnets = m.subnet_ids(self._network_of(ctx))
        body = m.managed_cluster_body(spec, ctx.location.region, ctx.tags("cluster"), names, identity_id,
                                      m.system_subnet(subnets), self.system_vm_size)  # fmt: skip
        mc = await self._ensure_resource(
            f"managed cluster {names.cluster}",
            get=lambda: self.aks.managed_clusters.get(rg, names.cluster),
            create=lambda: self.aks.managed_clusters.begin_create_or_update(rg, names.cluster, _json_body(body)),
        )
        private = "private-connectivity" in spec.features
        try:
            endpoint = m.cluster_endpoint(mc, private)
        except ValueError as exc:
            raise TransientCloudError("NoEndpoint", f"{names.cluster}: {exc}") from None
        creds = await self._call(lambda: self.aks.managed_clusters.list_cluster_user_credentials(
            rg, names.cluster, format="exec"))  # fmt: skip
        kubeconfigs = list(getattr(creds, "kubeconfigs", None) or [])
        if not kubeconfigs or not kubeconfigs[0].value:
            raise TransientCloudError("NoKubeconfig", f"{names.cluster}: no user kubeconfig yet")
        props = mc.get("properties") or {}
        return {"resource_id": mc["id"], "name": names.cluster, "resource_group": rg, "endpoint": endpoint,
                "ca_fingerprint": ca_fingerprint(bytes(kubeconfigs[0].value)), "credential_ref": names.credential_ref,
                "kubernetes_version": props.get("kubernetesVersion"), "private": private,
                "node_resource_group": props.get("nodeResourceGroup")}  # fmt: skip

    async def _delete_cluster(self, ctx: ClusterContext) -> None:
        names = self.names(ctx)
        rg = names.resource_group
        await self._delete_resource(f"managed cluster {names.cluster}", ctx,
                                    get=partial(self.aks.managed_clusters.get, rg, names.cluster),
                                    delete=partial(self.aks.managed_clusters.begin_delete, rg, names.cluster))

    async def _update_cluster_tags(self, ctx: ClusterContext) -> Updated:
        names = self.names(ctx)
        rg, what = names.resource_group, f"managed cluster {names.cluster}"
        get = partial(self.aks.managed_clusters.get, rg, names.cluster)
        found = await self._settle(what, get)
        if found is None:
            raise NotInPlaceError(f"{what} does not exist: an update does not create it")
        if not m.is_ours(found, ctx.cluster_id):
            raise TerminalCloudError("NameConflict", f"{what} lacks our cluster tag: not updating it")
        body = m.tags_body(ctx.tags("cluster"))
        changed = (found.get("tags") or {}) != body["tags"]
        if changed:
            log.info("%s: updating its tags", what, extra={"cluster_id": ctx.cluster_id})
            await self._lro(partial(self.aks.managed_clusters.begin_update_tags, rg, names.cluster, _json_body(body)),
                            what)  # fmt: skip
        return Updated(dict(ctx.resources.get("cluster", {})), changed)

    # ------------------------------------------------------------------ node pools
    async def _ensure_node_pools(self, ctx: ClusterContext, *, create: bool = True) -> Updated:
        """Every spec pool, converged in place where it exists; created where it does not, unless `create` is
        False (an update: a missing pool, or another VM size or priority, is NotInPlace)."""
        assert ctx.spec is not None
        names, spec, tags = self.names(ctx), ctx.spec, ctx.tags("node_pools")
        rg = names.resource_group
        subnet = m.pool_subnet(m.subnet_ids(self._network_of(ctx)))
        out: dict[str, str] = {}
        changed: list[str] = []
        # One at a time: AKS refuses a second operation on a cluster while one runs (409).
        for pool in spec.node_pools:
            aks_name = m.agent_pool_name(pool.name)
            what = f"agent pool {aks_name} of {names.cluster}"
            body = m.agent_pool_body(pool, spec.kubernetes_version, {**tags, "flotilla.dev/node-pool": pool.name},
                                     subnet)  # fmt: skip
            get = partial(self.aks.agent_pools.get, rg, names.cluster, aks_name)
            if not create:
                await self._check_in_place(what, get, body)
            drift: list[str] = []

            def converge(found: dict[str, Any], body: dict[str, Any] = body, drift: list[str] = drift,
                         what: str = what) -> bool:  # fmt: skip
                props = found.get("properties") or {}
                drift[:] = m.agent_pool_drift(props, body["properties"])
                if not drift:
                    return False
                # Keep the running node count inside the new bounds instead of resetting it to minCount.
                current = props.get("count")
                if body["properties"]["enableAutoScaling"] and isinstance(current, int):
                    lo, hi = body["properties"]["minCount"], body["properties"]["maxCount"]
                    body["properties"]["count"] = min(max(current, lo), hi)
                log.info("%s differs in %s: updating it", what, drift, extra={"cluster_id": ctx.cluster_id})
                return True

            ap = await self._ensure_resource(
                what, get=get, create=partial(self.aks.agent_pools.begin_create_or_update, rg, names.cluster, aks_name,
                                              _json_body(body)), converge=converge,
            )  # fmt: skip
            if drift:
                changed.append(pool.name)
            out[pool.name] = ap["id"]
        return Updated({"node_pools": out, "resource_group": rg}, bool(changed))

    async def _check_in_place(self, what: str, get: Callable[[], Any], body: dict[str, Any]) -> None:
        found = await self._settle(what, get)
        if found is None:
            raise NotInPlaceError(f"{what} does not exist: adding a pool takes a rotation, not an update")
        fixed = m.agent_pool_fixed_changes(found.get("properties") or {}, body["properties"])
        if fixed:
            raise NotInPlaceError(f"{what}: {', '.join(fixed)} cannot change in place (a rotation can)")

    async def _delete_node_pools(self, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        names = self.names(ctx)
        rg = names.resource_group
        if resources is not None and resources.get("node_pools"):
            pools = [_name_of(str(i)) for i in resources["node_pools"].values()]
        else:  # in flight or unknown: every User pool of the cluster tagged with this cluster's id
            try:
                listed = await self._call(lambda: list(self.aks.agent_pools.list(rg, names.cluster)))
            except ResourceNotFoundError:
                return  # no cluster (or group): no pools
            pools = [str(p.name) for p in listed
                     if m.is_ours(_as_json(p), ctx.cluster_id) and (_as_json(p).get("properties") or {}).get("mode")
                     != "System"]  # fmt: skip
        for pool in pools:
            await self._delete_resource(f"agent pool {pool} of {names.cluster}", ctx,
                                        get=partial(self.aks.agent_pools.get, rg, names.cluster, pool),
                                        delete=partial(self.aks.agent_pools.begin_delete, rg, names.cluster, pool))

    # ------------------------------------------------------------------ log stream
    async def _ensure_log_stream(self, ctx: ClusterContext) -> dict[str, Any]:
        names, region, tags = self.names(ctx), ctx.location.region, ctx.tags("log_stream")
        rg = await self._ensure_group(ctx)
        ns_name = names.eventhub_namespace
        ns = await self._ensure_resource(
            f"Event Hubs namespace {ns_name}",
            get=lambda: self.eventhub.namespaces.get(rg, ns_name),
            create=lambda: self.eventhub.namespaces.begin_create_or_update(
                rg, ns_name, _json_body(m.eventhub_namespace_body(region, tags))),
        )
        hub = await self._ensure_resource(
            f"event hub {names.eventhub}",
            get=lambda: self.eventhub.event_hubs.get(rg, ns_name, names.eventhub),
            create=lambda: self.eventhub.event_hubs.create_or_update(rg, ns_name, names.eventhub,
                                                                     _json_body(m.eventhub_body())),
        )  # fmt: skip
        return {"log_stream_id": hub["id"], "name": names.eventhub, "namespace": ns_name, "namespace_id": ns["id"],
                "resource_group": rg}  # fmt: skip

    async def _delete_log_stream(self, ctx: ClusterContext) -> None:
        names = self.names(ctx)
        rg, ns_name = names.resource_group, names.eventhub_namespace
        ns = await self._get(lambda: self.eventhub.namespaces.get(rg, ns_name))
        if ns is None:
            return
        if not m.is_ours(ns, ctx.cluster_id):
            log.warning("Event Hubs namespace %s lacks our cluster tag: left alone", ns_name)
            return
        # The hub has no tags of its own: it is ours because its namespace is.
        try:
            await self._call(lambda: self.eventhub.event_hubs.delete(rg, ns_name, names.eventhub))
        except ResourceNotFoundError:
            pass
        await self._delete_resource(f"Event Hubs namespace {ns_name}", ctx,
                                    get=lambda: self.eventhub.namespaces.get(rg, ns_name),
                                    delete=lambda: self.eventhub.namespaces.begin_delete(rg, ns_name))  # fmt: skip

    # ------------------------------------------------------------------ one resource
    async def _ensure_resource(self, what: str, *, get: Callable[[], Any], create: Callable[[], Any],
                               converge: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:  # fmt: skip
        """GET; adopt (waiting while in progress); PUT if absent, Failed/Canceled, or `converge(found)` says so.

        `create` returns either a poller (long-running PUT: awaited) or the resource (synchronous PUT).
        """
        found = await self._settle(what, get)
        if found is not None and _state(found) not in ("failed", "canceled") and not (converge and converge(found)):
            return found
        if found is not None:
            log.info("%s exists (%s): updating it", what, _state(found) or "differs")
        result = await self._call(create)
        if isinstance(result, LROPoller):
            result = await self._await_poller(what, result)
        made = _as_json(result)
        if not made.get("id"):  # some PUTs answer without a body: read it back
            made = await self._settle(what, get) or {}
        if _state(made) == "failed":
            raise TransientCloudError("ProvisioningFailed", f"{what} ended in provisioningState Failed")
        return made

    async def _settle(self, what: str, get: Callable[[], Any]) -> dict[str, Any] | None:
        """The resource once no operation runs on it (None if absent). Deleting → retry later."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            found = await self._get(get)
            if found is None or _state(found) in _IN_PROGRESS_DONE:
                return found
            if _state(found) == "deleting":
                raise TransientCloudError("ResourceBeingDeleted", f"{what} is being deleted")
            if time.monotonic() > deadline:
                raise TransientCloudError("Timeout", f"{what} still {_state(found)} after {self.timeout_s}s")
            await asyncio.sleep(self.poll_s)

    async def _delete_resource(self, what: str, ctx: ClusterContext, *, get: Callable[[], Any],
                               delete: Callable[[], Any], lro: bool = True) -> None:  # fmt: skip
        found = await self._get(get)
        if found is None:
            return
        if not m.is_ours(found, ctx.cluster_id):
            log.warning("%s lacks our cluster tag %s=%s: left alone", what, m.AZ_TAG_CLUSTER, ctx.cluster_id)
            return
        if lro:
            await self._lro_gone(delete, what)
        else:
            try:
                await self._call(delete)
            except ResourceNotFoundError:
                pass

    async def _lro_gone(self, begin: Callable[[], Any], what: str = "resource") -> None:
        """A long-running delete; 404 at any point means it is gone."""
        try:
            await self._lro(begin, what)
        except ResourceNotFoundError:
            pass

    async def _lro(self, begin: Callable[[], Any], what: str = "operation") -> Any:
        poller = await self._call(begin)
        return await self._await_poller(what, poller)

    async def _await_poller(self, what: str, poller: LROPoller[Any]) -> Any:
        """Wait for an SDK poller (it polls in its own thread) without blocking the loop or a worker."""
        deadline = time.monotonic() + self.timeout_s
        while not poller.done():
            if time.monotonic() > deadline:
                # The operation goes on in Azure; the next attempt adopts the resource and waits again.
                raise TransientCloudError("Timeout", f"{what}: operation {poller.status()} after {self.timeout_s}s")
            await asyncio.sleep(self.poll_s)
        return await self._call(lambda: poller.result(0))

    async def _get(self, get: Callable[[], Any]) -> dict[str, Any] | None:
        try:
            return _as_json(await self._call(get))
        except ResourceNotFoundError:
            return None

    @staticmethod
    async def _call(fn: Callable[[], T]) -> T:
        """One SDK call in a worker thread, its errors classified."""
        try:
            return await asyncio.to_thread(fn)
        except AzureError as exc:  # anything else is a bug: let it surface as is (the runtime retries it too)
            raise classify(exc) from exc


def _json_body(body: dict[str, Any]) -> Any:
    """A request body as the SDK takes it: the operations accept a JSON mapping at run time (and send it
    as is); their typed overloads only name the model classes."""
    return body


def _subnet_names(vnet: dict[str, Any]) -> set[str]:
    return {str(s.get("name")) for s in (vnet.get("properties") or {}).get("subnets") or []}
