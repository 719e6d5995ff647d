"""The provisioner's shell: FLEET messages → core → cloud port → events.

Per message (the runtime has loaded the cluster's state and commits what we return):
evolve the incoming event; if it is news or the chain's awaited event, ask `next_action`,
perform that one action through the cluster's cloud driver, build the resulting event,
evolve it into the state and return both. The emitted event comes back through the stream
and drives the next step.

An in-place update (ClusterUpdateRequested) is one action: each of core.UPDATE_STEPS is converged
through the driver's `update` (which creates nothing), then one ClusterResourcesUpdated reports the
generation. ClusterProvisioned is consumed back only as the chain's continuation: an update that
arrived while provisioning runs once the cluster is provisioned.

Errors: a retryable `CloudError` (or anything unexpected) is raised, so the runtime naks
with backoff, up to settings.cloud_max_deliver deliveries (hours, not seconds); then `on_exhausted` records
ClusterProvisioningFailed(retryable=True). A terminal `CloudError` becomes
ClusterProvisioningFailed(retryable=False) at once and the chain stops there; a later
retirement still removes whatever exists, and a new request (or the update asked again) retries.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from services.cloud_provisioner import core
from services.cloud_provisioner.core import Adopt, Delete, EmitDeprovisioned, EmitProvisioned, Ensure, Update
from services.cloud_provisioner.core import ProvisionerState as State
from services.cloud_provisioner.providers import ProviderRegistry, build_registry
from services.cloud_provisioner.providers.base import CloudError, ClusterContext
from shared.bus import Outcome, Subscription
from shared.events import Envelope, new_event, subjects
from shared.events.models import (
    ClusterProvisioned,
    ClusterRequested,
    ClusterResourceDeprovisioned,
    ClusterResourceProvisioned,
    ClusterRetirementRequested,
    ClusterUpdateRequested,
    Event,
    ProvisionStep,
)
from shared.service import ServiceContext, ServiceSpec

log = logging.getLogger("flotilla.cloud_provisioner")

SERVICE = "cloud_provisioner"
DURABLE = "cloud_provisioner"
# Cloud operations are slow and throttled: many tries, with the runtime's backoff between them.
MAX_DELIVER = 50
CONSUMED: tuple[type[Event], ...] = (
    ClusterRequested, ClusterRetirementRequested, ClusterUpdateRequested, ClusterResourceProvisioned,
    ClusterResourceDeprovisioned, ClusterProvisioned,
)  # fmt: skip


@dataclass(frozen=True)
class _Performed:
    """A create this process completed for a message whose commit may not have gone through."""

    step: ProvisionStep
    resources: dict[str, Any]
    ctx: ClusterContext


def context_of(state: State) -> ClusterContext:
    return ClusterContext(cluster_id=state.cluster_id, clusterset=state.clusterset, location=state.location,
                          spec=state.spec, resources={k: dict(v) for k, v in state.resources.items()})  # fmt: skip


class Provisioner:
    def __init__(self, providers: ProviderRegistry, memo_size: int = 4096) -> None:
        self.providers = providers
        self._performed: OrderedDict[str, _Performed] = OrderedDict()
        self._memo_size = memo_size

    def subscription(self, max_deliver: int = MAX_DELIVER) -> Subscription[State]:
        return Subscription(
            durable=DURABLE,
            stream=subjects.STREAM_FLEET,
            filter_subjects=[subjects.fleet_filter(cls.type_name()) for cls in CONSUMED],
            state_model=State,
            handle=self.handle,
            on_exhausted=self.on_exhausted,
            max_deliver=max_deliver,
        )

    # ------------------------------------------------------------------ handler
    async def handle(self, env: Envelope, state: State | None) -> Outcome[State]:
        await self._compensate(env, state)
        decided = self._decide(env, state)
        if isinstance(decided, Outcome):
            return decided
        after, action = decided
        try:
            payload = await self._perform(action, after, env)
        except CloudError as exc:
            if exc.retryable:
                raise
            log.warning("%s %s failed for good: %s", core.operation_of(action), core.step_of(action), exc,
                        extra={"cluster_id": after.cluster_id, "event_id": env.id})  # fmt: skip
            payload = core.failed(after, action, exc.code, exc.message, retryable=False, step=exc.step)
        out = new_event(payload, source=SERVICE, cause=env, discriminator=_discriminator(payload))
        return Outcome(state=core.evolve(after, out), events=[out])

    async def on_exhausted(self, env: Envelope, state: State | None, reason: str,
                           error: BaseException | None = None) -> Outcome[State]:  # fmt: skip
        """Out of retries: record the failure (retryable: a new request or retirement tries again)."""
        decided = self._decide(env, state)
        if isinstance(decided, Outcome):
            return decided
        after, action = decided
        code, message = parse_reason(reason)
        payload = core.failed(after, action, code, message, retryable=True)
        out = new_event(payload, source=SERVICE, cause=env, discriminator="exhausted:" + _discriminator(payload))
        return Outcome(state=core.evolve(after, out), events=[out])

    @staticmethod
    def _decide(env: Envelope, state: State | None) -> tuple[State, core.Action] | Outcome[State]:
        """Fold `env` in; return the action this message must perform (with the state it acts on), or,
        when it must perform none, the outcome to commit as is (the new state only if it changed)."""
        after = core.evolve(state, env)
        if after is None or not core.should_act(state, after, env):
            return Outcome(state=after if after != state else None)
        action = core.next_action(after)
        if action is None:
            return Outcome(state=after)
        return after, action

    async def _perform(self, action: core.Action, state: State, cause: Envelope) -> Event:
        match action:
            case Ensure(step=step):
                ctx = context_of(state)
                resources = await self.providers.for_cloud(state.location.cloud).ensure(step, ctx)
                self._remember(cause.id, _Performed(step, resources, ctx))
                return core.resource_provisioned(state, step, resources)
            case Adopt(step=step, resources=resources):
                return core.resource_provisioned(state, step, resources)
            case Delete(step=step, resources=resources):
                await self.providers.for_cloud(state.location.cloud).delete(step, context_of(state), resources)
                return core.resource_deprovisioned(state, step)
            case Update(steps=steps):
                return await self._update(state, steps)
            case EmitProvisioned():
                return core.provisioned(state)
            case EmitDeprovisioned():
                return core.deprovisioned(state)
        raise AssertionError(f"unknown action {action!r}")

    async def _update(self, state: State, steps: tuple[ProvisionStep, ...]) -> Event:
        """Converge each step in place, in order (each sees what the earlier ones reported)."""
        provider = self.providers.for_cloud(state.location.cloud)
        resources = {k: dict(v) for k, v in state.resources.items()}
        changed: list[ProvisionStep] = []
        for step in steps:
            if step not in resources:
                continue
            ctx = context_of(state.model_copy(update={"resources": resources}))
            try:
                updated = await provider.update(step, ctx)
            except CloudError as exc:
                exc.step = exc.step or step  # for the failure event: which step the update stopped at
                raise
            resources[step] = dict(updated.resources)
            if updated.changed:
                changed.append(step)
        log.info("updated %s in place to generation %s: %s", state.cluster_id,
                 state.pending_update.generation if state.pending_update else None, changed or "nothing to change",
                 extra={"cluster_id": state.cluster_id})  # fmt: skip
        return core.resources_updated(state, resources, changed)

    # ------------------------------------------------------------------ racing a retirement
    def _remember(self, event_id: str, performed: _Performed) -> None:
        self._performed[event_id] = performed
        while len(self._performed) > self._memo_size:
            self._performed.popitem(last=False)

    async def _compensate(self, env: Envelope, state: State | None) -> None:
        """Undo a create whose result could not be committed because a retirement got there first.

        The runtime calls the handler again when the commit lost a version race. If, by then, the
        cluster is being retired and our step's result is not recorded, nobody else will delete
        what we just created (the retirement may have looked for it before it existed): do it now.
        """
        prior = self._performed.pop(env.id, None)
        if prior is None or state is None or state.target == "present" or prior.step in state.resources:
            return
        log.info("compensating %s of %s: the cluster was retired meanwhile", prior.step, state.cluster_id)
        try:
            await self.providers.for_cloud(prior.ctx.location.cloud).delete(prior.step, prior.ctx, prior.resources)
        except Exception:
            self._remember(env.id, prior)  # try again on the next delivery
            raise


def _discriminator(payload: Event) -> str:
    step = getattr(payload, "step", None)
    operation = getattr(payload, "operation", None)
    generation = getattr(payload, "generation", None)  # ClusterResourcesUpdated: one per generation
    return ":".join(str(x) for x in (operation, step, generation) if x is not None)


_REASON = re.compile(r"\[([A-Za-z0-9_.:-]+)\] ?(.*)", re.S)


def parse_reason(reason: str) -> tuple[str, str]:
    """(code, message) from the runtime's 'ErrorType: [Code] message' reason string."""
    found = _REASON.search(reason)
    if found:
        return found.group(1), found.group(2) or reason
    kind, _, rest = reason.partition(": ")
    return (kind if kind.isidentifier() else "RetriesExhausted"), rest or reason


def subscriptions(ctx: ServiceContext) -> list[Subscription[State]]:
    provisioner = Provisioner(build_registry(ctx.settings, ctx.redis))
    return [provisioner.subscription(max_deliver=ctx.settings.cloud_max_deliver)]


SPEC = ServiceSpec(name=SERVICE, subscriptions=subscriptions)
