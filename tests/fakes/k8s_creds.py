"""Small fakes for the credentials tests: a throwaway CA, a TLS "API server" that records bearer tokens,
and stand-ins for Azure's and Google's credential objects.

- `KubeApiStub`'s certificate (tests/fakes/tls.py) is self-signed, usable as both the cluster CA and the
  server certificate (SAN 127.0.0.1 / localhost, basicConstraints CA): a client that pins it can talk to
  `KubeApiStub`, one that pins anything else cannot.
- `KubeApiStub` serves HTTPS on loopback: GET /version answers like an API server, every request's
  Authorization header is recorded.
- `eks_token_url` / `signed_for` take an EKS bearer token apart and recompute its SigV4 signature.
- `FakeAzureCredential` (azure-core TokenCredential) and `FakeGoogleCredentials` (google-auth Credentials)
  hand out numbered tokens with an expiry from an injectable clock, and count what they were asked.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from azure.core.credentials import AccessToken
from google.auth.credentials import Credentials

from tests.fakes.http import Request, json_server, serve, stop_server
from tests.fakes.tls import write_self_signed

# What a v1.31 API server answers on GET /version (the client insists on every field).
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.4",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.23.4",
    "compiler": "gc",
    "platform": "linux/amd64",
}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    authorization: str | None


class KubeApiStub:
    """An HTTPS endpoint that answers GET /version like a Kubernetes API server and records Authorization."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="kube-stub-")
        cert_file, key_file, self.ca_pem = write_self_signed(Path(self._tmp.name), "kube-api.local", "tls")
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = json_server(self._handle, tls=(cert_file, key_file), methods=("GET",))
        self._thread: threading.Thread | None = None

    def _handle(self, req: Request) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.seen.append(Seen("GET", req.path, req.headers.get("Authorization")))
        if req.path.split("?")[0].rstrip("/") == "/version":
            return 200, VERSION
        return 404, {"kind": "Status", "status": "Failure", "code": 404}

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KubeApiStub:
        self._thread = serve(self._server, "kube-stub", poll_interval=0.02)
        return self

    def stop(self) -> None:
        stop_server(self._server, serving=self._thread is not None)
        self._thread = None
        self._tmp.cleanup()

    def tokens(self) -> list[str | None]:
        with self._lock:
            return [s.authorization for s in self.seen]


class FakeAzureCredential:
    """A TokenCredential: token n is 'aad-token-<n>', valid `ttl_s` from `clock()`. Records the scopes asked."""

    def __init__(self, clock: Callable[[], float] = time.time, ttl_s: float = 3600.0) -> None:
        self.clock = clock
        self.ttl_s = ttl_s
        self.scopes: list[tuple[str, ...]] = []
        self._lock = threading.Lock()

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        with self._lock:
            self.scopes.append(scopes)
            return AccessToken(f"aad-token-{len(self.scopes)}", int(self.clock() + self.ttl_s))

    def asked_for(self, scope: str) -> int:
        with self._lock:
            return sum(1 for s in self.scopes if scope in s)


class FakeGoogleCredentials(Credentials):  # type: ignore[misc]
    """google-auth Credentials: each refresh makes 'ya29.fake-<n>', valid `ttl_s` from `clock()`."""

    def __init__(self, clock: Callable[[], float] = time.time, ttl_s: float = 3600.0) -> None:
        super().__init__()
        self.clock = clock
        self.ttl_s = ttl_s
        self.refreshes = 0

    def refresh(self, request: Any) -> None:
        self.refreshes += 1
        self.token = f"ya29.fake-{self.refreshes}"
        # google-auth keeps expiries as naive UTC datetimes.
        self.expiry = datetime.datetime.fromtimestamp(self.clock() + self.ttl_s, datetime.UTC).replace(tzinfo=None)


def eks_token_url(token: str) -> str:
    """The presigned URL inside an EKS token ('k8s-aws-v1.' + unpadded base64url), with or without 'Bearer '."""
    raw = token.removeprefix("Bearer ")
    assert raw.startswith("k8s-aws-v1.") and "=" not in raw, "not an EKS token"
    raw = raw.removeprefix("k8s-aws-v1.")
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()


def signed_for(url: str, cluster: str, secret: str) -> bool:
    """Whether the presigned GetCallerIdentity URL's SigV4 signature covers the header `x-k8s-aws-id: <cluster>`
    (recomputed independently of botocore: canonical request, string to sign, derived key)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    signature = query.pop("X-Amz-Signature")
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
    headers = f"host:{parts.hostname}\nx-k8s-aws-id:{cluster}\n"
    empty_body = hashlib.sha256(b"").hexdigest()
    canonical = "\n".join(["GET", "/", canonical_query, headers, "host;x-k8s-aws-id", empty_body])
    scope = query["X-Amz-Credential"].split("/", 1)[1]
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = "\n".join(["AWS4-HMAC-SHA256", query["X-Amz-Date"], scope, digest])
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(signature, hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest())
