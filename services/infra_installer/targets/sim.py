"""A simulated Kubernetes target whose clusters live in Redis, outside the installer process.

Keeping the simulated API server's objects in Redis (not in memory) makes restarts and
two installer replicas honest: what one process applied, the next one sees.

Keys (all under `<prefix>:simk8s:`):
- `<cluster_id>`        hash service -> JSON object {service, version, values, manager, generation}
- `<cluster_id>:log`    list of writes in the order they happened ("service@version")
- `<cluster_id>:stats`  hash of counters: `apply:<service>` (calls), `write:<service>` (changes)
- `<cluster_id>:pods`   sorted set: the simulated workload's pods still on the cluster (drains evict from it)
- `<cluster_id>:drain`  hash: `seeded` (the workload was created), `cordoned`, `evicted`, `passes`
- `_faults`             hash of injected faults, field `<kind>|<cluster_id or *>|<service>` -> times left
                        (cluster ids are DNS-style names, so `_faults` cannot clash with one); kind `evict`
                        (service `*`) blocks every eviction of one drain pass per unit, like a budget that
                        never allows a disruption
- `_workload`           hash of workload settings, field `<setting>|<cluster_id or *>`: `pods` (how many pods
                        a cluster runs; by default 2..8, derived from its id) and `per_pass` (a disruption
                        budget: at most that many evictions per drain pass; by default no limit)

Drains: the workload is created on a cluster's first drain pass (so its size is fixed by then, whatever
happens to the installer), every pass cordons (once) and evicts what the budget allows, in pod order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import zlib
from collections.abc import Mapping
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from services.infra_installer.targets.base import (
    FIELD_MANAGER,
    ClusterRef,
    DrainReport,
    InstallError,
    KubernetesTarget,
)
from shared.config import Settings

FaultKind = Literal["apply", "unhealthy", "evict"]

# Take one unit from the first matching fault rule (cluster-specific first, then wildcard).
# KEYS[1] faults hash   ARGV: candidate fields in priority order   returns the field used, or false
_TAKE_FAULT = """
for i = 1, #ARGV do
  local n = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if n > 0 then
    if n == 1 then redis.call('HDEL', KEYS[1], ARGV[i]) else redis.call('HINCRBY', KEYS[1], ARGV[i], -1) end
    return ARGV[i]
  end
end
return false
"""

# Write the object unless an identical one is there. KEYS: objects, log, stats
# ARGV: service, new object json, digest, log entry. Returns 1 when written, 0 for a no-op.
_APPLY = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local obj = cjson.decode(current)
  if obj['digest'] == ARGV[3] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[3], 'write:' .. ARGV[1], 1)
return 1
"""


# One drain pass, atomically. KEYS: pods, drain, workload settings   ARGV: cluster id, default pod count,
# 1 when evictions are blocked in this pass. Returns {evicted, remaining, cordoned (0/1)}.
_DRAIN = """
local function setting(name)
  return redis.call('HGET', KEYS[3], name .. '|' .. ARGV[1]) or redis.call('HGET', KEYS[3], name .. '|*')
end
if redis.call('HSETNX', KEYS[2], 'seeded', 1) == 1 then
  local n = tonumber(setting('pods') or ARGV[2])
  for i = 0, n - 1 do redis.call('ZADD', KEYS[1], i, 'pod-' .. i) end
end
local cordoned = redis.call('HSETNX', KEYS[2], 'cordoned', 1)
redis.call('HINCRBY', KEYS[2], 'passes', 1)
local evicted = 0
if ARGV[3] ~= '1' then
  local left = redis.call('ZCARD', KEYS[1])
  local budget = tonumber(setting('per_pass') or left)
  if budget > left then budget = left end
  if budget > 0 then
    evicted = #redis.call('ZPOPMIN', KEYS[1], budget) / 2
    redis.call('HINCRBY', KEYS[2], 'evicted', evicted)
  end
end
return {evicted, redis.call('ZCARD', KEYS[1]), cordoned}
"""


class SimObject(BaseModel):
    """What the simulated API server holds for one infra service."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    service: str
    version: str
    values: dict[str, Any] = Field(default_factory=dict)
    digest: str
    manager: str = FIELD_MANAGER


def _digest(service: str, version: str, values: Mapping[str, Any]) -> str:
    canonical = json.dumps({"s": service, "v": version, "values": values}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def default_pods(cluster_id: str) -> int:
    """How many pods a simulated cluster runs unless configured: 2..8, the same for a cluster every time."""
    return 2 + zlib.crc32(cluster_id.encode()) % 7


def _text(value: bytes | str) -> str:
    """Works with clients created with or without decode_responses."""
    return value.decode() if isinstance(value, bytes) else value


class SimInstallError(InstallError):
    pass


class SimKubernetesTarget(KubernetesTarget):
    health_poll_s = 0.02

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.base = f"{settings.redis_prefix}:simk8s"
        self.latency_s = settings.sim_install_latency_s
        self.failure_rate = settings.sim_failure_rate
        self._rng = random.Random(settings.sim_seed)
        self._take_fault = redis.register_script(_TAKE_FAULT)
        self._apply = redis.register_script(_APPLY)
        self._drain = redis.register_script(_DRAIN)

    # ------------------------------------------------------------------ keys
    def objects_key(self, cluster_id: str) -> str:
        return f"{self.base}:{cluster_id}"

    def _log_key(self, cluster_id: str) -> str:
        return f"{self.base}:{cluster_id}:log"

    def _stats_key(self, cluster_id: str) -> str:
        return f"{self.base}:{cluster_id}:stats"

    def _pods_key(self, cluster_id: str) -> str:
        return f"{self.base}:{cluster_id}:pods"

    def _drain_key(self, cluster_id: str) -> str:
        return f"{self.base}:{cluster_id}:drain"

    @property
    def _faults_key(self) -> str:
        return f"{self.base}:_faults"

    @property
    def _workload_key(self) -> str:
        return f"{self.base}:_workload"

    # ------------------------------------------------------------------ the port
    async def apply_service(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]) -> None:
        cid = cluster.cluster_id
        await self.redis.hincrby(self._stats_key(cid), f"apply:{service}", 1)
        if await self._fault("apply", cid, service):
            raise SimInstallError(f"injected fault applying {service} on {cid}")
        if self.failure_rate and self._rng.random() < self.failure_rate:
            raise SimInstallError(f"simulated API error applying {service} on {cid}")
        digest = _digest(service, version, values)
        current = await self.redis.hget(self.objects_key(cid), service)
        if current is not None and SimObject.model_validate_json(current).digest == digest:
            return  # server-side apply of identical content: nothing changes, no latency
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        obj = SimObject(service=service, version=version, values=dict(values), digest=digest)
        await self._apply(keys=[self.objects_key(cid), self._log_key(cid), self._stats_key(cid)],
                          args=[service, obj.model_dump_json(), digest, f"{service}@{version}"])  # fmt: skip

    async def remove_service(self, cluster: ClusterRef, service: str) -> None:
        cid = cluster.cluster_id
        if await self.redis.hdel(self.objects_key(cid), service):
            await self.redis.rpush(self._log_key(cid), f"-{service}")

    async def correct_drift(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]
                            ) -> list[str]:  # fmt: skip
        current = await self.redis.hget(self.objects_key(cluster.cluster_id), service)
        if current is None or SimObject.model_validate_json(current).digest != _digest(service, version, values):
            await self.apply_service(cluster, service, version, values)
            return [service]
        return []

    async def tamper(self, cluster_id: str, service: str, values: Mapping[str, Any]) -> None:
        """Someone else edits a service's objects on the cluster (for drift tests)."""
        raw = await self.redis.hget(self.objects_key(cluster_id), service)
        assert raw is not None, f"{service} is not installed on {cluster_id}"
        current = SimObject.model_validate_json(raw)
        edited = SimObject(service=service, version=current.version, values=dict(values), manager="kubectl",
                           digest=_digest(service, current.version, values))  # fmt: skip
        await self.redis.hset(self.objects_key(cluster_id), service, edited.model_dump_json())

    async def service_healthy(self, cluster: ClusterRef, service: str) -> bool:
        if not await self.redis.hexists(self.objects_key(cluster.cluster_id), service):
            return False
        return not await self._fault("unhealthy", cluster.cluster_id, service)

    async def drain(self, cluster: ClusterRef) -> DrainReport:
        cid = cluster.cluster_id
        if self.failure_rate and self._rng.random() < self.failure_rate:
            raise SimInstallError(f"simulated API error draining {cid}")
        blocked = await self._fault("evict", cid, "*")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        evicted, remaining, cordoned = await self._drain(
            keys=[self._pods_key(cid), self._drain_key(cid), self._workload_key],
            args=[cid, default_pods(cid), "1" if blocked else "0"])  # fmt: skip
        return DrainReport(evicted=int(evicted), remaining=int(remaining), blocked=int(remaining),
                           cordoned=int(cordoned))  # fmt: skip

    async def uncordon(self, cluster: ClusterRef) -> int:
        cid = cluster.cluster_id
        if self.failure_rate and self._rng.random() < self.failure_rate:
            raise SimInstallError(f"simulated API error uncordoning {cid}")
        async with self.redis.pipeline(transaction=True) as pipe:
            # Schedulable again: the evicted pods' controllers put them back (the next drain starts from a full
            # workload); the counts of what earlier drains did stay.
            pipe.hdel(self._drain_key(cid), "cordoned", "seeded")
            pipe.delete(self._pods_key(cid))
            pipe.hincrby(self._drain_key(cid), "uncordoned", 1)
            was_cordoned, _, _ = await pipe.execute()
        return 1 if was_cordoned else 0  # the sim cordons a cluster's nodes as one

    async def _fault(self, kind: FaultKind, cluster_id: str, service: str) -> bool:
        fields = [f"{kind}|{cluster_id}|{service}", f"{kind}|*|{service}"]
        return bool(await self._take_fault(keys=[self._faults_key], args=fields))

    # ------------------------------------------------------------------ test / operator helpers
    async def add_fault(self, service: str, times: int = 1, cluster_id: str | None = None,
                        kind: FaultKind = "apply") -> None:  # fmt: skip
        """Make the next `times` applies (kind="apply") or health checks (kind="unhealthy") of `service` fail,
        on one cluster or on every cluster."""
        await self.redis.hincrby(self._faults_key, f"{kind}|{cluster_id or '*'}|{service}", times)

    async def block_evictions(self, passes: int = 10**6, cluster_id: str | None = None) -> None:
        """Make the next `passes` drain passes evict nothing (a disruption budget that allows nothing)."""
        await self.add_fault("*", passes, cluster_id, kind="evict")

    async def configure_workload(self, pods: int | None = None, evictions_per_pass: int | None = None,
                                 cluster_id: str | None = None) -> None:  # fmt: skip
        """Set the simulated workload of one cluster or of every cluster: its size (read at its first drain
        pass) and a disruption budget (at most `evictions_per_pass` evictions per pass)."""
        scope = cluster_id or "*"
        if pods is not None:
            await self.redis.hset(self._workload_key, f"pods|{scope}", pods)
        if evictions_per_pass is not None:
            await self.redis.hset(self._workload_key, f"per_pass|{scope}", evictions_per_pass)

    async def pods(self, cluster_id: str) -> list[str]:
        """The simulated pods still running on a cluster (empty before its first drain pass)."""
        members = cast(list[bytes | str], await self.redis.zrange(self._pods_key(cluster_id), 0, -1))
        return [_text(p) for p in members]

    async def drain_status(self, cluster_id: str) -> dict[str, int]:
        """`seeded`, `cordoned`, `evicted`, `passes` of a cluster's drains so far."""
        return {_text(k): int(v) for k, v in (await self.redis.hgetall(self._drain_key(cluster_id))).items()}

    async def clear_faults(self) -> None:
        await self.redis.delete(self._faults_key)

    async def installed(self, cluster_id: str) -> dict[str, SimObject]:
        """The services present on a simulated cluster, by name."""
        raw = await self.redis.hgetall(self.objects_key(cluster_id))
        return {_text(name): SimObject.model_validate_json(obj) for name, obj in raw.items()}

    async def write_log(self, cluster_id: str) -> list[str]:
        """Every write to the cluster in order, as "service@version"."""
        return [_text(entry) for entry in await self.redis.lrange(self._log_key(cluster_id), 0, -1)]

    async def stats(self, cluster_id: str) -> dict[str, int]:
        """Counters: `apply:<service>` = apply_service calls, `write:<service>` = actual changes."""
        return {_text(k): int(v) for k, v in (await self.redis.hgetall(self._stats_key(cluster_id))).items()}

    async def delete_cluster(self, cluster_id: str) -> None:
        """Forget a simulated cluster (its API server is gone). Not-found counts as done."""
        await self.redis.delete(self.objects_key(cluster_id), self._log_key(cluster_id), self._stats_key(cluster_id),
                                self._pods_key(cluster_id), self._drain_key(cluster_id))  # fmt: skip
