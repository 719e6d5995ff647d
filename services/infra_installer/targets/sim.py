"""A simulated Kubernetes target whose clusters live in Redis, outside the installer process.

Keeping the simulated API server's objects in Redis (not in memory) makes restarts and
two installer replicas honest: what one process applied, the next one sees.

Keys (all under `<prefix>:simk8s:`):
- `<cluster_id>`        hash service -> JSON object {service, version, values, manager, generation}
- `<cluster_id>:log`    list of writes in the order they happened ("service@version")
- `<cluster_id>:stats`  hash of counters: `apply:<service>` (calls), `write:<service>` (changes)
- `_faults`             hash of injected faults, field `<kind>|<cluster_id or *>|<service>` -> times left
                        (cluster ids are DNS-style names, so `_faults` cannot clash with one)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from services.infra_installer.targets.base import FIELD_MANAGER, ClusterRef, InstallError, KubernetesTarget
from shared.config import Settings

FaultKind = Literal["apply", "unhealthy"]

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

    # ------------------------------------------------------------------ keys
    def objects_key(self, cluster_id: str) -> str:
        return f"{self.base}:{cluster_id}"

    def _log_key(self, cluster_id: str) -> str:
        return f"{self.base}:{cluster_id}:log"

    def _stats_key(self, cluster_id: str) -> str:
        return f"{self.base}:{cluster_id}:stats"

    @property
    def _faults_key(self) -> str:
        return f"{self.base}:_faults"

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

    async def _fault(self, kind: FaultKind, cluster_id: str, service: str) -> bool:
        fields = [f"{kind}|{cluster_id}|{service}", f"{kind}|*|{service}"]
        return bool(await self._take_fault(keys=[self._faults_key], args=fields))

    # ------------------------------------------------------------------ test / operator helpers
    async def add_fault(self, service: str, times: int = 1, cluster_id: str | None = None,
                        kind: FaultKind = "apply") -> None:  # fmt: skip
        """Make the next `times` applies (kind="apply") or health checks (kind="unhealthy") of `service` fail,
        on one cluster or on every cluster."""
        await self.redis.hincrby(self._faults_key, f"{kind}|{cluster_id or '*'}|{service}", times)

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
        await self.redis.delete(self.objects_key(cluster_id), self._log_key(cluster_id), self._stats_key(cluster_id))
