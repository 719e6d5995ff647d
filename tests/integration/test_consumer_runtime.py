"""The idempotent-consumer runtime against real nats-server and redis-server."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from nats.js import api as jsapi
from pydantic import BaseModel

from shared.bus import IdempotentConsumer, Outcome, Subscription
from shared.bus.connection import Bus
from shared.events import ClusterSetApplied, ClusterSetDeleted, Envelope, new_event, subjects
from shared.store import StateStore
from tests.helpers import wait_until

SERVICE = "testsvc"


class Tally(BaseModel):
    seen: list[str] = []


def deleted(name: str) -> Envelope:
    return new_event(ClusterSetDeleted(name=name), source="test")


class Recorder:
    """A handler that records each event in its aggregate state and fails on demand."""

    def __init__(self, fail_times: int = 0, always_fail: bool = False) -> None:
        self.calls: Counter[str] = Counter()
        self.fail_times = fail_times
        self.always_fail = always_fail

    async def handle(self, env: Envelope, state: Tally | None) -> Outcome[Tally]:
        self.calls[env.id] += 1
        if self.always_fail or self.calls[env.id] <= self.fail_times:
            raise RuntimeError("boom")
        state = state or Tally()
        return Outcome(state=Tally(seen=[*state.seen, env.id]))


_started: list[IdempotentConsumer] = []


@pytest.fixture(autouse=True)
async def _stop_consumers():
    yield
    while _started:
        await _started.pop().stop()


def make_consumer(bus: Bus, redis, recorder: Recorder, durable: str = "t", **kw) -> IdempotentConsumer[Tally]:
    store = StateStore(redis, bus.settings.redis_prefix, SERVICE, 3600)
    sub = Subscription(durable=durable, stream=subjects.STREAM_CLUSTERSETS, filter_subjects=["clusterset.deleted.>"],
                       state_model=Tally, handle=recorder.handle, **kw)  # fmt: skip
    consumer = IdempotentConsumer(bus, store, SERVICE, sub)
    _started.append(consumer)
    return consumer


async def load(bus: Bus, redis, key: str) -> Tally | None:
    return (await StateStore(redis, bus.settings.redis_prefix, SERVICE, 3600).load(key, Tally))[0]


async def test_handler_failing_once_is_redelivered_and_succeeds(bus, redis):
    rec = Recorder(fail_times=1)
    consumer = make_consumer(bus, redis, rec)
    await consumer.start()
    env = deleted("a")
    await bus.publish(env)
    await wait_until(lambda: consumer.processed == 1)
    assert rec.calls[env.id] == 2
    assert (await load(bus, redis, "a")).seen == [env.id]
    await consumer.stop()


async def test_two_consumers_of_one_service_each_handle_an_event_they_both_take(bus, redis):
    """Ledger entries are per durable: one consumer having handled an event does not hide it from the other."""
    first, second = Recorder(), Recorder()
    a = make_consumer(bus, redis, first, durable="t-a", key=lambda env: f"a:{env.subject}")
    b = make_consumer(bus, redis, second, durable="t-b", key=lambda env: f"b:{env.subject}")
    await a.start()
    await b.start()
    env = deleted("shared")
    await bus.publish(env)
    await wait_until(lambda: a.processed == 1 and b.processed == 1)
    assert (await load(bus, redis, "a:shared")).seen == [env.id]
    assert (await load(bus, redis, "b:shared")).seen == [env.id]


async def test_duplicate_publish_and_redelivery_apply_once(bus, redis):
    rec = Recorder()
    consumer = make_consumer(bus, redis, rec)
    await consumer.start()
    env = deleted("b")
    assert await bus.publish(env) is True
    assert await bus.publish(env) is False  # JetStream dedup inside the window
    await wait_until(lambda: consumer.processed == 1)
    # Beyond the window: the same event id arrives as a new message; the ledger skips it.
    await bus.js.publish(env.subject if False else subjects.clusterset_deleted("b"), env.to_bytes(),
                         stream=subjects.STREAM_CLUSTERSETS)  # fmt: skip
    await wait_until(lambda: consumer.processed == 2)
    assert (await load(bus, redis, "b")).seen == [env.id]
    assert rec.calls[env.id] == 1
    await consumer.stop()


async def test_poison_message_is_dead_lettered_and_consumer_moves_on(bus, redis):
    rec = Recorder()
    consumer = make_consumer(bus, redis, rec)
    await consumer.start()
    await bus.js.publish("clusterset.deleted.x", b"\x00not json", stream=subjects.STREAM_CLUSTERSETS)
    good = deleted("c")
    await bus.publish(good)
    await wait_until(lambda: consumer.processed == 1)
    dl = await bus.js.pull_subscribe("deadletter.>", durable="dl", stream=subjects.STREAM_DEADLETTER)
    msgs = await dl.fetch(1, timeout=5)
    assert msgs[0].data == b"\x00not json"
    assert "undecodable" in msgs[0].headers["Flotilla-Error"]
    assert msgs[0].headers["Flotilla-Original-Subject"] == "clusterset.deleted.x"
    await consumer.stop()


async def test_exhausted_retries_dead_letter_and_record_failure(bus, redis):
    rec = Recorder(always_fail=True)

    async def on_exhausted(env: Envelope, state: Tally | None, reason: str, error: BaseException) -> Outcome[Tally]:
        assert isinstance(error, RuntimeError)
        return Outcome(state=Tally(seen=[f"FAILED:{reason}"]))

    consumer = make_consumer(bus, redis, rec, on_exhausted=on_exhausted, max_deliver=3)
    await consumer.start()
    env = deleted("d")
    await bus.publish(env)

    async def failed() -> bool:
        t = await load(bus, redis, "d")
        return bool(t and t.seen and t.seen[0].startswith("FAILED"))

    await wait_until(failed)
    assert rec.calls[env.id] == 3
    info = await bus.js.stream_info(subjects.STREAM_DEADLETTER)
    assert info.state.messages == 1
    # Acked after dead-lettering: no further delivery.
    await asyncio.sleep(0.5)
    assert rec.calls[env.id] == 3
    await consumer.stop()


async def test_concurrent_events_on_one_aggregate_keep_every_update(bus, redis):
    """Two consumers (replicas) and many events for one aggregate: optimistic concurrency keeps all."""
    rec = Recorder()
    a = make_consumer(bus, redis, rec)
    b = make_consumer(bus, redis, rec)
    await a.start()
    await b.start()
    envs = [deleted("same") for _ in range(40)]
    await asyncio.gather(*(bus.publish(e) for e in envs))
    await wait_until(lambda: a.processed + b.processed >= 40)
    tally = await load(bus, redis, "same")
    assert sorted(tally.seen) == sorted(e.id for e in envs)
    await a.stop()
    await b.stop()


async def test_outbox_survives_crash_between_commit_and_publish(bus, redis):
    """State committed with its outbox but never published: the redelivery publishes it."""
    published: list[str] = []

    class Emitting(Recorder):
        async def handle(self, env: Envelope, state: Tally | None) -> Outcome[Tally]:
            out = await super().handle(env, state)
            follow = new_event(ClusterSetApplied(document={"metadata": {"name": "x"}}), source="t", cause=env)
            published.append(follow.id)
            return Outcome(state=out.state, events=[follow])

    rec = Emitting()
    consumer = make_consumer(bus, redis, rec)
    real_publish_all = bus.publish_all
    crashes = {"n": 0}

    async def flaky_publish_all(envelopes):
        if crashes["n"] == 0:
            crashes["n"] += 1
            raise ConnectionError("lost the connection right after commit")
        await real_publish_all(envelopes)

    bus.publish_all = flaky_publish_all  # type: ignore[method-assign]
    await consumer.start()
    env = deleted("e")
    await bus.publish(env)
    await wait_until(lambda: consumer.processed >= 1)
    await asyncio.sleep(0.3)
    assert rec.calls[env.id] == 1  # decided once; the retry only re-published the outbox
    info = await bus.js.stream_info(subjects.STREAM_CLUSTERSETS)
    assert info.state.messages == 2
    await consumer.stop()


async def test_consumer_config_is_reconciled_on_start(bus, redis):
    await bus.js.add_consumer(subjects.STREAM_CLUSTERSETS, jsapi.ConsumerConfig(
        durable_name="t", name="t", filter_subjects=["clusterset.deleted.>"], ack_wait=999, max_ack_pending=7))
    consumer = make_consumer(bus, redis, Recorder())
    await consumer.start()
    info = await bus.js.consumer_info(subjects.STREAM_CLUSTERSETS, "t")
    assert info.config.ack_wait == bus.settings.ack_wait_s
    assert info.config.max_ack_pending != 7
    await consumer.stop()


async def test_consumer_recovers_after_nats_restart_and_consumer_loss(bus, redis, nats_proc):
    rec = Recorder()
    consumer = make_consumer(bus, redis, rec)
    await consumer.start()
    await bus.publish(deleted("f1"))
    await wait_until(lambda: consumer.processed == 1)
    nats_proc.restart()
    await bus.publish(deleted("f2"))
    await wait_until(lambda: consumer.processed == 2, within=20)
    # The durable consumer deleted behind our back (operator error): the loop re-creates it.
    await bus.js.delete_consumer(subjects.STREAM_CLUSTERSETS, "t")
    await bus.publish(deleted("f3"))
    await wait_until(lambda: consumer.processed >= 3, within=20)
    await consumer.stop()


async def test_stop_naks_inflight_work_for_another_replica(bus, redis):
    class Slow(Recorder):
        async def handle(self, env, state):
            await asyncio.sleep(30)
            return await super().handle(env, state)

    slow = make_consumer(bus, redis, Slow())
    await slow.start()
    env = deleted("g")
    await bus.publish(env)
    await wait_until(lambda: bool(slow._inflight))
    await slow.stop()  # grace is 2 s in tests: the slow handler is cancelled and nak'ed
    fast_rec = Recorder()
    fast = make_consumer(bus, redis, fast_rec)
    await fast.start()
    await wait_until(lambda: fast.processed == 1)
    assert (await load(bus, redis, "g")).seen == [env.id]
    await fast.stop()


async def test_trace_context_flows_from_the_cause_to_the_events_it_produced(bus, redis):
    """One trace follows a chain of events across services: traceparent travels in NATS headers."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())

    class Emitting(Recorder):
        async def handle(self, env: Envelope, state: Tally | None) -> Outcome[Tally]:
            out = await super().handle(env, state)
            follow = new_event(ClusterSetApplied(document={"metadata": {"name": "y"}}), source="t", cause=env)
            return Outcome(state=out.state, events=[follow])

    consumer = make_consumer(bus, redis, Emitting())
    await consumer.start()
    with trace.get_tracer("test").start_as_current_span("user applies") as span:
        await bus.publish(deleted("h"))
        trace_id = format(span.get_span_context().trace_id, "032x")
    await wait_until(lambda: consumer.processed == 1)
    sub = await bus.js.pull_subscribe("clusterset.applied.>", durable="tp", stream=subjects.STREAM_CLUSTERSETS)
    msg = (await sub.fetch(1, timeout=5))[0]
    assert msg.headers["traceparent"].split("-")[1] == trace_id
