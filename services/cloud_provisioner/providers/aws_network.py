"""The `network` step on AWS: VPC, subnets across the region's AZs, gateways, route tables, security group.

Layout (see aws_mapping.subnet_plan): one cluster subnet per AZ (up to three). Without
`private-connectivity` they are public (internet gateway route, public IPs on launch). With it,
they are private and route to the internet through one NAT gateway, which sits in a small
public subnet behind the internet gateway (a NAT gateway needs one). Every resource is created
with its tags in the same call (TagSpecifications), so a crash right after a create leaves
something the next attempt finds by our cluster-id tag and `Name`, never an orphan.

A bring-your-own (byon) network never reaches this module: the core adopts it, and the
delete sweep below only ever finds resources carrying this cluster's id tag.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from services.cloud_provisioner.providers.aws_api import AwsApi, Waiter, aws_code
from services.cloud_provisioner.providers.aws_mapping import (
    MIN_ZONES,
    VPC_CIDR,
    AwsNames,
    SubnetPlan,
    Tier,
    choose_zones,
    client_token,
    named,
    private_connectivity,
    subnet_plan,
    subnet_tags,
    tag_specifications,
)
from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    CloudError,
    ClusterContext,
    ResourceNotFoundError,
    TerminalCloudError,
)
from services.cloud_provisioner.providers.base import gather_calls as gather

log = logging.getLogger("flotilla.cloud_provisioner.aws")

ALIVE_NAT = ("pending", "available")


def _filters(cluster_id: str, name: str | None = None, **more: str) -> list[dict[str, Any]]:
    out = [{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster_id]}]
    if name is not None:
        out.append({"Name": "tag:Name", "Values": [name]})
    out.extend({"Name": k.replace("_", "-"), "Values": [v]} for k, v in more.items())
    return out


async def _gone(call: Awaitable[Any]) -> None:
    """A delete where "not found" means done."""
    try:
        await call
    except ResourceNotFoundError:
        pass


class AwsNetwork:
    def __init__(self, api: AwsApi, waiter: Waiter) -> None:
        self.api = api
        self.waiter = waiter

    async def _ec2(self, region: str, op: str, **kwargs: Any) -> dict[str, Any]:
        return await self.api.call("ec2", region, op, **kwargs)

    async def _find(
        self,
        region: str,
        op: str,
        key: str,
        filters: list[dict[str, Any]],
        id_key: str,
        alive: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        found = await self.api.pages("ec2", region, op, key, Filters=filters)
        return sorted((r for r in found if alive is None or alive(r)), key=lambda r: str(r[id_key]))

    async def _ensure(
        self,
        region: str,
        what: str,
        *,
        op: str,
        key: str,
        id_key: str,
        filters: list[dict[str, Any]],
        create: Callable[[], Awaitable[dict[str, Any]]],
        undo: Callable[[str], Awaitable[Any]] | None = None,
        alive: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """Adopt the resource found by our tags, else create it (tags in the create call).

        `undo` is for creates without a client token: two replicas racing may both create; both then see
        both and keep the smallest id, and the loser deletes its own, still empty, copy. (EC2's list calls
        are eventually consistent, so this narrows the race rather than closing it.)
        """
        found = await self._find(region, op, key, filters, id_key, alive)
        if found:
            if len(found) > 1:
                log.warning("%d %ss match %s: adopting %s", len(found), what, filters, found[0][id_key])
            return found[0]
        made = await create()
        if undo is None:
            return made
        again = {str(r[id_key]): r for r in await self._find(region, op, key, filters, id_key, alive)}
        again.setdefault(str(made[id_key]), made)
        winner = min(again)
        if winner != made[id_key]:
            log.warning("another worker created %s %s at the same time: keeping %s", what, made[id_key], winner)
            await _gone(undo(str(made[id_key])))
        return again[winner]

    # ------------------------------------------------------------------ ensure
    async def ensure(self, ctx: ClusterContext) -> dict[str, Any]:
        region, cid = ctx.location.region, ctx.cluster_id
        names = AwsNames(cid)
        tags = ctx.tags("network")
        private = private_connectivity(ctx.spec)
        zones = choose_zones(await self.api.pages("ec2", region, "describe_availability_zones", "AvailabilityZones"))
        if len(zones) < MIN_ZONES:
            raise TerminalCloudError(
                "UnsupportedAvailabilityZone",
                f"{region} has {len(zones)} usable availability zone(s); EKS needs {MIN_ZONES}",
            )

        vpc = await self._vpc(region, cid, names, tags)
        vpc_id = str(vpc["VpcId"])
        igw_id = await self._internet_gateway(region, cid, names, tags, vpc_id)
        plan = subnet_plan(cid, zones, private)
        subnets = await gather([self._subnet(region, cid, vpc_id, p, names.cluster, tags) for p in plan])
        by_tier: dict[Tier, list[str]] = {"public": [], "private": []}
        for p, s in zip(plan, subnets, strict=True):
            by_tier[p.tier].append(str(s["SubnetId"]))
        cluster_subnets = [str(s["SubnetId"]) for p, s in zip(plan, subnets, strict=True) if p.for_cluster]

        public_rt = await self._route_table(
            region,
            cid,
            vpc_id,
            names.route_table("public"),
            tags,
            ctx.client_token("network", "rt-public"),
            {"GatewayId": igw_id},
            by_tier["public"],
        )
        route_tables = [public_rt]
        nat_id: str | None = None
        if private:
            nat_subnet = next(str(s["SubnetId"]) for p, s in zip(plan, subnets, strict=True) if not p.for_cluster)
            nat_id = await self._nat_gateway(region, ctx, names, tags, vpc_id, nat_subnet)
            route_tables.append(
                await self._route_table(
                    region,
                    cid,
                    vpc_id,
                    names.route_table("private"),
                    tags,
                    ctx.client_token("network", "rt-private"),
                    {"NatGatewayId": nat_id},
                    by_tier["private"],
                )
            )
        sg_id = await self._security_group(region, cid, vpc_id, names, tags)
        return {
            "network_id": vpc_id,
            "subnet_ids": cluster_subnets,
            "owned": True,
            "region": region,
            "cidr": VPC_CIDR,
            "availability_zones": zones,
            "private": private,
            "public_subnet_ids": by_tier["public"],
            "private_subnet_ids": by_tier["private"],
            "internet_gateway_id": igw_id,
            "nat_gateway_id": nat_id,
            "route_table_ids": route_tables,
            "security_group_id": sg_id,
        }

    async def _vpc(self, region: str, cid: str, names: AwsNames, tags: dict[str, str]) -> dict[str, Any]:
        async def create() -> dict[str, Any]:
            out = await self._ec2(
                region,
                "create_vpc",
                CidrBlock=VPC_CIDR,
                TagSpecifications=tag_specifications("vpc", named(tags, names.vpc)),
            )
            return dict(out["Vpc"])

        vpc = await self._ensure(
            region,
            "VPC",
            op="describe_vpcs",
            key="Vpcs",
            id_key="VpcId",
            filters=_filters(cid, names.vpc),
            create=create,
            undo=lambda i: self._ec2(region, "delete_vpc", VpcId=i),
            alive=lambda v: v.get("State") in ("pending", "available"),
        )
        vpc_id = str(vpc["VpcId"])

        async def available() -> tuple[bool, dict[str, Any]]:
            try:
                found = (await self._ec2(region, "describe_vpcs", VpcIds=[vpc_id]))["Vpcs"]
            except ResourceNotFoundError:
                return False, vpc  # just created: not visible everywhere yet
            return bool(found and found[0].get("State") == "available"), found[0] if found else vpc

        vpc = await self.waiter.until(f"VPC {vpc_id}", available)
        # EKS needs DNS in the VPC (private endpoint resolution, node registration). Read first: EC2's
        # mutating calls have the tighter rate limits, and a re-run should not need any.
        for attr in ("EnableDnsSupport", "EnableDnsHostnames"):
            current = await self._ec2(
                region, "describe_vpc_attribute", VpcId=vpc_id, Attribute=attr[0].lower() + attr[1:]
            )
            if not current.get(attr, {}).get("Value"):
                await self._ec2(region, "modify_vpc_attribute", VpcId=vpc_id, **{attr: {"Value": True}})
        return vpc

    async def _internet_gateway(self, region: str, cid: str, names: AwsNames, tags: dict[str, str], vpc_id: str) -> str:
        async def create() -> dict[str, Any]:
            spec = tag_specifications("internet-gateway", named(tags, names.internet_gateway))
            return dict((await self._ec2(region, "create_internet_gateway", TagSpecifications=spec))["InternetGateway"])

        igw = await self._ensure(
            region,
            "internet gateway",
            op="describe_internet_gateways",
            key="InternetGateways",
            id_key="InternetGatewayId",
            filters=_filters(cid, names.internet_gateway),
            create=create,
            undo=lambda i: self._ec2(region, "delete_internet_gateway", InternetGatewayId=i),
        )
        igw_id = str(igw["InternetGatewayId"])
        if not any(a.get("VpcId") == vpc_id for a in igw.get("Attachments", [])):
            try:
                await self._ec2(region, "attach_internet_gateway", InternetGatewayId=igw_id, VpcId=vpc_id)
            except CloudError as exc:
                if aws_code(exc) != "Resource.AlreadyAssociated":
                    raise
        return igw_id

    async def _subnet(
        self, region: str, cid: str, vpc_id: str, p: SubnetPlan, cluster_name: str, tags: dict[str, str]
    ) -> dict[str, Any]:
        async def create() -> dict[str, Any]:
            spec = tag_specifications("subnet", named({**tags, **subnet_tags(p.tier, cluster_name)}, p.name))
            out = await self._ec2(
                region, "create_subnet", VpcId=vpc_id, CidrBlock=p.cidr, AvailabilityZone=p.zone, TagSpecifications=spec
            )
            return dict(out["Subnet"])

        # No undo: a second create of the same CIDR fails (InvalidSubnet.Conflict, retried), so no duplicate.
        subnet = await self._ensure(
            region,
            "subnet",
            op="describe_subnets",
            key="Subnets",
            id_key="SubnetId",
            filters=_filters(cid, p.name, vpc_id=vpc_id),
            create=create,
        )
        if p.tier == "public" and p.for_cluster and not subnet.get("MapPublicIpOnLaunch"):
            # Nodes in public subnets need a public IP to reach the EKS endpoint and registries.
            await self._ec2(
                region, "modify_subnet_attribute", SubnetId=subnet["SubnetId"], MapPublicIpOnLaunch={"Value": True}
            )
        return subnet

    async def _route_table(
        self,
        region: str,
        cid: str,
        vpc_id: str,
        name: str,
        tags: dict[str, str],
        token: str,
        target: dict[str, str],
        subnet_ids: list[str],
    ) -> str:
        async def create() -> dict[str, Any]:
            out = await self._ec2(
                region,
                "create_route_table",
                VpcId=vpc_id,
                ClientToken=client_token(token),
                TagSpecifications=tag_specifications("route-table", named(tags, name)),
            )
            return dict(out["RouteTable"])

        # moto ignores CreateRouteTable's ClientToken, so the by-tag undo below still matters there.
        rt = await self._ensure(
            region,
            "route table",
            op="describe_route_tables",
            key="RouteTables",
            id_key="RouteTableId",
            filters=_filters(cid, name, vpc_id=vpc_id),
            create=create,
            undo=lambda i: self._ec2(region, "delete_route_table", RouteTableId=i),
        )
        rt_id = str(rt["RouteTableId"])
        default = next((r for r in rt.get("Routes", []) if r.get("DestinationCidrBlock") == "0.0.0.0/0"), None)
        ((key, value),) = target.items()
        if default is None:
            try:
                await self._ec2(region, "create_route", RouteTableId=rt_id, DestinationCidrBlock="0.0.0.0/0", **target)
            except CloudError as exc:
                if aws_code(exc) != "RouteAlreadyExists":
                    raise
                default = {}
        if default is not None and (default.get(key) != value or default.get("State") == "blackhole"):
            await self._ec2(region, "replace_route", RouteTableId=rt_id, DestinationCidrBlock="0.0.0.0/0", **target)
        associated = {a.get("SubnetId") for a in rt.get("Associations", [])}
        for subnet_id in subnet_ids:
            if subnet_id not in associated:
                await self._associate(region, rt_id, subnet_id)
        return rt_id

    async def _associate(self, region: str, rt_id: str, subnet_id: str) -> None:
        try:
            await self._ec2(region, "associate_route_table", RouteTableId=rt_id, SubnetId=subnet_id)
        except CloudError as exc:
            if aws_code(exc) != "Resource.AlreadyAssociated":
                raise
            # Associated with another table (ours, from an older layout): move it.
            tables = await self.api.pages(
                "ec2",
                region,
                "describe_route_tables",
                "RouteTables",
                Filters=[{"Name": "association.subnet-id", "Values": [subnet_id]}],
            )
            for table in tables:
                for assoc in table.get("Associations", []):
                    if assoc.get("SubnetId") == subnet_id and table["RouteTableId"] != rt_id:
                        await self._ec2(
                            region,
                            "replace_route_table_association",
                            RouteTableId=rt_id,
                            AssociationId=assoc["RouteTableAssociationId"],
                        )

    async def _nat_gateway(
        self, region: str, ctx: ClusterContext, names: AwsNames, tags: dict[str, str], vpc_id: str, subnet_id: str
    ) -> str:
        cid = ctx.cluster_id

        async def allocate() -> dict[str, Any]:
            return await self._ec2(
                region,
                "allocate_address",
                Domain="vpc",
                TagSpecifications=tag_specifications("elastic-ip", named(tags, names.nat_address)),
            )

        eip = await self._ensure(
            region,
            "elastic IP",
            op="describe_addresses",
            key="Addresses",
            id_key="AllocationId",
            filters=_filters(cid, names.nat_address),
            create=allocate,
            undo=lambda i: self._ec2(region, "release_address", AllocationId=i),
        )

        async def create() -> dict[str, Any]:
            out = await self._ec2(
                region,
                "create_nat_gateway",
                SubnetId=subnet_id,
                AllocationId=eip["AllocationId"],
                ConnectivityType="public",
                ClientToken=client_token(ctx.client_token("network", "nat")),
                TagSpecifications=tag_specifications("natgateway", named(tags, names.nat_gateway)),
            )
            return dict(out["NatGateway"])

        # The ClientToken makes a retried create return the first one (moto ignores it; the lookup covers that).
        nat = await self._ensure(
            region,
            "NAT gateway",
            op="describe_nat_gateways",
            key="NatGateways",
            id_key="NatGatewayId",
            filters=_filters(cid, names.nat_gateway, vpc_id=vpc_id),
            create=create,
            alive=lambda n: n.get("State") in ALIVE_NAT,
        )
        nat_id = str(nat["NatGatewayId"])

        async def available() -> tuple[bool, str]:
            try:
                found = (await self._ec2(region, "describe_nat_gateways", NatGatewayIds=[nat_id]))["NatGateways"]
            except ResourceNotFoundError:
                return False, nat_id
            state = found[0].get("State") if found else "pending"
            if state == "failed":
                raise TerminalCloudError(
                    "NatGatewayFailed",
                    f"NAT gateway {nat_id} failed: {found[0].get('FailureMessage', 'no reason given')}",
                )
            if state in ("deleting", "deleted"):
                raise TerminalCloudError("NatGatewayDeleted", f"NAT gateway {nat_id} is {state}")
            return state == "available", nat_id

        return await self.waiter.until(f"NAT gateway {nat_id}", available)

    async def _security_group(self, region: str, cid: str, vpc_id: str, names: AwsNames, tags: dict[str, str]) -> str:
        filters = _filters(cid, vpc_id=vpc_id, group_name=names.security_group)

        async def create() -> dict[str, Any]:
            try:
                out = await self._ec2(
                    region,
                    "create_security_group",
                    GroupName=names.security_group,
                    VpcId=vpc_id,
                    Description=f"Flotilla: EKS cluster {cid} (control plane and nodes)",
                    TagSpecifications=tag_specifications("security-group", named(tags, names.security_group)),
                )
            except CloudError as exc:
                if aws_code(exc) != "InvalidGroup.Duplicate":
                    raise
                found = await self._find(region, "describe_security_groups", "SecurityGroups", filters, "GroupId")
                if not found:
                    raise
                return found[0]
            return {"GroupId": out["GroupId"], "IpPermissions": []}

        # Group names are unique per VPC: no duplicate can exist, so no undo.
        sg = await self._ensure(
            region,
            "security group",
            op="describe_security_groups",
            key="SecurityGroups",
            id_key="GroupId",
            filters=filters,
            create=create,
        )
        sg_id = str(sg["GroupId"])
        # Control plane and nodes talk to each other freely inside the group.
        if not any(
            p.get("IpProtocol") == "-1" and any(g.get("GroupId") == sg_id for g in p.get("UserIdGroupPairs", []))
            for p in sg.get("IpPermissions", [])
        ):
            try:
                await self._ec2(
                    region,
                    "authorize_security_group_ingress",
                    GroupId=sg_id,
                    IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg_id}]}],
                )
            except CloudError as exc:
                if aws_code(exc) != "InvalidPermission.Duplicate":
                    raise
        return sg_id

    # ------------------------------------------------------------------ delete
    async def delete(self, ctx: ClusterContext) -> None:
        """Everything carrying this cluster's id tag, in dependency order; not found = done.

        Found by tag, not by the reported ids, so it also removes what a create left behind before its
        result was recorded, and it can never touch a resource we did not tag (a byon network).
        """
        region, cid = ctx.location.region, ctx.cluster_id
        ours = _filters(cid)

        nats = [
            n
            for n in await self.api.pages("ec2", region, "describe_nat_gateways", "NatGateways", Filters=ours)
            if n.get("State") in (*ALIVE_NAT, "deleting")
        ]
        for nat in nats:
            if nat.get("State") != "deleting":
                await _gone(self._ec2(region, "delete_nat_gateway", NatGatewayId=nat["NatGatewayId"]))
        if nats:
            ids = [n["NatGatewayId"] for n in nats]

            async def nats_gone() -> tuple[bool, None]:
                try:
                    left = (await self._ec2(region, "describe_nat_gateways", NatGatewayIds=ids))["NatGateways"]
                except ResourceNotFoundError:
                    return True, None
                return all(n.get("State") in ("deleted", "failed") for n in left), None

            await self.waiter.until(f"NAT gateways {ids} deleted", nats_gone)

        for address in await self.api.pages("ec2", region, "describe_addresses", "Addresses", Filters=ours):
            # Still associated right after the NAT gateway went: InvalidIPAddress.InUse, retried.
            await _gone(self._ec2(region, "release_address", AllocationId=address["AllocationId"]))

        for igw in await self.api.pages("ec2", region, "describe_internet_gateways", "InternetGateways", Filters=ours):
            for attachment in igw.get("Attachments", []):
                try:
                    await self._ec2(
                        region,
                        "detach_internet_gateway",
                        InternetGatewayId=igw["InternetGatewayId"],
                        VpcId=attachment["VpcId"],
                    )
                except CloudError as exc:
                    if aws_code(exc) != "Gateway.NotAttached" and not isinstance(exc, ResourceNotFoundError):
                        raise
            await _gone(self._ec2(region, "delete_internet_gateway", InternetGatewayId=igw["InternetGatewayId"]))

        for rt in await self.api.pages("ec2", region, "describe_route_tables", "RouteTables", Filters=ours):
            if any(a.get("Main") for a in rt.get("Associations", [])):
                continue  # the VPC's main table goes with the VPC (we never tag it, but be safe)
            for assoc in rt.get("Associations", []):
                await _gone(
                    self._ec2(region, "disassociate_route_table", AssociationId=assoc["RouteTableAssociationId"])
                )
            await _gone(self._ec2(region, "delete_route_table", RouteTableId=rt["RouteTableId"]))

        for subnet in await self.api.pages("ec2", region, "describe_subnets", "Subnets", Filters=ours):
            await _gone(self._ec2(region, "delete_subnet", SubnetId=subnet["SubnetId"]))

        for sg in await self.api.pages("ec2", region, "describe_security_groups", "SecurityGroups", Filters=ours):
            if sg.get("GroupName") != "default":
                await _gone(self._ec2(region, "delete_security_group", GroupId=sg["GroupId"]))

        for vpc in await self.api.pages("ec2", region, "describe_vpcs", "Vpcs", Filters=ours):
            # DependencyViolation (e.g. ENIs EKS has not released yet) is retryable: tried again later.
            await _gone(self._ec2(region, "delete_vpc", VpcId=vpc["VpcId"]))
