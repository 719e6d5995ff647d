"""rotation: its durable consumer and what it listens to. It records what it receives for now."""

from __future__ import annotations

from shared.events import (
    ClusterDrained,
    ClusterInfraFailed,
    ClusterProvisioningFailed,
    ClusterReady,
    RolloutRequested,
    subjects,
)  # fmt: skip
from shared.recording import recording_subscription
from shared.service import ServiceSpec

LISTENS_TO = (RolloutRequested, ClusterReady, ClusterDrained, ClusterProvisioningFailed, ClusterInfraFailed)

SPEC = ServiceSpec(
    name="rotation",
    subscriptions=lambda ctx: [
        recording_subscription(
            "rotation", subjects.STREAM_FLEET, [subjects.fleet_filter(e.type_name()) for e in LISTENS_TO],
            # Rollouts are per ClusterSet: facts about clusters are filed under their set.
            key=lambda env: subjects.token(str(env.data.get("clusterset", env.subject))),
        )
    ],
)
