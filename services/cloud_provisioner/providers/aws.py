"""The `aws` driver: provisions a cluster's steps with boto3 (EC2, IAM, EKS, Kinesis).

Steps (shared.events.models.PROVISION_STEPS), each an *ensure* that looks up by deterministic
name and our `flotilla.dev/cluster-id` tag, adopts what exists, converges what the API can
change in place and creates only what is missing (with the API's client request token):
- network    VPC, subnets across the region's AZs, internet gateway (+ NAT gateway and private
             route table with `private-connectivity`), a security group   (aws_network.py)
- iam        EKS cluster role and node role with the AWS-managed policies attached
- cluster    EKS cluster: version, endpoint access, control-plane logging  (aws_eks.py)
- node_pools one managed node group per pool: SPOT, labels, taints, scaling  (aws_eks.py)
- log_stream a Kinesis data stream (on-demand)
In-place updates (`update`): the node groups' scaling, labels and taints (UpdateNodegroupConfig) and the
EKS cluster's tags (TagResource / UntagResource). A missing node group, or one whose instance types or
capacity type differ, is NotInPlace (a rotation's job). Tags of the network, IAM roles, stream and node
groups stay as created (moto cannot tag node groups after the fact, so that part is untested and left out).
Deletes run in reverse (the core orders them); "not found" is done; nothing without our tag is
ever deleted. A bring-your-own network is adopted by the core and never reaches `delete`.

The pure request mapping is in aws_mapping.py; boto3-in-threads and the error classification
(`classify`) in aws_api.py. Credentials: boto3's default chain (env, profile, IMDS, IRSA ...).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from typing import Any

import boto3

from services.cloud_provisioner.providers.aws_api import ALREADY_EXISTS_CODES, AwsApi, Waiter, aws_code, classify
from services.cloud_provisioner.providers.aws_eks import AwsEks, check_ours, is_ours
from services.cloud_provisioner.providers.aws_mapping import (
    AwsNames,
    RolePlan,
    create_role_request,
    named,
    role_plans,
    stream_request,
    tag_dict,
    trust_policy,
)
from services.cloud_provisioner.providers.aws_network import AwsNetwork
from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    CloudError,
    ClusterContext,
    ResourceNotFoundError,
    TransientCloudError,
    Updated,
    managed_spec,
    unchanged,
)
from shared.config import Settings
from shared.events import ClusterSpec
from shared.events.models import ProvisionStep

log = logging.getLogger("flotilla.cloud_provisioner.aws")

__all__ = ["AwsProvider", "build", "classify"]


def _spec(ctx: ClusterContext) -> ClusterSpec:
    return managed_spec(ctx, "EKS")


def _policy_document(doc: Any) -> Any:
    """IAM returns trust policies URL-encoded (boto3 usually decodes them to a dict already)."""
    if isinstance(doc, str):
        return json.loads(urllib.parse.unquote(doc))
    return doc


class AwsProvider:
    """`CloudProvider` on AWS. `session`: a boto3 Session (default: the standard credential chain);
    `endpoint_url`: one endpoint for every service (tests: moto's server; or a private endpoint)."""

    name = "aws"

    def __init__(
        self,
        session: boto3.Session | None = None,
        *,
        endpoint_url: str | None = None,
        poll_s: float = 5.0,
        wait_timeout_s: float = 480.0,
        max_attempts: int = 5,
    ) -> None:
        self.api = AwsApi(session, endpoint_url=endpoint_url, max_attempts=max_attempts)
        waiter = Waiter(poll_s, wait_timeout_s)
        self.waiter = waiter
        self.network = AwsNetwork(self.api, waiter)
        self.eks = AwsEks(self.api, waiter)

    # ------------------------------------------------------------------ the port
    async def ensure(self, step: ProvisionStep, ctx: ClusterContext) -> dict[str, Any]:
        spec = _spec(ctx)
        match step:
            case "network":
                if "byon" in spec.features and spec.network is not None:
                    # The core adopts a byon network itself; answer the same if asked: nothing created.
                    net = spec.network
                    return {
                        "network_id": net.vpc_id or net.network_id or net.vnet_id or "",
                        "subnet_ids": list(net.subnet_ids),
                        "owned": False,
                    }
                return await self.network.ensure(ctx)
            case "iam":
                return await self._ensure_iam(ctx)
            case "cluster":
                return await self.eks.ensure_cluster(ctx, spec)
            case "node_pools":
                return await self.eks.ensure_node_pools(ctx, spec)
            case "log_stream":
                return await self._ensure_log_stream(ctx)
        raise ValueError(f"unknown step {step!r}")

    async def update(self, step: ProvisionStep, ctx: ClusterContext) -> Updated:
        spec = _spec(ctx)
        match step:
            case "cluster":
                return await self.eks.update_cluster_tags(ctx)
            case "node_pools":
                return await self.eks.update_node_pools(ctx, spec)
        return unchanged(step, ctx)

    async def delete(self, step: ProvisionStep, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        if resources is not None and resources.get("owned") is False:
            return  # adopted (byon): never ours to delete
        match step:
            case "network":
                await self.network.delete(ctx)
            case "iam":
                await self._delete_iam(ctx)
            case "cluster":
                await self.eks.delete_cluster(ctx, resources)
            case "node_pools":
                await self.eks.delete_node_pools(ctx, resources)
            case "log_stream":
                await self._delete_log_stream(ctx, resources)
            case _:
                raise ValueError(f"unknown step {step!r}")

    # ------------------------------------------------------------------ iam
    async def _get_role(self, region: str, name: str) -> dict[str, Any] | None:
        try:
            role = dict((await self.api.call("iam", region, "get_role", RoleName=name))["Role"])
        except ResourceNotFoundError:
            return None
        if "Tags" not in role:
            role["Tags"] = await self.api.pages("iam", region, "list_role_tags", "Tags", RoleName=name)
        return role

    async def _ensure_role(self, ctx: ClusterContext, plan: RolePlan) -> dict[str, Any]:
        region, cid = ctx.location.region, ctx.cluster_id
        role = await self._get_role(region, plan.name)
        if role is None:
            try:
                request = create_role_request(plan, named(ctx.tags("iam"), plan.name))
                role = dict((await self.api.call("iam", region, "create_role", **request))["Role"])
                role.setdefault("Tags", request["Tags"])
                log.info("created IAM role %s", plan.name, extra={"cluster_id": cid})
            except CloudError as exc:
                if aws_code(exc) not in ALREADY_EXISTS_CODES:
                    raise
                role = await self._get_role(region, plan.name)
                if role is None:
                    raise TransientCloudError(
                        "IamPropagation", f"IAM role {plan.name} exists but is not visible yet"
                    ) from exc
        check_ours(f"IAM role {plan.name}", tag_dict(role.get("Tags")), cid)
        if _policy_document(role.get("AssumeRolePolicyDocument")) != json.loads(trust_policy(plan.service)):
            await self.api.call(
                "iam",
                region,
                "update_assume_role_policy",
                RoleName=plan.name,
                PolicyDocument=trust_policy(plan.service),
            )
        attached = {
            p["PolicyArn"]
            for p in await self.api.pages(
                "iam", region, "list_attached_role_policies", "AttachedPolicies", RoleName=plan.name
            )
        }
        for arn in plan.policy_arns:
            if arn not in attached:  # attaching is idempotent anyway; skipping saves calls on re-runs
                await self.api.call("iam", region, "attach_role_policy", RoleName=plan.name, PolicyArn=arn)
        return role

    async def _ensure_iam(self, ctx: ClusterContext) -> dict[str, Any]:
        plans = role_plans(ctx.cluster_id, ctx.location.region)
        roles = {plan.kind: await self._ensure_role(ctx, plan) for plan in plans}
        cluster, node = roles["cluster"], roles["node"]
        return {
            "role_id": cluster.get("RoleId"),
            "role_name": cluster["RoleName"],
            "cluster_role_name": cluster["RoleName"],
            "cluster_role_arn": cluster["Arn"],
            "node_role_name": node["RoleName"],
            "node_role_arn": node["Arn"],
            "policy_arns": {plan.kind: list(plan.policy_arns) for plan in plans},
        }

    async def _delete_iam(self, ctx: ClusterContext) -> None:
        region, cid = ctx.location.region, ctx.cluster_id
        for plan in role_plans(cid, region):
            role = await self._get_role(region, plan.name)
            if role is None:
                continue
            if not is_ours(tag_dict(role.get("Tags")), cid):
                log.warning("IAM role %s is not tagged for %s: leaving it alone", plan.name, cid)
                continue
            # A role can only go once nothing hangs on it (DeleteConflict otherwise, retried).
            for profile in await self.api.pages(
                "iam", region, "list_instance_profiles_for_role", "InstanceProfiles", RoleName=plan.name
            ):
                await self._gone(
                    self.api.call(
                        "iam",
                        region,
                        "remove_role_from_instance_profile",
                        InstanceProfileName=profile["InstanceProfileName"],
                        RoleName=plan.name,
                    )
                )
            for policy in await self.api.pages(
                "iam", region, "list_attached_role_policies", "AttachedPolicies", RoleName=plan.name
            ):
                await self._gone(
                    self.api.call(
                        "iam", region, "detach_role_policy", RoleName=plan.name, PolicyArn=policy["PolicyArn"]
                    )
                )
            for name in await self.api.pages("iam", region, "list_role_policies", "PolicyNames", RoleName=plan.name):
                await self._gone(
                    self.api.call("iam", region, "delete_role_policy", RoleName=plan.name, PolicyName=name)
                )
            await self._gone(self.api.call("iam", region, "delete_role", RoleName=plan.name))

    @staticmethod
    async def _gone(call: Any) -> None:
        try:
            await call
        except ResourceNotFoundError:
            pass

    # ------------------------------------------------------------------ log stream (Kinesis)
    async def _describe_stream(self, region: str, name: str) -> dict[str, Any] | None:
        try:
            out = await self.api.call("kinesis", region, "describe_stream_summary", StreamName=name)
        except ResourceNotFoundError:
            return None
        return dict(out["StreamDescriptionSummary"])

    async def _stream_tags(self, region: str, name: str) -> dict[str, str]:
        return tag_dict(await self.api.pages("kinesis", region, "list_tags_for_stream", "Tags", StreamName=name))

    async def _ensure_log_stream(self, ctx: ClusterContext) -> dict[str, Any]:
        region, cid = ctx.location.region, ctx.cluster_id
        name = AwsNames(cid).log_stream
        tags = named(ctx.tags("log_stream"), name)
        if await self._describe_stream(region, name) is None:
            try:
                await self.api.call("kinesis", region, "create_stream", **stream_request(name, tags))
                log.info("created Kinesis stream %s", name, extra={"cluster_id": cid})
            except CloudError as exc:
                if aws_code(exc) not in ALREADY_EXISTS_CODES:
                    raise
        have = await self._stream_tags(region, name)
        if TAG_CLUSTER not in have:
            # Kinesis applies CreateStream's Tags atomically, but moto ignores them, so tag afterwards. A stream
            # with exactly our deterministic name (it embeds the cluster id) and no owner tag is our own create
            # that stopped before tagging; one tagged for another cluster is refused below.
            missing = sorted((k, v) for k, v in tags.items() if have.get(k) != v)
            for i in range(0, len(missing), 10):  # AddTagsToStream takes at most 10 tags per call
                await self.api.call(
                    "kinesis", region, "add_tags_to_stream", StreamName=name, Tags=dict(missing[i : i + 10])
                )
            have = await self._stream_tags(region, name)
        check_ours(f"Kinesis stream {name}", have, cid)

        async def active() -> tuple[bool, dict[str, Any]]:
            summary = await self._describe_stream(region, name)
            if summary is None:
                return False, {}
            if summary.get("StreamStatus") == "DELETING":
                raise TransientCloudError("ResourceBeingDeleted", f"Kinesis stream {name} is being deleted")
            return summary.get("StreamStatus") in ("ACTIVE", "UPDATING"), summary

        summary = await self.waiter.until(f"Kinesis stream {name} ACTIVE", active)
        return {
            "log_stream_id": summary["StreamARN"],
            "name": name,
            "arn": summary["StreamARN"],
            "region": region,
            "mode": summary.get("StreamModeDetails", {}).get("StreamMode"),
        }

    async def _delete_log_stream(self, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        region, cid = ctx.location.region, ctx.cluster_id
        name = str((resources or {}).get("name") or AwsNames(cid).log_stream)
        summary = await self._describe_stream(region, name)
        if summary is None:
            return
        if not is_ours(await self._stream_tags(region, name), cid):
            log.warning("Kinesis stream %s is not tagged for %s: leaving it alone", name, cid)
            return
        if summary.get("StreamStatus") != "DELETING":
            # Refused while CREATING/UPDATING (ResourceInUse, retried).
            await self._gone(
                self.api.call("kinesis", region, "delete_stream", StreamName=name, EnforceConsumerDeletion=True)
            )

        async def gone() -> tuple[bool, None]:
            return await self._describe_stream(region, name) is None, None

        await self.waiter.until(f"Kinesis stream {name} deleted", gone)


def build(settings: Settings) -> AwsProvider:
    """The driver the registry uses when settings.cloud_drivers["aws"] == "real"."""
    # Give up waiting well inside the handler timeout: the retryable StillInProgress error lets the
    # next delivery pick the same (still creating) resource up again.
    return AwsProvider(
        endpoint_url=settings.aws_endpoint_url,
        poll_s=settings.cloud_poll_s,
        wait_timeout_s=max(1.0, min(480.0, settings.handler_timeout_s * 0.8)),
    )
