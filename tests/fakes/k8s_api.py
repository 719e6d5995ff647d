"""A small Kubernetes API server for tests, spoken to by the official `kubernetes` client over loopback HTTP.

It implements what the installer's real adapter needs, with the real API's shapes and rules:
  discovery   /version, /api, /api/v1, /apis, /apis/<group>/<version> (kinds, plurals, namespaced, verbs,
              `<plural>/status` subresources)
  apply       PATCH application/apply-patch+yaml with `fieldManager` (required) and `force`: creates when
              absent; per-manager field ownership in metadata.managedFields (FieldsV1); a field owned by another
              manager with a different value is a 409 Conflict in the API's Status shape unless `force`, which
              moves the field to the applier; fields the applier stops declaring are removed unless another
              manager owns them; an apply that changes nothing keeps the resourceVersion
  update      PATCH merge-patch / strategic-merge-patch, PUT and POST: "Update" operations that take ownership
              of the fields they change from every other manager (never a conflict), as `kubectl edit` does
  read        GET one object, LIST (per namespace or cluster-wide) with labelSelector (=, ==, !=, in, notin,
              exists, !exists) and fieldSelector metadata.name / metadata.namespace
  delete      DELETE one object or a collection (labelSelector); a Namespace takes its objects with it, a CRD
              its custom resources
  status      GET/PATCH/PUT `<object>/status` (writes only `.status`; the main resource ignores `.status`)
  CRDs        a CustomResourceDefinition named `<plural>.<group>` registers its served versions for discovery
              once its `Established` condition is True, then objects of that kind can be applied
  eviction    POST `pods/<name>/eviction` (a policy/v1 Eviction), decided as the API server does: pods that are
              terminating, finished or Pending go at once; a pod covered by more than one PodDisruptionBudget is
              refused (500); otherwise the budget's healthy pods are counted now (Ready, not terminating, matching
              its selector; an empty selector covers nothing here) and an eviction that would leave fewer than
              minAvailable / more than maxUnavailable unavailable (int or percent of the expected pods, rounded
              up) is refused with 429 TooManyRequests in the API's Status shape; a not-Ready pod of a healthy
              budget goes without using it (unhealthyPodEvictionPolicy). An accepted eviction deletes the pod
              (201), or with `graceful_eviction=True` marks it terminating until `reap()`

Field ownership is simplified but honest: every top-level field except apiVersion/kind/metadata/status, plus
metadata.labels and metadata.annotations, is tracked down to its leaves; a list whose items are all objects
with a unique `name` is associative (items tracked by name, like containers, env or webhooks), every other
list is atomic (one leaf). Defaulted fields (Deployment replicas, Service type/clusterIP/ports, the namespace
name label) are owned by no manager, as on a real API server.

`controllers=True` (the default) stands in for the controllers a real cluster runs: Deployments, DaemonSets
and StatefulSets report themselves rolled out for their current generation, CRDs become Established,
Services get an EndpointSlice with ready endpoints once a matching workload is available, and webhook
configurations annotated `cert-manager.io/inject-ca-from[-secret]` get their service webhooks' caBundle
filled (by manager "cainjector", as cert-manager does), and PodDisruptionBudgets get their status (observedGeneration,
expectedPods, currentHealthy, desiredHealthy, disruptionsAllowed, the DisruptionAllowed condition) kept up to date
as pods and budgets change, as the disruption controller does. `stall(kind, name, namespace)` keeps one object from
becoming ready (Available=False, as a crash-looping Deployment reports); `recover(...)` lets it. With
`controllers=False` nothing happens by itself: tests write statuses through the `/status` subresource.

Every request is recorded (`requests`, `calls`, `writes`) and faults can be injected (`fail`). `seed(obj)` stores
an object the way the cluster's own components made it (a Node, a Pod with its status and owners), unrecorded.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import itertools
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml
from kubernetes.client import ApiClient, Configuration

from tests.fakes.http import start_json_server, stop_server

Json = dict[str, Any]

WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
WEBHOOK_KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
CA_INJECT_ANNOTATIONS = ("cert-manager.io/inject-ca-from", "cert-manager.io/inject-ca-from-secret")
ENDPOINTSLICE_MANAGER = "endpointslice-controller.k8s.io"
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
PDB_REFUSAL = "Cannot evict pod as it would violate the pod's disruption budget."
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_MISSING = object()


# ---------------------------------------------------------------------------------------------- kinds
@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    status: bool = False  # has a /status subresource
    short: tuple[str, ...] = ()
    crd: str | None = None  # the CustomResourceDefinition that defines it

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()


def _k(gv: str, kind: str, plural: str, namespaced: bool = True, status: bool = False, *short: str) -> Kind:
    group, _, version = gv.rpartition("/")
    return Kind(group, version, kind, plural, namespaced, status, tuple(short))


BUILTIN_KINDS: tuple[Kind, ...] = (
    _k("v1", "Namespace", "namespaces", False, True, "ns"),
    _k("v1", "ConfigMap", "configmaps", True, False, "cm"),
    _k("v1", "Secret", "secrets"),
    _k("v1", "Service", "services", True, True, "svc"),
    _k("v1", "ServiceAccount", "serviceaccounts", True, False, "sa"),
    _k("v1", "Endpoints", "endpoints", True, False, "ep"),
    _k("v1", "Pod", "pods", True, True, "po"),
    _k("v1", "PersistentVolumeClaim", "persistentvolumeclaims", True, True, "pvc"),
    _k("v1", "ResourceQuota", "resourcequotas", True, True, "quota"),
    _k("v1", "LimitRange", "limitranges", True, False, "limits"),
    _k("v1", "Node", "nodes", False, True, "no"),
    _k("apps/v1", "Deployment", "deployments", True, True, "deploy"),
    _k("apps/v1", "DaemonSet", "daemonsets", True, True, "ds"),
    _k("apps/v1", "StatefulSet", "statefulsets", True, True, "sts"),
    _k("apps/v1", "ReplicaSet", "replicasets", True, True, "rs"),
    _k("batch/v1", "Job", "jobs", True, True),
    _k("batch/v1", "CronJob", "cronjobs", True, True, "cj"),
    _k("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", True, True, "hpa"),
    _k("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", True, True, "pdb"),
    _k("rbac.authorization.k8s.io/v1", "Role", "roles"),
    _k("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    _k("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", False),
    _k("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", False),
    _k("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", True, False, "netpol"),
    _k("networking.k8s.io/v1", "Ingress", "ingresses", True, True, "ing"),
    _k("networking.k8s.io/v1", "IngressClass", "ingressclasses", False),
    _k("node.k8s.io/v1", "RuntimeClass", "runtimeclasses", False),
    _k("scheduling.k8s.io/v1", "PriorityClass", "priorityclasses", False, False, "pc"),
    _k("storage.k8s.io/v1", "StorageClass", "storageclasses", False, False, "sc"),
    _k("coordination.k8s.io/v1", "Lease", "leases"),
    _k("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
    _k("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", False, True, "crd"),
    _k("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", "validatingwebhookconfigurations", False),
    _k("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations", False),
    _k("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy", "validatingadmissionpolicies", False, True),
    _k("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding", "validatingadmissionpolicybindings",
       False),
    _k("apiregistration.k8s.io/v1", "APIService", "apiservices", False, True),
)


# ---------------------------------------------------------------------------------------------- field paths
@dataclass(frozen=True)
class Item:
    """A path step into an associative list: the item whose `name` is this."""

    name: str


Path = tuple[str | Item, ...]


def _keyed(value: Any) -> bool:
    if not isinstance(value, list) or not value:
        return False
    names = [v.get("name") if isinstance(v, dict) else None for v in value]
    return all(isinstance(n, str) for n in names) and len(set(names)) == len(names)


def flatten(value: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Leaf path -> value. An empty map is a leaf ({}: "this map exists"); atomic lists are leaves; nulls are
    dropped (in an apply, null means "no opinion")."""
    if value is None:
        return {}
    if isinstance(value, dict):
        if not value:
            return {prefix: {}} if prefix else {}
        out: dict[Path, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, (*prefix, k)))
        return out
    if _keyed(value):
        out = {}
        for item in value:
            out.update(flatten(item, (*prefix, Item(item["name"]))))
        return out
    return {prefix: copy.deepcopy(value)}


def unflatten(flat: dict[Path, Any]) -> Json:
    root: dict[Any, Any] = {}
    for path, leaf in flat.items():
        node = root
        for step in path[:-1]:
            node = node.setdefault(step, {})
        if leaf == {} and isinstance(node.get(path[-1]), dict):
            continue  # "the map exists" and it already has content
        node[path[-1]] = copy.deepcopy(leaf)
    return _materialize(root)


def _materialize(node: Any) -> Any:
    if isinstance(node, dict):
        if node and all(isinstance(k, Item) for k in node):
            return [_materialize(v) for v in node.values()]
        return {k: _materialize(v) for k, v in node.items()}
    return node


def tracked(obj: Json) -> Json:
    """The part of an object whose fields have owners."""
    out = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    meta = obj.get("metadata") or {}
    picked = {k: meta[k] for k in ("labels", "annotations") if meta.get(k)}
    if picked:
        out["metadata"] = picked
    return out


def _prefix(a: Path, b: Path) -> bool:
    """a is a strict prefix of b."""
    return len(a) < len(b) and b[: len(a)] == a


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or _prefix(a, b) or _prefix(b, a)


def path_str(path: Path) -> str:
    """The API's rendering of a field path: .spec.containers[name="app"].image"""
    out = ""
    for step in path:
        out += f'[name="{step.name}"]' if isinstance(step, Item) else f".{step}"
    return out


def fields_v1(paths: set[Path]) -> Json:
    root: Json = {}
    for path in sorted(paths, key=path_str):
        node = root
        for step in path:
            key = f"k:{json.dumps({'name': step.name}, separators=(',', ':'))}" if isinstance(step, Item) \
                else f"f:{step}"  # fmt: skip
            node = node.setdefault(key, {})
            if isinstance(step, Item):
                node.setdefault(".", {})
    return root


@dataclass
class FieldSet:
    api_version: str
    paths: set[Path]
    time: str


@dataclass
class Stored:
    kind: Kind
    obj: Json  # without managedFields; apiVersion is the kind's
    fields: dict[tuple[str, str], FieldSet] = field(default_factory=dict)  # (manager, operation) ->


# ---------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> Json:
        body: Json = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": self.message, "reason": self.reason, "code": self.code}  # fmt: skip
        if self.details:
            body["details"] = self.details
        return body


def _not_found(kind: Kind, name: str) -> ApiError:
    what = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
    return ApiError(404, "NotFound", f'{what} "{name}" not found',
                    {"name": name, "group": kind.group, "kind": kind.plural})  # fmt: skip


def _invalid(kind: Kind, name: str, causes: list[tuple[str, str]]) -> ApiError:
    msg = "; ".join(f"{f}: {m}" for f, m in causes)
    return ApiError(422, "Invalid", f'{kind.kind} "{name}" is invalid: {msg}',
                    {"name": name, "group": kind.group, "kind": kind.kind,
                     "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f}
                                for f, m in causes]})  # fmt: skip


NO_RESOURCE = ApiError(404, "NotFound", "the server could not find the requested resource")


# ---------------------------------------------------------------------------------------------- selectors
def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def label_matcher(selector: str) -> Any:
    """A predicate on a labels dict for a labelSelector string; raises ApiError(400) on bad syntax."""
    tests: list[Callable[..., bool]] = []
    for req in _split_selector(selector):
        if m := re.fullmatch(r"([^\s!=]+)\s+(in|notin)\s+\((.*)\)", req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            tests.append((lambda ls, k=key, vs=values: ls.get(k) in vs) if op == "in"
                         else (lambda ls, k=key, vs=values: ls.get(k) not in vs))  # fmt: skip
        elif m := re.fullmatch(r"([^\s!=]+)\s*!=\s*(\S*)", req):
            tests.append(lambda ls, k=m.group(1), v=m.group(2): ls.get(k) != v)
        elif m := re.fullmatch(r"([^\s!=]+)\s*==?\s*(\S*)", req):
            tests.append(lambda ls, k=m.group(1), v=m.group(2): ls.get(k) == v)
        elif m := re.fullmatch(r"!\s*([^\s!=]+)", req):
            tests.append(lambda ls, k=m.group(1): k not in ls)
        elif re.fullmatch(r"[^\s!=(),]+", req):
            tests.append(lambda ls, k=req: k in ls)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {req!r}")
    return lambda labels: all(t(labels) for t in tests)


# ---------------------------------------------------------------------------------------------- patches
def merge_patch(target: Any, patch: Any, strategic: bool = False) -> Any:
    """RFC 7386 JSON merge patch; `strategic` also merges lists of named items by name (like kubectl)."""
    if strategic and _keyed(patch) and (target is None or _keyed(target) or target == []):
        by_name = {item["name"]: item for item in (target or [])}
        for item in patch:
            by_name[item["name"]] = merge_patch(by_name.get(item["name"]), item, True)
        return list(by_name.values())
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v, strategic)
    return result


# ---------------------------------------------------------------------------------------------- the server
@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    status: int = 0


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    code: int
    message: str
    times: int


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _cond(type_: str, status: bool, reason: str, message: str) -> Json:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": _now()}  # fmt: skip


class FakeKubeApi:
    def __init__(self, *, controllers: bool = True, kubernetes_version: str = "1.31.4",
                 nodes: list[Json] | None = None, graceful_eviction: bool = False) -> None:  # fmt: skip
        self.controllers = controllers
        self.graceful_eviction = graceful_eviction
        self.kubernetes_version = kubernetes_version
        # Node labels the simulated DaemonSet controller schedules onto (nodeSelector is honoured).
        self.nodes = nodes if nodes is not None else [{"kubernetes.io/os": "linux"} for _ in range(3)]
        self.lock = threading.RLock()
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.stalled: set[tuple[str, str, str]] = set()  # (kind, namespace, name)
        self.kinds: dict[tuple[str, str, str], Kind] = {(k.group, k.version, k.plural): k for k in BUILTIN_KINDS}
        self.store: dict[tuple[str, str, str, str], Stored] = {}  # (group, plural, namespace, name) ->
        self._rv = itertools.count(100)
        self._ips = itertools.count(10)
        self._server: ThreadingHTTPServer | None = None
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self._system_create(self._kind("", "Namespace"), {"metadata": {"name": ns}})

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeKubeApi:
        self._server = start_json_server(
            lambda req: self.handle(req.method, req.path, req.headers.get("Content-Type") or "", req.body,
                                    req.headers.get("User-Agent") or ""),
            "fake-k8s")  # fmt: skip
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_server(self._server)
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def api_client(self) -> ApiClient:
        """An official-client ApiClient pointed at this server (what `client_for` returns in tests)."""
        cfg = Configuration()
        cfg.host = self.url
        return ApiClient(cfg)

    # ------------------------------------------------------------------ test controls and views
    def fail(self, method: str, pattern: str, code: int = 500, message: str = "injected", times: int = 1) -> None:
        """Answer the next `times` requests matching (method, path regex) with this error."""
        with self.lock:
            self.faults.append(Fault(method, re.compile(pattern), code, message, times))

    def calls(self, method: str | None = None, pattern: str = "") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and re.search(pattern, r.path)]  # fmt: skip

    def writes(self) -> list[Recorded]:
        """Requests that may change something (PATCH, PUT, POST, DELETE)."""
        return [r for r in self.calls() if r.method != "GET"]

    def get(self, kind: str, name: str, namespace: str | None = None) -> Json | None:
        """The stored object (a copy, with managedFields), by kind name; None when absent."""
        with self.lock:
            k = self._kind_named(kind)
            stored = self.store.get((k.group, k.plural, namespace or "", name))
            return self._render(stored, k) if stored else None

    def objects(self, kind: str, label_selector: str = "") -> list[Json]:
        with self.lock:
            k = self._kind_named(kind)
            match = label_matcher(label_selector)
            return [self._render(s, k) for key, s in sorted(self.store.items())
                    if key[:2] == (k.group, k.plural) and match(s.obj["metadata"].get("labels") or {})]  # fmt: skip

    def resource_version(self, kind: str, name: str, namespace: str | None = None) -> str | None:
        obj = self.get(kind, name, namespace)
        return obj["metadata"]["resourceVersion"] if obj else None

    def managers(self, kind: str, name: str, namespace: str | None = None) -> dict[str, set[str]]:
        """manager -> the field paths it owns (as the API prints them), across its operations."""
        with self.lock:
            k = self._kind_named(kind)
            stored = self.store[(k.group, k.plural, namespace or "", name)]
            out: dict[str, set[str]] = {}
            for (manager, _op), fs in stored.fields.items():
                out.setdefault(manager, set()).update(path_str(p) for p in fs.paths)
            return out

    def stall(self, kind: str, name: str, namespace: str | None = None) -> None:
        """Keep this workload from becoming available (controllers=True); marks it unavailable now."""
        with self.lock:
            self.stalled.add((kind, namespace or "", name))
            self._reconcile_named(kind, name, namespace)

    def recover(self, kind: str, name: str, namespace: str | None = None) -> None:
        with self.lock:
            self.stalled.discard((kind, namespace or "", name))
            self._reconcile_named(kind, name, namespace)

    def seed(self, obj: Json) -> Json:
        """Store `obj` as the cluster's own components would have made it: its namespace is created if needed,
        metadata.ownerReferences and `status` are kept as given, and no request is recorded."""
        with self.lock:
            group, _, version = obj["apiVersion"].rpartition("/")
            kind = next(k for k in self.kinds.values() if (k.group, k.version, k.kind) == (group, version, obj["kind"]))
            ns = obj["metadata"].get("namespace", "default") if kind.namespaced else ""
            if kind.namespaced and ("", "namespaces", "", ns) not in self.store:
                self._system_create(self._kind("", "Namespace"), {"metadata": {"name": ns}})
            self._create(kind, ns, {k: v for k, v in obj.items() if k != "status"}, "seed")
            key = (kind.group, kind.plural, ns, obj["metadata"]["name"])
            if "status" in obj:
                self._set_status(key, copy.deepcopy(obj["status"]))
            return self._render(self.store[key], kind)

    def reap(self) -> list[str]:
        """The kubelets finish every terminating pod (graceful_eviction): they are gone. Returns "ns/name"s."""
        with self.lock:
            pod = self._kind("", "Pod")
            gone = [key for key, s in sorted(self.store.items())
                    if key[:2] == ("", "pods") and s.obj["metadata"].get("deletionTimestamp")]  # fmt: skip
            for key in gone:
                self._delete(pod, key)
            return [f"{key[2]}/{key[3]}" for key in gone]

    def served(self) -> set[str]:
        """'<apiVersion> <Kind>' for every kind discovery lists."""
        with self.lock:
            return {f"{k.api_version} {k.kind}" for k in self.kinds.values()}

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, raw_path: str, content_type: str, raw_body: bytes,
               user_agent: str = "") -> tuple[int, Json]:  # fmt: skip
        parts = urlsplit(raw_path)
        path = unquote(parts.path)
        query = dict(parse_qsl(parts.query))
        ctype = content_type.split(";")[0].strip().lower()
        with self.lock:
            record = Recorded(method, path, query, ctype, None)
            self.requests.append(record)
            try:
                body = _decode(raw_body, ctype)
                record.body = copy.deepcopy(body)
                for fault in self.faults:
                    if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                        fault.times -= 1
                        raise ApiError(fault.code, "InternalError" if fault.code >= 500 else "BadRequest",
                                       fault.message)  # fmt: skip
                default_manager = (user_agent.split("/")[0] or "unknown")
                answer: tuple[int, Json] = self._route(method, path, query, ctype, body, default_manager)
            except yaml.YAMLError as exc:
                answer = 400, ApiError(400, "BadRequest", f"error decoding body: {exc}").status()
            except ApiError as exc:
                answer = exc.code, exc.status()
            record.status = answer[0]
            return answer

    def _route(self, method: str, path: str, query: dict[str, str], ctype: str, body: Any,
               default_manager: str) -> tuple[int, Json]:  # fmt: skip
        parts = [p for p in path.split("/") if p]
        if parts == ["version"] and method == "GET":
            major, minor, _ = self.kubernetes_version.split(".")
            return 200, {"major": major, "minor": minor, "gitVersion": f"v{self.kubernetes_version}",
                         "platform": "linux/amd64", "goVersion": "go1.22.0"}  # fmt: skip
        if not parts or parts[0] not in ("api", "apis"):
            raise NO_RESOURCE
        if parts[0] == "api":
            if len(parts) == 1:
                return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) == 1:
                return 200, self._group_list()
            if len(parts) == 2:
                raise NO_RESOURCE
            group, version, rest = parts[1], parts[2], parts[3:]
        if not rest:
            return 200, self._resource_list(group, version)
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        kind = self.kinds.get((group, version, rest[0]))
        if kind is None or len(rest) > 3:
            raise NO_RESOURCE
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if namespace is not None and not kind.namespaced:
            raise NO_RESOURCE
        if sub == "eviction" and kind.kind == "Pod" and name is not None and namespace is not None:
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on pods/eviction")
            return 201, self._evict(namespace, name, body)
        if sub is not None and (sub != "status" or not kind.status):
            raise NO_RESOURCE
        if name is not None and kind.namespaced and namespace is None:
            raise NO_RESOURCE
        ns = namespace or ""
        if name is None:
            if method == "GET":
                return 200, self._list(kind, namespace, query)
            if method == "POST":
                return 201, self._create(kind, ns, body, query.get("fieldManager") or default_manager)
            if method == "DELETE":
                return 200, self._delete_collection(kind, namespace, query)
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        key = (kind.group, kind.plural, ns, name)
        if sub == "status":
            return 200, self._status(kind, key, method, ctype, body)
        if method == "GET":
            stored = self.store.get(key)
            if stored is None:
                raise _not_found(kind, name)
            return 200, self._render(stored, kind)
        if method == "DELETE":
            return 200, self._delete(kind, key)
        if method == "PATCH" and ctype == "application/apply-patch+yaml":
            manager = query.get("fieldManager")
            if not manager:
                raise ApiError(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: "
                                                  "Required value: is required for apply patch")  # fmt: skip
            force = query.get("force", "").lower() in ("true", "1")
            return 200, self._apply(kind, key, body, manager, force)
        if method == "PATCH" and ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            stored = self.store.get(key)
            if stored is None:
                raise _not_found(kind, name)
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be an object")
            new = merge_patch(stored.obj, {k: v for k, v in body.items() if k != "status"},
                              strategic=ctype.startswith("application/strategic"))  # fmt: skip
            new["metadata"] = {**stored.obj["metadata"], **{k: v for k, v in (new.get("metadata") or {}).items()
                                                            if k in ("labels", "annotations")}}  # fmt: skip
            for k in ("labels", "annotations"):
                if k not in (new.get("metadata") or {}) or not new["metadata"][k]:
                    new["metadata"].pop(k, None)
            return 200, self._write_update(kind, key, new, query.get("fieldManager") or default_manager)
        if method == "PATCH":
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}")
        if method == "PUT":
            stored = self.store.get(key)
            if stored is None:
                raise _not_found(kind, name)
            self._check_body(kind, ns, name, body)
            self._check_rv(stored, body)
            new = {k: v for k, v in body.items() if k not in ("status",)}
            new["metadata"] = {**stored.obj["metadata"], **{k: v for k, v in body["metadata"].items()
                                                            if k in ("labels", "annotations")}}  # fmt: skip
            for k in ("labels", "annotations"):
                if k not in body["metadata"]:
                    new["metadata"].pop(k, None)
            if "status" in stored.obj:
                new["status"] = stored.obj["status"]
            return 200, self._write_update(kind, key, new, query.get("fieldManager") or default_manager)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    # ------------------------------------------------------------------ discovery
    def _group_list(self) -> Json:
        versions: dict[str, list[str]] = {}
        for group, version, _plural in self.kinds:
            if group and version not in versions.setdefault(group, []):
                versions[group].append(version)
        groups = []
        for group, vs in sorted(versions.items()):
            entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in vs]
            groups.append({"name": group, "versions": entries, "preferredVersion": entries[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def _resource_list(self, group: str, version: str) -> Json:
        kinds = [k for (g, v, _p), k in sorted(self.kinds.items()) if (g, v) == (group, version)]
        if not kinds:
            raise NO_RESOURCE
        resources: list[Json] = []
        for k in kinds:
            entry: Json = {"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind,
                           "verbs": ALL_VERBS}  # fmt: skip
            if k.short:
                entry["shortNames"] = list(k.short)
            resources.append(entry)
            if k.status:
                resources.append({"name": f"{k.plural}/status", "singularName": "", "namespaced": k.namespaced,
                                  "kind": k.kind, "verbs": ["get", "patch", "update"]})  # fmt: skip
            if k.kind == "Pod" and not k.group:
                resources.append({"name": "pods/eviction", "singularName": "", "namespaced": True, "group": "policy",
                                  "version": "v1", "kind": "Eviction", "verbs": ["create"]})  # fmt: skip
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}

    def _kind(self, group: str, kind: str) -> Kind:
        for k in self.kinds.values():
            if (k.group, k.kind) == (group, kind):
                return k
        raise KeyError(f"{group}/{kind}")

    def _kind_named(self, kind: str) -> Kind:
        found = [k for k in self.kinds.values() if k.kind == kind]
        if not found:
            raise KeyError(kind)
        return found[0]

    # ------------------------------------------------------------------ reads
    def _render(self, stored: Stored, kind: Kind) -> Json:
        obj = copy.deepcopy(stored.obj)
        obj["apiVersion"] = kind.api_version
        managed = [{"manager": m, "operation": op, "apiVersion": fs.api_version, "time": fs.time,
                    "fieldsType": "FieldsV1", "fieldsV1": fields_v1(fs.paths)}
                   for (m, op), fs in stored.fields.items()]  # fmt: skip
        if managed:
            obj["metadata"]["managedFields"] = managed
        return obj

    def _matching(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> list[tuple[Any, Stored]]:
        match = label_matcher(query.get("labelSelector", ""))
        fields: dict[str, str] = {}
        for req in _split_selector(query.get("fieldSelector", "")):
            f, _, v = req.partition("=")
            if f not in ("metadata.name", "metadata.namespace"):
                raise ApiError(400, "BadRequest", f'field label not supported: "{f}"')
            fields[f] = v.lstrip("=")
        out = []
        for key, stored in sorted(self.store.items()):
            if key[:2] != (kind.group, kind.plural) or (namespace is not None and key[2] != namespace):
                continue
            meta = stored.obj["metadata"]
            if "metadata.name" in fields and meta["name"] != fields["metadata.name"]:
                continue
            if "metadata.namespace" in fields and meta.get("namespace", "") != fields["metadata.namespace"]:
                continue
            if match(meta.get("labels") or {}):
                out.append((key, stored))
        return out

    def _list(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> Json:
        items = []
        for _key, stored in self._matching(kind, namespace, query):
            item = self._render(stored, kind)
            if kind.crd is None:  # built-in lists carry no apiVersion/kind per item, as on a real API server
                item.pop("apiVersion", None)
                item.pop("kind", None)
            items.append(item)
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(self._peek_rv())}, "items": items}  # fmt: skip

    def _peek_rv(self) -> int:
        return max([int(s.obj["metadata"]["resourceVersion"]) for s in self.store.values()] or [0])

    # ------------------------------------------------------------------ validation
    def _check_body(self, kind: Kind, ns: str, name: str | None, body: Any) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        if body.get("apiVersion") != kind.api_version or body.get("kind") != kind.kind:
            raise ApiError(400, "BadRequest", f"the API version in the data ({body.get('apiVersion')}) and kind "
                                              f"({body.get('kind')}) do not match the expected "
                                              f"{kind.api_version} {kind.kind}")  # fmt: skip
        meta = body.get("metadata")
        if not isinstance(meta, dict) or not meta.get("name"):
            raise _invalid(kind, "", [("metadata.name", "Required value: name or generateName is required")])
        if name is not None and meta["name"] != name:
            raise ApiError(400, "BadRequest", f"the name of the object ({meta['name']}) does not match the name "
                                              f"on the URL ({name})")  # fmt: skip
        if kind.namespaced and meta.get("namespace") not in (None, "", ns):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                              "sent on the request")  # fmt: skip
        problems: list[tuple[str, str]] = []
        if bad_name := _name_problem(kind, meta["name"]):
            problems.append(("metadata.name", f"Invalid value: {meta['name']!r}: {bad_name}"))
        for k, v in (meta.get("labels") or {}).items():
            prefix, _, label = str(k).rpartition("/")
            if not LABEL_NAME.fullmatch(label) or len(label) > 63 or (prefix and not DNS_SUBDOMAIN.fullmatch(prefix)):
                problems.append(("metadata.labels", f"Invalid value: {k!r}: name part must be a valid label key"))
            if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.fullmatch(v):
                problems.append(("metadata.labels", f"Invalid value: {v!r}: a valid label value must be 63 "
                                                     "characters or less, alphanumerics, '-', '_' or '.'"))  # fmt: skip
        for k, v in (meta.get("annotations") or {}).items():
            if not isinstance(v, str):
                problems.append(("metadata.annotations", f"Invalid value: annotation {k!r} must be a string"))
        if kind.kind == "CustomResourceDefinition":
            spec = body.get("spec") or {}
            expected = f"{(spec.get('names') or {}).get('plural')}.{spec.get('group')}"
            if meta["name"] != expected:
                problems.append(("metadata.name", f"Invalid value: {meta['name']!r}: must be spec.names.plural+"
                                                  f"\".\"+spec.group ({expected})"))  # fmt: skip
            if spec.get("scope") not in ("Namespaced", "Cluster"):
                problems.append(("spec.scope", "Unsupported value: must be Namespaced or Cluster"))
            if not any(v.get("storage") for v in spec.get("versions") or []):
                problems.append(("spec.versions", "Invalid value: must have exactly one version marked as storage"))
        if problems:
            raise _invalid(kind, meta["name"], problems)
        if kind.namespaced and ("", "namespaces", "", ns) not in self.store:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})

    @staticmethod
    def _check_rv(stored: Stored, body: Json) -> None:
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != stored.obj["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "Operation cannot be fulfilled: the object has been modified; please "
                                            "apply your changes to the latest version and try again")  # fmt: skip

    # ------------------------------------------------------------------ writes
    def _new_object(self, kind: Kind, ns: str, body: Json) -> Json:
        meta: Json = {"name": body["metadata"]["name"]}
        if kind.namespaced:
            meta["namespace"] = ns
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1, resourceVersion="0")
        return {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta}

    def _apply(self, kind: Kind, key: tuple[str, str, str, str], body: Any, manager: str, force: bool) -> Json:
        ns, name = key[2], key[3]
        self._check_body(kind, ns, name, body)
        stored = self.store.get(key)
        if stored is not None:
            self._check_rv(stored, body)
        live = stored.obj if stored else self._new_object(kind, ns, body)
        fields = _copy_fields(stored)
        live_flat = flatten(tracked(live))
        desired = flatten(tracked(body))
        # Conflicts: another manager owns an overlapping field and the value would change.
        conflicts: list[tuple[str, str, Path]] = []
        for (other, op), fs in fields.items():
            if (other, op) == (manager, "Apply"):
                continue
            for q in fs.paths:
                for p, v in desired.items():
                    clash = (p == q and live_flat.get(p, _MISSING) != v) \
                        or (_prefix(q, p) and live_flat.get(q, _MISSING) != {}) \
                        or (_prefix(p, q) and v != {})  # fmt: skip
                    if clash:
                        conflicts.append((other, op, q))
                        break
        if conflicts and not force:
            causes = [{"reason": "FieldManagerConflict", "message": f'conflict with "{m}"' + (
                f" using {fields[(m, op)].api_version}" if op == "Update" else ""), "field": path_str(q)}
                for m, op, q in conflicts]  # fmt: skip
            if len(causes) == 1:
                message = f"Apply failed with 1 conflict: {causes[0]['message']}: {causes[0]['field']}"
            else:
                message = f"Apply failed with {len(causes)} conflicts: " + "\n".join(
                    f"{c['message']}: {c['field']}" for c in causes)  # fmt: skip
            raise ApiError(409, "Conflict", message, {"causes": causes})
        for other, op, q in conflicts:  # forced: the applier takes these fields over
            fields[(other, op)].paths.discard(q)
        mine = fields.get((manager, "Apply"))
        previously = mine.paths if mine else set()
        owned_by_others = {q for k, fs in fields.items() if k != (manager, "Apply") for q in fs.paths}
        new_flat = dict(live_flat)
        # Fields the applier no longer declares go away, unless someone else still owns them.
        for p in previously - set(desired):
            if not any(_overlaps(p, q) for q in owned_by_others):
                for r in [r for r in new_flat if r == p or _prefix(p, r)]:
                    del new_flat[r]
        for p, v in desired.items():
            for r in [r for r in new_flat if _prefix(r, p) or (_prefix(p, r) and v != {})]:
                del new_flat[r]
            if v != {} or not any(_prefix(p, r) for r in new_flat):
                new_flat[p] = v
        fields[(manager, "Apply")] = FieldSet(kind.api_version, set(desired), _now())
        if mine and mine.paths == set(desired):
            fields[(manager, "Apply")].time = mine.time
        new = self._rebuild(live, new_flat)
        return self._commit(kind, key, stored, new, fields)

    def _write_update(self, kind: Kind, key: tuple[str, str, str, str], new: Json, manager: str) -> Json:
        """An Update operation (merge patch, PUT, POST, a controller): takes the fields it changes."""
        stored = self.store.get(key)
        old_flat = flatten(tracked(stored.obj)) if stored else {}
        new_flat = flatten(tracked(new))
        changed = {p for p, v in new_flat.items() if old_flat.get(p, _MISSING) != v}
        fields = _copy_fields(stored)
        for fs in fields.values():
            fs.paths = {q for q in fs.paths if not any(_overlaps(q, p) for p in changed)}
        if changed:
            entry = fields.setdefault((manager, "Update"), FieldSet(kind.api_version, set(), _now()))
            entry.paths |= changed
            entry.time = _now()
        return self._commit(kind, key, stored, new, fields)

    def _rebuild(self, live: Json, flat: dict[Path, Any]) -> Json:
        content = unflatten(flat)
        new = {k: copy.deepcopy(v) for k, v in live.items() if k in ("apiVersion", "kind", "metadata", "status")}
        new["metadata"] = dict(new["metadata"])
        for k in ("labels", "annotations"):
            new["metadata"].pop(k, None)
        for k, v in content.items():
            if k == "metadata":
                new["metadata"].update(v)
            else:
                new[k] = v
        return new

    def _commit(self, kind: Kind, key: tuple[str, str, str, str], stored: Stored | None, new: Json,
                fields: dict[tuple[str, str], FieldSet]) -> Json:  # fmt: skip
        self._default(kind, new)
        present = flatten(tracked(new))
        for k in list(fields):
            fields[k].paths = {p for p in fields[k].paths if p in present or any(_prefix(p, r) for r in present)}
            if not fields[k].paths:
                del fields[k]
        if stored is not None:
            same_content = _content(stored.obj) == _content(new) and stored.obj["metadata"] == new["metadata"]
            same_fields = {k: v.paths for k, v in stored.fields.items()} == {k: v.paths for k, v in fields.items()}
            if same_content and same_fields:
                return self._render(stored, kind)  # nothing changed: no write, same resourceVersion
            if _content(stored.obj) != _content(new):
                new["metadata"]["generation"] = int(stored.obj["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = str(next(self._rv))
        result = Stored(kind, new, fields)
        self.store[key] = result
        self._after_write(result)
        return self._render(self.store[key], kind)

    def _create(self, kind: Kind, ns: str, body: Any, manager: str) -> Json:
        self._check_body(kind, ns, None, body)
        key = (kind.group, kind.plural, ns, body["metadata"]["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{kind.plural} "{key[3]}" already exists',
                           {"name": key[3], "group": kind.group, "kind": kind.plural})  # fmt: skip
        new = self._new_object(kind, ns, body)
        new.update(copy.deepcopy(_content(body)))
        for k in ("labels", "annotations", "ownerReferences"):
            if body["metadata"].get(k):
                new["metadata"][k] = copy.deepcopy(body["metadata"][k])
        return self._write_update(kind, key, new, manager)

    def _system_create(self, kind: Kind, body: Json) -> None:
        key = (kind.group, kind.plural, "", body["metadata"]["name"])
        new = self._new_object(kind, "", {"metadata": body["metadata"]})
        self._commit(kind, key, None, new, {})

    def _delete(self, kind: Kind, key: tuple[str, str, str, str]) -> Json:
        stored = self.store.pop(key, None)
        if stored is None:
            raise _not_found(kind, key[3])
        if kind.kind == "Namespace":  # what the namespace controller does when the namespace finalizes
            for other in [k for k in self.store if k[2] == key[3]]:
                del self.store[other]
        if kind.kind == "CustomResourceDefinition":
            self._unregister(stored.obj["metadata"]["name"])
        self._sync_endpoints(key[2])
        if kind.kind == "Pod":
            self._sync_budgets(key[2])
        details = {"name": key[3], "group": kind.group, "kind": kind.plural, "uid": stored.obj["metadata"]["uid"]}
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def _delete_collection(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> Json:
        for key, _stored in self._matching(kind, namespace, query):
            self._delete(kind, key)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

    def _status(self, kind: Kind, key: tuple[str, str, str, str], method: str, ctype: str, body: Any) -> Json:
        stored = self.store.get(key)
        if stored is None:
            raise _not_found(kind, key[3])
        if method == "GET":
            return self._render(stored, kind)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        if method == "PATCH" and ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            status = merge_patch(stored.obj.get("status") or {}, body.get("status") or {},
                                 strategic=ctype.startswith("application/strategic"))  # fmt: skip
        elif (method == "PATCH" and ctype == "application/apply-patch+yaml") or method == "PUT":
            status = copy.deepcopy(body.get("status") or {})
        else:
            raise ApiError(415, "UnsupportedMediaType", f"unsupported: {method} {ctype}")
        self._set_status(key, status)
        return self._render(self.store[key], kind)

    def _set_status(self, key: tuple[str, str, str, str], status: Json) -> None:
        stored = self.store[key]
        if stored.obj.get("status") == status:
            return
        stored.obj["status"] = status
        stored.obj["metadata"]["resourceVersion"] = str(next(self._rv))
        if stored.kind.kind == "CustomResourceDefinition":
            self._register_if_established(stored)
        if stored.kind.kind in WORKLOADS:
            self._sync_endpoints(key[2])
        if stored.kind.kind == "Pod":
            self._sync_budgets(key[2])

    # ------------------------------------------------------------------ defaults (what admission/defaulting adds)
    def _default(self, kind: Kind, obj: Json) -> None:
        meta = obj["metadata"]
        if kind.kind == "Namespace":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("status", {"phase": "Active"})
        elif kind.kind == "Deployment":
            spec = obj.setdefault("spec", {})
            spec.setdefault("replicas", 1)
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("progressDeadlineSeconds", 600)
        elif kind.kind == "DaemonSet":
            obj.setdefault("spec", {}).setdefault("revisionHistoryLimit", 10)
        elif kind.kind == "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
                n = next(self._ips)
                spec["clusterIP"] = f"10.96.{n // 250}.{n % 250 + 1}"
                spec["clusterIPs"] = [spec["clusterIP"]]
            for port in spec.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
                    port.setdefault("targetPort", port.get("port"))

    # ------------------------------------------------------------------ CRDs
    def _register_if_established(self, stored: Stored) -> None:
        crd = stored.obj
        conditions = (crd.get("status") or {}).get("conditions") or []
        established = any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)
        self._unregister(crd["metadata"]["name"])
        if not established:
            return
        spec, names = crd["spec"], crd["spec"]["names"]
        for v in spec.get("versions") or []:
            if v.get("served", True):
                k = Kind(spec["group"], v["name"], names["kind"], names["plural"], spec["scope"] == "Namespaced",
                         "status" in (v.get("subresources") or {}), tuple(names.get("shortNames") or ()),
                         crd["metadata"]["name"])  # fmt: skip
                self.kinds[(k.group, k.version, k.plural)] = k

    def _unregister(self, crd_name: str) -> None:
        for key in [key for key, k in self.kinds.items() if k.crd == crd_name]:
            del self.kinds[key]
        if not any(s.kind.crd == crd_name for s in self.store.values()):
            return
        crd = self.store.get(("apiextensions.k8s.io", "customresourcedefinitions", "", crd_name))
        if crd is None:  # the CRD itself is gone: so are its objects
            for stored_key in [k for k, s in self.store.items() if s.kind.crd == crd_name]:
                del self.store[stored_key]

    # ------------------------------------------------------------------ simulated controllers
    def _after_write(self, stored: Stored) -> None:
        kind = stored.kind.kind
        if kind == "CustomResourceDefinition":
            if self.controllers and not self._is_stalled(stored):
                status = copy.deepcopy(stored.obj.get("status") or {})
                names = stored.obj["spec"]["names"]
                status["acceptedNames"] = {k: names[k] for k in ("kind", "plural", "singular", "listKind", "shortNames")
                                           if k in names}  # fmt: skip
                status["storedVersions"] = [v["name"] for v in stored.obj["spec"]["versions"] if v.get("storage")]
                if not any(c.get("type") == "Established" and c.get("status") == "True"
                           for c in status.get("conditions") or []):  # fmt: skip
                    status["conditions"] = [
                        _cond("NamesAccepted", True, "NoConflicts", "no conflicts found"),
                        _cond("Established", True, "InitialNamesAccepted", "the initial names have been accepted")]
                crd_key = ("apiextensions.k8s.io", "customresourcedefinitions", "", stored.obj["metadata"]["name"])
                self._set_status(crd_key, status)
            self._register_if_established(stored)
        elif kind in WORKLOADS and self.controllers:
            self._rollout(stored)
        elif kind in WEBHOOK_KINDS and self.controllers:
            self._inject_ca(stored)
        if kind in (*WORKLOADS, "Service"):
            self._sync_endpoints(stored.obj["metadata"].get("namespace", ""))
        if kind in ("Pod", "PodDisruptionBudget"):
            self._sync_budgets(stored.obj["metadata"].get("namespace", ""))

    def _is_stalled(self, stored: Stored) -> bool:
        meta = stored.obj["metadata"]
        return (stored.kind.kind, meta.get("namespace", ""), meta["name"]) in self.stalled

    def _reconcile_named(self, kind: str, name: str, namespace: str | None) -> None:
        k = self._kind_named(kind)
        stored = self.store.get((k.group, k.plural, namespace or "", name))
        if stored is None:
            return
        if kind == "CustomResourceDefinition" and self._is_stalled(stored):
            self._set_status((k.group, k.plural, "", name), {})
            return
        self._after_write(stored)

    def _rollout(self, stored: Stored) -> None:
        obj, meta = stored.obj, stored.obj["metadata"]
        gen = meta.get("generation", 1)
        spec = obj.get("spec") or {}
        ok = not self._is_stalled(stored)
        key = (stored.kind.group, stored.kind.plural, meta.get("namespace", ""), meta["name"])
        if stored.kind.kind == "DaemonSet":
            selector = ((spec.get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
            n = sum(1 for labels in self.nodes if all(labels.get(k) == v for k, v in selector.items()))
            status: Json = {"observedGeneration": gen, "desiredNumberScheduled": n, "currentNumberScheduled": n,
                            "updatedNumberScheduled": n, "numberMisscheduled": 0,
                            "numberReady": n if ok else 0, "numberAvailable": n if ok else 0}  # fmt: skip
            if not ok and n:
                status["numberUnavailable"] = n
        else:
            n = int(spec.get("replicas", 1))
            status = {"observedGeneration": gen, "replicas": n, "updatedReplicas": n}
            if ok:
                status.update(readyReplicas=n, availableReplicas=n)
            elif n:
                status["unavailableReplicas"] = n
            if stored.kind.kind == "Deployment":
                status["conditions"] = [
                    _cond("Available", True, "MinimumReplicasAvailable", "Deployment has minimum availability.") if ok
                    else _cond("Available", False, "MinimumReplicasUnavailable",
                               "Deployment does not have minimum availability."),
                    _cond("Progressing", True, "NewReplicaSetAvailable" if ok else "ReplicaSetUpdated",
                          f'ReplicaSet "{meta["name"]}-5d8f7c" has successfully progressed.' if ok
                          else f'ReplicaSet "{meta["name"]}-5d8f7c" is progressing.')]  # fmt: skip
        old = copy.deepcopy(obj.get("status") or {})
        for c_old, c_new in zip(old.get("conditions") or [], status.get("conditions") or [], strict=False):
            if (c_old.get("type"), c_old.get("status")) == (c_new["type"], c_new["status"]):
                c_new["lastTransitionTime"] = c_old.get("lastTransitionTime")
        self._set_status(key, status)

    def _inject_ca(self, stored: Stored) -> None:
        annotations = stored.obj["metadata"].get("annotations") or {}
        if not any(a in annotations for a in CA_INJECT_ANNOTATIONS):
            return
        new = copy.deepcopy(stored.obj)
        changed = False
        for hook in new.get("webhooks") or []:
            cc = hook.get("clientConfig") or {}
            if cc.get("service") and not cc.get("caBundle"):
                digest = hashlib.sha256(stored.obj["metadata"]["name"].encode()).digest()
                pem = "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(digest * 4).decode() + \
                    "\n-----END CERTIFICATE-----\n"  # fmt: skip
                cc["caBundle"] = base64.b64encode(pem.encode()).decode()
                changed = True
        if changed:
            key = (stored.kind.group, stored.kind.plural, "", stored.obj["metadata"]["name"])
            self._write_update(stored.kind, key, new, "cainjector")

    def _available(self, stored: Stored) -> bool:
        status = stored.obj.get("status") or {}
        if stored.kind.kind == "DaemonSet":
            return int(status.get("numberAvailable") or 0) > 0
        return int(status.get("availableReplicas") or status.get("readyReplicas") or 0) > 0

    def _sync_endpoints(self, namespace: str) -> None:
        """The EndpointSlice controller: a Service's slice lists ready endpoints of available matching workloads."""
        if not self.controllers or not namespace:
            return
        slice_kind = self._kind("discovery.k8s.io", "EndpointSlice")
        workloads = [s for (g, p, ns, _n), s in self.store.items() if ns == namespace and s.kind.kind in WORKLOADS]
        services = [s for (g, p, ns, _n), s in list(self.store.items()) if ns == namespace and s.kind.kind == "Service"]
        for svc in services:
            selector = (svc.obj.get("spec") or {}).get("selector") or {}
            if not selector:
                continue
            endpoints = []
            for w in workloads:
                labels = ((((w.obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels")
                          or {})  # fmt: skip
                if all(labels.get(k) == v for k, v in selector.items()) and self._available(w):
                    n = int(hashlib.sha256(w.obj["metadata"]["uid"].encode()).hexdigest()[:4], 16)
                    endpoints.append({"addresses": [f"10.244.{n // 256}.{n % 256}"], "conditions": {"ready": True},
                                      "targetRef": {"kind": "Pod", "namespace": namespace,
                                                    "name": f"{w.obj['metadata']['name']}-0"}})  # fmt: skip
            name = f"{svc.obj['metadata']['name']}-fake"
            key = (slice_kind.group, slice_kind.plural, namespace, name)
            ports = [p for p in (svc.obj.get("spec") or {}).get("ports") or [] if isinstance(p, dict)]
            body = {"addressType": "IPv4", "endpoints": endpoints,
                    "ports": [{"name": str(p.get("name", "")), "port": p.get("targetPort", p.get("port")),
                               "protocol": p.get("protocol", "TCP")} for p in ports]}  # fmt: skip
            existing = self.store.get(key)
            if existing is None:
                new = self._new_object(slice_kind, namespace, {"metadata": {"name": name}})
            else:
                new = copy.deepcopy(existing.obj)
            new["metadata"]["labels"] = {"kubernetes.io/service-name": svc.obj["metadata"]["name"],
                                         "endpointslice.kubernetes.io/managed-by": ENDPOINTSLICE_MANAGER}
            new.update(body)
            if existing is None or existing.obj != new:
                self._write_update(slice_kind, key, new, "endpointslice-controller")


    # ------------------------------------------------------------------ evictions and disruption budgets
    def _pods_in(self, namespace: str) -> list[Json]:
        return [s.obj for key, s in sorted(self.store.items()) if key[:3] == ("", "pods", namespace)]

    def _budgets_in(self, namespace: str) -> list[tuple[tuple[str, str, str, str], Json]]:
        return [(key, s.obj) for key, s in sorted(self.store.items())
                if key[:3] == ("policy", "poddisruptionbudgets", namespace)]  # fmt: skip

    def _budget_status(self, pdb: Json, old: Json | None = None) -> Json:
        """The disruption controller's view of a budget, counted from the pods there are now."""
        spec = pdb.get("spec") or {}
        pods = [p for p in self._pods_in(pdb["metadata"]["namespace"])
                if _selects(spec.get("selector"), p["metadata"].get("labels") or {}, empty_matches_all=True)]
        expected = sum((p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") for p in pods)
        healthy = sum(_pod_ready(p) and not p["metadata"].get("deletionTimestamp") for p in pods)
        try:
            if spec.get("maxUnavailable") is not None:
                desired = max(0, expected - _scaled(spec["maxUnavailable"], expected))
            else:
                desired = _scaled(spec.get("minAvailable", 0), expected)
        except ValueError:
            desired = expected  # a value the controller cannot read: no disruption is allowed
        allowed = max(0, healthy - desired)
        cond = _cond("DisruptionAllowed", allowed > 0, "SufficientPods" if allowed else "InsufficientPods", "")
        for c in (old or {}).get("conditions") or []:
            if c.get("type") == cond["type"] and c.get("status") == cond["status"]:
                cond["lastTransitionTime"] = c.get("lastTransitionTime")
        return {"observedGeneration": pdb["metadata"].get("generation", 1), "disruptionsAllowed": allowed,
                "currentHealthy": healthy, "desiredHealthy": desired, "expectedPods": expected,
                "conditions": [cond]}  # fmt: skip

    def _sync_budgets(self, namespace: str) -> None:
        if not self.controllers or not namespace:
            return
        for key, pdb in self._budgets_in(namespace):
            status = self._budget_status(pdb, pdb.get("status"))
            if status != pdb.get("status"):
                self._set_status(key, status)

    def _evict(self, namespace: str, name: str, body: Any) -> Json:
        """pods/<name>/eviction, decided as the API server does (see the module docstring)."""
        # Without apiVersion/kind the endpoint's own kind is assumed, as the API server decodes it.
        if not isinstance(body, dict) or body.get("kind", "Eviction") != "Eviction" \
                or body.get("apiVersion", "policy/v1") not in ("policy/v1", "policy/v1beta1"):  # fmt: skip
            raise ApiError(400, "BadRequest", "the body must be a policy/v1 Eviction")
        meta = body.get("metadata") or {}
        if meta.get("name") != name:
            raise ApiError(400, "BadRequest", "name in URL does not match name in Eviction object")
        if meta.get("namespace") not in (None, "", namespace):
            raise ApiError(400, "BadRequest", "namespace in URL does not match namespace in Eviction object")
        pod_kind = self._kind("", "Pod")
        key = ("", "pods", namespace, name)
        stored = self.store.get(key)
        if stored is None:
            raise _not_found(pod_kind, name)
        pod = stored.obj
        if pod["metadata"].get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in (
                "Succeeded", "Failed", "Pending"):  # fmt: skip
            return self._evicted(key)
        labels = pod["metadata"].get("labels") or {}
        budgets = [pdb for _k, pdb in self._budgets_in(namespace)
                   if _selects((pdb.get("spec") or {}).get("selector"), labels, empty_matches_all=False)]  # fmt: skip
        if len(budgets) > 1:
            raise ApiError(500, "InternalError", "This pod has more than one PodDisruptionBudget, which the eviction "
                                                 "subresource does not support.")  # fmt: skip
        if not budgets:
            return self._evicted(key)
        pdb = budgets[0]
        status = self._budget_status(pdb)
        healthy, desired = status["currentHealthy"], status["desiredHealthy"]
        if not _pod_ready(pod) and ((pdb.get("spec") or {}).get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
                                    or healthy >= desired > 0):  # fmt: skip
            return self._evicted(key)
        if status["disruptionsAllowed"] <= 0:
            raise ApiError(429, "TooManyRequests", PDB_REFUSAL, {"causes": [{
                "reason": "DisruptionBudget",
                "message": f"The disruption budget {pdb['metadata']['name']} needs {desired} healthy pods and has "
                           f"{healthy} currently"}]})  # fmt: skip
        return self._evicted(key)

    def _evicted(self, key: tuple[str, str, str, str]) -> Json:
        if self.graceful_eviction:
            stored = self.store[key]
            if not stored.obj["metadata"].get("deletionTimestamp"):
                stored.obj["metadata"]["deletionTimestamp"] = _now()
                stored.obj["metadata"]["deletionGracePeriodSeconds"] = 30
                stored.obj["metadata"]["resourceVersion"] = str(next(self._rv))
                self._sync_budgets(key[2])
        else:
            self._delete(self._kind("", "Pod"), key)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}


def _pod_ready(pod: Json) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _scaled(value: Any, total: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d+%", value):
        return math.ceil(int(value[:-1]) * total / 100)
    raise ValueError(f"invalid value for IntOrString: {value!r}")


def _selects(selector: Json | None, labels: Json, empty_matches_all: bool) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) against labels. The disruption controller lets an empty
    selector match every pod of the namespace (policy/v1); the Eviction API lets it match none."""
    if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        return empty_matches_all and selector is not None
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values, "Exists": key in labels,
              "DoesNotExist": key not in labels}.get(op)  # fmt: skip
        if not ok:
            return False
    return True


def _name_problem(kind: Kind, name: str) -> str | None:
    """The API server's name rule for the kind: RBAC names are path segments (`system:controller:x` is fine),
    Namespaces and Services are DNS labels, everything else a DNS subdomain."""
    if kind.group == "rbac.authorization.k8s.io":
        bad = name in (".", "..") or "/" in name or "%" in name
        return "may not be '.' or '..' and may not contain '/' or '%'" if bad else None
    if kind.kind in ("Namespace", "Service"):
        ok = len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) is not None
        return None if ok else "a lowercase RFC 1123 label must consist of lower case alphanumerics or '-'"
    if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        return "a lowercase RFC 1123 subdomain must consist of lower case alphanumerics, '-' or '.'"
    return None


def _decode(raw: bytes, ctype: str) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        if "yaml" not in ctype:
            raise ApiError(400, "BadRequest", "the body is not valid JSON") from None
        return yaml.safe_load(raw)  # an apply body may be YAML


def _copy_fields(stored: Stored | None) -> dict[tuple[str, str], FieldSet]:
    return {k: FieldSet(fs.api_version, set(fs.paths), fs.time) for k, fs in (stored.fields if stored else {}).items()}


def _content(obj: Json) -> Json:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[FakeKubeApi]:
    """A started fake, stopped afterwards: `with running() as api: ...` (fixtures wrap this)."""
    fake = FakeKubeApi(**kwargs).start()
    try:
        yield fake
    finally:
        fake.stop()


def edit(fake: FakeKubeApi, api_version: str, kind: str, name: str, namespace: str | None, patch: Json,
         manager: str = "kubectl-edit") -> None:  # fmt: skip
    """An edit behind our back (an Update operation, like `kubectl edit`), through the official client."""
    from services.infra_installer.targets.kubernetes import dynamic_client

    dyn = dynamic_client(fake.api_client())
    group, _, version = api_version.rpartition("/")
    resource = dyn.resources.get(prefix="apis" if group else "api", group=group or None, api_version=version,
                                 kind=kind)  # fmt: skip
    dyn.patch(resource, body=patch, name=name, namespace=namespace, content_type="application/merge-patch+json",
              field_manager=manager)  # fmt: skip
