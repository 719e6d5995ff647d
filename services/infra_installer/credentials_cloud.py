"""The three clouds' ways to a cluster's CA certificate and a bearer token (see credentials.py).

- EKS: CA from DescribeCluster `certificateAuthority.data`; token = "k8s-aws-v1." + base64url(a presigned
  STS GetCallerIdentity URL whose signature covers the header `x-k8s-aws-id: <cluster name>`), built as
  `aws eks get-token` and aws-iam-authenticator build it. The URL itself is valid 60 s for STS, but EKS
  accepts the token for 15 minutes after signing; like `aws eks get-token` we count 14.
- AKS: CA from listClusterUserCredential's kubeconfig (`certificate-authority-data`; the rest of that
  kubeconfig is dropped unread); token from Azure AD for the AKS AAD server application's scope.
- GKE: CA from clusters.get `masterAuth.clusterCaCertificate`; token = the google-auth application default
  credentials (scope cloud-platform), refreshed when they are about to expire.

Sources are synchronous (SDK calls); the resolver runs them in worker threads. Each classifies its SDK's
errors into a retryable or terminal CredentialError. Clients are created lazily, under a lock.
"""

from __future__ import annotations

import base64
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import yaml

from services.infra_installer.credentials import (
    AksRef,
    CredentialError,
    CredentialSource,
    EksRef,
    GkeRef,
    Token,
    credential_error,
)
from shared.config import Settings

Clock = Callable[[], float]

# ---------------------------------------------------------------- EKS
EKS_TOKEN_PREFIX = "k8s-aws-v1."
EKS_ID_HEADER = "x-k8s-aws-id"
EKS_URL_EXPIRES_S = 60
EKS_TOKEN_TTL_S = 14 * 60
_AWS_THROTTLING = {"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded",
                   "RequestThrottled", "SlowDown"}  # fmt: skip


def eks_token_from_url(url: str) -> str:
    """The bearer token for a presigned GetCallerIdentity URL (unpadded base64url, as EKS expects)."""
    return EKS_TOKEN_PREFIX + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


class EksSource:
    """`session`: a boto3 Session (default: the standard credential chain). `endpoint_url` redirects the EKS
    API only (tests, private endpoints): the token is always signed for the region's real STS host, the only
    place the cluster's authenticator will check it."""

    def __init__(self, session: Any = None, *, endpoint_url: str | None = None, clock: Clock = time.time) -> None:
        self._session = session
        self.endpoint_url = endpoint_url
        self.clock = clock
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()  # a boto3 Session is not thread-safe; its clients are

    def _client(self, service: str, region: str) -> Any:
        import boto3
        from botocore.config import Config

        with self._lock:
            if (service, region) in self._clients:
                return self._clients[(service, region)]
            if self._session is None:
                self._session = boto3.Session()
            if service == "sts":
                config = Config(signature_version="v4", ignore_configured_endpoint_urls=True)
                client = self._session.client("sts", region_name=region, config=config)
                # The cluster name goes into a signed header, not into the query (what `aws eks get-token` does).
                client.meta.events.register("provide-client-params.sts.GetCallerIdentity", _take_cluster_id)
                client.meta.events.register("before-sign.sts.GetCallerIdentity", _sign_cluster_id)
            else:
                config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=30,
                                user_agent_extra="flotilla")  # fmt: skip
                client = self._session.client(service, region_name=region, endpoint_url=self.endpoint_url,
                                              config=config)  # fmt: skip
            self._clients[(service, region)] = client
            return client

    def ca_data(self, ref: EksRef) -> str:
        try:
            cluster = self._client("eks", ref.region).describe_cluster(name=ref.name)["cluster"]
        except Exception as exc:
            raise _aws_error(ref, exc) from None
        data = (cluster.get("certificateAuthority") or {}).get("data")
        if not data:
            raise credential_error(ref.name, f"EKS cluster {ref.name} in {ref.region} has no CA yet "
                                   f"(status {cluster.get('status')})", retryable=True, code="NoClusterCA")  # fmt: skip
        return str(data)

    def token(self, ref: EksRef) -> Token:
        now = self.clock()
        try:
            url = self._client("sts", ref.region).generate_presigned_url(
                "get_caller_identity", Params={EKS_ID_HEADER: ref.name}, ExpiresIn=EKS_URL_EXPIRES_S, HttpMethod="GET"
            )
        except Exception as exc:
            raise _aws_error(ref, exc) from None
        return Token(eks_token_from_url(url), now + EKS_TOKEN_TTL_S)


def _take_cluster_id(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    if EKS_ID_HEADER in params:
        context[EKS_ID_HEADER] = params.pop(EKS_ID_HEADER)


def _sign_cluster_id(request: Any, **_: Any) -> None:
    if EKS_ID_HEADER in request.context:
        request.headers[EKS_ID_HEADER] = request.context[EKS_ID_HEADER]


def _aws_error(ref: EksRef, exc: Exception) -> CredentialError:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    what = f"EKS cluster {ref.name} in {ref.region}"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"{what}: {code}: {err.get('Message') or ''}"
        if code == "ResourceNotFoundException" or status == 404:
            return credential_error(ref.name, detail, retryable=False, code="ClusterNotFound")
        retryable = code in _AWS_THROTTLING or status == 429 or status >= 500
        return credential_error(ref.name, detail, retryable=retryable, code=code)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | NoRegionError):
        return credential_error(ref.name, f"{what}: no usable AWS credentials: {exc}", retryable=False,
                                code="NoCredentials")  # fmt: skip
    if isinstance(exc, BotoCoreError):  # connection trouble, timeouts
        return credential_error(ref.name, f"{what}: {exc}", retryable=True, code="AwsUnavailable")
    return credential_error(ref.name, f"{what}: {type(exc).__name__}: {exc}", retryable=True, code="Unexpected")


# ---------------------------------------------------------------- AKS
# The Azure AD application of every AAD-integrated AKS API server (the "server id" kubelogin uses).
AKS_SCOPE = "6dae42f8-4368-4678-94ff-3960e28e3630/.default"


class AksSource:
    """`credential`: an azure-core TokenCredential (default: DefaultAzureCredential). `base_url` and
    `client_kwargs` go to the ContainerServiceClient (sovereign clouds, tests)."""

    def __init__(self, credential: Any = None, *, base_url: str | None = None,
                 client_kwargs: dict[str, Any] | None = None, clock: Clock = time.time) -> None:  # fmt: skip
        self._credential = credential
        self.base_url = base_url
        self.client_kwargs = dict(client_kwargs or {})
        self.clock = clock
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def credential(self) -> Any:
        with self._lock:
            if self._credential is None:
                from azure.identity import DefaultAzureCredential

                self._credential = DefaultAzureCredential()
            return self._credential

    def _client(self, subscription: str) -> Any:
        from azure.mgmt.containerservice import ContainerServiceClient

        credential = self.credential
        with self._lock:
            if subscription not in self._clients:
                kwargs = dict(self.client_kwargs)
                if self.base_url:
                    kwargs["base_url"] = self.base_url
                self._clients[subscription] = ContainerServiceClient(credential, subscription, **kwargs)
            return self._clients[subscription]

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def ca_data(self, ref: AksRef) -> str:
        try:
            result = self._client(ref.subscription).managed_clusters.list_cluster_user_credentials(
                ref.resource_group, ref.name, format="exec"
            )
        except Exception as exc:
            raise _azure_error(ref, exc) from None
        for kubeconfig in getattr(result, "kubeconfigs", None) or []:
            data = _kubeconfig_ca(bytes(kubeconfig.value or b""))
            if data:
                return data
        raise credential_error(ref.name, f"AKS cluster {ref.name} in {ref.resource_group}: the user kubeconfig has "
                               "no certificate-authority-data yet", retryable=True, code="NoClusterCA")  # fmt: skip

    def token(self, ref: AksRef) -> Token:
        try:
            access = self.credential.get_token(AKS_SCOPE)
        except Exception as exc:
            raise _azure_error(ref, exc) from None
        return Token(str(access.token), float(access.expires_on))


def _kubeconfig_ca(kubeconfig: bytes) -> str | None:
    """The first cluster's certificate-authority-data (base64 PEM); credentials in the file are not looked at."""
    try:
        doc = yaml.safe_load(kubeconfig) or {}
    except yaml.YAMLError:
        return None
    clusters = doc.get("clusters") if isinstance(doc, dict) else None
    for entry in clusters or []:
        data = ((entry or {}).get("cluster") or {}).get("certificate-authority-data")
        if data:
            return str(data)
    return None


def _azure_error(ref: AksRef, exc: Exception) -> CredentialError:
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.identity import CredentialUnavailableError

    what = f"AKS cluster {ref.name} in {ref.resource_group}"
    if isinstance(exc, CredentialUnavailableError):
        return credential_error(ref.name, f"{what}: no Azure credential available: {_first_line(exc)}",
                                retryable=False, code="NoCredentials")  # fmt: skip
    if isinstance(exc, ClientAuthenticationError):
        status = exc.status_code or 0
        return credential_error(ref.name, f"{what}: Azure AD refused: {_first_line(exc)}",
                                retryable=status == 0 or status >= 500 or status == 429, code="AuthFailed")  # fmt: skip
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        code = str(getattr(exc.error, "code", "") or f"Http{status}")
        detail = f"{what}: {code}: {_first_line(exc)}"
        if status == 404:
            return credential_error(ref.name, detail, retryable=False, code="ClusterNotFound")
        return credential_error(ref.name, detail, retryable=status in (408, 409, 429) or status >= 500, code=code)
    if isinstance(exc, ServiceRequestError | ServiceResponseError | AzureError):
        return credential_error(ref.name, f"{what}: {_first_line(exc)}", retryable=True, code="AzureUnavailable")
    return credential_error(ref.name, f"{what}: {type(exc).__name__}: {exc}", retryable=True, code="Unexpected")


# ---------------------------------------------------------------- GKE
GCP_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
# Refresh the Google token when less than this is left (more than the resolver's margin, so a refreshed
# client never gets a token it would consider expiring already).
GKE_MIN_TTL_S = 300.0
# Credentials that report no expiry are asked again after this long.
GKE_NO_EXPIRY_TTL_S = 3600.0


class GkeSource:
    """`credentials`: google-auth credentials (default: google.auth.default with cloud-platform scope).

    With an `http://` `api_endpoint` (a local fake or emulator) the GKE API is called anonymously, as the
    provisioner's driver does: a real token never travels in clear text."""

    def __init__(self, credentials: Any = None, *, api_endpoint: str | None = None, clock: Clock = time.time,
                 call_timeout_s: float = 30.0) -> None:  # fmt: skip
        self._credentials = credentials
        self.api_endpoint = api_endpoint
        self.clock = clock
        self.call_timeout_s = call_timeout_s
        self._container: Any = None
        self._lock = threading.Lock()
        self._token_lock = threading.Lock()  # one refresh at a time: the credentials object is shared

    @property
    def credentials(self) -> Any:
        with self._lock:
            if self._credentials is None:
                import google.auth

                self._credentials, _ = google.auth.default(scopes=GCP_SCOPES)
            return self._credentials

    def _client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import container_v1

        anonymous = bool(self.api_endpoint and self.api_endpoint.startswith("http://"))
        credentials = AnonymousCredentials() if anonymous else self.credentials
        with self._lock:
            if self._container is None:
                kwargs: dict[str, Any] = {"credentials": credentials, "transport": "rest"}
                if self.api_endpoint:
                    kwargs["client_options"] = {"api_endpoint": self.api_endpoint}
                self._container = container_v1.ClusterManagerClient(**kwargs)
            return self._container

    def ca_data(self, ref: GkeRef) -> str:
        try:
            cluster = self._client().get_cluster(name=ref.resource_name, retry=None, timeout=self.call_timeout_s)
        except Exception as exc:
            raise _gcp_error(ref, exc) from None
        data = cluster.master_auth.cluster_ca_certificate if cluster.master_auth else ""
        if not data:
            raise credential_error(ref.name, f"GKE cluster {ref.resource_name} has no CA yet (status "
                                   f"{cluster.status.name})", retryable=True, code="NoClusterCA")  # fmt: skip
        return str(data)

    def token(self, ref: GkeRef) -> Token:
        try:
            credentials = self.credentials
            with self._token_lock:
                if self._stale(credentials):
                    from google.auth.transport.requests import Request

                    credentials.refresh(Request())
                return Token(str(credentials.token), self._expires_at(credentials))
        except CredentialError:
            raise
        except Exception as exc:
            raise _gcp_error(ref, exc) from None

    def _expires_at(self, credentials: Any) -> float:
        expiry = getattr(credentials, "expiry", None)
        if expiry is None:
            return self.clock() + GKE_NO_EXPIRY_TTL_S
        if expiry.tzinfo is None:  # google-auth keeps naive UTC datetimes
            expiry = expiry.replace(tzinfo=datetime.UTC)
        return float(expiry.timestamp())

    def _stale(self, credentials: Any) -> bool:
        if not getattr(credentials, "token", None):
            return True
        if getattr(credentials, "expiry", None) is None:
            return False
        return self._expires_at(credentials) - self.clock() <= GKE_MIN_TTL_S


def _gcp_error(ref: GkeRef, exc: Exception) -> CredentialError:
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    what = f"GKE cluster {ref.resource_name}"
    if isinstance(exc, auth.DefaultCredentialsError):
        return credential_error(ref.name, f"{what}: no Google credentials: {_first_line(exc)}", retryable=False,
                                code="NoCredentials")  # fmt: skip
    if isinstance(exc, auth.RefreshError):
        return credential_error(ref.name, f"{what}: token refresh failed: {_first_line(exc)}",
                                retryable=bool(exc.retryable), code="RefreshFailed")  # fmt: skip
    if isinstance(exc, auth.TransportError | api.RetryError):
        return credential_error(ref.name, f"{what}: {_first_line(exc)}", retryable=True, code="GcpUnavailable")
    if isinstance(exc, api.GoogleAPICallError):
        status = int(exc.code or 0)
        detail = f"{what}: {type(exc).__name__}: {exc.message}"
        if status == 404:
            return credential_error(ref.name, detail, retryable=False, code="ClusterNotFound")
        return credential_error(ref.name, detail, retryable=status in (408, 429) or status >= 500 or status == 0,
                                code=type(exc).__name__)  # fmt: skip
    return credential_error(ref.name, f"{what}: {type(exc).__name__}: {_first_line(exc)}", retryable=True,
                            code="Unexpected")  # fmt: skip


# ---------------------------------------------------------------- wiring
def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def default_source(scheme: str, settings: Settings, clock: Clock = time.time) -> CredentialSource:
    """The source for a scheme with each SDK's standard credential chain, pointed where the settings say."""
    match scheme:
        case "eks":
            return EksSource(endpoint_url=settings.aws_endpoint_url, clock=clock)
        case "aks":
            return AksSource(base_url=settings.azure_base_url, clock=clock)
        case "gke":
            return GkeSource(api_endpoint=settings.gcp_api_endpoint, clock=clock)
    raise ValueError(f"no credential source for scheme {scheme!r}")
