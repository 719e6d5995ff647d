"""The `gcp` driver: GKE clusters with the official Google Cloud client libraries.

Steps (shared/events/models.py PROVISION_STEPS) and what each makes (request bodies: gcp_mapping.py):
  network     custom-mode VPC network, a subnetwork with `pods`/`services` secondary ranges, a firewall
              rule (Compute v1); skipped for `byon` (the core adopts the given network, never ours)
  iam         the node service account (IAM v1) bound to roles/container.defaultNodeServiceAccount on
              the project (Cloud Resource Manager getIamPolicy/setIamPolicy, etag-checked)
  cluster     the regional GKE cluster (GKE v1); its bootstrap node pool is removed once it runs
  node_pools  one GKE node pool per spec pool, created one at a time (GKE runs one node-pool operation
              per cluster at a time); on existing pools, autoscaling (setAutoscaling, then setSize when
              autoscaling is switched on or off) and Kubernetes labels, taints and resource labels
              (UpdateNodePool with only what differs) are converged
  log_stream  a Pub/Sub topic
In-place updates (`update`) converge the node pools the same way without creating any (a missing pool, or
another machine type or spot setting, is NotInPlace: a rotation's job) and the cluster's resource labels
(SetLabels, fingerprint-checked). Labels of the network, service account and topic stay as created.
Deletes run in reverse (the core drives the order), one resource at a time, and wait until it is gone.

Every step is an ensure: look the deterministic name up; adopt it only if it carries our cluster id
(label `flotilla-dev_cluster-id`, or the description marker `flotilla.dev/cluster-id=<id>` on the
Compute networks/subnetworks/firewalls and the service account, which have no labels); wait while it
is still being created; create only when absent. Compute inserts and deletes carry a `requestId`
derived from the cluster id (Compute's idempotency token); GKE, IAM and Pub/Sub have none, so a create
that races another one gets ALREADY_EXISTS and looks the resource up again. A resource left in ERROR by
a failed create (quota, stock-out) is deleted and created again on the next ensure. A resource with our
name but without our id is a terminal NameConflict: never adopted, never deleted.

The client libraries are synchronous: every call runs in `asyncio.to_thread` with the SDK's own retry
switched off (retry=None) so that one policy applies: throttling and transient errors are retried here a
few times with jittered exponential backoff, then raised as retryable CloudErrors for the consumer
runtime's much longer backoff. Long-running operations are polled with `asyncio.sleep(poll_s)`.
Error classification: gcp_errors.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

import google.auth
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1, container_v1
from google.pubsub_v1.services.publisher import PublisherClient

from services.cloud_provisioner.providers.base import (
    CloudError,
    ClusterContext,
    NotInPlaceError,
    ResourceNotFoundError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
    Updated,
    managed_spec,
    unchanged,
)
from services.cloud_provisioner.providers.gcp_errors import (
    AlreadyExistsError,
    classify,
    classify_compute_operation_error,
    classify_operation_error,
)
from services.cloud_provisioner.providers.gcp_mapping import (
    BOOTSTRAP_POOL,
    NODE_ROLES,
    PODS_RANGE,
    SERVICES_RANGE,
    Paths,
    autoscaling_matches,
    ca_fingerprint,
    cluster_body,
    cluster_labels_request,
    credential_ref,
    described_ours,
    firewall_body,
    gcp_labels,
    labelled_ours,
    names_for,
    network_body,
    network_ref,
    node_pool_body,
    pool_fixed_changes,
    pool_update_request,
    service_account_body,
    subnetwork_body,
    topic_body,
    with_members,
    without_member,
)
from services.cloud_provisioner.providers.gcp_rest import CRM_ENDPOINT, IAM_ENDPOINT, RestApi
from shared.config import Settings
from shared.events import ClusterSpec
from shared.events.models import ProvisionStep

log = logging.getLogger("flotilla.cloud_provisioner.gcp")
T = TypeVar("T")

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
_REQUEST_NS = uuid.UUID("5f0c2b8e-4d1a-4c55-9a57-0b6f1f1c9a11")
ClusterStatus = container_v1.Cluster.Status
PoolStatus = container_v1.NodePool.Status
# Creates are looked up and retried this many times when they race another create or a deletion.
_ENSURE_ROUNDS = 4

__all__ = ["GcpProvider", "build", "classify"]


def build(settings: Settings) -> GcpProvider:
    """The registry's entry point: google.auth's standard credential chain, project from settings or ADC.

    An `http://` API endpoint (a local emulator or test fake) gets anonymous credentials, as the Pub/Sub
    library does for its emulator: a real token must never travel in clear text."""
    endpoint = settings.gcp_api_endpoint
    anonymous = AnonymousCredentials() if endpoint and endpoint.startswith("http://") else None
    return GcpProvider(project=settings.gcp_project, api_endpoint=endpoint, credentials=anonymous,
                       poll_s=settings.cloud_poll_s)


class GcpProvider:
    """`CloudProvider` on Google Cloud (GKE)."""

    name = "gcp"

    def __init__(self, project: str | None = None, *, credentials: Credentials | None = None,
                 api_endpoint: str | None = None, poll_s: float = 5.0, timeout_s: float = 3600.0,
                 call_timeout_s: float = 60.0, api_attempts: int = 4, retry_base_s: float = 0.5) -> None:  # fmt: skip
        self._project = project
        self._given_credentials = credentials
        self.api_endpoint = api_endpoint
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.call_timeout_s = call_timeout_s
        self.api_attempts = max(1, api_attempts)
        self.retry_base_s = retry_base_s
        # Our retry policy replaces the SDK's (see the module docstring).
        self._opts: dict[str, Any] = {"retry": None, "timeout": call_timeout_s}

    # ------------------------------------------------------------------ clients (built lazily, in a worker thread)
    @cached_property
    def credentials(self) -> Credentials:
        if self._given_credentials is not None:
            return self._given_credentials
        creds, _ = google.auth.default(scopes=SCOPES)
        return creds

    def _resolve_project(self) -> str:
        if self._project is None:
            _, project = google.auth.default(scopes=SCOPES)
            if not project:
                raise TerminalCloudError("ProjectUnknown", "no GCP project: set FLOTILLA_GCP_PROJECT")
            self._project = project
        return self._project

    def _kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"credentials": self.credentials, "transport": "rest"}
        if self.api_endpoint:
            out["client_options"] = {"api_endpoint": self.api_endpoint}
        return out

    @cached_property
    def container(self) -> container_v1.ClusterManagerClient:
        return container_v1.ClusterManagerClient(**self._kwargs())

    @cached_property
    def networks(self) -> compute_v1.NetworksClient:
        return compute_v1.NetworksClient(**self._kwargs())

    @cached_property
    def subnetworks(self) -> compute_v1.SubnetworksClient:
        return compute_v1.SubnetworksClient(**self._kwargs())

    @cached_property
    def firewalls(self) -> compute_v1.FirewallsClient:
        return compute_v1.FirewallsClient(**self._kwargs())

    @cached_property
    def global_operations(self) -> compute_v1.GlobalOperationsClient:
        return compute_v1.GlobalOperationsClient(**self._kwargs())

    @cached_property
    def region_operations(self) -> compute_v1.RegionOperationsClient:
        return compute_v1.RegionOperationsClient(**self._kwargs())

    @cached_property
    def publisher(self) -> PublisherClient:
        return PublisherClient(**self._kwargs())

    @cached_property
    def iam(self) -> RestApi:
        return RestApi(self.credentials, self.api_endpoint or IAM_ENDPOINT, self.call_timeout_s)

    @cached_property
    def crm(self) -> RestApi:
        return RestApi(self.credentials, self.api_endpoint or CRM_ENDPOINT, self.call_timeout_s)

    # ------------------------------------------------------------------ the port
    async def ensure(self, step: ProvisionStep, ctx: ClusterContext) -> dict[str, Any]:
        spec = managed_spec(ctx, "GKE")
        if step == "network" and "byon" in spec.features and spec.network is not None:
            net = spec.network  # bring your own network: adopted, never created, tagged or deleted
            return {"network_id": net.network_id or net.vpc_id or net.vnet_id or "",
                    "subnet_ids": list(net.subnet_ids), "owned": False}  # fmt: skip
        paths = await self._paths(ctx)
        match step:
            case "network":
                return await self._ensure_network(ctx, paths)
            case "iam":
                return await self._ensure_iam(ctx, paths)
            case "cluster":
                return await self._ensure_cluster(ctx, spec, paths)
            case "node_pools":
                return await self._ensure_node_pools(ctx, spec, paths)
            case "log_stream":
                return await self._ensure_topic(ctx, paths)
        raise ValueError(f"unknown step {step!r}")

    async def update(self, step: ProvisionStep, ctx: ClusterContext) -> Updated:
        spec = managed_spec(ctx, "GKE")
        if step not in ("cluster", "node_pools"):
            return unchanged(step, ctx)
        paths = await self._paths(ctx)
        if step == "cluster":
            return await self._update_cluster_labels(ctx, paths)
        return await self._update_node_pools(ctx, spec, paths)

    async def delete(self, step: ProvisionStep, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        if resources is not None and resources.get("owned") is False:
            return  # adopted (byon): not ours
        if step == "network" and resources is None and ctx.spec is not None and "byon" in ctx.spec.features:
            return
        paths = await self._paths(ctx)
        match step:
            case "network":
                await self._delete_network(ctx, paths)
            case "iam":
                await self._delete_iam(ctx, paths)
            case "cluster":
                await self._delete_cluster(ctx, paths)
            case "node_pools":
                await self._delete_node_pools(ctx, paths)
            case "log_stream":
                await self._delete_topic(ctx, paths)
            case _:
                raise ValueError(f"unknown step {step!r}")

    async def _paths(self, ctx: ClusterContext) -> Paths:
        project = self._project if self._project is not None else await asyncio.to_thread(self._resolve_project)
        return Paths(project=project, region=ctx.location.region, names=names_for(ctx.cluster_id))

    # ------------------------------------------------------------------ network (Compute)
    async def _ensure_network(self, ctx: ClusterContext, paths: Paths) -> dict[str, Any]:
        p, r, n = paths.project, paths.region, paths.names
        await self._ensure_compute(
            ctx, f"network {n.network}", None,
            lambda: self.networks.get(project=p, network=n.network, **self._opts),
            lambda: self.networks.insert_unary(request=compute_v1.InsertNetworkRequest(
                project=p, network_resource=network_body(ctx, n), request_id=_request_id(ctx, "network:insert")),
                **self._opts),
        )  # fmt: skip
        await self._ensure_compute(
            ctx, f"subnetwork {n.subnetwork}", r,
            lambda: self.subnetworks.get(project=p, region=r, subnetwork=n.subnetwork, **self._opts),
            lambda: self.subnetworks.insert_unary(request=compute_v1.InsertSubnetworkRequest(
                project=p, region=r, subnetwork_resource=subnetwork_body(ctx, paths),
                request_id=_request_id(ctx, "subnetwork:insert")), **self._opts),
        )  # fmt: skip
        await self._ensure_compute(
            ctx, f"firewall {n.firewall}", None,
            lambda: self.firewalls.get(project=p, firewall=n.firewall, **self._opts),
            lambda: self.firewalls.insert_unary(request=compute_v1.InsertFirewallRequest(
                project=p, firewall_resource=firewall_body(ctx, paths), request_id=_request_id(ctx, "firewall:insert")),
                **self._opts),
        )  # fmt: skip
        return {"network_id": paths.network, "subnet_ids": [paths.subnetwork], "owned": True,
                "network": n.network, "subnetwork": n.subnetwork, "firewall": n.firewall,
                "pods_range": PODS_RANGE, "services_range": SERVICES_RANGE, "project": p, "region": r}  # fmt: skip

    async def _ensure_compute(self, ctx: ClusterContext, what: str, region: str | None, get: Callable[[], Any],
                              insert: Callable[[], compute_v1.Operation]) -> Any:  # fmt: skip
        for _ in range(_ENSURE_ROUNDS):
            found = await self._maybe(get)
            if found is not None:
                if not described_ours(found.description, ctx.cluster_id):
                    raise _conflict(what, ctx)
                return found
            try:
                op = await self._api(insert)
            except AlreadyExistsError:
                continue  # made meanwhile (another replica, or our earlier attempt): look again
            log.info("creating %s", what, extra={"cluster_id": ctx.cluster_id})
            await self._wait_compute(op, region, what)
        raise TransientCloudError("NotYetVisible", f"{what} was created but cannot be read back yet")

    async def _delete_network(self, ctx: ClusterContext, paths: Paths) -> None:
        p, r, n = paths.project, paths.region, paths.names
        # Reverse of creation: the firewall and the subnetwork keep the network in use.
        await self._delete_compute(
            ctx, f"firewall {n.firewall}", None,
            lambda: self.firewalls.get(project=p, firewall=n.firewall, **self._opts),
            lambda: self.firewalls.delete_unary(request=compute_v1.DeleteFirewallRequest(
                project=p, firewall=n.firewall, request_id=_request_id(ctx, "firewall:delete")), **self._opts),
        )  # fmt: skip
        await self._delete_compute(
            ctx, f"subnetwork {n.subnetwork}", r,
            lambda: self.subnetworks.get(project=p, region=r, subnetwork=n.subnetwork, **self._opts),
            lambda: self.subnetworks.delete_unary(request=compute_v1.DeleteSubnetworkRequest(
                project=p, region=r, subnetwork=n.subnetwork, request_id=_request_id(ctx, "subnetwork:delete")),
                **self._opts),
        )  # fmt: skip
        await self._delete_compute(
            ctx, f"network {n.network}", None,
            lambda: self.networks.get(project=p, network=n.network, **self._opts),
            lambda: self.networks.delete_unary(request=compute_v1.DeleteNetworkRequest(
                project=p, network=n.network, request_id=_request_id(ctx, "network:delete")), **self._opts),
        )  # fmt: skip

    async def _delete_compute(self, ctx: ClusterContext, what: str, region: str | None, get: Callable[[], Any],
                              delete: Callable[[], compute_v1.Operation]) -> None:  # fmt: skip
        found = await self._maybe(get)
        if found is None:
            return
        if not described_ours(found.description, ctx.cluster_id):
            log.warning("not deleting %s: it does not carry cluster %s's marker", what, ctx.cluster_id)
            return
        try:
            op = await self._api(delete)
            log.info("deleting %s", what, extra={"cluster_id": ctx.cluster_id})
            await self._wait_compute(op, region, what)
        except ResourceNotFoundError:
            return

    async def _wait_compute(self, op: compute_v1.Operation, region: str | None, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        project, name = self._project, op.name
        while op.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise TransientCloudError("Timeout", f"{what}: operation {name} not done after {self.timeout_s}s")
            await asyncio.sleep(self.poll_s)
            if region is None:
                op = await self._api(lambda: self.global_operations.get(project=project, operation=name, **self._opts))
            else:
                op = await self._api(lambda: self.region_operations.get(project=project, region=region,
                                                                        operation=name, **self._opts))  # fmt: skip
        if op.error and op.error.errors:
            raise classify_compute_operation_error(op.http_error_status_code,
                                                   [(e.code, e.message) for e in op.error.errors])  # fmt: skip

    # ------------------------------------------------------------------ iam (IAM + Resource Manager REST)
    async def _ensure_iam(self, ctx: ClusterContext, paths: Paths) -> dict[str, Any]:
        p, email = paths.project, paths.service_account
        sa: dict[str, Any] | None = None
        body = service_account_body(ctx, paths.names)
        for _ in range(_ENSURE_ROUNDS):
            sa = await self._maybe(lambda: self.iam.call("GET", f"/v1/projects/{p}/serviceAccounts/{email}"))
            if sa is not None:
                break
            try:
                sa = await self._api(lambda: self.iam.call("POST", f"/v1/projects/{p}/serviceAccounts", body))
                log.info("created service account %s", email, extra={"cluster_id": ctx.cluster_id})
                break
            except AlreadyExistsError:
                continue
        if sa is None:
            raise TransientCloudError("NotYetVisible", f"service account {email} cannot be read back yet")
        if not described_ours(sa.get("description"), ctx.cluster_id):
            raise _conflict(f"service account {email}", ctx)
        try:
            await self._update_policy(p, lambda policy: with_members(policy, NODE_ROLES, f"serviceAccount:{email}"))
        except TerminalCloudError as exc:
            if "does not exist" not in exc.message:
                raise
            # IAM is eventually consistent: a just-created account can be unknown to setIamPolicy for a while.
            raise TransientCloudError("NotYetVisible", exc.message) from None
        return {"service_account_email": email, "account_id": paths.names.service_account_id,
                "unique_id": str(sa.get("uniqueId", "")), "roles": list(NODE_ROLES)}  # fmt: skip

    async def _update_policy(self, project: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Read-modify-write of the project's IAM policy; the etag makes a concurrent writer's change win
        the race instead of being overwritten (409 ABORTED): then read again and re-apply."""
        for attempt in range(1, self.api_attempts + 1):
            policy = await self._api(lambda: self.crm.call("POST", f"/v1/projects/{project}:getIamPolicy",
                                                           {"options": {"requestedPolicyVersion": 3}}))  # fmt: skip
            new = change(policy)
            if new is None:
                return
            try:
                await self._set_policy(project, new)
                return
            except (ThrottlingError, TransientCloudError) as exc:
                if attempt == self.api_attempts:
                    raise
                log.info("project policy update raced (%s): reading it again", exc.code)
                await asyncio.sleep(self._backoff(attempt))

    async def _set_policy(self, project: str, policy: dict[str, Any]) -> None:
        # No local retry: re-sending a stale etag cannot succeed; the caller reads the policy again.
        await self._api(lambda: self.crm.call("POST", f"/v1/projects/{project}:setIamPolicy", {"policy": policy}),
                        local_retry=False)  # fmt: skip

    async def _delete_iam(self, ctx: ClusterContext, paths: Paths) -> None:
        p, email = paths.project, paths.service_account
        sa = await self._maybe(lambda: self.iam.call("GET", f"/v1/projects/{p}/serviceAccounts/{email}"))
        if sa is None:
            return
        if not described_ours(sa.get("description"), ctx.cluster_id):
            log.warning("not deleting service account %s: it is not cluster %s's", email, ctx.cluster_id)
            return
        # Our member only: other bindings in the project policy are not ours to touch.
        await self._update_policy(p, lambda policy: without_member(policy, f"serviceAccount:{email}"))
        try:
            await self._api(lambda: self.iam.call("DELETE", f"/v1/projects/{p}/serviceAccounts/{email}"))
            log.info("deleted service account %s", email, extra={"cluster_id": ctx.cluster_id})
        except ResourceNotFoundError:
            return

    # ------------------------------------------------------------------ cluster (GKE)
    async def _ensure_cluster(self, ctx: ClusterContext, spec: ClusterSpec, paths: Paths) -> dict[str, Any]:
        sa_email = str(ctx.resources.get("iam", {}).get("service_account_email") or paths.service_account)
        body = cluster_body(ctx, spec, paths.names, network_ref(ctx, paths), sa_email)
        cluster = await self._converge_cluster(ctx, paths, body)
        await self._drop_bootstrap_pool(ctx, paths, cluster)
        if not cluster.endpoint or not cluster.master_auth.cluster_ca_certificate:
            raise TransientCloudError("NotReady", f"cluster {paths.cluster} has no endpoint or CA yet")
        return {
            "resource_id": paths.cluster, "name": paths.names.cluster, "location": paths.region,
            "endpoint": f"https://{cluster.endpoint}",
            "ca_fingerprint": ca_fingerprint(cluster.master_auth.cluster_ca_certificate),
            "credential_ref": credential_ref(paths.project, paths.region, paths.names.cluster),
            "kubernetes_version": cluster.current_master_version or spec.kubernetes_version,
            "private_endpoint": bool(cluster.private_cluster_config.enable_private_endpoint),
        }  # fmt: skip

    async def _get_cluster(self, paths: Paths) -> container_v1.Cluster | None:
        return await self._maybe(lambda: self.container.get_cluster(name=paths.cluster, **self._opts))

    async def _converge_cluster(self, ctx: ClusterContext, paths: Paths, body: container_v1.Cluster
                                ) -> container_v1.Cluster:  # fmt: skip
        for _ in range(_ENSURE_ROUNDS):
            found = await self._get_cluster(paths)
            if found is not None:
                if not labelled_ours(found.resource_labels, ctx.cluster_id):
                    raise _conflict(f"GKE cluster {paths.cluster}", ctx)
                if found.status == ClusterStatus.STOPPING:
                    await self._poll(lambda: self._get_cluster(paths), lambda c: c is None, f"{paths.cluster} gone")
                    continue
                if found.status == ClusterStatus.ERROR:
                    log.warning("cluster %s is in ERROR (%s): deleting it to create it again", paths.cluster,
                                found.status_message, extra={"cluster_id": ctx.cluster_id})  # fmt: skip
                    await self._delete_cluster(ctx, paths)
                    continue
                return await self._cluster_running(paths)
            try:
                op = await self._api(lambda: self.container.create_cluster(parent=paths.location, cluster=body,
                                                                           **self._opts))  # fmt: skip
            except AlreadyExistsError:
                continue
            log.info("creating GKE cluster %s", paths.cluster, extra={"cluster_id": ctx.cluster_id})
            await self._wait_gke(op, paths)
            return await self._cluster_running(paths)
        raise TransientCloudError("NotYetVisible", f"cluster {paths.cluster} cannot be created or read yet")

    async def _cluster_running(self, paths: Paths) -> container_v1.Cluster:
        settled = (ClusterStatus.RUNNING, ClusterStatus.RECONCILING, ClusterStatus.ERROR, ClusterStatus.STOPPING)
        cluster = await self._poll(lambda: self._get_cluster(paths), lambda c: c is None or c.status in settled,
                                   f"cluster {paths.cluster} running")  # fmt: skip
        if cluster is None:
            raise TransientCloudError("ResourceGone", f"cluster {paths.cluster} disappeared while creating")
        if cluster.status == ClusterStatus.ERROR:
            raise TerminalCloudError("ClusterFailed", cluster.status_message or f"cluster {paths.cluster} is in ERROR")
        if cluster.status == ClusterStatus.STOPPING:
            raise TransientCloudError("ResourceBeingDeleted", f"cluster {paths.cluster} is being deleted")
        return cluster

    async def _update_cluster_labels(self, ctx: ClusterContext, paths: Paths) -> Updated:
        found = await self._get_cluster(paths)
        if found is None:
            raise NotInPlaceError(f"GKE cluster {paths.cluster} does not exist: an update does not create it")
        if not labelled_ours(found.resource_labels, ctx.cluster_id):
            raise _conflict(f"GKE cluster {paths.cluster}", ctx)
        cluster = await self._cluster_running(paths)
        request = cluster_labels_request(paths.cluster, cluster, gcp_labels(ctx.tags("cluster")))
        if request is not None:
            log.info("cluster %s: setting its labels", paths.cluster, extra={"cluster_id": ctx.cluster_id})
            # A stale fingerprint (someone changed them meanwhile) fails the call: retried with a fresh read.
            op = await self._api(lambda: self.container.set_labels(request=request, **self._opts))
            await self._wait_gke(op, paths)
        return Updated(dict(ctx.resources.get("cluster", {})), request is not None)

    async def _drop_bootstrap_pool(self, ctx: ClusterContext, paths: Paths, cluster: container_v1.Cluster) -> None:
        """GKE needs a node pool to create a cluster; the spec's pools come from the node_pools step."""
        if any(pool.name == BOOTSTRAP_POOL for pool in cluster.node_pools):
            log.info("removing the bootstrap node pool of %s", paths.cluster, extra={"cluster_id": ctx.cluster_id})
            await self._delete_pool(paths, BOOTSTRAP_POOL)

    async def _delete_cluster(self, ctx: ClusterContext, paths: Paths) -> None:
        busy = (ClusterStatus.PROVISIONING, ClusterStatus.RECONCILING)
        found = await self._poll(lambda: self._get_cluster(paths), lambda c: c is None or c.status not in busy,
                                 f"cluster {paths.cluster} settled")  # fmt: skip
        if found is None:
            return
        if not labelled_ours(found.resource_labels, ctx.cluster_id):
            log.warning("not deleting cluster %s: it is not labelled with %s", paths.cluster, ctx.cluster_id)
            return
        if found.status != ClusterStatus.STOPPING:
            try:
                op = await self._api(lambda: self.container.delete_cluster(name=paths.cluster, **self._opts))
                log.info("deleting GKE cluster %s", paths.cluster, extra={"cluster_id": ctx.cluster_id})
                await self._wait_gke(op, paths)
            except ResourceNotFoundError:
                return
        await self._poll(lambda: self._get_cluster(paths), lambda c: c is None, f"cluster {paths.cluster} gone")

    # ------------------------------------------------------------------ node pools (GKE)
    async def _get_pool(self, paths: Paths, name: str) -> container_v1.NodePool | None:
        return await self._maybe(lambda: self.container.get_node_pool(name=paths.node_pool(name), **self._opts))

    async def _ensure_node_pools(self, ctx: ClusterContext, spec: ClusterSpec, paths: Paths) -> dict[str, Any]:
        cluster = await self._get_cluster(paths)
        if cluster is None:
            raise TransientCloudError("NotFound", f"cluster {paths.cluster} not found (yet)")
        if not labelled_ours(cluster.resource_labels, ctx.cluster_id):
            raise _conflict(f"GKE cluster {paths.cluster}", ctx)
        sa_email = str(ctx.resources.get("iam", {}).get("service_account_email") or paths.service_account)
        out: dict[str, str] = {}
        for pool in spec.node_pools:  # one at a time: GKE refuses concurrent node-pool operations on a cluster
            body = node_pool_body(ctx, pool, sa_email)
            await self._converge_pool(ctx, paths, body)
            out[pool.name] = paths.node_pool(body.name)
        return {"node_pools": out, "cluster": paths.cluster}

    async def _update_node_pools(self, ctx: ClusterContext, spec: ClusterSpec, paths: Paths) -> Updated:
        sa_email = str(ctx.resources.get("iam", {}).get("service_account_email") or paths.service_account)
        out: dict[str, str] = {}
        changed = False
        for pool in spec.node_pools:  # one at a time, as GKE wants
            body = node_pool_body(ctx, pool, sa_email)
            name = paths.node_pool(body.name)
            if await self._get_pool(paths, body.name) is None:
                raise NotInPlaceError(f"node pool {name} does not exist: adding a pool takes a rotation")
            found = await self._pool_running(paths, body.name)
            fixed = pool_fixed_changes(found, body)
            if fixed:
                raise NotInPlaceError(f"node pool {name}: {', '.join(fixed)} cannot change in place (a rotation can)")
            changed = await self._converge_existing_pool(ctx, paths, body, found) or changed
            out[pool.name] = name
        return Updated({"node_pools": out, "cluster": paths.cluster}, changed)

    async def _converge_existing_pool(self, ctx: ClusterContext, paths: Paths, body: container_v1.NodePool,
                                      found: container_v1.NodePool) -> bool:  # fmt: skip
        """Autoscaling, then labels / taints / resource labels, where they differ; True if anything was changed."""
        name = paths.node_pool(body.name)
        changed = False
        if not autoscaling_matches(found.autoscaling, body.autoscaling):
            log.info("node pool %s: autoscaling %s %s..%s -> %s %s..%s", name, found.autoscaling.enabled,
                     found.autoscaling.total_min_node_count, found.autoscaling.total_max_node_count,
                     body.autoscaling.enabled, body.autoscaling.total_min_node_count,
                     body.autoscaling.total_max_node_count, extra={"cluster_id": ctx.cluster_id})  # fmt: skip
            await self._set_autoscaling(paths, name, body.autoscaling)
            if found.autoscaling.enabled != body.autoscaling.enabled:
                # Switched off (maxCount 0) or on again: nobody else sizes the pool, so start it where a new one would.
                await self._set_size(paths, name, body.initial_node_count)
            changed = True
        request = pool_update_request(name, found, body)
        if request is not None:
            log.info("node pool %s: updating its labels / taints", name, extra={"cluster_id": ctx.cluster_id})
            op = await self._api(lambda: self.container.update_node_pool(request=request, **self._opts))
            await self._wait_gke(op, paths)
            changed = True
        return changed

    async def _converge_pool(self, ctx: ClusterContext, paths: Paths, body: container_v1.NodePool) -> None:
        name = paths.node_pool(body.name)
        for _ in range(_ENSURE_ROUNDS):
            found = await self._get_pool(paths, body.name)
            if found is not None:
                if found.status in (PoolStatus.STOPPING, PoolStatus.ERROR):
                    # A pool a failed create left in ERROR (quota, stock-out): replace it.
                    await self._delete_pool(paths, body.name)
                    continue
                found = await self._pool_running(paths, body.name)
                await self._converge_existing_pool(ctx, paths, body, found)
                return
            try:
                op = await self._api(lambda: self.container.create_node_pool(parent=paths.cluster, node_pool=body,
                                                                             **self._opts))  # fmt: skip
            except AlreadyExistsError:
                continue
            log.info("creating node pool %s", name, extra={"cluster_id": ctx.cluster_id})
            await self._wait_gke(op, paths)
            await self._pool_running(paths, body.name)
            return
        raise TransientCloudError("NotYetVisible", f"node pool {name} cannot be created or read yet")

    async def _set_autoscaling(self, paths: Paths, name: str, autoscaling: container_v1.NodePoolAutoscaling) -> None:
        request = container_v1.SetNodePoolAutoscalingRequest(name=name, autoscaling=autoscaling)
        op = await self._api(lambda: self.container.set_node_pool_autoscaling(request=request, **self._opts))
        await self._wait_gke(op, paths)

    async def _set_size(self, paths: Paths, name: str, node_count: int) -> None:
        request = container_v1.SetNodePoolSizeRequest(name=name, node_count=node_count)
        op = await self._api(lambda: self.container.set_node_pool_size(request=request, **self._opts))
        await self._wait_gke(op, paths)

    async def _pool_running(self, paths: Paths, name: str) -> container_v1.NodePool:
        settled = (PoolStatus.RUNNING, PoolStatus.RUNNING_WITH_ERROR, PoolStatus.ERROR, PoolStatus.STOPPING)
        pool = await self._poll(lambda: self._get_pool(paths, name), lambda p: p is None or p.status in settled,
                                f"node pool {name} running")  # fmt: skip
        if pool is None:
            raise TransientCloudError("ResourceGone", f"node pool {name} disappeared while creating")
        if pool.status == PoolStatus.ERROR:
            raise TerminalCloudError("NodePoolFailed", pool.status_message or f"node pool {name} is in ERROR")
        if pool.status == PoolStatus.STOPPING:
            raise TransientCloudError("ResourceBeingDeleted", f"node pool {name} is being deleted")
        return pool

    async def _delete_node_pools(self, ctx: ClusterContext, paths: Paths) -> None:
        # GKE refuses node-pool operations while the cluster itself is being created or changed.
        busy = (ClusterStatus.PROVISIONING, ClusterStatus.RECONCILING)
        cluster = await self._poll(lambda: self._get_cluster(paths), lambda c: c is None or c.status not in busy,
                                   f"cluster {paths.cluster} settled")  # fmt: skip
        if cluster is None or not labelled_ours(cluster.resource_labels, ctx.cluster_id):
            return  # gone already, or not ours
        if cluster.status == ClusterStatus.STOPPING:
            return  # the cluster's deletion takes its pools with it
        for pool in cluster.node_pools:  # ours (and the bootstrap pool) carry our labels in config.resourceLabels
            if labelled_ours(pool.config.resource_labels, ctx.cluster_id):
                await self._delete_pool(paths, pool.name)

    async def _delete_pool(self, paths: Paths, name: str) -> None:
        busy = (PoolStatus.PROVISIONING, PoolStatus.RECONCILING)
        pool = await self._poll(lambda: self._get_pool(paths, name), lambda p: p is None or p.status not in busy,
                                f"node pool {name} settled")  # fmt: skip
        if pool is None:
            return
        if pool.status != PoolStatus.STOPPING:
            try:
                op = await self._api(lambda: self.container.delete_node_pool(name=paths.node_pool(name),
                                                                             **self._opts))  # fmt: skip
                await self._wait_gke(op, paths)
            except ResourceNotFoundError:
                return
        await self._poll(lambda: self._get_pool(paths, name), lambda p: p is None, f"node pool {name} gone")

    async def _wait_gke(self, op: container_v1.Operation, paths: Paths) -> None:
        deadline = time.monotonic() + self.timeout_s
        name = paths.operation(op.name.rsplit("/", 1)[-1])
        while op.status != container_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise TransientCloudError("Timeout", f"operation {name} not done after {self.timeout_s}s")
            await asyncio.sleep(self.poll_s)
            op = await self._api(lambda: self.container.get_operation(name=name, **self._opts))
        if op.error.code or op.error.message:
            raise classify_operation_error(op.error.code, op.error.message or op.status_message)

    # ------------------------------------------------------------------ log stream (Pub/Sub)
    async def _ensure_topic(self, ctx: ClusterContext, paths: Paths) -> dict[str, Any]:
        body = topic_body(ctx, paths)
        for _ in range(_ENSURE_ROUNDS):
            found = await self._maybe(lambda: self.publisher.get_topic(topic=paths.topic, **self._opts))
            if found is not None:
                if not labelled_ours(found.labels, ctx.cluster_id):
                    raise _conflict(f"topic {paths.topic}", ctx)
                return {"log_stream_id": paths.topic, "name": paths.names.topic}
            try:
                await self._api(lambda: self.publisher.create_topic(request=body, **self._opts))
                log.info("created topic %s", paths.topic, extra={"cluster_id": ctx.cluster_id})
            except AlreadyExistsError:
                continue
        raise TransientCloudError("NotYetVisible", f"topic {paths.topic} cannot be read back yet")

    async def _delete_topic(self, ctx: ClusterContext, paths: Paths) -> None:
        found = await self._maybe(lambda: self.publisher.get_topic(topic=paths.topic, **self._opts))
        if found is None:
            return
        if not labelled_ours(found.labels, ctx.cluster_id):
            log.warning("not deleting topic %s: it is not labelled with %s", paths.topic, ctx.cluster_id)
            return
        try:
            await self._api(lambda: self.publisher.delete_topic(topic=paths.topic, **self._opts))
            log.info("deleted topic %s", paths.topic, extra={"cluster_id": ctx.cluster_id})
        except ResourceNotFoundError:
            return

    # ------------------------------------------------------------------ calling the APIs
    async def _api(self, call: Callable[[], T], *, local_retry: bool = True) -> T:
        """One SDK call in a worker thread, errors classified; throttling and transient errors retried
        a few times here (AlreadyExists is an answer, not a failure: never retried)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await asyncio.to_thread(call)
            except Exception as exc:
                err = classify(exc)
                if err is None:
                    raise
                retry = local_retry and err.retryable and not isinstance(err, AlreadyExistsError)
                if not retry or attempt >= self.api_attempts:
                    if err is exc:
                        raise
                    raise err from exc
                log.info("GCP call failed (%s), retrying: %s", err.code, err.message)
                await asyncio.sleep(self._backoff(attempt))

    async def _maybe(self, call: Callable[[], T]) -> T | None:
        try:
            return await self._api(call)
        except ResourceNotFoundError:
            return None

    async def _poll(self, fetch: Callable[[], Any], done: Callable[[Any], bool], what: str) -> Any:
        """Fetch (an async lookup returning None when absent) until `done`; async sleeps, bounded."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            current = await fetch()
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise TransientCloudError("Timeout", f"{what}: not reached after {self.timeout_s}s")
            await asyncio.sleep(self.poll_s)

    def _backoff(self, attempt: int) -> float:
        return min(self.retry_base_s * 2 ** (attempt - 1), 10.0) * (0.5 + random.random())


def _request_id(ctx: ClusterContext, part: str) -> str:
    """Compute's idempotency token (a UUID): the same for every retry of this cluster's operation."""
    return str(uuid.uuid5(_REQUEST_NS, ctx.client_token("network", part)))


def _conflict(what: str, ctx: ClusterContext) -> CloudError:
    return TerminalCloudError("NameConflict", f"{what} exists but does not belong to cluster {ctx.cluster_id}: "
                                              "rename or delete it")  # fmt: skip
