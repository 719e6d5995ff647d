"""One availability prober per running operation in this process, its samples kept in Redis.

`ensure` starts the operation's prober if this process has none (after a restart, the same
Redis key continues the tally); `finish` stops it and summarizes every sample recorded, by
any process, for the operation."""

from __future__ import annotations

from redis.asyncio import Redis

from services.etcd_migration.drivers.base import ControlPlaneDriver, ControlPlaneRef
from services.etcd_migration.prober import Prober, summarize
from shared.events.models import ControlPlaneAvailability

# A request stuck longer than this (a cluster without quorum) counts as failed.
PROBE_TIMEOUT_S = 1.0


class ProbeHub:
    def __init__(self, redis: Redis, prefix: str, driver: ControlPlaneDriver, interval_s: float = 0.05) -> None:
        self.redis = redis
        self.prefix = prefix
        self.driver = driver
        self.interval_s = interval_s
        self._running: dict[str, Prober] = {}

    def key(self, ref: ControlPlaneRef) -> str:
        return f"{self.prefix}:{{etcd_migration}}:probe:{ref.operation_id}"

    async def ensure(self, ref: ControlPlaneRef, endpoint: str) -> None:
        if ref.operation_id in self._running:
            return

        async def down() -> int:
            return await self.driver.down_members(ref)

        prober = Prober(endpoint, down, interval_s=self.interval_s, timeout_s=PROBE_TIMEOUT_S, redis=self.redis,
                        key=self.key(ref),
                        target=lambda: self.driver.probe_target(ref, endpoint, timeout_s=PROBE_TIMEOUT_S))  # fmt: skip
        prober.start()
        self._running[ref.operation_id] = prober

    async def finish(self, ref: ControlPlaneRef) -> ControlPlaneAvailability | None:
        prober = self._running.pop(ref.operation_id, None)
        if prober is not None:
            return await prober.stop()
        stored = await Prober("", _none, redis=self.redis, key=self.key(ref)).samples()
        return summarize(stored) if stored else None

    async def close(self) -> None:
        for prober in self._running.values():
            await prober.stop()
        self._running.clear()


async def _none() -> int:
    return 0
