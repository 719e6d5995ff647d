"""The `cluster` and `node_pools` steps on AWS: the EKS cluster and one managed node group per pool.

Both are found by their deterministic names (unique per region / per cluster) and adopted only
if they carry this cluster's id tag; a name taken by something else is a terminal conflict,
never adopted and never deleted. Creates carry `clientRequestToken`; a create that loses to
an existing resource (ResourceInUseException) adopts it. Slow operations are polled with async
sleeps; a wait that outlasts the waiter raises a retryable error and the next delivery resumes
waiting on the same resource.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from services.cloud_provisioner.providers.aws_api import ALREADY_EXISTS_CODES, AwsApi, Waiter, aws_code
from services.cloud_provisioner.providers.aws_mapping import (
    AwsNames,
    ca_fingerprint,
    client_token,
    cluster_request,
    cluster_updates,
    credential_ref,
    nodegroup_fixed_changes,
    nodegroup_request,
    nodegroup_update,
    tag_changes,
    tag_dict,
)
from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    CloudError,
    ClusterContext,
    InvalidInstanceTypeError,
    NotInPlaceError,
    ResourceNotFoundError,
    TerminalCloudError,
    TransientCloudError,
    Updated,
)
from services.cloud_provisioner.providers.base import gather_calls as gather
from shared.events import ClusterSpec
from shared.events.clusterset import NodePool

log = logging.getLogger("flotilla.cloud_provisioner.aws")

TAG_NODE_POOL = "flotilla.dev/node-pool"


def check_ours(what: str, tags: dict[str, str], cluster_id: str) -> None:
    owner = tags.get(TAG_CLUSTER)
    if owner != cluster_id:
        raise TerminalCloudError(
            "NameConflict",
            f"{what} already exists and belongs to "
            f"{owner or 'something not managed by Flotilla'}, not to {cluster_id}; "
            "refusing to adopt it",
        )


def is_ours(tags: dict[str, str], cluster_id: str) -> bool:
    return tags.get(TAG_CLUSTER) == cluster_id


def needs(ctx: ClusterContext, step: str, key: str) -> Any:
    value = ctx.resources.get(step, {}).get(key)
    if not value:
        raise TerminalCloudError("MissingPrerequisite", f"step {step!r} reported no {key!r} for {ctx.cluster_id}")
    return value


def _issues(resource: dict[str, Any]) -> str:
    issues = resource.get("health", {}).get("issues", [])
    return "; ".join(f"{i.get('code')}: {i.get('message')}" for i in issues) or "no reason given"


class AwsEks:
    def __init__(self, api: AwsApi, waiter: Waiter) -> None:
        self.api = api
        self.waiter = waiter

    @staticmethod
    async def _start_delete(what: str, call: Awaitable[Any]) -> None:
        try:
            await call
        except CloudError as exc:
            log.warning("could not start deleting the failed %s: %s", what, exc)

    # ------------------------------------------------------------------ cluster
    async def _describe_cluster(self, region: str, name: str) -> dict[str, Any] | None:
        try:
            return dict((await self.api.call("eks", region, "describe_cluster", name=name))["cluster"])
        except ResourceNotFoundError:
            return None

    async def _cluster_active(self, region: str, name: str) -> dict[str, Any]:
        async def probe() -> tuple[bool, dict[str, Any]]:
            cluster = await self._describe_cluster(region, name)
            if cluster is None:
                return False, {}  # created a moment ago: not visible yet (eventual consistency)
            status = cluster.get("status")
            if status == "FAILED":
                raise TerminalCloudError("ClusterFailed", f"EKS cluster {name} is FAILED: {_issues(cluster)}")
            if status == "DELETING":
                raise TransientCloudError("ResourceBeingDeleted", f"EKS cluster {name} is being deleted")
            return status == "ACTIVE", cluster

        return await self.waiter.until(f"EKS cluster {name} ACTIVE", probe)

    async def ensure_cluster(self, ctx: ClusterContext, spec: ClusterSpec) -> dict[str, Any]:
        region, cid = ctx.location.region, ctx.cluster_id
        name = AwsNames(cid).cluster
        cluster = await self._describe_cluster(region, name)
        if cluster is None:
            net = ctx.resources.get("network", {})
            sg = net.get("security_group_id")
            request = cluster_request(
                name=name,
                spec=spec,
                role_arn=needs(ctx, "iam", "cluster_role_arn"),
                subnet_ids=needs(ctx, "network", "subnet_ids"),
                security_group_ids=[sg] if sg else [],
                tags=ctx.tags("cluster"),
                token=client_token(ctx.client_token("cluster")),
            )
            try:
                cluster = dict((await self.api.call("eks", region, "create_cluster", **request))["cluster"])
            except CloudError as exc:
                if aws_code(exc) not in ALREADY_EXISTS_CODES:
                    raise
                cluster = await self._describe_cluster(region, name)  # an earlier attempt (or replica) made it
                if cluster is None:
                    raise
            log.info("created EKS cluster %s", name, extra={"cluster_id": cid})
        check_ours(f"EKS cluster {name}", tag_dict(cluster.get("tags")), cid)
        try:
            cluster = await self._cluster_active(region, name)
        except TerminalCloudError:
            # FAILED clusters cannot be repaired: remove it so that asking again starts afresh.
            await self._start_delete("EKS cluster", self.api.call("eks", region, "delete_cluster", name=name))
            raise
        for update in cluster_updates(spec, cluster):
            # One kind of change per call; EKS rejects a second update while one runs (ResourceInUse: retried).
            log.info("converging EKS cluster %s: %s", name, sorted(update), extra={"cluster_id": cid})
            await self.api.call("eks", region, "update_cluster_config", name=name, **update)
            cluster = await self._cluster_active(region, name)
        return self._cluster_report(cluster, region, name)

    async def update_cluster_tags(self, ctx: ClusterContext) -> Updated:
        """In-place update of the cluster: its tags (TagResource / UntagResource). The rest of what the spec says
        about the cluster is either converged by `ensure_cluster` or a rotation (the version)."""
        region, cid = ctx.location.region, ctx.cluster_id
        name = AwsNames(cid).cluster
        cluster = await self._describe_cluster(region, name)
        if cluster is None:
            raise NotInPlaceError(f"EKS cluster {name} does not exist: an update does not create it")
        check_ours(f"EKS cluster {name}", tag_dict(cluster.get("tags")), cid)
        cluster = await self._cluster_active(region, name)
        add, remove = tag_changes(tag_dict(cluster.get("tags")), ctx.tags("cluster"))
        if add:
            await self.api.call("eks", region, "tag_resource", resourceArn=cluster["arn"], tags=add)
        if remove:
            await self.api.call("eks", region, "untag_resource", resourceArn=cluster["arn"], tagKeys=remove)
        if add or remove:
            log.info("EKS cluster %s tags: set %s, removed %s", name, sorted(add), remove, extra={"cluster_id": cid})
            cluster = await self._cluster_active(region, name)
        return Updated(self._cluster_report(cluster, region, name), bool(add or remove))

    @staticmethod
    def _cluster_report(cluster: dict[str, Any], region: str, name: str) -> dict[str, Any]:
        vpc = cluster.get("resourcesVpcConfig", {})
        return {
            "resource_id": cluster["arn"],
            "name": name,
            "arn": cluster["arn"],
            "region": region,
            "endpoint": str(cluster["endpoint"]).rstrip("/"),
            "ca_fingerprint": ca_fingerprint(str(cluster["certificateAuthority"]["data"])),
            "credential_ref": credential_ref(region, name),
            "kubernetes_version": cluster.get("version"),
            "endpoint_private_access": bool(vpc.get("endpointPrivateAccess")),
            "endpoint_public_access": bool(vpc.get("endpointPublicAccess")),
            "cluster_security_group_id": vpc.get("clusterSecurityGroupId"),
            "oidc_issuer": cluster.get("identity", {}).get("oidc", {}).get("issuer"),
        }

    async def delete_cluster(self, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        region, cid = ctx.location.region, ctx.cluster_id
        name = str((resources or {}).get("name") or AwsNames(cid).cluster)
        cluster = await self._describe_cluster(region, name)
        if cluster is None:
            return
        if not is_ours(tag_dict(cluster.get("tags")), cid):
            log.warning("EKS cluster %s is not tagged for %s: leaving it alone", name, cid)
            return
        if cluster.get("status") != "DELETING":
            try:
                # Refused while it is still creating or has node groups: ResourceInUse, retried.
                await self.api.call("eks", region, "delete_cluster", name=name)
            except ResourceNotFoundError:
                return

        async def gone() -> tuple[bool, None]:
            left = await self._describe_cluster(region, name)
            if left is not None and left.get("status") == "FAILED":
                raise TransientCloudError("DeleteFailed", f"EKS cluster {name} failed to delete: {_issues(left)}")
            return left is None, None

        await self.waiter.until(f"EKS cluster {name} deleted", gone)

    # ------------------------------------------------------------------ node groups
    async def _describe_nodegroup(self, region: str, cluster: str, nodegroup: str) -> dict[str, Any] | None:
        try:
            out = await self.api.call("eks", region, "describe_nodegroup", clusterName=cluster, nodegroupName=nodegroup)
        except ResourceNotFoundError:
            return None
        return dict(out["nodegroup"])

    async def _nodegroup_settled(self, region: str, cluster: str, name: str) -> dict[str, Any]:
        async def probe() -> tuple[bool, dict[str, Any]]:
            ng = await self._describe_nodegroup(region, cluster, name)
            if ng is None:
                return False, {}
            status = ng.get("status")
            if status == "CREATE_FAILED":
                issues = ng.get("health", {}).get("issues", [])
                if any(i.get("code") == "Ec2InstanceTypeDoesNotExist" for i in issues):
                    raise InvalidInstanceTypeError("InvalidInstanceType", f"node group {name}: {_issues(ng)}")
                raise TerminalCloudError("NodePoolFailed", f"node group {name} failed to create: {_issues(ng)}")
            if status == "DELETING":
                raise TransientCloudError("ResourceBeingDeleted", f"node group {name} is being deleted")
            if status == "DEGRADED":
                log.warning("node group %s/%s is DEGRADED: %s", cluster, name, _issues(ng))
            return status in ("ACTIVE", "DEGRADED"), ng

        return await self.waiter.until(f"node group {cluster}/{name}", probe)

    async def _ensure_nodegroup(
        self,
        ctx: ClusterContext,
        spec: ClusterSpec,
        pool: NodePool,
        cluster: str,
        node_role_arn: str,
        subnet_ids: list[str],
    ) -> dict[str, Any]:
        region, cid = ctx.location.region, ctx.cluster_id
        name = AwsNames.nodegroup(pool.name)
        ng = await self._describe_nodegroup(region, cluster, name)
        if ng is None:
            request = nodegroup_request(
                cluster_name=cluster,
                pool=pool,
                spec=spec,
                node_role_arn=node_role_arn,
                subnet_ids=subnet_ids,
                tags={**ctx.tags("node_pools"), TAG_NODE_POOL: pool.name},
                token=client_token(ctx.client_token("node_pools", pool.name)),
            )
            try:
                ng = dict((await self.api.call("eks", region, "create_nodegroup", **request))["nodegroup"])
            except CloudError as exc:
                if aws_code(exc) not in ALREADY_EXISTS_CODES:
                    raise
                ng = await self._describe_nodegroup(region, cluster, name)
                if ng is None:
                    raise
            log.info("created node group %s/%s", cluster, name, extra={"cluster_id": cid})
        check_ours(f"node group {cluster}/{name}", tag_dict(ng.get("tags")), cid)
        try:
            ng = await self._nodegroup_settled(region, cluster, name)
        except TerminalCloudError:
            # A failed node group cannot be repaired, only replaced: start removing it, so that asking again
            # (a new request, once the cause is fixed) creates a fresh one.
            await self._start_delete(
                "node group", self.api.call("eks", region, "delete_nodegroup", clusterName=cluster, nodegroupName=name)
            )
            raise
        ng, _ = await self._converge_nodegroup(ctx, pool, cluster, ng)
        return ng

    async def _converge_nodegroup(self, ctx: ClusterContext, pool: NodePool, cluster: str, ng: dict[str, Any]
                                  ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Scaling, labels and taints changed in place where they differ; True if a change was made."""
        region, name = ctx.location.region, AwsNames.nodegroup(pool.name)
        update = nodegroup_update(pool, ng)
        if not update:
            return ng, False
        log.info("converging node group %s/%s: %s", cluster, name, update, extra={"cluster_id": ctx.cluster_id})
        await self.api.call("eks", region, "update_nodegroup_config", clusterName=cluster, nodegroupName=name, **update)
        return await self._nodegroup_settled(region, cluster, name), True

    async def _update_nodegroup(self, ctx: ClusterContext, pool: NodePool, cluster: str) -> tuple[dict[str, Any], bool]:
        region, name = ctx.location.region, AwsNames.nodegroup(pool.name)
        ng = await self._describe_nodegroup(region, cluster, name)
        if ng is None:
            raise NotInPlaceError(f"node group {cluster}/{name} does not exist: adding a pool takes a rotation")
        check_ours(f"node group {cluster}/{name}", tag_dict(ng.get("tags")), ctx.cluster_id)
        ng = await self._nodegroup_settled(region, cluster, name)
        fixed = nodegroup_fixed_changes(pool, ng)
        if fixed:
            raise NotInPlaceError(f"node group {cluster}/{name}: {', '.join(fixed)} cannot change in place "
                                  "(a rotation can)")  # fmt: skip
        return await self._converge_nodegroup(ctx, pool, cluster, ng)

    async def update_node_pools(self, ctx: ClusterContext, spec: ClusterSpec) -> Updated:
        """In-place update: every pool of the spec converged on its existing node group; none is created."""
        cluster = str(needs(ctx, "cluster", "name"))
        results = await gather([self._update_nodegroup(ctx, pool, cluster) for pool in spec.node_pools])
        return Updated(self._pools_report(cluster, spec, [ng for ng, _ in results]), any(c for _, c in results))

    async def ensure_node_pools(self, ctx: ClusterContext, spec: ClusterSpec) -> dict[str, Any]:
        cluster = str(needs(ctx, "cluster", "name"))
        role = str(needs(ctx, "iam", "node_role_arn"))
        subnets = [str(s) for s in needs(ctx, "network", "subnet_ids")]
        groups = await gather(
            [self._ensure_nodegroup(ctx, spec, pool, cluster, role, subnets) for pool in spec.node_pools]
        )
        return self._pools_report(cluster, spec, groups)

    @staticmethod
    def _pools_report(cluster: str, spec: ClusterSpec, groups: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "cluster_name": cluster,
            "node_pools": {pool.name: ng["nodegroupArn"] for pool, ng in zip(spec.node_pools, groups, strict=True)},
            "nodegroups": {
                pool.name: {
                    "name": ng["nodegroupName"],
                    "capacity_type": ng.get("capacityType"),
                    "instance_types": ng.get("instanceTypes"),
                    "scaling": ng.get("scalingConfig"),
                }
                for pool, ng in zip(spec.node_pools, groups, strict=True)
            },
        }

    async def delete_node_pools(self, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        """Every node group of the cluster that carries this cluster's id tag (covers one whose create was
        never recorded); the others (added by someone else) are left alone."""
        region, cid = ctx.location.region, ctx.cluster_id
        cluster = str((resources or {}).get("cluster_name") or AwsNames(cid).cluster)
        try:
            names = await self.api.pages("eks", region, "list_nodegroups", "nodegroups", clusterName=cluster)
        except ResourceNotFoundError:
            return
        await gather([self._delete_nodegroup(region, cid, cluster, str(n)) for n in names])

    async def _delete_nodegroup(self, region: str, cid: str, cluster: str, name: str) -> None:
        ng = await self._describe_nodegroup(region, cluster, name)
        if ng is None:
            return
        if not is_ours(tag_dict(ng.get("tags")), cid):
            log.warning("node group %s/%s is not tagged for %s: leaving it alone", cluster, name, cid)
            return
        if ng.get("status") != "DELETING":
            try:
                await self.api.call("eks", region, "delete_nodegroup", clusterName=cluster, nodegroupName=name)
            except ResourceNotFoundError:
                return

        async def gone() -> tuple[bool, None]:
            left = await self._describe_nodegroup(region, cluster, name)
            if left is not None and left.get("status") == "DELETE_FAILED":
                raise TransientCloudError("DeleteFailed", f"node group {name} failed to delete: {_issues(left)}")
            return left is None, None

        await self.waiter.until(f"node group {cluster}/{name} deleted", gone)
