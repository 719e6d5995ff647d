"""Per-service state in Redis: optimistic concurrency, a processed-event ledger and an outbox.

One atomic commit writes an aggregate's new state (if its version is still the one read),
marks the handled event as processed and stores the events it produced. Publishing happens
after the commit, from the outbox, so a crash between commit and publish loses nothing:
the redelivered message finds the ledger entry and re-publishes the outbox (same event ids,
so JetStream or the consumers' ledgers drop any copy that already went out).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel
from redis.asyncio import Redis

from shared.events import Envelope

S = TypeVar("S", bound=BaseModel)


class CommitResult(enum.Enum):
    COMMITTED = "committed"
    CONFLICT = "conflict"
    ALREADY_PROCESSED = "already-processed"


# KEYS: state, ledger, outbox   ARGV: expected version, new state ('' = unchanged), ledger ttl, outbox json
_COMMIT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) then return 0 end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'v', current + 1, 's', ARGV[2])
end
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[3]))
if ARGV[4] ~= '[]' then redis.call('SET', KEYS[3], ARGV[4]) end
return 1
"""


class StateStore:
    """State of one service. Keys share a hash tag so the commit script also runs on Redis Cluster."""

    def __init__(self, redis: Redis, prefix: str, service: str, ledger_ttl_s: int) -> None:
        self.redis = redis
        self._base = f"{prefix}:{{{service}}}"
        self._ledger_ttl = ledger_ttl_s
        self._commit = redis.register_script(_COMMIT)

    def state_key(self, key: str) -> str:
        return f"{self._base}:state:{key}"

    def _ledger_key(self, event_id: str) -> str:
        return f"{self._base}:ledger:{event_id}"

    def _outbox_key(self, event_id: str) -> str:
        return f"{self._base}:outbox:{event_id}"

    async def load(self, key: str, model: type[S]) -> tuple[S | None, int]:
        version, raw = await self.redis.hmget(self.state_key(key), ["v", "s"])
        if raw is None:
            return None, int(version or 0)
        return model.model_validate_json(raw), int(version or 0)

    async def commit(
        self,
        key: str,
        expected_version: int,
        new_state: BaseModel | None,
        event_id: str,
        events: Sequence[Envelope],
    ) -> CommitResult:
        outbox = json.dumps([e.model_dump(mode="json") for e in events])
        state_json = new_state.model_dump_json() if new_state is not None else ""
        result = await self._commit(
            keys=[self.state_key(key), self._ledger_key(event_id), self._outbox_key(event_id)],
            args=[expected_version, state_json, self._ledger_ttl, outbox],
        )
        return {1: CommitResult.COMMITTED, 0: CommitResult.CONFLICT, -1: CommitResult.ALREADY_PROCESSED}[
            int(result)
        ]

    async def is_processed(self, event_id: str) -> bool:
        return bool(await self.redis.exists(self._ledger_key(event_id)))

    async def load_unless_processed(self, key: str, model: type[S], event_id: str) -> tuple[bool, S | None, int]:
        """Ledger check and state read in one round trip (the hot path of every handler)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._ledger_key(event_id))
            pipe.hmget(self.state_key(key), ["v", "s"])
            processed, (version, raw) = await pipe.execute()
        state = model.model_validate_json(raw) if raw is not None else None
        return bool(processed), state, int(version or 0)

    async def outbox(self, event_id: str) -> list[Envelope]:
        raw = await self.redis.get(self._outbox_key(event_id))
        if raw is None:
            return []
        return [Envelope.model_validate(e) for e in json.loads(raw)]

    async def clear_outbox(self, event_id: str) -> None:
        await self.redis.delete(self._outbox_key(event_id))

    async def keys(self, pattern: str = "*") -> list[str]:
        """Aggregate keys with state (for periodic sweeps, not for hot paths)."""
        prefix = f"{self._base}:state:"
        return [k[len(prefix) :] async for k in self.redis.scan_iter(match=prefix + pattern, count=1000)]
