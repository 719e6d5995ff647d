"""ClusterSpec → Azure Resource Manager request bodies. Pure: no SDK, no I/O.

Every function returns the JSON body ARM receives (camelCase, as documented in the REST
reference), so the unit tests can compare exact bodies, and the driver hands the dicts to
the SDK operations unchanged (the azure-mgmt-* clients accept plain JSON mappings).

Decisions (see the README table for the field-by-field mapping):
- One resource group per cluster (`flotilla-<cluster-id>`) holds everything we create for it,
  also with `byon`: the given VNet stays in its own resource group and is only referenced.
- Azure tag *names* may not contain `/` (nor `<>%&\\?`): our `flotilla.dev/cluster-id` tag is
  written as `flotilla.dev_cluster-id`. Kubernetes node labels keep the `/` form.
- A dedicated, small System agent pool (`system`, CriticalAddonsOnly taint) is created with the
  cluster; every pool of the spec becomes a User pool. The user's first pool may be spot,
  tainted or scale to zero, none of which a System pool allows, and keeping the user's pools out
  of the cluster body means one step (node_pools) owns them and converges them.
- A pool autoscales when maxCount > minCount (enableAutoScaling, minCount, maxCount, initial
  count = minCount); otherwise it has a fixed count. AKS pools have one VM size: instanceTypes[0].
- AAD-integrated, Azure RBAC, local accounts disabled: the kubeconfig AKS hands out then holds
  no secret (kubelogin exec), and the installer authenticates through Azure AD.
- Kubernetes versions are driven by the ClusterSet (rotation / update), never by the cloud:
  auto-upgrade channel `none`.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

from services.cloud_provisioner.providers.base import TAG_CLUSTER, TAG_STEP
from shared.events import ClusterSpec
from shared.events.clusterset import NodePool, Taint

# API versions of the calls that do not go through a typed SDK operation.
ROLE_ASSIGNMENT_API_VERSION = "2022-04-01"
# Built-in role "Network Contributor": the cluster identity must join its subnets and manage load balancers there.
NETWORK_CONTRIBUTOR_ROLE = "4d97b98b-1d4f-4787-a291-c67834d212e7"

# Our own network: AKS's default address plan. Pods use Azure CNI overlay (not VNet addresses),
# so a /16 node subnet holds any pool the spec allows (maxCount <= 5000).
VNET_CIDR = "10.224.0.0/12"
SUBNETS: tuple[tuple[str, str], ...] = (("system", "10.224.0.0/16"), ("user", "10.225.0.0/16"))
POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.0.0.0/16"
DNS_SERVICE_IP = "10.0.0.10"

SYSTEM_POOL = "system"
SYSTEM_VM_SIZE = "Standard_D4ds_v5"
SYSTEM_POOL_MIN, SYSTEM_POOL_MAX = 1, 3
CRITICAL_ADDONS_TAINT = "CriticalAddonsOnly=true:NoSchedule"
# AKS puts this taint on every spot pool and refuses to drop it: we send it too, so a converging
# PUT never fights the service over it.
SPOT_TAINT = "kubernetes.azure.com/scalesetpriority=spot:NoSchedule"
POOL_LABEL = "flotilla.dev/node-pool"  # the spec's pool name (AKS pool names are mangled, see agent_pool_name)

EVENTHUB_NAME = "cluster-logs"
EVENTHUB_PARTITIONS = 4
EVENTHUB_RETENTION_DAYS = 1

_TAG_FORBIDDEN = re.compile(r"[<>%&\\?/]")


# ---------------------------------------------------------------- tags
def azure_tag_key(key: str) -> str:
    """A tag name Azure accepts: `/` and `<>%&\\?` are not allowed in tag names."""
    return _TAG_FORBIDDEN.sub("_", key)


AZ_TAG_CLUSTER = azure_tag_key(TAG_CLUSTER)


def azure_tags(tags: dict[str, str]) -> dict[str, str]:
    """The cluster's tags (ctx.tags(step)) as Azure tags (names fixed, values cut to Azure's 256 chars)."""
    return {azure_tag_key(k)[:512]: v[:256] for k, v in tags.items()}


def group_tags(tags: dict[str, str]) -> dict[str, str]:
    """Tags of the resource group: every step may create it, so it carries no step tag."""
    step_key = azure_tag_key(TAG_STEP)
    return {k: v for k, v in azure_tags(tags).items() if k != step_key}


def is_ours(resource: dict[str, Any], cluster_id: str) -> bool:
    """True if an ARM resource (JSON) carries our cluster-id tag (agent pools keep tags in properties)."""
    tags = resource.get("tags") or (resource.get("properties") or {}).get("tags") or {}
    return tags.get(AZ_TAG_CLUSTER) == cluster_id


# ---------------------------------------------------------------- names
def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def fit(name: str, limit: int) -> str:
    """`name` if it fits, else a prefix plus a digest of the whole (deterministic, still unique)."""
    if len(name) <= limit:
        return name
    return name[: limit - 9].rstrip("-") + "-" + _digest(name)


def agent_pool_name(pool: str) -> str:
    """AKS Linux pool names: 1-12 lowercase letters/digits, starting with a letter.

    A spec name that already qualifies is kept ('infra'); any other ('spark-executor', or our
    reserved 'system') becomes 8 of its characters plus 4 hex of a digest, so two spec names
    that lose the same characters ('a-b', 'ab') still get different pool names.
    """
    if re.fullmatch(r"[a-z][a-z0-9]{0,11}", pool) and pool != SYSTEM_POOL:
        return pool
    base = re.sub(r"[^a-z0-9]", "", pool.lower())
    if not base or not base[0].isalpha():
        base = "p" + base
    return base[:8] + _digest(pool, 4)


@dataclass(frozen=True)
class AzureNames:
    """Deterministic names and ARM ids of everything one cluster owns."""

    subscription_id: str
    cluster_id: str

    @property
    def resource_group(self) -> str:
        return fit(f"flotilla-{self.cluster_id}", 90)

    @property
    def vnet(self) -> str:
        return fit(f"{self.cluster_id}-vnet", 64)

    @property
    def nsg(self) -> str:
        return fit(f"{self.cluster_id}-nsg", 80)

    @property
    def identity(self) -> str:
        return fit(f"{self.cluster_id}-identity", 128)

    @property
    def cluster(self) -> str:
        return fit(self.cluster_id, 63)

    @property
    def dns_prefix(self) -> str:
        return fit(self.cluster_id, 54)

    @property
    def eventhub_namespace(self) -> str:
        # Namespace names are global (<name>.servicebus.windows.net): the digest of subscription and
        # cluster keeps two subscriptions' clusters of the same name apart. 6-50 chars, letter first.
        prefix = f"flotilla-{self.cluster_id}"[:41].rstrip("-")
        return f"{prefix}-{_digest(f'{self.subscription_id}/{self.cluster_id}')}"

    @property
    def eventhub(self) -> str:
        return EVENTHUB_NAME

    # ---- ids
    @property
    def group_id(self) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"

    def _id(self, provider_type: str, name: str) -> str:
        return f"{self.group_id}/providers/{provider_type}/{name}"

    @property
    def vnet_id(self) -> str:
        return self._id("Microsoft.Network/virtualNetworks", self.vnet)

    @property
    def nsg_id(self) -> str:
        return self._id("Microsoft.Network/networkSecurityGroups", self.nsg)

    @property
    def identity_id(self) -> str:
        return self._id("Microsoft.ManagedIdentity/userAssignedIdentities", self.identity)

    @property
    def cluster_arm_id(self) -> str:
        return self._id("Microsoft.ContainerService/managedClusters", self.cluster)

    def agent_pool_id(self, pool: str) -> str:
        return f"{self.cluster_arm_id}/agentPools/{agent_pool_name(pool)}"

    @property
    def eventhub_namespace_id(self) -> str:
        return self._id("Microsoft.EventHub/namespaces", self.eventhub_namespace)

    @property
    def eventhub_id(self) -> str:
        return f"{self.eventhub_namespace_id}/eventhubs/{self.eventhub}"

    def role_assignment_id(self, scope: str) -> str:
        """A role assignment's name is a GUID: derived from cluster and scope, so a retry finds it again."""
        guid = uuid.uuid5(uuid.NAMESPACE_URL, f"flotilla:{self.cluster_id}:{scope.lower()}")
        return f"{scope}/providers/Microsoft.Authorization/roleAssignments/{guid}"

    @property
    def credential_ref(self) -> str:
        return f"aks://{self.subscription_id}/{self.resource_group}/{self.cluster}"


def subnet_ids(network: dict[str, Any]) -> list[str]:
    """Full ARM ids of the network step's subnets. A byon spec may list bare subnet names of its VNet."""
    vnet = str(network.get("network_id") or "")
    out: list[str] = []
    for s in network.get("subnet_ids") or []:
        s = str(s)
        out.append(s if s.startswith("/") else f"{vnet}/subnets/{s}")
    return out


def system_subnet(subnets: list[str]) -> str | None:
    """The first subnet takes the system pool."""
    return subnets[0] if subnets else None


def pool_subnet(subnets: list[str]) -> str | None:
    """User pools go to the second subnet when there is one (ours: 'user'), else share the first."""
    return subnets[1] if len(subnets) > 1 else system_subnet(subnets)


def role_scopes(network: dict[str, Any]) -> list[str]:
    """Where the cluster identity needs Network Contributor: our VNet as a whole, or each given subnet
    of a byon network (least privilege on a network that is not ours)."""
    if network.get("owned", True):
        return [str(network["network_id"])] if network.get("network_id") else []
    return sorted(set(subnet_ids(network)))


# ---------------------------------------------------------------- bodies: network and identity
def resource_group_body(location: str, tags: dict[str, str]) -> dict[str, Any]:
    return {"location": location, "tags": group_tags(tags)}


def nsg_body(location: str, tags: dict[str, str]) -> dict[str, Any]:
    # No custom rules: Azure's defaults (VNet and load balancer in, Internet denied) are what AKS
    # expects; AKS adds its own rules for services of type LoadBalancer.
    return {"location": location, "tags": azure_tags(tags), "properties": {"securityRules": []}}


def vnet_body(location: str, tags: dict[str, str], nsg_id: str) -> dict[str, Any]:
    return {
        "location": location,
        "tags": azure_tags(tags),
        "properties": {
            "addressSpace": {"addressPrefixes": [VNET_CIDR]},
            "subnets": [
                {"name": name, "properties": {"addressPrefix": cidr, "networkSecurityGroup": {"id": nsg_id}}}
                for name, cidr in SUBNETS
            ],
        },
    }


def identity_body(location: str, tags: dict[str, str]) -> dict[str, Any]:
    return {"location": location, "tags": azure_tags(tags)}


def role_assignment_body(subscription_id: str, principal_id: str, cluster_id: str) -> dict[str, Any]:
    # Role assignments have no tags: the description names the cluster, and a delete checks it.
    return {
        "properties": {
            "roleDefinitionId": f"/subscriptions/{subscription_id}/providers/Microsoft.Authorization/"
                                f"roleDefinitions/{NETWORK_CONTRIBUTOR_ROLE}",
            "principalId": principal_id,
            "principalType": "ServicePrincipal",
            "description": role_assignment_marker(cluster_id),
        }
    }  # fmt: skip


def role_assignment_marker(cluster_id: str) -> str:
    return f"{TAG_CLUSTER}={cluster_id}"


# ---------------------------------------------------------------- bodies: cluster and pools
def taint_string(taint: Taint) -> str:
    """AKS nodeTaints syntax: 'key=value:Effect' ('key:Effect' without a value)."""
    return f"{taint.key}={taint.value}:{taint.effect}" if taint.value else f"{taint.key}:{taint.effect}"


def _scaling(min_count: int, max_count: int) -> dict[str, Any]:
    if max_count > min_count:
        return {"enableAutoScaling": True, "minCount": min_count, "maxCount": max_count, "count": min_count}
    return {"enableAutoScaling": False, "count": min_count}


def scaling_of(profile: dict[str, Any]) -> tuple[bool, int | None, int | None]:
    """(autoscaling, min, max) of an agent pool's properties, for converging an existing pool."""
    if profile.get("enableAutoScaling"):
        return True, profile.get("minCount"), profile.get("maxCount")
    return False, profile.get("count"), profile.get("count")


def wanted_scaling(pool: NodePool) -> tuple[bool, int | None, int | None]:
    body = _scaling(pool.min_count, pool.max_count)
    if body["enableAutoScaling"]:
        return True, pool.min_count, pool.max_count
    return False, pool.min_count, pool.min_count


# Node labels AKS sets itself (e.g. kubernetes.azure.com/scalesetpriority on spot pools): never ours to converge.
AKS_LABEL_PREFIX = "kubernetes.azure.com/"


def agent_pool_drift(found: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Which in-place fields of an existing agent pool's properties differ from the wanted ones (a PUT fixes them):
    'scaling', 'nodeLabels', 'nodeTaints', 'tags'. Taint order does not matter; AKS's own labels are ignored."""
    out: list[str] = []
    if scaling_of(found) != scaling_of(want):
        out.append("scaling")
    labels = {k: v for k, v in (found.get("nodeLabels") or {}).items() if not k.startswith(AKS_LABEL_PREFIX)}
    if labels != {k: v for k, v in (want.get("nodeLabels") or {}).items() if not k.startswith(AKS_LABEL_PREFIX)}:
        out.append("nodeLabels")
    if sorted(found.get("nodeTaints") or []) != sorted(want.get("nodeTaints") or []):
        out.append("nodeTaints")
    if (found.get("tags") or {}) != (want.get("tags") or {}):
        out.append("tags")
    return out


def agent_pool_fixed_changes(found: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The fields that differ and no PUT can change on an existing pool (a new pool, i.e. a rotation, can)."""
    out: list[str] = []
    if str(found.get("vmSize") or "").lower() != str(want.get("vmSize") or "").lower():
        out.append("vmSize")
    if (found.get("scaleSetPriority") or "Regular") != (want.get("scaleSetPriority") or "Regular"):
        out.append("scaleSetPriority")
    return out


def agent_pool_properties(pool: NodePool, kubernetes_version: str, tags: dict[str, str],
                          subnet_id: str | None) -> dict[str, Any]:  # fmt: skip
    """The properties of one User agent pool (the body of PUT .../agentPools/<name> is {"properties": ...})."""
    props: dict[str, Any] = {
        "mode": "User",
        "type": "VirtualMachineScaleSets",
        "osType": "Linux",
        "vmSize": pool.instance_types[0],
        "orchestratorVersion": kubernetes_version,
        **_scaling(pool.min_count, pool.max_count),
        "nodeLabels": {**pool.labels, POOL_LABEL: pool.name},
        "nodeTaints": [taint_string(t) for t in pool.taints],
        "tags": azure_tags(tags),
    }
    if pool.spot:
        props.update({"scaleSetPriority": "Spot", "scaleSetEvictionPolicy": "Delete", "spotMaxPrice": -1})
        props["nodeTaints"] = [*props["nodeTaints"], SPOT_TAINT]
    if subnet_id:
        props["vnetSubnetID"] = subnet_id
    return props


def agent_pool_body(pool: NodePool, kubernetes_version: str, tags: dict[str, str],
                    subnet_id: str | None) -> dict[str, Any]:  # fmt: skip
    return {"properties": agent_pool_properties(pool, kubernetes_version, tags, subnet_id)}


def system_pool_profile(kubernetes_version: str, tags: dict[str, str], subnet_id: str | None,
                        vm_size: str = SYSTEM_VM_SIZE) -> dict[str, Any]:  # fmt: skip
    profile: dict[str, Any] = {
        "name": SYSTEM_POOL,
        "mode": "System",
        "type": "VirtualMachineScaleSets",
        "osType": "Linux",
        "vmSize": vm_size,
        "orchestratorVersion": kubernetes_version,
        **_scaling(SYSTEM_POOL_MIN, SYSTEM_POOL_MAX),
        "nodeTaints": [CRITICAL_ADDONS_TAINT],
        "tags": azure_tags(tags),
    }
    if subnet_id:
        profile["vnetSubnetID"] = subnet_id
    return profile


def managed_cluster_body(spec: ClusterSpec, location: str, tags: dict[str, str], names: AzureNames,
                         identity_id: str, system_subnet_id: str | None,
                         system_vm_size: str = SYSTEM_VM_SIZE) -> dict[str, Any]:  # fmt: skip
    private = "private-connectivity" in spec.features
    props: dict[str, Any] = {
        "kubernetesVersion": spec.kubernetes_version,
        "dnsPrefix": names.dns_prefix,
        "enableRBAC": True,
        "aadProfile": {"managed": True, "enableAzureRBAC": True},
        "disableLocalAccounts": True,
        "autoUpgradeProfile": {"upgradeChannel": "none"},
        "agentPoolProfiles": [system_pool_profile(spec.kubernetes_version, tags, system_subnet_id, system_vm_size)],
        "networkProfile": {
            "networkPlugin": "azure",
            "networkPluginMode": "overlay",
            "networkPolicy": "azure",  # default-deny policies of hard-multi-tenancy need an enforcing plugin
            "podCidr": POD_CIDR,
            "serviceCidr": SERVICE_CIDR,
            "dnsServiceIP": DNS_SERVICE_IP,
            "loadBalancerSku": "standard",
            "outboundType": "loadBalancer",
        },
    }
    if private:
        props["apiServerAccessProfile"] = {"enablePrivateCluster": True}
    return {
        "location": location,
        "tags": azure_tags(tags),
        "sku": {"name": "Base", "tier": "Standard"},  # the uptime SLA tier: these clusters run production work
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {identity_id: {}}},
        "properties": props,
    }


def tags_body(tags: dict[str, str]) -> dict[str, Any]:
    """PATCH .../managedClusters/<name> (updateTags): the cluster's tags become exactly these."""
    return {"tags": azure_tags(tags)}


def cluster_endpoint(cluster: dict[str, Any], private: bool) -> str:
    """The API server address: the private FQDN of a private cluster, else the public one."""
    props = cluster.get("properties") or {}
    host = (props.get("privateFQDN") if private else None) or props.get("fqdn") or props.get("privateFQDN")
    if not host:
        raise ValueError("managed cluster has no FQDN yet")
    return f"https://{host}:443"


# ---------------------------------------------------------------- bodies: log stream
def eventhub_namespace_body(location: str, tags: dict[str, str]) -> dict[str, Any]:
    return {"location": location, "tags": azure_tags(tags), "sku": {"name": "Standard", "tier": "Standard",
                                                                     "capacity": 1}}  # fmt: skip


def eventhub_body() -> dict[str, Any]:
    return {"properties": {"partitionCount": EVENTHUB_PARTITIONS, "messageRetentionInDays": EVENTHUB_RETENTION_DAYS}}
