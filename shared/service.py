"""Running one service process: connect, start its consumers, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from shared import telemetry
from shared.bus import Bus, IdempotentConsumer, Subscription, connect_bus
from shared.config import Settings, get_settings
from shared.store import StateStore

log = logging.getLogger("flotilla.service")


def redis_client(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=10)


@dataclass
class ServiceContext:
    name: str
    settings: Settings
    bus: Bus
    redis: Redis
    store: StateStore


BackgroundJob = Callable[[ServiceContext, Sequence[IdempotentConsumer[Any]]], Coroutine[Any, Any, None]]


@dataclass
class ServiceSpec:
    """What a service is: its subscriptions (built from the context) and any background tasks."""

    name: str
    subscriptions: Callable[[ServiceContext], Sequence[Subscription[Any]]]
    # Periodic jobs; they get the running consumers so that they can hand work to them (handle_local).
    background: Sequence[BackgroundJob] = field(default_factory=list)


async def open_context(name: str, settings: Settings) -> ServiceContext:
    bus = await connect_bus(settings, name=f"flotilla-{name}")
    redis = redis_client(settings)
    store = StateStore(redis, settings.redis_prefix, name, settings.ledger_ttl_s)
    return ServiceContext(name=name, settings=settings, bus=bus, redis=redis, store=store)


async def serve(spec: ServiceSpec, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    ctx = await open_context(spec.name, settings)
    consumers = [IdempotentConsumer(ctx.bus, ctx.store, spec.name, s) for s in spec.subscriptions(ctx)]
    for consumer in consumers:
        await consumer.start()
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(job(ctx, consumers)) for job in spec.background]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s started with %d consumers", spec.name, len(consumers))
    await stop.wait()
    log.info("%s stopping", spec.name)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*(c.stop() for c in consumers))
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(Exception):
        await ctx.bus.close()
    await ctx.redis.aclose()


def main(spec: ServiceSpec) -> None:
    settings = get_settings()
    telemetry.setup(spec.name, settings.log_level, settings.otel_console)
    asyncio.run(serve(spec, settings))
