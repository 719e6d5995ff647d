"""The gcp driver at the HTTP boundary: the real Google client libraries (transport="rest",
AnonymousCredentials, client_options api_endpoint) against tests/fakes/gcp_api.py on a loopback port.

Covers the exact request bodies of the examples, idempotent re-runs (no second create), adoption of
what an earlier run left (including a cluster still provisioning), resources that are not ours (never
adopted, never deleted), deletion order, error mapping (429 → retried, quota → terminal), and the
provisioner service end to end (ClusterRequested → ClusterProvisioned → retirement → ClusterDeprovisioned)
on real nats-server and redis-server.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from services.cloud_provisioner.app import SERVICE
from services.cloud_provisioner.providers import ProviderRegistry
from services.cloud_provisioner.providers.base import (
    CloudError,
    ClusterContext,
    InvalidInstanceTypeError,
    NotInPlaceError,
    QuotaExceededError,
    TerminalCloudError,
    ThrottlingError,
)
from services.cloud_provisioner.providers.gcp import GcpProvider, build
from services.cloud_provisioner.providers.gcp_mapping import TAINT_EFFECTS, gcp_labels, names_for
from shared.bus import Bus
from shared.config import Settings
from shared.embedded import ServerProcess, service_env, start_service
from shared.events import Envelope, validate_clusterset
from shared.events.models import PROVISION_STEPS, ClusterProvisioned, ClusterProvisioningFailed, ClusterRequested
from shared.service import ServiceContext
from tests.fakes.gcp_api import FakeGcp
from tests.helpers import (
    EXAMPLES,
    GCP,
    cluster_requested,
    consumer_drained,
    fleet_events,
    from_planner,
    provisioner_service,
    retirement_requested,
    wait_until,
)
from tests.unit.test_provisioner_core import changed_spec, with_pool

PROJECT = "flotilla-test"
SERVERLESS = GCP  # serverless-prod-gcp-europe-west4: private, hard-multi-tenancy, one tainted pool


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def fake() -> Iterator[FakeGcp]:
    server = FakeGcp(PROJECT, op_polls=2).start()
    yield server
    server.stop()


def provider_for(fake: FakeGcp, **overrides: Any) -> GcpProvider:
    options: dict[str, Any] = {"poll_s": 0.005, "retry_base_s": 0.005, "timeout_s": 10.0, "call_timeout_s": 10.0}
    return GcpProvider(PROJECT, credentials=AnonymousCredentials(), api_endpoint=fake.url, **(options | overrides))


@pytest.fixture
def gcp(fake: FakeGcp) -> GcpProvider:
    return provider_for(fake)


def gcp_request(name: str, region: str, machine_types: dict[str, list[str]], *, suffix: str = "0001",
                byon: dict[str, Any] | None = None) -> ClusterRequested:  # fmt: skip
    """An example ClusterSet moved to GCP (region and machine types), as the planner would request it."""
    doc = copy.deepcopy(EXAMPLES[name])
    doc["metadata"]["location"] = {**doc["metadata"]["location"], "cloud": "gcp", "region": region}
    for pool in doc["spec"]["nodePools"]:
        pool["instanceTypes"] = machine_types[pool["name"]]
    if byon is not None:
        doc["spec"]["network"] = byon
    model, errors = validate_clusterset(doc)
    assert model is not None, errors
    spec = model.spec.cluster_spec()
    return ClusterRequested(cluster_id=f"{name}-{suffix}", clusterset=name, location=model.metadata.location,
                            cluster_type=model.metadata.cluster_type, generation=1, config_hash=spec.config_hash(),
                            spec=spec, serial=0)  # fmt: skip


def modelserving_on_gcp() -> ClusterRequested:
    return gcp_request("modelserving-prod-aws-us-east-1", "us-east1", {"default": ["n2-standard-8"]})


def dataeng_on_gcp() -> ClusterRequested:
    byon = {"networkId": "projects/shared-host/global/networks/shared-vpc",
            "subnetIds": ["projects/shared-host/regions/europe-west1/subnetworks/dataeng"]}  # fmt: skip
    types = {"infra": ["n2-standard-8"], "spark-driver": ["n2-standard-8"],
             "spark-executor": ["n2-highmem-8", "n2d-highmem-8"]}  # fmt: skip
    return gcp_request("dataeng-staging-azure-westeurope", "europe-west1", types, byon=byon)


def context(req: ClusterRequested, resources: dict[str, dict[str, Any]] | None = None) -> ClusterContext:
    return ClusterContext(cluster_id=req.cluster_id, clusterset=req.clusterset, location=req.location, spec=req.spec,
                          resources=dict(resources or {}))  # fmt: skip


async def provision(gcp: GcpProvider, req: ClusterRequested) -> dict[str, dict[str, Any]]:
    """Every step in order, each seeing what the earlier ones reported (as the core passes it on)."""
    resources: dict[str, dict[str, Any]] = {}
    for step in PROVISION_STEPS:
        resources[step] = await gcp.ensure(step, context(req, resources))
    return resources


async def deprovision(gcp: GcpProvider, req: ClusterRequested, resources: dict[str, dict[str, Any]] | None) -> None:
    """Every step in reverse, with what it reported (or None: the sweep by name and cluster id)."""
    for step in reversed(PROVISION_STEPS):
        await gcp.delete(step, context(req, resources), None if resources is None else resources[step])


def body_of(fake: FakeGcp, method: str, pattern: str) -> Any:
    calls = fake.calls(method, pattern)
    assert len(calls) == 1, [(c.method, c.path) for c in calls]
    return calls[0].body


def creates(fake: FakeGcp) -> list[tuple[str, str]]:
    """Requests that create something (a topic is created by PUT)."""
    return [(m, p) for m, p in fake.mutations() if m in ("POST", "PUT") and not p.endswith(("IamPolicy",
                                                                                            ":setAutoscaling"))]


def failures(fake: FakeGcp) -> list[tuple[str, str, int]]:
    """Error answers other than the 404s of lookups (an ensure looks up before it creates)."""
    return [(r.method, r.path, r.status) for r in fake.requests
            if r.status >= 400 and (r.method, r.status) != ("GET", 404)]  # fmt: skip


def marker(cid: str) -> str:
    return f"flotilla.dev/cluster-id={cid}"


# ---------------------------------------------------------------- exact request bodies
async def test_serverless_example_request_bodies(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    cid, cs = req.cluster_id, req.clusterset
    out = await provision(gcp, req)

    net, sub, fw = f"{cid}-net", f"{cid}-nodes", f"{cid}-internal"
    net_path = f"projects/{PROJECT}/global/networks/{net}"
    sub_path = f"projects/{PROJECT}/regions/europe-west4/subnetworks/{sub}"

    def described(what: str) -> str:
        return f"{marker(cid)} flotilla.dev/clusterset={cs} flotilla {what} of cluster {cid}"

    assert body_of(fake, "POST", r"/global/networks$") == {
        "name": net, "autoCreateSubnetworks": False, "description": described("VPC network")}  # fmt: skip
    assert body_of(fake, "POST", r"/subnetworks$") == {
        "name": sub, "network": net_path, "region": "europe-west4", "ipCidrRange": "10.0.0.0/20",
        "privateIpGoogleAccess": True, "description": described("node subnetwork"),
        "secondaryIpRanges": [{"rangeName": "pods", "ipCidrRange": "10.16.0.0/14"},
                              {"rangeName": "services", "ipCidrRange": "10.20.0.0/20"}],
    }  # fmt: skip
    assert body_of(fake, "POST", r"/global/firewalls$") == {
        "name": fw, "network": net_path, "direction": "INGRESS", "priority": 1000,
        "sourceRanges": ["10.0.0.0/20", "10.16.0.0/14"], "description": described("internal traffic rule"),
        "allowed": [{"IPProtocol": "tcp"}, {"IPProtocol": "udp"}, {"IPProtocol": "icmp"}],
    }  # fmt: skip
    # Compute's idempotency token on every insert, a UUID that is the same for every retry of it.
    ids = [c.query["requestId"] for c in fake.calls("POST", r"^/compute/")]
    assert len(set(ids)) == 3 and all(uuid.UUID(i) for i in ids)

    account = names_for(cid).service_account_id
    email = f"{account}@{PROJECT}.iam.gserviceaccount.com"
    assert body_of(fake, "POST", r"/serviceAccounts$") == {
        "accountId": account,
        "serviceAccount": {"displayName": f"flotilla nodes {cid}",
                           "description": described("GKE node service account")},
    }  # fmt: skip
    policy = body_of(fake, "POST", r":setIamPolicy$")["policy"]
    assert policy["etag"] == "BwY0"  # the etag it read: a concurrent change would make this write fail
    assert policy["bindings"] == [
        {"role": "roles/owner", "members": ["user:admin@example.com"]},  # untouched
        {"role": "roles/container.defaultNodeServiceAccount", "members": [f"serviceAccount:{email}"]},
    ]

    labels = {"flotilla-dev_cluster-id": cid, "flotilla-dev_clusterset": cs, "flotilla-dev_managed-by": "flotilla"}
    assert body_of(fake, "POST", r"/locations/europe-west4/clusters$") == {"cluster": {
        "name": cid,
        "description": described("GKE cluster"),
        "initialClusterVersion": "1.30",
        "network": net_path,
        "subnetwork": sub_path,
        "ipAllocationPolicy": {"useIpAliases": True, "clusterSecondaryRangeName": "pods",
                               "servicesSecondaryRangeName": "services"},
        "privateClusterConfig": {"enablePrivateNodes": True, "enablePrivateEndpoint": True,
                                 "masterIpv4CidrBlock": "172.16.0.0/28"},
        "masterAuthorizedNetworksConfig": {"enabled": True},
        "networkConfig": {"datapathProvider": 2},  # ADVANCED_DATAPATH: enforces NetworkPolicy (hard-multi-tenancy)
        "resourceLabels": {**labels, "flotilla-dev_step": "cluster"},
        "nodePools": [{"name": "flotilla-bootstrap", "initialNodeCount": 1, "config": {
            "machineType": "e2-small", "serviceAccount": email,
            "oauthScopes": ["https://www.googleapis.com/auth/cloud-platform"],
            "resourceLabels": {**labels, "flotilla-dev_step": "cluster"}}}],
    }}  # fmt: skip
    cluster_path = f"projects/{PROJECT}/locations/europe-west4/clusters/{cid}"
    assert body_of(fake, "POST", r"/nodePools$") == {"nodePool": {
        "name": "sandbox",
        "initialNodeCount": 1,
        "config": {
            "machineType": "n2-standard-32",
            "labels": {"runtime": "kata"},
            "taints": [{"key": "sandbox", "value": "kata", "effect": 1}],  # NoSchedule → NO_SCHEDULE
            "serviceAccount": email,
            "oauthScopes": ["https://www.googleapis.com/auth/cloud-platform"],
            "resourceLabels": {**labels, "flotilla-dev_step": "node_pools"},
        },
        "autoscaling": {"enabled": True, "totalMinNodeCount": 3, "totalMaxNodeCount": 50, "locationPolicy": 1},
    }}  # fmt: skip
    assert body_of(fake, "PUT", rf"/topics/{cid}-logs$") == {"labels": {**labels, "flotilla-dev_step": "log_stream"}}

    # The bootstrap pool is gone, the spec's pool is there, every call got a 2xx.
    assert fake.calls("DELETE", r"/nodePools/flotilla-bootstrap$")
    assert [p["name"] for p in fake.clusters[cluster_path]["nodePools"]] == ["sandbox"]
    assert failures(fake) == []

    # What the steps report: ids, endpoint, CA fingerprint and a credential reference, never the CA or a token.
    assert out["network"] == {"network_id": net_path, "subnet_ids": [sub_path], "owned": True, "network": net,
                              "subnetwork": sub, "firewall": fw, "pods_range": "pods", "services_range": "services",
                              "project": PROJECT, "region": "europe-west4"}  # fmt: skip
    assert out["iam"]["service_account_email"] == email
    assert out["iam"]["roles"] == ["roles/container.defaultNodeServiceAccount"]
    cluster = out["cluster"]
    der = hashlib.sha256(cluster_path.encode()).digest() * 8  # what the fake's CA certificate holds
    assert cluster["ca_fingerprint"] == "sha256:" + hashlib.sha256(der).hexdigest()
    assert cluster["credential_ref"] == f"gke://{PROJECT}/europe-west4/{cid}"
    assert cluster["endpoint"] == "https://" + fake.clusters[cluster_path]["endpoint"]
    assert cluster["private_endpoint"] is True and cluster["kubernetes_version"].startswith("1.30.")
    ca = fake.clusters[cluster_path]["masterAuth"]["clusterCaCertificate"]
    assert ca not in json.dumps(out) and base64.b64decode(ca).decode() not in json.dumps(out)
    assert out["node_pools"] == {"node_pools": {"sandbox": f"{cluster_path}/nodePools/sandbox"},
                                 "cluster": cluster_path}  # fmt: skip
    assert out["log_stream"] == {"log_stream_id": f"projects/{PROJECT}/topics/{cid}-logs", "name": f"{cid}-logs"}


async def test_modelserving_adapted_to_gcp(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = modelserving_on_gcp()
    await provision(gcp, req)
    cluster = body_of(fake, "POST", r"/locations/us-east1/clusters$")["cluster"]
    assert cluster["privateClusterConfig"] == {"enablePrivateNodes": True, "enablePrivateEndpoint": True,
                                               "masterIpv4CidrBlock": "172.16.0.0/28"}  # fmt: skip
    assert "networkConfig" not in cluster
    assert cluster["resourceLabels"]["team"] == "serving" and cluster["resourceLabels"]["costcenter"] == "4711"
    pool = body_of(fake, "POST", r"/nodePools$")["nodePool"]
    assert pool["name"] == "default" and pool["config"]["machineType"] == "n2-standard-8"
    assert "spot" not in pool["config"] and "taints" not in pool["config"] and "labels" not in pool["config"]
    assert pool["autoscaling"] == {"enabled": True, "totalMinNodeCount": 3, "totalMaxNodeCount": 3, "locationPolicy": 1}
    assert pool["initialNodeCount"] == 1  # per zone: 3 nodes in a three-zone region
    topic = fake.topics[f"projects/{PROJECT}/topics/{req.cluster_id}-logs"]
    assert topic["labels"] == gcp_labels(context(req).tags("log_stream"))


async def test_spot_pools_on_a_byon_network(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = dataeng_on_gcp()
    out = await provision(gcp, req)
    assert out["network"] == {
        "network_id": "projects/shared-host/global/networks/shared-vpc", "owned": False,
        "subnet_ids": ["projects/shared-host/regions/europe-west1/subnetworks/dataeng"]}  # fmt: skip
    assert not fake.calls(None, r"^/compute/")  # byon: no network call at all
    cluster = body_of(fake, "POST", r"/clusters$")["cluster"]
    assert cluster["network"] == "projects/shared-host/global/networks/shared-vpc"
    assert cluster["subnetwork"] == "projects/shared-host/regions/europe-west1/subnetworks/dataeng"
    assert cluster["ipAllocationPolicy"] == {"useIpAliases": True}  # GKE allocates the ranges
    assert "privateClusterConfig" not in cluster
    pools = {c.body["nodePool"]["name"]: c.body["nodePool"] for c in fake.calls("POST", r"/nodePools$")}
    assert list(pools) == ["infra", "spark-driver", "spark-executor"]  # one at a time, in spec order
    executor = pools["spark-executor"]
    assert executor["config"]["spot"] is True and executor["config"]["machineType"] == "n2-highmem-8"
    assert executor["config"]["taints"] == [{"key": "purpose", "value": "spark-executor", "effect": 1}]
    assert executor["config"]["labels"] == {"purpose": "spark-executor"}
    assert executor["autoscaling"] == {"enabled": True, "totalMaxNodeCount": 300, "locationPolicy": 2}  # ANY
    assert "spot" not in pools["infra"]["config"]
    assert failures(fake) == []  # never two node-pool operations at once

    fake.requests.clear()
    await gcp.delete("network", context(req, out), out["network"])  # adopted: not ours
    await gcp.delete("network", context(req), None)  # sweep with the spec: byon, nothing to look for
    assert fake.requests == []


# ---------------------------------------------------------------- idempotency and adoption
async def test_a_second_run_creates_nothing(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    first = await provision(gcp, req)
    made = creates(fake)
    assert len(made) == 7  # network, subnetwork, firewall, service account, cluster, node pool, topic
    # The same provider again, and a fresh one (a restarted process), as the runtime would on redelivery.
    for driver in (gcp, provider_for(fake)):
        before = len(fake.mutations())
        assert await provision(driver, req) == first
        assert fake.mutations()[before:] == []


async def test_adopts_what_an_earlier_run_left_and_waits_for_a_cluster_still_provisioning(
    fake: FakeGcp, gcp: GcpProvider
) -> None:
    req = cluster_requested(SERVERLESS)
    # A first run (another replica, or this one before a crash) got as far as starting the cluster create.
    earlier = provider_for(fake)
    resources = {"network": await earlier.ensure("network", context(req)),
                 "iam": await earlier.ensure("iam", context(req))}  # fmt: skip
    fake.op_polls = 6
    status, op = fake.handle("POST", f"/v1/projects/{PROJECT}/locations/europe-west4/clusters",
                             json.dumps(_cluster_create_body(req, resources)).encode())
    assert status == 200 and op["status"] == "PENDING"
    fake.requests.clear()

    out = {step: await gcp.ensure(step, context(req, resources)) for step in ("network", "iam")}
    assert out == resources
    cluster = await gcp.ensure("cluster", context(req, resources))
    assert cluster["endpoint"].startswith("https://10.")
    assert creates(fake) == []  # adopted: nothing created again
    assert len(fake.calls("GET", rf"/clusters/{req.cluster_id}$")) >= 3  # polled until RUNNING
    assert fake.calls("DELETE", r"/nodePools/flotilla-bootstrap$")  # and finished the cluster step's work


def _cluster_create_body(req: ClusterRequested, resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The create request an earlier run sent (built by the same mapping)."""
    from google.protobuf import json_format

    from services.cloud_provisioner.providers.gcp_mapping import Paths, cluster_body, network_ref

    ctx = context(req, resources)
    assert req.spec is not None
    paths = Paths(PROJECT, req.location.region, names_for(req.cluster_id))
    body = cluster_body(ctx, req.spec, paths.names, network_ref(ctx, paths), resources["iam"]["service_account_email"])
    return {"cluster": json.loads(json_format.MessageToJson(type(body).pb(body)))}


async def test_existing_pool_autoscaling_is_converged(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    out = await provision(gcp, req)
    assert req.spec is not None
    bigger = req.spec.model_copy(update={"node_pools": [req.spec.node_pools[0].model_copy(update={"max_count": 80})]})
    before = len(fake.mutations())
    ctx = ClusterContext(req.cluster_id, req.clusterset, req.location, bigger, out)
    await gcp.ensure("node_pools", ctx)
    pool = f"/v1/projects/{PROJECT}/locations/europe-west4/clusters/{req.cluster_id}/nodePools/sandbox"
    assert fake.mutations()[before:] == [("POST", f"{pool}:setAutoscaling")]
    assert fake.calls("POST", ":setAutoscaling$")[0].body == {"autoscaling": {
        "enabled": True, "totalMinNodeCount": 3, "totalMaxNodeCount": 80, "locationPolicy": 1}}  # fmt: skip
    await gcp.ensure("node_pools", ctx)
    assert len(fake.calls("POST", ":setAutoscaling$")) == 1  # converged: nothing more to do


async def test_in_place_update_sends_only_what_differs_and_creates_nothing(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    cid = req.cluster_id
    out = await provision(gcp, req)
    cluster = f"/v1/projects/{PROJECT}/locations/europe-west4/clusters/{cid}"
    pool = f"{cluster}/nodePools/sandbox"
    before, made = len(fake.mutations()), dict(fake.created)
    fingerprint = fake.clusters[cluster.removeprefix("/v1/")]["labelFingerprint"]
    spec = changed_spec(req.spec, {**req.spec.tags, "owner": "faas"}, maxCount=80,
                        labels={"runtime": "kata", "tier": "gold"},
                        taints=[{"key": "sandbox", "value": "kata", "effect": "NoExecute"}])  # fmt: skip
    ctx = ClusterContext(cid, req.clusterset, req.location, spec, out)
    pools = await gcp.update("node_pools", ctx)
    labels = await gcp.update("cluster", ctx)
    assert pools.changed and pools.resources == out["node_pools"]
    assert labels.changed and labels.resources == out["cluster"]
    assert fake.mutations()[before:] == [("POST", f"{pool}:setAutoscaling"), ("PUT", pool),
                                         ("POST", f"{cluster}:setResourceLabels")]  # fmt: skip
    assert body_of(fake, "POST", ":setAutoscaling$") == {"autoscaling": {
        "enabled": True, "totalMinNodeCount": 3, "totalMaxNodeCount": 80, "locationPolicy": 1}}  # fmt: skip
    assert body_of(fake, "PUT", "/nodePools/sandbox$") == {
        "labels": {"labels": {"runtime": "kata", "tier": "gold"}},
        "taints": {"taints": [{"key": "sandbox", "value": "kata", "effect": int(TAINT_EFFECTS["NoExecute"])}]},
        "resourceLabels": {"labels": gcp_labels(ctx.tags("node_pools"))},
    }  # the owner tag reaches the pool's resource labels too
    assert body_of(fake, "POST", ":setResourceLabels$") == {
        "resourceLabels": gcp_labels(ctx.tags("cluster")), "labelFingerprint": fingerprint}
    assert gcp_labels(ctx.tags("cluster"))["owner"] == "faas"
    assert fake.created == made  # nothing created
    stored = next(p for p in fake.clusters[cluster.removeprefix("/v1/")]["nodePools"] if p["name"] == "sandbox")
    assert stored["config"]["labels"] == {"runtime": "kata", "tier": "gold"}
    # Converged: asked again, nothing is sent.
    assert not (await gcp.update("node_pools", ctx)).changed and not (await gcp.update("cluster", ctx)).changed
    assert len(fake.mutations()) == before + 3

    # maxCount 0 switches autoscaling off; nobody sizes the pool then, so it is set to zero nodes.
    off = ClusterContext(cid, req.clusterset, req.location, changed_spec(spec, minCount=0, maxCount=0), out)
    assert (await gcp.update("node_pools", off)).changed
    assert fake.mutations()[before + 3:] == [("POST", f"{pool}:setAutoscaling"), ("POST", f"{pool}:setSize")]
    assert fake.calls("POST", ":setAutoscaling$")[-1].body == {"autoscaling": {}}  # enabled: false (the default)
    assert body_of(fake, "POST", ":setSize$") == {}  # nodeCount: 0 (the default)
    assert stored["nodeCount"] == 0


async def test_in_place_update_refuses_what_only_a_rotation_can_do(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    out = await provision(gcp, req)
    before = len(fake.mutations())
    for spec in (changed_spec(req.spec, instanceTypes=["n2-standard-64"]), changed_spec(req.spec, spot=True),
                 with_pool(req.spec, "gpu")):  # fmt: skip
        with pytest.raises(NotInPlaceError) as err:
            await gcp.update("node_pools", ClusterContext(req.cluster_id, req.clusterset, req.location, spec, out))
        assert err.value.code == "NotInPlace" and not err.value.retryable
    assert len(fake.mutations()) == before


async def test_a_resource_that_is_not_ours_is_never_adopted_or_deleted(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    cid = req.cluster_id
    # Someone else's network under our deterministic name (no marker), someone else's topic (other cluster id).
    fake.handle("POST", f"/compute/v1/projects/{PROJECT}/global/networks",
                json.dumps({"name": f"{cid}-net", "description": "hand-made"}).encode())
    fake.handle("PUT", f"/v1/projects/{PROJECT}/topics/{cid}-logs",
                json.dumps({"labels": {"flotilla-dev_cluster-id": "someone-else"}}).encode())
    with pytest.raises(TerminalCloudError) as raised:
        await gcp.ensure("network", context(req))
    assert raised.value.code == "NameConflict" and not raised.value.retryable
    with pytest.raises(TerminalCloudError, match="NameConflict"):
        await gcp.ensure("log_stream", context(req))
    fake.requests.clear()
    await deprovision(gcp, req, None)  # the sweep by name + cluster id
    assert not [m for m in fake.mutations() if m[0] == "DELETE"]
    assert f"{cid}-net" in fake.networks and f"projects/{PROJECT}/topics/{cid}-logs" in fake.topics


# ---------------------------------------------------------------- deletion
async def test_deletion_runs_in_reverse_and_not_found_is_done(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    other = cluster_requested(SERVERLESS, "0002")
    out = await provision(gcp, req)
    await provision(gcp, other)  # a neighbour in the same project: must survive
    assert fake.inventory(req.cluster_id)
    fake.requests.clear()

    await deprovision(gcp, req, out)
    cid = req.cluster_id
    cluster = f"/v1/projects/{PROJECT}/locations/europe-west4/clusters/{cid}"
    email = f"{names_for(cid).service_account_id}@{PROJECT}.iam.gserviceaccount.com"
    assert fake.mutations() == [
        ("DELETE", f"/v1/projects/{PROJECT}/topics/{cid}-logs"),
        ("DELETE", f"{cluster}/nodePools/sandbox"),
        ("DELETE", cluster),
        ("POST", f"/v1/projects/{PROJECT}:setIamPolicy"),  # our member out of the project policy first
        ("DELETE", f"/v1/projects/{PROJECT}/serviceAccounts/{email}"),
        ("DELETE", f"/compute/v1/projects/{PROJECT}/global/firewalls/{cid}-internal"),
        ("DELETE", f"/compute/v1/projects/{PROJECT}/regions/europe-west4/subnetworks/{cid}-nodes"),
        ("DELETE", f"/compute/v1/projects/{PROJECT}/global/networks/{cid}-net"),
    ]
    assert fake.inventory(cid) == []
    assert f"serviceAccount:{email}" not in fake.members()
    assert len(fake.inventory(other.cluster_id)) == 7 and "user:admin@example.com" in fake.members()

    fake.requests.clear()
    await deprovision(gcp, req, out)  # again: everything is not found, which is done
    await deprovision(gcp, req, None)  # and the sweep without recorded resources
    assert fake.mutations() == []


async def test_deleting_a_cluster_that_is_still_being_created_waits_for_it(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    resources = {"network": await gcp.ensure("network", context(req)), "iam": await gcp.ensure("iam", context(req))}
    fake.op_polls = 5
    fake.handle("POST", f"/v1/projects/{PROJECT}/locations/europe-west4/clusters",
                json.dumps(_cluster_create_body(req, resources)).encode())
    # Retired mid-create: the sweep (no recorded result) finds it by name + label and removes it.
    await deprovision(gcp, req, None)
    assert fake.inventory(req.cluster_id) == []
    assert failures(fake) == []  # it waited instead of deleting a PROVISIONING cluster


# ---------------------------------------------------------------- errors
async def test_throttling_is_retried_and_converges(fake: FakeGcp, gcp: GcpProvider) -> None:
    req = cluster_requested(SERVERLESS)
    fake.fail("POST", r"/clusters$", 429, "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute'",
              grpc_status="RESOURCE_EXHAUSTED", reason="RATE_LIMIT_EXCEEDED")  # fmt: skip
    fake.fail("GET", r"/global/networks/", 503, "The service is currently unavailable.")
    fake.fail("POST", r":setIamPolicy$", 409, "There were concurrent policy changes.", grpc_status="ABORTED")
    await provision(gcp, req)
    assert [r.status for r in fake.calls("POST", r"/clusters$")] == [429, 200]
    assert [r.status for r in fake.calls("POST", r":setIamPolicy$")] == [409, 200]
    assert len(fake.calls("POST", r":getIamPolicy$")) == 2  # a lost etag race reads the policy again
    assert len(fake.clusters) == 1


async def test_throttling_beyond_the_local_retries_is_retryable(fake: FakeGcp) -> None:
    gcp = provider_for(fake, api_attempts=2)
    fake.fail("POST", r"/clusters$", 429, "Too many requests", times=5)
    req = cluster_requested(SERVERLESS)
    resources = {"network": await gcp.ensure("network", context(req)), "iam": await gcp.ensure("iam", context(req))}
    with pytest.raises(ThrottlingError) as raised:
        await gcp.ensure("cluster", context(req, resources))
    assert raised.value.retryable and raised.value.code == "Throttling"
    assert len(fake.calls("POST", r"/clusters$")) == 2


@pytest.mark.parametrize("status,message,grpc_status,error_type,code", [
    (403, 'Insufficient regional quota to satisfy request: resource "CPUS": request requires 96.0 and is short 72.0',
     "PERMISSION_DENIED", QuotaExceededError, "QuotaExceeded"),
    (400, "Invalid machine type n2-standard-32 in zone europe-west4-b.", "INVALID_ARGUMENT", InvalidInstanceTypeError,
     "InvalidInstanceType"),
    (403, "Required 'container.clusters.update' permission for 'projects/flotilla-test'", "PERMISSION_DENIED",
     TerminalCloudError, "PermissionDenied"),
])  # fmt: skip
async def test_terminal_errors_surface_with_a_stable_code(fake: FakeGcp, gcp: GcpProvider, status: int, message: str,
                                                          grpc_status: str, error_type: type[CloudError],
                                                          code: str) -> None:  # fmt: skip
    req = cluster_requested(SERVERLESS)
    resources: dict[str, dict[str, Any]] = {}
    for step in ("network", "iam", "cluster"):
        resources[step] = await gcp.ensure(step, context(req, resources))
    fake.fail("POST", r"/nodePools$", status, message, grpc_status=grpc_status, times=10)
    with pytest.raises(error_type) as raised:
        await gcp.ensure("node_pools", context(req, resources))
    assert raised.value.code == code and not raised.value.retryable
    assert message in raised.value.message
    assert len(fake.calls("POST", r"/nodePools$")) == 1  # terminal: not retried


async def test_a_pool_left_in_error_by_a_quota_failure_is_replaced_on_the_next_try(
    fake: FakeGcp, gcp: GcpProvider
) -> None:
    req = cluster_requested(SERVERLESS)
    resources: dict[str, dict[str, Any]] = {}
    for step in ("network", "iam", "cluster"):
        resources[step] = await gcp.ensure(step, context(req, resources))
    fake.fail_operation("POST", r"/nodePools$", 'Insufficient regional quota to satisfy request: resource "CPUS"')
    with pytest.raises(QuotaExceededError):
        await gcp.ensure("node_pools", context(req, resources))
    fake.requests.clear()
    await gcp.ensure("node_pools", context(req, resources))  # quota raised meanwhile; a new request retries
    pools = f"/v1/projects/{PROJECT}/locations/europe-west4/clusters/{req.cluster_id}/nodePools"
    assert fake.mutations() == [("DELETE", f"{pools}/sandbox"), ("POST", pools)]


async def test_a_compute_operation_error_is_classified(fake: FakeGcp, gcp: GcpProvider) -> None:
    fake.fail_operation("POST", r"/global/networks$", "Quota 'NETWORKS' exceeded.  Limit: 15.0 globally.",
                        compute_code="QUOTA_EXCEEDED")  # fmt: skip
    with pytest.raises(QuotaExceededError, match="NETWORKS"):
        await gcp.ensure("network", context(cluster_requested(SERVERLESS)))


def test_build_uses_anonymous_credentials_only_for_a_plain_http_endpoint() -> None:
    local = build(Settings(gcp_project="p", gcp_api_endpoint="http://127.0.0.1:1"))
    assert isinstance(local.credentials, AnonymousCredentials)
    real = build(Settings(gcp_project="p", gcp_api_endpoint="https://container.googleapis.com"))
    assert real._given_credentials is None  # the standard chain (google.auth.default) at first use


# ---------------------------------------------------------------- through the provisioner service
def provisioner(settings: Settings, gcp: GcpProvider) -> contextlib.AbstractAsyncContextManager[ServiceContext]:
    """The service in-process with the gcp driver (as app.subscriptions builds it, minus the registry)."""
    return provisioner_service(settings, ProviderRegistry({"gcp": gcp}))


async def emitted(bus: Bus, cid: str, event_type: str) -> list[Envelope]:
    return [e for e in await fleet_events(bus, source=SERVICE, aggregate=cid) if e.type == event_type]


async def test_serverless_cluster_end_to_end_through_the_service(settings: Settings, bus: Bus, fake: FakeGcp) -> None:
    gcp = provider_for(fake, api_attempts=2)
    req = cluster_requested(SERVERLESS)
    cid = req.cluster_id
    # Throttled longer than the driver retries locally: the consumer runtime redelivers with backoff.
    fake.fail("POST", r"/clusters$", 429, "Too many requests", grpc_status="RESOURCE_EXHAUSTED", times=3)
    fake.fail("PUT", r"/topics/", 503, "unavailable", times=2)
    async with provisioner(settings, gcp):
        await bus.publish(from_planner(req))
        await wait_until(lambda: emitted(bus, cid, "ClusterProvisioned"), within=30)
        events = await fleet_events(bus, source=SERVICE, aggregate=cid)
        assert [e.type for e in events] == ["ClusterResourceProvisioned"] * 5 + ["ClusterProvisioned"]
        prov = ClusterProvisioned.model_validate(events[-1].data)
        assert prov.credential_ref == f"gke://{PROJECT}/europe-west4/{cid}"
        assert prov.endpoint.startswith("https://10.") and prov.ca_fingerprint.startswith("sha256:")
        assert prov.network.owned and prov.network.network_id == f"projects/{PROJECT}/global/networks/{cid}-net"
        assert len(fake.clusters) == 1 and len(fake.calls("POST", r"/clusters$")) == 4  # 3 throttled + 1

        await bus.publish(from_planner(retirement_requested(req)))
        await wait_until(lambda: emitted(bus, cid, "ClusterDeprovisioned"), within=30)
        assert fake.inventory(cid) == []
        assert fake.members() == {"user:admin@example.com"}
        await wait_until(lambda: consumer_drained(bus, SERVICE))


async def test_quota_fails_the_cluster_with_its_code_and_retirement_cleans_up(settings: Settings, bus: Bus,
                                                                              fake: FakeGcp) -> None:  # fmt: skip
    gcp = provider_for(fake)
    req = modelserving_on_gcp()
    cid = req.cluster_id
    fake.fail("POST", r"/nodePools$", 403, "Insufficient regional quota to satisfy request: resource \"N2_CPUS\"",
              times=100)  # fmt: skip
    async with provisioner(settings, gcp):
        await bus.publish(from_planner(req))
        await wait_until(lambda: emitted(bus, cid, "ClusterProvisioningFailed"), within=30)
        [env] = await emitted(bus, cid, "ClusterProvisioningFailed")
        failed = ClusterProvisioningFailed.model_validate(env.data)
        assert (failed.code, failed.retryable, failed.step, failed.operation) == (
            "QuotaExceeded", False, "node_pools", "provision")  # fmt: skip
        assert "N2_CPUS" in failed.message
        assert len(fake.calls("POST", r"/nodePools$")) == 1  # terminal: no redelivery hammering the API

        await bus.publish(from_planner(retirement_requested(req)))
        await wait_until(lambda: emitted(bus, cid, "ClusterDeprovisioned"), within=30)
        assert fake.inventory(cid) == []
        assert not await emitted(bus, cid, "ClusterProvisioned")


@pytest.mark.slow
async def test_sigkill_mid_operation_resumes_without_duplicates(nats_proc: ServerProcess, redis_proc: ServerProcess,
                                                                bus: Bus, tmp_path: Path) -> None:  # fmt: skip
    """`python -m services.cloud_provisioner` with the real gcp driver (settings only: build(settings)), killed
    while GKE create and delete operations are in flight, then restarted: it adopts, creates nothing twice."""
    # Operations finish at once except the ones we kill the service in; the driver polls every 5 s (its default).
    fake = FakeGcp(PROJECT, op_polls=0, op_polls_by_type={"CREATE_CLUSTER": 1, "DELETE_CLUSTER": 1}).start()
    env = service_env(nats_proc.port, redis_proc.port, FLOTILLA_CLOUD_DRIVERS='{"gcp": "real"}',
                      FLOTILLA_GCP_PROJECT=PROJECT, FLOTILLA_GCP_API_ENDPOINT=fake.url, FLOTILLA_ACK_WAIT_S="2",
                      FLOTILLA_BACKOFF_S="[0.05, 0.1, 0.2]", FLOTILLA_LOG_LEVEL="WARNING",
                      FLOTILLA_SHUTDOWN_GRACE_S="1")  # fmt: skip
    reqs = [cluster_requested(SERVERLESS, f"k{i}") for i in range(2)]
    ids = [r.cluster_id for r in reqs]

    async def all_emitted(event_type: str) -> bool:
        return all([await emitted(bus, cid, event_type) for cid in ids])

    proc = start_service(SERVICE, env, tmp_path / "logs")
    try:
        for req in reqs:
            await bus.publish(from_planner(req))
        await wait_until(lambda: len(fake.calls("POST", r"/clusters$")) >= 2, within=60)
        proc.send_signal(signal.SIGKILL)  # both cluster creates in flight, their messages unacked
        proc.wait(10)
        proc = start_service(SERVICE, env, tmp_path / "logs")
        await wait_until(lambda: all_emitted("ClusterProvisioned"), within=60)
        assert fake.created == {"network": 2, "subnetwork": 2, "firewall": 2, "serviceAccount": 2, "cluster": 2,
                                "nodePool": 2, "topic": 2}  # fmt: skip
        assert len(fake.calls("POST", r"/clusters$")) == 2  # adopted after the restart, not created again
        published = await fleet_events(bus, source=SERVICE)
        assert len({e.id for e in published}) == len(published)

        for req in reqs:
            await bus.publish(from_planner(retirement_requested(req)))
        await wait_until(lambda: len(fake.calls("DELETE", r"/clusters/[^/]+$")) >= 2, within=60)
        proc.send_signal(signal.SIGKILL)  # both cluster deletes in flight
        proc.wait(10)
        proc = start_service(SERVICE, env, tmp_path / "logs")
        await wait_until(lambda: all_emitted("ClusterDeprovisioned"), within=60)
        for cid in ids:
            assert fake.inventory(cid) == []
        assert fake.members() == {"user:admin@example.com"}
    finally:
        proc.kill()
        proc.wait(10)
        fake.stop()
