"""Pure mapping from a cluster's spec to AWS API requests (EC2, IAM, EKS, Kinesis). No I/O here.

Everything the AWS driver sends is built here, so that the requests for every example
ClusterSet can be checked by unit tests without a cloud: names (deterministic from the
cluster id, within each API's length limit), tags, the subnet plan, IAM roles, the EKS
cluster and node group requests, what to converge on an existing node group, and the
Kinesis stream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import ssl
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from shared.events import ClusterSpec
from shared.events.clusterset import NodePool

# ---------------------------------------------------------------- constants
# Kubernetes taint effect → EKS API enum.
TAINT_EFFECTS: dict[str, str] = {
    "NoSchedule": "NO_SCHEDULE",
    "NoExecute": "NO_EXECUTE",
    "PreferNoSchedule": "PREFER_NO_SCHEDULE",
}
TAINT_EFFECTS_BACK: dict[str, str] = {v: k for k, v in TAINT_EFFECTS.items()}

# AWS-managed policies (their ARNs exist in every account; moto needs MOTO_IAM_LOAD_MANAGED_POLICIES=true).
CLUSTER_POLICIES: tuple[str, ...] = ("AmazonEKSClusterPolicy",)
NODE_POLICIES: tuple[str, ...] = (
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
)

# Every control-plane log type: operators of a large fleet want the audit trail of each cluster.
LOG_TYPES: tuple[str, ...] = ("api", "audit", "authenticator", "controllerManager", "scheduler")

VPC_CIDR = "10.0.0.0/16"
MAX_ZONES = 3  # subnets in up to three AZs: enough for an HA control plane and spread node groups
MIN_ZONES = 2  # EKS refuses a cluster whose subnets are not in at least two AZs
# Availability zones (by zone *id*, stable across accounts) where EKS cannot place a control plane:
# https://docs.aws.amazon.com/eks/latest/userguide/network-reqs.html
EKS_UNSUPPORTED_ZONE_IDS: frozenset[str] = frozenset({"use1-az3", "usw1-az2", "cac1-az3"})

# Name length limits of the APIs.
IAM_ROLE_NAME_MAX = 64
EKS_CLUSTER_NAME_MAX = 100
EKS_NODEGROUP_NAME_MAX = 63
KINESIS_STREAM_NAME_MAX = 128
EC2_SG_NAME_MAX = 255

_TOKEN_NS = uuid.uuid5(uuid.NAMESPACE_URL, "https://flotilla.dev/providers/aws")
_ARM_FAMILY = re.compile(r"^(a1|[a-z]+\d+g[a-z]*)\.")  # Graviton: a1, m6g, c7gn, r8g, t4g, im4gn, x2gd ...


# ---------------------------------------------------------------- names
def bounded(base: str, suffix: str, limit: int) -> str:
    """`base + suffix`, or when that is too long, `base` cut short plus a hash of it (still unique, stable)."""
    name = f"{base}{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-_.')}-{digest}{suffix}"


Tier = Literal["public", "private"]


@dataclass(frozen=True)
class AwsNames:
    """The deterministic name of everything the driver makes for one cluster (its `Name` tag or API name)."""

    cluster_id: str

    @property
    def vpc(self) -> str:
        return f"{self.cluster_id}-vpc"

    @property
    def internet_gateway(self) -> str:
        return f"{self.cluster_id}-igw"

    @property
    def nat_gateway(self) -> str:
        return f"{self.cluster_id}-nat"

    @property
    def nat_address(self) -> str:
        return f"{self.cluster_id}-nat-eip"

    def route_table(self, tier: Tier) -> str:
        return f"{self.cluster_id}-{tier}"

    def subnet(self, tier: Tier, zone: str) -> str:
        return f"{self.cluster_id}-{tier}-{zone}"

    @property
    def security_group(self) -> str:
        return bounded(self.cluster_id, "-cluster", EC2_SG_NAME_MAX)

    @property
    def cluster(self) -> str:
        return bounded(self.cluster_id, "", EKS_CLUSTER_NAME_MAX)

    @property
    def cluster_role(self) -> str:
        return bounded(self.cluster_id, "-eks-cluster", IAM_ROLE_NAME_MAX)

    @property
    def node_role(self) -> str:
        return bounded(self.cluster_id, "-eks-node", IAM_ROLE_NAME_MAX)

    @property
    def log_stream(self) -> str:
        return bounded(self.cluster_id, "-logs", KINESIS_STREAM_NAME_MAX)

    @staticmethod
    def nodegroup(pool: str) -> str:
        # Node groups are scoped by their cluster: the pool name alone is unique and readable.
        return bounded(pool, "", EKS_NODEGROUP_NAME_MAX)


def client_token(raw: str) -> str:
    """An API client request token from `ClusterContext.client_token(...)`: the same input, the same token;
    a UUID so that it fits every API's limit (EC2 ClientToken ≤ 64 ASCII characters)."""
    return str(uuid.uuid5(_TOKEN_NS, raw))


def partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def policy_arn(name: str, region: str) -> str:
    return f"arn:{partition(region)}:iam::aws:policy/{name}"


def credential_ref(region: str, cluster_name: str) -> str:
    """What the installer resolves at run time (an EKS token from an STS presigned URL): never a secret."""
    return f"eks://{region}/{cluster_name}"


# ---------------------------------------------------------------- tags
def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """EC2/IAM style: [{"Key": k, "Value": v}], sorted for stable requests."""
    return [{"Key": k, "Value": str(v)} for k, v in sorted(tags.items())]


def tag_dict(tags: Sequence[Mapping[str, Any]] | Mapping[str, str] | None) -> dict[str, str]:
    """Tags from either shape the APIs return."""
    if not tags:
        return {}
    if isinstance(tags, Mapping):
        return {str(k): str(v) for k, v in tags.items()}
    return {str(t["Key"]): str(t.get("Value", "")) for t in tags}


def tag_specifications(resource_type: str, tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Tags applied atomically with an EC2 create: a crash right after the create still leaves it findable."""
    return [{"ResourceType": resource_type, "Tags": tag_list(tags)}]


def named(tags: Mapping[str, str], name: str) -> dict[str, str]:
    return {**tags, "Name": name}


# ---------------------------------------------------------------- network
@dataclass(frozen=True)
class SubnetPlan:
    name: str
    zone: str
    cidr: str
    tier: Tier
    for_cluster: bool  # cluster and node groups go here; the others only carry the NAT gateway


def choose_zones(zones: Sequence[Mapping[str, Any]], limit: int = MAX_ZONES) -> list[str]:
    """Available, ordinary AZs (no local/wavelength zones) where EKS may run, in name order."""
    usable = sorted(
        z["ZoneName"]
        for z in zones
        if z.get("State", "available") == "available"
        and z.get("ZoneType", "availability-zone") == "availability-zone"
        and z.get("ZoneId") not in EKS_UNSUPPORTED_ZONE_IDS
    )
    return usable[:limit]


def subnet_plan(cluster_id: str, zones: Sequence[str], private: bool) -> list[SubnetPlan]:
    """One cluster subnet per AZ (/19 each); with private connectivity they are private and one small
    public subnet carries the NAT gateway (a NAT gateway needs a route to the internet gateway)."""
    names = AwsNames(cluster_id)
    blocks = list(ipaddress.IPv4Network(VPC_CIDR).subnets(new_prefix=19))
    tier: Tier = "private" if private else "public"
    plan = [SubnetPlan(names.subnet(tier, z), z, str(blocks[i]), tier, True) for i, z in enumerate(zones)]
    if private:
        nat_block = next(blocks[-1].subnets(new_prefix=24))
        plan.append(SubnetPlan(names.subnet("public", zones[0]), zones[0], str(nat_block), "public", False))
    return plan


def subnet_tags(tier: Tier, cluster_name: str) -> dict[str, str]:
    """What the AWS load balancer controller looks for to place internal / internet-facing load balancers."""
    role = "kubernetes.io/role/internal-elb" if tier == "private" else "kubernetes.io/role/elb"
    return {role: "1", f"kubernetes.io/cluster/{cluster_name}": "shared"}


def private_connectivity(spec: ClusterSpec | None) -> bool:
    return spec is not None and "private-connectivity" in spec.features


# ---------------------------------------------------------------- IAM
@dataclass(frozen=True)
class RolePlan:
    kind: Literal["cluster", "node"]
    name: str
    service: str
    policy_arns: tuple[str, ...]
    description: str


def trust_policy(service: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}],
        },
        sort_keys=True,
    )


def role_plans(cluster_id: str, region: str) -> list[RolePlan]:
    names = AwsNames(cluster_id)
    ec2 = "ec2.amazonaws.com.cn" if partition(region) == "aws-cn" else "ec2.amazonaws.com"
    return [
        RolePlan(
            "cluster",
            names.cluster_role,
            "eks.amazonaws.com",
            tuple(policy_arn(p, region) for p in CLUSTER_POLICIES),
            f"EKS control plane of {cluster_id}",
        ),
        RolePlan(
            "node",
            names.node_role,
            ec2,
            tuple(policy_arn(p, region) for p in NODE_POLICIES),
            f"EKS worker nodes of {cluster_id}",
        ),
    ]


def create_role_request(plan: RolePlan, tags: Mapping[str, str]) -> dict[str, Any]:
    return {
        "RoleName": plan.name,
        "AssumeRolePolicyDocument": trust_policy(plan.service),
        "Description": plan.description,
        "Tags": tag_list(tags),
    }


# ---------------------------------------------------------------- EKS cluster
def endpoint_access(spec: ClusterSpec) -> dict[str, bool]:
    """`private-connectivity`: the API server is reachable only from inside the VPC."""
    private = private_connectivity(spec)
    return {"endpointPrivateAccess": private, "endpointPublicAccess": not private}


def logging_config() -> dict[str, Any]:
    return {"clusterLogging": [{"types": list(LOG_TYPES), "enabled": True}]}


def cluster_request(
    *,
    name: str,
    spec: ClusterSpec,
    role_arn: str,
    subnet_ids: Sequence[str],
    security_group_ids: Sequence[str],
    tags: Mapping[str, str],
    token: str,
) -> dict[str, Any]:
    return {
        "name": name,
        "version": spec.kubernetes_version,
        "roleArn": role_arn,
        # No security group of ours with byon (we create nothing in a network we do not own): EKS still
        # makes its own cluster security group.
        "resourcesVpcConfig": {
            "subnetIds": list(subnet_ids),
            **({"securityGroupIds": list(security_group_ids)} if security_group_ids else {}),
            **endpoint_access(spec),
        },
        "logging": logging_config(),
        "tags": dict(tags),
        "clientRequestToken": token,
    }


def enabled_log_types(cluster: Mapping[str, Any]) -> set[str]:
    out: set[str] = set()
    for entry in cluster.get("logging", {}).get("clusterLogging", []):
        if entry.get("enabled"):
            out.update(entry.get("types", []))
    return out


def cluster_updates(spec: ClusterSpec, cluster: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What differs on an existing cluster and EKS can change in place, one update per entry (EKS accepts
    only one kind of change per UpdateClusterConfig call). The version is not among them: an upgrade
    is a rotation, decided by the planner."""
    updates: list[dict[str, Any]] = []
    vpc = cluster.get("resourcesVpcConfig", {})
    want = endpoint_access(spec)
    if any(bool(vpc.get(k)) != v for k, v in want.items()):
        updates.append({"resourcesVpcConfig": want})
    if enabled_log_types(cluster) != set(LOG_TYPES):
        updates.append({"logging": logging_config()})
    return updates


def ca_fingerprint(data: str) -> str:
    """SHA-256 of the cluster CA certificate (DER), from EKS's base64 PEM `certificateAuthority.data`.

    Only the fingerprint goes into events: the installer pins the CA it fetches at run time.
    moto returns random text rather than a base64 PEM certificate: then the raw bytes are hashed,
    which is still stable for the same cluster.
    """
    raw: bytes
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raw = data.encode()
    if b"-----BEGIN CERTIFICATE-----" in raw:
        try:
            raw = ssl.PEM_cert_to_DER_cert(raw.decode("ascii", "replace").strip())
        except ValueError:
            pass
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------- EKS node groups
def ami_type(instance_types: Sequence[str]) -> str:
    """Amazon Linux 2023 for the pool's CPU architecture (AL2 images end with Kubernetes 1.32)."""
    if instance_types and all(_ARM_FAMILY.match(t) for t in instance_types):
        return "AL2023_ARM_64_STANDARD"
    return "AL2023_x86_64_STANDARD"


def scaling(pool: NodePool, desired: int | None = None) -> dict[str, int]:
    """min/max from the pool; desired = min on create, otherwise the current size kept within the bounds.
    EKS needs maxSize ≥ 1: a pool of max 0 gets max 1 and stays at 0 nodes (desired = min = 0)."""
    low, high = pool.min_count, max(pool.max_count, 1)
    want = low if desired is None else min(max(desired, low), high)
    return {"minSize": low, "maxSize": high, "desiredSize": want}


def taints(pool: NodePool) -> list[dict[str, str]]:
    return [{"key": t.key, "value": t.value, "effect": TAINT_EFFECTS[t.effect]} for t in pool.taints]


def nodegroup_request(
    *,
    cluster_name: str,
    pool: NodePool,
    spec: ClusterSpec,
    node_role_arn: str,
    subnet_ids: Sequence[str],
    tags: Mapping[str, str],
    token: str,
) -> dict[str, Any]:
    return {
        "clusterName": cluster_name,
        "nodegroupName": AwsNames.nodegroup(pool.name),
        "version": spec.kubernetes_version,
        "scalingConfig": scaling(pool),
        "subnets": list(subnet_ids),
        "instanceTypes": list(pool.instance_types),
        "amiType": ami_type(pool.instance_types),
        "capacityType": "SPOT" if pool.spot else "ON_DEMAND",
        "nodeRole": node_role_arn,
        "labels": dict(pool.labels),
        "taints": taints(pool),
        "tags": dict(tags),
        "clientRequestToken": token,
    }


def nodegroup_update(pool: NodePool, nodegroup: Mapping[str, Any]) -> dict[str, Any]:
    """The UpdateNodegroupConfig fields that differ between the pool and an existing node group ({} if none).

    Scaling, labels and taints change in place; instance types and capacity type cannot (that
    needs a new node group, i.e. a rotation).
    """
    update: dict[str, Any] = {}
    current = nodegroup.get("scalingConfig", {})
    want = scaling(pool, current.get("desiredSize"))
    if any(current.get(k) != v for k, v in want.items()):
        update["scalingConfig"] = want

    have_labels: dict[str, str] = dict(nodegroup.get("labels") or {})
    add = {k: v for k, v in pool.labels.items() if have_labels.get(k) != v}
    remove = sorted(k for k in have_labels if k not in pool.labels)
    if add or remove:
        update["labels"] = {k: v for k, v in (("addOrUpdateLabels", add), ("removeLabels", remove)) if v}

    have = [
        {"key": t["key"], "value": t.get("value", ""), "effect": t["effect"]} for t in nodegroup.get("taints") or []
    ]
    wanted = taints(pool)
    add_t = [t for t in wanted if t not in have]
    keys = {(t["key"], t["effect"]) for t in wanted}
    remove_t = [t for t in have if (t["key"], t["effect"]) not in keys]
    if add_t or remove_t:
        update["taints"] = {k: v for k, v in (("addOrUpdateTaints", add_t), ("removeTaints", remove_t)) if v}
    return update


def nodegroup_fixed_changes(pool: NodePool, nodegroup: Mapping[str, Any]) -> list[str]:
    """The fields that differ and UpdateNodegroupConfig cannot change (a new node group, i.e. a rotation, can)."""
    out: list[str] = []
    if list(nodegroup.get("instanceTypes") or []) != list(pool.instance_types):
        out.append("instanceTypes")
    if nodegroup.get("capacityType", "ON_DEMAND") != ("SPOT" if pool.spot else "ON_DEMAND"):
        out.append("capacityType")
    return out


# ---------------------------------------------------------------- tags (TagResource / UntagResource)
def tag_changes(have: Mapping[str, str], want: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(tags to add or update, keys to remove) so that a resource's tags become `want`. The spec owns the
    tags of what we create; `aws:` keys are AWS's own (they cannot be changed) and stay."""
    add = {k: v for k, v in want.items() if have.get(k) != v}
    remove = sorted(k for k in have if k not in want and not k.startswith("aws:"))
    return add, remove


# ---------------------------------------------------------------- Kinesis
def stream_request(name: str, tags: Mapping[str, str]) -> dict[str, Any]:
    """On-demand capacity: the log volume of a cluster is unknown up front; no shard count to manage."""
    return {"StreamName": name, "StreamModeDetails": {"StreamMode": "ON_DEMAND"}, "Tags": dict(tags)}
