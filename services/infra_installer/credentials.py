"""From a cluster's provisioning result to an authenticated `kubernetes` client, at run time.

Events carry only the API `endpoint`, the CA's fingerprint (`sha256:<hex>` of the DER certificate) and a
`credential_ref` naming where a token comes from, never a secret:

    eks://<region>/<name>                        token: presigned STS GetCallerIdentity (what `aws eks get-token` makes)
    aks://<subscription>/<resourceGroup>/<name>  token: Azure AD, scope of the AKS AAD server application
    gke://<project>/<location>/<name>            token: google-auth application default credentials
    kubeconfig://<absolute path>[#<context>]     a static kubeconfig file, for clusters brought in by hand
    sim://<cluster_id>                           a simulated cluster: it has no API server

For the three clouds the CA certificate is fetched from the cloud's API (not from the event), checked against
the event's fingerprint, and pinned: the client trusts that certificate and nothing else. A mismatch is a
terminal error naming the cluster (someone else answers for it, or the event is wrong); retrying cannot help.

Tokens expire (EKS after 15 minutes, Azure AD and Google after about an hour), so clients are cached per
cluster with their token's expiry: `api_client` hands out the cached client and swaps in a fresh token
`refresh_margin_s` before expiry, and the client's `refresh_api_key_hook` does the same for a caller that
holds on to a client across the expiry. The CA is fetched once per client (a new endpoint, credential
reference or fingerprint in the event builds a new one). Tokens are never logged, never in reprs or errors.

`ClusterCredentials.api_client` is the async entry point (a cached, fresh client comes back at once; any
SDK call runs in `asyncio.to_thread`); `api_client_blocking` is the same for code already in a worker thread.

Errors are `CredentialError` with `retryable`: the retryable ones (throttling, cloud API unreachable, cluster
CA not there yet) are also the installer's `InstallError`, so the consumer runtime redelivers with backoff;
the terminal ones (bad or unknown reference, CA mismatch, no cloud credentials, cluster not found, permission
denied) are not.
The cloud-specific parts live in credentials_cloud.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from kubernetes.client import ApiClient, Configuration

from services.infra_installer.targets.base import ClusterRef, InstallError
from shared.config import Settings

log = logging.getLogger("flotilla.infra_installer.credentials")

PEM_MARKER = b"-----BEGIN CERTIFICATE-----"
# Swap in a new token this long before the current one expires (clock skew, slow requests).
DEFAULT_REFRESH_MARGIN_S = 120.0
# How many clusters' clients are kept; the least recently used beyond this are closed.
DEFAULT_MAX_CLIENTS = 4096
_FINGERPRINT = re.compile(r"^sha256:[0-9a-fA-F]{64}$")
# One segment of a reference: cloud names (regions, resource groups, projects, clusters) never need more.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:()-]{0,254}$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


# ---------------------------------------------------------------- errors
class CredentialError(Exception):
    """No client for this cluster. `retryable` says whether another delivery can help.

    Terminal ones (retryable=False) are plain CredentialErrors; retryable ones are `CredentialUnavailable`,
    which is also an `InstallError`. Messages name the cluster and never contain a token.
    """

    retryable: bool = False

    def __init__(self, cluster_id: str, message: str, *, code: str = "CredentialError") -> None:
        super().__init__(f"cluster {cluster_id}: {message}")
        self.cluster_id = cluster_id
        self.reason = message
        self.code = code


class CredentialUnavailable(CredentialError, InstallError):
    """Credentials could not be had right now (throttling, API unreachable, CA not yet published): retry."""

    retryable = True


def credential_error(cluster_id: str, message: str, *, retryable: bool, code: str = "CredentialError"
                     ) -> CredentialError:  # fmt: skip
    cls = CredentialUnavailable if retryable else CredentialError
    return cls(cluster_id, message, code=code)


# ---------------------------------------------------------------- references
@dataclass(frozen=True)
class EksRef:
    region: str
    name: str
    scheme = "eks"


@dataclass(frozen=True)
class AksRef:
    subscription: str
    resource_group: str
    name: str
    scheme = "aks"


@dataclass(frozen=True)
class GkeRef:
    project: str
    location: str
    name: str
    scheme = "gke"

    @property
    def resource_name(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/clusters/{self.name}"


@dataclass(frozen=True)
class SimRef:
    cluster_id: str
    scheme = "sim"


@dataclass(frozen=True)
class KubeconfigRef:
    path: str
    context: str | None = None
    scheme = "kubeconfig"


CloudRef = EksRef | AksRef | GkeRef
ParsedRef = CloudRef | SimRef | KubeconfigRef
SCHEMES = ("eks", "aks", "gke", "kubeconfig", "sim")


def parse_ref(credential_ref: str | None, cluster_id: str = "?") -> ParsedRef:
    """Parse a credential reference; anything malformed is a terminal CredentialError saying what is wrong."""
    if not credential_ref:
        raise CredentialError(cluster_id, "no credential reference: the provisioning result names none",
                              code="NoCredentialRef")  # fmt: skip
    scheme, sep, rest = credential_ref.partition("://")
    if not sep:
        raise CredentialError(cluster_id, f"credential reference {credential_ref!r} is not '<scheme>://...'",
                              code="BadCredentialRef")  # fmt: skip
    if scheme == "kubeconfig":
        return _kubeconfig_ref(rest, credential_ref, cluster_id)
    if scheme not in SCHEMES:
        raise CredentialError(cluster_id, f"unknown credential scheme {scheme!r} in {credential_ref!r} "
                              f"(known: {', '.join(SCHEMES)})", code="UnknownCredentialScheme")  # fmt: skip
    parts = rest.split("/")
    expected = {"eks": 2, "aks": 3, "gke": 3, "sim": 1}[scheme]
    shape = {"eks": "eks://<region>/<name>", "aks": "aks://<subscription>/<resourceGroup>/<name>",
             "gke": "gke://<project>/<location>/<name>", "sim": "sim://<cluster_id>"}[scheme]  # fmt: skip
    if len(parts) != expected:
        raise CredentialError(cluster_id, f"credential reference {credential_ref!r} is not {shape}",
                              code="BadCredentialRef")  # fmt: skip
    for part in parts:
        if not _SEGMENT.match(part) or ".." in part:
            raise CredentialError(cluster_id, f"credential reference {credential_ref!r}: bad segment {part!r} "
                                  f"(expected {shape})", code="BadCredentialRef")  # fmt: skip
    match scheme:
        case "eks":
            if not _AWS_REGION.match(parts[0]):
                raise CredentialError(cluster_id, f"credential reference {credential_ref!r}: {parts[0]!r} is not "
                                      "an AWS region", code="BadCredentialRef")  # fmt: skip
            return EksRef(region=parts[0], name=parts[1])
        case "aks":
            if not _GUID.match(parts[0]):
                raise CredentialError(cluster_id, f"credential reference {credential_ref!r}: {parts[0]!r} is not "
                                      "an Azure subscription id", code="BadCredentialRef")  # fmt: skip
            return AksRef(subscription=parts[0], resource_group=parts[1], name=parts[2])
        case "gke":
            return GkeRef(project=parts[0], location=parts[1], name=parts[2])
    return SimRef(cluster_id=parts[0])


def _kubeconfig_ref(rest: str, credential_ref: str, cluster_id: str) -> KubeconfigRef:
    path, hashmark, context = rest.partition("#")
    path = os.path.expanduser(path)
    if not path or not os.path.isabs(path):
        raise CredentialError(cluster_id, f"credential reference {credential_ref!r}: the kubeconfig path must be "
                              "absolute (kubeconfig:///path/to/file[#context])", code="BadCredentialRef")  # fmt: skip
    if hashmark and not context:
        raise CredentialError(cluster_id, f"credential reference {credential_ref!r}: empty context after '#'",
                              code="BadCredentialRef")  # fmt: skip
    return KubeconfigRef(path=os.path.normpath(path), context=context or None)


# ---------------------------------------------------------------- the CA
def decode_ca(data: str | bytes) -> bytes:
    """The CA as the clouds return it (base64 of a PEM) decoded; text that is not base64 is taken as is."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return raw


def ca_fingerprint(raw: bytes) -> str:
    """'sha256:<hex>' of the certificate's DER bytes, the rule the provisioners' drivers apply.

    Not a single PEM certificate (moto's random text, a bundle): the bytes themselves are hashed,
    exactly as the drivers do, so the event's fingerprint and ours agree."""
    if PEM_MARKER in raw:
        try:
            der = ssl.PEM_cert_to_DER_cert(raw.decode("ascii", "replace").strip())
            return "sha256:" + hashlib.sha256(der).hexdigest()
        except ValueError:
            pass
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def verify_fingerprint(cluster_id: str, expected: str | None, actual: str, *, where: str) -> None:
    """Terminal CredentialError unless the CA we got is the one the provisioning result announced."""
    if expected is None:
        raise CredentialError(cluster_id, f"no CA fingerprint to verify the CA from {where} against",
                              code="NoCaFingerprint")  # fmt: skip
    if not _FINGERPRINT.match(expected):
        raise CredentialError(cluster_id, f"CA fingerprint {expected!r} is not 'sha256:<64 hex digits>'",
                              code="BadCaFingerprint")  # fmt: skip
    if not hmac.compare_digest(expected.lower(), actual.lower()):
        raise CredentialError(cluster_id, f"the CA certificate from {where} has fingerprint {actual}, the "
                              f"provisioning result announced {expected.lower()}: refusing to trust it",
                              code="CaMismatch")  # fmt: skip


# ---------------------------------------------------------------- tokens and their sources
@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)  # the bearer token: never printed
    expires_at: float  # epoch seconds


class CredentialSource(Protocol):
    """One cloud's way to a cluster's CA and a token. Both calls block (SDK calls) and run in worker threads;
    both raise CredentialError (credentials_cloud classifies the SDK's errors)."""

    def ca_data(self, ref: Any) -> str | bytes:
        """The cluster CA as the cloud API returns it (base64 of a PEM)."""

    def token(self, ref: Any) -> Token:
        """A bearer token for the cluster's API server."""


# ---------------------------------------------------------------- the cache
@dataclass(eq=False)
class _Entry:
    key: tuple[Any, ...]
    client: ApiClient
    expires_at: float
    refresh: Callable[[], Token] | None  # None: the kubeconfig loader looks after its own tokens
    lock: threading.Lock = field(default_factory=threading.Lock)


class ClusterCredentials:
    """Authenticated clients per cluster, cached with their token's expiry. One per process (or per target).

    `sources` replaces the cloud sources (scheme -> CredentialSource), e.g. with injected SDK credentials;
    `clock` (epoch seconds) is what token expiries are compared with. Thread-safe: `api_client` (async) and
    `api_client_blocking` (from a worker thread) share the cache; one build per cluster at a time.
    """

    def __init__(self, settings: Settings, *, sources: Mapping[str, CredentialSource] | None = None,
                 clock: Callable[[], float] = time.time, refresh_margin_s: float | None = None,
                 max_clients: int = DEFAULT_MAX_CLIENTS) -> None:  # fmt: skip
        self.settings = settings
        self.clock = clock
        if refresh_margin_s is None:  # a settings field if the deployment has one (see the report), else the default
            refresh_margin_s = getattr(settings, "credential_refresh_margin_s", None)
        self.refresh_margin_s = float(DEFAULT_REFRESH_MARGIN_S if refresh_margin_s is None else refresh_margin_s)
        self.max_clients = max_clients
        self._given_sources = dict(sources or {})
        self._sources: dict[str, CredentialSource] = {}
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._build_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()  # guards the dicts above (short critical sections only)
        self._ca_dir: str | None = None

    # ------------------------------------------------------------------ public
    async def api_client(self, ref: ClusterRef, *, ca_fingerprint: str | None = None) -> ApiClient:
        """An authenticated client for `ref`, CA pinned; cached, with a token that is good for a while yet.

        `ca_fingerprint` defaults to `ref.ca_fingerprint` when ClusterRef carries one. A cached client whose
        token is fresh comes back without leaving the event loop; anything else runs in a worker thread."""
        parsed, expected, key = self._prepare(ref, ca_fingerprint)
        entry = self._lookup(ref.cluster_id, key)
        if entry is not None and not self._expiring(entry):
            return entry.client
        return await asyncio.to_thread(self._get, ref, parsed, expected, key)

    def api_client_blocking(self, ref: ClusterRef, *, ca_fingerprint: str | None = None) -> ApiClient:
        """`api_client` for code that already runs in a worker thread (it blocks: never call it on the event loop)."""
        parsed, expected, key = self._prepare(ref, ca_fingerprint)
        return self._get(ref, parsed, expected, key)

    def invalidate(self, cluster_id: str) -> None:
        """Forget a cluster's client (e.g. after a TLS failure that may be a rotated CA, or a retirement)."""
        with self._lock:
            entry = self._entries.pop(cluster_id, None)
        if entry is not None:
            _close(entry.client)

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
            ca_dir, self._ca_dir = self._ca_dir, None
        for entry in entries:
            _close(entry.client)
        if ca_dir is not None:
            shutil.rmtree(ca_dir, ignore_errors=True)

    def cached(self, cluster_id: str) -> ApiClient | None:
        with self._lock:
            entry = self._entries.get(cluster_id)
        return entry.client if entry is not None else None

    # ------------------------------------------------------------------ cache
    def _prepare(self, ref: ClusterRef, ca_fingerprint: str | None) -> tuple[ParsedRef, str | None, tuple[Any, ...]]:
        parsed = parse_ref(ref.credential_ref, ref.cluster_id)
        if isinstance(parsed, SimRef):
            raise CredentialError(ref.cluster_id, f"{ref.credential_ref} is a simulated cluster: it has no "
                                  "Kubernetes API (use the sim target for it)", code="SimCluster")  # fmt: skip
        expected = ca_fingerprint if ca_fingerprint is not None else getattr(ref, "ca_fingerprint", None)
        if isinstance(parsed, KubeconfigRef):
            try:
                st = os.stat(parsed.path)
                stamp: tuple[int, int] = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = (0, 0)  # the build reports it
            return parsed, expected, (parsed, expected, stamp)  # the file, not the event, says where the API is
        return parsed, expected, (parsed, ref.endpoint, expected)

    def _lookup(self, cluster_id: str, key: tuple[Any, ...]) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(cluster_id)
            if entry is None or entry.key != key:
                return None
            self._entries.move_to_end(cluster_id)
            return entry

    def _get(self, ref: ClusterRef, parsed: ParsedRef, expected: str | None, key: tuple[Any, ...]) -> ApiClient:
        """The cached client (its token refreshed if due) or a new one (worker thread: SDK calls block)."""
        cluster_id = ref.cluster_id
        with self._lock:
            build_lock = self._build_locks.setdefault(cluster_id, threading.Lock())
        with build_lock:  # concurrent installs on one cluster share one build
            entry = self._lookup(cluster_id, key)
            if entry is not None:
                self._refresh(entry)
                return entry.client
            if isinstance(parsed, KubeconfigRef):
                entry = self._build_kubeconfig(cluster_id, parsed, expected, key)
            else:
                assert not isinstance(parsed, SimRef)  # refused by _prepare
                entry = self._build_cloud(ref, parsed, expected, key)
            self._remember(cluster_id, entry)
            return entry.client

    def _expiring(self, entry: _Entry) -> bool:
        return entry.refresh is not None and self.clock() >= entry.expires_at - self.refresh_margin_s

    def _refresh(self, entry: _Entry) -> None:
        """Swap a new token into the client if due (worker thread, or the client's request thread via its hook)."""
        if not self._expiring(entry):
            return
        with entry.lock:
            if not self._expiring(entry) or entry.refresh is None:
                return  # fresh, or another thread just did it
            token = entry.refresh()
            entry.client.configuration.api_key["BearerToken"] = token.value
            entry.expires_at = token.expires_at
        log.debug("refreshed the token for a cached client (expires in %.0fs)", token.expires_at - self.clock())

    def _remember(self, cluster_id: str, entry: _Entry) -> None:
        closing: list[ApiClient] = []
        with self._lock:
            old = self._entries.pop(cluster_id, None)
            if old is not None:
                closing.append(old.client)
            self._entries[cluster_id] = entry
            while len(self._entries) > self.max_clients:
                evicted_id, evicted = self._entries.popitem(last=False)
                self._build_locks.pop(evicted_id, None)
                closing.append(evicted.client)
        for client in closing:
            _close(client)

    # ------------------------------------------------------------------ building (worker thread)
    def _source(self, scheme: str) -> CredentialSource:
        if scheme in self._given_sources:
            return self._given_sources[scheme]
        with self._lock:
            if scheme not in self._sources:
                from services.infra_installer import credentials_cloud  # the cloud SDKs: only when used

                self._sources[scheme] = credentials_cloud.default_source(scheme, self.settings, self.clock)
            return self._sources[scheme]

    def _build_cloud(self, ref: ClusterRef, parsed: CloudRef, expected: str | None, key: tuple[Any, ...]) -> _Entry:
        cluster_id = ref.cluster_id
        endpoint = _https_endpoint(cluster_id, ref.endpoint)
        if expected is None:  # before any cloud call: without it no CA can be trusted
            raise CredentialError(cluster_id, "the provisioning result carries no CA fingerprint to verify the "
                                  "cluster's CA against", code="NoCaFingerprint")  # fmt: skip
        source = self._source(parsed.scheme)
        ca = decode_ca(_guarded(cluster_id, source.ca_data, parsed))
        verify_fingerprint(cluster_id, expected, ca_fingerprint(ca), where=f"the {parsed.scheme.upper()} API")
        token: Token = _guarded(cluster_id, source.token, parsed)

        def refresh() -> Token:
            fresh: Token = _guarded(cluster_id, source.token, parsed)
            return fresh

        cfg = Configuration()
        cfg.host = endpoint
        cfg.verify_ssl = True
        cfg.ssl_ca_cert = self._ca_file(ca)
        cfg.api_key = {"BearerToken": token.value}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
        entry = _Entry(key=key, client=ApiClient(configuration=cfg), expires_at=token.expires_at, refresh=refresh)
        # Also covers a caller that keeps the client past the token's expiry: the hook runs before each request.
        cfg.refresh_api_key_hook = lambda _cfg: self._refresh(entry)
        log.info("resolved credentials for cluster %s (%s, CA pinned, token expires in %.0fs)", cluster_id,
                 parsed.scheme, token.expires_at - self.clock(), extra={"cluster_id": cluster_id})  # fmt: skip
        return entry

    def _build_kubeconfig(self, cluster_id: str, parsed: KubeconfigRef, expected: str | None,
                          key: tuple[Any, ...]) -> _Entry:  # fmt: skip
        """A client from a static kubeconfig (worker thread). Its own loader refreshes exec/OIDC tokens."""
        import yaml
        from kubernetes.config import ConfigException, new_client_from_config

        allowed = getattr(self.settings, "kubeconfig_dir", None)
        if allowed and not _inside(parsed.path, allowed):
            raise CredentialError(cluster_id, f"kubeconfig {parsed.path} is outside the allowed directory {allowed}",
                                  code="KubeconfigNotAllowed")  # fmt: skip
        if not os.path.isfile(parsed.path):
            raise CredentialError(cluster_id, f"kubeconfig {parsed.path} does not exist", code="KubeconfigMissing")
        try:
            # persist_config=False: never write refreshed tokens back into the operator's file.
            client = new_client_from_config(config_file=parsed.path, context=parsed.context, persist_config=False)
        except (ConfigException, yaml.YAMLError, ValueError, KeyError, TypeError, OSError) as exc:
            where = f"context {parsed.context!r} of " if parsed.context else ""
            raise CredentialError(cluster_id, f"cannot use {where}kubeconfig {parsed.path}: {exc}",
                                  code="BadKubeconfig") from None  # fmt: skip
        cfg = client.configuration
        if expected is not None:
            ca_path = cfg.ssl_ca_cert
            if not ca_path or not cfg.verify_ssl:
                _close(client)
                raise CredentialError(cluster_id, f"kubeconfig {parsed.path} pins no CA certificate, the "
                                      f"provisioning result announced {expected}", code="CaMismatch")  # fmt: skip
            with open(ca_path, "rb") as f:
                actual = ca_fingerprint(f.read())
            try:
                verify_fingerprint(cluster_id, expected, actual, where=f"kubeconfig {parsed.path}")
            except CredentialError:
                _close(client)
                raise
        log.info("resolved credentials for cluster %s from kubeconfig %s", cluster_id, parsed.path,
                 extra={"cluster_id": cluster_id})  # fmt: skip
        return _Entry(key=key, client=client, expires_at=float("inf"), refresh=None)

    def _ca_file(self, ca: bytes) -> str:
        """The pinned CA as a file (the client wants a path), named by its content; public data, not a secret."""
        with self._lock:
            if self._ca_dir is None:
                self._ca_dir = tempfile.mkdtemp(prefix="flotilla-ca-")
            path = os.path.join(self._ca_dir, hashlib.sha256(ca).hexdigest() + ".pem")
            if not os.path.exists(path):
                fd, tmp = tempfile.mkstemp(dir=self._ca_dir)
                with os.fdopen(fd, "wb") as f:
                    f.write(ca)
                os.replace(tmp, path)
            return path


def _inside(path: str, directory: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, root]) == root


def _https_endpoint(cluster_id: str, endpoint: str) -> str:
    """The API address; a bearer token never travels in clear text."""
    parts = urlsplit(endpoint or "")
    if parts.scheme != "https" or not parts.hostname:
        raise CredentialError(cluster_id, f"API endpoint {endpoint!r} is not an https:// URL", code="BadEndpoint")
    return endpoint.rstrip("/")


def _guarded(cluster_id: str, fn: Callable[[Any], Any], arg: Any) -> Any:
    """Call a source; its errors come out naming our cluster id (sources know only the cloud's name)."""
    try:
        return fn(arg)
    except CredentialError as exc:
        if exc.cluster_id == cluster_id:
            raise
        raise credential_error(cluster_id, exc.reason, retryable=exc.retryable, code=exc.code) from exc
    except Exception as exc:  # not classified by the source: assume it may pass (logged by the runtime)
        raise CredentialUnavailable(cluster_id, f"credential lookup failed: {type(exc).__name__}: {str(exc)[:300]}",
                                    code="Unexpected") from exc  # fmt: skip


def _close(client: ApiClient) -> None:
    """Release the client's pools; a caller still holding it can go on using it (pools are made on demand)."""
    try:
        client.close()
        client.rest_client.pool_manager.clear()
    except Exception:  # closing is best effort
        log.debug("closing a kubernetes client failed", exc_info=True)


# ---------------------------------------------------------------- module-level entry point
_default: ClusterCredentials | None = None
_default_lock = threading.Lock()


def resolver_for(settings: Settings) -> ClusterCredentials:
    """The process-wide resolver for these settings (a new one if the settings object changed)."""
    global _default
    with _default_lock:
        if _default is None or _default.settings is not settings:
            if _default is not None:
                _default.close()
            _default = ClusterCredentials(settings)
        return _default


async def api_client_for(ref: ClusterRef, settings: Settings, *, ca_fingerprint: str | None = None) -> ApiClient:
    """An authenticated `kubernetes` ApiClient for the cluster, CA pinned and verified; see the module docstring."""
    return await resolver_for(settings).api_client(ref, ca_fingerprint=ca_fingerprint)
