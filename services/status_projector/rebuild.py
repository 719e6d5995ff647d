"""Rebuild: replay FLEET from sequence 1 into a fresh view namespace, then switch to it.

The live views stay served while the rebuild runs. When the new namespace has caught up with
the stream, `{prefix}:views:current` is switched to it in one SET; running projectors notice
(they WATCH the pointer in every batch) and continue from the new namespace's checkpoint; the
old namespace is deleted after a grace period for API reads still in flight.

A rebuild never writes into the namespace being served: clearing it key by key while running
projectors commit into it could leave documents built from part of the history. Always a fresh
namespace, then one atomic switch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from redis.asyncio import Redis

from services.status_projector.projector import Projector
from services.status_projector.store import (
    DEFAULT_NAMESPACE,
    clear_namespace,
    current_namespace,
    namespace_counter_key,
    pointer_key,
)
from shared.bus import Bus

log = logging.getLogger("flotilla.status_projector.rebuild")


@dataclass(frozen=True)
class RebuildResult:
    namespace: str
    previous: str | None  # the namespace switched away from (None without a switch)
    checkpoint: int
    events: int


async def rebuild(bus: Bus, redis: Redis, prefix: str, *, swap: bool = True, namespace: str | None = None,
                  grace_s: float = 5.0, within_s: float = 3600.0) -> RebuildResult:  # fmt: skip
    """Replay FLEET into `namespace` (default: a fresh one) until caught up; optionally switch to it."""
    serving = await current_namespace(redis, prefix)
    if namespace == serving:
        raise ValueError(f"namespace {namespace!r} is being served: rebuild into a fresh one and switch")
    namespace = namespace or f"r{await redis.incr(namespace_counter_key(prefix))}"
    await clear_namespace(redis, prefix, namespace)
    projector = Projector(bus, redis, prefix, namespace=namespace)
    log.info("rebuilding views into namespace %s (serving %s)", namespace, serving)
    await projector.start()
    try:
        checkpoint = await projector.catch_up(within_s)
    finally:
        await projector.stop()
    log.info("namespace %s caught up at sequence %d (%d events applied)", namespace, checkpoint,
             projector.applied_events)  # fmt: skip
    previous = None
    if swap:
        # Running projectors WATCH the pointer in every batch: none writes into the old namespace after this.
        previous = str(await redis.set(pointer_key(prefix), namespace, get=True) or DEFAULT_NAMESPACE)
        log.info("now serving namespace %s; deleting %s in %.1fs", namespace, previous, grace_s)
        if previous != namespace:
            await asyncio.sleep(grace_s)  # API requests that resolved the old namespace finish their reads
            await clear_namespace(redis, prefix, previous)
    return RebuildResult(namespace=namespace, previous=previous, checkpoint=checkpoint,
                         events=projector.applied_events)  # fmt: skip
