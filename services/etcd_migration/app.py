"""etcd_migration's shell: FLEET messages -> journal core -> ControlPlaneDriver -> events.

Per message: fold the event in; if it is news or the journal's awaited continuation, perform
the one step `next_action` names through the driver and emit its StepCompleted (or the
operation's failure or final event), which comes back and drives the next step. A retryable
driver error is raised so the runtime retries with backoff; a terminal one (or running out of
retries) becomes the failure event, which starts the rollback where that is safe.

While an operation runs, a prober in this process sends reads and writes through the control
plane's public endpoint; its samples are kept in Redis, so a restarted service keeps counting,
and the final event carries the availability it measured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from services.etcd_migration import core, pipeline, steps
from services.etcd_migration.core import CPState, Finish, Step
from services.etcd_migration.drivers.base import ControlPlaneDriver, ControlPlaneRef, DriverError
from services.etcd_migration.drivers.registry import build_driver
from services.etcd_migration.probes import ProbeHub
from shared.bus import Outcome, Subscription
from shared.events import Envelope, new_event, subjects
from shared.events.models import (
    ClusterRetirementRequested,
    ControlPlaneAvailability,
    ControlPlaneMigrationCompleted,
    ControlPlaneMigrationFailed,
    ControlPlaneMigrationRequested,
    ControlPlaneMigrationRolledBack,
    ControlPlaneMigrationStepCompleted,
    ControlPlanePipelineRequested,
    ControlPlaneUpgradeCompleted,
    ControlPlaneUpgradeFailed,
    ControlPlaneUpgradeRequested,
    ControlPlaneUpgradeStepCompleted,
    Event,
)
from shared.service import ServiceContext, ServiceSpec

log = logging.getLogger("flotilla.etcd_migration")

SERVICE = core.SOURCE
DURABLE = "etcd_migration"
PIPELINES_DURABLE = "etcd_migration-pipelines"
CONSUMED: tuple[type[Event], ...] = (
    ControlPlaneMigrationRequested, ControlPlaneMigrationStepCompleted, ControlPlaneMigrationFailed,
    ControlPlaneUpgradeRequested, ControlPlaneUpgradeStepCompleted, ControlPlaneUpgradeFailed,
    ClusterRetirementRequested,
)  # fmt: skip


def cluster_key(env: Envelope) -> str:
    return "cluster:" + subjects.token(str(env.data.get("cluster_id", env.subject)))


def pipeline_key(env: Envelope) -> str:
    return "pipeline:" + subjects.token(str(env.data.get("pipeline_id") or "none"))


class Migrator:
    def __init__(self, driver: ControlPlaneDriver, probes: ProbeHub) -> None:
        self.driver = driver
        self.probes = probes

    async def handle(self, env: Envelope, state: CPState | None) -> Outcome[CPState]:
        after = core.evolve(state, env)
        if after is None or not core.should_act(state, after, env):
            return Outcome(state=after if after != state else None)
        action = core.next_action(after)
        if action is None:
            return Outcome(state=after)
        assert after.op is not None
        ref = ControlPlaneRef(cluster_id=after.cluster_id, operation_id=after.op.driver_operation_id)
        payload: Event
        if isinstance(action, Finish):
            availability = await self.probes.finish(ref)
            payload = final_event(after, action, availability)
        else:
            await self._probe(after, ref)
            try:
                detail = await steps.perform(self.driver, after, action)
                payload = step_event(after, action, detail, env)
            except DriverError as exc:
                if exc.retryable:
                    raise  # the runtime retries with backoff; running out records the failure (on_exhausted)
                log.warning("%s %s failed on %s: %s", action.kind, action.step, after.cluster_id, exc,
                            extra={"cluster_id": after.cluster_id, "event_id": env.id})  # fmt: skip
                payload = failure_event(after, action, str(exc))
        out = new_event(payload, source=SERVICE, cause=env, discriminator=_discriminator(action))
        return Outcome(state=core.evolve(after, out), events=[out])

    async def on_exhausted(self, env: Envelope, state: CPState | None, reason: str,
                           error: BaseException | None = None) -> Outcome[CPState]:  # fmt: skip
        """Out of retries on a step: record it failed (which rolls back where that is safe)."""
        after = core.evolve(state, env) or state
        action = core.next_action(after)
        if after is None or not isinstance(action, Step):
            return Outcome(state=after if after != state else None)
        out = new_event(failure_event(after, action, reason), source=SERVICE, cause=env,
                        discriminator="exhausted:" + _discriminator(action))  # fmt: skip
        return Outcome(state=core.evolve(after, out), events=[out])

    async def _probe(self, state: CPState, ref: ControlPlaneRef) -> None:
        # The public endpoint is known once the precheck reported it (migrations and upgrades alike).
        detail = state.op.detail if state.op else {}
        endpoint = (detail.get("precheck") or detail.get("cluster:precheck") or {}).get("endpoint")
        if endpoint:
            await self.probes.ensure(ref, str(endpoint))


def _discriminator(action: Step | Finish) -> str:
    if isinstance(action, Finish):
        return action.outcome
    return ":".join(x for x in (action.node, action.step, "rollback" if action.rollback else "") if x)


def _ids(state: CPState) -> dict[str, Any]:
    assert state.op is not None
    return {"cluster_id": state.cluster_id, "clusterset": state.clusterset, "location": state.location,
            "operation_id": state.op.operation_id, "pipeline_id": state.op.pipeline_id}  # fmt: skip


def step_event(state: CPState, action: Step, detail: dict[str, Any], cause: Envelope) -> Event:
    if action.kind == "migrate":
        return ControlPlaneMigrationStepCompleted(**_ids(state), phase=action.phase, step=action.step,
                                                  rollback=action.rollback, detail=detail, started_at=cause.time)
    return ControlPlaneUpgradeStepCompleted(**_ids(state), node=action.node or "", step=action.step,
                                            rollback=action.rollback, detail=detail)  # fmt: skip


def failure_event(state: CPState, action: Step, reason: str) -> Event:
    if action.kind == "migrate":
        rolling_back = not action.rollback and core.rollback_allowed(action.step)
        return ControlPlaneMigrationFailed(**_ids(state), step=action.step, reason=reason[:2000],
                                           rolling_back=rolling_back)  # fmt: skip
    node = None if action.node == "cluster" else action.node
    return ControlPlaneUpgradeFailed(**_ids(state), node=node, reason=reason[:2000], rolled_back=False)


def final_event(state: CPState, action: Finish, availability: ControlPlaneAvailability | None) -> Event:
    op = state.op
    assert op is not None
    pct = availability.availability_pct if availability else None
    if op.kind == "migrate":
        if action.outcome == "completed":
            # Members and endpoint as opened, or as found when the cluster was HA already.
            opened = op.detail.get("open-load-balancers") or op.detail.get("precheck", {})
            return ControlPlaneMigrationCompleted(**_ids(state), availability_pct=pct, availability=availability,
                                                  config_hash=op.config_hash, endpoint=str(opened.get("endpoint", "")),
                                                  members=list(opened.get("members", [])))  # fmt: skip
        return ControlPlaneMigrationRolledBack(**_ids(state), from_step=op.failed_step or "", reason=op.reason or "",
                                               availability=availability)  # fmt: skip
    if action.outcome == "completed":
        return ControlPlaneUpgradeCompleted(**_ids(state), to_version=op.to_version or "", availability_pct=pct,
                                            availability=availability, config_hash=op.config_hash)  # fmt: skip
    return ControlPlaneUpgradeFailed(**_ids(state), node=op.failed_step, reason=op.reason or "", rolled_back=True,
                                     availability=availability)  # fmt: skip


async def on_pipeline(env: Envelope, state: pipeline.PipelineState | None) -> Outcome[pipeline.PipelineState]:
    new_state, events = pipeline.handle(state, env)
    return Outcome(state=new_state if new_state != state else None, events=events)


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription[Any]]:
    driver = build_driver(ctx.settings, ctx.redis)
    probes = ProbeHub(ctx.redis, ctx.settings.redis_prefix, driver, ctx.settings.controlplane_probe_interval_s)
    migrator = Migrator(driver, probes)
    return [
        Subscription(durable=DURABLE, stream=subjects.STREAM_FLEET,
                     filter_subjects=[subjects.fleet_filter(e.type_name()) for e in CONSUMED], state_model=CPState,
                     handle=migrator.handle, on_exhausted=migrator.on_exhausted, key=cluster_key),  # fmt: skip
        Subscription(durable=PIPELINES_DURABLE, stream=subjects.STREAM_FLEET,
                     filter_subjects=[subjects.fleet_filter(e.type_name())
                                      for e in (ControlPlanePipelineRequested, *pipeline.OUTCOMES)],
                     state_model=pipeline.PipelineState, handle=on_pipeline, key=pipeline_key),  # fmt: skip
    ]


SPEC = ServiceSpec(name=SERVICE, subscriptions=subscriptions)
