"""The GCP driver's pure parts: spec → GKE/Compute/IAM/Pub/Sub request bodies, names, labels, and the
classification of Google API errors. The bodies are compared as the JSON the REST transports send."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import container_v1
from google.protobuf import json_format

from services.cloud_provisioner.providers.base import (
    ClusterContext,
    InvalidInstanceTypeError,
    QuotaExceededError,
    ResourceNotFoundError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
)
from services.cloud_provisioner.providers.gcp_errors import (
    AlreadyExistsError,
    classify,
    classify_compute_operation_error,
    classify_operation_error,
)
from services.cloud_provisioner.providers.gcp_mapping import (
    CLUSTER_LABEL,
    Paths,
    ca_fingerprint,
    cluster_body,
    cluster_labels_request,
    described_ours,
    description,
    fit_name,
    gcp_labels,
    initial_node_count,
    label_key,
    label_value,
    labelled_ours,
    names_for,
    network_ref,
    node_pool_body,
    pool_fixed_changes,
    pool_name,
    pool_update_request,
    service_account_body,
    with_members,
    without_member,
)
from shared.events import ClusterSpec
from shared.events.clusterset import NodePool
from tests.conftest import example_documents
from tests.helpers import cluster_context

EXAMPLES = example_documents()
SA = "sa-12345678@p.iam.gserviceaccount.com"


def as_json(message: Any) -> dict[str, Any]:
    """A proto-plus message as the REST transport puts it on the wire (camelCase, int enums, no defaults)."""
    return json.loads(json_format.MessageToJson(type(message).pb(message), use_integers_for_enums=True))


ctx_for = cluster_context


def spec_of(ctx: ClusterContext) -> ClusterSpec:
    assert ctx.spec is not None
    return ctx.spec


def cluster_json(ctx: ClusterContext) -> dict[str, Any]:
    paths = Paths("p", ctx.location.region, names_for(ctx.cluster_id))
    return as_json(cluster_body(ctx, spec_of(ctx), paths.names, network_ref(ctx, paths), SA))


# ---------------------------------------------------------------- names and labels
def test_names_are_deterministic_valid_and_fit_the_limits() -> None:
    long_id = "a" * 58 + "-7f3a"
    for cid in ("serverless-prod-gcp-europe-west4-7f3a", long_id, "0digit-first-0001"):
        names = names_for(cid)
        assert names == names_for(cid)
        assert len(names.cluster) <= 40 and len(names.network) <= 63 and len(names.subnetwork) <= 63
        assert 6 <= len(names.service_account_id) <= 30
        for name in (names.cluster, names.network, names.subnetwork, names.firewall, names.service_account_id):
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    short = names_for("serverless-prod-gcp-europe-west4-7f3a")
    assert short.cluster == "serverless-prod-gcp-europe-west4-7f3a"  # fits: the cluster id itself
    assert short.network == "serverless-prod-gcp-europe-west4-7f3a-net"
    assert short.topic == "serverless-prod-gcp-europe-west4-7f3a-logs"
    digest = hashlib.sha256(long_id.encode()).hexdigest()[:8]
    assert names_for(long_id).cluster == "a" * 31 + "-" + digest  # cut, then the hash of the full id
    assert short.service_account_id.endswith(hashlib.sha256(b"serverless-prod-gcp-europe-west4-7f3a").hexdigest()[:8])
    # Two ids that share the first 40 characters still get different names.
    assert names_for("b" * 50 + "-0001").cluster != names_for("b" * 50 + "-0002").cluster
    assert fit_name("0abc", "net", 63).startswith("c-0abc-")
    assert pool_name("default") == "default" and pool_name("1gpu") == "p-1gpu"


def test_labels_are_sanitised_to_gcp_rules() -> None:
    assert label_key("flotilla.dev/cluster-id") == "flotilla-dev_cluster-id" == CLUSTER_LABEL
    assert label_key("costCenter") == "costcenter"
    assert label_key("9lives") == "k9lives"
    assert label_value("Serving Team!") == "serving_team_"
    assert len(label_value("x" * 100)) == 63
    ctx = ctx_for("modelserving-prod-aws-us-east-1")
    labels = gcp_labels(ctx.tags("cluster"))
    assert labels == {"team": "serving", "costcenter": "4711", "flotilla-dev_cluster-id": ctx.cluster_id,
                      "flotilla-dev_clusterset": ctx.clusterset, "flotilla-dev_step": "cluster",
                      "flotilla-dev_managed-by": "flotilla"}  # fmt: skip
    for key, value in labels.items():
        assert re.fullmatch(r"[a-z][-_a-z0-9]{0,62}", key) and re.fullmatch(r"[-_a-z0-9]{0,63}", value)
    assert labelled_ours(labels, ctx.cluster_id) and not labelled_ours(labels, ctx.cluster_id + "0")
    assert not labelled_ours({}, ctx.cluster_id)


def test_description_marker_matches_whole_tokens_only() -> None:
    ctx = ctx_for("serverless-prod-gcp-europe-west4", "0001")
    text = description(ctx, "VPC network")
    assert described_ours(text, "serverless-prod-gcp-europe-west4-0001")
    assert not described_ours(text, "serverless-prod-gcp-europe-west4-000")
    assert not described_ours(text.replace("-0001", "-00011"), "serverless-prod-gcp-europe-west4-0001")
    assert not described_ours(None, "x") and not described_ours("", "x")
    body = service_account_body(ctx, names_for(ctx.cluster_id))
    assert described_ours(body["serviceAccount"]["description"], ctx.cluster_id)
    assert len(body["serviceAccount"]["description"]) <= 256 and len(body["serviceAccount"]["displayName"]) <= 100


# ---------------------------------------------------------------- cluster bodies for all four examples
def test_serverless_cluster_is_private_vpc_native_with_dataplane_v2() -> None:
    ctx = ctx_for("serverless-prod-gcp-europe-west4")
    body = cluster_json(ctx)
    cid = ctx.cluster_id
    assert body["name"] == cid and body["initialClusterVersion"] == "1.30"
    assert body["network"] == f"projects/p/global/networks/{cid}-net"
    assert body["subnetwork"] == f"projects/p/regions/europe-west4/subnetworks/{cid}-nodes"
    assert body["ipAllocationPolicy"] == {"useIpAliases": True, "clusterSecondaryRangeName": "pods",
                                          "servicesSecondaryRangeName": "services"}  # fmt: skip
    assert body["privateClusterConfig"] == {"enablePrivateNodes": True, "enablePrivateEndpoint": True,
                                            "masterIpv4CidrBlock": "172.16.0.0/28"}  # fmt: skip
    assert body["masterAuthorizedNetworksConfig"] == {"enabled": True}
    assert body["networkConfig"] == {"datapathProvider": int(container_v1.DatapathProvider.ADVANCED_DATAPATH)}
    assert body["resourceLabels"][CLUSTER_LABEL] == cid
    assert [p["name"] for p in body["nodePools"]] == ["flotilla-bootstrap"]
    assert body["nodePools"][0]["config"]["serviceAccount"] == SA
    assert body["nodePools"][0]["config"]["resourceLabels"][CLUSTER_LABEL] == cid


def test_modelserving_cluster_is_private_and_carries_the_user_tags() -> None:
    body = cluster_json(ctx_for("modelserving-prod-aws-us-east-1"))
    assert body["privateClusterConfig"]["enablePrivateEndpoint"] is True
    assert "networkConfig" not in body  # no hard-multi-tenancy
    assert body["resourceLabels"]["team"] == "serving" and body["resourceLabels"]["costcenter"] == "4711"


def test_public_cluster_without_private_connectivity() -> None:
    body = cluster_json(ctx_for("core-prod-aws-eu-west-1"))
    assert body["initialClusterVersion"] == "1.29"
    assert "privateClusterConfig" not in body and "masterAuthorizedNetworksConfig" not in body


def test_byon_cluster_uses_the_given_network_and_lets_gke_allocate_ranges() -> None:
    ctx = ctx_for("dataeng-staging-azure-westeurope")
    spec = spec_of(ctx)
    assert spec.network is not None
    adopted = {"network_id": "projects/host/global/networks/shared", "owned": False,
               "subnet_ids": ["projects/host/regions/europe-west1/subnetworks/a", "b"]}  # fmt: skip
    ctx = ClusterContext(ctx.cluster_id, ctx.clusterset, ctx.location, spec, {"network": adopted})
    body = cluster_json(ctx)
    assert body["network"] == "projects/host/global/networks/shared"
    assert body["subnetwork"] == "projects/host/regions/europe-west1/subnetworks/a"
    assert body["ipAllocationPolicy"] == {"useIpAliases": True}
    assert "privateClusterConfig" not in body


# ---------------------------------------------------------------- node pools for all four examples
def pools_json(name: str) -> dict[str, dict[str, Any]]:
    ctx = ctx_for(name)
    return {p.name: as_json(node_pool_body(ctx, p, SA)) for p in spec_of(ctx).node_pools}


def test_serverless_pool_labels_taints_and_autoscaling() -> None:
    ctx = ctx_for("serverless-prod-gcp-europe-west4")
    pool = pools_json("serverless-prod-gcp-europe-west4")["sandbox"]
    assert pool == {
        "name": "sandbox",
        "initialNodeCount": 1,
        "config": {
            "machineType": "n2-standard-32",
            "labels": {"runtime": "kata"},
            "taints": [{"key": "sandbox", "value": "kata", "effect": 1}],  # NO_SCHEDULE
            "serviceAccount": SA,
            "oauthScopes": ["https://www.googleapis.com/auth/cloud-platform"],
            "resourceLabels": gcp_labels(ctx.tags("node_pools")),
        },
        "autoscaling": {"enabled": True, "totalMinNodeCount": 3, "totalMaxNodeCount": 50, "locationPolicy": 1},
    }


def test_dataeng_pools_spot_taints_zero_minimum() -> None:
    pools = pools_json("dataeng-staging-azure-westeurope")
    executor = pools["spark-executor"]
    assert executor["config"]["spot"] is True
    assert executor["config"]["machineType"] == "Standard_E8ds_v5"  # the first type: a GKE pool has one
    assert executor["config"]["taints"] == [{"key": "purpose", "value": "spark-executor", "effect": 1}]
    assert executor["config"]["labels"] == {"purpose": "spark-executor"}
    assert executor["autoscaling"] == {"enabled": True, "totalMaxNodeCount": 300, "locationPolicy": 2}  # ANY, min 0
    assert "initialNodeCount" not in executor  # 0
    assert "spot" not in pools["infra"]["config"] and pools["infra"]["initialNodeCount"] == 1
    assert pools["spark-driver"]["autoscaling"]["locationPolicy"] == 1  # BALANCED


def test_fixed_size_and_self_managed_pools() -> None:
    assert pools_json("modelserving-prod-aws-us-east-1")["default"]["autoscaling"] == {
        "enabled": True, "totalMinNodeCount": 3, "totalMaxNodeCount": 3, "locationPolicy": 1}  # fmt: skip
    core = pools_json("core-prod-aws-eu-west-1")["default"]
    assert core["initialNodeCount"] == 1 and core["autoscaling"]["totalMaxNodeCount"] == 10


@pytest.mark.parametrize("effect,wire", [("NoSchedule", 1), ("PreferNoSchedule", 2), ("NoExecute", 3)])
def test_taint_effect_mapping(effect: str, wire: int) -> None:
    ctx = ctx_for("serverless-prod-gcp-europe-west4")
    raw = {"name": "p", "instanceTypes": ["e2-standard-4"], "minCount": 0, "maxCount": 1,
           "taints": [{"key": "k", "value": "v", "effect": effect}]}  # fmt: skip
    pool = NodePool.model_validate(raw, strict=False)
    assert as_json(node_pool_body(ctx, pool, SA))["config"]["taints"][0]["effect"] == wire


@pytest.mark.parametrize("low,high,per_zone", [(0, 0, 0), (0, 5, 0), (1, 3, 1), (3, 3, 1), (4, 10, 2), (1, 1, 0),
                                               (2, 5, 1), (30, 300, 10)])  # fmt: skip
def test_initial_node_count_is_per_zone_and_never_above_max(low: int, high: int, per_zone: int) -> None:
    pool = NodePool.model_validate({"name": "p", "instanceTypes": ["x"], "minCount": low, "maxCount": high},
                                   strict=False)  # fmt: skip
    assert initial_node_count(pool) == per_zone
    assert per_zone * 3 <= high


def test_pool_without_capacity_has_autoscaling_off() -> None:
    ctx = ctx_for("serverless-prod-gcp-europe-west4")
    pool = NodePool.model_validate({"name": "p", "instanceTypes": ["x"], "minCount": 0, "maxCount": 0}, strict=False)
    assert as_json(node_pool_body(ctx, pool, SA)).get("autoscaling", {}) == {}


# ---------------------------------------------------------------- facts and policy edits
def _pool_of(**changes: Any) -> container_v1.NodePool:
    ctx = cluster_context("serverless-prod-gcp-europe-west4")
    assert ctx.spec is not None
    pool = NodePool.model_validate({**ctx.spec.node_pools[0].model_dump(by_alias=True), **changes}, strict=False)
    return node_pool_body(ctx, pool, SA)


def test_pool_update_request_carries_only_what_differs() -> None:
    live = _pool_of()
    live.config.resource_labels["goog-gke-node-pool-provisioning-model"] = "on-demand"  # GKE's own: kept, ignored
    assert pool_update_request("n", live, _pool_of()) is None
    assert pool_update_request("n", live, _pool_of(maxCount=80)) is None  # autoscaling is setAutoscaling's job
    relabelled = pool_update_request("n", live, _pool_of(labels={"tier": "gold"}))
    assert relabelled is not None
    assert json.loads(container_v1.UpdateNodePoolRequest.to_json(relabelled, including_default_value_fields=False)) \
        == {"name": "n", "labels": {"labels": {"tier": "gold"}}}  # fmt: skip
    untainted = pool_update_request("n", live, _pool_of(taints=[]))
    assert untainted is not None and "taints" in untainted and list(untainted.taints.taints) == []
    wanted = _pool_of()
    wanted.config.resource_labels["owner"] = "faas"
    retagged = pool_update_request("n", live, wanted)
    assert retagged is not None and dict(retagged.resource_labels.labels) == {
        **dict(wanted.config.resource_labels), "goog-gke-node-pool-provisioning-model": "on-demand"}
    assert pool_fixed_changes(live, _pool_of(instanceTypes=["n2-standard-64"], spot=True)) == ["machineType", "spot"]
    assert pool_fixed_changes(live, _pool_of(maxCount=5, labels={})) == []


def test_cluster_labels_request_keeps_gke_labels_and_the_fingerprint() -> None:
    found = container_v1.Cluster(resource_labels={"team": "a", "goog-x": "1"}, label_fingerprint="fp")
    assert cluster_labels_request("c", found, {"team": "a"}) is None
    request = cluster_labels_request("c", found, {"team": "b"})
    assert request is not None and request.label_fingerprint == "fp"
    assert dict(request.resource_labels) == {"team": "b", "goog-x": "1"}


def test_ca_fingerprint_is_sha256_of_the_der_certificate() -> None:
    der = bytes(range(256)) * 3
    pem = "-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der).decode() + "-----END CERTIFICATE-----\n"
    encoded = base64.b64encode(pem.encode()).decode()
    assert ca_fingerprint(encoded) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert encoded not in ca_fingerprint(encoded)


def test_policy_edits_touch_only_our_member() -> None:
    policy = {"etag": "e1", "version": 1, "bindings": [
        {"role": "roles/owner", "members": ["user:a@example.com"]},
        {"role": "roles/container.defaultNodeServiceAccount", "members": ["serviceAccount:other@p.iam"]}]}  # fmt: skip
    me = "serviceAccount:me@p.iam"
    added = with_members(policy, ("roles/container.defaultNodeServiceAccount",), me)
    assert added is not None and added["etag"] == "e1"
    assert added["bindings"][1]["members"] == ["serviceAccount:other@p.iam", me]
    assert with_members(added, ("roles/container.defaultNodeServiceAccount",), me) is None  # already bound
    removed = without_member(added, me)
    assert removed == policy
    assert without_member(policy, me) is None
    only_me = {"etag": "e", "bindings": [{"role": "r", "members": [me]}]}
    assert without_member(only_me, me) == {"etag": "e", "bindings": []}


# ---------------------------------------------------------------- error classification
def rest_error(status: int, message: str, *, grpc_status: str = "", reason: str = "") -> gexc.GoogleAPICallError:
    """What the REST transport raises for a Google JSON error response (through from_http_response)."""
    error: dict[str, Any] = {"code": status, "message": message}
    if grpc_status:
        error["status"] = grpc_status
    if reason:
        error["errors"] = [{"reason": reason, "message": message, "domain": "global"}]
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason}]
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps({"error": error}).encode()
    response.request = requests.Request("POST", "http://127.0.0.1/v1/x").prepare()
    return gexc.from_http_response(response)


CASES: list[tuple[gexc.GoogleAPICallError, type, str, bool]] = [
    (rest_error(429, "Too many requests", grpc_status="RESOURCE_EXHAUSTED"), ThrottlingError, "Throttling", True),
    (rest_error(429, "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute'",
                grpc_status="RESOURCE_EXHAUSTED", reason="RATE_LIMIT_EXCEEDED"), ThrottlingError, "Throttling", True),
    (rest_error(403, "Rate Limit Exceeded", reason="rateLimitExceeded"), ThrottlingError, "Throttling", True),
    (rest_error(403, 'Insufficient regional quota to satisfy request: resource "CPUS": request requires 96.0'),
     QuotaExceededError, "QuotaExceeded", False),
    (rest_error(429, "Quota 'IN_USE_ADDRESSES' exceeded. Limit: 8.0", grpc_status="RESOURCE_EXHAUSTED",
                reason="QUOTA_EXCEEDED"), QuotaExceededError, "QuotaExceeded", False),
    (rest_error(400, "Invalid machine type n2-standard-999 in zone europe-west4-a", grpc_status="INVALID_ARGUMENT"),
     InvalidInstanceTypeError, "InvalidInstanceType", False),
    (rest_error(400, "Invalid value for field 'resource.machineType': 'zones/x/machineTypes/m9'", reason="invalid"),
     InvalidInstanceTypeError, "InvalidInstanceType", False),
    (rest_error(400, 'Master version "1.19" is unsupported.', grpc_status="INVALID_ARGUMENT"), TerminalCloudError,
     "UnsupportedVersion", False),
    (rest_error(400, "Cluster.name must be set", grpc_status="INVALID_ARGUMENT"), TerminalCloudError,
     "InvalidArgument", False),
    (rest_error(403, "Permission 'container.clusters.create' denied on resource", grpc_status="PERMISSION_DENIED"),
     TerminalCloudError, "PermissionDenied", False),
    (rest_error(401, "Request had invalid authentication credentials.", grpc_status="UNAUTHENTICATED"),
     TerminalCloudError, "PermissionDenied", False),
    (rest_error(404, "Not found: projects/p/locations/l/clusters/c."), ResourceNotFoundError, "NotFound", False),
    (rest_error(409, "Already exists: projects/p/locations/l/clusters/c.", grpc_status="ALREADY_EXISTS"),
     AlreadyExistsError, "AlreadyExists", True),
    (rest_error(409, "The resource 'networks/n' already exists", reason="alreadyExists"), AlreadyExistsError,
     "AlreadyExists", True),
    (rest_error(409, "There were concurrent policy changes.", grpc_status="ABORTED"), TransientCloudError,
     "Conflict", True),
    (rest_error(400, "Cluster c is running incompatible operation operation-1.", grpc_status="FAILED_PRECONDITION"),
     TransientCloudError, "OperationInProgress", True),
    (rest_error(400, "Node pool is not ready.", grpc_status="FAILED_PRECONDITION"), TransientCloudError,
     "FailedPrecondition", True),
    (rest_error(400, "The network resource 'n' is already being used by 's'", reason="resourceInUseByAnotherResource"),
     TransientCloudError, "OperationInProgress", True),
    (rest_error(503, "The service is currently unavailable.", grpc_status="UNAVAILABLE"), TransientCloudError,
     "ServerError", True),
    (rest_error(500, "Internal error encountered.", grpc_status="INTERNAL"), TransientCloudError, "ServerError", True),
    (gexc.DeadlineExceeded("deadline"), TransientCloudError, "ServerError", True),
    (gexc.ServiceUnavailable("unavailable"), TransientCloudError, "ServerError", True),
    (gexc.PermissionDenied("denied"), TerminalCloudError, "PermissionDenied", False),
    (gexc.ResourceExhausted("Quota exceeded for CPUS"), QuotaExceededError, "QuotaExceeded", False),
    (gexc.ResourceExhausted("resource exhausted"), ThrottlingError, "Throttling", True),
]  # fmt: skip


@pytest.mark.parametrize("exc,cls,code,retryable", CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_google_errors_are_classified(exc: gexc.GoogleAPICallError, cls: type, code: str, retryable: bool) -> None:
    err = classify(exc)
    assert err is not None
    assert type(err) is cls and err.code == code and err.retryable is retryable
    assert not err.message.startswith("POST ")  # the API's message, not the transport's prefix


def test_non_api_errors() -> None:
    err = classify(requests.exceptions.ConnectionError("refused"))
    assert err is not None and err.retryable and err.code == "ConnectionError"
    assert classify(ValueError("bug")) is None  # not ours to classify: re-raised as is


def test_operation_errors_are_classified() -> None:
    quota = classify_operation_error(8, 'Insufficient regional quota to satisfy request: resource "CPUS"')
    assert isinstance(quota, QuotaExceededError) and quota.code == "QuotaExceeded"
    assert classify_operation_error(14, "backend unavailable").retryable
    bad = classify_operation_error(3, "Invalid machine type e2-huge")
    assert isinstance(bad, InvalidInstanceTypeError)
    compute_quota = classify_compute_operation_error(403, [("QUOTA_EXCEEDED", "Quota 'NETWORKS' exceeded.")])
    assert isinstance(compute_quota, QuotaExceededError)
    stockout = classify_compute_operation_error(503, [("ZONE_RESOURCE_POOL_EXHAUSTED", "no capacity")])
    assert stockout.retryable
    in_use = classify_compute_operation_error(400, [("RESOURCE_IN_USE_BY_ANOTHER_RESOURCE", "used by x")])
    assert in_use.retryable and in_use.code == "OperationInProgress"
    exists = classify_compute_operation_error(409, [("RESOURCE_ALREADY_EXISTS", "exists")])
    assert isinstance(exists, AlreadyExistsError)
