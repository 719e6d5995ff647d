"""A small fake of Azure Resource Manager for the azure driver's tests, at the HTTP boundary.

The real azure-mgmt-* clients talk to it over TLS (a throwaway self-signed certificate made at
start; the SDK's bearer-token policy refuses plain http). It serves the stdlib http.server in a
thread and:
- stores resources by ARM id (case-insensitive), fills in what ARM fills in (id, name, type,
  provisioningState, subnet ids, identity principal ids, cluster FQDNs, agent pools of a new
  cluster), answers GET / PUT / PATCH / DELETE and collection GETs ({"value": [...]});
- runs long-running operations like ARM: an LRO PUT answers 201/200 with provisioningState
  Creating/Updating and an `Azure-AsyncOperation` header whose status reads InProgress for
  `polls` polls, then Succeeded (or Failed, if a fault says so); an LRO DELETE answers 202 with
  a `Location` that reads 202 until the resource is gone, then 200;
- refuses a PUT under a missing resource group (404 ResourceGroupNotFound) or parent (404
  ParentResourceNotFound), and a child write while its parent is mid-operation (409, like AKS);
- POST .../managedClusters/<name>/listClusterUserCredential returns an exec kubeconfig whose
  CA is `ca_pem`;
- records every request (method, path, api-version, JSON body) and injects faults.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.http import DEFAULT_METHODS, Request, json_server, serve, stop_server
from tests.fakes.tls import write_self_signed

# Resource types (last type segment, lower case) whose PUT is a long-running operation.
LRO_PUT = {"managedclusters", "agentpools", "virtualnetworks", "networksecuritygroups", "namespaces"}
# ... and whose DELETE is (the others delete synchronously: 200, or 204 when absent).
LRO_DELETE = LRO_PUT | {"resourcegroups", "roleassignments"}
# Synchronous PUTs that answer 200 even on create (Event Hubs' hub: the SDK accepts only 200).
PUT_ALWAYS_200 = {"eventhubs"}
IN_PROGRESS = {"creating", "updating", "deleting", "accepted", "scaling", "upgrading"}


@dataclass
class Recorded:
    method: str
    path: str
    api_version: str | None
    body: Any
    query: dict[str, str]


@dataclass
class Fault:
    method: str
    path_contains: str
    status: int = 429
    code: str = "TooManyRequests"
    message: str = "Too many requests, retry later."
    headers: dict[str, str] = field(default_factory=lambda: {"Retry-After": "0"})
    times: int = 1
    in_operation: bool = False  # accept the request, fail its long-running operation with code/message


@dataclass
class _Operation:
    resource_key: str
    method: str
    remaining: int
    error: dict[str, str] | None = None
    done: bool = False


def _segments(path: str) -> list[str]:
    return [s for s in path.strip("/").split("/") if s]


def arm_type(path: str) -> tuple[str, bool]:
    """(resource type like 'Microsoft.ContainerService/managedClusters/agentPools', is_collection)."""
    seg = _segments(path)
    lows = [s.lower() for s in seg]
    if "providers" not in lows:
        if len(seg) == 4 and lows[2] == "resourcegroups":
            return "Microsoft.Resources/resourceGroups", False
        if len(seg) == 3 and lows[2] == "resourcegroups":
            return "Microsoft.Resources/resourceGroups", True
        return "", False
    i = len(lows) - 1 - lows[::-1].index("providers")
    ns, rest = seg[i + 1], seg[i + 2 :]
    return ns + "/" + "/".join(rest[0::2]), len(rest) % 2 == 1


def _parent_key(path: str) -> str | None:
    """The (lower-case) id of a child resource's parent ('.../managedClusters/c' for '.../c/agentPools/p')."""
    seg = _segments(path)
    lows = [s.lower() for s in seg]
    if "providers" not in lows:
        return None
    i = lows.index("providers")
    if len(seg) - (i + 2) < 4:
        return None
    return "/" + "/".join(lows[:-2])


def _last_type(path: str) -> str:
    t, _ = arm_type(path)
    return t.rsplit("/", 1)[-1].lower()


class FakeArm:
    """The fake ARM endpoint. `start()` → `base_url`, `ca_file`; `stop()`."""

    def __init__(self, polls: int = 1, subscription_id: str = "00000000-0000-0000-0000-000000000001") -> None:
        self.polls = polls
        self.subscription_id = subscription_id
        self.lock = threading.RLock()
        self.resources: dict[str, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.ops: dict[str, _Operation] = {}
        self._settle_after: dict[str, int] = {}  # pre-created in-progress resources: GETs until Succeeded
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-arm-")
        self.ca_file, key_file, self.ca_pem = write_self_signed(Path(self._tmp.name), "fake-arm.local", "arm")
        self._server = json_server(self.handle, tls=(self.ca_file, key_file), methods=(*DEFAULT_METHODS, "HEAD"))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeArm:
        self._thread = serve(self._server, "fake-arm", poll_interval=0.02)
        return self

    def stop(self) -> None:
        stop_server(self._server, serving=self._thread is not None)
        self._thread = None
        self._tmp.cleanup()

    # ------------------------------------------------------------------ test helpers
    def put(self, arm_id: str, body: dict[str, Any], state: str = "Succeeded", settle_after_gets: int = 0
            ) -> dict[str, Any]:  # fmt: skip
        """Pre-create a resource (not recorded). With state 'Creating', it turns Succeeded after that many GETs."""
        with self.lock:
            res = self._materialize(arm_id, body, None, state)
            if settle_after_gets:
                self._settle_after[arm_id.lower()] = settle_after_gets
            return res

    def get(self, arm_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.resources.get(arm_id.lower())

    def ids(self) -> list[str]:
        with self.lock:
            return sorted(r["id"] for r in self.resources.values())

    def inject(self, method: str, path_contains: str, **kwargs: Any) -> Fault:
        fault = Fault(method.upper(), path_contains.lower(), **kwargs)
        with self.lock:
            self.faults.append(fault)
        return fault

    def calls(self, method: str | None = None, type_suffix: str | None = None) -> list[Recorded]:
        """Recorded requests (not operation polls), optionally of one method / resource type (last segment)."""
        with self.lock:
            out = [r for r in self.requests if not r.path.startswith("/fake-operations/")]
        if method:
            out = [r for r in out if r.method == method.upper()]
        if type_suffix:
            out = [r for r in out if _last_type(r.path) == type_suffix.lower()]
        return out

    def clear_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    # ------------------------------------------------------------------ model
    def _materialize(self, path: str, body: dict[str, Any], existing: dict[str, Any] | None, state: str
                     ) -> dict[str, Any]:  # fmt: skip
        seg = _segments(path)
        rtype, _ = arm_type(path)
        arm_id = "/" + "/".join(seg)
        props = dict(body.get("properties") or {})
        old_props = dict((existing or {}).get("properties") or {})
        res: dict[str, Any] = {k: v for k, v in body.items() if k != "properties"}
        res.update({"id": arm_id, "name": seg[-1], "type": rtype})
        low = rtype.rsplit("/", 1)[-1].lower()
        if low == "resourcegroups":
            props["provisioningState"] = "Succeeded" if state != "Deleting" else state
        elif low == "roleassignments":
            props["scope"] = arm_id.rsplit("/providers/", 1)[0]
        elif low == "eventhubs":
            props.setdefault("status", "Active")
        else:
            props["provisioningState"] = state
        if low == "virtualnetworks":
            props["subnets"] = [{**s, "id": f"{arm_id}/subnets/{s['name']}", "type":
                                 "Microsoft.Network/virtualNetworks/subnets"} for s in props.get("subnets") or []]
        if low == "userassignedidentities":
            for k, ns in (("principalId", "principal"), ("clientId", "client")):
                props[k] = old_props.get(k) or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ns}:{arm_id.lower()}"))
            props["tenantId"] = "72f988bf-0000-0000-0000-000000000000"
        if low == "managedclusters":
            prefix = props.get("dnsPrefix", seg[-1])
            loc = body.get("location", "westeurope")
            props["fqdn"] = f"{prefix}-{uuid.uuid5(uuid.NAMESPACE_URL, arm_id).hex[:8]}.hcp.{loc}.azmk8s.io"
            if (props.get("apiServerAccessProfile") or {}).get("enablePrivateCluster"):
                props["privateFQDN"] = f"{prefix}-{uuid.uuid5(uuid.NAMESPACE_URL, arm_id).hex[:8]}.privatelink." \
                                       f"{loc}.azmk8s.io"  # fmt: skip
            props.setdefault("nodeResourceGroup", f"MC_{seg[3]}_{seg[-1]}_{loc}")
            props["currentKubernetesVersion"] = props.get("kubernetesVersion")
            for profile in props.get("agentPoolProfiles") or []:
                pool_props = {k: v for k, v in profile.items() if k != "name"}
                pool_id = f"{arm_id}/agentPools/{profile['name']}"
                if pool_id.lower() not in self.resources:
                    self._materialize(pool_id, {"properties": pool_props}, None, "Succeeded")
        if low == "namespaces" and "EventHub" in rtype:
            props["serviceBusEndpoint"] = f"https://{seg[-1]}.servicebus.windows.net:443/"
            props["status"] = "Active"
        res["properties"] = props
        self.resources[arm_id.lower()] = res
        return res

    def _remove(self, key: str) -> None:
        for k in [k for k in self.resources if k == key or k.startswith(key + "/")]:
            del self.resources[k]
            self._settle_after.pop(k, None)

    def _advance_settling(self, key: str) -> None:
        left = self._settle_after.get(key)
        if left is None:
            return
        if left <= 1:
            del self._settle_after[key]
            res = self.resources.get(key)
            if res is not None and "provisioningState" in res.get("properties", {}):
                if res["properties"]["provisioningState"].lower() == "deleting":
                    self._remove(key)
                else:
                    res["properties"]["provisioningState"] = "Succeeded"
        else:
            self._settle_after[key] = left - 1

    def _finish(self, op: _Operation) -> None:
        op.done = True
        res = self.resources.get(op.resource_key)
        if op.method == "DELETE":
            self._remove(op.resource_key)
        elif res is not None:
            res["properties"]["provisioningState"] = "Failed" if op.error else "Succeeded"

    # ------------------------------------------------------------------ HTTP
    def handle(self, req: Request) -> tuple[int, Any, dict[str, str]]:
        url = urlsplit(req.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = json.loads(req.body) if req.body else None
        with self.lock:
            self.requests.append(Recorded(req.method, url.path, query.get("api-version"), body, query))
            return self._route(req.method, url.path, query, body)

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None
               ) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        return status, {"error": {"code": code, "message": message}}, headers or {}

    def _op_url(self, op_id: str, kind: str) -> str:
        return f"{self.base_url}/fake-operations/{op_id}?kind={kind}&api-version=2024-01-01"

    def _new_op(self, key: str, method: str, error: dict[str, str] | None = None) -> str:
        op_id = uuid.uuid4().hex
        self.ops[op_id] = _Operation(key, method, self.polls, error)
        return op_id

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        if path.startswith("/fake-operations/"):
            return self._poll(path.rsplit("/", 1)[-1], query.get("kind", "async"))
        op_fault: Fault | None = None
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.path_contains in path.lower():
                fault.times -= 1
                if fault.in_operation:
                    op_fault = fault
                    break
                return self._error(fault.status, fault.code, fault.message, dict(fault.headers))
        rtype, collection = arm_type(path)
        if not rtype:
            return self._error(404, "InvalidResourceType", f"no such route {path}")
        key = path.rstrip("/").lower()
        seg = _segments(path)
        if method == "POST":
            return self._action(path, query)
        if collection and method == "GET":
            prefix = key + "/"
            found = [r for k, r in self.resources.items()
                     if k.startswith(prefix) and "/" not in k[len(prefix):]]  # fmt: skip
            return 200, {"value": found}, {}
        low = rtype.rsplit("/", 1)[-1].lower()
        extension = sum(1 for s in seg if s.lower() == "providers") > 1
        group_key = "/".join(["", *seg[:4]]).lower() if len(seg) >= 4 and seg[2].lower() == "resourcegroups" else ""
        if method in ("GET", "HEAD"):
            self._advance_settling(key)
            res = self.resources.get(key)
            if res is None:
                if group_key and group_key != key and group_key not in self.resources and not extension:
                    return self._error(404, "ResourceGroupNotFound", f"Resource group '{seg[3]}' could not be found.")
                return self._error(404, "ResourceNotFound" if low != "resourcegroups" else "ResourceGroupNotFound",
                                   f"The Resource '{rtype}/{seg[-1]}' was not found.")  # fmt: skip
            return (204 if method == "HEAD" else 200), (None if method == "HEAD" else res), {}
        if method in ("PUT", "PATCH"):
            if not extension and group_key and group_key != key and group_key not in self.resources:
                return self._error(404, "ResourceGroupNotFound", f"Resource group '{seg[3]}' could not be found.")
            parent_key = _parent_key(path)
            if not extension and parent_key is not None:
                parent = self.resources.get(parent_key)
                if parent is None:
                    return self._error(404, "ParentResourceNotFound", f"parent of {path} not found")
                parent_state = str(parent.get("properties", {}).get("provisioningState", "")).lower()
                if parent_state in IN_PROGRESS:
                    return self._error(409, "OperationNotAllowed", "Operation is not allowed because there's an "
                                       f"operation in progress on {parent['name']} ({parent_state}).")  # fmt: skip
            existing = self.resources.get(key)
            if existing is not None and str(existing.get("properties", {}).get("provisioningState", "")
                                            ).lower() == "deleting":  # fmt: skip
                return self._error(409, "Conflict", f"{seg[-1]} is being deleted")
            if method == "PATCH":
                if existing is None:
                    return self._error(404, "ResourceNotFound", f"{path} not found")
                merged = {**existing, **{k: v for k, v in (body or {}).items() if k != "properties"}}
                merged["properties"] = {**existing.get("properties", {}), **((body or {}).get("properties") or {})}
                body = merged
            lro = low in LRO_PUT
            state = ("Updating" if existing is not None else "Creating") if lro else "Succeeded"
            res = self._materialize(path.rstrip("/"), body or {}, existing, state)
            if not lro:
                status = 200 if existing is not None or low in PUT_ALWAYS_200 else 201
                return status, res, {}
            error = {"code": op_fault.code, "message": op_fault.message} if op_fault else None
            op_id = self._new_op(key, "PUT", error)
            return (200 if existing is not None else 201), res, {"Azure-AsyncOperation": self._op_url(op_id, "async")}
        if method == "DELETE":
            res = self.resources.get(key)
            if res is None:
                if low == "resourcegroups" or (group_key and group_key not in self.resources and not extension):
                    return self._error(404, "ResourceGroupNotFound", f"Resource group '{seg[3]}' could not be found.")
                return 204, None, {}
            if low not in LRO_DELETE:
                self._remove(key)
                return 200, None, {}
            res.setdefault("properties", {})["provisioningState"] = "Deleting"
            op_id = self._new_op(key, "DELETE")
            return 202, None, {"Location": self._op_url(op_id, "location"), "Retry-After": "0"}
        return self._error(405, "MethodNotAllowed", method)

    def _poll(self, op_id: str, kind: str) -> tuple[int, Any, dict[str, str]]:
        op = self.ops.get(op_id)
        if op is None:
            return self._error(404, "OperationNotFound", op_id)
        if not op.done:
            if op.remaining > 0:
                op.remaining -= 1
                return (202, None, {"Location": self._op_url(op_id, kind)}) if kind == "location" else \
                    (200, {"status": "InProgress"}, {})  # fmt: skip
            self._finish(op)
        if kind == "location":
            return 200, None, {}
        if op.error:
            return 200, {"status": "Failed", "error": op.error}, {}
        return 200, {"status": "Succeeded"}, {}

    def _action(self, path: str, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        resource, _, action = path.rstrip("/").rpartition("/")
        res = self.resources.get(resource.lower())
        if res is None:
            return self._error(404, "ResourceNotFound", f"{resource} not found")
        if action.lower() == "listclusterusercredential":
            props = res.get("properties", {})
            server = props.get("privateFQDN") or props.get("fqdn")
            kubeconfig = (
                "apiVersion: v1\nkind: Config\n"
                f"clusters:\n- name: {res['name']}\n  cluster:\n"
                f"    certificate-authority-data: {base64.b64encode(self.ca_pem).decode()}\n"
                f"    server: https://{server}:443\n"
                f"contexts:\n- name: {res['name']}\n  context: {{cluster: {res['name']}, user: clusterUser}}\n"
                f"current-context: {res['name']}\n"
                "users:\n- name: clusterUser\n  user:\n    exec:\n"
                "      apiVersion: client.authentication.k8s.io/v1beta1\n      command: kubelogin\n"
                "      args: [get-token, --login, azurecli, --server-id, 6dae42f8-4368-4678-94ff-3960e28e3630]\n"
            )
            value = base64.b64encode(kubeconfig.encode()).decode()
            return 200, {"kubeconfigs": [{"name": "clusterUser", "value": value}]}, {}
        return self._error(400, "UnsupportedAction", action)
