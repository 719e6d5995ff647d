"""Periodic nudges: a service's own local-only events for timers (windows, soak times, retries).

A nudge is handled through the consumer's normal idempotent path (`handle_local`) with an id
derived from the aggregate and a time bucket, so two replicas nudging at once do the work once,
and a nudge never goes on the bus."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from shared.bus import IdempotentConsumer
from shared.events import derive_id, new_event
from shared.events.models import Event
from shared.store import StateStore

log = logging.getLogger("flotilla.nudges")

S = TypeVar("S", bound=BaseModel)


def bucket_of(interval_s: float, now: float | None = None) -> int:
    return int((time.time() if now is None else now) // interval_s)


async def nudge_pass(store: StateStore, consumer: IdempotentConsumer[S], model: type[S], pattern: str,
                     nudge: Callable[[S, int], Event | None], bucket: int, source: str) -> int:  # fmt: skip
    """One pass over the aggregates whose keys match `pattern`: hand each the nudge it needs, if any."""
    sent = 0
    for key in await store.keys(pattern):
        state, _ = await store.load(key, model)
        payload = nudge(state, bucket) if state is not None else None
        if payload is None:
            continue
        env = new_event(payload, source=source, event_id=derive_id(f"{key}:{bucket}", payload.type_name(), ""))
        await consumer.handle_local(env)
        sent += 1
    return sent


async def nudge_loop(store: StateStore, consumer: IdempotentConsumer[Any], model: type[BaseModel], pattern: str,
                     nudge: Callable[[Any, int], Event | None], interval_s: float, source: str) -> None:  # fmt: skip
    """Run `nudge_pass` every `interval_s` until cancelled; a failed pass is logged and retried next time."""
    while True:
        try:
            await nudge_pass(store, consumer, model, pattern, nudge, bucket_of(interval_s), source)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: nudge pass failed", source)
        await asyncio.sleep(interval_s)
