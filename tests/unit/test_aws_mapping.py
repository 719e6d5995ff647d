"""The AWS driver's pure parts: spec → EC2/IAM/EKS/Kinesis requests, and the error classification."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import ssl
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from services.cloud_provisioner.providers.aws_api import aws_code, classify
from services.cloud_provisioner.providers.aws_mapping import (
    CLUSTER_POLICIES,
    LOG_TYPES,
    NODE_POLICIES,
    TAINT_EFFECTS,
    VPC_CIDR,
    AwsNames,
    ami_type,
    bounded,
    ca_fingerprint,
    choose_zones,
    client_token,
    cluster_request,
    cluster_updates,
    create_role_request,
    credential_ref,
    nodegroup_fixed_changes,
    nodegroup_request,
    nodegroup_update,
    policy_arn,
    role_plans,
    stream_request,
    subnet_plan,
    tag_changes,
    tag_dict,
    tag_list,
    tag_specifications,
    trust_policy,
)
from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    InvalidInstanceTypeError,
    QuotaExceededError,
    ResourceNotFoundError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
)
from shared.events.clusterset import NodePool
from tests.conftest import example_documents
from tests.helpers import cluster_context, example_spec

EXAMPLES = example_documents()
MODELSERVING = "modelserving-prod-aws-us-east-1"
DATAENG = "dataeng-staging-azure-westeurope"
CORE = "core-prod-aws-eu-west-1"
SERVERLESS = "serverless-prod-gcp-europe-west4"


spec_of, context = example_spec, cluster_context


def requests_for(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The EKS cluster request and one node group request per pool for an example, as the driver builds them."""
    ctx = context(name)
    spec = spec_of(name)
    names = AwsNames(ctx.cluster_id)
    cluster = cluster_request(
        name=names.cluster,
        spec=spec,
        role_arn="arn:aws:iam::123456789012:role/c",
        subnet_ids=["subnet-a", "subnet-b"],
        security_group_ids=["sg-1"],
        tags=ctx.tags("cluster"),
        token=client_token(ctx.client_token("cluster")),
    )
    pools = [
        nodegroup_request(
            cluster_name=names.cluster,
            pool=p,
            spec=spec,
            node_role_arn="arn:aws:iam::1:role/n",
            subnet_ids=["subnet-a", "subnet-b"],
            tags=ctx.tags("node_pools"),
            token=client_token(ctx.client_token("node_pools", p.name)),
        )
        for p in spec.node_pools
    ]
    return cluster, pools


# ---------------------------------------------------------------- the four examples
def test_modelserving_private_cluster_with_tags_and_fixed_size_pool() -> None:
    cluster, [pool] = requests_for(MODELSERVING)
    assert cluster["name"] == "modelserving-prod-aws-us-east-1-0001"
    assert cluster["version"] == "1.30"
    assert cluster["resourcesVpcConfig"] == {
        "subnetIds": ["subnet-a", "subnet-b"],
        "securityGroupIds": ["sg-1"],
        "endpointPrivateAccess": True,
        "endpointPublicAccess": False,
    }
    assert cluster["logging"] == {"clusterLogging": [{"types": list(LOG_TYPES), "enabled": True}]}
    assert cluster["tags"]["team"] == "serving" and cluster["tags"]["costCenter"] == "4711"
    assert cluster["tags"][TAG_CLUSTER] == "modelserving-prod-aws-us-east-1-0001"
    assert cluster["clientRequestToken"] == client_token("modelserving-prod-aws-us-east-1-0001:cluster")
    assert pool["nodegroupName"] == "default" and pool["instanceTypes"] == ["m6i.2xlarge"]
    assert pool["scalingConfig"] == {"minSize": 3, "maxSize": 3, "desiredSize": 3}
    assert pool["capacityType"] == "ON_DEMAND" and pool["labels"] == {} and pool["taints"] == []
    assert pool["version"] == "1.30" and pool["amiType"] == "AL2023_x86_64_STANDARD"
    assert pool["tags"]["team"] == "serving"


def test_dataeng_spot_executors_with_labels_taints_and_autoscaled_drivers() -> None:
    cluster, pools = requests_for(DATAENG)
    assert cluster["resourcesVpcConfig"]["endpointPublicAccess"] is True  # no private-connectivity
    assert cluster["resourcesVpcConfig"]["endpointPrivateAccess"] is False
    by_name = {p["nodegroupName"]: p for p in pools}
    assert set(by_name) == {"infra", "spark-driver", "spark-executor"}
    executor = by_name["spark-executor"]
    assert executor["capacityType"] == "SPOT"
    assert executor["instanceTypes"] == ["Standard_E8ds_v5", "Standard_E8ads_v5"]
    assert executor["scalingConfig"] == {"minSize": 0, "maxSize": 300, "desiredSize": 0}
    assert executor["labels"] == {"purpose": "spark-executor"}
    assert executor["taints"] == [{"key": "purpose", "value": "spark-executor", "effect": "NO_SCHEDULE"}]
    driver = by_name["spark-driver"]
    assert (driver["capacityType"], driver["scalingConfig"], driver["labels"], driver["taints"]) == (
        "ON_DEMAND",
        {"minSize": 0, "maxSize": 20, "desiredSize": 0},
        {"purpose": "spark-driver"},
        [],
    )
    assert by_name["infra"]["scalingConfig"] == {"minSize": 1, "maxSize": 3, "desiredSize": 1}
    assert len({p["clientRequestToken"] for p in pools}) == 3  # one token per pool


def test_core_example_version_and_autoscaling_bounds() -> None:
    cluster, [pool] = requests_for(CORE)
    assert cluster["version"] == "1.29" and pool["version"] == "1.29"
    assert pool["scalingConfig"] == {"minSize": 3, "maxSize": 10, "desiredSize": 3}
    assert pool["instanceTypes"] == ["m6i.4xlarge"] and pool["capacityType"] == "ON_DEMAND"
    assert cluster["resourcesVpcConfig"]["endpointPublicAccess"] is True


def test_serverless_private_endpoint_and_sandbox_taint() -> None:
    cluster, [pool] = requests_for(SERVERLESS)
    assert cluster["resourcesVpcConfig"]["endpointPrivateAccess"] is True
    assert cluster["resourcesVpcConfig"]["endpointPublicAccess"] is False
    assert pool["labels"] == {"runtime": "kata"}
    assert pool["taints"] == [{"key": "sandbox", "value": "kata", "effect": "NO_SCHEDULE"}]
    assert pool["scalingConfig"] == {"minSize": 3, "maxSize": 50, "desiredSize": 3}


@pytest.mark.parametrize("name", [MODELSERVING, DATAENG, CORE, SERVERLESS])
def test_every_example_maps_and_requests_are_deterministic(name: str) -> None:
    assert requests_for(name) == requests_for(name)
    cluster, pools = requests_for(name)
    assert json.loads(json.dumps(cluster)) == cluster  # JSON-able, as boto3 serialises it
    for pool in pools:
        assert (
            pool["scalingConfig"]["minSize"] <= pool["scalingConfig"]["desiredSize"] <= pool["scalingConfig"]["maxSize"]
        )
        assert pool["scalingConfig"]["maxSize"] >= 1  # EKS refuses maxSize 0


def test_taint_effects_map_to_the_eks_enum() -> None:
    assert TAINT_EFFECTS == {
        "NoSchedule": "NO_SCHEDULE",
        "NoExecute": "NO_EXECUTE",
        "PreferNoSchedule": "PREFER_NO_SCHEDULE",
    }
    pool = NodePool.model_validate(
        {
            "name": "p",
            "instanceTypes": ["m6i.large"],
            "minCount": 0,
            "maxCount": 0,
            "taints": [{"key": "a", "effect": "NoExecute"}, {"key": "b", "value": "x", "effect": "PreferNoSchedule"}],
        },
        strict=False,
    )
    req = nodegroup_request(
        cluster_name="c", pool=pool, spec=spec_of(MODELSERVING), node_role_arn="r", subnet_ids=["s"], tags={}, token="t"
    )
    assert req["taints"] == [
        {"key": "a", "value": "", "effect": "NO_EXECUTE"},
        {"key": "b", "value": "x", "effect": "PREFER_NO_SCHEDULE"},
    ]
    assert req["scalingConfig"] == {"minSize": 0, "maxSize": 1, "desiredSize": 0}  # max 0 → 1, stays at 0 nodes


# ---------------------------------------------------------------- network
def test_subnets_span_three_zones_and_private_adds_a_nat_subnet() -> None:
    zones = ["us-east-1a", "us-east-1b", "us-east-1c"]
    private = subnet_plan("c1", zones, private=True)
    assert [(s.tier, s.zone, s.for_cluster) for s in private] == [
        ("private", "us-east-1a", True),
        ("private", "us-east-1b", True),
        ("private", "us-east-1c", True),
        ("public", "us-east-1a", False),
    ]
    public = subnet_plan("c1", zones, private=False)
    assert [(s.tier, s.for_cluster) for s in public] == [("public", True)] * 3
    for plan in (private, public):
        nets = [ipaddress.ip_network(s.cidr) for s in plan]
        assert all(n.subnet_of(ipaddress.IPv4Network(VPC_CIDR)) for n in nets)  # type: ignore[arg-type]
        assert not any(a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1 :])
        assert len({s.name for s in plan}) == len(plan)


def test_zones_skip_unavailable_local_and_eks_unsupported_ones() -> None:
    zones = [
        {"ZoneName": "us-east-1e", "ZoneId": "use1-az3", "State": "available", "ZoneType": "availability-zone"},
        {"ZoneName": "us-east-1b", "ZoneId": "use1-az1", "State": "available", "ZoneType": "availability-zone"},
        {"ZoneName": "us-east-1a", "ZoneId": "use1-az6", "State": "available", "ZoneType": "availability-zone"},
        {"ZoneName": "us-east-1c", "ZoneId": "use1-az2", "State": "impaired", "ZoneType": "availability-zone"},
        {"ZoneName": "us-east-1-bos-1a", "ZoneId": "use1-bos1-az1", "State": "available", "ZoneType": "local-zone"},
        {"ZoneName": "us-east-1d", "ZoneId": "use1-az4", "State": "available", "ZoneType": "availability-zone"},
        {"ZoneName": "us-east-1f", "ZoneId": "use1-az5", "State": "available", "ZoneType": "availability-zone"},
    ]
    assert choose_zones(zones) == ["us-east-1a", "us-east-1b", "us-east-1d"]


# ---------------------------------------------------------------- names, tags, tokens
def test_names_are_deterministic_and_fit_the_api_limits() -> None:
    short = AwsNames("modelserving-prod-aws-us-east-1-0001")
    assert short.cluster_role == "modelserving-prod-aws-us-east-1-0001-eks-cluster"
    assert short.node_role == "modelserving-prod-aws-us-east-1-0001-eks-node"
    assert short.log_stream == "modelserving-prod-aws-us-east-1-0001-logs"
    long_a, long_b = AwsNames("x" * 58 + "-0001"), AwsNames("x" * 58 + "-0002")
    for names in (long_a, long_b):
        assert len(names.cluster_role) <= 64 and len(names.node_role) <= 64
        assert names.cluster_role.endswith("-eks-cluster") and names.node_role.endswith("-eks-node")
    assert long_a.cluster_role != long_b.cluster_role  # the hash keeps them apart
    assert long_a.cluster_role == AwsNames("x" * 58 + "-0001").cluster_role
    assert bounded("abc", "-x", 64) == "abc-x"
    assert len(bounded("a" * 200, "-suffix", 64)) <= 64


def test_tags_shapes_and_client_tokens() -> None:
    tags = {"b": "2", "a": "1"}
    assert tag_list(tags) == [{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}]
    assert tag_dict(tag_list(tags)) == tags and tag_dict(tags) == tags and tag_dict(None) == {}
    assert tag_specifications("vpc", tags) == [{"ResourceType": "vpc", "Tags": tag_list(tags)}]
    token = client_token("c1:cluster")
    assert token == client_token("c1:cluster") and token != client_token("c1:node_pools:default")
    assert len(token) <= 64 and token.isascii()
    assert credential_ref("us-east-1", "c1") == "eks://us-east-1/c1"


# ---------------------------------------------------------------- IAM
def test_roles_trust_the_right_service_and_carry_the_managed_policies() -> None:
    cluster, node = role_plans("c1", "us-east-1")
    assert json.loads(trust_policy(cluster.service)) == {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "eks.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }
    assert node.service == "ec2.amazonaws.com"
    assert cluster.policy_arns == tuple(f"arn:aws:iam::aws:policy/{p}" for p in CLUSTER_POLICIES)
    assert set(node.policy_arns) == {
        "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
        "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
        "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
    }
    assert len(NODE_POLICIES) == 3
    assert policy_arn("AmazonEKSClusterPolicy", "cn-north-1") == "arn:aws-cn:iam::aws:policy/AmazonEKSClusterPolicy"
    assert policy_arn("AmazonEKSClusterPolicy", "us-gov-west-1").startswith("arn:aws-us-gov:")
    req = create_role_request(cluster, {TAG_CLUSTER: "c1"})
    assert req["RoleName"] == "c1-eks-cluster" and req["Tags"] == [{"Key": TAG_CLUSTER, "Value": "c1"}]


# ---------------------------------------------------------------- converging an existing node group / cluster
def _pool(**kw: Any) -> NodePool:
    base: dict[str, Any] = {"name": "p", "instanceTypes": ["m6i.large"], "minCount": 1, "maxCount": 5}
    return NodePool.model_validate({**base, **kw}, strict=False)


def test_nodegroup_update_is_empty_when_nothing_differs() -> None:
    pool = _pool(labels={"a": "1"}, taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}])
    current = {
        "scalingConfig": {"minSize": 1, "maxSize": 5, "desiredSize": 4},
        "labels": {"a": "1"},
        "taints": [{"key": "k", "value": "v", "effect": "NO_SCHEDULE"}],
    }
    assert nodegroup_update(pool, current) == {}


def test_nodegroup_update_converges_scaling_labels_and_taints() -> None:
    pool = _pool(
        minCount=2, maxCount=10, labels={"a": "1", "b": "2"}, taints=[{"key": "k", "value": "v", "effect": "NoExecute"}]
    )
    current = {
        "scalingConfig": {"minSize": 1, "maxSize": 3, "desiredSize": 1},
        "labels": {"a": "0", "stale": "x"},
        "taints": [{"key": "k", "value": "v", "effect": "NO_SCHEDULE"}, {"key": "gone", "effect": "NO_EXECUTE"}],
    }
    update = nodegroup_update(pool, current)
    # desired follows the current size, kept within the new bounds
    assert update["scalingConfig"] == {"minSize": 2, "maxSize": 10, "desiredSize": 2}
    assert update["labels"] == {"addOrUpdateLabels": {"a": "1", "b": "2"}, "removeLabels": ["stale"]}
    assert update["taints"] == {
        "addOrUpdateTaints": [{"key": "k", "value": "v", "effect": "NO_EXECUTE"}],
        "removeTaints": [
            {"key": "k", "value": "v", "effect": "NO_SCHEDULE"},
            {"key": "gone", "value": "", "effect": "NO_EXECUTE"},
        ],
    }
    # a larger current size is kept as long as it is within bounds
    assert nodegroup_update(_pool(), {"scalingConfig": {"minSize": 1, "maxSize": 5, "desiredSize": 4}}) == {}


def test_only_a_rotation_changes_instance_types_or_capacity_type() -> None:
    group = {"instanceTypes": ["m6i.large"], "capacityType": "ON_DEMAND"}
    assert nodegroup_fixed_changes(_pool(maxCount=50, labels={"a": "b"}), group) == []
    assert nodegroup_fixed_changes(_pool(instanceTypes=["m6i.large", "m5.large"]), group) == ["instanceTypes"]
    assert nodegroup_fixed_changes(_pool(spot=True), group) == ["capacityType"]


def test_tag_changes_set_what_the_spec_says_and_keep_aws_own_tags() -> None:
    have = {TAG_CLUSTER: "c1", "team": "a", "old": "x", "aws:eks:cluster-name": "c1"}
    want = {TAG_CLUSTER: "c1", "team": "b", "owner": "ml"}
    assert tag_changes(have, want) == ({"team": "b", "owner": "ml"}, ["old"])
    assert tag_changes(want, want) == ({}, [])


def test_cluster_updates_cover_endpoint_access_and_logging_only() -> None:
    spec = spec_of(MODELSERVING)
    good = {
        "resourcesVpcConfig": {"endpointPrivateAccess": True, "endpointPublicAccess": False},
        "logging": {"clusterLogging": [{"types": list(LOG_TYPES), "enabled": True}]},
        "version": "1.29",
    }
    assert cluster_updates(spec, good) == []  # a version difference is a rotation, not an update
    drifted = {
        "resourcesVpcConfig": {"endpointPrivateAccess": False, "endpointPublicAccess": True},
        "logging": {"clusterLogging": [{"types": ["api"], "enabled": True}, {"types": ["audit"], "enabled": False}]},
    }
    assert cluster_updates(spec, drifted) == [
        {"resourcesVpcConfig": {"endpointPrivateAccess": True, "endpointPublicAccess": False}},
        {"logging": {"clusterLogging": [{"types": list(LOG_TYPES), "enabled": True}]}},
    ]


def test_ca_fingerprint_hashes_the_der_certificate_never_returns_it() -> None:
    der = b"\x30\x82\x01\x0a-not-a-real-certificate-but-der-shaped"
    data = base64.b64encode(ssl.DER_cert_to_PEM_cert(der).encode()).decode()
    assert ca_fingerprint(data) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert data not in ca_fingerprint(data)
    # moto's random text: still a stable fingerprint
    assert ca_fingerprint("not base64 !") == ca_fingerprint("not base64 !") != ca_fingerprint("other")


def test_ami_follows_the_instance_architecture_and_stream_is_on_demand() -> None:
    assert ami_type(["m6g.large", "c7gn.xlarge"]) == "AL2023_ARM_64_STANDARD"
    assert (
        ami_type(["m6i.large"])
        == ami_type(["g4dn.xlarge"])
        == ami_type(["m6g.large", "m6i.large"])
        == ("AL2023_x86_64_STANDARD")
    )
    assert stream_request("s", {"a": "b"}) == {
        "StreamName": "s",
        "StreamModeDetails": {"StreamMode": "ON_DEMAND"},
        "Tags": {"a": "b"},
    }


# ---------------------------------------------------------------- error classification
def client_error(code: str, message: str = "boom", status: int = 400, op: str = "CreateCluster") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, op
    )


@pytest.mark.parametrize(
    ("code", "message", "status", "cls", "stable", "retryable"),
    [
        ("Throttling", "Rate exceeded", 400, ThrottlingError, "Throttling", True),
        ("ThrottlingException", "", 400, ThrottlingError, "Throttling", True),
        ("RequestLimitExceeded", "", 503, ThrottlingError, "Throttling", True),
        ("TooManyRequestsException", "", 429, ThrottlingError, "Throttling", True),
        ("SomethingNew", "", 429, ThrottlingError, "Throttling", True),
        ("ServiceUnavailable", "", 503, TransientCloudError, "ServiceUnavailable", True),
        ("InternalFailure", "", 500, TransientCloudError, "ServiceUnavailable", True),
        ("ServerException", "", 500, TransientCloudError, "ServiceUnavailable", True),
        ("ResourceInUseException", "Cluster has nodegroups attached", 409, TransientCloudError, "ResourceInUse", True),
        ("DependencyViolation", "has dependencies", 400, TransientCloudError, "Conflict", True),
        ("DeleteConflict", "must detach all policies first", 409, TransientCloudError, "Conflict", True),
        ("LimitExceededException", "", 400, QuotaExceededError, "QuotaExceeded", False),
        ("ResourceLimitExceeded", "", 400, QuotaExceededError, "QuotaExceeded", False),
        (
            "VpcLimitExceeded",
            "The maximum number of VPCs has been reached.",
            400,
            QuotaExceededError,
            "QuotaExceeded",
            False,
        ),
        ("AddressLimitExceeded", "", 400, QuotaExceededError, "QuotaExceeded", False),
        ("ServiceQuotaExceededException", "", 402, QuotaExceededError, "QuotaExceeded", False),
        ("NodeGroupQuotaExceeded", "", 400, QuotaExceededError, "QuotaExceeded", False),
        (
            "InvalidParameterException",
            "Instance type m6i.2xlarge is not supported in us-east-1e",
            400,
            InvalidInstanceTypeError,
            "InvalidInstanceType",
            False,
        ),
        (
            "InvalidParameterValue",
            "Invalid value 'x9.huge' for InstanceType.",
            400,
            InvalidInstanceTypeError,
            "InvalidInstanceType",
            False,
        ),
        (
            "InvalidParameterException",
            "unsupported Kubernetes version 1.12",
            400,
            TerminalCloudError,
            "UnsupportedVersion",
            False,
        ),
        (
            "InvalidParameterException",
            "Role with arn: arn:aws:iam::1:role/x, could not be assumed because it does "
            "not exist or the trusted entity is not correct",
            400,
            TransientCloudError,
            "IamPropagation",
            True,
        ),
        (
            "InvalidParameterException",
            "Subnets specified must be in at least two different AZs",
            400,
            TerminalCloudError,
            "InvalidParameter",
            False,
        ),
        (
            "UnsupportedAvailabilityZoneException",
            "us-east-1e does not have sufficient capacity",
            400,
            TerminalCloudError,
            "UnsupportedAvailabilityZone",
            False,
        ),
        ("AccessDenied", "", 403, TerminalCloudError, "PermissionDenied", False),
        ("AccessDeniedException", "", 403, TerminalCloudError, "PermissionDenied", False),
        ("UnauthorizedOperation", "", 403, TerminalCloudError, "PermissionDenied", False),
        ("ResourceNotFoundException", "No cluster found", 404, ResourceNotFoundError, "ResourceNotFound", False),
        ("NoSuchEntity", "", 404, ResourceNotFoundError, "ResourceNotFound", False),
        ("InvalidVpcID.NotFound", "", 400, ResourceNotFoundError, "ResourceNotFound", False),
        ("SomethingElse", "", 400, TerminalCloudError, "SomethingElse", False),
    ],
)
def test_client_errors_are_classified(
    code: str, message: str, status: int, cls: type, stable: str, retryable: bool
) -> None:
    err = classify(client_error(code, message, status))
    assert type(err) is cls
    assert (err.code, err.retryable) == (stable, retryable)
    assert code in err.message  # AWS's own code stays in the human message


def test_connection_and_client_side_errors() -> None:
    unreachable = classify(EndpointConnectionError(endpoint_url="https://eks.us-east-1.amazonaws.com"))
    assert isinstance(unreachable, TransientCloudError) and unreachable.code == "EndpointUnreachable"
    assert classify(ReadTimeoutError(endpoint_url="https://x")).retryable
    creds = classify(NoCredentialsError())
    assert isinstance(creds, TerminalCloudError) and creds.code == "NoCredentials"


def test_aws_code_reaches_the_original_error() -> None:
    original = client_error("EntityAlreadyExists", op="CreateRole")
    try:
        try:
            raise original
        except ClientError as exc:
            raise classify(exc) from exc
    except TerminalCloudError as classified:
        assert aws_code(classified) == "EntityAlreadyExists"
    assert aws_code(ValueError()) == ""


def test_without_a_security_group_of_ours_the_request_names_none() -> None:
    request = cluster_request(
        name="c",
        spec=spec_of(DATAENG),
        role_arn="r",
        subnet_ids=["s1", "s2"],
        security_group_ids=[],
        tags={},
        token="t",
    )
    assert "securityGroupIds" not in request["resourcesVpcConfig"]
