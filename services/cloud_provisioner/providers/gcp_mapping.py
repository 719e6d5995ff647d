"""ClusterSpec → GCP API requests (GKE v1, Compute v1, IAM v1, Pub/Sub v1). Pure: no I/O, unit-tested.

Decisions this module encodes (each one is visible in the request bodies):
- Names are deterministic functions of the cluster id, so a retried or replayed step finds what an
  earlier attempt made: network `<id>-net`, subnetwork `<id>-nodes`, firewall `<id>-internal`, GKE
  cluster `<id>` (≤ 40 chars), topic `<id>-logs`, node service account `<id[:21]>-<sha8>` (IAM account
  ids are 6–30 chars, so that one always carries a hash of the full id). A name that does not fit is
  cut and suffixed with 8 hex chars of SHA-256(cluster id), so two long ids never share a name.
- Ownership: GKE clusters, node pools (through `config.resourceLabels`) and Pub/Sub topics carry
  labels. GCP label keys and values allow only `[-_a-z0-9]` (keys start with a letter, ≤ 63 chars),
  so tags are sanitised: lowercase, `.` → `-`, `/` → `_`, anything else → `_`; e.g.
  `flotilla.dev/cluster-id` → `flotilla-dev_cluster-id`, `costCenter` → `costcenter`. Compute
  networks, subnetworks, firewalls and IAM service accounts have no labels: they carry the marker
  `flotilla.dev/cluster-id=<id>` as a whitespace-separated token of their description, and a
  resource with our name but without our marker is never adopted or deleted.
- Network (feature `byon` aside): custom-mode VPC, one regional subnetwork 10.0.0.0/20 with Private
  Google Access (private nodes pull images without NAT) and two secondary ranges, `pods`
  10.16.0.0/14 and `services` 10.20.0.0/20 (VPC-native cluster), and one ingress firewall rule that
  lets nodes and pods talk to each other. Every cluster has its own VPC, so fixed ranges never clash.
- GKE cluster: regional (location = the region), `initialClusterVersion` = kubernetesVersion (GKE
  picks the newest patch; a version its channel does not offer fails as UnsupportedVersion), the
  network/subnetwork and secondary ranges above, `resourceLabels` = the sanitised tags.
  `private-connectivity` → private nodes + private endpoint (master 172.16.0.0/28) with master
  authorised networks on (GKE requires it for a private endpoint). `hard-multi-tenancy` → GKE
  Dataplane V2 (ADVANCED_DATAPATH), which enforces the default-deny NetworkPolicies the installer
  applies. GKE cannot create a cluster without a node pool: it is created with a one-node-per-zone
  `flotilla-bootstrap` pool (e2-small, the node service account) that the cluster step deletes as soon
  as the cluster runs, so the node_pools step alone decides which nodes exist (as Terraform's
  `remove_default_node_pool` does).
- Node pools: one per spec pool, same name; machine type = instanceTypes[0] (a GKE pool has one
  machine type; the others are ignored); `spot` → `config.spot`; labels → Kubernetes node labels;
  taints with effect NoSchedule/PreferNoSchedule/NoExecute → NO_SCHEDULE/PREFER_NO_SCHEDULE/NO_EXECUTE;
  autoscaling with `totalMin/MaxNodeCount` = min/maxCount (cluster-wide, not per zone), location
  policy ANY for spot (take capacity wherever it is) and BALANCED otherwise; `initialNodeCount` is
  per zone: ceil(minCount / 3) (3 zones per region), lowered to maxCount // 3 when that would exceed
  maxCount. Nodes run as the node service account with the cloud-platform scope (IAM decides).
- Node service account: granted `roles/container.defaultNodeServiceAccount` on the project (logs,
  metrics), nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import ssl
from dataclasses import dataclass
from typing import Any

from google.cloud import compute_v1, container_v1
from google.pubsub_v1 import types as pubsub_types

from services.cloud_provisioner.providers.base import TAG_CLUSTER, TAG_CLUSTERSET, ClusterContext
from shared.events import ClusterSpec
from shared.events.clusterset import NodePool

# ---------------------------------------------------------------- constants (see the module docstring)
NODES_CIDR = "10.0.0.0/20"
PODS_RANGE, PODS_CIDR = "pods", "10.16.0.0/14"
SERVICES_RANGE, SERVICES_CIDR = "services", "10.20.0.0/20"
MASTER_CIDR = "172.16.0.0/28"
BOOTSTRAP_POOL = "flotilla-bootstrap"
BOOTSTRAP_MACHINE_TYPE = "e2-small"
ZONES_PER_REGION = 3
OAUTH_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
NODE_ROLES = ("roles/container.defaultNodeServiceAccount",)

TAINT_EFFECTS: dict[str, int] = {  # proto enums are ints
    "NoSchedule": container_v1.NodeTaint.Effect.NO_SCHEDULE,
    "PreferNoSchedule": container_v1.NodeTaint.Effect.PREFER_NO_SCHEDULE,
    "NoExecute": container_v1.NodeTaint.Effect.NO_EXECUTE,
}

_LABEL_MAX = 63
_HASH_LEN = 8


# ---------------------------------------------------------------- names
def _hash(cluster_id: str) -> str:
    return hashlib.sha256(cluster_id.encode()).hexdigest()[:_HASH_LEN]


def _stem(cluster_id: str) -> str:
    """The cluster id as a GCP name stem: lowercase RFC 1035 characters, starting with a letter."""
    stem = re.sub(r"[^a-z0-9-]", "-", cluster_id.lower())
    return stem if stem[:1].isalpha() else f"c-{stem}"


def fit_name(cluster_id: str, suffix: str, limit: int, *, always_hash: bool = False) -> str:
    """`<stem>-<suffix>` if it fits in `limit`, else the stem cut and suffixed with a hash of the full id."""
    stem = _stem(cluster_id)
    tail = f"-{suffix}" if suffix else ""
    whole = stem + tail
    if len(whole) <= limit and not always_hash and stem == cluster_id:
        return whole
    room = limit - len(tail) - _HASH_LEN - 1
    return f"{stem[:room].rstrip('-')}-{_hash(cluster_id)}{tail}"


@dataclass(frozen=True)
class Names:
    network: str
    subnetwork: str
    firewall: str
    service_account_id: str
    cluster: str
    topic: str


def names_for(cluster_id: str) -> Names:
    return Names(
        network=fit_name(cluster_id, "net", 63),
        subnetwork=fit_name(cluster_id, "nodes", 63),
        firewall=fit_name(cluster_id, "internal", 63),
        service_account_id=fit_name(cluster_id, "", 30, always_hash=True),
        cluster=fit_name(cluster_id, "", 40),
        topic=fit_name(cluster_id, "logs", 255),
    )


def pool_name(name: str) -> str:
    """GKE node pool names start with a letter; spec pool names may start with a digit."""
    return name if name[:1].isalpha() else f"p-{name}"[:40]


def service_account_email(account_id: str, project: str) -> str:
    return f"{account_id}@{project}.iam.gserviceaccount.com"


@dataclass(frozen=True)
class Paths:
    """Relative resource names the APIs use, for one cluster in one project and region."""

    project: str
    region: str
    names: Names

    @property
    def location(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    @property
    def cluster(self) -> str:
        return f"{self.location}/clusters/{self.names.cluster}"

    def node_pool(self, name: str) -> str:
        return f"{self.cluster}/nodePools/{name}"

    def operation(self, name: str) -> str:
        return f"{self.location}/operations/{name}"

    @property
    def network(self) -> str:
        return f"projects/{self.project}/global/networks/{self.names.network}"

    @property
    def subnetwork(self) -> str:
        return f"projects/{self.project}/regions/{self.region}/subnetworks/{self.names.subnetwork}"

    @property
    def topic(self) -> str:
        return f"projects/{self.project}/topics/{self.names.topic}"

    @property
    def service_account(self) -> str:
        return service_account_email(self.names.service_account_id, self.project)


# ---------------------------------------------------------------- labels and ownership markers
def label_key(key: str) -> str:
    out = re.sub(r"[^-_a-z0-9]", "_", key.lower().replace(".", "-").replace("/", "_"))
    return (out if out[:1].isalpha() else f"k{out}")[:_LABEL_MAX]


def label_value(value: str) -> str:
    return re.sub(r"[^-_a-z0-9]", "_", value.lower())[:_LABEL_MAX]


def gcp_labels(tags: dict[str, str]) -> dict[str, str]:
    """Tags as GCP labels (sanitised; see the module docstring). Later keys win a sanitising clash."""
    return {label_key(k): label_value(v) for k, v in tags.items()}


CLUSTER_LABEL = label_key(TAG_CLUSTER)


def labelled_ours(labels: Any, cluster_id: str) -> bool:
    return bool(labels) and labels.get(CLUSTER_LABEL) == label_value(cluster_id)


def marker(cluster_id: str) -> str:
    return f"{TAG_CLUSTER}={cluster_id}"


def described_ours(description: str | None, cluster_id: str) -> bool:
    """True when the description carries our marker as a whole token (so `x-1` never matches `x-10`)."""
    return marker(cluster_id) in (description or "").split()


def description(ctx: ClusterContext, what: str) -> str:
    return f"{marker(ctx.cluster_id)} {TAG_CLUSTERSET}={ctx.clusterset} flotilla {what} of cluster {ctx.cluster_id}"


# ---------------------------------------------------------------- network (Compute v1)
def network_body(ctx: ClusterContext, names: Names) -> compute_v1.Network:
    return compute_v1.Network(name=names.network, auto_create_subnetworks=False,
                              description=description(ctx, "VPC network"))  # fmt: skip


def subnetwork_body(ctx: ClusterContext, paths: Paths) -> compute_v1.Subnetwork:
    return compute_v1.Subnetwork(
        name=paths.names.subnetwork, network=paths.network, region=paths.region, ip_cidr_range=NODES_CIDR,
        private_ip_google_access=True, description=description(ctx, "node subnetwork"),
        secondary_ip_ranges=[
            compute_v1.SubnetworkSecondaryRange(range_name=PODS_RANGE, ip_cidr_range=PODS_CIDR),
            compute_v1.SubnetworkSecondaryRange(range_name=SERVICES_RANGE, ip_cidr_range=SERVICES_CIDR),
        ],
    )  # fmt: skip


def firewall_body(ctx: ClusterContext, paths: Paths) -> compute_v1.Firewall:
    return compute_v1.Firewall(
        name=paths.names.firewall, network=paths.network, direction="INGRESS", priority=1000,
        source_ranges=[NODES_CIDR, PODS_CIDR], description=description(ctx, "internal traffic rule"),
        allowed=[compute_v1.Allowed(I_p_protocol=p) for p in ("tcp", "udp", "icmp")],
    )  # fmt: skip


# ---------------------------------------------------------------- iam (IAM v1 REST, JSON)
def service_account_body(ctx: ClusterContext, names: Names) -> dict[str, Any]:
    return {
        "accountId": names.service_account_id,
        "serviceAccount": {
            "displayName": f"flotilla nodes {ctx.cluster_id}"[:100],
            # The marker first: the description is cut at 256 characters.
            "description": description(ctx, "GKE node service account")[:256],
        },
    }


def with_members(policy: dict[str, Any], roles: tuple[str, ...], member: str) -> dict[str, Any] | None:
    """The policy with `member` bound to every role in `roles`; None when it already is (no write)."""
    bindings = [dict(b) for b in policy.get("bindings", [])]
    changed = False
    for role in roles:
        binding = next((b for b in bindings if b.get("role") == role and not b.get("condition")), None)
        if binding is None:
            bindings.append({"role": role, "members": [member]})
            changed = True
        elif member not in binding.get("members", []):
            binding["members"] = [*binding.get("members", []), member]
            changed = True
    return {**policy, "bindings": bindings} if changed else None


def without_member(policy: dict[str, Any], member: str) -> dict[str, Any] | None:
    """The policy with `member` removed from every binding (empty bindings dropped); None if absent."""
    if not any(member in b.get("members", []) for b in policy.get("bindings", [])):
        return None
    bindings = []
    for b in policy.get("bindings", []):
        members = [m for m in b.get("members", []) if m != member]
        if members:
            bindings.append({**b, "members": members})
    return {**policy, "bindings": bindings}


# ---------------------------------------------------------------- cluster (GKE v1)
@dataclass(frozen=True)
class NetworkRef:
    """Where the cluster goes: our network (with its secondary ranges) or an adopted (byon) one."""

    network: str
    subnetwork: str
    pods_range: str | None = None
    services_range: str | None = None


def network_ref(ctx: ClusterContext, paths: Paths) -> NetworkRef:
    """From what the network step reported (ours or byon), else our deterministic names."""
    net = ctx.resources.get("network") or {}
    if net.get("owned") is False:
        subnets = list(net.get("subnet_ids") or [])
        # byon: GKE allocates the pod/service ranges itself in the given subnetwork.
        return NetworkRef(network=str(net.get("network_id", "")), subnetwork=str(subnets[0]) if subnets else "")
    subnets = list(net.get("subnet_ids") or [paths.subnetwork])
    return NetworkRef(network=str(net.get("network_id") or paths.network), subnetwork=str(subnets[0]),
                      pods_range=str(net.get("pods_range") or PODS_RANGE),
                      services_range=str(net.get("services_range") or SERVICES_RANGE))  # fmt: skip


def cluster_body(ctx: ClusterContext, spec: ClusterSpec, names: Names, net: NetworkRef, sa_email: str
                 ) -> container_v1.Cluster:  # fmt: skip
    private = "private-connectivity" in spec.features
    labels = gcp_labels(ctx.tags("cluster"))
    cluster = container_v1.Cluster(
        name=names.cluster,
        description=description(ctx, "GKE cluster"),
        initial_cluster_version=spec.kubernetes_version,
        network=net.network,
        subnetwork=net.subnetwork,
        ip_allocation_policy=container_v1.IPAllocationPolicy(
            use_ip_aliases=True, cluster_secondary_range_name=net.pods_range or "",
            services_secondary_range_name=net.services_range or "",
        ),
        resource_labels=labels,
        node_pools=[container_v1.NodePool(
            name=BOOTSTRAP_POOL, initial_node_count=1,
            config=container_v1.NodeConfig(machine_type=BOOTSTRAP_MACHINE_TYPE, service_account=sa_email,
                                           oauth_scopes=list(OAUTH_SCOPES), resource_labels=labels),
        )],
    )  # fmt: skip
    if private:
        cluster.private_cluster_config = container_v1.PrivateClusterConfig(
            enable_private_nodes=True, enable_private_endpoint=True, master_ipv4_cidr_block=MASTER_CIDR
        )
        cluster.master_authorized_networks_config = container_v1.MasterAuthorizedNetworksConfig(enabled=True)
    if "hard-multi-tenancy" in spec.features:
        cluster.network_config = container_v1.NetworkConfig(
            datapath_provider=container_v1.DatapathProvider.ADVANCED_DATAPATH
        )
    return cluster


def ca_fingerprint(cluster_ca_certificate: str) -> str:
    """'sha256:<hex>' of the CA certificate (DER, as `openssl x509 -fingerprint -sha256` shows it).

    GKE gives the certificate base64-encoded PEM; the certificate itself never leaves the driver."""
    try:
        raw = base64.b64decode(cluster_ca_certificate, validate=False)
    except (binascii.Error, ValueError):
        raw = cluster_ca_certificate.encode()
    try:
        der = ssl.PEM_cert_to_DER_cert(raw.decode("ascii"))
    except (ValueError, UnicodeDecodeError, binascii.Error):
        der = raw
    return "sha256:" + hashlib.sha256(der).hexdigest()


def credential_ref(project: str, region: str, cluster_name: str) -> str:
    """What the installer resolves at run time (google-auth token + the cluster's endpoint/CA): never a secret."""
    return f"gke://{project}/{region}/{cluster_name}"


# ---------------------------------------------------------------- node pools (GKE v1)
def initial_node_count(pool: NodePool) -> int:
    """Per zone: the pool starts with at least minCount nodes in a 3-zone region, never above maxCount."""
    per_zone = math.ceil(pool.min_count / ZONES_PER_REGION)
    if per_zone * ZONES_PER_REGION > pool.max_count:
        per_zone = pool.max_count // ZONES_PER_REGION
    return per_zone


def autoscaling_for(pool: NodePool) -> container_v1.NodePoolAutoscaling:
    if pool.max_count == 0:
        return container_v1.NodePoolAutoscaling(enabled=False)
    policy = container_v1.NodePoolAutoscaling.LocationPolicy
    return container_v1.NodePoolAutoscaling(
        enabled=True, total_min_node_count=pool.min_count, total_max_node_count=pool.max_count,
        location_policy=policy.ANY if pool.spot else policy.BALANCED,
    )  # fmt: skip


def autoscaling_matches(current: container_v1.NodePoolAutoscaling, wanted: container_v1.NodePoolAutoscaling) -> bool:
    return (current.enabled, current.total_min_node_count, current.total_max_node_count) == (
        wanted.enabled, wanted.total_min_node_count, wanted.total_max_node_count)  # fmt: skip


# Labels GKE puts on resources itself ("goog-..."): never ours to compare, change or remove.
GKE_LABEL_PREFIX = "goog-"


def _own(labels: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(labels or {}).items() if not str(k).startswith(GKE_LABEL_PREFIX)}


def with_gke_labels(found: Any, wanted: dict[str, str]) -> dict[str, str]:
    """The labels to set: ours as wanted, GKE's own kept as they are."""
    return {**{k: v for k, v in dict(found or {}).items() if str(k).startswith(GKE_LABEL_PREFIX)}, **wanted}


def labels_differ(found: Any, wanted: Any) -> bool:
    return _own(found) != _own(wanted)


def pool_fixed_changes(found: container_v1.NodePool, wanted: container_v1.NodePool) -> list[str]:
    """The fields that differ and no node-pool update changes in place here (a new pool, i.e. a rotation, can)."""
    out: list[str] = []
    if found.config.machine_type != wanted.config.machine_type:
        out.append("machineType")
    if bool(found.config.spot) != bool(wanted.config.spot):
        out.append("spot")
    return out


def _taints(pool: container_v1.NodePool) -> list[tuple[str, str, int]]:
    return sorted((t.key, t.value, int(t.effect)) for t in pool.config.taints)


def pool_update_request(name: str, found: container_v1.NodePool, wanted: container_v1.NodePool
                        ) -> container_v1.UpdateNodePoolRequest | None:  # fmt: skip
    """UpdateNodePool with only what differs of the pool's Kubernetes labels, taints and resource labels (each
    given replaces the whole set), or None when nothing does."""
    request = container_v1.UpdateNodePoolRequest(name=name)
    if dict(found.config.labels) != dict(wanted.config.labels):
        request.labels = container_v1.NodeLabels(labels=dict(wanted.config.labels))
    if _taints(found) != _taints(wanted):
        request.taints = container_v1.NodeTaints(taints=list(wanted.config.taints))
    if labels_differ(found.config.resource_labels, wanted.config.resource_labels):
        labels = with_gke_labels(found.config.resource_labels, dict(wanted.config.resource_labels))
        request.resource_labels = container_v1.ResourceLabels(labels=labels)
    changed = any(field in request for field in ("labels", "taints", "resource_labels"))
    return request if changed else None


def cluster_labels_request(name: str, found: container_v1.Cluster, wanted: dict[str, str]
                           ) -> container_v1.SetLabelsRequest | None:  # fmt: skip
    """SetLabels (the fingerprint guards against a concurrent change) when the cluster's labels differ."""
    if not labels_differ(found.resource_labels, wanted):
        return None
    return container_v1.SetLabelsRequest(name=name, resource_labels=with_gke_labels(found.resource_labels, wanted),
                                         label_fingerprint=found.label_fingerprint)  # fmt: skip


def node_pool_body(ctx: ClusterContext, pool: NodePool, sa_email: str) -> container_v1.NodePool:
    return container_v1.NodePool(
        name=pool_name(pool.name),
        initial_node_count=initial_node_count(pool),
        config=container_v1.NodeConfig(
            machine_type=pool.instance_types[0],
            spot=pool.spot,
            labels=dict(pool.labels),
            taints=[container_v1.NodeTaint(key=t.key, value=t.value, effect=TAINT_EFFECTS[t.effect])
                    for t in pool.taints],
            service_account=sa_email,
            oauth_scopes=list(OAUTH_SCOPES),
            resource_labels=gcp_labels(ctx.tags("node_pools")),
        ),
        autoscaling=autoscaling_for(pool),
    )  # fmt: skip


# ---------------------------------------------------------------- log stream (Pub/Sub v1)
def topic_body(ctx: ClusterContext, paths: Paths) -> pubsub_types.Topic:
    return pubsub_types.Topic(name=paths.topic, labels=gcp_labels(ctx.tags("log_stream")))
