"""Which ControlPlaneDriver the service uses (FLOTILLA_CONTROLPLANE_DRIVER)."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from services.etcd_migration.drivers.base import ControlPlaneDriver
from shared.config import Settings


def build_driver(settings: Settings, redis: Redis) -> ControlPlaneDriver:
    # Both keep injected faults in Redis, so that a test (another process) can make a step fail.
    if settings.controlplane_driver == "sim":
        from services.etcd_migration.drivers.sim import SimControlPlaneDriver

        return SimControlPlaneDriver.from_settings(redis, settings)
    from services.etcd_migration.drivers.local import LocalDriver

    return LocalDriver(Path(settings.controlplane_state_dir), redis, redis_prefix=settings.redis_prefix)
