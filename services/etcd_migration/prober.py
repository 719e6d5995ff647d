"""The availability prober: API requests through a control plane's public endpoint while an operation runs.

Every `interval_s` it sends one write and one read to the endpoint the clients use (the load
balancer after a migration), through the driver's `ProbeTarget`: on real etcd that is the v3 JSON
gateway (`/v3/kv/put`, `/v3/kv/range`), each request on a new connection so that it goes through
the load balancer's choice of backend, with a short timeout, so a request stuck on a cluster
without quorum counts as failed; the sim driver answers from the simulated control plane's state. Each outcome is
recorded with how many control-plane nodes were down at that moment (the `down` callable, e.g.
`driver.down_members`). Samples are kept in memory or, given a Redis key, appended there about
twice a second, so a restarted service continues the same tally (the time the service was dead
is not probed, and up to half a second of samples can be lost with it).

`summarize(samples)` is pure: requests, successes, % successful, the longest outage, and the
requests made while quorum was lost (more than one node down), which must all have failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

from redis.asyncio import Redis

from services.etcd_migration.drivers.base import ProbeTarget
from services.etcd_migration.drivers.etcd import INTERNAL_PREFIX, GatewayProbeTarget
from shared.events.models import ControlPlaneAvailability

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 0.5


@dataclass(frozen=True)
class ProbeSample:
    t: float  # wall-clock time the request was sent (s)
    op: str  # "put" | "range"
    ok: bool
    down: int  # control-plane nodes down when it was sent

    def encode(self) -> str:
        return json.dumps([round(self.t, 4), self.op, int(self.ok), self.down], separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> ProbeSample:
        t, op, ok, down = json.loads(raw)
        return cls(float(t), str(op), bool(ok), int(down))


def summarize(samples: Iterable[ProbeSample], quorum_lost_at: int = 2) -> ControlPlaneAvailability:
    """The availability the samples show. `downtime_s` is the longest run of consecutive failed requests,
    from its first failure to the next success (to its last failure if nothing succeeded after it);
    "without quorum" counts requests sent while `quorum_lost_at` (2 of 3) or more nodes were down."""
    ordered = sorted(samples, key=lambda s: s.t)
    succeeded = sum(s.ok for s in ordered)
    longest, run_start, last_failure = 0.0, None, 0.0
    for s in ordered:
        if not s.ok:
            run_start = s.t if run_start is None else run_start
            last_failure = s.t
        elif run_start is not None:
            longest, run_start = max(longest, s.t - run_start), None
    if run_start is not None:
        longest = max(longest, last_failure - run_start)
    without_quorum = [s for s in ordered if s.down >= quorum_lost_at]
    return ControlPlaneAvailability(
        requests=len(ordered),
        succeeded=succeeded,
        # Nothing probed is nothing failed: an operation too short for one request reports 100.
        availability_pct=round(100.0 * succeeded / len(ordered), 3) if ordered else 100.0,
        downtime_s=round(longest, 3),
        requests_without_quorum=len(without_quorum),
        succeeded_without_quorum=sum(s.ok for s in without_quorum),
    )


class Prober:
    def __init__(
        self,
        endpoint: str,
        down: Callable[[], Awaitable[int]],
        *,
        interval_s: float = 0.05,
        timeout_s: float = 1.0,
        redis: Redis | None = None,
        key: str | None = None,
        ttl_s: int = 7 * 86400,
        probe_key: bytes = INTERNAL_PREFIX + b"probe",
        target: Callable[[], ProbeTarget] | None = None,
    ) -> None:
        if (redis is None) != (key is None):
            raise ValueError("samples in Redis need both redis and key")
        self.endpoint = endpoint
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._down = down
        self._redis = redis
        self._key = key
        self._ttl_s = ttl_s
        self._probe_key = probe_key
        # Made in the probing task (an HTTP client belongs to the event loop it runs on).
        self._target = target or (lambda: GatewayProbeTarget(endpoint, timeout_s))
        self._kept: list[ProbeSample] = []  # all samples (in memory) or those not yet in Redis
        self._last_down = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._storing = asyncio.Lock()

    async def __aenter__(self) -> Prober:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self.stop()

    def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name=f"prober {self.endpoint}")

    async def stop(self) -> ControlPlaneAvailability:
        """Stop probing (in-flight requests finish or time out) and return the summary of every sample."""
        if self._task is not None:
            self._stop.set()
            await self._task
            self._task = None
        return await self.summary()

    async def samples(self) -> list[ProbeSample]:
        if self._redis is None or self._key is None:
            return list(self._kept)
        async with self._storing:  # not while a flush moves samples from memory to Redis: none twice, none lost
            stored = await self._redis.lrange(self._key, 0, -1)  # type: ignore[misc]
            return [ProbeSample.decode(r) for r in stored] + list(self._kept)

    async def summary(self) -> ControlPlaneAvailability:
        return summarize(await self.samples())

    async def clear(self) -> None:
        self._kept.clear()
        if self._redis is not None and self._key is not None:
            await self._redis.delete(self._key)

    async def _run(self) -> None:
        target = self._target()
        in_flight: set[asyncio.Task[None]] = set()
        # Requests stuck on a cluster without quorum pile up; past this many ticks, skip sending more.
        cap = max(4, int(self.timeout_s / self.interval_s) + 2)
        next_at, last_flush, seq = time.monotonic(), time.monotonic(), 0
        try:
            while not self._stop.is_set():
                if len(in_flight) < cap:
                    seq += 1
                    task = asyncio.create_task(self._tick(target, seq))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                if time.monotonic() - last_flush >= FLUSH_EVERY_S:
                    await self._flush()
                    last_flush = time.monotonic()
                next_at += self.interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*in_flight, return_exceptions=True)
        finally:
            await target.aclose()
            await self._flush()

    async def _tick(self, target: ProbeTarget, seq: int) -> None:
        sent = time.time()
        down, put_ok, range_ok = await asyncio.gather(
            self._count_down(),
            self._ok(asyncio.wait_for(target.put(self._probe_key, str(seq).encode()), self.timeout_s)),
            self._ok(asyncio.wait_for(target.get(self._probe_key), self.timeout_s)),
        )
        self._kept += [ProbeSample(sent, "put", put_ok, down), ProbeSample(sent, "range", range_ok, down)]

    async def _count_down(self) -> int:
        try:
            self._last_down = await self._down()
        except Exception as exc:  # the count is best effort: keep the last one rather than lose the sample
            log.debug("prober: counting down nodes failed: %s", exc)
        return self._last_down

    @staticmethod
    async def _ok(request: Awaitable[object]) -> bool:
        try:
            await request
            return True
        except Exception:  # any failure of the request (refused, reset, timeout, error status) is a failure
            return False

    async def _flush(self) -> None:
        if self._redis is None or self._key is None or not self._kept:
            return
        async with self._storing:
            batch, self._kept = self._kept, []
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.rpush(self._key, *(s.encode() for s in batch))
                    pipe.expire(self._key, self._ttl_s)
                    await pipe.execute()
            except Exception as exc:  # Redis away for a moment: keep them for the next flush
                log.warning("prober: storing %d samples failed: %s", len(batch), exc)
                self._kept = batch + self._kept
