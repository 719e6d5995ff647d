"""A simulated cloud whose whole state lives in Redis, outside any provisioner process.

It behaves like a cloud API, so that restarts, crashes and racing replicas are tested
honestly:
- `create` always makes a NEW resource with a new random id (like AWS CreateVpc), unless a
  client request token that was already used is passed: then it returns the resource
  created with that token (atomic, in a Lua script). Tokens outlive their resource for a
  while (a tombstone, like EC2 client tokens): a late create with a deleted resource's
  token gets that deleted resource back instead of a fresh one.
- Operations complete asynchronously: a new resource is CREATING until `ready_at`
  (latency ± jitter), then ACTIVE; an updated one (attributes and tags changed in place) is
  UPDATING until its new `ready_at`; a deleted one is DELETING until `delete_at`, then gone.
  Status is derived from the clock at read time; gone resources are purged lazily. Like most
  clouds, an update or a delete is refused (ResourceInUse, retryable) while another operation runs.
- Throttling and server errors are injected at configured rates (seeded RNG when a seed
  is set), and deterministic fault rules stored in Redis can be added at run time.
- `inventory` counts live resources per cluster and kind (for tests and operators).

Keys: f"{prefix}:simcloud:{{sim}}:..." (one hash tag, so the scripts also run on Redis Cluster).
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.asyncio import Redis

from services.cloud_provisioner.providers.base import (
    TAG_CLUSTER,
    ResourceNotFoundError,
    ThrottlingError,
    TransientCloudError,
    cloud_error,
)
from shared.config import Settings

Status = Literal["CREATING", "UPDATING", "ACTIVE", "DELETING"]
Op = Literal["create", "update", "delete", "get", "list", "*"]

TOKEN_TTL_S = 24 * 3600
ID_PREFIX = {"network": "vpc", "cluster": "cl", "node_pool": "np", "iam_role": "role", "log_stream": "ls"}

# KEYS[1]=token key  KEYS[2]=resource key  KEYS[3]=stats  KEYS[4..]=index sets
# ARGV[1]=id  ARGV[2]=has token ('1'/'0')  ARGV[3]=token ttl  ARGV[4]=stats field  ARGV[5..]=hash field/value pairs
_CREATE = """
if ARGV[2] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[3]))
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(fields))
for i = 4, #KEYS do redis.call('SADD', KEYS[i], ARGV[1]) end
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
return {1, ARGV[1]}
"""

# KEYS[1]=resource  KEYS[2]=stats   ARGV[1]=now  ARGV[2]=delete_at  ARGV[3]=stats field
# Returns 0 not found, -1 still creating (in use), 2 already deleting, 1 delete started.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'DELETING' then return 2 end
if (st == 'CREATING' or st == 'UPDATING') and tonumber(redis.call('HGET', KEYS[1], 'ready_at')) > tonumber(ARGV[1])
then return -1 end
redis.call('HSET', KEYS[1], 'status', 'DELETING', 'delete_at', ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return 1
"""

# KEYS[1]=resource  KEYS[2]=stats  KEYS[3..2+n]=tag index sets to leave  KEYS[3+n..]=tag index sets to join
# ARGV[1]=now  ARGV[2]=ready_at  ARGV[3]=stats field  ARGV[4]=tags as read (the update applies to them only)
# ARGV[5]=new tags  ARGV[6]=new attrs  ARGV[7]=id  ARGV[8]=n
# Returns 0 not found, -1 an operation still runs (in use), 2 deleting, -2 tags changed since read, 1 started.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'DELETING' then return 2 end
if (st == 'CREATING' or st == 'UPDATING') and tonumber(redis.call('HGET', KEYS[1], 'ready_at')) > tonumber(ARGV[1])
then return -1 end
if redis.call('HGET', KEYS[1], 'tags') ~= ARGV[4] then return -2 end
redis.call('HSET', KEYS[1], 'status', 'UPDATING', 'ready_at', ARGV[2], 'tags', ARGV[5], 'attrs', ARGV[6])
local n = tonumber(ARGV[8])
for i = 3, 2 + n do redis.call('SREM', KEYS[i], ARGV[7]) end
for i = 3 + n, #KEYS do redis.call('SADD', KEYS[i], ARGV[7]) end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return 1
"""

# KEYS[1]=faults hash   ARGV[1]=op  ARGV[2]=kind  ARGV[3]=name
# Returns the first matching rule (consuming one of its `remaining` uses) or false.
_FAULT = """
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = cjson.decode(all[i + 1])
  local prefix = f['name_prefix']
  if (f['op'] == '*' or f['op'] == ARGV[1]) and (f['kind'] == '*' or f['kind'] == ARGV[2])
     and string.sub(ARGV[3], 1, string.len(prefix)) == prefix then
    local left = tonumber(f['remaining'])
    if left < 0 then return all[i + 1] end
    if left > 0 then
      if left == 1 then
        redis.call('HDEL', KEYS[1], all[i])
      else
        f['remaining'] = left - 1
        redis.call('HSET', KEYS[1], all[i], cjson.encode(f))
      end
      return all[i + 1]
    end
  end
end
return false
"""


@dataclass(frozen=True)
class SimResource:
    id: str
    kind: str
    name: str
    status: Status
    tags: dict[str, str]
    attrs: dict[str, Any]
    created_at: float
    ready_at: float
    delete_at: float | None = None
    client_token: str | None = None


@dataclass(frozen=True)
class FaultRule:
    id: str
    kind: str = "*"
    name_prefix: str = ""
    op: Op = "create"
    code: str = "InternalError"
    message: str = ""
    retryable: bool = True
    remaining: int = -1  # -1: until removed


@dataclass(frozen=True)
class _Rates:
    latency_s: float = 0.0
    jitter: float = 0.0
    throttle_rate: float = 0.0
    failure_rate: float = 0.0


Resources = list[SimResource]  # spelled once: the class below has a method named `list`


class SimCloud:
    """Client of the simulated cloud. Cheap to create; every instance sees the same cloud."""

    def __init__(
        self,
        redis: Redis,
        prefix: str = "flotilla",
        *,
        latency_s: float = 0.0,
        latency_jitter: float = 0.0,
        throttle_rate: float = 0.0,
        failure_rate: float = 0.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.base = f"{prefix}:simcloud:{{sim}}"
        self.rates = _Rates(latency_s, latency_jitter, throttle_rate, failure_rate)
        # Only latency and fault draws use the (seedable) RNG; ids are always unique.
        self.rng = random.Random(seed)
        self.clock = clock
        self._create = redis.register_script(_CREATE)
        self._delete = redis.register_script(_DELETE)
        self._update = redis.register_script(_UPDATE)
        self._fault = redis.register_script(_FAULT)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> SimCloud:
        return cls(
            redis, settings.redis_prefix, latency_s=settings.sim_latency_s, latency_jitter=settings.sim_latency_jitter,
            throttle_rate=settings.sim_throttle_rate, failure_rate=settings.sim_failure_rate, seed=settings.sim_seed,
        )  # fmt: skip

    # ------------------------------------------------------------------ keys
    def _res(self, rid: str) -> str:
        return f"{self.base}:res:{rid}"

    def _token(self, token: str) -> str:
        return f"{self.base}:token:{token}"

    def _kind_idx(self, kind: str) -> str:
        return f"{self.base}:idx:kind:{kind}"

    def _tag_idx(self, key: str, value: str) -> str:
        return f"{self.base}:idx:tag:{key}={value}"

    @property
    def _kinds(self) -> str:
        return f"{self.base}:kinds"

    @property
    def _stats(self) -> str:
        return f"{self.base}:stats"

    @property
    def _faults(self) -> str:
        return f"{self.base}:faults"

    # Redis answers are typed loosely (bytes | str); this client decodes responses, so they are str.
    async def _hash(self, key: str) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(key))

    async def _ids(self, *sets: str) -> list[str]:
        return sorted(cast(set[str], await self.redis.sinter(list(sets))))

    # ------------------------------------------------------------------ fault injection
    def _latency(self) -> float:
        r = self.rates
        return max(0.0, r.latency_s * (1 + self.rng.uniform(-r.jitter, r.jitter))) if r.latency_s else 0.0

    async def _inject(self, op: str, kind: str, name: str) -> None:
        """Before a call: throttling and server errors by rate, then the deterministic rules."""
        if self.rates.throttle_rate and self.rng.random() < self.rates.throttle_rate:
            await self.redis.hincrby(self._stats, f"throttled:{op}", 1)
            raise ThrottlingError("Throttling", f"Rate exceeded ({op} {kind})")
        if self.rates.failure_rate and op in ("get", "list") and self.rng.random() < self.rates.failure_rate:
            raise TransientCloudError("InternalError", f"simulated server error on {op} {kind}")
        raw = await self._fault(keys=[self._faults], args=[op, kind, name])
        if raw:
            rule = json.loads(raw)
            await self.redis.hincrby(self._stats, f"faulted:{op}:{kind}", 1)
            raise cloud_error(rule["code"], rule.get("message") or f"injected fault on {op} {kind} {name}",
                              bool(rule["retryable"]))  # fmt: skip

    def _maybe_fail_after(self, op: str, kind: str) -> None:
        """A mutating call whose effect happened but whose answer got lost: why client tokens exist."""
        if self.rates.failure_rate and self.rng.random() < self.rates.failure_rate:
            raise TransientCloudError("InternalError", f"simulated server error after {op} {kind}")

    async def add_fault(
        self,
        *,
        kind: str = "*",
        name_prefix: str = "",
        code: str = "InternalError",
        retryable: bool = True,
        times: int | None = None,
        op: Op = "create",
        message: str = "",
    ) -> str:
        """Make matching calls fail with `code`, `times` times (None: until removed). Returns the rule id."""
        remaining = -1 if times is None else int(times)
        rule = FaultRule(id=uuid.uuid4().hex[:12], kind=kind, name_prefix=name_prefix, op=op, code=code,
                         message=message, retryable=retryable, remaining=remaining)  # fmt: skip
        if rule.remaining == 0:
            return rule.id
        await self.redis.hset(self._faults, rule.id, json.dumps(rule.__dict__))
        return rule.id

    async def remove_fault(self, fault_id: str) -> None:
        await self.redis.hdel(self._faults, fault_id)

    async def clear_faults(self) -> None:
        await self.redis.delete(self._faults)

    async def faults(self) -> list[FaultRule]:
        return [FaultRule(**json.loads(v)) for v in (await self._hash(self._faults)).values()]

    # ------------------------------------------------------------------ resources
    def _decode(self, raw: Mapping[str, str]) -> SimResource | None:
        """The resource as of now, or None when it is gone (deleted and its delete finished)."""
        if not raw or "id" not in raw:
            return None
        now = self.clock()
        status: Status = raw["status"]  # type: ignore[assignment]
        ready_at = float(raw["ready_at"])
        delete_at = float(raw["delete_at"]) if raw.get("delete_at") else None
        if status == "DELETING" and delete_at is not None and now >= delete_at:
            return None
        if status in ("CREATING", "UPDATING") and now >= ready_at:
            status = "ACTIVE"
        return SimResource(
            id=raw["id"], kind=raw["kind"], name=raw["name"], status=status, tags=json.loads(raw["tags"]),
            attrs=json.loads(raw["attrs"]), created_at=float(raw["created_at"]), ready_at=ready_at,
            delete_at=delete_at, client_token=raw.get("token") or None,
        )  # fmt: skip

    async def _purge(self, raw: Mapping[str, str]) -> None:
        """Remove a gone resource and its index entries (idempotent; the token stays as a tombstone)."""
        rid = raw["id"]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self._res(rid))
        pipe.srem(self._kind_idx(raw["kind"]), rid)
        for k, v in json.loads(raw["tags"]).items():
            pipe.srem(self._tag_idx(k, v), rid)
        await pipe.execute()

    async def _load(self, rids: list[str]) -> Resources:
        if not rids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.hgetall(self._res(rid))
        out: list[SimResource] = []
        for raw in cast(list[dict[str, str]], await pipe.execute()):
            res = self._decode(raw)
            if res is not None:
                out.append(res)
            elif raw:
                await self._purge(raw)
        return out

    def _attrs_for(self, kind: str, rid: str, attrs: dict[str, Any]) -> dict[str, Any]:
        """What the cloud itself fills in (endpoint, certificates, subnet ids)."""
        out = dict(attrs)
        if kind == "cluster":
            out.setdefault("endpoint", f"https://{rid}.sim.flotilla.dev")
            out.setdefault("ca_fingerprint", "sha256:" + hashlib.sha256(f"ca:{rid}".encode()).hexdigest())
        if kind == "network":
            count = int(out.pop("subnet_count", 3))
            out.setdefault("subnet_ids", [f"subnet-{secrets.token_hex(8)}" for _ in range(count)])
        return out

    async def create(
        self,
        kind: str,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        attrs: Mapping[str, Any] | None = None,
        client_token: str | None = None,
    ) -> SimResource:
        """Start creating a resource (CREATING until ready). Same token → the same resource, never a second."""
        await self._inject("create", kind, name)
        rid = f"{ID_PREFIX.get(kind, kind.replace('_', '-'))}-{secrets.token_hex(8)}"
        now = self.clock()
        tags = dict(tags or {})
        fields: dict[str, str] = {
            "id": rid, "kind": kind, "name": name, "status": "CREATING", "created_at": repr(now),
            "ready_at": repr(now + self._latency()), "delete_at": "", "token": client_token or "",
            "tags": json.dumps(tags, sort_keys=True),
            "attrs": json.dumps(self._attrs_for(kind, rid, dict(attrs or {}))),
        }  # fmt: skip
        index = [self._kind_idx(kind), *(self._tag_idx(k, v) for k, v in tags.items())]
        args: list[str] = [rid, "1" if client_token else "0", str(TOKEN_TTL_S), f"created:{kind}"]
        for k, v in fields.items():
            args += [k, v]
        await self.redis.sadd(self._kinds, kind)  # kind names, for listing everything
        new, got = await self._create(
            keys=[self._token(client_token or "-"), self._res(rid), self._stats, *index], args=args
        )
        if int(new) == 1:
            self._maybe_fail_after("create", kind)
        raw = await self._hash(self._res(got))
        res = self._decode(raw)
        if res is None:  # the token's resource was deleted since: what the cloud reports for it
            raise ResourceNotFoundError("NotFound", f"{kind} {got} (client token {client_token}) no longer exists")
        return res

    async def get(self, resource_id: str) -> SimResource:
        raw = await self._hash(self._res(resource_id))
        res = self._decode(raw)
        if res is None:
            if raw:
                await self._purge(raw)
            raise ResourceNotFoundError("NotFound", f"resource {resource_id} does not exist")
        await self._inject("get", res.kind, res.name)
        return res

    async def list(self, kind: str | None = None, tags: Mapping[str, str] | None = None) -> Resources:
        """Live resources (CREATING, ACTIVE or DELETING) of a kind whose tags include `tags`."""
        await self._inject("list", kind or "*", (tags or {}).get("Name", ""))
        sets = [self._tag_idx(k, v) for k, v in (tags or {}).items()]
        if kind is not None:
            sets.append(self._kind_idx(kind))
        if sets:
            rids = await self._ids(*sets)
        else:
            rids = sorted(await self._all_ids())
        return sorted(await self._load(rids), key=lambda r: (r.created_at, r.id))

    async def _all_ids(self) -> set[str]:
        kinds = cast(set[str], await self.redis.smembers(self._kinds))
        return cast(set[str], await self.redis.sunion([self._kind_idx(k) for k in kinds])) if kinds else set()

    async def update(self, resource_id: str, *, attrs: Mapping[str, Any] | None = None,
                     tags: Mapping[str, str] | None = None) -> SimResource:  # fmt: skip
        """Start changing a resource in place (UPDATING until ready): `attrs` / `tags` replace the current ones.

        Not found → ResourceNotFoundError; deleting → ResourceBeingDeleted; another operation running →
        ResourceInUse (both retryable)."""
        raw = await self._hash(self._res(resource_id))
        res = self._decode(raw)
        if res is None:
            raise ResourceNotFoundError("NotFound", f"resource {resource_id} does not exist")
        await self._inject("update", res.kind, res.name)
        now = self.clock()
        new_tags = dict(res.tags if tags is None else tags)
        new_attrs = dict(res.attrs if attrs is None else attrs)
        leave = [self._tag_idx(k, v) for k, v in res.tags.items() if new_tags.get(k) != v]
        join = [self._tag_idx(k, v) for k, v in new_tags.items() if res.tags.get(k) != v]
        result = int(await self._update(
            keys=[self._res(resource_id), self._stats, *leave, *join],
            args=[repr(now), repr(now + self._latency()), f"updated:{res.kind}", raw["tags"],
                  json.dumps(new_tags, sort_keys=True), json.dumps(new_attrs), resource_id, str(len(leave))],
        ))  # fmt: skip
        if result == 0:
            raise ResourceNotFoundError("NotFound", f"resource {resource_id} does not exist")
        if result == 2:
            raise TransientCloudError("ResourceBeingDeleted", f"{res.kind} {resource_id} is being deleted")
        if result in (-1, -2):
            raise TransientCloudError("ResourceInUse", f"{res.kind} {resource_id} has an operation in progress")
        self._maybe_fail_after("update", res.kind)
        updated = self._decode(await self._hash(self._res(resource_id)))
        if updated is None:
            raise ResourceNotFoundError("NotFound", f"resource {resource_id} does not exist")
        return updated

    async def delete(self, resource_id: str) -> SimResource:
        """Start deleting (DELETING until gone). Not found → ResourceNotFoundError; still creating → retryable."""
        raw = await self._hash(self._res(resource_id))
        res = self._decode(raw)
        if res is None:
            raise ResourceNotFoundError("NotFound", f"resource {resource_id} does not exist")
        await self._inject("delete", res.kind, res.name)
        now = self.clock()
        result = int(
            await self._delete(
                keys=[self._res(resource_id), self._stats], args=[repr(now), repr(now + self._latency()),
                                                                   f"deleted:{res.kind}"],
            )
        )  # fmt: skip
        if result == 0:
            raise ResourceNotFoundError("NotFound", f"resource {resource_id} does not exist")
        if result == -1:
            raise TransientCloudError("ResourceInUse", f"{res.kind} {resource_id} is still being created")
        if result == 1:
            self._maybe_fail_after("delete", res.kind)
        return await self.get(resource_id) if result == 2 else self._deleting(res, now)

    def _deleting(self, res: SimResource, now: float) -> SimResource:
        return SimResource(**{**res.__dict__, "status": "DELETING", "delete_at": now})

    # ------------------------------------------------------------------ helpers for tests and operators
    async def inventory(self, cluster_id: str | None = None) -> dict[str, dict[str, int]]:
        """Live resources counted per cluster (tag flotilla.dev/cluster-id; '' if untagged) and kind.

        `inventory()` → {"c-1": {"network": 1, "cluster": 1, ...}, ...}; with `cluster_id`, only that
        cluster's entry (an empty dict when nothing of it exists). No faults are injected here.
        """
        if cluster_id is not None:
            rids = await self._ids(self._tag_idx(TAG_CLUSTER, cluster_id))
        else:
            rids = sorted(await self._all_ids())
        out: dict[str, dict[str, int]] = {}
        for res in await self._load(rids):
            per_kind = out.setdefault(res.tags.get(TAG_CLUSTER, ""), {})
            per_kind[res.kind] = per_kind.get(res.kind, 0) + 1
        return out

    async def resources(self, cluster_id: str | None = None) -> Resources:
        """Live resources (of one cluster), without fault injection."""
        rids = await self._ids(self._tag_idx(TAG_CLUSTER, cluster_id)) if cluster_id else sorted(await self._all_ids())
        return await self._load(rids)

    async def stats(self) -> dict[str, int]:
        """Counters: created:<kind> (new resources, not token replays), updated:<kind>, deleted:<kind>,
        throttled:<op>, ..."""
        return {k: int(v) for k, v in (await self._hash(self._stats)).items()}

    async def reset(self) -> None:
        """Forget everything (tests)."""
        keys = [k async for k in self.redis.scan_iter(match=f"{self.base}:*", count=1000)]
        if keys:
            await self.redis.delete(*keys)
