"""Credentials without any cloud: reference parsing, the EKS token, CA fingerprints, the client cache and its
token refresh (fake clock, fake sources), the kubeconfig scheme, and the SDK error classification."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import os
import ssl
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import boto3
import pytest
import yaml

from services.cloud_provisioner.providers import aws_mapping, gcp_mapping
from services.cloud_provisioner.providers import azure as azure_provider
from services.infra_installer import credentials_cloud as cc
from services.infra_installer.credentials import (
    AksRef,
    ClusterCredentials,
    CredentialError,
    CredentialUnavailable,
    EksRef,
    GkeRef,
    KubeconfigRef,
    SimRef,
    Token,
    ca_fingerprint,
    decode_ca,
    parse_ref,
    verify_fingerprint,
)
from services.infra_installer.targets.base import ClusterRef, InstallError
from shared.bus.consumer import RetryableError
from shared.config import Settings
from tests.fakes.gcp_api import fake_ca
from tests.fakes.k8s_creds import FakeGoogleCredentials, eks_token_url, signed_for
from tests.fakes.tls import self_signed

SUB = "00000000-0000-0000-0000-000000000001"


# ---------------------------------------------------------------- helpers
class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeSource:
    """A CredentialSource: returns `ca_pem` (base64, as clouds do) and numbered tokens valid `ttl_s`."""

    def __init__(self, clock: Clock, ca_pem: bytes, ttl_s: float = 600.0) -> None:
        self.clock = clock
        self.ca_pem = ca_pem
        self.ttl_s = ttl_s
        self.ca_calls = 0
        self.token_calls = 0
        self.fail_token: Exception | None = None

    def ca_data(self, ref: Any) -> str:
        self.ca_calls += 1
        return base64.b64encode(self.ca_pem).decode()

    def token(self, ref: Any) -> Token:
        if self.fail_token is not None:
            raise self.fail_token
        self.token_calls += 1
        return Token(f"secret-token-{self.token_calls}", self.clock() + self.ttl_s)


@pytest.fixture(scope="module")
def ca_pem() -> bytes:
    return self_signed("kube-api.local")[0]


@pytest.fixture(scope="module")
def other_pem() -> bytes:
    return self_signed("someone-else")[0]


def fp(pem: bytes) -> str:
    return "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def eks_ref(fingerprint: str | None, endpoint: str = "https://ABC.gr7.eu-west-1.eks.amazonaws.com",
            cid: str = "c1") -> ClusterRef:  # fmt: skip
    ref = ClusterRef(cluster_id=cid, endpoint=endpoint, credential_ref=f"eks://eu-west-1/{cid}", cloud="aws",
                     region="eu-west-1")  # fmt: skip
    return _with_fingerprint(ref, fingerprint)


def _with_fingerprint(ref: ClusterRef, fingerprint: str | None) -> ClusterRef:
    """ClusterRef does not carry the fingerprint (yet): the resolver reads `ca_fingerprint` when it is there."""
    if fingerprint is None:
        return ref
    if "ca_fingerprint" in {f.name for f in dataclasses.fields(ClusterRef)}:
        return dataclasses.replace(ref, ca_fingerprint=fingerprint)  # type: ignore[call-arg, unused-ignore]
    object.__setattr__(ref, "ca_fingerprint", fingerprint)
    return ref


def resolver(clock: Clock, source: FakeSource, **kwargs: Any) -> ClusterCredentials:
    return ClusterCredentials(Settings(), sources={"eks": source, "aks": source, "gke": source}, clock=clock,
                              **kwargs)  # fmt: skip


def pinned(client: Any) -> bytes | None:
    """The CA file the client trusts (None once the resolver removed it)."""
    path = Path(client.configuration.ssl_ca_cert)
    return path.read_bytes() if path.exists() else None


def bearer(client: Any) -> str:
    """What the client sends as Authorization (runs the refresh hook, like a request does)."""
    return str(client.configuration.get_api_key_with_prefix("BearerToken"))


# ---------------------------------------------------------------- references
@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("eks://eu-west-1/prod-web-0", EksRef("eu-west-1", "prod-web-0")),
        ("eks://us-gov-west-1/c1", EksRef("us-gov-west-1", "c1")),
        (f"aks://{SUB}/flotilla-c1/c1", AksRef(SUB, "flotilla-c1", "c1")),
        (f"aks://{SUB}/MC_rg.(x)_1/c-1", AksRef(SUB, "MC_rg.(x)_1", "c-1")),
        ("gke://my-project/europe-west4/c1", GkeRef("my-project", "europe-west4", "c1")),
        ("gke://example.com:proj/us-central1-a/c1", GkeRef("example.com:proj", "us-central1-a", "c1")),
        ("sim://ms-1", SimRef("ms-1")),
        ("kubeconfig:///etc/flotilla/edge.yaml", KubeconfigRef("/etc/flotilla/edge.yaml", None)),
        ("kubeconfig:///etc/flotilla/edge.yaml#admin@edge", KubeconfigRef("/etc/flotilla/edge.yaml", "admin@edge")),
    ],
)
def test_parse_every_scheme(text: str, parsed: object) -> None:
    assert parse_ref(text, "c1") == parsed


def test_gke_resource_name() -> None:
    assert GkeRef("p", "europe-west4", "c1").resource_name == "projects/p/locations/europe-west4/clusters/c1"


def test_kubeconfig_home_is_expanded() -> None:
    parsed = parse_ref("kubeconfig://~/k.yaml", "c1")
    assert isinstance(parsed, KubeconfigRef) and parsed.path == os.path.expanduser("~/k.yaml")


@pytest.mark.parametrize(
    ("text", "code", "says"),
    [
        (None, "NoCredentialRef", "no credential reference"),
        ("", "NoCredentialRef", "no credential reference"),
        ("eu-west-1/c1", "BadCredentialRef", "'<scheme>://...'"),
        ("ftp://host/x", "UnknownCredentialScheme", "unknown credential scheme 'ftp'"),
        ("EKS://eu-west-1/c1", "UnknownCredentialScheme", "known: eks, aks, gke, kubeconfig, sim"),
        ("eks://c1", "BadCredentialRef", "eks://<region>/<name>"),
        ("eks://eu-west-1/c1/extra", "BadCredentialRef", "eks://<region>/<name>"),
        ("eks://eu-west-1/", "BadCredentialRef", "bad segment ''"),
        ("eks://Europe/c1", "BadCredentialRef", "is not an AWS region"),
        ("eks://eu-west-1/c 1", "BadCredentialRef", "bad segment 'c 1'"),
        ("aks://not-a-guid/rg/c1", "BadCredentialRef", "is not an Azure subscription id"),
        (f"aks://{SUB}/rg", "BadCredentialRef", "aks://<subscription>/<resourceGroup>/<name>"),
        ("gke://p/europe-west4", "BadCredentialRef", "gke://<project>/<location>/<name>"),
        ("gke://p/../c1", "BadCredentialRef", "bad segment '..'"),
        ("gke://p/l/c1?x=1", "BadCredentialRef", "bad segment 'c1?x=1'"),
        ("sim://", "BadCredentialRef", "bad segment ''"),
        ("kubeconfig://relative/k.yaml", "BadCredentialRef", "must be absolute"),
        ("kubeconfig://", "BadCredentialRef", "must be absolute"),
        ("kubeconfig:///etc/k.yaml#", "BadCredentialRef", "empty context"),
    ],
)
def test_bad_refs_are_terminal_and_say_why(text: str | None, code: str, says: str) -> None:
    with pytest.raises(CredentialError) as err:
        parse_ref(text, "prod-7")
    assert err.value.code == code and not err.value.retryable
    assert "cluster prod-7" in str(err.value) and says in str(err.value)
    assert not isinstance(err.value, InstallError)


def test_error_classes() -> None:
    retry = CredentialUnavailable("c1", "throttled")
    assert retry.retryable and isinstance(retry, InstallError) and isinstance(retry, RetryableError)
    assert isinstance(retry, CredentialError) and str(retry) == "cluster c1: throttled"
    terminal = CredentialError("c1", "mismatch")
    assert not terminal.retryable and not isinstance(terminal, RetryableError)


# ---------------------------------------------------------------- the EKS token
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No machine credentials or endpoint overrides leak into the token tests."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_STS_REGIONAL_ENDPOINTS", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def eks_source(clock: Clock, token: str | None = None) -> cc.EksSource:
    session = boto3.Session(aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key=SECRET, aws_session_token=token,
                            region_name="us-east-1")  # fmt: skip
    return cc.EksSource(session, clock=clock)


def test_eks_token_is_a_presigned_get_caller_identity(aws_env: None) -> None:
    clock = Clock()
    token = eks_source(clock).token(EksRef("eu-west-1", "prod-web-0"))
    url = eks_token_url(token.value)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert parts.scheme == "https" and parts.hostname == "sts.eu-west-1.amazonaws.com" and parts.path == "/"
    assert query["Action"] == "GetCallerIdentity" and query["Version"] == "2011-06-15"
    assert query["X-Amz-Expires"] == "60" and query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-SignedHeaders"] == "host;x-k8s-aws-id"
    scope = query["X-Amz-Credential"]
    assert scope.startswith("AKIDEXAMPLE/") and scope.endswith("/eu-west-1/sts/aws4_request")
    assert "x-k8s-aws-id" not in query and "prod-web-0" not in url  # a header, not a query parameter
    # The signature covers the cluster name: valid for this cluster, not for another.
    assert signed_for(url, "prod-web-0", SECRET)
    assert not signed_for(url, "prod-web-1", SECRET)
    assert token.expires_at == clock() + 14 * 60
    assert token.value not in repr(token)


def test_eks_token_carries_the_session_token_and_the_region(aws_env: None) -> None:
    token = eks_source(Clock(), token="FQoGZXIvYXdzEXAMPLE").token(EksRef("ap-southeast-2", "c9"))
    query = dict(parse_qsl(urlsplit(eks_token_url(token.value)).query))
    assert query["X-Amz-Security-Token"] == "FQoGZXIvYXdzEXAMPLE"
    assert urlsplit(eks_token_url(token.value)).hostname == "sts.ap-southeast-2.amazonaws.com"


def test_eks_token_ignores_a_configured_endpoint(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL (e.g. moto in tests) must not move the token's STS host: EKS would reject it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    token = eks_source(Clock()).token(EksRef("eu-west-1", "c1"))
    assert urlsplit(eks_token_url(token.value)).hostname == "sts.eu-west-1.amazonaws.com"


def test_eks_token_without_credentials_is_terminal(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CredentialError) as err:
        cc.EksSource(boto3.Session(region_name="eu-west-1")).token(EksRef("eu-west-1", "c1"))
    assert not err.value.retryable and err.value.code == "NoCredentials"


# ---------------------------------------------------------------- CA fingerprints
def test_fingerprint_agrees_with_every_provisioner_driver(ca_pem: bytes) -> None:
    b64 = base64.b64encode(ca_pem).decode()
    ours = ca_fingerprint(decode_ca(b64))
    assert ours == fp(ca_pem) == aws_mapping.ca_fingerprint(b64) == gcp_mapping.ca_fingerprint(b64)
    kubeconfig = yaml.safe_dump({"clusters": [{"name": "c", "cluster": {"certificate-authority-data": b64}}]})
    assert ours == azure_provider.ca_fingerprint(kubeconfig.encode())


@pytest.mark.parametrize("data", ["moto-random-text-not-a-certificate-1234", "not base64 !", fake_ca("gke-seed")])
def test_fingerprint_of_odd_cas_agrees_with_the_drivers(data: str) -> None:
    """moto's random CA text and the GKE fake's random 'certificate' hash the same way on both sides."""
    assert ca_fingerprint(decode_ca(data)) == aws_mapping.ca_fingerprint(data)
    if data != "not base64 !":
        assert ca_fingerprint(decode_ca(data)) == gcp_mapping.ca_fingerprint(data)


def test_verify_fingerprint_match_and_mismatch(ca_pem: bytes, other_pem: bytes) -> None:
    verify_fingerprint("c1", fp(ca_pem), fp(ca_pem), where="x")
    verify_fingerprint("c1", fp(ca_pem).upper().replace("SHA256", "sha256"), fp(ca_pem), where="x")
    with pytest.raises(CredentialError) as err:
        verify_fingerprint("prod-7", fp(ca_pem), fp(other_pem), where="the EKS API")
    assert err.value.code == "CaMismatch" and not err.value.retryable
    assert "cluster prod-7" in str(err.value) and fp(ca_pem) in str(err.value) and fp(other_pem) in str(err.value)
    for bad in ("sha256:00", "md5:" + "0" * 64, "sha256:" + "z" * 64):
        with pytest.raises(CredentialError, match="is not 'sha256:<64 hex digits>'"):
            verify_fingerprint("c1", bad, fp(ca_pem), where="x")
    with pytest.raises(CredentialError, match="no CA fingerprint"):
        verify_fingerprint("c1", None, fp(ca_pem), where="x")


# ---------------------------------------------------------------- building, caching, refreshing
async def test_builds_a_pinned_authenticated_client(ca_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem)
    creds = resolver(clock, source)
    try:
        client = await creds.api_client(eks_ref(fp(ca_pem)))
        cfg = client.configuration
        assert cfg.host == "https://ABC.gr7.eu-west-1.eks.amazonaws.com" and cfg.verify_ssl
        assert pinned(client) == ca_pem
        assert bearer(client) == "Bearer secret-token-1"
        assert (source.ca_calls, source.token_calls) == (1, 1)
    finally:
        creds.close()
    assert pinned(client) is None  # close() removes the pinned CA files


async def test_fingerprint_can_be_passed_explicitly(ca_pem: bytes) -> None:
    clock = Clock()
    creds = resolver(clock, FakeSource(clock, ca_pem))
    client = await creds.api_client(eks_ref(None), ca_fingerprint=fp(ca_pem))
    assert bearer(client) == "Bearer secret-token-1"
    creds.close()


async def test_ca_mismatch_is_terminal_and_nothing_is_cached(ca_pem: bytes, other_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, other_pem)  # the cloud API answers with a CA the event did not announce
    creds = resolver(clock, source)
    with pytest.raises(CredentialError) as err:
        await creds.api_client(eks_ref(fp(ca_pem), cid="prod-7"))
    assert err.value.code == "CaMismatch" and not err.value.retryable and "cluster prod-7" in str(err.value)
    assert source.token_calls == 0 and creds.cached("prod-7") is None
    creds.close()


async def test_no_fingerprint_is_terminal_before_any_cloud_call(ca_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem)
    creds = resolver(clock, source)
    with pytest.raises(CredentialError, match="no CA fingerprint") as err:
        await creds.api_client(eks_ref(None))
    assert not err.value.retryable and source.ca_calls == 0
    creds.close()


@pytest.mark.parametrize("endpoint", ["http://ABC.eks.amazonaws.com", "", "ABC.eks.amazonaws.com", "https://"])
async def test_a_token_never_goes_to_a_non_https_endpoint(ca_pem: bytes, endpoint: str) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem)
    creds = resolver(clock, source)
    with pytest.raises(CredentialError, match="is not an https:// URL"):
        await creds.api_client(eks_ref(fp(ca_pem), endpoint=endpoint))
    assert source.token_calls == 0
    creds.close()


async def test_sim_clusters_have_no_api(ca_pem: bytes) -> None:
    creds = resolver(Clock(), FakeSource(Clock(), ca_pem))
    with pytest.raises(CredentialError, match="simulated cluster") as err:
        await creds.api_client(ClusterRef(cluster_id="s1", endpoint="https://sim", credential_ref="sim://s1"))
    assert not err.value.retryable and err.value.code == "SimCluster"


async def test_cached_until_the_token_is_about_to_expire(ca_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem, ttl_s=600)
    creds = resolver(clock, source, refresh_margin_s=120)
    ref = eks_ref(fp(ca_pem))
    first = await creds.api_client(ref)
    clock.advance(479)  # 121 s left: still good
    assert await creds.api_client(ref) is first
    assert bearer(first) == "Bearer secret-token-1" and source.token_calls == 1
    clock.advance(1)  # 120 s left: time for a new token, same client, same pinned CA (no second CA fetch)
    assert await creds.api_client(ref) is first
    assert bearer(first) == "Bearer secret-token-2"
    assert (source.ca_calls, source.token_calls) == (1, 2)
    creds.close()


async def test_a_client_kept_past_expiry_refreshes_itself_before_a_request(ca_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem, ttl_s=600)
    creds = resolver(clock, source, refresh_margin_s=60)
    client = await creds.api_client(eks_ref(fp(ca_pem)))
    assert bearer(client) == "Bearer secret-token-1"
    clock.advance(3600)  # the caller held on to the client for an hour
    assert bearer(client) == "Bearer secret-token-2"  # the refresh hook ran, as it does before every request
    assert bearer(client) == "Bearer secret-token-2" and source.token_calls == 2
    # ... and the cache knows the new expiry: no third token.
    assert await creds.api_client(eks_ref(fp(ca_pem))) is client and source.token_calls == 2
    creds.close()


async def test_a_failed_refresh_is_retryable_and_names_the_cluster(ca_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem, ttl_s=600)
    creds = resolver(clock, source)
    client = await creds.api_client(eks_ref(fp(ca_pem), cid="prod-7"))
    clock.advance(600)
    source.fail_token = ConnectionResetError("sts unreachable")
    with pytest.raises(CredentialUnavailable, match="cluster prod-7") as err:
        bearer(client)
    assert err.value.retryable
    with pytest.raises(CredentialUnavailable):
        await creds.api_client(eks_ref(fp(ca_pem), cid="prod-7"))
    source.fail_token = None
    assert await creds.api_client(eks_ref(fp(ca_pem), cid="prod-7")) is client
    assert bearer(client) == "Bearer secret-token-2"
    creds.close()


async def test_source_errors_are_renamed_to_our_cluster_id(ca_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem)
    source.fail_token = cc.credential_error("eks-name", "AccessDenied", retryable=False, code="AccessDenied")
    creds = resolver(clock, source)
    with pytest.raises(CredentialError) as err:
        await creds.api_client(eks_ref(fp(ca_pem), cid="prod-7"))
    assert err.value.cluster_id == "prod-7" and err.value.code == "AccessDenied" and not err.value.retryable
    creds.close()


async def test_a_changed_reference_builds_a_new_client(ca_pem: bytes, other_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem)
    creds = resolver(clock, source)
    first = await creds.api_client(eks_ref(fp(ca_pem)))
    moved = await creds.api_client(eks_ref(fp(ca_pem), endpoint="https://NEW.eks.amazonaws.com"))
    assert moved is not first and moved.configuration.host == "https://NEW.eks.amazonaws.com"
    source.ca_pem = other_pem  # a rotated CA announced by a new provisioning result
    rotated = await creds.api_client(eks_ref(fp(other_pem), endpoint="https://NEW.eks.amazonaws.com"))
    assert rotated is not moved and pinned(rotated) == other_pem
    creds.invalidate("c1")
    assert creds.cached("c1") is None
    assert await creds.api_client(eks_ref(fp(other_pem), endpoint="https://NEW.eks.amazonaws.com")) is not rotated
    creds.close()


async def test_concurrent_requests_for_one_cluster_build_once(ca_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem)
    creds = resolver(clock, source)
    clients = await asyncio.gather(*(creds.api_client(eks_ref(fp(ca_pem))) for _ in range(20)))
    assert len({id(c) for c in clients}) == 1 and (source.ca_calls, source.token_calls) == (1, 1)
    creds.close()


async def test_the_blocking_variant_shares_the_cache_across_threads(ca_pem: bytes) -> None:
    clock = Clock()
    source = FakeSource(clock, ca_pem)
    creds = resolver(clock, source)
    ref = eks_ref(fp(ca_pem))
    clients = await asyncio.gather(*(asyncio.to_thread(creds.api_client_blocking, ref) for _ in range(8)))
    assert len({id(c) for c in clients}) == 1 and (source.ca_calls, source.token_calls) == (1, 1)
    assert await creds.api_client(ref) is clients[0]
    creds.close()


async def test_least_recently_used_clients_are_dropped(ca_pem: bytes) -> None:
    clock = Clock()
    creds = resolver(clock, FakeSource(clock, ca_pem), max_clients=2)
    for cid in ("a", "b", "a", "c"):
        await creds.api_client(eks_ref(fp(ca_pem), cid=cid))
    assert creds.cached("b") is None and creds.cached("a") is not None and creds.cached("c") is not None
    creds.close()


async def test_tokens_are_never_logged(ca_pem: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    source = FakeSource(clock, ca_pem, ttl_s=600)
    creds = resolver(clock, source)
    client = await creds.api_client(eks_ref(fp(ca_pem)))
    clock.advance(600)
    bearer(client)
    await creds.api_client(eks_ref(fp(ca_pem)))
    assert source.token_calls == 2 and "resolved credentials for cluster c1" in caplog.text
    assert "secret-token" not in caplog.text
    creds.close()


# ---------------------------------------------------------------- kubeconfig://
def write_kubeconfig(path: Path, ca_pem: bytes, other_pem: bytes, token: str = "static-token-a") -> None:
    ca_a, ca_b = base64.b64encode(ca_pem).decode(), base64.b64encode(other_pem).decode()
    path.write_text(
        textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:
        - name: edge-a
          cluster: {{server: "https://127.0.0.1:6443", certificate-authority-data: "{ca_a}"}}
        - name: edge-b
          cluster: {{server: "https://10.9.0.1:443", certificate-authority-data: "{ca_b}"}}
        users:
        - name: ua
          user: {{token: "{token}"}}
        - name: ub
          user: {{token: "static-token-b"}}
        contexts:
        - name: ctx-a
          context: {{cluster: edge-a, user: ua}}
        - name: ctx-b
          context: {{cluster: edge-b, user: ub}}
        current-context: ctx-a
        """)
    )


def kube_ref(path: Path, context: str | None = None, fingerprint: str | None = None) -> ClusterRef:
    text = f"kubeconfig://{path}" + (f"#{context}" if context else "")
    return _with_fingerprint(ClusterRef(cluster_id="edge-1", endpoint="", credential_ref=text), fingerprint)


async def test_kubeconfig_scheme(tmp_path: Path, ca_pem: bytes, other_pem: bytes) -> None:
    path = tmp_path / "edge.yaml"
    write_kubeconfig(path, ca_pem, other_pem)
    creds = ClusterCredentials(Settings())
    try:
        client = await creds.api_client(kube_ref(path))  # current context, no fingerprint to check
        assert client.configuration.host == "https://127.0.0.1:6443"
        assert bearer(client) == "Bearer static-token-a"
        assert pinned(client) == ca_pem
        assert await creds.api_client(kube_ref(path)) is client  # cached

        other = await creds.api_client(kube_ref(path, "ctx-b", fp(other_pem)))  # context chosen, CA verified
        assert other.configuration.host == "https://10.9.0.1:443" and bearer(other) == "Bearer static-token-b"

        write_kubeconfig(path, ca_pem, other_pem, token="static-token-rotated")  # the operator edits the file
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
        again = await creds.api_client(kube_ref(path))
        assert again is not client and bearer(again) == "Bearer static-token-rotated"
    finally:
        creds.close()


async def test_kubeconfig_errors_are_terminal(tmp_path: Path, ca_pem: bytes, other_pem: bytes) -> None:
    path = tmp_path / "edge.yaml"
    write_kubeconfig(path, ca_pem, other_pem)
    creds = ClusterCredentials(Settings())
    cases = [
        (kube_ref(path, "ctx-a", fp(other_pem)), "CaMismatch"),
        (kube_ref(path, "nope"), "BadKubeconfig"),
        (kube_ref(tmp_path / "missing.yaml"), "KubeconfigMissing"),
    ]
    (tmp_path / "garbage.yaml").write_text("clusters: [")
    cases.append((kube_ref(tmp_path / "garbage.yaml"), "BadKubeconfig"))
    for ref, code in cases:
        with pytest.raises(CredentialError) as err:
            await creds.api_client(ref)
        assert err.value.code == code and not err.value.retryable and "cluster edge-1" in str(err.value)
    creds.close()


async def test_kubeconfig_outside_the_allowed_directory(tmp_path: Path, ca_pem: bytes, other_pem: bytes) -> None:
    path = tmp_path / "edge.yaml"
    write_kubeconfig(path, ca_pem, other_pem)
    allowed = tmp_path / "allowed"
    allowed.mkdir()

    class Restricted(Settings):
        kubeconfig_dir: str | None = None

    creds = ClusterCredentials(Restricted(kubeconfig_dir=str(allowed)))
    with pytest.raises(CredentialError, match="outside the allowed directory"):
        await creds.api_client(kube_ref(path))
    (allowed / "edge.yaml").write_bytes(path.read_bytes())
    assert await creds.api_client(kube_ref(allowed / "edge.yaml"))
    creds.close()


# ---------------------------------------------------------------- the sources' pieces
def test_aks_ca_comes_from_the_kubeconfig_only() -> None:
    doc = {"clusters": [{"name": "c", "cluster": {"server": "https://x", "certificate-authority-data": "Q0E="}}],
           "users": [{"name": "u", "user": {"token": "never-read"}}]}  # fmt: skip
    assert cc._kubeconfig_ca(yaml.safe_dump(doc).encode()) == "Q0E="
    assert cc._kubeconfig_ca(b"clusters: []") is None and cc._kubeconfig_ca(b"- [") is None
    assert cc._kubeconfig_ca(b"just text") is None


def test_gke_token_refreshes_only_when_it_runs_out() -> None:
    clock = Clock()
    google = FakeGoogleCredentials(clock, ttl_s=3600)
    source = cc.GkeSource(google, clock=clock)
    ref = GkeRef("p", "europe-west4", "c1")
    first = source.token(ref)
    assert first.value == "ya29.fake-1" and first.expires_at == pytest.approx(clock() + 3600, abs=1)
    clock.advance(3000)  # 600 s left: the shared credentials are still good for other clusters
    assert source.token(ref).value == "ya29.fake-1" and google.refreshes == 1
    clock.advance(400)  # 200 s left: below GKE_MIN_TTL_S
    assert source.token(ref).value == "ya29.fake-2" and google.refreshes == 2


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "DescribeCluster")  # fmt: skip


def _azure_http(status: int) -> Exception:
    from azure.core.exceptions import HttpResponseError

    exc = HttpResponseError(message="m")
    exc.status_code = status
    return exc


def _aws_cases() -> list[tuple[Exception, bool, str]]:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    return [
        (_client_error("ThrottlingException", 400), True, "ThrottlingException"),
        (_client_error("ServiceUnavailableException", 503), True, "ServiceUnavailableException"),
        (_client_error("ResourceNotFoundException", 404), False, "ClusterNotFound"),
        (_client_error("AccessDeniedException", 403), False, "AccessDeniedException"),
        (NoCredentialsError(), False, "NoCredentials"),
        (EndpointConnectionError(endpoint_url="https://eks"), True, "AwsUnavailable"),
    ]


@pytest.mark.parametrize(("exc", "retryable", "code"), _aws_cases())
def test_aws_errors(exc: Exception, retryable: bool, code: str) -> None:
    err = cc._aws_error(EksRef("eu-west-1", "c1"), exc)
    assert (err.retryable, err.code) == (retryable, code) and "EKS cluster c1 in eu-west-1" in str(err)


def _azure_cases() -> list[tuple[Exception, bool, str]]:
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
    from azure.identity import CredentialUnavailableError

    return [
        (_azure_http(429), True, "Http429"),
        (_azure_http(500), True, "Http500"),
        (_azure_http(404), False, "ClusterNotFound"),
        (_azure_http(403), False, "Http403"),
        (CredentialUnavailableError("no credential"), False, "NoCredentials"),
        (ClientAuthenticationError("AADSTS700016: app not found"), True, "AuthFailed"),
        (ServiceRequestError("connection refused"), True, "AzureUnavailable"),
    ]


@pytest.mark.parametrize(("exc", "retryable", "code"), _azure_cases())
def test_azure_errors(exc: Exception, retryable: bool, code: str) -> None:
    err = cc._azure_error(AksRef(SUB, "rg", "c1"), exc)
    assert (err.retryable, err.code) == (retryable, code) and "AKS cluster c1 in rg" in str(err)


def _gcp_cases() -> list[tuple[Exception, bool, str]]:
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    return [
        (api.NotFound("gone"), False, "ClusterNotFound"),
        (api.PermissionDenied("no"), False, "PermissionDenied"),
        (api.TooManyRequests("slow down"), True, "TooManyRequests"),
        (api.ServiceUnavailable("later"), True, "ServiceUnavailable"),
        (auth.DefaultCredentialsError("none found"), False, "NoCredentials"),
        (auth.RefreshError("invalid_grant"), False, "RefreshFailed"),
        (auth.RefreshError("503", retryable=True), True, "RefreshFailed"),
        (auth.TransportError("reset"), True, "GcpUnavailable"),
    ]


@pytest.mark.parametrize(("exc", "retryable", "code"), _gcp_cases())
def test_gcp_errors(exc: Exception, retryable: bool, code: str) -> None:
    err = cc._gcp_error(GkeRef("p", "europe-west4", "c1"), exc)
    assert (err.retryable, err.code) == (retryable, code)
    assert "GKE cluster projects/p/locations/europe-west4/clusters/c1" in str(err)
