"""The real `KubernetesTarget`: server-side apply through the official `kubernetes` client's DynamicClient.

Built from two functions supplied by the caller:
- `client_for(cluster) -> kubernetes.client.ApiClient`: how to reach a cluster (credentials are resolved
  there). It should return the same ApiClient for a cluster while its credentials are valid (refreshing
  tokens through `Configuration.refresh_api_key_hook`): the adapter keeps one DynamicClient, and so one
  discovery cache, per ApiClient, and builds a new one when it gets a different ApiClient.
- `render(service, version, values, cluster) -> Bundle` (sync or async): the manifests to apply.

Apply (`apply_service`):
1. Render; stamp our ownership labels on every object (managed-by=flotilla, bundle, bundle-version).
2. Record the kinds the bundle uses in its *inventory* (a ConfigMap `flotilla-bundle-<service>` in
   kube-system), as the union of the previous and the new kinds, before anything else is written: if we
   crash half-way, the next run still knows every kind it may have to prune.
3. Server-side apply, one field manager (`FIELD_MANAGER`): CRDs first, then wait until each is Established
   and its kinds are discoverable, then Namespaces, then the rest in bundle order. Objects annotated
   `flotilla.dev/apply-phase: after-health` (bundles/common.py; e.g. a ClusterIssuer that cert-manager's
   webhook must admit) are applied only once the bundle's health gates pass (waiting up to
   `health_timeout_s`, GateTimeout otherwise).
4. Prune: list every kind in the inventory with the bundle's label selector; delete what the new render does
   not contain (ordinary objects, then Namespaces, then CRDs). Then record the new kinds only.
Secrets by reference (bundles/secrets.py): a Secret carrying `flotilla.dev/secret-ref` gets its value from
`resolve_secret(ref)` just before the apply; the value lives only in memory and in the apply request, never
in a log line, an error or a drift report (those name fields, never values).
An unchanged bundle changes nothing: server-side apply of identical content is a no-op on the API server
(same resourceVersion) and nothing is pruned.

When `force` is used: never on the first attempt. An apply answered 409 Conflict (another manager owns a
field we declare with a different value: someone edited our object, e.g. `kubectl edit`) is retried with
`force=True` only when the object is ours — it carries our managed-by and this bundle's label, or our
manager applied it before (ownership_problem). Since we only ever send the fields the bundle declares,
a forced apply can only take back fields the bundle declares, on objects we created: fields other managers
own that the bundle does not mention are never in the request and stay theirs. Objects we did not create
(no labels, never applied by us) or that belong to another bundle are refused with InstallError, never
forced and never pruned. Every forced field is reported (`ApplyReport.forced`) and logged.

Health: the bundle's gates (see k8s_health) are remembered per (cluster, service) and also stored in the
inventory, so any replica can evaluate them after a restart. `wait_healthy` raises `GateTimeout` (a
`HealthTimeout`) naming the object and the reason.

Drift: `detect_drift` compares the desired objects with the live ones on the fields we declare only;
`correct_drift` re-applies (reclaiming fields as above) and returns what it corrected.

Drain (`drain`): one pass of k8s_drain.drain_pass (cordon, evict through the Eviction API within the disruption
budgets) on the cluster's connection.

The client is synchronous: every call runs in a worker thread (asyncio.to_thread), and calls for one
cluster are serialised (the DynamicClient's discovery cache is not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient, LazyDiscoverer
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError, ResourceNotFoundError
from urllib3.exceptions import HTTPError

from services.infra_installer.bundles.common import AFTER_HEALTH, APPLY_PHASE_ANNOTATION
from services.infra_installer.bundles.model import LABEL_BUNDLE, LABEL_MANAGED_BY, MANAGED_BY, Bundle, HealthGate
from services.infra_installer.bundles.secrets import secret_slots, with_secret_value
from services.infra_installer.targets import k8s_health as health
from services.infra_installer.targets.base import (
    FIELD_MANAGER,
    ClusterRef,
    DrainReport,
    HealthTimeout,
    InstallError,
    KubernetesTarget,
)
from services.infra_installer.targets.k8s_drain import drain_pass, uncordon
from services.infra_installer.targets.k8s_objects import (
    CRD_KIND,
    LABEL_INVENTORY,
    BundleError,
    Json,
    ObjectRef,
    bundle_selector,
    drift_paths,
    kinds_of,
    label_value,
    owned_part,
    ownership_problem,
    prepare,
    prune_rank,
    split_kind,
)

log = logging.getLogger("flotilla.infra_installer.kubernetes")

ClientFactory = Callable[[ClusterRef], ApiClient]
Renderer = Callable[[str, str, Mapping[str, Any], ClusterRef], "Bundle | Awaitable[Bundle]"]
# A secret reference ("vault://platform/registry") -> its value. Sync (run in a worker thread) or async.
SecretResolver = Callable[[str], "bytes | Awaitable[bytes]"]

INVENTORY_NAMESPACE = "kube-system"
_CONFLICT_MANAGER = re.compile(r'conflict with "([^"]+)"')


class GateTimeout(HealthTimeout):
    """A health gate did not pass in time. `object` and `reason` are what ClusterInfraFailed reports."""

    def __init__(self, service: str, cluster_id: str, object: str, reason: str, waited_s: float) -> None:
        super().__init__(f"{service} on {cluster_id}: {object}: {reason} (not healthy after {waited_s:g}s)")
        self.service = service
        self.object = object
        self.reason = reason


@dataclass
class ApplyReport:
    """What one apply did, object by object ("Kind ns/name")."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)  # "<object>: <field> (from <manager>)"
    pruned: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.pruned)


@dataclass
class _Inventory:
    version: str | None = None
    kinds: set[str] = field(default_factory=set)
    gates: tuple[HealthGate, ...] | None = None  # None: no inventory (never applied)


@dataclass
class _Conn:
    api: ApiClient
    dyn: DynamicClient
    lock: threading.Lock


class _MemoryDiscoverer(LazyDiscoverer):
    """Discovery cached in memory only: the default writes a file per API host to /tmp, which outlives the
    process and can go stale (CRDs come and go). A kind it has not seen triggers a fresh discovery."""

    def _write_cache(self) -> None:
        pass


def dynamic_client(api: ApiClient) -> DynamicClient:
    """A DynamicClient over `api` whose discovery cache lives in this process only. Makes requests (discovery)."""
    # A cache path that is never written (see _MemoryDiscoverer), so nothing is ever read from disk either.
    cache = os.path.join(tempfile.gettempdir(), f"flotilla-discovery-{uuid.uuid4().hex}.json")
    return DynamicClient(api, cache_file=cache, discoverer=_MemoryDiscoverer)


class _NotServed(Exception):
    pass


def _after_health(obj: Mapping[str, Any]) -> bool:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(APPLY_PHASE_ANNOTATION) == AFTER_HEALTH


def _api_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return f"{exc.status} {exc.reason}: {message}" if message else f"{exc.status} {exc.reason}"


def _conflicts(exc: ApiException) -> list[tuple[str, str]]:
    """(field, manager) pairs of a server-side apply conflict."""
    try:
        causes = (json.loads(exc.body or "{}").get("details") or {}).get("causes") or []
    except (TypeError, ValueError, AttributeError):
        return []
    out = []
    for cause in causes:
        m = _CONFLICT_MANAGER.search(str(cause.get("message", "")))
        out.append((str(cause.get("field", "")), m.group(1) if m else "unknown"))
    return out


class KubernetesApiTarget(KubernetesTarget):
    health_poll_s = 1.0

    def __init__(self, client_for: ClientFactory, render: Renderer, *, resolve_secret: SecretResolver | None = None,
                 crd_timeout_s: float = 60.0, health_timeout_s: float = 300.0, request_timeout_s: float = 30.0,
                 inventory_namespace: str = INVENTORY_NAMESPACE) -> None:  # fmt: skip
        self.client_for = client_for
        self.render = render
        self.resolve_secret = resolve_secret
        self.crd_timeout_s = crd_timeout_s
        self.health_timeout_s = health_timeout_s  # only for objects applied after the health gates
        self.request_timeout_s = request_timeout_s
        self.inventory_namespace = inventory_namespace
        self._conns: dict[str, _Conn] = {}
        self._conns_lock = threading.Lock()
        self._gates: dict[tuple[str, str], tuple[HealthGate, ...]] = {}

    # ================================================================== the port
    async def apply_service(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]) -> None:
        await self.apply(cluster, service, version, values)

    async def service_healthy(self, cluster: ClusterRef, service: str) -> bool:
        return all(r.ok for r in await self.gate_results(cluster, service))

    async def wait_healthy(self, cluster: ClusterRef, service: str, timeout_s: float) -> None:
        """Poll the bundle's gates; on timeout raise GateTimeout naming the first failing object and why."""
        await self._wait_gates(cluster, service, timeout_s)

    async def _wait_gates(self, cluster: ClusterRef, service: str, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            results = await self.gate_results(cluster, service)
            failing = [r for r in results if not r.ok]
            if not failing:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                first = failing[0]
                more = f"; {len(failing) - 1} more gate(s) failing" if len(failing) > 1 else ""
                raise GateTimeout(service, cluster.cluster_id, first.object, first.reason + more, timeout_s)
            await asyncio.sleep(min(self.health_poll_s, remaining))

    async def drain(self, cluster: ClusterRef) -> DrainReport:
        conn = await asyncio.to_thread(self._conn, cluster)
        report: DrainReport = await self._call(conn, cluster, self._drain_pass, cluster.cluster_id)
        if report.evicted or report.cordoned:
            log.info("drain pass on %s: %d nodes cordoned, %d pods evicted, %d left (%d held by budgets)",
                     cluster.cluster_id, report.cordoned, report.evicted, report.remaining, report.blocked,
                     extra={"cluster_id": cluster.cluster_id})  # fmt: skip
        return report

    def _drain_pass(self, conn: _Conn, cluster_id: str) -> DrainReport:
        return drain_pass(conn.api, self.request_timeout_s, cluster_id)

    async def uncordon(self, cluster: ClusterRef) -> int:
        conn = await asyncio.to_thread(self._conn, cluster)
        nodes: int = await self._call(conn, cluster, self._uncordon)
        log.info("uncordoned %d node(s) of %s", nodes, cluster.cluster_id, extra={"cluster_id": cluster.cluster_id})
        return nodes

    def _uncordon(self, conn: _Conn) -> int:
        return uncordon(conn.api, self.request_timeout_s)

    # ================================================================== apply and prune
    async def apply(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]) -> ApplyReport:
        """Ensure the bundle is applied and what it no longer contains is pruned. Returns what changed."""
        bundle, desired = await self._desired(cluster, service, version, values)
        conn = await asyncio.to_thread(self._conn, cluster)
        previous = await self._call(conn, cluster, self._read_inventory, service)
        new_kinds = kinds_of(desired)
        all_kinds = previous.kinds | new_kinds
        await self._call(conn, cluster, self._write_inventory, service, version, all_kinds, bundle.health)
        report = ApplyReport()
        self._gates[(cluster.cluster_id, service)] = tuple(bundle.health)
        crds = [o for o in desired if o["kind"] == CRD_KIND]
        later = [o for o in desired if o["kind"] != CRD_KIND and _after_health(o)]
        now = [o for o in desired if o["kind"] != CRD_KIND and not _after_health(o)]
        if crds:
            await self._call(conn, cluster, self._apply_all, cluster, service, crds, report)
            for crd in crds:
                await self._wait_crd(conn, cluster, service, crd)
        await self._call(conn, cluster, self._apply_all, cluster, service, now, report)
        if later:
            await self._wait_gates(cluster, service, self.health_timeout_s)
            await self._call(conn, cluster, self._apply_all, cluster, service, later, report)
        # Pruned last: a new version that fails half-way leaves the old objects in place.
        keep = {ObjectRef.of(o).identity for o in desired} | {self._inventory_ref(service).identity}
        report.pruned = await self._call(conn, cluster, self._prune, service, all_kinds, keep)
        await self._call(conn, cluster, self._write_inventory, service, version, new_kinds, bundle.health)
        if report.changed or report.forced:
            log.info("applied %s %s on %s: %d created, %d updated, %d unchanged, %d pruned, %d fields reclaimed",
                     service, version, cluster.cluster_id, len(report.created), len(report.updated),
                     len(report.unchanged), len(report.pruned), len(report.forced),
                     extra={"cluster_id": cluster.cluster_id})  # fmt: skip
        return report

    async def remove_service(self, cluster: ClusterRef, service: str) -> None:
        """Delete every object of a bundle (a service removed from the cluster's spec), then its inventory.

        The kinds to look through come from the inventory; not found (never applied, already removed) is done."""
        conn = await asyncio.to_thread(self._conn, cluster)
        previous = await self._call(conn, cluster, self._read_inventory, service)
        pruned = await self._call(conn, cluster, self._prune, service, previous.kinds, set())
        await self._call(conn, cluster, self._delete_inventory, service)
        self._gates.pop((cluster.cluster_id, service), None)
        if pruned:
            log.info("removed %s from %s: %d objects deleted", service, cluster.cluster_id, len(pruned),
                     extra={"cluster_id": cluster.cluster_id})  # fmt: skip

    async def _desired(self, cluster: ClusterRef, service: str, version: str,
                       values: Mapping[str, Any]) -> tuple[Bundle, list[Json]]:  # fmt: skip
        """The rendered bundle and the objects to apply (labelled, ordered, secrets filled in memory)."""
        bundle = await self._render(cluster, service, version, values)
        try:
            desired = prepare(bundle, service, version)
        except BundleError as exc:
            raise InstallError(str(exc)) from None
        for slot in secret_slots(desired):
            what = f"Secret {slot.namespace}/{slot.name}" if slot.namespace else f"Secret {slot.name}"
            if self.resolve_secret is None:
                raise InstallError(f"{service}: {what} refers to {slot.ref} but no secret resolver is configured")
            try:
                if inspect.iscoroutinefunction(self.resolve_secret):
                    value: Any = await self.resolve_secret(slot.ref)
                else:
                    value = await asyncio.to_thread(self.resolve_secret, slot.ref)
                    if inspect.isawaitable(value):
                        value = await value
            except Exception as exc:  # the message names the reference; a resolver must not put values in errors
                raise InstallError(f"{service}: resolving {slot.ref} for {what} failed: "
                                   f"{type(exc).__name__}: {exc}") from None  # fmt: skip
            if not isinstance(value, bytes | str):
                raise InstallError(f"{service}: resolving {slot.ref} for {what} returned no value")
            desired[slot.index] = with_secret_value(desired[slot.index], value.encode() if isinstance(value, str)
                                                    else value)  # fmt: skip
        return bundle, desired

    async def _render(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]) -> Bundle:
        result: Any
        try:
            if inspect.iscoroutinefunction(self.render):
                result = await self.render(service, version, values, cluster)
            else:  # a sync renderer may resolve secrets over the network: keep it off the event loop
                result = await asyncio.to_thread(self.render, service, version, values, cluster)
                if inspect.isawaitable(result):
                    result = await result
        except InstallError:
            raise
        except Exception as exc:  # a renderer failure is an install failure, retried like one
            raise InstallError(f"rendering {service} {version} for {cluster.cluster_id} failed: "
                               f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
        if not isinstance(result, Bundle):
            raise InstallError(f"rendering {service} {version} returned {type(result).__name__}, not a Bundle")
        return result

    def _apply_all(self, conn: _Conn, cluster: ClusterRef, service: str, objects: Sequence[Json],
                   report: ApplyReport) -> None:  # fmt: skip
        for obj in objects:
            self._apply_one(conn, cluster, service, obj, report)

    def _apply_one(self, conn: _Conn, cluster: ClusterRef, service: str, obj: Json, report: ApplyReport) -> None:
        ref = ObjectRef.of(obj)
        resource = self._resource(conn, ref.api_version, ref.kind)
        live = self._get(conn, resource, ref)
        if live is not None and (problem := ownership_problem(live, service)):
            raise InstallError(f"{service} on {cluster.cluster_id}: {ref} {problem}")
        try:
            out = self._ssa(conn, resource, ref, obj, force=False)
        except NotFoundError as exc:
            # The namespace is missing (a dependency not installed) or discovery is stale (a CRD went away):
            # refresh discovery so the retry sees the API as it is now.
            with contextlib.suppress(Exception):
                conn.dyn.resources.invalidate_cache()
            raise InstallError(f"{service} on {cluster.cluster_id}: {ref}: {_api_message(exc)}") from None
        except ConflictError as exc:
            if live is None:  # created by someone else between our read and our apply: theirs, not ours
                raise InstallError(f"{service} on {cluster.cluster_id}: {ref}: {_api_message(exc)}") from None
            taken = _conflicts(exc)
            out = self._ssa(conn, resource, ref, obj, force=True)
            for path, manager in taken:
                report.forced.append(f"{ref}: {path} (from {manager})")
                log.warning("reclaimed %s %s from field manager %s on %s", ref, path, manager, cluster.cluster_id,
                            extra={"cluster_id": cluster.cluster_id})  # fmt: skip
        rv = (out.get("metadata") or {}).get("resourceVersion")
        if live is None:
            report.created.append(str(ref))
        elif rv != (live.get("metadata") or {}).get("resourceVersion"):
            report.updated.append(str(ref))
        else:
            report.unchanged.append(str(ref))

    def _ssa(self, conn: _Conn, resource: Any, ref: ObjectRef, obj: Json, force: bool) -> Json:
        kwargs: dict[str, Any] = {"force_conflicts": True} if force else {}
        result = conn.dyn.server_side_apply(resource, body=obj, name=ref.name, namespace=ref.namespace,
                                            field_manager=FIELD_MANAGER, _request_timeout=self.request_timeout_s,
                                            **kwargs)  # fmt: skip
        return dict(result.to_dict())

    async def _wait_crd(self, conn: _Conn, cluster: ClusterRef, service: str, crd: Json) -> None:
        """Until the CRD is Established and the API serves its kinds (discovery can lag Established)."""
        ref = ObjectRef.of(crd)
        spec = crd.get("spec") or {}
        group, kind = spec.get("group", ""), (spec.get("names") or {}).get("kind", "")
        versions = [v["name"] for v in spec.get("versions") or [] if v.get("served", True)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.crd_timeout_s
        while True:
            live = await self._call(conn, cluster, self._get_ref, ref)
            ok, reason = health.crd_established(live)
            if ok:
                missing = await self._call(conn, cluster, self._unserved, group, kind, versions)
                if not missing:
                    return
                reason = f"Established but {', '.join(missing)} not served yet"
            if loop.time() >= deadline:
                raise GateTimeout(service, cluster.cluster_id, str(ref), reason, self.crd_timeout_s)
            await asyncio.sleep(min(self.health_poll_s, max(deadline - loop.time(), 0)))

    def _unserved(self, conn: _Conn, group: str, kind: str, versions: Sequence[str]) -> list[str]:
        missing = []
        for v in versions:
            try:
                self._resource(conn, f"{group}/{v}", kind)
            except _NotServed:
                missing.append(f"{group}/{v} {kind}")
        return missing

    def _prune(self, conn: _Conn, service: str, kinds: set[str], keep: set[tuple[str, str, str, str]]) -> list[str]:
        victims: list[tuple[Any, ObjectRef]] = []
        for entry in sorted(kinds):
            api_version, kind = split_kind(entry)
            try:
                resource = self._resource(conn, api_version, kind)
            except _NotServed:
                continue  # the kind is gone (its CRD was removed): so are its objects
            try:
                listing = resource.get(label_selector=bundle_selector(service), _request_timeout=self.request_timeout_s)
            except NotFoundError:  # discovery was stale: the kind went away (its CRD deleted) with its objects
                continue
            for item in listing.to_dict().get("items") or []:
                ref = ObjectRef.of(item, api_version, kind)
                # The selector already says "this bundle, managed by us"; checked again so a bug there cannot
                # make us delete someone else's object.
                labels = (item.get("metadata") or {}).get("labels") or {}
                if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or labels.get(LABEL_BUNDLE) != label_value(service):
                    continue
                if ref.identity not in keep:
                    victims.append((resource, ref))
        pruned = []
        for resource, ref in sorted(victims, key=lambda v: prune_rank(v[1].kind)):
            with contextlib.suppress(NotFoundError):  # already gone counts as done
                resource.delete(name=ref.name, namespace=ref.namespace, _request_timeout=self.request_timeout_s)
            pruned.append(str(ref))
        return pruned

    # ================================================================== inventory
    def _inventory_ref(self, service: str) -> ObjectRef:
        name = f"flotilla-bundle-{label_value(service).lower().replace('_', '-').replace('.', '-')}"[:253]
        return ObjectRef("v1", "ConfigMap", name.rstrip("-"), self.inventory_namespace)

    def _read_inventory(self, conn: _Conn, service: str) -> _Inventory:
        live = self._get_ref(conn, self._inventory_ref(service))
        if live is None:
            return _Inventory()
        data = live.get("data") or {}
        try:
            gates = tuple(HealthGate(**g) for g in json.loads(data.get("health") or "[]"))
            return _Inventory(data.get("version"), set(json.loads(data.get("kinds") or "[]")), gates)
        except (TypeError, ValueError) as exc:
            raise InstallError(f"inventory {self._inventory_ref(service)} is unreadable: {exc}") from None

    def _write_inventory(self, conn: _Conn, service: str, version: str, kinds: set[str],
                         gates: Sequence[HealthGate]) -> None:  # fmt: skip
        ref = self._inventory_ref(service)
        body = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ref.name, "namespace": ref.namespace,
                         "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_INVENTORY: label_value(service)}},
            "data": {"bundle": service, "version": version, "kinds": json.dumps(sorted(kinds)),
                     "health": json.dumps([{"kind": g.kind, "name": g.name, "namespace": g.namespace}
                                           for g in gates])},
        }  # fmt: skip
        resource = self._resource(conn, "v1", "ConfigMap")
        live = self._get(conn, resource, ref)
        if live is not None and ((live.get("metadata") or {}).get("labels") or {}).get(LABEL_MANAGED_BY) != MANAGED_BY:
            raise InstallError(f"{ref} exists and is not managed by flotilla; refusing to take it over")
        # The inventory is ours alone (checked just above), so it is always applied with force.
        self._ssa(conn, resource, ref, body, force=True)

    def _delete_inventory(self, conn: _Conn, service: str) -> None:
        ref = self._inventory_ref(service)
        with contextlib.suppress(NotFoundError):
            self._resource(conn, "v1", "ConfigMap").delete(name=ref.name, namespace=ref.namespace,
                                                           _request_timeout=self.request_timeout_s)  # fmt: skip

    # ================================================================== health
    async def gate_results(self, cluster: ClusterRef, service: str) -> list[health.GateResult]:
        """Every gate of the service's bundle with its verdict. API errors become failing verdicts."""
        gates = self._gates.get((cluster.cluster_id, service))
        try:
            conn = await asyncio.to_thread(self._conn, cluster)
            if gates is None:
                gates = (await self._call(conn, cluster, self._read_inventory, service)).gates
                if gates is None:
                    return [health.GateResult(None, False, str(self._inventory_ref(service)), "bundle not applied")]
                self._gates[(cluster.cluster_id, service)] = gates
            return await self._call(conn, cluster, self._check_gates, gates)
        except InstallError as exc:
            return [health.GateResult(g, False, health.gate_object(g), str(exc)) for g in gates or ()] or [
                health.GateResult(None, False, f"bundle {service}", str(exc))]

    def _check_gates(self, conn: _Conn, gates: Sequence[HealthGate]) -> list[health.GateResult]:
        return [self._check_gate(conn, g) for g in gates]

    def _check_gate(self, conn: _Conn, gate: HealthGate) -> health.GateResult:
        if gate.kind in health.GATE_KIND:
            api_version, kind = health.GATE_KIND[gate.kind]
            live = self._get_ref(conn, ObjectRef(api_version, kind, gate.name, gate.namespace))
            check = {"DeploymentAvailable": health.deployment_available, "DaemonSetRolledOut":
                     health.daemonset_rolled_out, "CRDEstablished": health.crd_established}[gate.kind]  # fmt: skip
            ok, reason = check(live)
            return health.GateResult(gate, ok, health.gate_object(gate), reason)
        # WebhookReady: the named Validating and/or Mutating configuration.
        found = []
        for kind in health.WEBHOOK_KINDS:
            live = self._get_ref(conn, ObjectRef("admissionregistration.k8s.io/v1", kind, gate.name))
            if live is not None:
                found.append((kind, live))
        if not found:
            return health.GateResult(gate, False, health.gate_object(gate), "webhook configuration not found")
        slices_res = self._resource(conn, "discovery.k8s.io/v1", "EndpointSlice")
        for kind, config in found:
            slices = {}
            for ns, svc in health.webhook_services(config):
                listing = slices_res.get(namespace=ns, label_selector=f"kubernetes.io/service-name={svc}",
                                         _request_timeout=self.request_timeout_s)  # fmt: skip
                slices[(ns, svc)] = listing.to_dict().get("items") or []
            ok, reason = health.webhook_ready(config, slices)
            if not ok:
                return health.GateResult(gate, False, health.gate_object(gate, kind), reason)
        return health.GateResult(gate, True, health.gate_object(gate, found[0][0]), "webhooks answering")

    # ================================================================== drift
    async def detect_drift(self, cluster: ClusterRef, service: str, version: str,
                           values: Mapping[str, Any]) -> list[str]:  # fmt: skip
        """Objects whose live state differs from the render on the fields we declare: "<object>: <field>"
        (or "<object>: missing"). Never includes values: a Secret's content must not reach a log or an event."""
        _bundle, desired = await self._desired(cluster, service, version, values)
        conn = await asyncio.to_thread(self._conn, cluster)
        return await self._call(conn, cluster, self._drift, desired)

    async def correct_drift(self, cluster: ClusterRef, service: str, version: str,
                            values: Mapping[str, Any]) -> list[str]:  # fmt: skip
        """Re-apply a bundle that drifted; returns the drift it corrected (empty when there was none)."""
        drift = await self.detect_drift(cluster, service, version, values)
        if not drift:
            return []
        await self.apply(cluster, service, version, values)
        left = set(await self.detect_drift(cluster, service, version, values))
        if left:  # e.g. a mutating webhook or a controller that rewrites our field at once
            log.warning("drift on %s persists after re-applying %s: %s", cluster.cluster_id, service, sorted(left),
                        extra={"cluster_id": cluster.cluster_id})  # fmt: skip
        return [d for d in drift if d not in left]

    def _drift(self, conn: _Conn, desired: Sequence[Json]) -> list[str]:
        out: list[str] = []
        for obj in desired:
            ref = ObjectRef.of(obj)
            try:
                live = self._get_ref(conn, ref)
            except _NotServed:
                out.append(f"{ref}: kind not served")
                continue
            if live is None:
                out.append(f"{ref}: missing")
                continue
            out.extend(f"{ref}: {path}" for path in drift_paths(owned_part(obj), owned_part(live)))
        return out

    # ================================================================== client plumbing
    def _conn(self, cluster: ClusterRef) -> _Conn:
        """The cluster's DynamicClient (built on first use; rebuilt when client_for hands out a new ApiClient)."""
        try:
            api = self.client_for(cluster)
        except Exception as exc:
            raise InstallError(f"no API client for {cluster.cluster_id}: {type(exc).__name__}: {exc}") from exc
        with self._conns_lock:
            conn = self._conns.get(cluster.cluster_id)
            if conn is not None and conn.api is api:
                return conn
        with self._translate(cluster, "discovery", value_errors=True):
            dyn = dynamic_client(api)
        conn = _Conn(api, dyn, threading.Lock())
        with self._conns_lock:
            self._conns[cluster.cluster_id] = conn
        return conn

    async def _call(self, conn: _Conn, cluster: ClusterRef, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a sync client function in a worker thread, one at a time per cluster, errors as InstallError."""

        def locked() -> Any:
            with conn.lock, self._translate(cluster, getattr(fn, "__name__", "call").strip("_")):
                return fn(conn, *args)

        return await asyncio.to_thread(locked)

    @contextlib.contextmanager
    def _translate(self, cluster: ClusterRef, what: str, value_errors: bool = False) -> Iterator[None]:
        """Client errors as InstallError with the API's own message (never the request or response body).

        ValueError only during discovery, where the client uses it for "not a Kubernetes API": elsewhere it
        would be a bug of ours and must not be retried as if the cluster were at fault."""
        try:
            yield
        except InstallError:
            raise
        except _NotServed as exc:
            raise InstallError(f"{what} on {cluster.cluster_id}: {exc}") from None
        except ApiException as exc:
            raise InstallError(f"{what} on {cluster.cluster_id}: {_api_message(exc)}") from None
        except (HTTPError, OSError) as exc:
            raise InstallError(f"{what} on {cluster.cluster_id}: API server unreachable: "
                               f"{type(exc).__name__}: {exc}") from None  # fmt: skip
        except ValueError as exc:
            if not value_errors:
                raise
            raise InstallError(f"{what} on {cluster.cluster_id}: not a usable Kubernetes API: {exc}") from None

    def _resource(self, conn: _Conn, api_version: str, kind: str) -> Any:
        group, _, version = api_version.rpartition("/")
        try:
            return conn.dyn.resources.get(prefix="apis" if group else "api", group=group or None,
                                          api_version=version, kind=kind)  # fmt: skip
        except ResourceNotFoundError:
            raise _NotServed(f"{api_version} {kind} is not served by the API server") from None

    def _get(self, conn: _Conn, resource: Any, ref: ObjectRef) -> Json | None:
        try:
            got = resource.get(name=ref.name, namespace=ref.namespace, _request_timeout=self.request_timeout_s)
        except NotFoundError:
            return None
        return dict(got.to_dict())

    def _get_ref(self, conn: _Conn, ref: ObjectRef) -> Json | None:
        return self._get(conn, self._resource(conn, ref.api_version, ref.kind), ref)
