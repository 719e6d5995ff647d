"""The installer's shell: FLEET subscription -> core -> KubernetesTarget -> Outcome.

One durable consumer ("infra_installer") on FLEET takes the events `core.evolve` folds
(ClusterRequested, ClusterProvisioned, its own InfraServiceInstalled, ClusterRetirementRequested,
ClusterUpdateRequested, ClusterResourcesUpdated, ClusterDrainRequested ...).
Per message the handler evolves the state with the event, asks `core.next_action`, performs
at most one install through the port and returns the new state with the emitted event
already evolved in. The runtime commits state + ledger + outbox atomically and publishes.

A failing install raises: the runtime naks with backoff and retries the same message; after
the last attempt `on_exhausted` records `ClusterInfraFailed(retryable=True)`.

Drains never hold a message: a ClusterDrainRequested runs the first pass and is acked; the periodic
pass (`reconcile_loop`) comes back with a local "drain" nudge every `drain_interval` until the drain is
answered. A pass that fails is logged and tried again at the next nudge (a deadline still answers).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from services.infra_installer import core
from services.infra_installer.bundles.custom import CustomBundle, load_custom_bundles
from services.infra_installer.bundles.model import Bundle, RenderContext
from services.infra_installer.bundles.render import render_bundle
from services.infra_installer.core import EmitReady, Fail, Install, InstallerState, Remove
from services.infra_installer.credentials import ClusterCredentials
from services.infra_installer.secret_refs import resolve_secret_ref
from services.infra_installer.targets.base import ClusterRef, DrainReport, InstallError, KubernetesTarget
from services.infra_installer.targets.kubernetes import KubernetesApiTarget
from services.infra_installer.targets.sim import SimKubernetesTarget
from shared.bus import IdempotentConsumer, Outcome, Subscription
from shared.catalog import read_custom_defs, register_custom
from shared.config import Settings
from shared.events import Envelope, decode_payload, derive_id, new_event, subjects, utcnow
from shared.events.models import (
    ClusterDrained,
    ClusterDrainRequested,
    ClusterProvisioned,
    ClusterRequested,
    ClusterResourcesUpdated,
    ClusterRetirementRequested,
    ClusterUncordonRequested,
    ClusterUpdateRequested,
    Event,
    InfraReconcileRequested,
    InfraServiceInstalled,
    InfraServiceRemoved,
)
from shared.service import ServiceContext, ServiceSpec

log = logging.getLogger("flotilla.infra_installer")

SERVICE = "infra_installer"
DURABLE = "infra_installer"
# Our own InfraServiceInstalled / InfraServiceRemoved come back to advance the chain one step each.
CONSUMED: tuple[type[Event], ...] = (ClusterRequested, ClusterProvisioned, InfraServiceInstalled,
                                     ClusterRetirementRequested, ClusterUpdateRequested, InfraServiceRemoved,
                                     ClusterResourcesUpdated, ClusterDrainRequested,
                                     ClusterUncordonRequested)  # fmt: skip
# How long one service may take to become healthy before the attempt fails (and is retried).
# Must stay well below Settings.handler_timeout_s, which bounds the whole handler.
DEFAULT_HEALTH_TIMEOUT_S = Settings.model_fields["install_health_timeout_s"].default
# How often a drain in progress gets its next pass, at most (the reconcile interval when that is shorter):
# often enough that a drain ends soon after its budgets allow and times out close to its deadline.
DRAIN_POLL_S = 10.0


def cluster_ref(state: InstallerState, registry_secret_ref: str | None = None) -> ClusterRef:
    context = None
    if state.spec is not None:
        context = RenderContext(cluster_id=state.cluster_id, clusterset=state.clusterset,
                                cluster_type=state.cluster_type or "", location=state.location, spec=state.spec,
                                resources=state.resources, registry_secret_ref=registry_secret_ref)  # fmt: skip
    return ClusterRef(cluster_id=state.cluster_id, endpoint=state.endpoint or "", credential_ref=state.credential_ref,
                      ca_fingerprint=state.ca_fingerprint, cloud=state.location.cloud,
                      region=state.location.region, context=context)  # fmt: skip


class Installer:
    def __init__(self, target: KubernetesTarget, health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
                 registry_secret_ref: str | None = None, clock: Callable[[], datetime] = utcnow) -> None:  # fmt: skip
        self.target = target
        self.health_timeout_s = health_timeout_s
        self.registry_secret_ref = registry_secret_ref
        self.clock = clock  # drain deadlines are judged by it

    def ref(self, state: InstallerState) -> ClusterRef:
        return cluster_ref(state, self.registry_secret_ref)

    async def handle(self, env: Envelope, state: InstallerState | None) -> Outcome[InstallerState]:
        event = decode_payload(env)
        state = core.evolve(state, event, env)
        if state is None:
            return Outcome()
        if isinstance(event, InfraReconcileRequested) and event.reason == "drift":
            return await self._correct_drift(env, state)
        if isinstance(event, ClusterDrainRequested) or (isinstance(event, InfraReconcileRequested)
                                                        and event.reason == "drain"):  # fmt: skip
            return await self._drain(env, state)
        if isinstance(event, ClusterUncordonRequested):
            return await self._uncordon(env, state, event)
        action = core.next_action(state)
        emitted: Event | None = None
        match action:
            case Install(service=svc):
                cluster = self.ref(state)
                log.info("installing %s %s on %s", svc.name, svc.version, state.cluster_id,
                         extra={"cluster_id": state.cluster_id, "event_id": env.id})  # fmt: skip
                # Both are ensures: a retry after a crash or a failed health gate re-applies harmlessly.
                try:
                    await self.target.apply_service(cluster, svc.name, svc.version, svc.values)
                    await self.target.wait_healthy(cluster, svc.name, self.health_timeout_s)
                    emitted = core.installed_event(state, svc)
                except Exception as exc:
                    if getattr(exc, "retryable", True) is not False:
                        raise  # the runtime retries with backoff
                    # Retrying cannot help (a CA that does not match, an unknown credential scheme).
                    emitted = core.failed_event(state, svc.name, str(exc), retryable=False,
                                                obj=getattr(exc, "object", None))  # fmt: skip
                discriminator = svc.name
            case Remove(name=name):
                log.info("removing %s from %s", name, state.cluster_id,
                         extra={"cluster_id": state.cluster_id, "event_id": env.id})  # fmt: skip
                await self.target.remove_service(self.ref(state), name)
                emitted = core.removed_event(state, action)
                discriminator = f"remove:{name}"
            case EmitReady():
                emitted = core.ready_event(state, action)
                discriminator = state.config_hash or ""
            case Fail(service=name, reason=reason, retryable=retryable):
                emitted = core.failed_event(state, name, reason, retryable)
                discriminator = name
            case None:
                pass
        if emitted is None:
            return Outcome(state=state)
        out = new_event(emitted, source=SERVICE, cause=env, discriminator=discriminator)
        return Outcome(state=core.evolve(state, emitted), events=[out])

    async def _correct_drift(self, env: Envelope, state: InstallerState) -> Outcome[InstallerState]:
        """Re-apply what was changed on the cluster behind our back, and say what was corrected."""
        events = []
        for svc in core.drift_check(state):
            corrected = await self.target.correct_drift(self.ref(state), svc.name, svc.version, svc.values)
            if corrected:
                log.warning("corrected drift of %s on %s: %s", svc.name, state.cluster_id, corrected,
                            extra={"cluster_id": state.cluster_id})  # fmt: skip
                events.append(new_event(core.drift_event(state, svc, corrected), source=SERVICE, cause=env,
                                        discriminator=svc.name))  # fmt: skip
        return Outcome(state=state, events=events)

    async def _drain(self, env: Envelope, state: InstallerState) -> Outcome[InstallerState]:
        """One drain pass (or none, for a cluster drained already), and the answers it settles."""
        action = core.drain_action(state)
        if action is None:
            return Outcome(state=state)
        report: DrainReport | None = DrainReport(evicted=0, remaining=0)  # drained already: nothing to do
        if isinstance(action, core.DrainPass):
            try:
                report = await self.target.drain(self.ref(state))
            except Exception as exc:  # never hold the message: the next nudge tries again
                log.warning("drain pass on %s failed: %s", state.cluster_id, exc,
                            extra={"cluster_id": state.cluster_id, "event_id": env.id})  # fmt: skip
                report = None
        state, answers = core.settle_drain(state, report, self.clock())
        events = []
        for answer in answers:
            log.info("drain of %s answered: timed_out=%s evicted=%d remaining=%d", state.cluster_id,
                     answer.event.timed_out, answer.event.evicted, answer.event.remaining,
                     extra={"cluster_id": state.cluster_id, "event_id": answer.request.id})  # fmt: skip
            events.append(drained_envelope(answer))
        return Outcome(state=state, events=events)

    async def _uncordon(self, env: Envelope, state: InstallerState,
                        request: ClusterUncordonRequested) -> Outcome[InstallerState]:  # fmt: skip
        """The drain is called off (folded in already); the nodes it cordoned take pods again. Retried by the
        runtime until the API answers: a cluster left cordoned is capacity lost."""
        if state.retired:
            return Outcome(state=state)
        nodes = await self.target.uncordon(self.ref(state))
        log.info("uncordoned %s (%d node(s)): %s", state.cluster_id, nodes, request.reason,
                 extra={"cluster_id": state.cluster_id, "event_id": env.id})  # fmt: skip
        out = new_event(core.uncordoned_event(state, request, nodes), source=SERVICE, cause=env)
        return Outcome(state=state, events=[out])

    async def on_exhausted(self, env: Envelope, state: InstallerState | None, reason: str,
                           error: BaseException | None = None) -> Outcome[InstallerState]:  # fmt: skip
        """Every attempt failed: record ClusterInfraFailed for the service that was being installed.

        Must not raise (the runtime would retry the dead-lettering forever), so undecodable input
        records nothing.
        """
        try:
            state = core.evolve(state, decode_payload(env), env)
        except (KeyError, ValidationError):
            return Outcome()
        action = core.next_action(state)
        if state is None or not isinstance(action, Install):
            return Outcome(state=state)
        # A health gate that never passed names its object (e.g. "Deployment ingress-nginx/controller").
        failed = core.failed_event(state, action.service.name, reason, retryable=True,
                                   obj=getattr(error, "object", None))  # fmt: skip
        out = new_event(failed, source=SERVICE, cause=env, discriminator=action.service.name)
        log.error("giving up installing %s on %s: %s", action.service.name, state.cluster_id, reason,
                  extra={"cluster_id": state.cluster_id, "event_id": env.id})  # fmt: skip
        return Outcome(state=core.evolve(state, failed), events=[out])


def drained_envelope(answer: core.DrainAnswer) -> Envelope:
    """The one ClusterDrained of a drain request: its id derives from the request's, whichever pass answers it."""
    request = answer.request
    env = new_event(answer.event, source=SERVICE, event_id=derive_id(request.id, ClusterDrained.type_name()))
    return env.model_copy(update=dict(causation_id=request.id, correlation_id=request.correlation_id))


def filter_subjects() -> list[str]:
    return [subjects.fleet_filter(cls.type_name()) for cls in CONSUMED]


def kubernetes_target(ctx: ServiceContext) -> KubernetesTarget:
    """The real adapter: credentials resolved per cluster at run time, bundles rendered from its state."""
    credentials = ClusterCredentials(ctx.settings)
    custom = load_custom_bundles(ctx.settings.custom_bundle_dirs)  # fails at start-up, naming the bad file

    def render(service: str, version: str, values: Mapping[str, Any], cluster: ClusterRef) -> Bundle:
        return render_for(service, version, values, cluster, custom)

    return KubernetesApiTarget(
        client_for=credentials.api_client_blocking, render=render, resolve_secret=resolve_secret_ref,
        health_timeout_s=ctx.settings.install_health_timeout_s,
    )  # fmt: skip


def render_for(service: str, version: str, values: Mapping[str, Any], cluster: ClusterRef,
               custom: Mapping[str, CustomBundle] | None = None) -> Bundle:  # fmt: skip
    if cluster.context is None:
        raise InstallError(f"no spec known for {cluster.cluster_id}: cannot render {service}")
    return render_bundle(service, version, values, cluster.context, custom=custom)


TARGETS: dict[str, Callable[[ServiceContext], KubernetesTarget]] = {
    "sim": lambda ctx: SimKubernetesTarget(ctx.redis, ctx.settings),
    "kubernetes": kubernetes_target,
}


def build_subscriptions(
    ctx: ServiceContext,
    target: KubernetesTarget | None = None,
    health_timeout_s: float | None = None,
) -> Sequence[Subscription[InstallerState]]:
    register_custom(read_custom_defs(ctx.settings.custom_bundle_dirs))
    installer = Installer(
        target or TARGETS[ctx.settings.k8s_target](ctx),
        health_timeout_s if health_timeout_s is not None else ctx.settings.install_health_timeout_s,
        registry_secret_ref=ctx.settings.registry_secret_ref,
    )
    return [
        Subscription(
            durable=DURABLE,
            stream=subjects.STREAM_FLEET,
            filter_subjects=filter_subjects(),
            state_model=InstallerState,
            handle=installer.handle,
            key=lambda env: env.subject,  # the cluster id
            on_exhausted=installer.on_exhausted,
        )
    ]


def reconcile_reason(state: InstallerState) -> str | None:
    """Why the periodic pass nudges this cluster: a drain in progress to continue, a retryable failure to retry,
    or a READY one to check for drift."""
    if state.retired:
        return None
    if core.drain_action(state) is not None:
        return "drain"
    if state.failure is not None and state.failure.retryable:
        return "retry"
    return "drift" if state.ready and not core.draining(state) else None


RECONCILE_REASONS = ("retry", "drift")


async def reconcile_pass(ctx: ServiceContext, consumer: IdempotentConsumer[InstallerState], bucket: int,
                         reasons: Collection[str] = RECONCILE_REASONS) -> int:  # fmt: skip
    """One pass over the clusters that need a nudge for one of `reasons`: drains first, then failures, then
    READY clusters, at most `installer_reconcile_batch` of them.

    Nudges are handled locally (never published) with an id per cluster, time bucket and reason, so two
    replicas running the same pass do each cluster's work once."""
    priority = {"drain": 0, "retry": 1, "drift": 2}
    due: list[tuple[int, str, InstallerState, str]] = []
    for key in await ctx.store.keys():
        state, _ = await ctx.store.load(key, InstallerState)
        reason = reconcile_reason(state) if state else None
        if state and reason and reason in reasons:
            # Spread drift checks over passes: a different order every bucket.
            order = zlib.crc32(f"{key}:{bucket}".encode()) & 0xFFFF
            due.append((priority[reason], f"{order:05d}{key}", state, reason))
    due.sort(key=lambda d: (d[0], d[1]))
    for _, _, state, reason in due[: ctx.settings.installer_reconcile_batch]:
        nudge = InfraReconcileRequested(cluster_id=state.cluster_id, clusterset=state.clusterset,
                                        location=state.location, reason=reason, bucket=bucket)  # type: ignore[arg-type]
        env = new_event(nudge, source=SERVICE, event_id=derive_id(f"{state.cluster_id}:{bucket}", nudge.type_name(),
                                                                  reason))  # fmt: skip
        try:
            await consumer.handle_local(env)
        except Exception as exc:  # one cluster's trouble must not stop the pass
            log.warning("reconcile of %s failed: %r", state.cluster_id, exc, extra={"cluster_id": state.cluster_id})
    return min(len(due), ctx.settings.installer_reconcile_batch)


def drain_interval(settings: Settings) -> float:
    return min(settings.installer_reconcile_interval_s, DRAIN_POLL_S)


async def reconcile_loop(ctx: ServiceContext, consumers: Sequence[IdempotentConsumer[Any]]) -> None:
    """Drains in progress every `drain_interval`; retries and drift checks every reconcile interval."""
    interval = ctx.settings.installer_reconcile_interval_s
    every = drain_interval(ctx.settings)
    last = int(time.time() // interval)
    while True:
        await asyncio.sleep(every)
        now = time.time()
        await reconcile_pass(ctx, consumers[0], int(now // every), reasons=("drain",))
        if int(now // interval) != last:
            last = int(now // interval)
            await reconcile_pass(ctx, consumers[0], last)


SPEC = ServiceSpec(name=SERVICE, subscriptions=lambda ctx: build_subscriptions(ctx), background=[reconcile_loop])
