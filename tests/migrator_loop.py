"""etcd_migration's handler driven without the bus: each event it emits is handed back to it, as the stream
would deliver it, and a retryable driver error is retried as the runtime's redelivery would. For suites and the
benchmark that exercise a ControlPlaneDriver through the real journal (the bus and ledger are covered end to end).
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.etcd_migration import core
from services.etcd_migration.app import Migrator
from services.etcd_migration.drivers.base import DriverError
from shared.events import Envelope, new_event
from shared.events.clusterset import Location
from shared.events.models import ControlPlaneMigrationRequested, ControlPlaneUpgradeRequested

LOC = Location(env="prod", cloud="aws", region="eu-west-1")


def request(cluster_id: str, operation_id: str, kind: str = "migrate", to_version: str = "1.30") -> Envelope:
    ids: dict[str, Any] = {"cluster_id": cluster_id, "clusterset": "core", "location": LOC,
                           "operation_id": operation_id}  # fmt: skip
    if kind == "migrate":
        return new_event(ControlPlaneMigrationRequested(**ids, kubernetes_version="1.29"), source="test")
    return new_event(ControlPlaneUpgradeRequested(**ids, to_version=to_version), source="test")


async def run_operation(migrator: Migrator, first: Envelope, attempts: int = 200,
                        states: dict[str, core.CPState] | None = None) -> list[Envelope]:  # fmt: skip
    """Every event the operation emits, each handled once it is 'delivered', retrying like the runtime.
    `states` keeps each cluster's journal between operations, as the service's store does."""
    cluster_id = str(first.data["cluster_id"])
    state: core.CPState | None = (states or {}).get(cluster_id)
    queue: list[Envelope] = [first]
    emitted: list[Envelope] = []
    while queue:
        env = queue.pop(0)
        for _ in range(attempts):
            try:
                outcome = await migrator.handle(env, state)
                break
            except DriverError as exc:
                assert exc.retryable
                await asyncio.sleep(0.01)
        else:
            outcome = await migrator.on_exhausted(env, state, "out of deliveries")
        state = outcome.state if outcome.state is not None else state
        queue += outcome.events
        emitted += outcome.events
    if states is not None and state is not None:
        states[cluster_id] = state
    return emitted
