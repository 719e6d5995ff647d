"""Fleet rollouts inside the rotation service: subscriptions that feed `fleet.handle`, the set catalog and timers.

Two durable consumers on the rotation service's idempotent runtime, sharing one aggregate per fleet rollout
(stored under `fleet:<rollout id>`, so it can never meet a ClusterSet's rotation state in the service's store):
- `rotation-fleet-intents` (CLUSTERSETS, `clusterset.fleetrollout.>`): requests, approvals, controls;
- `rotation-fleet-facts` (FLEET): the set outcomes, filed under the fleet rollout they name (others are skipped).

The set catalog (catalog.py) is a third consumer. It takes ClusterSetRetired like the set rotation consumer does;
the runtime's ledger entries are per durable consumer, so each of them handles it.

Timers: a stage waiting for the previous stage's soak has no event to wake it, so `fleet_ticks` hands each
rollout whose soak is over a local FleetRolloutTick (shared/nudges.py: id per rollout and time bucket, so
replicas ticking at once do the work once).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

from services.rotation import fleet
from services.rotation.catalog import SetCatalog
from services.rotation.fleet import FleetState
from shared.bus import IdempotentConsumer, Outcome, Subscription
from shared.catalog import read_custom_defs, register_custom
from shared.events import Envelope, subjects, utcnow
from shared.events.models import Event, FleetRolloutRequested, FleetRolloutTick
from shared.nudges import nudge_loop
from shared.service import ServiceContext

INTENTS_DURABLE = "rotation-fleet-intents"
FACTS_DURABLE = "rotation-fleet-facts"
# The catalog consumer's ledger and (unused) state live apart from the rest of the service's.
KEY_PREFIX = "fleet:"
# Every fleet-rollout intent subject (the per-rollout subject with its last token as a wildcard).
INTENT_FILTER = subjects.FLEET_ROLLOUT_INTENTS
# How often the timer job looks for rollouts whose soak is over: a stage starts at most this late.
TICK_INTERVAL_S = 5.0

Job = Callable[[ServiceContext, Sequence[IdempotentConsumer[Any]]], Coroutine[Any, Any, None]]


def fleet_key(rollout_id: str) -> str:
    return KEY_PREFIX + subjects.token(rollout_id)


def intent_key(env: Envelope) -> str:
    """Intents and ticks: their subject is the fleet rollout id."""
    return fleet_key(env.subject)


def fact_key(env: Envelope) -> str:
    """A set outcome is filed under the fleet rollout it names; one that names none gets a throwaway key."""
    rollout_id = env.data.get("fleet_rollout_id")
    return fleet_key(rollout_id) if isinstance(rollout_id, str) and rollout_id else f"fleet-none:{env.subject}"


class FleetOrchestrator:
    def __init__(self, catalog: SetCatalog) -> None:
        self.catalog = catalog

    async def on_event(self, env: Envelope, state: FleetState | None) -> Outcome[FleetState]:
        catalog = None
        if env.type == FleetRolloutRequested.type_name() and (state is None or state.status == "new"):
            catalog = await self.catalog.snapshot()  # the core stays pure: it gets the catalog as an argument
        new_state, events = fleet.handle(state, env, catalog)
        return Outcome(state=new_state if new_state != state else None, events=events)


def set_catalog(ctx: ServiceContext) -> SetCatalog:
    return SetCatalog(ctx.redis, ctx.settings.redis_prefix)


def fleet_subscriptions(ctx: ServiceContext) -> list[Subscription[Any]]:
    # Patches are validated like ClusterSets, which may list the bundles users added.
    register_custom(read_custom_defs(ctx.settings.custom_bundle_dirs))
    orch = FleetOrchestrator(set_catalog(ctx))
    facts = [subjects.fleet_filter(t.type_name()) for t in fleet.OUTCOMES]
    return [
        # The set catalog the request is resolved against (ClusterSetAccepted / ClusterSetRetired).
        set_catalog(ctx).subscription(),
        Subscription(durable=INTENTS_DURABLE, stream=subjects.STREAM_CLUSTERSETS, filter_subjects=[INTENT_FILTER],
                     state_model=FleetState, handle=orch.on_event, key=intent_key),  # fmt: skip
        Subscription(durable=FACTS_DURABLE, stream=subjects.STREAM_FLEET, filter_subjects=facts,
                     state_model=FleetState, handle=orch.on_event, key=fact_key),  # fmt: skip
    ]


def tick_for(state: FleetState, bucket: int, now: datetime | None = None) -> Event | None:
    """The nudge a rollout needs now: only one whose next stage waits for a soak that is over."""
    return FleetRolloutTick(rollout_id=state.rollout_id, bucket=bucket) if fleet.due(state, now or utcnow()) else None


def fleet_ticks_every(interval_s: float) -> Job:
    """The timer job with its own interval (tests use a short one)."""

    async def job(ctx: ServiceContext, consumers: Sequence[IdempotentConsumer[Any]]) -> None:
        consumer = next(c for c in consumers if c.sub.durable == INTENTS_DURABLE)
        await nudge_loop(ctx.store, consumer, FleetState, KEY_PREFIX + "*", tick_for, interval_s, fleet.SOURCE)

    return job


async def fleet_ticks(ctx: ServiceContext, consumers: Sequence[IdempotentConsumer[Any]]) -> None:
    """Background job for the rotation ServiceSpec: the soak timers, every TICK_INTERVAL_S."""
    await fleet_ticks_every(TICK_INTERVAL_S)(ctx, consumers)
