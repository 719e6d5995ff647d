"""Credentials against the clouds' APIs at their HTTP boundary, and the resulting clients against a TLS API server.

- EKS: moto's server mode (tests/fakes/moto_server.py) answers DescribeCluster to the real boto3 client;
  the token is presigned locally by botocore.
- AKS: the fake ARM (tests/fakes/azure_arm.py, TLS) answers listClusterUserCredential to the real
  azure-mgmt-containerservice client; the Azure AD token comes from an injected fake credential.
- GKE: the fake GKE REST API (tests/fakes/gcp_api.py) answers clusters.get to the real google-cloud-container
  client; the Google token comes from injected fake credentials.
Then a real `kubernetes` client built by the resolver calls GET /version on `KubeApiStub` (tests/fakes/k8s_creds.py)
over TLS: it connects only because the cluster's CA is pinned, and the stub records the bearer token it got.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes.client import ApiClient, VersionApi

from services.cloud_provisioner.providers import aws_mapping, gcp_mapping
from services.cloud_provisioner.providers.azure_mapping import AzureNames
from services.infra_installer.credentials import (
    ClusterCredentials,
    CredentialError,
    CredentialUnavailable,
    api_client_for,
    resolver_for,
)
from services.infra_installer.credentials_cloud import AKS_SCOPE, AksSource, GkeSource
from services.infra_installer.targets.base import ClusterRef, InstallError
from shared.config import Settings
from tests.fakes.azure_arm import FakeArm
from tests.fakes.gcp_api import FakeGcp
from tests.fakes.k8s_creds import (
    FakeAzureCredential,
    FakeGoogleCredentials,
    KubeApiStub,
    eks_token_url,
    signed_for,
)
from tests.fakes.moto_server import DUMMY_KEY, MotoServer, moto_server

REGION = "eu-west-1"
SUB = "00000000-0000-0000-0000-000000000001"
PROJECT = "flotilla-test"


class Clock:
    def __init__(self) -> None:
        import time

        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def fingerprint(pem: bytes) -> str:
    return "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def pinned(client: ApiClient) -> bytes:
    with open(client.configuration.ssl_ca_cert, "rb") as f:
        return f.read()


async def version(client: ApiClient) -> str:
    """GET /version through the client (the kubernetes client is synchronous: a worker thread)."""
    info = await asyncio.to_thread(lambda: VersionApi(client).get_code(_request_timeout=5))
    return str(info.git_version)


@pytest.fixture
def stub() -> Iterator[KubeApiStub]:
    server = KubeApiStub().start()
    yield server
    server.stop()


@pytest.fixture
def impostor() -> Iterator[KubeApiStub]:
    """Another API server with its own certificate: a client pinned to `stub`'s CA must refuse it."""
    server = KubeApiStub().start()
    yield server
    server.stop()


# ---------------------------------------------------------------- EKS against moto
@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard credential chain finds moto's dummy keys and nothing of the machine's."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


def eks_cluster(moto: MotoServer, name: str, ca_pem: bytes | None = None) -> dict[str, Any]:
    """An EKS cluster in moto; `ca_pem` replaces moto's random CA text with a real certificate."""
    eks = moto.client("eks", REGION)
    eks.create_cluster(name=name, roleArn="arn:aws:iam::123456789012:role/flotilla-eks",
                       resourcesVpcConfig={"subnetIds": []})  # fmt: skip
    if ca_pem is not None:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.eks.models import eks_backends

        # moto serves in this process: its backend is the one to edit (its API cannot set the CA).
        eks_backends[DEFAULT_ACCOUNT_ID][REGION].clusters[name].certificate_authority = {
            "data": base64.b64encode(ca_pem).decode()
        }
    return dict(eks.describe_cluster(name=name)["cluster"])


async def test_eks_client_for_a_moto_cluster(moto: MotoServer, aws_env: None) -> None:
    """The default wiring (api_client_for + settings.aws_endpoint_url + the standard credential chain)."""
    cluster = eks_cluster(moto, "eks-moto-1")
    settings = Settings(aws_endpoint_url=moto.url)
    # What the provisioner put into ClusterProvisioned for this cluster.
    announced = aws_mapping.ca_fingerprint(cluster["certificateAuthority"]["data"])
    ref = ClusterRef(cluster_id="eks-moto-1", endpoint=str(cluster["endpoint"]).rstrip("/"), cloud="aws", region=REGION,
                     credential_ref=aws_mapping.credential_ref(REGION, "eks-moto-1"))  # fmt: skip
    try:
        client = await api_client_for(ref, settings, ca_fingerprint=announced)
        cfg = client.configuration
        assert cfg.host == str(cluster["endpoint"]).rstrip("/") and cfg.verify_ssl
        # moto's CA text, pinned as fetched (base64-decoded)
        assert pinned(client) == base64.b64decode(cluster["certificateAuthority"]["data"])
        url = eks_token_url(str(cfg.get_api_key_with_prefix("BearerToken")))
        query = dict(parse_qsl(urlsplit(url).query))
        # Signed for the region's real STS, never for the (moto) endpoint the EKS API calls went to.
        assert urlsplit(url).hostname == f"sts.{REGION}.amazonaws.com"
        assert query["Action"] == "GetCallerIdentity" and query["X-Amz-Expires"] == "60"
        assert query["X-Amz-SignedHeaders"] == "host;x-k8s-aws-id" and signed_for(url, "eks-moto-1", DUMMY_KEY)
        assert await api_client_for(ref, settings, ca_fingerprint=announced) is client

        wrong = "sha256:" + "0" * 64
        other = ClusterRef(cluster_id="eks-moto-1b", endpoint=ref.endpoint, credential_ref=ref.credential_ref)
        with pytest.raises(CredentialError) as err:
            await api_client_for(other, settings, ca_fingerprint=wrong)
        assert err.value.code == "CaMismatch" and not err.value.retryable and "eks-moto-1b" in str(err.value)

        ghost = ClusterRef(cluster_id="ghost", endpoint=ref.endpoint, credential_ref=f"eks://{REGION}/ghost")
        with pytest.raises(CredentialError) as err:
            await api_client_for(ghost, settings, ca_fingerprint=wrong)
        assert err.value.code == "ClusterNotFound" and not err.value.retryable and "ghost" in str(err.value)
    finally:
        resolver_for(settings).close()


async def test_eks_token_reaches_the_api_server_over_the_pinned_ca(
    moto: MotoServer, aws_env: None, stub: KubeApiStub, impostor: KubeApiStub
) -> None:
    eks_cluster(moto, "eks-tls-1", ca_pem=stub.ca_pem)
    creds = ClusterCredentials(Settings(aws_endpoint_url=moto.url))
    ref = ClusterRef(cluster_id="eks-tls-1", endpoint=stub.url, credential_ref=f"eks://{REGION}/eks-tls-1")
    try:
        client = await creds.api_client(ref, ca_fingerprint=fingerprint(stub.ca_pem))
        assert await version(client) == "v1.31.4"
        (authorization,) = stub.tokens()
        assert authorization is not None and signed_for(eks_token_url(authorization), "eks-tls-1", DUMMY_KEY)

        # The same pinned CA does not let the client talk to a server with another certificate.
        elsewhere = await creds.api_client(ClusterRef(cluster_id="eks-tls-1", endpoint=impostor.url,
                                                      credential_ref=ref.credential_ref),
                                           ca_fingerprint=fingerprint(stub.ca_pem))  # fmt: skip
        with pytest.raises(Exception, match="(?i)certificate verify failed"):
            await version(elsewhere)
        assert impostor.tokens() == []  # the token never left the client
    finally:
        creds.close()


# ---------------------------------------------------------------- AKS against the fake ARM
@pytest.fixture
def arm() -> Iterator[FakeArm]:
    fake = FakeArm(polls=1, subscription_id=SUB).start()
    yield fake
    fake.stop()


def aks_cluster(arm: FakeArm, cluster_id: str) -> AzureNames:
    names = AzureNames(SUB, cluster_id)
    arm.put(f"/subscriptions/{SUB}/resourceGroups/{names.resource_group}", {"location": "westeurope"})
    arm.put(
        f"/subscriptions/{SUB}/resourceGroups/{names.resource_group}/providers/Microsoft.ContainerService/"
        f"managedClusters/{names.cluster}",
        {"location": "westeurope", "properties": {"dnsPrefix": cluster_id}},
    )
    return names


async def test_aks_token_and_ca_through_the_arm_api(arm: FakeArm, stub: KubeApiStub, impostor: KubeApiStub) -> None:
    names = aks_cluster(arm, "aks-1")
    arm.ca_pem = stub.ca_pem  # listClusterUserCredential now returns the stub's CA
    clock = Clock()
    azure = FakeAzureCredential(clock, ttl_s=3600)
    source = AksSource(azure, base_url=arm.base_url, clock=clock,
                       client_kwargs={"connection_verify": str(arm.ca_file), "retry_total": 0})  # fmt: skip
    creds = ClusterCredentials(Settings(), sources={"aks": source}, clock=clock)
    ref = ClusterRef(cluster_id="aks-1", endpoint=stub.url, credential_ref=names.credential_ref, cloud="azure")
    try:
        client = await creds.api_client(ref, ca_fingerprint=fingerprint(stub.ca_pem))
        assert await version(client) == "v1.31.4"
        (cred_call,) = arm.calls("POST")
        assert cred_call.path.endswith(f"/managedClusters/{names.cluster}/listClusterUserCredential")
        assert cred_call.query.get("format") == "exec"
        assert azure.asked_for(AKS_SCOPE) == 1
        assert stub.tokens() == ["Bearer aad-token-2"]  # token 1 went to ARM for the CA call

        clock.advance(3500)  # 100 s left: the next request carries a new Azure AD token
        assert await version(client) == "v1.31.4"
        assert stub.tokens()[-1] == f"Bearer aad-token-{len(azure.scopes)}" != stub.tokens()[0]
        assert azure.asked_for(AKS_SCOPE) == 2 and len(arm.calls("POST")) == 1  # the CA is not fetched again

        arm.ca_pem = impostor.ca_pem  # the API now reports a CA the provisioning result did not announce
        with pytest.raises(CredentialError) as err:
            await creds.api_client(ClusterRef(cluster_id="aks-1-again", endpoint=stub.url,
                                              credential_ref=names.credential_ref),
                                   ca_fingerprint=fingerprint(stub.ca_pem))  # fmt: skip
        assert err.value.code == "CaMismatch" and not err.value.retryable and "aks-1-again" in str(err.value)
    finally:
        creds.close()
        source.close()


async def test_aks_errors(arm: FakeArm) -> None:
    names = aks_cluster(arm, "aks-2")
    source = AksSource(FakeAzureCredential(), base_url=arm.base_url,
                       client_kwargs={"connection_verify": str(arm.ca_file), "retry_total": 0})  # fmt: skip
    creds = ClusterCredentials(Settings(), sources={"aks": source})
    good = fingerprint(arm.ca_pem)
    try:
        arm.inject("POST", "listClusterUserCredential", status=429, code="TooManyRequests", times=1)
        with pytest.raises(CredentialUnavailable) as retry:
            await creds.api_client(ClusterRef(cluster_id="aks-2", endpoint="https://aks-2.example:443",
                                              credential_ref=names.credential_ref), ca_fingerprint=good)  # fmt: skip
        assert retry.value.retryable and isinstance(retry.value, InstallError) and "aks-2" in str(retry.value)
        # The throttling is over: the same reference works now.
        assert await creds.api_client(ClusterRef(cluster_id="aks-2", endpoint="https://aks-2.example:443",
                                                 credential_ref=names.credential_ref), ca_fingerprint=good)  # fmt: skip

        with pytest.raises(CredentialError) as gone:
            await creds.api_client(ClusterRef(cluster_id="aks-gone", endpoint="https://x:443",
                                              credential_ref=f"aks://{SUB}/{names.resource_group}/nope"),
                                   ca_fingerprint=good)  # fmt: skip
        assert gone.value.code == "ClusterNotFound" and not gone.value.retryable
    finally:
        creds.close()
        source.close()


# ---------------------------------------------------------------- GKE against the fake GKE API
@pytest.fixture
def gcp() -> Iterator[FakeGcp]:
    fake = FakeGcp(project=PROJECT).start()
    yield fake
    fake.stop()


def gke_cluster(gcp: FakeGcp, name: str, ca_pem: bytes) -> str:
    """A RUNNING cluster in the fake; returns its CA as GKE reports it (base64 PEM)."""
    ca = base64.b64encode(ca_pem).decode()
    key = f"projects/{PROJECT}/locations/europe-west4/clusters/{name}"
    with gcp.lock:
        gcp.clusters[key] = {"name": name, "location": "europe-west4", "status": "RUNNING", "endpoint": "127.0.0.1",
                             "masterAuth": {"clusterCaCertificate": ca}, "nodePools": []}  # fmt: skip
    return ca


async def test_gke_token_and_ca_through_the_gke_api(gcp: FakeGcp, stub: KubeApiStub) -> None:
    ca = gke_cluster(gcp, "gke-1", stub.ca_pem)
    clock = Clock()
    google = FakeGoogleCredentials(clock, ttl_s=3600)
    creds = ClusterCredentials(Settings(), sources={"gke": GkeSource(google, api_endpoint=gcp.url, clock=clock)},
                               clock=clock)  # fmt: skip
    ref = ClusterRef(cluster_id="gke-1", endpoint=stub.url, credential_ref=gcp_mapping.credential_ref(
        PROJECT, "europe-west4", "gke-1"), cloud="gcp")  # fmt: skip
    try:
        # The fingerprint exactly as the gcp driver computed it for ClusterProvisioned.
        client = await creds.api_client(ref, ca_fingerprint=gcp_mapping.ca_fingerprint(ca))
        assert await version(client) == "v1.31.4"
        assert stub.tokens() == ["Bearer ya29.fake-1"]
        assert [c.path for c in gcp.calls("GET")] == [f"/v1/projects/{PROJECT}/locations/europe-west4/clusters/gke-1"]

        clock.advance(3600)  # expired: the request refreshes the credentials first
        assert await version(client) == "v1.31.4"
        assert stub.tokens()[-1] == "Bearer ya29.fake-2" and google.refreshes == 2
        assert len(gcp.calls("GET")) == 1  # the CA is pinned once
    finally:
        creds.close()


async def test_gke_errors_and_default_wiring(gcp: FakeGcp, stub: KubeApiStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default source (settings.gcp_api_endpoint + google.auth.default) and the error mapping."""
    import google.auth

    ca = gke_cluster(gcp, "gke-2", stub.ca_pem)
    google_creds = FakeGoogleCredentials()
    monkeypatch.setattr(google.auth, "default", lambda scopes=None, **_: (google_creds, PROJECT))
    settings = Settings(gcp_api_endpoint=gcp.url)
    ref = ClusterRef(cluster_id="gke-2", endpoint=stub.url, credential_ref=f"gke://{PROJECT}/europe-west4/gke-2")
    try:
        gcp.fail("GET", r"clusters/gke-2$", 503, "backend error", times=1)
        with pytest.raises(CredentialUnavailable) as retry:
            await api_client_for(ref, settings, ca_fingerprint=gcp_mapping.ca_fingerprint(ca))
        assert retry.value.retryable and "gke-2" in str(retry.value)
        client = await api_client_for(ref, settings, ca_fingerprint=gcp_mapping.ca_fingerprint(ca))
        assert await version(client) == "v1.31.4" and stub.tokens() == ["Bearer ya29.fake-1"]

        with pytest.raises(CredentialError) as gone:
            await api_client_for(ClusterRef(cluster_id="gke-gone", endpoint=stub.url,
                                            credential_ref=f"gke://{PROJECT}/europe-west4/nope"), settings,
                                 ca_fingerprint=gcp_mapping.ca_fingerprint(ca))  # fmt: skip
        assert gone.value.code == "ClusterNotFound" and not gone.value.retryable and "gke-gone" in str(gone.value)
    finally:
        resolver_for(settings).close()
