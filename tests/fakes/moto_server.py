"""moto in server mode for the AWS driver's tests: a real HTTP endpoint that boto3 talks to.

- `moto_server()` starts `moto.server.ThreadedMotoServer` on a free loopback port with
  MOTO_IAM_LOAD_MANAGED_POLICIES=true (so AWS-managed policy ARNs such as AmazonEKSClusterPolicy
  exist), and gives dummy credentials, clients for reading the state back, `env()` for a
  subprocess (FLOTILLA_AWS_ENDPOINT_URL + the dummy credentials), and `reset()`.
- `Proxy` is a transparent pass-through in front of it (stdlib http.server, threads) that adds an
  optional delay per request (so that a SIGKILL can land in the middle of a provisioning run)
  and records every call (service, operation, HTTP status), also for calls made by another
  process. It changes nothing in requests or answers.
- `inventory()` counts what carries the `flotilla.dev/cluster-id` tag, per cluster and kind.
- `Fault` is a botocore `before-call` handler that raises ClientError('Throttling') for the
  first N calls of chosen operations: the error goes through the driver's real classification.

moto's limits that matter here (checked against moto 5.2.5; the driver copes with each):
every resource is ACTIVE/available at once (no CREATING/DELETING phases, so wait loops run one
probe); EC2 ignores ClientToken on CreateNatGateway/CreateRouteTable and EKS ignores
clientRequestToken (a second create by name is ResourceInUseException, which the driver adopts);
Kinesis ignores CreateStream's Tags (the driver tags afterwards); EKS TagResource/
ListTagsForResource do not cover node groups (their tags come from DescribeNodegroup); the
cluster CA is random text, not a base64 PEM certificate; IAM has no propagation delay and EKS
creates no ENIs or cluster security group in the VPC.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
from botocore.exceptions import ClientError

TAG_CLUSTER = "flotilla.dev/cluster-id"
DUMMY_KEY = "testing"
MUTATING = re.compile(
    r"^(Create|Allocate|Attach|Associate|Authorize|Update|Modify|Replace|Add|Delete|Release|"
    r"Detach|Disassociate|Remove|Tag|Untag)"
)


def session(region: str = "us-east-1") -> boto3.Session:
    """Dummy credentials, never the machine's own."""
    return boto3.Session(aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_KEY, region_name=region)


@dataclass
class MotoServer:
    url: str

    def session(self, region: str = "us-east-1") -> boto3.Session:
        return session(region)

    def client(self, service: str, region: str = "us-east-1") -> Any:
        return session(region).client(service, endpoint_url=self.url)

    def reset(self) -> None:
        """Forget every resource (moto's reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """What a `python -m services.cloud_provisioner` process needs to use it with the real aws driver."""
        return {
            "FLOTILLA_CLOUD_DRIVERS": json.dumps({"aws": "real", "azure": "sim", "gcp": "sim"}),
            "FLOTILLA_AWS_ENDPOINT_URL": endpoint_url or self.url,
            "AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@contextlib.contextmanager
def moto_server() -> Iterator[MotoServer]:
    from moto.server import ThreadedMotoServer  # heavy import: only where used

    previous = os.environ.get("MOTO_IAM_LOAD_MANAGED_POLICIES")
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"  # read when the IAM backend is created
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoServer(f"http://{host}:{port}")
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("MOTO_IAM_LOAD_MANAGED_POLICIES", None)
        else:
            os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = previous


# ---------------------------------------------------------------- a recording, delaying pass-through
_EKS_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/clusters$"), "CreateCluster"),
    ("GET", re.compile(r"^/clusters$"), "ListClusters"),
    ("GET", re.compile(r"^/clusters/[^/]+$"), "DescribeCluster"),
    ("DELETE", re.compile(r"^/clusters/[^/]+$"), "DeleteCluster"),
    ("POST", re.compile(r"^/clusters/[^/]+/update-config$"), "UpdateClusterConfig"),
    ("POST", re.compile(r"^/clusters/[^/]+/node-groups$"), "CreateNodegroup"),
    ("GET", re.compile(r"^/clusters/[^/]+/node-groups$"), "ListNodegroups"),
    ("GET", re.compile(r"^/clusters/[^/]+/node-groups/[^/]+$"), "DescribeNodegroup"),
    ("DELETE", re.compile(r"^/clusters/[^/]+/node-groups/[^/]+$"), "DeleteNodegroup"),
    ("POST", re.compile(r"^/clusters/[^/]+/node-groups/[^/]+/update-config$"), "UpdateNodegroupConfig"),
    ("POST", re.compile(r"^/tags/.+$"), "TagResource"),
    ("DELETE", re.compile(r"^/tags/.+$"), "UntagResource"),
    ("GET", re.compile(r"^/tags/.+$"), "ListTagsForResource"),
]
_SERVICE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/")


@dataclass(frozen=True)
class Call:
    service: str
    operation: str
    status: int
    at: float


def operation_of(service: str, method: str, path: str, headers: Any, body: bytes) -> str:
    target = headers.get("X-Amz-Target")
    if target:  # JSON protocol (Kinesis)
        return str(target).rsplit(".", 1)[-1]
    if service == "eks":
        route = urllib.parse.urlsplit(path).path
        for verb, pattern, op in _EKS_ROUTES:
            if verb == method and pattern.match(route):
                return op
        return f"{method} {route}"
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))  # query protocol (EC2, IAM)
    return form.get("Action", [f"{method} {path}"])[0]


@dataclass
class Proxy:
    upstream: str
    delay_s: float = 0.0
    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Proxy:
        proxy = self
        up = urllib.parse.urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers and body, written apart, wait for a delayed ACK

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                service = (_SERVICE.search(self.headers.get("Authorization", "")) or [None, "?"])[1]
                op = operation_of(str(service), self.command, self.path, self.headers, body)
                with proxy._lock:
                    proxy.calls.append(Call(str(service), op, resp.status, time.monotonic()))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _forward  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def count(self, pattern: str = r"^(Create|Allocate)", ok_only: bool = True) -> Counter[str]:
        """Successful calls per operation whose name matches `pattern` (default: what creates resources)."""
        regex = re.compile(pattern)
        with self._lock:
            return Counter(
                c.operation for c in self.calls if regex.match(c.operation) and (not ok_only or 200 <= c.status < 300)
            )

    def mutations(self) -> Counter[str]:
        return self.count(MUTATING.pattern)


@contextlib.contextmanager
def proxy(upstream: str, delay_s: float = 0.0) -> Iterator[Proxy]:
    p = Proxy(upstream, delay_s).start()
    try:
        yield p
    finally:
        p.stop()


# ---------------------------------------------------------------- reading our resources back
def _tags(tags: Any) -> dict[str, str]:
    if isinstance(tags, dict):
        return {str(k): str(v) for k, v in tags.items()}
    return {t["Key"]: t.get("Value", "") for t in tags or []}


def inventory(moto: MotoServer, region: str = "us-east-1") -> dict[str, Counter[str]]:
    """What carries our cluster-id tag, per cluster id and kind (NAT gateways: not yet deleted)."""
    out: dict[str, Counter[str]] = {}

    def add(kind: str, tags: Any) -> None:
        cid = _tags(tags).get(TAG_CLUSTER)
        if cid:
            out.setdefault(cid, Counter())[kind] += 1

    ec2 = moto.client("ec2", region)
    ours = [{"Name": "tag-key", "Values": [TAG_CLUSTER]}]
    for kind, op, key in (
        ("vpc", "describe_vpcs", "Vpcs"),
        ("subnet", "describe_subnets", "Subnets"),
        ("internet_gateway", "describe_internet_gateways", "InternetGateways"),
        ("route_table", "describe_route_tables", "RouteTables"),
        ("security_group", "describe_security_groups", "SecurityGroups"),
        ("elastic_ip", "describe_addresses", "Addresses"),
    ):
        for item in getattr(ec2, op)(Filters=ours)[key]:
            add(kind, item.get("Tags"))
    for nat in ec2.describe_nat_gateways(Filters=ours)["NatGateways"]:
        if nat.get("State") not in ("deleted", "failed"):
            add("nat_gateway", nat.get("Tags"))
    iam = moto.client("iam", region)
    for role in iam.list_roles()["Roles"]:
        add("iam_role", iam.list_role_tags(RoleName=role["RoleName"])["Tags"])
    eks = moto.client("eks", region)
    for name in eks.list_clusters()["clusters"]:
        add("eks_cluster", eks.describe_cluster(name=name)["cluster"].get("tags"))
        for ng in eks.list_nodegroups(clusterName=name)["nodegroups"]:
            add("nodegroup", eks.describe_nodegroup(clusterName=name, nodegroupName=ng)["nodegroup"].get("tags"))
    kinesis = moto.client("kinesis", region)
    for name in kinesis.list_streams()["StreamNames"]:
        add("log_stream", kinesis.list_tags_for_stream(StreamName=name)["Tags"])
    return out


# ---------------------------------------------------------------- fault injection through botocore's events
@dataclass
class Fault:
    """`before-call` handler: the first `times[op]` calls of each operation fail with `code` (default: Throttling).

    Raised before the request is sent, so botocore's own retries do not absorb it: the driver classifies it
    and the consumer runtime redelivers, which is the path under test."""

    times: dict[str, int]
    code: str = "Throttling"
    message: str = "Rate exceeded"
    status: int = 400
    raised: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, model: Any, **_: Any) -> None:
        op = model.name
        with self._lock:
            if self.raised[op] >= self.times.get(op, 0):
                return
            self.raised[op] += 1
        raise ClientError(
            {
                "Error": {"Code": self.code, "Message": self.message},
                "ResponseMetadata": {"HTTPStatusCode": self.status},
            },
            op,
        )

    def install(self, sess: boto3.Session) -> Fault:
        """On a session, before the driver creates its clients (they copy the session's handlers)."""
        sess.events.register("before-call.*.*", self)
        return self

    def exhausted(self) -> bool:
        return all(self.raised[op] >= n for op, n in self.times.items())
