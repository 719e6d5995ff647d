"""Small fakes for the credentials tests: a throwaway CA, a TLS "API server" that records bearer tokens,
and stand-ins for Azure's and Google's credential objects.

- `self_signed()` makes a self-signed certificate usable as both the cluster CA and the server certificate
  (SAN 127.0.0.1 / localhost, basicConstraints CA): a client that pins it can talk to `KubeApiStub`, one
  that pins anything else cannot.
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
import ipaddress
import json
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from azure.core.credentials import AccessToken
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.auth.credentials import Credentials


def self_signed(common_name: str = "kube-api.local") -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


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
        self.ca_pem, key_pem = self_signed()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="kube-stub-")
        cert_file, key_file = Path(self._tmp.name) / "tls.crt", Path(self._tmp.name) / "tls.key"
        cert_file.write_bytes(self.ca_pem)
        key_file.write_bytes(key_pem)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                with stub._lock:
                    stub.seen.append(Seen("GET", self.path, self.headers.get("Authorization")))
                body: dict[str, Any]
                if self.path.split("?")[0].rstrip("/") == "/version":
                    status, body = 200, VERSION
                else:
                    status, body = 404, {"kind": "Status", "status": "Failure", "code": 404}
                out = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KubeApiStub:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="kube-stub", daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()
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
