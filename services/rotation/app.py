"""rotation: subscriptions that feed the per-set rotation core and the fleet rollout orchestrator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.rotation.core import SOURCE, RotationState, handle
from services.rotation.fleet_app import fleet_subscriptions, fleet_ticks
from shared.bus import IdempotentConsumer, Outcome, Subscription
from shared.events import (
    ClusterDeprovisioned,
    ClusterDrained,
    ClusterInfraFailed,
    ClusterProvisioningFailed,
    ClusterReady,
    ClusterSetRetired,
    ClusterUncordoned,
    Envelope,
    RolloutRequested,
    subjects,
)  # fmt: skip
from shared.events.models import Event, RolloutTick
from shared.nudges import nudge_loop
from shared.service import ServiceContext, ServiceSpec

# What moves a rollout: the request, and the facts about its set's clusters.
FACTS = (RolloutRequested, ClusterReady, ClusterProvisioningFailed, ClusterInfraFailed, ClusterDrained,
         ClusterUncordoned, ClusterDeprovisioned, ClusterSetRetired)  # fmt: skip
DURABLE = "rotation"
CONTROLS_DURABLE = "rotation-controls"
# Rotation states share the service's store with fleet rollouts: keys say which is which.
KEY_PREFIX = "set:"
TICK_INTERVAL_S = 5.0


def set_key(env: Envelope) -> str:
    """Rollouts are per ClusterSet: facts about clusters are filed under their set."""
    return KEY_PREFIX + subjects.token(str(env.data.get("clusterset", env.subject)))


async def on_event(env: Envelope, state: RotationState | None) -> Outcome[RotationState]:
    new_state, events = handle(state, env)
    return Outcome(state=new_state if new_state != state else None, events=events)


def set_subscriptions() -> list[Subscription[RotationState]]:
    return [
        Subscription(durable=DURABLE, stream=subjects.STREAM_FLEET,
                     filter_subjects=[subjects.fleet_filter(e.type_name()) for e in FACTS],
                     state_model=RotationState, handle=on_event, key=set_key),  # fmt: skip
        Subscription(durable=CONTROLS_DURABLE, stream=subjects.STREAM_CLUSTERSETS,
                     filter_subjects=[subjects.CLUSTERSET_ROLLOUT_CONTROLS], state_model=RotationState, handle=on_event,
                     key=set_key),  # fmt: skip
    ]


def tick_for(state: RotationState, bucket: int) -> Event | None:
    """Running rollouts are nudged, so that a maintenance window that opens is noticed."""
    if state.run is None or state.run.mode != "running":
        return None
    return RolloutTick(clusterset=state.clusterset, location=state.location, rollout_id=state.run.rollout_id,
                       fleet_rollout_id=state.run.fleet_rollout_id, bucket=bucket)  # fmt: skip


async def rollout_ticks(ctx: ServiceContext, consumers: Sequence[IdempotentConsumer[Any]]) -> None:
    consumer = next(c for c in consumers if c.sub.durable == DURABLE)
    await nudge_loop(ctx.store, consumer, RotationState, KEY_PREFIX + "*", tick_for, TICK_INTERVAL_S, SOURCE)


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription[Any]]:
    return [*set_subscriptions(), *fleet_subscriptions(ctx)]


SPEC = ServiceSpec(name=SOURCE, subscriptions=subscriptions, background=[rollout_ticks, fleet_ticks])
