"""planner: subscriptions that feed the pure core and publish what it decides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.planner.core import PlannerState, handle
from shared.bus import Outcome, Subscription
from shared.catalog import read_custom_defs, register_custom
from shared.events import (
    ClusterDeprovisioned,
    ClusterInfraFailed,
    ClusterProvisioningFailed,
    ClusterReady,
    ClusterRequested,
    ClusterRetirementRequested,
    ClusterSetApplied,
    ClusterSetPatchRequested,
    Envelope,
    RolloutAborted,
    RolloutCompleted,
    RolloutRolledBack,
    subjects,
)  # fmt: skip
from shared.events.models import (
    ControlPlaneMigrationCompleted,
    ControlPlanePipelineCompleted,
    ControlPlanePipelineHalted,
    ControlPlaneUpgradeCompleted,
)
from shared.service import ServiceContext, ServiceSpec

# The facts that change which clusters are safest to retire, when a member is gone, let an in-place update
# move on, or end a rotation (which creates and retires clusters itself). Kept few: each one loads and stores
# the whole set's state. A fleet rollout's patch arrives as a fact too.
FACTS = (ClusterReady, ClusterProvisioningFailed, ClusterInfraFailed, ClusterDeprovisioned, ClusterRequested,
         ClusterRetirementRequested, RolloutCompleted, RolloutAborted, RolloutRolledBack,
         ClusterSetPatchRequested, ControlPlanePipelineCompleted, ControlPlanePipelineHalted,
         ControlPlaneMigrationCompleted, ControlPlaneUpgradeCompleted)  # fmt: skip


def intent_key(env: Envelope) -> str:
    if env.type == ClusterSetApplied.type_name():
        doc = env.data.get("document")
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        return subjects.token(name if isinstance(name, str) else None)
    return subjects.token(env.subject)


def fact_key(env: Envelope) -> str:
    return subjects.token(str(env.data.get("clusterset", "")))


async def on_event(env: Envelope, state: PlannerState | None) -> Outcome[PlannerState]:
    new_state, events = handle(state, env)
    return Outcome(state=new_state if new_state != state else None, events=events)


def subscriptions(ctx: ServiceContext) -> Sequence[Subscription[Any]]:
    # ClusterSets may list the bundles users added; validation must know them.
    register_custom(read_custom_defs(ctx.settings.custom_bundle_dirs))
    return [
        Subscription(durable="planner-intents", stream=subjects.STREAM_CLUSTERSETS,
                     filter_subjects=[subjects.CLUSTERSETS_ALL], state_model=PlannerState, handle=on_event,
                     key=intent_key),  # fmt: skip
        Subscription(durable="planner-facts", stream=subjects.STREAM_FLEET,
                     filter_subjects=[subjects.fleet_filter(f.type_name()) for f in FACTS],
                     state_model=PlannerState, handle=on_event, key=fact_key),  # fmt: skip
    ]


SPEC = ServiceSpec(name="planner", subscriptions=subscriptions)
