"""A small fake of the Google Cloud REST APIs the gcp driver calls, for tests at the HTTP boundary.

The real client libraries (transport="rest", AnonymousCredentials, client_options api_endpoint =
`FakeGcp.url`) talk to it over loopback HTTP. It serves, under one address, the paths the libraries
build (checked against their rest_base.py http options):
  GKE v1      /v1/projects/P/locations/L/clusters[/C[:setResourceLabels][/nodePools[/N[:setAutoscaling|:setSize]]]],
              PUT .../nodePools/N (UpdateNodePool), .../operations/O
  Compute v1  /compute/v1/projects/P/global/{networks,firewalls,operations}[/X],
              /compute/v1/projects/P/regions/R/{subnetworks,operations}[/X]   (?requestId= deduplicates)
  Pub/Sub v1  /v1/projects/P/topics/T (PUT creates)
  IAM v1      /v1/projects/P/serviceAccounts[/EMAIL]
  CRM v1      /v1/projects/P:getIamPolicy, :setIamPolicy (etag-checked)
It stores resources, runs long-running operations that are PENDING, then RUNNING, then DONE after
`op_polls` reads (of the operation or of its target resource), answers errors in Google's JSON error
shape, enforces what the real APIs enforce and a driver could get wrong (409 on a second create, one
GKE operation per cluster at a time, no deleting a network that a subnetwork or firewall still uses, no
deleting a cluster that is still provisioning, stale etags and label fingerprints), records every request
and injects faults.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.fakes.http import start_json_server, stop_server

Json = dict[str, Any]

GRPC_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
               429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}  # fmt: skip


@dataclass
class Recorded:
    method: str
    path: str  # unquoted, without the query
    query: dict[str, str]
    body: Any  # as sent (a copy: the fake's stored resources never alias it)
    status: int = 0  # what the fake answered


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    message: str
    grpc_status: str
    reason: str
    times: int


@dataclass
class OperationFault:
    """The next operation started by a matching request finishes DONE with this error."""

    method: str
    pattern: re.Pattern[str]
    grpc_code: int  # GKE: google.rpc.Code
    message: str
    compute_code: str  # Compute: error.errors[].code
    http_status: int
    times: int


@dataclass
class Operation:
    name: str
    body: Json
    target: str  # the store key of the resource it changes
    polls_left: int
    on_done: Callable[[], object]
    on_error: Callable[[], object] = lambda: None
    error: Json | None = None
    compute: bool = False
    gets: int = 0


class ApiError(Exception):
    def __init__(self, status: int, message: str, grpc_status: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.grpc_status = grpc_status or GRPC_STATUS.get(status, "UNKNOWN")
        self.reason = reason

    def body(self) -> Json:
        error: Json = {"code": self.status, "message": self.message, "status": self.grpc_status}
        if self.reason:
            error["errors"] = [{"message": self.message, "domain": "global", "reason": self.reason}]
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": self.reason,
                                 "domain": "googleapis.com"}]  # fmt: skip
        return {"error": error}


def _fingerprint(labels: Json) -> str:
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


def fake_ca(seed: str) -> str:
    """A PEM 'certificate' (random bytes between the markers), base64-encoded as GKE returns it."""
    der = hashlib.sha256(seed.encode()).digest() * 8
    pem = "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(der).decode() + "\n-----END CERTIFICATE-----\n"
    return base64.b64encode(pem.encode()).decode()


class FakeGcp:
    def __init__(self, project: str = "flotilla-test", op_polls: int = 2,
                 op_polls_by_type: dict[str, int] | None = None) -> None:  # fmt: skip
        self.project = project
        self.op_polls = op_polls
        self.op_polls_by_type = dict(op_polls_by_type or {})  # e.g. {"CREATE_CLUSTER": 3}: overrides op_polls
        self.created: Counter[str] = Counter()  # resources actually made, by kind (retries that dedupe do not count)
        self.lock = threading.RLock()
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.op_faults: list[OperationFault] = []
        self.clusters: dict[str, Json] = {}  # projects/P/locations/L/clusters/C → cluster (with nodePools)
        self.networks: dict[str, Json] = {}  # name →
        self.subnetworks: dict[str, Json] = {}  # region/name →
        self.firewalls: dict[str, Json] = {}
        self.service_accounts: dict[str, Json] = {}  # email →
        self.topics: dict[str, Json] = {}  # projects/P/topics/T →
        self.policy: Json = {"version": 1, "etag": "BwY0", "bindings": [
            {"role": "roles/owner", "members": ["user:admin@example.com"]}]}  # fmt: skip
        self.operations: dict[str, Operation] = {}
        self.request_ids: dict[str, str] = {}  # Compute requestId → operation name
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ server
    def start(self) -> FakeGcp:
        self._server = start_json_server(lambda req: self.handle(req.method, req.path, req.body), "fake-gcp")
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_server(self._server)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ test controls
    def fail(self, method: str, pattern: str, status: int, message: str, *, grpc_status: str = "", reason: str = "",
             times: int = 1) -> None:  # fmt: skip
        """Answer the next `times` requests matching (method, path regex) with this error."""
        with self.lock:
            self.faults.append(Fault(method, re.compile(pattern), status, message,
                                     grpc_status or GRPC_STATUS.get(status, "UNKNOWN"), reason, times))  # fmt: skip

    def fail_operation(self, method: str, pattern: str, message: str, *, grpc_code: int = 8, compute_code: str = "",
                       http_status: int = 403, times: int = 1) -> None:  # fmt: skip
        with self.lock:
            self.op_faults.append(OperationFault(method, re.compile(pattern), grpc_code, message, compute_code,
                                                 http_status, times))  # fmt: skip

    def calls(self, method: str | None = None, pattern: str = "") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and re.search(pattern, r.path)]  # fmt: skip

    def mutations(self) -> list[tuple[str, str]]:
        """Every request that changes something (not GETs, not policy reads), in order."""
        return [(r.method, r.path) for r in self.calls() if r.method != "GET" and not r.path.endswith(":getIamPolicy")]

    def inventory(self, marker_or_label: str) -> list[str]:
        """Everything that carries a cluster id: as the label value (GKE, Pub/Sub) or the description marker."""
        def marked(res: Json) -> bool:
            return marker_or_label in (res.get("description") or "").split() \
                or marker_or_label in (res.get("resourceLabels") or res.get("labels") or {}).values()  # fmt: skip

        with self.lock:
            out = [f"cluster {k}" for k, c in self.clusters.items() if marked(c)]
            out += [f"nodePool {k}/nodePools/{p['name']}" for k, c in self.clusters.items()
                    for p in c.get("nodePools", [])
                    if marker_or_label in (p.get("config", {}).get("resourceLabels") or {}).values()]  # fmt: skip
            out += [f"network {k}" for k, v in self.networks.items() if marked(v)]
            out += [f"subnetwork {k}" for k, v in self.subnetworks.items() if marked(v)]
            out += [f"firewall {k}" for k, v in self.firewalls.items() if marked(v)]
            out += [f"serviceAccount {k}" for k, v in self.service_accounts.items() if marked(v)]
            out += [f"topic {k}" for k, v in self.topics.items() if marked(v)]
            return out

    def members(self) -> set[str]:
        with self.lock:
            return {m for b in self.policy["bindings"] for m in b.get("members", [])}

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, raw_path: str, raw_body: bytes) -> tuple[int, Json]:
        parts = urlsplit(raw_path)
        path = unquote(parts.path)
        query = dict(parse_qsl(parts.query))
        body = json.loads(raw_body) if raw_body else None
        with self.lock:
            record = Recorded(method, path, query, json.loads(raw_body) if raw_body else None)
            self.requests.append(record)
            try:
                self._inject(method, path)
                answer = 200, self._route(method, path, query, body or {})
            except ApiError as exc:
                answer = exc.status, exc.body()
            record.status = answer[0]
            return answer[0], json.loads(json.dumps(answer[1]))  # a snapshot, not the live resource

    def _inject(self, method: str, path: str) -> None:
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                fault.times -= 1
                raise ApiError(fault.status, fault.message, fault.grpc_status, fault.reason)

    def _route(self, method: str, path: str, query: dict[str, str], body: Json) -> Json:
        p = "(?P<project>[^/]+)"
        routes: list[tuple[str, str, Callable[..., Json]]] = [
            ("POST", rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters$", self._create_cluster),
            ("GET", rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/:]+)$", self._get_cluster),
            ("DELETE", rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/:]+)$",
             self._delete_cluster),
            ("POST", rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/:]+)/nodePools$",
             self._create_pool),
            ("GET", rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/]+)/nodePools/(?P<pool>[^/:]+)$",
             self._get_pool),
            ("DELETE",
             rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/]+)/nodePools/(?P<pool>[^/:]+)$",
             self._delete_pool),
            ("POST",
             rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/]+)/nodePools/(?P<pool>[^/:]+)"
             r":setAutoscaling$", self._set_autoscaling),
            ("POST",
             rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/]+)/nodePools/(?P<pool>[^/:]+)"
             r":setSize$", self._set_size),
            ("PUT", rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/]+)/nodePools/(?P<pool>[^/:]+)$",
             self._update_pool),
            ("POST", rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/clusters/(?P<name>[^/:]+):setResourceLabels$",
             self._set_labels),
            ("GET", rf"^/v1/projects/{p}/locations/(?P<loc>[^/]+)/operations/(?P<op>[^/]+)$", self._get_operation),
            ("POST", rf"^/compute/v1/projects/{p}/global/(?P<kind>networks|firewalls)$", self._insert_compute),
            ("POST", rf"^/compute/v1/projects/{p}/regions/(?P<region>[^/]+)/(?P<kind>subnetworks)$",
             self._insert_compute),
            ("GET", rf"^/compute/v1/projects/{p}/global/(?P<kind>networks|firewalls)/(?P<name>[^/]+)$",
             self._get_compute),
            ("GET", rf"^/compute/v1/projects/{p}/regions/(?P<region>[^/]+)/(?P<kind>subnetworks)/(?P<name>[^/]+)$",
             self._get_compute),
            ("DELETE", rf"^/compute/v1/projects/{p}/global/(?P<kind>networks|firewalls)/(?P<name>[^/]+)$",
             self._delete_compute),
            ("DELETE",
             rf"^/compute/v1/projects/{p}/regions/(?P<region>[^/]+)/(?P<kind>subnetworks)/(?P<name>[^/]+)$",
             self._delete_compute),
            ("GET", rf"^/compute/v1/projects/{p}/global/operations/(?P<op>[^/]+)$", self._get_operation),
            ("GET", rf"^/compute/v1/projects/{p}/regions/(?P<region>[^/]+)/operations/(?P<op>[^/]+)$",
             self._get_operation),
            ("PUT", rf"^/v1/projects/{p}/topics/(?P<topic>[^/:]+)$", self._create_topic),
            ("GET", rf"^/v1/projects/{p}/topics/(?P<topic>[^/:]+)$", self._get_topic),
            ("DELETE", rf"^/v1/projects/{p}/topics/(?P<topic>[^/:]+)$", self._delete_topic),
            ("POST", rf"^/v1/projects/{p}/serviceAccounts$", self._create_sa),
            ("GET", rf"^/v1/projects/{p}/serviceAccounts/(?P<email>[^/:]+)$", self._get_sa),
            ("DELETE", rf"^/v1/projects/{p}/serviceAccounts/(?P<email>[^/:]+)$", self._delete_sa),
            ("POST", rf"^/v1/projects/{p}:getIamPolicy$", self._get_policy),
            ("POST", rf"^/v1/projects/{p}:setIamPolicy$", self._set_policy),
        ]  # fmt: skip
        for verb, pattern, fn in routes:
            found = re.match(pattern, path)
            if verb == method and found:
                args = found.groupdict()
                if args.pop("project") != self.project:
                    raise ApiError(403, f"Permission denied on project {found.group('project')}")
                return fn(method=method, path=path, query=query, body=body, **args)
        raise ApiError(404, f"no route for {method} {path}")

    # ------------------------------------------------------------------ operations
    def _start_op(self, method: str, path: str, target: str, op_type: str, on_done: Callable[[], object],
                  on_error: Callable[[], object] = lambda: None, *, compute: bool = False,
                  region: str | None = None) -> Json:  # fmt: skip
        name = f"operation-{next(self._ids)}"
        if compute:
            scope = f"regions/{region}" if region else "global"
            link = f"{self.url}/compute/v1/projects/{self.project}/{scope}/operations/{name}"
            body: Json = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name,
                          "operationType": op_type, "targetLink": target, "status": "PENDING", "selfLink": link}
            if region:
                body["region"] = region
        else:
            body = {"name": name, "operationType": op_type, "status": "PENDING", "targetLink": target,
                    "selfLink": f"{target}/operations/{name}"}  # fmt: skip
        polls = self.op_polls_by_type.get(op_type, self.op_polls)
        op = Operation(name, body, target, polls, on_done, on_error, compute=compute)
        for fault in self.op_faults:
            if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                fault.times -= 1
                if compute:
                    op.error = {"error": {"errors": [{"code": fault.compute_code, "message": fault.message}]},
                                "httpErrorStatusCode": fault.http_status, "httpErrorMessage": "FORBIDDEN"}  # fmt: skip
                else:
                    op.error = {"error": {"code": fault.grpc_code, "message": fault.message},
                                "statusMessage": fault.message}  # fmt: skip
                break
        self.operations[name] = op
        if polls <= 0:
            self._finish(op)
        return dict(op.body)

    def _finish(self, op: Operation) -> None:
        op.body["status"] = "DONE"
        if op.error is not None:
            op.body.update(op.error)
            op.on_error()
        else:
            op.on_done()

    def _tick(self, op: Operation) -> None:
        if op.body["status"] == "DONE":
            return
        op.polls_left -= 1
        op.body["status"] = "RUNNING"
        if op.polls_left <= 0:
            self._finish(op)

    def _tick_target(self, target: str) -> None:
        """Reading a resource also moves its operations (and its parent's) on, so a driver that adopts it by
        polling converges: time passes for the cloud whatever the client reads."""
        for op in list(self.operations.values()):
            if target == op.target or target.startswith(op.target + "/"):
                self._tick(op)

    def _busy(self, target_prefix: str) -> bool:
        return any(op.body["status"] != "DONE" and op.target.startswith(target_prefix)
                   for op in self.operations.values())  # fmt: skip

    def _get_operation(self, op: str, **_: Any) -> Json:
        found = self.operations.get(op)
        if found is None:
            raise ApiError(404, f"operation {op} not found")
        self._tick(found)
        return dict(found.body)

    # ------------------------------------------------------------------ GKE
    def _create_cluster(self, loc: str, body: Json, method: str, path: str, **_: Any) -> Json:
        cluster = dict(body.get("cluster") or {})
        key = f"projects/{self.project}/locations/{loc}/clusters/{cluster.get('name', '')}"
        if not cluster.get("name"):
            raise ApiError(400, "Cluster.name must be set")
        if key in self.clusters:
            raise ApiError(409, f"Already exists: {key}.")
        self_link = f"{self.url}/v1/{key}"
        cluster.update(status="PROVISIONING", selfLink=self_link, location=loc)
        cluster["nodePools"] = [dict(p, status="PROVISIONING", selfLink=f"{self_link}/nodePools/{p['name']}")
                                for p in cluster.get("nodePools", [])]  # fmt: skip
        cluster["labelFingerprint"] = _fingerprint(cluster.get("resourceLabels") or {})
        self.clusters[key] = cluster
        self.created["cluster"] += 1

        def done() -> None:
            cluster.update(status="RUNNING", endpoint=f"10.{next(self._ids) % 250}.0.2",
                           currentMasterVersion=f"{cluster.get('initialClusterVersion', '1.30')}.5-gke.1000",
                           masterAuth={"clusterCaCertificate": fake_ca(key)})  # fmt: skip
            if cluster.get("privateClusterConfig", {}).get("enablePrivateEndpoint"):
                cluster["privateClusterConfig"]["privateEndpoint"] = cluster["endpoint"]
            for pool in cluster["nodePools"]:
                pool["status"] = "RUNNING"

        def failed() -> None:
            cluster.update(status="ERROR", statusMessage="create failed")

        return self._start_op(method, path, key, "CREATE_CLUSTER", done, failed)

    def _cluster(self, loc: str, name: str) -> tuple[str, Json]:
        key = f"projects/{self.project}/locations/{loc}/clusters/{name}"
        if key not in self.clusters:
            raise ApiError(404, f"Not found: {key}.")
        return key, self.clusters[key]

    def _get_cluster(self, loc: str, name: str, **_: Any) -> Json:
        key, _cluster = self._cluster(loc, name)
        self._tick_target(key)
        return self._cluster(loc, name)[1]  # 404 if that finished a deletion

    def _delete_cluster(self, loc: str, name: str, method: str, path: str, **_: Any) -> Json:
        key, cluster = self._cluster(loc, name)
        if cluster["status"] in ("PROVISIONING", "STOPPING") or self._busy(key):
            raise ApiError(400, f"Cluster {name} is running incompatible operation.", "FAILED_PRECONDITION")
        cluster["status"] = "STOPPING"
        return self._start_op(method, path, key, "DELETE_CLUSTER", lambda: self.clusters.pop(key, None))

    def _create_pool(self, loc: str, name: str, body: Json, method: str, path: str, **_: Any) -> Json:
        key, cluster = self._cluster(loc, name)
        pool = dict(body.get("nodePool") or {})
        if cluster["status"] != "RUNNING" or self._busy(key):
            raise ApiError(400, f"Cluster {name} is running incompatible operation.", "FAILED_PRECONDITION")
        if any(p["name"] == pool.get("name") for p in cluster["nodePools"]):
            raise ApiError(409, f"Already exists: {key}/nodePools/{pool.get('name')}.")
        pool_key = f"{key}/nodePools/{pool['name']}"
        pool.update(status="PROVISIONING", selfLink=f"{self.url}/v1/{pool_key}")
        cluster["nodePools"].append(pool)
        self.created["nodePool"] += 1
        return self._start_op(method, path, pool_key, "CREATE_NODE_POOL", lambda: pool.update(status="RUNNING"),
                              lambda: pool.update(status="ERROR", statusMessage="create failed"))  # fmt: skip

    def _pool(self, loc: str, name: str, pool: str) -> tuple[str, Json, Json]:
        key, cluster = self._cluster(loc, name)
        for candidate in cluster["nodePools"]:
            if candidate["name"] == pool:
                return f"{key}/nodePools/{pool}", cluster, candidate
        raise ApiError(404, f"Not found: {key}/nodePools/{pool}.")

    def _get_pool(self, loc: str, name: str, pool: str, **_: Any) -> Json:
        key, _c, _p = self._pool(loc, name, pool)
        self._tick_target(key)
        return self._pool(loc, name, pool)[2]

    def _delete_pool(self, loc: str, name: str, pool: str, method: str, path: str, **_: Any) -> Json:
        key, cluster, found = self._pool(loc, name, pool)
        if self._busy(cluster_key := key.rsplit("/nodePools/", 1)[0]) or cluster["status"] != "RUNNING":
            raise ApiError(400, f"Cluster {name} is running incompatible operation.", "FAILED_PRECONDITION")
        found["status"] = "STOPPING"

        def done() -> None:
            self.clusters[cluster_key]["nodePools"] = [p for p in cluster["nodePools"] if p["name"] != pool]

        return self._start_op(method, path, key, "DELETE_NODE_POOL", done)

    def _set_autoscaling(self, loc: str, name: str, pool: str, body: Json, method: str, path: str, **_: Any) -> Json:
        key, cluster, found = self._pool(loc, name, pool)
        if self._busy(key.rsplit("/nodePools/", 1)[0]):
            raise ApiError(400, f"Cluster {name} is running incompatible operation.", "FAILED_PRECONDITION")
        wanted = body.get("autoscaling") or {}
        return self._start_op(method, path, key, "SET_NODE_POOL_SIZE", lambda: found.update(autoscaling=wanted))

    def _set_size(self, loc: str, name: str, pool: str, body: Json, method: str, path: str, **_: Any) -> Json:
        key, _cluster, found = self._pool(loc, name, pool)
        if self._busy(key.rsplit("/nodePools/", 1)[0]):
            raise ApiError(400, f"Cluster {name} is running incompatible operation.", "FAILED_PRECONDITION")
        count = int(body.get("nodeCount") or 0)
        return self._start_op(method, path, key, "SET_NODE_POOL_SIZE", lambda: found.update(nodeCount=count))

    def _update_pool(self, loc: str, name: str, pool: str, body: Json, method: str, path: str, **_: Any) -> Json:
        """UpdateNodePool: each of labels, taints and resourceLabels that is given replaces the whole set."""
        key, _cluster, found = self._pool(loc, name, pool)
        if self._busy(key.rsplit("/nodePools/", 1)[0]):
            raise ApiError(400, f"Cluster {name} is running incompatible operation.", "FAILED_PRECONDITION")
        changes = {field: (body[field] or {}).get(inner) or ({} if inner == "labels" else [])
                   for field, inner in (("labels", "labels"), ("taints", "taints"), ("resourceLabels", "labels"))
                   if field in body}  # fmt: skip
        if not changes:
            raise ApiError(400, "At least one field must be updated.")
        return self._start_op(method, path, key, "UPGRADE_NODES",
                              lambda: found.setdefault("config", {}).update(changes))  # fmt: skip

    def _set_labels(self, loc: str, name: str, body: Json, method: str, path: str, **_: Any) -> Json:
        key, cluster = self._cluster(loc, name)
        if body.get("labelFingerprint") != cluster.get("labelFingerprint"):
            raise ApiError(400, "Labels could not be set due to fingerprint mismatch.", "FAILED_PRECONDITION")
        labels = dict(body.get("resourceLabels") or {})

        def done() -> None:
            cluster.update(resourceLabels=labels, labelFingerprint=_fingerprint(labels))

        return self._start_op(method, path, key, "SET_LABELS", done)

    # ------------------------------------------------------------------ Compute
    def _compute_store(self, kind: str, region: str | None) -> tuple[dict[str, Json], str]:
        store = {"networks": self.networks, "subnetworks": self.subnetworks, "firewalls": self.firewalls}[kind]
        return store, (f"{region}/" if region else "")

    def _insert_compute(self, kind: str, body: Json, query: dict[str, str], method: str, path: str,
                        region: str | None = None, **_: Any) -> Json:  # fmt: skip
        request_id = query.get("requestId")
        if request_id and request_id in self.request_ids:
            return dict(self.operations[self.request_ids[request_id]].body)  # a retried insert: the same operation
        store, prefix = self._compute_store(kind, region)
        name = body.get("name", "")
        if prefix + name in store:
            raise ApiError(409, f"The resource '{kind}/{name}' already exists", reason="alreadyExists")
        if kind in ("subnetworks", "firewalls"):
            network = str(body.get("network", "")).rsplit("/", 1)[-1]
            if network not in self.networks:
                raise ApiError(400, f"The resource network '{network}' was not found", reason="invalid")
        scope = f"regions/{region}" if region else "global"
        link = f"{self.url}/compute/v1/projects/{self.project}/{scope}/{kind}/{name}"
        store[prefix + name] = dict(body, selfLink=link, id=str(next(self._ids)), kind=f"compute#{kind[:-1]}")
        self.created[kind[:-1]] += 1
        op = self._start_op(method, path, link, "insert", lambda: None, lambda: store.pop(prefix + name, None),
                            compute=True, region=region)  # fmt: skip
        if request_id:
            self.request_ids[request_id] = op["name"]
        return op

    def _get_compute(self, kind: str, name: str, region: str | None = None, **_: Any) -> Json:
        store, prefix = self._compute_store(kind, region)
        if prefix + name not in store:
            raise ApiError(404, f"The resource '{kind}/{name}' was not found", reason="notFound")
        return store[prefix + name]

    def _delete_compute(self, kind: str, name: str, query: dict[str, str], method: str, path: str,
                        region: str | None = None, **_: Any) -> Json:  # fmt: skip
        request_id = query.get("requestId")
        if request_id and request_id in self.request_ids:
            return dict(self.operations[self.request_ids[request_id]].body)
        store, prefix = self._compute_store(kind, region)
        if prefix + name not in store:
            raise ApiError(404, f"The resource '{kind}/{name}' was not found", reason="notFound")
        if kind == "networks":
            users = [k for k, v in [*self.subnetworks.items(), *self.firewalls.items()]
                     if str(v.get("network", "")).rsplit("/", 1)[-1] == name]  # fmt: skip
            if users:
                raise ApiError(400, f"The network resource '{name}' is already being used by '{users[0]}'",
                               reason="resourceInUseByAnotherResource")  # fmt: skip
        link = store[prefix + name]["selfLink"]
        op = self._start_op(method, path, link, "delete", lambda: store.pop(prefix + name, None), compute=True,
                            region=region)  # fmt: skip
        if request_id:
            self.request_ids[request_id] = op["name"]
        return op

    # ------------------------------------------------------------------ Pub/Sub
    def _create_topic(self, topic: str, body: Json, **_: Any) -> Json:
        key = f"projects/{self.project}/topics/{topic}"
        if key in self.topics:
            raise ApiError(409, f"Resource already exists in the project (resource={topic}).")
        self.topics[key] = dict(body, name=key)
        self.created["topic"] += 1
        return self.topics[key]

    def _get_topic(self, topic: str, **_: Any) -> Json:
        key = f"projects/{self.project}/topics/{topic}"
        if key not in self.topics:
            raise ApiError(404, f"Resource not found (resource={topic}).")
        return self.topics[key]

    def _delete_topic(self, topic: str, **_: Any) -> Json:
        key = f"projects/{self.project}/topics/{topic}"
        if self.topics.pop(key, None) is None:
            raise ApiError(404, f"Resource not found (resource={topic}).")
        return {}

    # ------------------------------------------------------------------ IAM and the project policy
    def _create_sa(self, body: Json, **_: Any) -> Json:
        account_id = str(body.get("accountId", ""))
        if not re.fullmatch(r"[a-z]([-a-z0-9]{4,28}[a-z0-9])", account_id):
            raise ApiError(400, f"Invalid account id {account_id!r}: 6-30 characters, [a-z][-a-z0-9]*[a-z0-9]")
        email = f"{account_id}@{self.project}.iam.gserviceaccount.com"
        if email in self.service_accounts:
            raise ApiError(409, f"Service account {account_id} already exists within project projects/{self.project}.")
        extra = body.get("serviceAccount") or {}
        self.created["serviceAccount"] += 1
        self.service_accounts[email] = {
            "name": f"projects/{self.project}/serviceAccounts/{email}", "projectId": self.project,
            "uniqueId": str(100000000000000000000 + next(self._ids)), "email": email,
            "displayName": extra.get("displayName", ""), "description": extra.get("description", ""),
            "etag": "MDEwMjE5MjA=", "oauth2ClientId": str(next(self._ids)),
        }  # fmt: skip
        return self.service_accounts[email]

    def _get_sa(self, email: str, **_: Any) -> Json:
        if email not in self.service_accounts:
            raise ApiError(404, f"Unknown service account {email}")
        return self.service_accounts[email]

    def _delete_sa(self, email: str, **_: Any) -> Json:
        if self.service_accounts.pop(email, None) is None:
            raise ApiError(404, f"Unknown service account {email}")
        return {}

    def _get_policy(self, **_: Any) -> Json:
        return json.loads(json.dumps(self.policy))

    def _set_policy(self, body: Json, **_: Any) -> Json:
        policy = dict(body.get("policy") or {})
        if policy.get("etag") != self.policy["etag"]:
            raise ApiError(409, "There were concurrent policy changes. Please retry the whole read-modify-write "
                                "with exponential backoff.", "ABORTED")  # fmt: skip
        for binding in policy.get("bindings", []):
            for member in binding.get("members", []):
                account = member.removeprefix("serviceAccount:")
                ours = account.endswith(f"@{self.project}.iam.gserviceaccount.com")
                if member.startswith("serviceAccount:") and ours and account not in self.service_accounts:
                    raise ApiError(400, f"Service account {account} does not exist.")
        policy["etag"] = base64.b64encode(f"etag-{next(self._ids)}".encode()).decode()
        self.policy = policy
        return json.loads(json.dumps(policy))
