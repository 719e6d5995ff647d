"""The azure driver's pure parts: ClusterSpec → ARM request bodies, names, and the error classification."""

from __future__ import annotations

import json
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError

from services.cloud_provisioner.providers import azure_mapping as m
from services.cloud_provisioner.providers.azure import ca_fingerprint, classify
from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    InvalidInstanceTypeError,
    QuotaExceededError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
)
from services.cloud_provisioner.providers.base import ResourceNotFoundError as CloudNotFound
from shared.events.clusterset import NodePool, Taint
from tests.helpers import EXAMPLES, cluster_context, cluster_requested, example_spec

SUB = "00000000-0000-0000-0000-000000000001"
DATAENG = "dataeng-staging-azure-westeurope"
MODELSERVING = "modelserving-prod-aws-us-east-1"
SERVERLESS = "serverless-prod-gcp-europe-west4"
SELFMANAGED = "core-prod-aws-eu-west-1"


spec_of, ctx_of = example_spec, cluster_context


def test_every_example_is_covered() -> None:
    assert set(EXAMPLES) == {DATAENG, MODELSERVING, SERVERLESS, SELFMANAGED}


# ---------------------------------------------------------------- tags and names
def test_tags_use_names_azure_accepts_and_keep_user_tags() -> None:
    ctx = ctx_of(MODELSERVING)
    tags = m.azure_tags(ctx.tags("cluster"))
    assert tags == {"team": "serving", "costCenter": "4711", "flotilla.dev_cluster-id": ctx.cluster_id,
                    "flotilla.dev_clusterset": MODELSERVING, "flotilla.dev_step": "cluster",
                    "flotilla.dev_managed-by": "flotilla"}  # fmt: skip
    assert not any(c in k for k in tags for c in "<>%&\\?/")
    assert m.AZ_TAG_CLUSTER == "flotilla.dev_cluster-id" and TAG_CLUSTER == "flotilla.dev/cluster-id"
    assert "flotilla.dev_step" not in m.group_tags(ctx.tags("iam"))  # any step may create the group
    assert m.is_ours({"tags": tags}, ctx.cluster_id) and not m.is_ours({"tags": tags}, "other")
    assert m.is_ours({"properties": {"tags": tags}}, ctx.cluster_id)  # agent pools keep tags in properties
    assert not m.is_ours({}, ctx.cluster_id)


@pytest.mark.parametrize(("pool", "expected"), [("infra", "infra"), ("default", "default"), ("sandbox", "sandbox")])
def test_valid_pool_names_are_kept(pool: str, expected: str) -> None:
    assert m.agent_pool_name(pool) == expected


@pytest.mark.parametrize("pool", ["spark-executor", "spark-driver", "system", "a-b", "ab-", "9lives",
                                  "averyveryverylongname"])  # fmt: skip
def test_other_pool_names_become_valid_aks_names(pool: str) -> None:
    name = m.agent_pool_name(pool)
    assert 1 <= len(name) <= 12 and name[0].isalpha() and name.isalnum() and name.islower()
    assert name == m.agent_pool_name(pool)  # deterministic
    assert name != "system"


def test_pool_names_that_lose_the_same_characters_stay_distinct() -> None:
    assert m.agent_pool_name("a-b") != m.agent_pool_name("ab")
    assert m.agent_pool_name("spark-driver") != m.agent_pool_name("spark-drivers")


def test_names_are_deterministic_and_within_azure_limits() -> None:
    longest = "x" * 58 + "-ffff"  # the longest cluster id the planner makes (name <= 58, 4 hex digits)
    for cid in (cluster_requested(DATAENG).cluster_id, longest):
        names = m.AzureNames(SUB, cid)
        assert names == m.AzureNames(SUB, cid)
        assert len(names.resource_group) <= 90 and len(names.vnet) <= 64 and len(names.nsg) <= 80
        assert len(names.cluster) <= 63 and len(names.dns_prefix) <= 54
        ns = names.eventhub_namespace
        assert 6 <= len(ns) <= 50 and ns[0].isalpha() and ns[-1].isalnum()
        assert names.credential_ref == f"aks://{SUB}/{names.resource_group}/{names.cluster}"
    # Namespace names are global: another subscription's cluster of the same id gets another name.
    assert m.AzureNames("sub-2", "c-1").eventhub_namespace != m.AzureNames(SUB, "c-1").eventhub_namespace
    names = m.AzureNames(SUB, "c-1")
    assert names.cluster_arm_id == (f"/subscriptions/{SUB}/resourceGroups/flotilla-c-1/providers/"
                                    "Microsoft.ContainerService/managedClusters/c-1")  # fmt: skip
    assert names.agent_pool_id("spark-executor").endswith("/agentPools/" + m.agent_pool_name("spark-executor"))
    scope = f"{names.group_id}/providers/Microsoft.Network/virtualNetworks/v"
    assert names.role_assignment_id(scope) == names.role_assignment_id(scope.upper()[0:0] + scope)
    assert names.role_assignment_id(scope) != m.AzureNames(SUB, "c-2").role_assignment_id(scope)


def test_byon_subnet_names_resolve_against_the_given_vnet() -> None:
    spec = spec_of(DATAENG)
    assert spec.network is not None
    net = {"network_id": spec.network.vnet_id, "subnet_ids": list(spec.network.subnet_ids), "owned": False}
    vnet = "/subscriptions/0000/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/shared-vnet"
    subnets = m.subnet_ids(net)
    assert subnets == [f"{vnet}/subnets/snet-a", f"{vnet}/subnets/snet-b"]
    assert m.system_subnet(subnets) == subnets[0] and m.pool_subnet(subnets) == subnets[1]
    assert m.role_scopes(net) == subnets  # least privilege on a network that is not ours
    full = {"network_id": vnet, "subnet_ids": [f"{vnet}/subnets/x"], "owned": True}
    assert m.subnet_ids(full) == [f"{vnet}/subnets/x"] and m.pool_subnet(m.subnet_ids(full)) == f"{vnet}/subnets/x"
    assert m.role_scopes(full) == [vnet]


# ---------------------------------------------------------------- network / identity bodies
def test_network_bodies() -> None:
    tags = {"flotilla.dev/cluster-id": "c-1", "team": "x"}
    assert m.resource_group_body("westeurope", tags) == {"location": "westeurope", "tags": m.azure_tags(tags)}
    assert m.nsg_body("westeurope", tags) == {"location": "westeurope", "tags": m.azure_tags(tags),
                                              "properties": {"securityRules": []}}  # fmt: skip
    assert m.vnet_body("westeurope", tags, "NSG") == {
        "location": "westeurope",
        "tags": {"flotilla.dev_cluster-id": "c-1", "team": "x"},
        "properties": {
            "addressSpace": {"addressPrefixes": ["10.224.0.0/12"]},
            "subnets": [
                {"name": "system",
                 "properties": {"addressPrefix": "10.224.0.0/16", "networkSecurityGroup": {"id": "NSG"}}},
                {"name": "user",
                 "properties": {"addressPrefix": "10.225.0.0/16", "networkSecurityGroup": {"id": "NSG"}}},
            ],
        },
    }  # fmt: skip
    assert m.identity_body("westeurope", tags) == {"location": "westeurope", "tags": m.azure_tags(tags)}
    assert m.role_assignment_body(SUB, "p-1", "c-1") == {"properties": {
        "roleDefinitionId": f"/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions/"
                            "4d97b98b-1d4f-4787-a291-c67834d212e7",
        "principalId": "p-1", "principalType": "ServicePrincipal", "description": "flotilla.dev/cluster-id=c-1"}}
    # fmt: skip


# ---------------------------------------------------------------- agent pools
def pool_bodies(name: str, subnet: str | None = "SUBNET") -> dict[str, dict[str, Any]]:
    ctx = ctx_of(name)
    assert ctx.spec is not None
    return {p.name: m.agent_pool_body(p, ctx.spec.kubernetes_version, {"k": "v"}, subnet) for p in ctx.spec.node_pools}


def test_dataeng_pools_spot_taints_labels_autoscaling() -> None:
    bodies = pool_bodies(DATAENG)
    common = {"mode": "User", "type": "VirtualMachineScaleSets", "osType": "Linux", "orchestratorVersion": "1.30",
              "tags": {"k": "v"}, "vnetSubnetID": "SUBNET"}  # fmt: skip
    assert bodies == {
        "infra": {"properties": {**common, "vmSize": "Standard_D8s_v5", "enableAutoScaling": True, "minCount": 1,
                                 "maxCount": 3, "count": 1, "nodeLabels": {"flotilla.dev/node-pool": "infra"},
                                 "nodeTaints": []}},
        "spark-driver": {"properties": {**common, "vmSize": "Standard_D8s_v5", "enableAutoScaling": True,
                                        "minCount": 0, "maxCount": 20, "count": 0,
                                        "nodeLabels": {"purpose": "spark-driver",
                                                       "flotilla.dev/node-pool": "spark-driver"},
                                        "nodeTaints": []}},
        "spark-executor": {"properties": {**common, "vmSize": "Standard_E8ds_v5", "enableAutoScaling": True,
                                          "minCount": 0, "maxCount": 300, "count": 0,
                                          "nodeLabels": {"purpose": "spark-executor",
                                                         "flotilla.dev/node-pool": "spark-executor"},
                                          "nodeTaints": ["purpose=spark-executor:NoSchedule", m.SPOT_TAINT],
                                          "scaleSetPriority": "Spot", "scaleSetEvictionPolicy": "Delete",
                                          "spotMaxPrice": -1}},
    }  # fmt: skip


def test_fixed_size_pool_and_taints_of_other_examples() -> None:
    fixed = pool_bodies(MODELSERVING, subnet=None)["default"]["properties"]
    assert fixed["enableAutoScaling"] is False and fixed["count"] == 3
    assert "minCount" not in fixed and "maxCount" not in fixed and "vnetSubnetID" not in fixed
    assert fixed["vmSize"] == "m6i.2xlarge" and "scaleSetPriority" not in fixed
    sandbox = pool_bodies(SERVERLESS)["sandbox"]["properties"]
    assert sandbox["nodeTaints"] == ["sandbox=kata:NoSchedule"] and sandbox["nodeLabels"]["runtime"] == "kata"
    assert (sandbox["minCount"], sandbox["maxCount"], sandbox["count"]) == (3, 50, 3)
    core = pool_bodies(SELFMANAGED)["default"]["properties"]
    assert core["orchestratorVersion"] == "1.29" and (core["minCount"], core["maxCount"]) == (3, 10)


@pytest.mark.parametrize(("effect", "value", "expected"), [
    ("NoSchedule", "v", "k=v:NoSchedule"), ("PreferNoSchedule", "v", "k=v:PreferNoSchedule"),
    ("NoExecute", "v", "k=v:NoExecute"), ("NoSchedule", "", "k:NoSchedule"),
])  # fmt: skip
def test_taint_effects(effect: Any, value: str, expected: str) -> None:
    assert m.taint_string(Taint(key="k", value=value, effect=effect)) == expected


def test_scaling_convergence_view() -> None:
    auto = NodePool(name="p", instance_types=["x"], min_count=1, max_count=5)
    fixed = NodePool(name="p", instance_types=["x"], min_count=2, max_count=2)
    assert m.wanted_scaling(auto) == (True, 1, 5) and m.wanted_scaling(fixed) == (False, 2, 2)
    assert m.scaling_of({"enableAutoScaling": True, "minCount": 1, "maxCount": 5, "count": 4}) == (True, 1, 5)
    assert m.scaling_of({"enableAutoScaling": False, "count": 2}) == (False, 2, 2)
    assert m.scaling_of(m.agent_pool_properties(auto, "1.30", {}, None)) == m.wanted_scaling(auto)


def test_in_place_drift_names_what_a_put_changes_and_ignores_aks_labels_and_taint_order() -> None:
    pool = NodePool.model_validate({"name": "p", "instanceTypes": ["Standard_D8s_v5"], "minCount": 1, "maxCount": 5,
                                    "labels": {"a": "1"}, "taints": [{"key": "k", "value": "v", "effect": "NoSchedule"},
                                                                     {"key": "j", "effect": "NoExecute"}]},
                                   strict=False)  # fmt: skip
    want = m.agent_pool_properties(pool, "1.30", {"team": "x"}, None)
    live = {**want, "count": 4, "nodeTaints": list(reversed(want["nodeTaints"])),
            "nodeLabels": {**want["nodeLabels"], "kubernetes.azure.com/scalesetpriority": "spot"}}
    assert m.agent_pool_drift(live, want) == []
    stale = {**live, "maxCount": 3, "nodeLabels": {"a": "0"}, "nodeTaints": [], "tags": {}}
    assert m.agent_pool_drift(stale, want) == ["scaling", "nodeLabels", "nodeTaints", "tags"]
    assert m.agent_pool_fixed_changes(live, want) == []
    spot = m.agent_pool_properties(pool.model_copy(update={"spot": True}), "1.30", {}, None)
    assert m.agent_pool_fixed_changes(live, {**spot, "vmSize": "Standard_D16s_v5"}) == ["vmSize", "scaleSetPriority"]
    assert m.agent_pool_fixed_changes({**live, "vmSize": "standard_d8s_v5"}, want) == []  # ARM ids ignore case
    assert m.tags_body({"flotilla.dev/cluster-id": "c", "team": "x"}) == {"tags": {"flotilla.dev_cluster-id": "c",
                                                                                   "team": "x"}}  # fmt: skip


# ---------------------------------------------------------------- managed cluster
def cluster_body(name: str, subnet: str | None = None) -> dict[str, Any]:
    ctx = ctx_of(name)
    assert ctx.spec is not None
    names = m.AzureNames(SUB, ctx.cluster_id)
    return m.managed_cluster_body(ctx.spec, ctx.location.region, ctx.tags("cluster"), names, "IDENTITY", subnet)


def test_modelserving_private_cluster_body() -> None:
    ctx = ctx_of(MODELSERVING)
    body = cluster_body(MODELSERVING, "SUBNET")
    tags = m.azure_tags(ctx.tags("cluster"))
    assert body == {
        "location": "us-east-1",
        "tags": tags,
        "sku": {"name": "Base", "tier": "Standard"},
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {"IDENTITY": {}}},
        "properties": {
            "kubernetesVersion": "1.30",
            "dnsPrefix": ctx.cluster_id,
            "enableRBAC": True,
            "aadProfile": {"managed": True, "enableAzureRBAC": True},
            "disableLocalAccounts": True,
            "autoUpgradeProfile": {"upgradeChannel": "none"},
            "agentPoolProfiles": [{
                "name": "system", "mode": "System", "type": "VirtualMachineScaleSets", "osType": "Linux",
                "vmSize": "Standard_D4ds_v5", "orchestratorVersion": "1.30", "enableAutoScaling": True,
                "minCount": 1, "maxCount": 3, "count": 1, "nodeTaints": ["CriticalAddonsOnly=true:NoSchedule"],
                "tags": tags, "vnetSubnetID": "SUBNET",
            }],
            "networkProfile": {
                "networkPlugin": "azure", "networkPluginMode": "overlay", "networkPolicy": "azure",
                "podCidr": "10.244.0.0/16", "serviceCidr": "10.0.0.0/16", "dnsServiceIP": "10.0.0.10",
                "loadBalancerSku": "standard", "outboundType": "loadBalancer",
            },
            "apiServerAccessProfile": {"enablePrivateCluster": True},
        },
    }  # fmt: skip
    json.dumps(body)  # JSON-able as is


def test_public_cluster_has_no_private_profile_and_keeps_version() -> None:
    body = cluster_body(DATAENG)
    assert "apiServerAccessProfile" not in body["properties"]
    assert body["properties"]["kubernetesVersion"] == "1.30"
    assert "vnetSubnetID" not in body["properties"]["agentPoolProfiles"][0]
    assert cluster_body(SERVERLESS)["properties"]["apiServerAccessProfile"] == {"enablePrivateCluster": True}
    assert cluster_body(SELFMANAGED)["properties"]["kubernetesVersion"] == "1.29"



def test_endpoint_prefers_the_private_fqdn_of_a_private_cluster() -> None:
    mc = {"properties": {"fqdn": "pub.example", "privateFQDN": "priv.example"}}
    assert m.cluster_endpoint(mc, private=True) == "https://priv.example:443"
    assert m.cluster_endpoint(mc, private=False) == "https://pub.example:443"
    assert m.cluster_endpoint({"properties": {"privateFQDN": "p"}}, private=False) == "https://p:443"
    with pytest.raises(ValueError):
        m.cluster_endpoint({"properties": {}}, private=False)


def test_log_stream_bodies() -> None:
    assert m.eventhub_namespace_body("westeurope", {"a/b": "c"}) == {
        "location": "westeurope", "tags": {"a_b": "c"}, "sku": {"name": "Standard", "tier": "Standard", "capacity": 1}}
    assert m.eventhub_body() == {"properties": {"partitionCount": 4, "messageRetentionInDays": 1}}


def test_ca_fingerprint_hashes_the_der_certificate() -> None:
    import base64
    import hashlib
    import ssl

    from tests.fakes.azure_arm import FakeArm

    fake = FakeArm()  # not started: only its throwaway certificate is used
    try:
        data = base64.b64encode(fake.ca_pem).decode()
        kubeconfig = f"clusters:\n- name: c\n  cluster:\n    certificate-authority-data: {data}\n".encode()
        der = ssl.PEM_cert_to_DER_cert(fake.ca_pem.decode())
        assert ca_fingerprint(kubeconfig) == "sha256:" + hashlib.sha256(der).hexdigest()
    finally:
        fake.stop()
    with pytest.raises(TransientCloudError):
        ca_fingerprint(b"clusters: []\n")


# ---------------------------------------------------------------- error classification
class _Response:
    """Just enough of an azure-core HTTP response for HttpResponseError."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        self.reason = "reason"
        self.headers = headers or {}
        self._body = json.dumps(body) if body is not None else ""

    def text(self) -> str:
        return self._body


def http_error(status: int, code: str | None = None, message: str = "", headers: dict[str, str] | None = None,
               cls: type[HttpResponseError] = HttpResponseError) -> HttpResponseError:  # fmt: skip
    body = {"error": {"code": code, "message": message}} if code else None
    return cls(response=_Response(status, body, headers))  # type: ignore[arg-type]


@pytest.mark.parametrize(("exc", "kind", "code", "retryable"), [
    (http_error(429, "TooManyRequests", "slow down", {"Retry-After": "7"}), ThrottlingError, "Throttling", True),
    (http_error(429), ThrottlingError, "Throttling", True),
    (http_error(500, "InternalServerError"), TransientCloudError, "InternalServerError", True),
    (http_error(503), TransientCloudError, "Http503", True),
    (http_error(409, "OperationNotAllowed", "Operation is not allowed because there's an in progress create "
                "managed cluster operation"), TransientCloudError, "OperationNotAllowed", True),
    (http_error(409, "AnotherOperationInProgress", "busy"), TransientCloudError, "AnotherOperationInProgress", True),
    (http_error(400, "PrincipalNotFound", "not replicated yet"), TransientCloudError, "PrincipalNotFound", True),
    (http_error(400, "QuotaExceeded", "exceeds approved standardDSv5Family Cores quota"), QuotaExceededError,
     "QuotaExceeded", False),
    (http_error(409, "OperationNotAllowed", "Operation could not be completed as it results in exceeding approved "
                "Total Regional Cores quota"), QuotaExceededError, "QuotaExceeded", False),
    (http_error(400, "ErrCode_InsufficientVCPUQuota", "not enough"), QuotaExceededError, "QuotaExceeded", False),
    (http_error(400, "SkuNotAvailable", "Standard_E8ds_v5 not available in westeurope"), InvalidInstanceTypeError,
     "InvalidInstanceType", False),
    (http_error(400, "InvalidVMSize", "m6i.2xlarge"), InvalidInstanceTypeError, "InvalidInstanceType", False),
    (http_error(403, "AuthorizationFailed", "no write"), TerminalCloudError, "PermissionDenied", False),
    (http_error(403), TerminalCloudError, "PermissionDenied", False),
    (http_error(401, "InvalidAuthenticationToken"), TerminalCloudError, "PermissionDenied", False),
    (http_error(400, "K8sVersionNotSupported", "1.19"), TerminalCloudError, "UnsupportedVersion", False),
    (http_error(404, "ResourceNotFound", "gone", cls=ResourceNotFoundError), CloudNotFound, "ResourceNotFound", False),
    (http_error(404, "ResourceGroupNotFound", "gone"), CloudNotFound, "ResourceNotFound", False),
    (http_error(400, "InvalidParameter", "bad"), TerminalCloudError, "InvalidParameter", False),
    # A long-running operation that ended Failed: the poll answered 200, the code is in its body.
    (http_error(200, "QuotaExceeded", "cores quota"), QuotaExceededError, "QuotaExceeded", False),
    (http_error(200, "SomethingOdd", "failed"), TransientCloudError, "SomethingOdd", True),
    (ServiceRequestError("connection refused"), TransientCloudError, "ConnectionError", True),
])  # fmt: skip
def test_classification(exc: BaseException, kind: type, code: str, retryable: bool) -> None:
    err = classify(exc)
    assert type(err) is kind, err
    assert err.code == code and err.retryable is retryable


def test_classification_keeps_the_azure_code_and_retry_after_in_the_message() -> None:
    err = classify(http_error(429, "TooManyRequests", "slow down", {"Retry-After": "7"}))
    assert "TooManyRequests" in err.message and "Retry-After 7" in err.message
    quota = classify(http_error(400, "QuotaExceeded", "exceeds approved quota"))
    assert quota.message == "QuotaExceeded: exceeds approved quota"
