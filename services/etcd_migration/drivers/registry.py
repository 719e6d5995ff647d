"""Which ControlPlaneDriver the service uses (FLOTILLA_CONTROLPLANE_DRIVER)."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from services.etcd_migration.drivers.base import ControlPlaneDriver
from shared.config import Settings


def build_driver(settings: Settings, redis: Redis) -> ControlPlaneDriver:
    from services.etcd_migration.drivers.local import LocalDriver

    # Redis holds injected faults, so that a test (another process) can make a step fail.
    return LocalDriver(Path(settings.controlplane_state_dir), redis, redis_prefix=settings.redis_prefix)
