"""The azure driver at the HTTP boundary: the real azure-mgmt-* clients against the fake ARM in tests/fakes.

The fake is served over TLS with a throwaway self-signed certificate that the SDK trusts as its CA
bundle (`connection_verify=<cert file>`), so Azure's bearer-token policy runs unchanged; the token
comes from a static fake credential. The last tests run the provisioner service in-process
(real nats-server and redis-server) with this driver behind it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from redis.asyncio import Redis

from services.cloud_provisioner import core
from services.cloud_provisioner.app import DURABLE, SERVICE
from services.cloud_provisioner.providers import ProviderRegistry, build_registry
from services.cloud_provisioner.providers import azure_mapping as m
from services.cloud_provisioner.providers.azure import AzureProvider, build
from services.cloud_provisioner.providers.base import (
    ClusterContext,
    NotInPlaceError,
    QuotaExceededError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
)
from shared.bus import Bus
from shared.config import Settings
from shared.events import Envelope, Location
from shared.events.models import PROVISION_STEPS, ClusterProvisioned, ClusterRequested, ProvisionStep
from shared.service import ServiceContext
from tests.fakes.azure_arm import FakeArm
from tests.helpers import (
    BYON,
    cluster_requested,
    consumer_drained,
    fleet_events,
    from_planner,
    provisioner_service,
    retirement_requested,
    wait_until,
)
from tests.unit.test_provisioner_core import changed_spec, with_pool

SUB = "00000000-0000-0000-0000-000000000001"
BYON_VNET = "/subscriptions/0000/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/shared-vnet"
AKS_API, NET_API, MSI_API, EH_API, RG_API = "2026-08-01", "2026-03-01", "2024-11-30", "2026-01-01", "2025-04-01"


class StaticCredential:
    """A TokenCredential that hands out a fixed token (the fake accepts any bearer token)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("fake-token", int(time.time()) + 3600)


@pytest.fixture
def arm() -> Iterator[FakeArm]:
    fake = FakeArm(polls=1, subscription_id=SUB).start()
    # The user's network of the byon example, in the network team's resource group and subscription.
    fake.put("/subscriptions/0000/resourceGroups/net", {"location": "westeurope", "tags": {"team": "network"}})
    fake.put(BYON_VNET, {"location": "westeurope", "tags": {"team": "network"}, "properties": {
        "addressSpace": {"addressPrefixes": ["10.50.0.0/16"]},
        "subnets": [{"name": "snet-a", "properties": {"addressPrefix": "10.50.0.0/20"}},
                    {"name": "snet-b", "properties": {"addressPrefix": "10.50.16.0/20"}}]}})  # fmt: skip
    yield fake
    fake.stop()


def make_provider(arm: FakeArm, **client_kwargs: Any) -> AzureProvider:
    kwargs = {"connection_verify": str(arm.ca_file), "retry_total": 0, **client_kwargs}
    return AzureProvider(StaticCredential(), SUB, base_url=arm.base_url, poll_s=0.01, timeout_s=10.0,
                         client_kwargs=kwargs)  # fmt: skip


@pytest.fixture
def provider(arm: FakeArm) -> Iterator[AzureProvider]:
    p = make_provider(arm)
    yield p
    p.close()


def modelserving_on_azure(suffix: str = "0001") -> ClusterRequested:
    """The modelserving example (private-connectivity, tags, a fixed-size pool) placed in an Azure region."""
    req = cluster_requested("modelserving-prod-aws-us-east-1", suffix)
    return req.model_copy(update={"location": Location(env="prod", cloud="azure", region="eastus")})


def ctx_for(req: ClusterRequested, resources: dict[str, dict[str, Any]] | None = None,
            spec: bool = True) -> ClusterContext:  # fmt: skip
    return ClusterContext(req.cluster_id, req.clusterset, req.location, req.spec if spec else None,
                          dict(resources or {}))  # fmt: skip


async def provision(p: AzureProvider, req: ClusterRequested) -> dict[str, dict[str, Any]]:
    """Every step in order, the way the core chains them (a byon network is adopted, not ensured)."""
    out: dict[str, dict[str, Any]] = {}
    for step in PROVISION_STEPS:
        if step == "network" and "byon" in req.spec.features:
            out[step] = core.byon_network(req.spec)
            continue
        out[step] = await p.ensure(step, ctx_for(req, out))
    return out


async def deprovision(p: AzureProvider, req: ClusterRequested, res: dict[str, dict[str, Any]]) -> None:
    for step in reversed(PROVISION_STEPS):
        if res.get(step, {}).get("owned") is False:
            continue  # the core never asks to delete an adopted network
        await p.delete(step, ctx_for(req, res), res.get(step))


def bodies(arm: FakeArm, type_suffix: str, method: str = "PUT") -> dict[str, Any]:
    return {r.path.rsplit("/", 1)[-1]: r.body for r in arm.calls(method, type_suffix)}


def fingerprint_of(pem: bytes) -> str:
    return "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def ours_left(arm: FakeArm, cluster_id: str) -> list[str]:
    """Ids of resources in the fake tagged with this cluster, or inside its resource group."""
    group = m.AzureNames(SUB, cluster_id).group_id.lower()
    out = []
    for rid in arm.ids():
        res = arm.get(rid) or {}
        if m.is_ours(res, cluster_id) or rid.lower() == group or rid.lower().startswith(group + "/"):
            out.append(rid)
    return out


# ---------------------------------------------------------------- request bodies
async def test_dataeng_byon_example_request_bodies(arm: FakeArm, provider: AzureProvider) -> None:
    req = cluster_requested(BYON)
    cid = req.cluster_id
    names = m.AzureNames(SUB, cid)
    byon_before = arm.get(BYON_VNET)
    res = await provision(provider, req)
    ctx = ctx_for(req)

    def tags(step: ProvisionStep, **extra: str) -> dict[str, str]:
        return m.azure_tags({**ctx.tags(step), **extra})

    # Resource group (no step tag), identity.
    group_body = {"location": "westeurope", "tags": m.group_tags(ctx.tags("iam"))}
    assert arm.calls("PUT", "resourceGroups")[0].body == group_body
    assert arm.calls("PUT", "resourceGroups")[0].api_version == RG_API
    assert bodies(arm, "userAssignedIdentities") == {names.identity: {"location": "westeurope", "tags": tags("iam")}}
    # Network Contributor for the identity on each given subnet (the VNet itself is never written).
    principal = res["iam"]["principal_id"]
    subnet_a, subnet_b = f"{BYON_VNET}/subnets/snet-a", f"{BYON_VNET}/subnets/snet-b"
    ra = {r.path: r.body for r in arm.calls("PUT", "roleAssignments")}
    assert ra == {names.role_assignment_id(s): m.role_assignment_body(SUB, principal, cid)
                  for s in (subnet_a, subnet_b)}  # fmt: skip
    assert {r.api_version for r in arm.calls("PUT", "roleAssignments")} == {m.ROLE_ASSIGNMENT_API_VERSION}
    assert principal and res["iam"]["role_assignments"] == sorted(ra)

    # The managed cluster: user-assigned identity, public API server, system pool on the first subnet.
    (mc,) = arm.calls("PUT", "managedClusters")
    assert mc.api_version == AKS_API
    system = {"name": "system", "mode": "System", "type": "VirtualMachineScaleSets", "osType": "Linux",
              "vmSize": "Standard_D4ds_v5", "orchestratorVersion": "1.30", "enableAutoScaling": True, "minCount": 1,
              "maxCount": 3, "count": 1, "nodeTaints": ["CriticalAddonsOnly=true:NoSchedule"],
              "tags": tags("cluster"), "vnetSubnetID": subnet_a}  # fmt: skip
    assert mc.body == {
        "location": "westeurope",
        "tags": tags("cluster"),
        "sku": {"name": "Base", "tier": "Standard"},
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {names.identity_id: {}}},
        "properties": {
            "kubernetesVersion": "1.30", "dnsPrefix": cid, "enableRBAC": True,
            "aadProfile": {"managed": True, "enableAzureRBAC": True}, "disableLocalAccounts": True,
            "autoUpgradeProfile": {"upgradeChannel": "none"}, "agentPoolProfiles": [system],
            "networkProfile": {"networkPlugin": "azure", "networkPluginMode": "overlay", "networkPolicy": "azure",
                               "podCidr": "10.244.0.0/16", "serviceCidr": "10.0.0.0/16", "dnsServiceIP": "10.0.0.10",
                               "loadBalancerSku": "standard", "outboundType": "loadBalancer"},
        },
    }  # fmt: skip

    # Agent pools: spot + eviction + max price, taints, labels, autoscaling, user pools on the second subnet.
    common = {"mode": "User", "type": "VirtualMachineScaleSets", "osType": "Linux", "orchestratorVersion": "1.30",
              "vnetSubnetID": subnet_b}  # fmt: skip
    executor, driver = m.agent_pool_name("spark-executor"), m.agent_pool_name("spark-driver")
    assert bodies(arm, "agentPools") == {
        "infra": {"properties": {**common, "vmSize": "Standard_D8s_v5", "enableAutoScaling": True, "minCount": 1,
                                 "maxCount": 3, "count": 1, "nodeLabels": {"flotilla.dev/node-pool": "infra"},
                                 "nodeTaints": [], "tags": tags("node_pools", **{"flotilla.dev/node-pool": "infra"})}},
        driver: {"properties": {**common, "vmSize": "Standard_D8s_v5", "enableAutoScaling": True, "minCount": 0,
                                "maxCount": 20, "count": 0,
                                "nodeLabels": {"purpose": "spark-driver", "flotilla.dev/node-pool": "spark-driver"},
                                "nodeTaints": [],
                                "tags": tags("node_pools", **{"flotilla.dev/node-pool": "spark-driver"})}},
        executor: {"properties": {**common, "vmSize": "Standard_E8ds_v5", "enableAutoScaling": True, "minCount": 0,
                                  "maxCount": 300, "count": 0,
                                  "nodeLabels": {"purpose": "spark-executor",
                                                 "flotilla.dev/node-pool": "spark-executor"},
                                  "nodeTaints": ["purpose=spark-executor:NoSchedule",
                                                 "kubernetes.azure.com/scalesetpriority=spot:NoSchedule"],
                                  "scaleSetPriority": "Spot", "scaleSetEvictionPolicy": "Delete", "spotMaxPrice": -1,
                                  "tags": tags("node_pools", **{"flotilla.dev/node-pool": "spark-executor"})}},
    }  # fmt: skip
    assert [r.path.rsplit("/", 1)[-1] for r in arm.calls("PUT", "agentPools")] == ["infra", driver, executor]

    # Log stream.
    assert bodies(arm, "namespaces") == {names.eventhub_namespace: {
        "location": "westeurope", "tags": tags("log_stream"), "sku": {"name": "Standard", "tier": "Standard",
                                                                      "capacity": 1}}}  # fmt: skip
    assert bodies(arm, "eventhubs") == {"cluster-logs": {"properties": {"partitionCount": 4,
                                                                        "messageRetentionInDays": 1}}}  # fmt: skip
    assert {r.api_version for r in arm.calls("PUT", "namespaces") + arm.calls("PUT", "eventhubs")} == {EH_API}

    # What the steps report.
    cluster = res["cluster"]
    fqdn = arm.get(names.cluster_arm_id)["properties"]["fqdn"]  # type: ignore[index]
    assert cluster["endpoint"] == f"https://{fqdn}:443"
    assert cluster["ca_fingerprint"] == fingerprint_of(arm.ca_pem)
    assert cluster["credential_ref"] == f"aks://{SUB}/{names.resource_group}/{cid}"
    assert cluster["private"] is False and cluster["kubernetes_version"] == "1.30"
    (creds,) = arm.calls("POST")
    assert creds.path.endswith("/listClusterUserCredential") and creds.query.get("format") == "exec"
    assert set(res["node_pools"]["node_pools"]) == {"infra", "spark-driver", "spark-executor"}
    assert res["log_stream"]["log_stream_id"] == names.eventhub_id

    # Long-running operations went through the SDK pollers (Azure-AsyncOperation polls, final GETs).
    assert any(r.path.startswith("/fake-operations/") for r in arm.requests)
    # The byon network: read by nobody, written by nobody; only role assignments hang below its subnets.
    assert not [r for r in arm.calls() if r.path.lower().startswith(BYON_VNET.lower())
                and "/providers/microsoft.authorization/" not in r.path.lower()]  # fmt: skip
    assert arm.get(BYON_VNET) == byon_before
    assert all(r.api_version for r in arm.calls())


async def test_modelserving_like_private_cluster_on_our_own_network(arm: FakeArm, provider: AzureProvider) -> None:
    req = modelserving_on_azure()
    cid = req.cluster_id
    names = m.AzureNames(SUB, cid)
    res = await provision(provider, req)
    ctx = ctx_for(req)
    net_tags = m.azure_tags(ctx.tags("network"))
    assert net_tags["team"] == "serving" and net_tags["costCenter"] == "4711"

    assert bodies(arm, "networkSecurityGroups") == {names.nsg: m.nsg_body("eastus", ctx.tags("network"))}
    assert bodies(arm, "virtualNetworks") == {names.vnet: m.vnet_body("eastus", ctx.tags("network"), names.nsg_id)}
    assert {r.api_version for r in arm.calls("PUT", "virtualNetworks")} == {NET_API}
    system_subnet, user_subnet = f"{names.vnet_id}/subnets/system", f"{names.vnet_id}/subnets/user"
    assert res["network"] == {"network_id": names.vnet_id, "subnet_ids": [system_subnet, user_subnet], "owned": True,
                              "resource_group": names.resource_group, "nsg_id": names.nsg_id}  # fmt: skip
    # The identity may manage our VNet.
    assert [r.path for r in arm.calls("PUT", "roleAssignments")] == [names.role_assignment_id(names.vnet_id)]

    (mc,) = arm.calls("PUT", "managedClusters")
    assert mc.body == m.managed_cluster_body(req.spec, "eastus", ctx.tags("cluster"), names, names.identity_id,
                                             system_subnet)  # fmt: skip
    assert mc.body["properties"]["apiServerAccessProfile"] == {"enablePrivateCluster": True}
    assert mc.body["tags"]["team"] == "serving"
    (pool,) = arm.calls("PUT", "agentPools")
    assert pool.body["properties"]["enableAutoScaling"] is False and pool.body["properties"]["count"] == 3
    assert pool.body["properties"]["vnetSubnetID"] == user_subnet

    private_fqdn = arm.get(names.cluster_arm_id)["properties"]["privateFQDN"]  # type: ignore[index]
    assert res["cluster"]["endpoint"] == f"https://{private_fqdn}:443" and ".privatelink." in private_fqdn
    assert res["cluster"]["private"] is True


# ---------------------------------------------------------------- idempotency, adoption
@pytest.mark.parametrize("example", ["byon", "modelserving"])
async def test_a_second_run_creates_nothing(arm: FakeArm, provider: AzureProvider, example: str) -> None:
    req = cluster_requested(BYON) if example == "byon" else modelserving_on_azure()
    first = await provision(provider, req)
    resources = arm.ids()
    arm.clear_requests()
    again = await provision(provider, req)
    assert again == first
    assert arm.ids() == resources
    assert not [(r.method, r.path) for r in arm.calls() if r.method not in ("GET", "POST")]
    assert {r.path.rsplit("/", 1)[-1] for r in arm.calls("POST")} == {"listClusterUserCredential"}  # a read


async def test_adopts_what_exists_waits_for_it_and_converges_pool_scaling(arm: FakeArm,
                                                                          provider: AzureProvider) -> None:  # fmt: skip
    req = modelserving_on_azure()
    cid = req.cluster_id
    names = m.AzureNames(SUB, cid)
    ctx = ctx_for(req)
    # A previous attempt (say, a replica that crashed) left these behind, tagged with the cluster id.
    arm.put(names.group_id, m.resource_group_body("eastus", ctx.tags("network")))
    arm.put(names.identity_id, m.identity_body("eastus", ctx.tags("iam")))
    network = await provider.ensure("network", ctx)
    iam = await provider.ensure("iam", ctx_for(req, {"network": network}))
    assert not arm.calls("PUT", "userAssignedIdentities") and not arm.calls("PUT", "resourceGroups")
    assert iam["identity_id"] == names.identity_id
    # The cluster is still being created by that attempt: we wait for it instead of creating another.
    arm.put(names.cluster_arm_id, m.managed_cluster_body(req.spec, "eastus", ctx.tags("cluster"), names,
                                                         names.identity_id, network["subnet_ids"][0]),
            state="Creating", settle_after_gets=3)  # fmt: skip
    cluster = await provider.ensure("cluster", ctx_for(req, {"network": network, "iam": iam}))
    assert not arm.calls("PUT", "managedClusters")
    assert len(arm.calls("GET", "managedClusters")) >= 3 and cluster["endpoint"].startswith("https://")
    # A pool exists with other bounds (autoscaling 1..2, 2 nodes running): converged with one PUT.
    pool = req.spec.node_pools[0]
    stale = m.agent_pool_body(pool.model_copy(update={"min_count": 1, "max_count": 2}), "1.30",
                              ctx.tags("node_pools"), network["subnet_ids"][1])  # fmt: skip
    stale["properties"]["count"] = 2
    arm.put(names.agent_pool_id(pool.name), stale)
    await provider.ensure("node_pools", ctx_for(req, {"network": network, "iam": iam, "cluster": cluster}))
    (put,) = arm.calls("PUT", "agentPools")
    assert (put.body["properties"]["enableAutoScaling"], put.body["properties"]["count"]) == (False, 3)
    arm.clear_requests()
    await provider.ensure("node_pools", ctx_for(req, {"network": network, "iam": iam, "cluster": cluster}))
    assert not arm.calls("PUT")  # converged: nothing more to do


async def test_converging_an_autoscaled_pool_keeps_the_running_count_within_bounds(
    arm: FakeArm, provider: AzureProvider
) -> None:
    req = cluster_requested(BYON)
    res = await provision(provider, req)
    names = m.AzureNames(SUB, req.cluster_id)
    pool_id = names.agent_pool_id("infra")
    live = arm.get(pool_id)
    assert live is not None
    live["properties"].update({"count": 7, "maxCount": 10})  # someone scaled it out and widened the bounds
    arm.clear_requests()
    await provider.ensure("node_pools", ctx_for(req, res))
    (put,) = arm.calls("PUT", "agentPools")
    assert put.path == pool_id and put.body["properties"]["minCount"] == 1 and put.body["properties"]["maxCount"] == 3
    assert put.body["properties"]["count"] == 3  # clamped into the wanted bounds, not reset to minCount


async def test_in_place_update_puts_the_changed_pool_and_patches_the_cluster_tags(arm: FakeArm,
                                                                                    provider: AzureProvider) -> None:
    req = cluster_requested(BYON)
    cid = req.cluster_id
    names = m.AzureNames(SUB, cid)
    res = await provision(provider, req)
    ids = arm.ids()
    arm.clear_requests()
    # The infra pool: bounds 1..3 → 2..6, a label and a taint; the other two pools unchanged.
    pools = changed_spec(req.spec, minCount=2, maxCount=6, labels={"tier": "gold"},
                         taints=[{"key": "dedicated", "value": "infra", "effect": "NoExecute"}])  # fmt: skip
    updated = await provider.update("node_pools", ClusterContext(cid, req.clusterset, req.location, pools, res))
    assert updated.changed and updated.resources == res["node_pools"]
    (put,) = arm.calls("PUT", "agentPools")
    assert put.path == names.agent_pool_id("infra") and put.api_version == AKS_API
    subnet_b = f"{BYON_VNET}/subnets/snet-b"
    tags = m.azure_tags({**ClusterContext(cid, req.clusterset, req.location, pools).tags("node_pools"),
                         "flotilla.dev/node-pool": "infra"})  # fmt: skip
    assert put.body == {"properties": {
        "mode": "User", "type": "VirtualMachineScaleSets", "osType": "Linux", "vmSize": "Standard_D8s_v5",
        "orchestratorVersion": "1.30", "enableAutoScaling": True, "minCount": 2, "maxCount": 6,
        "count": 2,  # the running count (1) kept within the new bounds
        "nodeLabels": {"tier": "gold", "flotilla.dev/node-pool": "infra"}, "nodeTaints": ["dedicated=infra:NoExecute"],
        "tags": tags, "vnetSubnetID": subnet_b}}  # fmt: skip
    assert not arm.calls("PATCH") and arm.ids() == ids  # nothing created
    arm.clear_requests()
    assert not (await provider.update("node_pools", ClusterContext(cid, req.clusterset, req.location, pools,
                                                                   res))).changed  # fmt: skip
    assert not arm.calls("PUT")

    # Tags: one PATCH of the managed cluster (updateTags); each pool carries them too, so each is PUT once.
    retagged = changed_spec(pools, {"owner": "data-platform"})
    ctx = ClusterContext(cid, req.clusterset, req.location, retagged, res)
    cluster = await provider.update("cluster", ctx)
    assert cluster.changed and cluster.resources == res["cluster"]
    (patch,) = arm.calls("PATCH", "managedClusters")
    assert patch.path == names.cluster_arm_id and patch.api_version == AKS_API
    assert patch.body == {"tags": {"owner": "data-platform", "flotilla.dev_cluster-id": cid,
                                   "flotilla.dev_clusterset": BYON, "flotilla.dev_step": "cluster",
                                   "flotilla.dev_managed-by": "flotilla"}}  # fmt: skip
    assert (arm.get(names.cluster_arm_id) or {})["tags"] == patch.body["tags"]
    assert (await provider.update("node_pools", ctx)).changed
    assert len(arm.calls("PUT", "agentPools")) == 3 and arm.ids() == ids
    arm.clear_requests()
    assert not (await provider.update("cluster", ctx)).changed and not arm.calls("PATCH")


async def test_in_place_update_refuses_what_only_a_rotation_can_do(arm: FakeArm, provider: AzureProvider) -> None:
    req = cluster_requested(BYON)
    res = await provision(provider, req)
    arm.clear_requests()
    for spec in (changed_spec(req.spec, instanceTypes=["Standard_D16s_v5"]), changed_spec(req.spec, spot=True),
                 with_pool(req.spec, "gpu")):  # fmt: skip
        with pytest.raises(NotInPlaceError) as err:
            await provider.update("node_pools", ClusterContext(req.cluster_id, req.clusterset, req.location, spec,
                                                               res))  # fmt: skip
        assert err.value.code == "NotInPlace" and not err.value.retryable
    assert not [r for r in arm.calls() if r.method != "GET"]


async def test_a_resource_group_that_is_not_ours_is_used_but_never_deleted(
    arm: FakeArm, provider: AzureProvider
) -> None:
    req = modelserving_on_azure()
    names = m.AzureNames(SUB, req.cluster_id)
    arm.put(names.group_id, {"location": "eastus", "tags": {"owner": "someone-else"}})
    res = await provision(provider, req)
    assert not arm.calls("PUT", "resourceGroups")
    await deprovision(provider, req, res)
    assert not arm.calls("DELETE", "resourceGroups")
    assert arm.ids() == sorted([*_byon_ids(), names.group_id])  # all of ours gone, the group stays


def _byon_ids() -> list[str]:
    return ["/subscriptions/0000/resourceGroups/net", BYON_VNET]


# ---------------------------------------------------------------- deletion
async def test_deletion_runs_in_reverse_and_leaves_nothing(arm: FakeArm, provider: AzureProvider) -> None:
    req = modelserving_on_azure()
    names = m.AzureNames(SUB, req.cluster_id)
    res = await provision(provider, req)
    arm.clear_requests()
    await deprovision(provider, req, res)
    order = [(r.path.split("/")[-2], r.path.rsplit("/", 1)[-1]) for r in arm.calls("DELETE")]
    assert order == [
        ("eventhubs", "cluster-logs"), ("namespaces", names.eventhub_namespace), ("agentPools", "default"),
        ("managedClusters", names.cluster),
        ("roleAssignments", names.role_assignment_id(names.vnet_id).rsplit("/")[-1]),
        ("userAssignedIdentities", names.identity), ("virtualNetworks", names.vnet),
        ("networkSecurityGroups", names.nsg), ("resourcegroups", names.resource_group),
    ]  # fmt: skip
    assert ours_left(arm, req.cluster_id) == [] and arm.ids() == _byon_ids()
    # Again (a redelivery): everything is already gone, which counts as done.
    arm.clear_requests()
    await deprovision(provider, req, res)
    assert not arm.calls("DELETE")


async def test_byon_deletion_removes_the_group_in_the_iam_step_and_keeps_the_network(
    arm: FakeArm, provider: AzureProvider
) -> None:
    req = cluster_requested(BYON)
    names = m.AzureNames(SUB, req.cluster_id)
    res = await provision(provider, req)
    vnet = arm.get(BYON_VNET)
    arm.clear_requests()
    await deprovision(provider, req, res)
    order = [r.path.split("/")[-2] for r in arm.calls("DELETE")]
    assert order == ["eventhubs", "namespaces", "agentPools", "agentPools", "agentPools", "managedClusters",
                     "roleAssignments", "roleAssignments", "userAssignedIdentities", "resourcegroups"]  # fmt: skip
    assert arm.calls("DELETE")[-1].path.endswith(names.resource_group)
    assert arm.ids() == _byon_ids() and arm.get(BYON_VNET) == vnet
    assert not [r for r in arm.calls() if r.method != "GET" and "/resourcegroups/net/" in r.path.lower()
                and "roleassignments" not in r.path.lower()]  # fmt: skip


async def test_a_sweep_without_spec_or_results_finds_everything_by_name_and_tag(
    arm: FakeArm, provider: AzureProvider
) -> None:
    req = modelserving_on_azure()
    await provision(provider, req)
    # A node pool someone else added to our cluster (no cluster tag) would not be ours to delete...
    names = m.AzureNames(SUB, req.cluster_id)
    arm.put(f"{names.cluster_arm_id}/agentPools/theirs", {"properties": {"mode": "User", "tags": {"x": "y"}}})
    for step in reversed(PROVISION_STEPS):
        await provider.delete(step, ctx_for(req, spec=False), None)
    deleted_pools = [r.path.rsplit("/", 1)[-1] for r in arm.calls("DELETE", "agentPools")]
    assert deleted_pools == ["default"]  # ...the sweep deletes ours (not 'system', not 'theirs'); AKS takes the rest
    assert ours_left(arm, req.cluster_id) == [] and arm.ids() == _byon_ids()


async def test_a_resource_without_our_tag_is_never_deleted(arm: FakeArm, provider: AzureProvider) -> None:
    req = modelserving_on_azure()
    names = m.AzureNames(SUB, req.cluster_id)
    ctx = ctx_for(req)
    arm.put(names.group_id, m.resource_group_body("eastus", ctx.tags("network")))
    arm.put(names.identity_id, {"location": "eastus", "tags": {"owner": "someone-else"}})
    await provider.delete("iam", ctx, None)
    assert arm.get(names.identity_id) is not None and not arm.calls("DELETE")


# ---------------------------------------------------------------- errors
async def test_throttling_is_retryable_and_the_next_attempt_converges(arm: FakeArm, provider: AzureProvider) -> None:
    req = modelserving_on_azure()
    out: dict[str, dict[str, Any]] = {}
    for step in ("network", "iam"):
        out[step] = await provider.ensure(step, ctx_for(req, out))
    arm.inject("PUT", "/managedClusters/", status=429, code="TooManyRequests", headers={"Retry-After": "1"})
    with pytest.raises(ThrottlingError) as caught:
        await provider.ensure("cluster", ctx_for(req, out))
    assert caught.value.retryable and "Retry-After 1" in caught.value.message
    cluster = await provider.ensure("cluster", ctx_for(req, out))  # what the runtime's redelivery does
    assert cluster["endpoint"].startswith("https://")
    assert len(arm.calls("PUT", "managedClusters")) == 2  # the throttled one and the one that created it


async def test_the_sdk_retry_policy_absorbs_a_429_when_enabled(arm: FakeArm) -> None:
    provider = make_provider(arm, retry_total=2, retry_backoff_factor=0.01)
    try:
        arm.inject("PUT", "/userAssignedIdentities/", status=429, headers={"Retry-After": "0"})
        req = modelserving_on_azure()
        await provider.ensure("iam", ctx_for(req, {"network": await provider.ensure("network", ctx_for(req))}))
        assert len(arm.calls("PUT", "userAssignedIdentities")) == 2
    finally:
        provider.close()


async def test_quota_is_terminal_whether_refused_at_once_or_by_the_operation(
    arm: FakeArm, provider: AzureProvider
) -> None:
    req = cluster_requested(BYON)
    out: dict[str, dict[str, Any]] = {"network": core.byon_network(req.spec)}
    for prior in ("iam", "cluster"):
        out[prior] = await provider.ensure(prior, ctx_for(req, out))  # type: ignore[arg-type]
    executor = m.agent_pool_name("spark-executor")
    arm.inject("PUT", f"/agentPools/{executor}", status=400, code="QuotaExceeded",
               message="Operation could not be completed as it results in exceeding approved Low Priority Cores quota")
    with pytest.raises(QuotaExceededError) as refused:
        await provider.ensure("node_pools", ctx_for(req, out))
    assert refused.value.code == "QuotaExceeded" and not refused.value.retryable
    assert "Low Priority Cores quota" in refused.value.message

    # The same verdict when ARM accepts the PUT and the long-running operation fails.
    other = modelserving_on_azure("0002")
    arm.inject("PUT", "/managedClusters/", code="QuotaExceeded", message="exceeds standardDSv5Family Cores quota",
               in_operation=True)
    res: dict[str, dict[str, Any]] = {}
    for prior in ("network", "iam"):
        res[prior] = await provider.ensure(prior, ctx_for(other, res))  # type: ignore[arg-type]
    with pytest.raises(QuotaExceededError):
        await provider.ensure("cluster", ctx_for(other, res))


async def test_a_conflict_with_a_running_operation_is_retryable(arm: FakeArm, provider: AzureProvider) -> None:
    req = modelserving_on_azure()
    res = await provision(provider, req)
    names = m.AzureNames(SUB, req.cluster_id)
    arm.get(names.cluster_arm_id)["properties"]["provisioningState"] = "Upgrading"  # type: ignore[index]
    arm.get(names.agent_pool_id("default"))["properties"]["minCount"] = 9  # type: ignore[index]
    arm.get(names.agent_pool_id("default"))["properties"]["enableAutoScaling"] = True  # type: ignore[index]
    with pytest.raises(TransientCloudError) as caught:
        await provider.ensure("node_pools", ctx_for(req, res))
    assert caught.value.code == "OperationNotAllowed" and caught.value.retryable


async def test_self_managed_control_plane_is_refused_before_anything_is_created(
    arm: FakeArm, provider: AzureProvider
) -> None:
    req = cluster_requested("core-prod-aws-eu-west-1")
    req = req.model_copy(update={"location": Location(env="prod", cloud="azure", region="northeurope")})
    with pytest.raises(TerminalCloudError) as caught:
        await provider.ensure("network", ctx_for(req))
    assert caught.value.code == "UnsupportedControlPlane" and not arm.calls()


async def test_build_uses_the_settings_and_the_registry_loads_the_driver(settings: Settings, redis: Redis) -> None:
    configured = settings.model_copy(update={"azure_subscription_id": SUB, "azure_base_url": "https://127.0.0.1:1",
                                             "cloud_drivers": {"aws": "sim", "azure": "real", "gcp": "sim"}})
    p = build(configured)
    assert p.name == "azure" and p.subscription_id == SUB
    assert p.aks._config.base_url == "https://127.0.0.1:1"  # noqa: SLF001 - where the SDK keeps it
    registry = build_registry(configured, redis)
    assert isinstance(registry.for_cloud("azure"), AzureProvider)
    with pytest.raises(ValueError):
        build(settings.model_copy(update={"azure_subscription_id": None}))


# ---------------------------------------------------------------- through the provisioner service
def service(settings: Settings, provider: AzureProvider) -> contextlib.AbstractAsyncContextManager[ServiceContext]:
    return provisioner_service(settings, ProviderRegistry({"azure": provider}))


async def provisioner_events(bus: Bus, cid: str) -> list[Envelope]:
    return await fleet_events(bus, source=SERVICE, aggregate=cid)


async def wait_for(bus: Bus, cid: str, event_type: str, within: float = 30.0) -> list[Envelope]:
    async def seen() -> bool:
        return any(e.type == event_type for e in await provisioner_events(bus, cid))

    await wait_until(seen, within)
    return await provisioner_events(bus, cid)


async def test_byon_example_provisions_and_retires_through_the_service(settings: Settings, bus: Bus, arm: FakeArm,
                                                                       provider: AzureProvider) -> None:  # fmt: skip
    req = cluster_requested(BYON)
    cid = req.cluster_id
    names = m.AzureNames(SUB, cid)
    async with service(settings, provider):
        await bus.publish(from_planner(req))
        events = await wait_for(bus, cid, "ClusterProvisioned")
        assert [e.type for e in events] == ["ClusterResourceProvisioned"] * 5 + ["ClusterProvisioned"]
        prov = ClusterProvisioned.model_validate(events[-1].data)
        assert prov.location.cloud == "azure"
        assert prov.credential_ref == f"aks://{SUB}/{names.resource_group}/{cid}"
        assert prov.ca_fingerprint == fingerprint_of(arm.ca_pem)
        assert prov.endpoint.startswith("https://") and prov.endpoint.endswith(".azmk8s.io:443")
        assert prov.network.owned is False and prov.network.network_id == BYON_VNET
        assert "token" not in str(prov.resources).lower() and "secret" not in str(prov.resources).lower()
        assert len(arm.calls("PUT", "managedClusters")) == 1 and len(arm.calls("PUT", "agentPools")) == 3

        await bus.publish(from_planner(retirement_requested(req)))
        events = await wait_for(bus, cid, "ClusterDeprovisioned")
        steps = [e.data["step"] for e in events if e.type == "ClusterResourceDeprovisioned"]
        assert steps == ["log_stream", "node_pools", "cluster", "iam"]  # never the byon network
        assert ours_left(arm, cid) == [] and arm.ids() == _byon_ids()
        await wait_until(lambda: consumer_drained(bus, DURABLE))


async def test_throttled_then_quota_through_the_service(settings: Settings, bus: Bus, arm: FakeArm,
                                                        provider: AzureProvider) -> None:  # fmt: skip
    ok, short = modelserving_on_azure("0001"), modelserving_on_azure("0002")
    # Throttled twice on the first cluster's create: the runtime redelivers with backoff, it converges.
    arm.inject("PUT", f"/managedClusters/{ok.cluster_id}", status=429, headers={"Retry-After": "0"}, times=2)
    # Out of quota for the second cluster's pool: terminal, surfaced with its code.
    arm.inject("PUT", f"/managedClusters/{short.cluster_id}/agentPools/", status=400, code="QuotaExceeded",
               message="exceeding approved standardMSv2Family Cores quota", times=100)
    async with service(settings, provider):
        await bus.publish(from_planner(ok))
        await bus.publish(from_planner(short))
        events = await wait_for(bus, ok.cluster_id, "ClusterProvisioned")
        assert events[-1].type == "ClusterProvisioned"
        assert len(arm.calls("PUT", "managedClusters")) >= 3
        failed = [e for e in await wait_for(bus, short.cluster_id, "ClusterProvisioningFailed")
                  if e.type == "ClusterProvisioningFailed"]  # fmt: skip
        assert len(failed) == 1
        assert failed[0].data["code"] == "QuotaExceeded" and failed[0].data["retryable"] is False
        assert failed[0].data["step"] == "node_pools" and "Cores quota" in failed[0].data["message"]
        assert len(arm.calls("PUT", "agentPools")) == 1 + 1  # ok's pool once, short's refused once: no retries

        # Retiring the failed cluster removes what it got.
        await bus.publish(from_planner(retirement_requested(short)))
        await wait_for(bus, short.cluster_id, "ClusterDeprovisioned")
        assert ours_left(arm, short.cluster_id) == []
        assert ours_left(arm, ok.cluster_id)  # the healthy one is untouched
