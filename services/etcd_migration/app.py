"""etcd_migration: its durable consumer and what it listens to. It records what it receives for now."""

from __future__ import annotations

from shared.events import ControlPlaneMigrationRequested, ControlPlaneUpgradeRequested, subjects
from shared.recording import recording_subscription
from shared.service import ServiceSpec

LISTENS_TO = (ControlPlaneMigrationRequested, ControlPlaneUpgradeRequested)

SPEC = ServiceSpec(
    name="etcd_migration",
    subscriptions=lambda ctx: [
        recording_subscription(
            "etcd_migration", subjects.STREAM_FLEET, [subjects.fleet_filter(e.type_name()) for e in LISTENS_TO]
        )
    ],
)
