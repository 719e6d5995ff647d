"""The aws driver (boto3) against moto in server mode, through the provisioner service.

moto runs as a real HTTP endpoint (ThreadedMotoServer on a free port); boto3 reaches it through
a recording pass-through (tests/fakes/moto_server.Proxy) so the tests can count the API calls
that create something, also those made by a separate provisioner process. The provisioner
runs in-process on real nats-server and redis-server (or, for the crash test, as
`python -m services.cloud_provisioner` with FLOTILLA_CLOUD_DRIVERS={"aws": "real"}).

What moto does not do (see tests/fakes/moto_server.py) is not faked here: resources are ACTIVE
at once, so the waits run one probe; client request tokens are ignored by moto, so
idempotency rests on the driver's lookups, which is what these tests check.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from services.cloud_provisioner.app import DURABLE, SERVICE
from services.cloud_provisioner.providers import ProviderRegistry
from services.cloud_provisioner.providers.aws import AwsProvider
from services.cloud_provisioner.providers.aws_mapping import LOG_TYPES
from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    ClusterContext,
    NotInPlaceError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
)
from shared.bus import Bus
from shared.config import Settings
from shared.embedded import ServerProcess, free_port, service_env, start_service
from shared.events import Envelope, subjects, validate_clusterset
from shared.events.factory import payload_as
from shared.events.models import (
    PROVISION_STEPS,
    ClusterProvisioned,
    ClusterProvisioningFailed,
    ClusterRequested,
    ClusterResourcesUpdated,
)
from shared.service import ServiceContext
from tests.fakes.moto_server import Fault, MotoServer, Proxy, inventory, moto_server, proxy
from tests.helpers import (
    BYON,
    EXAMPLES,
    PLAIN,
    consumer_drained,
    fleet_events,
    from_planner,
    provisioner_service,
    request_envelope,
    retirement_envelope,
    wait_until,
)
from tests.unit.test_provisioner_core import changed_spec, update_requested, with_pool

REGION = "us-east-1"
# What one `modelserving` cluster (private-connectivity, us-east-1: zones a, b, c) is made of.
PRIVATE_CLUSTER = Counter(
    vpc=1,
    subnet=4,
    internet_gateway=1,
    route_table=2,
    security_group=1,
    elastic_ip=1,
    nat_gateway=1,
    iam_role=2,
    eks_cluster=1,
    nodegroup=1,
    log_stream=1,
)
PRIVATE_CREATES = Counter(
    CreateVpc=1,
    CreateInternetGateway=1,
    CreateSubnet=4,
    CreateRouteTable=2,
    CreateRoute=2,
    AllocateAddress=1,
    CreateNatGateway=1,
    CreateSecurityGroup=1,
    CreateRole=2,
    CreateCluster=1,
    CreateNodegroup=1,
    CreateStream=1,
)
# The bring-your-own example: no network of ours at all, three node groups.
BYON_CLUSTER = Counter(iam_role=2, eks_cluster=1, nodegroup=3, log_stream=1)
AWS_TYPES = {"Standard_D8s_v5": "m6i.2xlarge", "Standard_E8ds_v5": "r6id.2xlarge", "Standard_E8ads_v5": "r5ad.2xlarge"}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def aws(moto: MotoServer) -> MotoServer:
    moto.reset()
    return moto


@pytest.fixture
def recorder(aws: MotoServer) -> Iterator[Proxy]:
    with proxy(aws.url) as p:
        yield p


def make_provider(recorder: Proxy, session: boto3.Session | None = None) -> AwsProvider:
    sess = session or boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    return AwsProvider(sess, endpoint_url=recorder.url, poll_s=0.01, wait_timeout_s=10.0, max_attempts=2)


def provisioner(settings: Settings, provider: AwsProvider, max_deliver: int | None = None
                ) -> contextlib.AbstractAsyncContextManager[ServiceContext]:  # fmt: skip
    """The provisioner service in-process with the aws driver for the aws cloud."""
    return provisioner_service(settings, ProviderRegistry({"aws": provider}), max_deliver)


# ---------------------------------------------------------------- helpers
async def ours(bus: Bus, cluster_id: str | None = None) -> list[Envelope]:
    return await fleet_events(bus, source=SERVICE, aggregate=cluster_id)


async def wait_for_type(bus: Bus, event_type: str, cluster_ids: list[str], within: float = 30.0) -> None:
    async def done() -> bool:
        return set(cluster_ids) <= {e.subject for e in await ours(bus) if e.type == event_type}

    await wait_until(done, within)


async def provisioned(bus: Bus, cluster_id: str) -> ClusterProvisioned:
    [env] = [e for e in await ours(bus, cluster_id) if e.type == "ClusterProvisioned"]
    return ClusterProvisioned.model_validate(env.data)


def context(req: Envelope, resources: dict[str, dict[str, Any]] | None = None) -> ClusterContext:
    p = payload_as(req, ClusterRequested)
    return ClusterContext(p.cluster_id, p.clusterset, p.location, p.spec, dict(resources or {}))


def byon_request(vpc_id: str, subnet_ids: list[str], suffix: str = "0001") -> Envelope:
    """The dataeng example (bring your own network, spot executors with taints) adapted to AWS."""
    doc = copy.deepcopy(EXAMPLES[BYON])
    doc["metadata"]["name"] = "dataeng-staging-aws-us-east-1"
    doc["metadata"]["location"] = {"env": "staging", "cloud": "aws", "region": REGION}
    doc["spec"]["network"] = {"vpcId": vpc_id, "subnetIds": subnet_ids}
    for pool in doc["spec"]["nodePools"]:
        pool["instanceTypes"] = [AWS_TYPES[t] for t in pool["instanceTypes"]]
    clusterset, errors = validate_clusterset(doc)
    assert clusterset is not None, errors
    spec = clusterset.spec.cluster_spec()
    name = clusterset.metadata.name
    return from_planner(
        ClusterRequested(
            cluster_id=f"{name}-{suffix}",
            clusterset=name,
            location=clusterset.metadata.location,
            cluster_type=clusterset.metadata.cluster_type,
            generation=1,
            config_hash=spec.config_hash(),
            spec=spec,
            serial=0,
        )
    )


def user_network(aws: MotoServer) -> tuple[str, list[str]]:
    """A VPC and two subnets that somebody else owns (no Flotilla tag)."""
    ec2 = aws.client("ec2", REGION)
    tags = [{"ResourceType": "vpc", "Tags": [{"Key": "team", "Value": "dataeng"}, {"Key": "Name", "Value": "shared"}]}]
    vpc = ec2.create_vpc(CidrBlock="172.31.0.0/16", TagSpecifications=tags)["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(
            VpcId=vpc,
            CidrBlock=f"172.31.{i * 16}.0/20",
            AvailabilityZone=f"{REGION}{z}",
            TagSpecifications=[{"ResourceType": "subnet", "Tags": [{"Key": "team", "Value": "dataeng"}]}],
        )["Subnet"]["SubnetId"]
        for i, z in enumerate("ab")
    ]
    return vpc, subnets


def tags_of(item: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("Tags", [])}


async def reset_consumer(bus: Bus, ctx: ServiceContext) -> None:
    """Replay from the stream's first message with no ledger: only the state guards stand in the way."""
    ledger = [k async for k in ctx.redis.scan_iter(match=f"*{{{SERVICE}}}:ledger:*")]
    assert ledger
    await ctx.redis.delete(*ledger)
    await bus.js.delete_consumer(subjects.STREAM_FLEET, DURABLE)


# ---------------------------------------------------------------- tests
async def test_modelserving_provisions_on_eks_and_a_second_run_creates_nothing(
    settings: Settings, bus: Bus, aws: MotoServer, recorder: Proxy
) -> None:
    provider = make_provider(recorder)
    req = request_envelope(PLAIN)
    cid = req.subject
    async with provisioner(settings, provider):
        await bus.publish(req)
        await wait_for_type(bus, "ClusterProvisioned", [cid])
    events = await ours(bus, cid)
    assert [e.type for e in events] == ["ClusterResourceProvisioned"] * 5 + ["ClusterProvisioned"]
    assert [e.data["step"] for e in events[:5]] == list(PROVISION_STEPS)
    prov = await provisioned(bus, cid)
    assert prov.credential_ref == f"eks://{REGION}/{cid}"
    assert prov.endpoint.startswith("https://") and prov.endpoint.endswith(".eks.amazonaws.com")
    assert prov.ca_fingerprint.startswith("sha256:") and len(prov.ca_fingerprint) == 71
    assert prov.network.owned and prov.network.network_id.startswith("vpc-") and len(prov.network.subnet_ids) == 3

    # ---- read everything back from moto
    ec2, iam, eks = aws.client("ec2"), aws.client("iam"), aws.client("eks")
    [vpc] = ec2.describe_vpcs(VpcIds=[prov.network.network_id])["Vpcs"]
    assert vpc["CidrBlock"] == "10.0.0.0/16"
    assert (
        tags_of(vpc).items()
        >= {TAG_CLUSTER: cid, "Name": f"{cid}-vpc", "team": "serving", "costCenter": "4711"}.items()
    )
    assert ec2.describe_vpc_attribute(VpcId=vpc["VpcId"], Attribute="enableDnsHostnames")["EnableDnsHostnames"]["Value"]
    subnets = {
        s["SubnetId"]: s
        for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"]
    }
    cluster_subnets = [subnets[s] for s in prov.network.subnet_ids]
    assert sorted(s["AvailabilityZone"] for s in cluster_subnets) == ["us-east-1a", "us-east-1b", "us-east-1c"]
    assert all(tags_of(s)["kubernetes.io/role/internal-elb"] == "1" for s in cluster_subnets)
    [nat] = [
        n
        for n in ec2.describe_nat_gateways(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["NatGateways"]
        if n["State"] == "available"
    ]
    assert nat["SubnetId"] not in prov.network.subnet_ids and tags_of(subnets[nat["SubnetId"]])["Name"].startswith(
        f"{cid}-public-"
    )
    tables = ec2.describe_route_tables(Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [cid]}])["RouteTables"]
    routes = {tags_of(t)["Name"]: t for t in tables}
    private_default = next(r for r in routes[f"{cid}-private"]["Routes"] if r["DestinationCidrBlock"] == "0.0.0.0/0")
    assert private_default["NatGatewayId"] == nat["NatGatewayId"]
    assert {a["SubnetId"] for a in routes[f"{cid}-private"]["Associations"]} == set(prov.network.subnet_ids)
    [igw] = ec2.describe_internet_gateways(Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [cid]}])[
        "InternetGateways"
    ]
    assert igw["Attachments"][0]["VpcId"] == vpc["VpcId"]

    roles = prov.resources["iam"]
    for role, service, policies in (
        (roles["cluster_role_name"], "eks.amazonaws.com", {"AmazonEKSClusterPolicy"}),
        (
            roles["node_role_name"],
            "ec2.amazonaws.com",
            {"AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly"},
        ),
    ):
        got = iam.get_role(RoleName=role)["Role"]
        assert got["AssumeRolePolicyDocument"]["Statement"][0]["Principal"]["Service"] == service
        attached = iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]
        assert {p["PolicyName"] for p in attached} == policies
        assert {t["Key"]: t["Value"] for t in iam.list_role_tags(RoleName=role)["Tags"]}[TAG_CLUSTER] == cid

    cluster = eks.describe_cluster(name=cid)["cluster"]
    assert cluster["version"] == "1.30" and cluster["status"] == "ACTIVE"
    assert cluster["roleArn"] == roles["cluster_role_arn"]
    vpc_config = cluster["resourcesVpcConfig"]
    assert vpc_config["subnetIds"] == prov.network.subnet_ids
    assert (vpc_config["endpointPrivateAccess"], vpc_config["endpointPublicAccess"]) == (True, False)
    assert vpc_config["securityGroupIds"] == [prov.resources["network"]["security_group_id"]]
    assert cluster["logging"]["clusterLogging"] == [{"types": list(LOG_TYPES), "enabled": True}]
    assert cluster["tags"][TAG_CLUSTER] == cid and cluster["tags"]["team"] == "serving"
    ng = eks.describe_nodegroup(clusterName=cid, nodegroupName="default")["nodegroup"]
    assert ng["instanceTypes"] == ["m6i.2xlarge"] and ng["capacityType"] == "ON_DEMAND"
    assert ng["scalingConfig"] == {"minSize": 3, "maxSize": 3, "desiredSize": 3}
    assert ng["nodeRole"] == roles["node_role_arn"] and ng["subnets"] == prov.network.subnet_ids
    assert ng["tags"][TAG_CLUSTER] == cid
    stream = aws.client("kinesis").describe_stream_summary(StreamName=f"{cid}-logs")["StreamDescriptionSummary"]
    assert stream["StreamStatus"] == "ACTIVE" and stream["StreamModeDetails"]["StreamMode"] == "ON_DEMAND"
    assert inventory(aws) == {cid: PRIVATE_CLUSTER}
    assert recorder.count() == PRIVATE_CREATES

    # ---- again: the same request with a new event id, then a full replay without the ledger
    async with provisioner(settings, provider) as ctx:
        await bus.publish(request_envelope(PLAIN))
        await wait_until(lambda: consumer_drained(bus, DURABLE))
        await reset_consumer(bus, ctx)
    async with provisioner(settings, provider):
        await wait_until(lambda: consumer_drained(bus, DURABLE))
    assert [e.id for e in await ours(bus, cid)] == [e.id for e in events]
    assert recorder.count() == PRIVATE_CREATES and inventory(aws) == {cid: PRIVATE_CLUSTER}

    # ---- and the driver itself, asked again for every step (as after a crash before a commit):
    # it finds and adopts everything, reports the same, and changes nothing in the cloud.
    before = recorder.mutations()
    resources: dict[str, dict[str, Any]] = {}
    for step in PROVISION_STEPS:
        resources[step] = await provider.ensure(step, context(req, resources))
        assert resources[step] == prov.resources[step], step
    assert recorder.mutations() == before

    # ---- deprovision: nothing tagged with the cluster id is left
    async with provisioner(settings, provider):
        await bus.publish(retirement_envelope(req))
        await wait_for_type(bus, "ClusterDeprovisioned", [cid])
    steps = [e.data["step"] for e in await ours(bus, cid) if e.type == "ClusterResourceDeprovisioned"]
    assert steps == list(reversed(PROVISION_STEPS))
    assert inventory(aws) == {}
    assert not eks.list_clusters()["clusters"]


async def test_byon_dataeng_on_aws_spot_taints_convergence_and_the_network_is_left_alone(
    settings: Settings, bus: Bus, aws: MotoServer, recorder: Proxy
) -> None:
    provider = make_provider(recorder)
    vpc_id, subnet_ids = user_network(aws)
    ec2, eks = aws.client("ec2"), aws.client("eks")
    users_before = (ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"], ec2.describe_subnets(SubnetIds=subnet_ids)["Subnets"])
    byon, plain = byon_request(vpc_id, subnet_ids), request_envelope(PLAIN, "next-door")
    ids = [byon.subject, plain.subject]
    async with provisioner(settings, provider):
        for r in (byon, plain):
            await bus.publish(r)
        await wait_for_type(bus, "ClusterProvisioned", ids)
    assert inventory(aws) == {byon.subject: BYON_CLUSTER, plain.subject: PRIVATE_CLUSTER}
    prov = await provisioned(bus, byon.subject)
    assert prov.network.owned is False
    assert (prov.network.network_id, prov.network.subnet_ids) == (vpc_id, subnet_ids)

    cid = byon.subject
    cluster = eks.describe_cluster(name=cid)["cluster"]
    assert cluster["resourcesVpcConfig"]["subnetIds"] == subnet_ids
    assert cluster["resourcesVpcConfig"].get("securityGroupIds", []) == []  # we make no security group in their VPC
    assert (
        cluster["resourcesVpcConfig"]["endpointPrivateAccess"],
        cluster["resourcesVpcConfig"]["endpointPublicAccess"],
    ) == (False, True)
    groups = {
        n: eks.describe_nodegroup(clusterName=cid, nodegroupName=n)["nodegroup"]
        for n in eks.list_nodegroups(clusterName=cid)["nodegroups"]
    }
    assert set(groups) == {"infra", "spark-driver", "spark-executor"}
    executor = groups["spark-executor"]
    assert executor["capacityType"] == "SPOT"
    assert executor["instanceTypes"] == ["r6id.2xlarge", "r5ad.2xlarge"]
    assert executor["labels"] == {"purpose": "spark-executor"}
    assert executor["taints"] == [{"key": "purpose", "value": "spark-executor", "effect": "NO_SCHEDULE"}]
    assert executor["scalingConfig"] == {"minSize": 0, "maxSize": 300, "desiredSize": 0}
    assert executor["subnets"] == subnet_ids
    assert (groups["spark-driver"]["capacityType"], groups["spark-driver"]["scalingConfig"]) == (
        "ON_DEMAND",
        {"minSize": 0, "maxSize": 20, "desiredSize": 0},
    )
    assert groups["infra"]["scalingConfig"] == {"minSize": 1, "maxSize": 3, "desiredSize": 1}

    # ---- someone changes a node group by hand; ensuring the step again converges it in place
    eks.update_nodegroup_config(
        clusterName=cid,
        nodegroupName="spark-executor",
        scalingConfig={"minSize": 2, "maxSize": 5, "desiredSize": 4},
        labels={"addOrUpdateLabels": {"purpose": "other", "extra": "x"}},
        taints={"removeTaints": [{"key": "purpose", "value": "spark-executor", "effect": "NO_SCHEDULE"}]},
    )
    before = recorder.count()
    await provider.ensure("node_pools", context(byon, prov.resources))
    executor = eks.describe_nodegroup(clusterName=cid, nodegroupName="spark-executor")["nodegroup"]
    assert executor["scalingConfig"] == {"minSize": 0, "maxSize": 300, "desiredSize": 4}  # size kept, bounds restored
    assert executor["labels"] == {"purpose": "spark-executor"}
    assert executor["taints"] == [{"key": "purpose", "value": "spark-executor", "effect": "NO_SCHEDULE"}]
    assert recorder.count() == before and recorder.count("^UpdateNodegroupConfig$") == Counter(UpdateNodegroupConfig=1)

    # ---- retire both: nothing of ours left; their network exactly as it was
    async with provisioner(settings, provider):
        for r in (byon, plain):
            await bus.publish(retirement_envelope(r))
        await wait_for_type(bus, "ClusterDeprovisioned", ids)
    assert inventory(aws) == {}
    assert (ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"], ec2.describe_subnets(SubnetIds=subnet_ids)["Subnets"]) == (
        users_before
    )
    byon_steps = [e.data["step"] for e in await ours(bus, cid) if e.type == "ClusterResourceDeprovisioned"]
    assert byon_steps == [s for s in reversed(PROVISION_STEPS) if s != "network"]


async def test_in_place_update_converges_the_node_group_and_cluster_tags_and_creates_nothing(
    settings: Settings, bus: Bus, aws: MotoServer, recorder: Proxy
) -> None:
    provider = make_provider(recorder)
    req = request_envelope(PLAIN, "upd")
    cid = req.subject
    request = payload_as(req, ClusterRequested)
    update = update_requested(request, 2, tags={"team": "serving", "owner": "ml"}, maxCount=6,
                              labels={"tier": "gold"}, taints=[{"key": "gpu", "value": "yes", "effect": "NoSchedule"}])
    async with provisioner(settings, provider):
        await bus.publish(req)
        await wait_for_type(bus, "ClusterProvisioned", [cid])
        creates, before = recorder.count(), recorder.mutations()
        await bus.publish(from_planner(update))
        await wait_for_type(bus, "ClusterResourcesUpdated", [cid])
        after = recorder.mutations()
        await bus.publish(from_planner(update))  # the planner re-emitting it: ignored
        await wait_until(lambda: consumer_drained(bus, DURABLE))
    [report_env] = [e for e in await ours(bus, cid) if e.type == "ClusterResourcesUpdated"]
    report = ClusterResourcesUpdated.model_validate(report_env.data)
    assert (report.generation, report.changed) == (2, ["cluster", "node_pools"])
    assert report.resources["node_pools"]["nodegroups"]["default"]["scaling"] == {"minSize": 3, "maxSize": 6,
                                                                                   "desiredSize": 3}  # fmt: skip
    eks = aws.client("eks")
    ng = eks.describe_nodegroup(clusterName=cid, nodegroupName="default")["nodegroup"]
    assert ng["scalingConfig"] == {"minSize": 3, "maxSize": 6, "desiredSize": 3}  # the running size kept
    assert ng["labels"] == {"tier": "gold"}
    assert ng["taints"] == [{"key": "gpu", "value": "yes", "effect": "NO_SCHEDULE"}]
    tags = eks.describe_cluster(name=cid)["cluster"]["tags"]
    assert tags["owner"] == "ml" and "costCenter" not in tags and tags[TAG_CLUSTER] == cid
    assert after - before == Counter(UpdateNodegroupConfig=1, TagResource=1, UntagResource=1)
    assert recorder.mutations() == after and recorder.count() == creates and inventory(aws) == {cid: PRIVATE_CLUSTER}

    # What only a rotation can do is refused, and nothing is created for it.
    prov = await provisioned(bus, cid)
    for spec in (changed_spec(update.spec, instanceTypes=["m7i.2xlarge"]),
                 with_pool(update.spec, "gpu")):  # fmt: skip
        ctx = ClusterContext(cid, request.clusterset, request.location, spec, prov.resources)
        with pytest.raises(NotInPlaceError):
            await provider.update("node_pools", ctx)
    assert recorder.mutations() == after


async def test_throttling_is_classified_retried_and_converges(
    settings: Settings, bus: Bus, aws: MotoServer, recorder: Proxy
) -> None:
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    faults = Fault(
        {
            "DescribeAvailabilityZones": 2,
            "CreateVpc": 2,
            "CreateRole": 1,
            "CreateCluster": 2,
            "DescribeNodegroup": 1,
            "CreateStream": 2,
        }
    ).install(session)
    provider = make_provider(recorder, session)
    req = request_envelope(PLAIN, "throttled")
    cid = req.subject

    # What the runtime gets from the driver: a retryable ThrottlingError, nothing created meanwhile.
    with pytest.raises(ThrottlingError) as info:
        await provider.ensure("network", context(req))
    assert info.value.code == "Throttling" and info.value.retryable and "DescribeAvailabilityZones" in str(info.value)
    assert recorder.count() == Counter()

    async with provisioner(settings, provider):
        await bus.publish(req)
        await wait_for_type(bus, "ClusterProvisioned", [cid], within=60)
    assert faults.exhausted() and sum(faults.raised.values()) == 10
    types = [e.type for e in await ours(bus, cid)]
    assert "ClusterProvisioningFailed" not in types
    assert inventory(aws) == {cid: PRIVATE_CLUSTER}
    assert recorder.count() == PRIVATE_CREATES  # every retried create happened exactly once


async def test_terminal_errors_fail_the_cluster_with_a_stable_code(
    settings: Settings, bus: Bus, aws: MotoServer, recorder: Proxy
) -> None:
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    Fault(
        {"CreateVpc": 1},
        code="VpcLimitExceeded",
        message="The maximum number of VPCs has been reached.",
    ).install(session)
    Fault(
        {"CreateNodegroup": 1},
        code="InvalidParameterException",
        message="Instance type m6i.2xlarge is not supported in your requested Availability Zone",
    ).install(session)
    provider = make_provider(recorder, session)
    quota, bad_type = request_envelope(PLAIN, "quota"), request_envelope(PLAIN, "itype")
    async with provisioner(settings, provider):
        await bus.publish(quota)
        await wait_for_type(bus, "ClusterProvisioningFailed", [quota.subject])
        await bus.publish(bad_type)
        await wait_for_type(bus, "ClusterProvisioningFailed", [bad_type.subject])
        failures = {}
        for cid in (quota.subject, bad_type.subject):
            last = (await ours(bus, cid))[-1]
            failures[cid] = ClusterProvisioningFailed.model_validate(last.data)
        assert (failures[quota.subject].step, failures[quota.subject].code, failures[quota.subject].retryable) == (
            "network",
            "QuotaExceeded",
            False,
        )
        assert "VpcLimitExceeded" in failures[quota.subject].message
        assert (failures[bad_type.subject].step, failures[bad_type.subject].code) == (
            "node_pools",
            "InvalidInstanceType",
        )
        assert recorder.count("^CreateVpc$") == Counter(CreateVpc=1)  # the failed one was not retried
        assert inventory(aws)[bad_type.subject]["eks_cluster"] == 1 and quota.subject not in inventory(aws)

        for r in (quota, bad_type):
            await bus.publish(retirement_envelope(r))
        await wait_for_type(bus, "ClusterDeprovisioned", [quota.subject, bad_type.subject])
    assert inventory(aws) == {}


async def test_waits_for_a_cluster_still_creating_and_resumes_after_giving_up(aws: MotoServer, recorder: Proxy) -> None:
    """moto's clusters are ACTIVE at once; an `after-call` handler makes DescribeCluster report CREATING for a
    while (what EKS does for ~10 minutes), so the driver's wait, its give-up and the adoption on the next
    attempt run against a real answer shape."""
    creating = {"left": 4}

    def still_creating(parsed: dict[str, Any], **_: Any) -> None:
        if creating["left"] > 0 and "cluster" in parsed:
            creating["left"] -= 1
            parsed["cluster"]["status"] = "CREATING"

    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    session.events.register("after-call.eks.DescribeCluster", still_creating)
    provider = make_provider(recorder, session)
    req = request_envelope(PLAIN, "slow")
    resources: dict[str, dict[str, Any]] = {}
    for step in ("network", "iam"):
        resources[step] = await provider.ensure(step, context(req, resources))
    provider.waiter.timeout_s = 0.0  # give up after the first probe: like a create outlasting the handler timeout
    with pytest.raises(TransientCloudError) as info:
        await provider.ensure("cluster", context(req, resources))
    assert info.value.code == "StillInProgress" and info.value.retryable
    provider.waiter.timeout_s = 10.0
    cluster = await provider.ensure("cluster", context(req, resources))  # the next delivery: adopts and waits
    assert creating["left"] == 0 and cluster["name"] == req.subject
    assert recorder.count("^CreateCluster$") == Counter(CreateCluster=1)


async def test_self_managed_control_planes_are_refused_before_anything_is_created(
    aws: MotoServer, recorder: Proxy
) -> None:
    provider = make_provider(recorder)
    req = request_envelope("core-prod-aws-eu-west-1")
    with pytest.raises(TerminalCloudError) as info:
        await provider.ensure("network", context(req))
    assert info.value.code == "UnsupportedControlPlane" and not info.value.retryable
    assert recorder.calls == []


async def test_an_unreachable_endpoint_is_retryable() -> None:
    provider = AwsProvider(
        boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing"),
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        max_attempts=1,
    )
    with pytest.raises(TransientCloudError) as info:
        await provider.ensure("network", context(request_envelope(PLAIN)))
    assert info.value.code == "EndpointUnreachable" and info.value.retryable


@pytest.mark.slow
async def test_sigkill_mid_way_then_restart_leaves_no_duplicates(
    nats_proc: ServerProcess, redis_proc: ServerProcess, bus: Bus, aws: MotoServer, tmp_path: Path
) -> None:
    """The real service process with the real aws driver, killed while it provisions and while it deletes."""
    with proxy(aws.url, delay_s=0.03) as slow:  # enough latency for the kill to land mid-way
        env = service_env(
            nats_proc.port,
            redis_proc.port,
            FLOTILLA_ACK_WAIT_S="2",
            FLOTILLA_LOG_LEVEL="WARNING",
            FLOTILLA_BACKOFF_S="[0.05, 0.1, 0.2]",
            FLOTILLA_SHUTDOWN_GRACE_S="1",
            **aws.env(slow.url),
        )
        reqs = [request_envelope(PLAIN, f"k{i}") for i in range(3)]
        ids = [r.subject for r in reqs]
        proc = start_service(SERVICE, env, tmp_path / "logs")
        try:
            for r in reqs:
                await bus.publish(r)

            async def count(event_type: str) -> int:
                return sum(e.type == event_type for e in await ours(bus))

            async def some_steps() -> bool:
                return await count("ClusterResourceProvisioned") >= 4

            await wait_until(some_steps, within=60, interval=0.02)
            proc.send_signal(signal.SIGKILL)  # creates in flight, nothing acked
            proc.wait(10)
            assert await count("ClusterProvisioned") < len(ids), "the kill came too late to test anything"
            proc = start_service(SERVICE, env, tmp_path / "logs")
            await wait_for_type(bus, "ClusterProvisioned", ids, within=90)

            assert inventory(aws) == {cid: PRIVATE_CLUSTER for cid in ids}
            creates = slow.count()
            assert creates == Counter({op: n * len(ids) for op, n in PRIVATE_CREATES.items()}), creates
            published = await ours(bus)
            assert len({e.id for e in published}) == len(published)
            steps = Counter((e.subject, e.data["step"]) for e in published if e.type == "ClusterResourceProvisioned")
            assert set(steps.values()) == {1} and len(steps) == 5 * len(ids)

            for r in reqs:
                await bus.publish(retirement_envelope(r))

            async def some_deleted() -> bool:
                return await count("ClusterResourceDeprovisioned") >= 3

            await wait_until(some_deleted, within=60, interval=0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = start_service(SERVICE, env, tmp_path / "logs")
            await wait_for_type(bus, "ClusterDeprovisioned", ids, within=90)
            assert inventory(aws) == {}
        finally:
            proc.kill()
            proc.wait(10)
            await asyncio.sleep(0)
