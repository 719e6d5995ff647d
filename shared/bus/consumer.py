"""The idempotent-consumer runtime every service uses.

Per message: decode → skip if already processed (ledger) → load aggregate state →
handler → atomic commit (state with version check + ledger + outbox) → publish outbox →
ack. Failures are nak'ed with backoff; after `max_deliver` attempts the message goes to
DEADLETTER with its error, the subscription's `on_exhausted` may record the failure
(e.g. mark the cluster FAILED), and the consumer moves on. Undecodable bytes are
dead-lettered at once: a poisoned message never blocks a consumer.

The fetch loop is ours, not FastStream's: we need per-aggregate serialization inside a
batch, nak delays per attempt, re-binding when a consumer vanished after a server
restart, and consumer config reconciled at start-up (see ARCHITECTURE.md, traps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js import api as jsapi
from nats.js.errors import NotFoundError, ServiceUnavailableError
from pydantic import BaseModel, ValidationError

from shared.bus.connection import Bus
from shared.events import EVENT_TYPES, Envelope, subjects
from shared.store import CommitResult, StateStore
from shared.telemetry import consume_span

log = logging.getLogger("flotilla.consumer")

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class Outcome(Generic[S]):
    """What a handler decided: the aggregate's new state (None = unchanged) and events to publish."""

    state: S | None = None
    events: Sequence[Envelope] = ()


Handler = Callable[[Envelope, S | None], Awaitable[Outcome[S]]]
# (event, state, reason, the last error): the error lets a handler report structured detail (e.g. which object).
ExhaustedHandler = Callable[[Envelope, S | None, str, BaseException], Awaitable[Outcome[S]]]


class RetryableError(Exception):
    """A handler failure worth another delivery (throttling, a cloud operation still running)."""


@dataclass
class Subscription(Generic[S]):
    durable: str
    stream: str
    filter_subjects: list[str]
    state_model: type[S]
    handle: Handler[S]
    # Aggregate key from the event; the envelope subject is the aggregate id by default.
    key: Callable[[Envelope], str] = field(default=lambda env: env.subject)
    on_exhausted: ExhaustedHandler[S] | None = None
    max_deliver: int | None = None  # overrides the settings' default


def _delivery_count(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


class IdempotentConsumer(Generic[S]):
    def __init__(self, bus: Bus, store: StateStore, service: str, sub: Subscription[S]) -> None:
        self.bus, self.store, self.service, self.sub = bus, store, service, sub
        self.settings = bus.settings
        self.max_deliver = sub.max_deliver or self.settings.max_deliver
        self._running = False
        self._loop_task: asyncio.Task[None] | None = None
        self._psub: Any = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.settings.max_inflight)
        self._locks: dict[str, asyncio.Lock] = {}
        self.processed = 0  # for tests and metrics

    # ------------------------------------------------------------------ lifecycle
    def consumer_config(self) -> jsapi.ConsumerConfig:
        return jsapi.ConsumerConfig(
            name=self.sub.durable,
            durable_name=self.sub.durable,
            filter_subjects=self.sub.filter_subjects,
            ack_policy=jsapi.AckPolicy.EXPLICIT,
            deliver_policy=jsapi.DeliverPolicy.ALL,
            ack_wait=self.settings.ack_wait_s,
            # Unlimited at the server: the runtime counts attempts and dead-letters itself, so a
            # crash during the last attempt cannot drop the message silently.
            max_deliver=-1,
            max_ack_pending=max(self.settings.max_inflight * 4, 256),
            max_waiting=512,
        )

    async def reconcile(self) -> None:
        """Create the durable consumer, or update it: an existing one keeps stale config otherwise."""
        await self.bus.js.add_consumer(self.sub.stream, self.consumer_config())

    async def start(self) -> None:
        await self.reconcile()
        self._running = True
        self._loop_task = asyncio.create_task(self._fetch_loop(), name=f"fetch-{self.sub.durable}")

    async def stop(self) -> None:
        """Stop fetching; give in-flight work the grace period, then nak what is left."""
        self._running = False
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=self.settings.shutdown_grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def idle(self) -> bool:
        return not self._inflight

    async def handle_local(self, env: Envelope) -> None:
        """Handle an event that was not delivered — a service's own periodic nudge — through the same
        path as a delivered one: per-aggregate lock, ledger, versioned state, outbox. Its id must be
        deterministic (e.g. per time bucket) so that replicas nudging at once do the work once."""
        key = self.sub.key(env)
        async with self._locks.setdefault(key, asyncio.Lock()):
            attrs = {"event.id": env.id, "event.type": env.type, "aggregate": key}
            with consume_span(f"{self.service} handle {env.type}", None, attrs):
                await self._handle(env, key)

    # ------------------------------------------------------------------ fetch loop
    async def _fetch_loop(self) -> None:
        try:
            await self._fetch_until_stopped()
        finally:
            # A leftover pull subscription makes nc.drain() wait for its timeout on shutdown.
            await self._unbind()

    async def _fetch_until_stopped(self) -> None:
        failures = 0
        while self._running:
            try:
                if self._psub is None:
                    await self.reconcile()
                    self._psub = await self.bus.js.pull_subscribe_bind(
                        durable=self.sub.durable, stream=self.sub.stream
                    )
                free = self.settings.max_inflight - len(self._inflight)
                if free <= 0:
                    await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await self._psub.fetch(batch=min(free, self.settings.fetch_batch), timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                failures = 0
                for msg in msgs:
                    task = asyncio.create_task(self._process(msg))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
            except asyncio.CancelledError:
                raise
            except (NotFoundError, ServiceUnavailableError) as exc:
                # The consumer (or the stream leader) went away, e.g. after a server restart: rebind.
                failures += 1
                log.warning("consumer %s unavailable (%s); re-binding", self.sub.durable, exc)
                await self._unbind()
                await asyncio.sleep(min(0.2 * 2**failures, 5))
            except Exception as exc:  # connection trouble: back off, keep going
                failures += 1
                log.warning("fetch failed on %s: %r", self.sub.durable, exc)
                if failures > 3:
                    await self._unbind()
                await asyncio.sleep(min(0.2 * 2**failures, 5))

    async def _unbind(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(psub.unsubscribe(), 2)

    # ------------------------------------------------------------------ one message
    async def _process(self, msg: Msg) -> None:
        deliveries = _delivery_count(msg)
        try:
            env = Envelope.from_bytes(msg.data)
            if env.type not in EVENT_TYPES:
                raise ValueError(f"unknown event type {env.type!r}")
        except (ValidationError, ValueError) as exc:
            try:
                await self._dead_letter(msg, f"undecodable message: {exc}"[:2000], deliveries)
            except Exception:  # keep it: better redelivered than lost
                await msg.nak(delay=self.settings.backoff_for(deliveries))
                return
            await msg.term()
            return
        key = self.sub.key(env)
        lock = self._locks.setdefault(key, asyncio.Lock())
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            async with lock:
                attrs = {"event.id": env.id, "event.type": env.type, "aggregate": key,
                         "delivery": deliveries}  # fmt: skip
                with consume_span(f"{self.service} handle {env.type}", msg.headers, attrs):
                    await self._handle(env, key)
            await msg.ack()
            self.processed += 1
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception as exc:
            await self._on_failure(msg, env, key, exc, deliveries)
        finally:
            heartbeat.cancel()
            if not lock.locked() and not lock._waiters:  # type: ignore[attr-defined]
                self._locks.pop(key, None)

    async def _heartbeat(self, msg: Msg) -> None:
        """Tell the server we are still working so a long handler is not redelivered meanwhile."""
        with contextlib.suppress(Exception):
            while True:
                await asyncio.sleep(self.settings.ack_wait_s / 3)
                await msg.in_progress()

    async def _handle(self, env: Envelope, key: str) -> None:
        entry = self.ledger_entry(env)
        for _ in range(20):
            processed, state, version = await self.store.load_unless_processed(key, self.sub.state_model, entry)
            if processed:  # handled before (maybe by another replica): make sure its events went out
                await self._flush_outbox(entry)
                return
            outcome = await asyncio.wait_for(
                self.sub.handle(env, state), timeout=self.settings.handler_timeout_s
            )
            result = await self.store.commit(key, version, outcome.state, entry, outcome.events)
            if result is CommitResult.COMMITTED:
                # The events are in hand: publish them without reading the outbox back.
                if outcome.events:
                    await self.bus.publish_all(outcome.events)
                    await self.store.clear_outbox(entry)
                return
            if result is CommitResult.ALREADY_PROCESSED:
                await self._flush_outbox(entry)
                return
            log.info("version conflict on %s, re-deciding %s", key, env.id)
        raise RetryableError(f"state of {key} kept changing under {env.id}")

    def ledger_entry(self, env: Envelope) -> str:
        """The ledger (and outbox) entry of an event for this consumer: per durable, so that two consumers of
        one service that both take an event each handle it (replicas share the durable, so they dedup)."""
        return f"{self.sub.durable}:{env.id}"

    async def _flush_outbox(self, event_id: str) -> None:
        events = await self.store.outbox(event_id)
        if events:
            await self.bus.publish_all(events)
            await self.store.clear_outbox(event_id)

    async def _on_failure(self, msg: Msg, env: Envelope, key: str, exc: Exception, deliveries: int) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        if deliveries < self.max_deliver:
            delay = self.settings.backoff_for(deliveries)
            log.warning("handling %s failed (attempt %d/%d), retry in %.1fs: %s", env.type, deliveries,
                        self.max_deliver, delay, reason, extra={"event_id": env.id, "aggregate": key})  # fmt: skip
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)
            return
        log.error("giving up on %s after %d attempts: %s", env.type, deliveries, reason,
                  extra={"event_id": env.id, "aggregate": key})  # fmt: skip
        try:
            await self._dead_letter(msg, reason, deliveries)
            if self.sub.on_exhausted is not None:
                async with self._locks.setdefault(key, asyncio.Lock()):
                    await self._record_exhausted(env, key, reason, exc)
            await msg.ack()
        except Exception as exc2:  # the dead-letter path itself failed: try again later
            log.error("dead-lettering %s failed: %r", env.id, exc2)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.settings.backoff_for(deliveries))

    async def _record_exhausted(self, env: Envelope, key: str, reason: str, error: BaseException) -> None:
        assert self.sub.on_exhausted is not None
        for _ in range(20):
            state, version = await self.store.load(key, self.sub.state_model)
            outcome = await self.sub.on_exhausted(env, state, reason, error)
            result = await self.store.commit(key, version, outcome.state, self.ledger_entry(env), outcome.events)
            if result is not CommitResult.CONFLICT:
                break
        await self._flush_outbox(self.ledger_entry(env))

    async def _dead_letter(self, msg: Msg, reason: str, deliveries: int) -> None:
        meta_seq = ""
        with contextlib.suppress(Exception):
            meta_seq = str(msg.metadata.sequence.stream)
        headers = {
            "Flotilla-Error": reason.replace("\n", " ")[:1000],
            "Flotilla-Service": self.service,
            "Flotilla-Original-Subject": msg.subject,
            "Flotilla-Original-Stream-Seq": meta_seq,
            "Flotilla-Deliveries": str(deliveries),
            "Nats-Msg-Id": f"dl:{self.service}:{self.sub.durable}:{meta_seq or id(msg)}",
        }
        await self.bus.publish_raw(
            subjects.deadletter(self.service, msg.subject), msg.data, headers, subjects.STREAM_DEADLETTER
        )
