"""Injected driver faults, shared by the `local` and `sim` ControlPlaneDrivers.

A `Fault` makes the next `times` calls of one driver method (for one cluster or any) stall
and/or raise `DriverError`, before the method's work or after it (its effect happened but the
caller never hears of it). Given a Redis, the faults live there, so a test in another process
can make a step of the running service fail; without one they are in memory.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar, cast

from redis.asyncio import Redis

from services.etcd_migration.drivers.base import ControlPlaneDriver, ControlPlaneRef, DriverError

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])

STEPS = frozenset(n for n in dir(ControlPlaneDriver) if not n.startswith("_"))


@dataclass(frozen=True)
class Fault:
    """Make a driver step misbehave, for tests: stall `delay_s`, then (if `fail`) raise DriverError."""

    step: str  # a ControlPlaneDriver method name
    times: int = 1
    cluster_id: str | None = None  # None: any cluster
    delay_s: float = 0.0  # long enough for a test to SIGKILL the service in the middle of the step
    fail: bool = True
    after: bool = False  # at the end of the step: its effect happened but the caller never hears of it
    retryable: bool = False

    def field(self) -> str:
        return f"{self.cluster_id or '*'}|{self.step}|{'after' if self.after else 'before'}"


# KEYS: specs, counts  ARGV: fields, in order -> the spec of the first that fires now (one round trip per check)
_TAKE_FAULT = """
for _, field in ipairs(ARGV) do
  local spec = redis.call('HGET', KEYS[1], field)
  if spec and redis.call('HINCRBY', KEYS[2], field, -1) >= 0 then return spec end
end
return nil
"""


class FaultBook:
    """Where a driver's injected faults are kept (Redis, shared between processes, or memory)."""

    def __init__(self, redis: Redis | None, prefix: str, name: str) -> None:
        self._redis = redis
        self._keys = [f"{prefix}:{{etcd_migration}}:{name}-faults:{k}" for k in ("specs", "counts")]
        self._take_script = redis.register_script(_TAKE_FAULT) if redis is not None else None
        self._memory: dict[str, tuple[Fault, int]] = {}

    async def inject(self, fault: Fault) -> None:
        if fault.step not in STEPS:
            raise ValueError(f"no driver step {fault.step!r}")
        if self._redis is not None:
            specs, counts = self._keys
            await self._redis.hset(specs, fault.field(), json.dumps(asdict(fault)))  # type: ignore[misc]
            await self._redis.hset(counts, fault.field(), fault.times)  # type: ignore[misc]
        else:
            self._memory[fault.field()] = (fault, fault.times)

    async def clear(self) -> None:
        self._memory.clear()
        if self._redis is not None:
            await self._redis.delete(*self._keys)

    async def _take(self, fields: list[str]) -> Fault | None:
        if self._take_script is not None:
            raw = await self._take_script(keys=self._keys, args=fields)
            return Fault(**json.loads(raw)) if raw else None
        for field in fields:
            entry = self._memory.get(field)
            if entry is not None and entry[1] > 0:
                self._memory[field] = (entry[0], entry[1] - 1)
                return entry[0]
        return None

    async def check(self, ref: ControlPlaneRef, step: str, after: bool) -> None:
        """Fire the fault armed for this call, if any (the cluster's own first, else one for any cluster)."""
        if not self._memory and self._redis is None:
            return
        when = "after" if after else "before"
        fault = await self._take([f"{scope}|{step}|{when}" for scope in (ref.cluster_id, "*")])
        if fault is None:
            return
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.fail:
            raise DriverError(f"injected fault: {step} ({when})", retryable=fault.retryable)


class FaultInjection:
    """What a driver offers tests: `inject`, `fail_on`, `clear_faults` (it sets `self.fault_book`)."""

    fault_book: FaultBook

    async def inject(self, fault: Fault) -> None:
        await self.fault_book.inject(fault)

    async def fail_on(self, step: str, times: int = 1, *, cluster_id: str | None = None,
                      retryable: bool = False, after: bool = False) -> None:  # fmt: skip
        """The next `times` calls of `step` raise DriverError (at the start, or after the step's work)."""
        await self.inject(Fault(step, times, cluster_id, retryable=retryable, after=after))

    async def clear_faults(self) -> None:
        await self.fault_book.clear()


class _Lockable(Protocol):
    fault_book: FaultBook

    def _locked(self, cluster_id: str) -> AbstractAsyncContextManager[None]: ...


def driver_step(*, lock: bool = True) -> Callable[[F], F]:
    """A driver step: injected faults before and after it, and (if `lock`) one step per cluster at a time."""

    def wrap(fn: F) -> F:
        step = fn.__name__

        @functools.wraps(fn)
        async def run(self: _Lockable, ref: ControlPlaneRef, *args: Any, **kwargs: Any) -> Any:
            await self.fault_book.check(ref, step, after=False)
            if lock:
                async with self._locked(ref.cluster_id):
                    result = await fn(self, ref, *args, **kwargs)
            else:
                result = await fn(self, ref, *args, **kwargs)
            await self.fault_book.check(ref, step, after=True)
            return result

        return cast(F, run)

    return wrap
