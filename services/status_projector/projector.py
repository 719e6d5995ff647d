"""The projector loop: FLEET in stream order → core.apply → Redis, checkpointed atomically.

Not the per-message idempotent consumer: read models need stream order and no gaps, and a
batch of hundreds of events should cost one Redis transaction, not hundreds. So:

- an ordered consumer (ephemeral, flow-controlled, idle heartbeats; nats-py resets it from the
  last delivered sequence when a delivery is lost) reads FLEET from checkpoint + 1;
- on top of that we check stream-sequence contiguity ourselves (the consumer takes every FLEET
  subject, so a gap means a lost delivery, e.g. a slow-consumer drop) and re-subscribe from the
  checkpoint when one appears; the first message after subscribing may legitimately skip
  sequences that were deleted from the stream;
- messages are applied in batches (up to `batch_size` or `batch_window_s`) inside one
  MULTI/EXEC that also sets the checkpoint, WATCHing the checkpoint (and the namespace
  pointer): two replicas can run at once, the loser of a race re-reads and skips what the
  winner applied; anything at or below the checkpoint is skipped, so redelivery and replay
  from sequence 1 change nothing;
- after a NATS reconnect, a namespace switch (rebuild), a checkpoint that went backwards or a
  stalled subscription, it re-subscribes from checkpoint + 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.js import api as jsapi
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from services.status_projector import core
from services.status_projector.store import (
    DEFAULT_NAMESPACE,
    BatchTouch,
    ViewKeys,
    current_namespace,
    load_batch,
    pointer_key,
    read_checkpoint,
    stage_batch,
)
from shared.bus import Bus
from shared.events import Envelope, subjects

log = logging.getLogger("flotilla.status_projector")


class _Resubscribe(Exception):
    """Leave the current subscription and start again from the checkpoint."""


@dataclass
class _Item:
    seq: int
    env: Envelope | None  # None: undecodable, skipped (deterministically) but still checkpointed


class Projector:
    """Projects FLEET into one view namespace, or follows `{prefix}:views:current` when none is given."""

    def __init__(
        self,
        bus: Bus,
        redis: Redis,
        prefix: str,
        *,
        namespace: str | None = None,
        batch_size: int = 500,
        batch_window_s: float = 0.05,
        idle_check_s: float = 2.0,
        heartbeat_s: float = 1.0,
    ) -> None:
        self.bus, self.redis, self.prefix = bus, redis, prefix
        self.fixed_namespace = namespace
        self.batch_size, self.batch_window_s = batch_size, batch_window_s
        self.idle_check_s, self.heartbeat_s = idle_check_s, heartbeat_s
        self.namespace: str | None = namespace
        self.checkpoint = 0  # last checkpoint this instance read or wrote
        self.subscribed = False
        self.applied_events = 0
        self.batches = 0
        self.subscriptions = 0  # how often it (re-)subscribed: for tests and metrics
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="status-projector")

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.subscribed = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stream_last_seq(self) -> int:
        info = await self.bus.js.stream_info(subjects.STREAM_FLEET)
        return int(info.state.last_seq)

    async def stored_checkpoint(self) -> int:
        namespace = self.fixed_namespace or await current_namespace(self.redis, self.prefix)
        return await read_checkpoint(self.redis, ViewKeys(self.prefix, namespace))

    async def wait_for(self, seq: int, within_s: float = 30.0) -> None:
        """Until the views include stream sequence `seq` (whoever applied it)."""
        deadline = time.monotonic() + within_s
        reached = -1
        while reached < seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"views did not reach sequence {seq} within {within_s}s "
                                   f"(checkpoint {reached}, last error {self.last_error})")  # fmt: skip
            try:
                reached = await self.stored_checkpoint()
            except RedisError:  # Redis restarting: keep waiting
                pass
            if reached < seq:
                await asyncio.sleep(0.02)

    async def catch_up(self, within_s: float = 600.0) -> int:
        """Until the views include everything FLEET holds now. Returns that sequence."""
        target = await self.stream_last_seq()
        await self.wait_for(target, within_s)
        return target

    # ------------------------------------------------------------------ subscription loop
    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            sub = None
            try:
                namespace = self.fixed_namespace or await current_namespace(self.redis, self.prefix)
                keys = ViewKeys(self.prefix, namespace)
                self.namespace = namespace
                self.checkpoint = await read_checkpoint(self.redis, keys)
                start = self.checkpoint + 1
                sub = await self._subscribe(start)
                self.subscribed = True
                self.subscriptions += 1
                log.info("projecting FLEET from sequence %d into namespace %s", start, namespace)
                await self._consume(sub, keys, start)
                failures = 0
            except asyncio.CancelledError:
                raise
            except _Resubscribe as why:
                log.info("re-subscribing: %s", why)
                await asyncio.sleep(0.05)  # never a hot loop, whatever keeps making us start over
            except Exception as exc:  # NATS or Redis unavailable: back off and start over from the checkpoint
                failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("projector loop failed (%d): %s", failures, self.last_error)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
            finally:
                self.subscribed = False
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _subscribe(self, start: int) -> nats.js.JetStreamContext.PushSubscription:
        config = jsapi.ConsumerConfig(
            deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            inactive_threshold=30.0,  # an abandoned ephemeral consumer (crashed replica) goes away by itself
        )
        return await self.bus.js.subscribe(
            subjects.FLEET_ALL,
            stream=subjects.STREAM_FLEET,
            config=config,
            ordered_consumer=True,
            idle_heartbeat=self.heartbeat_s,
            deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE,
        )

    async def _consume(self, sub: nats.js.JetStreamContext.PushSubscription, keys: ViewKeys, start: int) -> None:
        reconnects = self.bus.nc.stats["reconnects"]
        last_seq: int | None = None  # last stream sequence this subscription delivered
        idle_since = time.monotonic()
        while not self._stopping:
            msgs = await self._next_batch(sub)
            if self.bus.nc.stats["reconnects"] != reconnects:
                raise _Resubscribe("NATS reconnected")
            if not msgs:
                if time.monotonic() - idle_since >= self.idle_check_s:
                    idle_since = time.monotonic()
                    await self._check_stalled(last_seq if last_seq is not None else start - 1)
                    await self._check_namespace(keys)
                continue
            idle_since = time.monotonic()
            items: list[_Item] = []
            gap = False
            for msg in msgs:
                seq = int(msg.metadata.sequence.stream)
                if last_seq is not None and seq <= last_seq:
                    continue  # delivered twice around a consumer reset: already in this batch or applied
                if last_seq is not None and seq != last_seq + 1:
                    gap = True  # a delivery went missing: apply what is contiguous, then start over
                    break
                items.append(_Item(seq, _decode(msg, seq)))
                last_seq = seq
            if items:
                await self._apply(keys, items, start)
            if gap:
                raise _Resubscribe(f"gap after sequence {last_seq}")

    async def _next_batch(self, sub: nats.js.JetStreamContext.PushSubscription) -> list[Msg]:
        try:
            first = await sub.next_msg(timeout=min(0.5, self.idle_check_s))
        except TimeoutError:  # nats.errors.TimeoutError is one
            return []
        msgs = [first]
        deadline = time.monotonic() + self.batch_window_s
        while len(msgs) < self.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msgs.append(await sub.next_msg(timeout=remaining))
            except TimeoutError:  # nats.errors.TimeoutError is one
                break
        return msgs

    async def _check_stalled(self, delivered: int) -> None:
        """Idle while the stream has more: the consumer is gone (server restart) or stuck."""
        last = await self.stream_last_seq()
        if last > delivered:
            raise _Resubscribe(f"stalled at {delivered} while the stream is at {last}")

    async def _check_namespace(self, keys: ViewKeys) -> None:
        if self.fixed_namespace is None and await current_namespace(self.redis, self.prefix) != keys.namespace:
            raise _Resubscribe("the view namespace was switched")

    # ------------------------------------------------------------------ one batch, one transaction
    async def _apply(self, keys: ViewKeys, items: list[_Item], sub_start: int) -> None:
        watched = [keys.checkpoint] if self.fixed_namespace else [keys.checkpoint, pointer_key(self.prefix)]
        while True:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(*watched)
                    if self.fixed_namespace is None:
                        raw = await pipe.get(pointer_key(self.prefix))
                        if (raw or DEFAULT_NAMESPACE) != keys.namespace:
                            raise _Resubscribe("the view namespace was switched")
                    checkpoint = await read_checkpoint(pipe, keys)
                    if checkpoint + 1 < sub_start:
                        raise _Resubscribe(f"checkpoint went back to {checkpoint}")
                    todo = [i for i in items if i.seq > checkpoint]
                    self.checkpoint = checkpoint
                    if not todo:
                        return  # another replica applied all of it
                    envs = [i.env for i in todo if i.env is not None]
                    touch = BatchTouch(core.touched(e) for e in envs)
                    views, loaded = await load_batch(pipe, keys, touch, [e.id for e in envs])
                    known = set(views.applied)
                    for item in todo:
                        if item.env is not None:
                            core.apply(views, item.seq, item.env)
                    pipe.multi()
                    stage_batch(pipe, keys, loaded, views, known, todo[-1].seq)
                    await pipe.execute()
                self.checkpoint = todo[-1].seq
                self.applied_events += len(views.applied) - len(known)
                self.batches += 1
                return
            except WatchError:
                continue  # someone else committed meanwhile: re-read and apply only what is left


def _decode(msg: Msg, seq: int) -> Envelope | None:
    try:
        return Envelope.from_bytes(msg.data)
    except (ValidationError, ValueError) as exc:
        log.warning("skipping undecodable FLEET message %d: %s", seq, str(exc)[:200])
        return None
