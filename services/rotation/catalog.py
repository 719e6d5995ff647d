"""The set catalog: every live ClusterSet as the planner last accepted it, for fleet rollouts to choose from.

A durable consumer of ClusterSetAccepted / ClusterSetRetired on FLEET (one of `fleet_app.fleet_subscriptions`)
keeps one Redis hash, `<prefix>:rotation:catalog`, one field per set. Each write is a
compare-and-set on the set's generation inside Redis, so redelivery, a full replay and two replicas all converge on
the same hash: an older generation never overwrites a newer one, and a retirement leaves a tombstone so that a
late copy of the acceptance it retired cannot bring the set back. (The planner's generations keep counting across
a delete and a re-apply.)
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis

from shared.bus import Outcome, Subscription
from shared.events import ClusterSpec, Envelope, Location, decode_payload, subjects
from shared.events.clusterset import UpdateStrategy, clusterset_document
from shared.events.models import ClusterSetAccepted, ClusterSetRetired

DURABLE = "rotation-fleet-catalog"


class CatalogEntry(BaseModel):
    """One live ClusterSet: what a fleet rollout selects on and validates its patch against."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    cluster_type: str
    location: Location
    generation: int
    config_hash: str
    count: int
    spec: ClusterSpec
    update_strategy: UpdateStrategy
    labels: dict[str, str] = {}
    protected: bool = False

    @classmethod
    def from_accepted(cls, event: ClusterSetAccepted) -> CatalogEntry:
        return cls(name=event.clusterset, cluster_type=event.cluster_type, location=event.location,
                   generation=event.generation, config_hash=event.config_hash, count=event.count, spec=event.spec,
                   update_strategy=event.update_strategy, labels=event.labels, protected=event.protected)  # fmt: skip

    def document(self) -> dict[str, Any]:
        """The ClusterSet document this set was accepted from (what a fleet rollout's patch is merged into)."""
        return clusterset_document(name=self.name, location=self.location, cluster_type=self.cluster_type,
                                   labels=self.labels, protected=self.protected, spec=self.spec, count=self.count,
                                   update_strategy=self.update_strategy)  # fmt: skip


# KEYS: the catalog hash.  ARGV: set name, generation, the entry as JSON, '1' for a retirement (tombstone).
# An acceptance needs a strictly newer generation; a retirement wins over the acceptance of its own generation.
_PUT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local stored = tonumber(cjson.decode(current)['generation'])
  local incoming = tonumber(ARGV[2])
  if incoming < stored or (incoming == stored and ARGV[4] ~= '1') then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


class SetCatalog:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.key = f"{prefix}:rotation:catalog"
        self._put = redis.register_script(_PUT)

    async def put(self, entry: CatalogEntry) -> bool:
        """Record an accepted set; False when the catalog already holds this generation or a newer one."""
        return bool(await self._put(keys=[self.key], args=[entry.name, entry.generation, entry.model_dump_json(), "0"]))

    async def retire(self, name: str, generation: int) -> bool:
        tombstone = json.dumps({"name": name, "generation": generation, "retired": True}, sort_keys=True)
        return bool(await self._put(keys=[self.key], args=[name, generation, tombstone, "1"]))

    async def snapshot(self) -> dict[str, CatalogEntry]:
        """Every live set by name (tombstones left out)."""
        raw = await self.redis.hgetall(self.key)
        out: dict[str, CatalogEntry] = {}
        for name, value in sorted((str(k), v) for k, v in raw.items()):
            try:
                out[name] = CatalogEntry.model_validate_json(value)
            except ValidationError:  # a tombstone
                continue
        return out

    async def handle(self, env: Envelope, _state: CatalogEntry | None) -> Outcome[CatalogEntry]:
        """Keep the hash current. The write is its own idempotency guard, so no aggregate state is kept."""
        payload = decode_payload(env)
        if isinstance(payload, ClusterSetAccepted):
            await self.put(CatalogEntry.from_accepted(payload))
        elif isinstance(payload, ClusterSetRetired):
            await self.retire(payload.clusterset, payload.generation)
        return Outcome()

    def subscription(self) -> Subscription[CatalogEntry]:
        return Subscription(
            durable=DURABLE, stream=subjects.STREAM_FLEET,
            filter_subjects=[subjects.fleet_filter(t.type_name()) for t in (ClusterSetAccepted, ClusterSetRetired)],
            # Per set, so that two versions of one set are never written at once by one replica.
            state_model=CatalogEntry, handle=self.handle, key=lambda env: f"catalog:{env.subject}",
        )  # fmt: skip
