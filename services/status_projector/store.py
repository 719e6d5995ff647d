"""Redis layout of the read models, and the reads and writes on it.

Everything of one view namespace lives under `{prefix}:views:{<namespace>}:` (the braces are a
Redis Cluster hash tag, so one namespace is one slot and a batch commits in one MULTI/EXEC):

    cluster:<id>                    JSON document (canonical: sorted keys)
    clusterset:<name>               JSON document
    rollout:<id>                    JSON document of a ClusterSet rollout
    fleetrollout:<id>               JSON document of a fleet rollout
    migration:<id>                  JSON document of a control-plane migration or upgrade (by operation id)
    migrationpipeline:<id>          JSON document of a control-plane pipeline (by pipeline id)
    history:cluster:<id>            list of JSON history entries, oldest first
    history:clusterset:<name>       list of JSON history entries
    idx:all                         set of every cluster id
    idx:<field>:<value>             set of cluster ids, field in clusterset/state/env/cloud/region/clusterType
    idx:rollouts:all                set of every rollout, as "<id>\t<kind>" (sorts by id; either kind)
    idx:rollouts:<field>:<value>    set of rollouts, field in kind/state/clusterset
    idx:migrations:all              set of every migration, upgrade and pipeline, as "<id>\t<kind>"
    idx:migrations:<field>:<value>  set of them, field in kind/state/clusterset/cluster
    sets                            set of every cluster set name
    applied                         hash event id -> stream sequence that applied it (dedupe)
    checkpoint                      last applied FLEET sequence (written in the same EXEC as the views)

`{prefix}:views:current` names the namespace the API serves and the projector follows
(default `live`); a rebuild fills a fresh namespace and then switches this pointer.
"""

from __future__ import annotations

import base64
import binascii
import json
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.status_projector import controlplane as cp
from services.status_projector import rollouts as ro
from services.status_projector.core import CLUSTER_STATES, Doc, Touch, Views, canonical, index_entries
from services.status_projector.docs import member, split_member

DEFAULT_NAMESPACE = "live"


def pointer_key(prefix: str) -> str:
    return f"{prefix}:views:current"


def namespace_counter_key(prefix: str) -> str:
    return f"{prefix}:views:nsseq"


async def current_namespace(redis: Redis, prefix: str) -> str:
    value = await redis.get(pointer_key(prefix))
    return str(value) if value else DEFAULT_NAMESPACE


class ViewKeys:
    """Key names of one namespace."""

    def __init__(self, prefix: str, namespace: str) -> None:
        self.prefix, self.namespace = prefix, namespace
        self.base = f"{prefix}:views:{{{namespace}}}:"
        self.checkpoint = self.base + "checkpoint"
        self.applied = self.base + "applied"
        self.sets = self.base + "sets"
        self.all = self.base + "idx:all"
        self.rollouts_all = self.base + "idx:rollouts:all"
        self.migrations_all = self.base + "idx:migrations:all"

    def cluster(self, cid: str) -> str:
        return f"{self.base}cluster:{cid}"

    def clusterset(self, name: str) -> str:
        return f"{self.base}clusterset:{name}"

    def history(self, key: str) -> str:
        """`key` is "cluster:<id>" or "clusterset:<name>"."""
        return f"{self.base}history:{key}"

    def index(self, field: str, value: str) -> str:
        return f"{self.base}idx:{field}:{value}"

    def rollout(self, kind: str, rollout_id: str) -> str:
        """`kind` is a document kind (ClusterSetRollout or FleetRollout)."""
        name = "rollout" if kind == ro.KIND_SET else "fleetrollout"
        return f"{self.base}{name}:{rollout_id}"

    def rollout_index(self, field: str, value: str) -> str:
        return f"{self.base}idx:rollouts:{field}:{value}"

    def migration(self, kind: str, doc_id: str) -> str:
        """`kind` is migration, upgrade (one key space: operation ids) or pipeline (pipeline ids)."""
        name = "migrationpipeline" if kind == cp.KIND_PIPELINE else "migration"
        return f"{self.base}{name}:{doc_id}"

    def migration_index(self, field: str, value: str) -> str:
        return f"{self.base}idx:migrations:{field}:{value}"


@dataclass(frozen=True)
class Family:
    """Documents with filter indexes of their own, listed by members "<id>\t<kind>" (rollouts, migrations)."""

    views: str  # the Views attribute holding them
    touch: Callable[[Touch], str | None]  # which one an event names
    key: Callable[[ViewKeys, str], str]
    member: Callable[[str, Doc], str]
    index: Callable[[ViewKeys, str, str], str]
    all: Callable[[ViewKeys], str]
    entries: Callable[[Doc | None], set[tuple[str, str]]]


FAMILIES: tuple[Family, ...] = (
    Family("rollouts", lambda t: t.rollout, lambda k, i: k.rollout(ro.KIND_SET, i),
           lambda i, d: member(ro.KIND_SET, i), ViewKeys.rollout_index, lambda k: k.rollouts_all, ro.index_entries),
    Family("fleet_rollouts", lambda t: t.fleet_rollout, lambda k, i: k.rollout(ro.KIND_FLEET, i),
           lambda i, d: member(ro.KIND_FLEET, i), ViewKeys.rollout_index, lambda k: k.rollouts_all,
           ro.index_entries),
    # An operation's kind (migration or upgrade) is fixed by its first fact, so its member never changes.
    Family("cp_operations", lambda t: t.operation, lambda k, i: k.migration(cp.KIND_MIGRATION, i),
           lambda i, d: member(str(d["kind"]), i), ViewKeys.migration_index, lambda k: k.migrations_all,
           cp.index_entries),
    Family("cp_pipelines", lambda t: t.pipeline, lambda k, i: k.migration(cp.KIND_PIPELINE, i),
           lambda i, d: member(cp.KIND_PIPELINE, i), ViewKeys.migration_index, lambda k: k.migrations_all,
           cp.index_entries),
)  # fmt: skip


# ---------------------------------------------------------------- batch load / stage (projector side)
class Loaded:
    """The stored state a batch starts from: raw JSON per touched document, to diff against."""

    def __init__(self) -> None:
        self.clusters: dict[str, str | None] = {}
        self.clustersets: dict[str, str | None] = {}
        self.docs: dict[str, dict[str, str | None]] = {f.views: {} for f in FAMILIES}  # by Family.views
        # Index entries of each document as loaded: the core mutates the parsed documents in place.
        self.indexed: dict[str, set[tuple[str, str]]] = {}
        self.docs_indexed: dict[str, dict[str, set[tuple[str, str]]]] = {f.views: {} for f in FAMILIES}


class BatchTouch:
    """Every document a batch of events may change (see core.touched), each named once, in first-seen order."""

    def __init__(self, touches: Iterable[Touch] = ()) -> None:
        self.cluster_ids: dict[str, None] = {}
        self.set_names: dict[str, None] = {}
        self.doc_ids: dict[str, dict[str, None]] = {f.views: {} for f in FAMILIES}  # by Family.views
        for t in touches:
            named = [(t.cluster, self.cluster_ids), (t.clusterset, self.set_names)]
            named += [(f.touch(t), self.doc_ids[f.views]) for f in FAMILIES]
            for value, into in named:
                if value:
                    into[value] = None


async def _load_docs(redis: Redis | Pipeline, key: Callable[[str], str], ids: Sequence[str],
                     raw_into: dict[str, str | None], into: dict[str, Doc]) -> None:  # fmt: skip
    if not ids:
        return
    raws: list[Any] = await redis.mget([key(i) for i in ids])
    for i, raw in zip(ids, raws, strict=True):
        raw_into[i] = raw
        if raw is not None:
            into[i] = json.loads(raw)


async def load_batch(redis: Redis | Pipeline, keys: ViewKeys, touch: BatchTouch,
                     event_ids: Sequence[str]) -> tuple[Views, Loaded]:  # fmt: skip
    """Documents and already-applied ids a batch needs. With a WATCHing pipeline these run immediately."""
    views, loaded = Views(), Loaded()
    await _load_docs(redis, keys.cluster, list(touch.cluster_ids), loaded.clusters, views.clusters)
    await _load_docs(redis, keys.clusterset, list(touch.set_names), loaded.clustersets, views.clustersets)
    loaded.indexed = {cid: index_entries(doc) for cid, doc in views.clusters.items()}
    for f in FAMILIES:
        docs: dict[str, Doc] = getattr(views, f.views)
        await _load_docs(redis, partial(f.key, keys), list(touch.doc_ids[f.views]), loaded.docs[f.views],
                         docs)  # fmt: skip
        loaded.docs_indexed[f.views] = {i: f.entries(doc) for i, doc in docs.items()}
    if event_ids:
        seqs = await redis.hmget(keys.applied, list(event_ids))
        views.applied = {eid: int(s) for eid, s in zip(event_ids, seqs, strict=True) if s is not None}
    return views, loaded


def stage_batch(pipe: Pipeline, keys: ViewKeys, loaded: Loaded, views: Views, known_applied: Iterable[str],
                checkpoint: int) -> int:  # fmt: skip
    """Queue every change of a batch (inside MULTI). Returns the number of documents written."""
    written = 0
    for cid, doc in views.clusters.items():
        raw = canonical(doc)
        old_raw = loaded.clusters.get(cid)
        if raw == old_raw:
            continue
        written += 1
        pipe.set(keys.cluster(cid), raw)
        _stage_index(pipe, keys.index, cid, loaded.indexed.get(cid, set()), index_entries(doc))
        if old_raw is None:
            pipe.sadd(keys.all, cid)
    for name, doc in views.clustersets.items():
        raw = canonical(doc)
        if raw == loaded.clustersets.get(name):
            continue
        written += 1
        pipe.set(keys.clusterset(name), raw)
        pipe.sadd(keys.sets, name)
    for f in FAMILIES:
        raws, indexed = loaded.docs[f.views], loaded.docs_indexed[f.views]
        for doc_id, doc in getattr(views, f.views).items():
            raw = canonical(doc)
            old_raw = raws.get(doc_id)
            if raw == old_raw:
                continue
            written += 1
            pipe.set(f.key(keys, doc_id), raw)
            value = f.member(doc_id, doc)
            _stage_index(pipe, partial(f.index, keys), value, indexed.get(doc_id, set()),
                         f.entries(doc))  # fmt: skip
            if old_raw is None:
                pipe.sadd(f.all(keys), value)
    for key, entries in views.history.items():
        if entries:
            pipe.rpush(keys.history(key), *(canonical(e) for e in entries))
    known = set(known_applied)
    fresh: dict[Any, Any] = {eid: str(seq) for eid, seq in views.applied.items() if eid not in known}
    if fresh:
        pipe.hset(keys.applied, mapping=fresh)
    pipe.set(keys.checkpoint, checkpoint)
    return written


def _stage_index(pipe: Pipeline, key: Callable[[str, str], str], value: str, old: set[tuple[str, str]],
                 new: set[tuple[str, str]]) -> None:  # fmt: skip
    """Move `value` between filter index sets as its document's (field, value) pairs changed."""
    for field, v in sorted(old - new):
        pipe.srem(key(field, v), value)
    for field, v in sorted(new - old):
        pipe.sadd(key(field, v), value)


async def read_checkpoint(redis: Redis | Pipeline, keys: ViewKeys) -> int:
    raw = await redis.get(keys.checkpoint)
    return int(raw) if raw else 0


async def clear_namespace(redis: Redis, prefix: str, namespace: str) -> int:
    """Delete every key of a namespace (UNLINK: freed in the background). Returns how many."""
    keys = ViewKeys(prefix, namespace)
    deleted = 0
    batch: list[str] = []
    async for key in redis.scan_iter(match=_glob_escape(keys.base) + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await redis.unlink(*batch)
            batch = []
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


async def dump_views(redis: Redis, prefix: str, namespace: str | None = None,
                     include_checkpoint: bool = False) -> dict[str, str]:  # fmt: skip
    """Every read model of a namespace as canonical JSON, keyed by its key without the namespace.

    Byte-for-byte comparable between namespaces (e.g. live views and a rebuild). Lists keep their
    order; sets are sorted; hashes are sorted objects. The checkpoint is left out unless asked for:
    two projections of the same stream are equal even when one has read further into an empty tail.
    """
    namespace = namespace or await current_namespace(redis, prefix)
    keys = ViewKeys(prefix, namespace)
    names = sorted([k async for k in redis.scan_iter(match=_glob_escape(keys.base) + "*", count=1000)])
    if not include_checkpoint:
        names = [k for k in names if k != keys.checkpoint]
    out: dict[str, str] = {}
    for start in range(0, len(names), 1000):
        chunk = names[start:start + 1000]
        pipe = redis.pipeline(transaction=False)
        for key in chunk:
            pipe.type(key)
        kinds = await pipe.execute()
        pipe = redis.pipeline(transaction=False)
        for key, kind in zip(chunk, kinds, strict=True):
            if kind == "string":
                pipe.get(key)
            elif kind == "list":
                pipe.lrange(key, 0, -1)
            elif kind == "set":
                pipe.smembers(key)
            elif kind == "hash":
                pipe.hgetall(key)
            else:
                pipe.type(key)
        values = await pipe.execute()
        for key, kind, value in zip(chunk, kinds, values, strict=True):
            rel = key[len(keys.base):]
            if kind == "string":
                out[rel] = str(value)
            elif kind == "list":
                out[rel] = "[" + ",".join(value) + "]"
            elif kind == "set":
                out[rel] = canonical(sorted(value))
            elif kind == "hash":
                out[rel] = canonical(value)
            else:  # pragma: no cover - the projector writes no other type (or the key vanished meanwhile)
                out[rel] = f"<{kind}>"
    return out


# ---------------------------------------------------------------- query side (API)
class CursorError(ValueError):
    pass


def encode_cursor(kind: str, value: str | int) -> str:
    """An opaque continuation token. Its content is not a contract; only round-tripping it is."""
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode_cursor(token: str, kind: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise CursorError("cursor is not a token returned by this API (malformed)") from exc
    head, sep, value = raw.partition(":")
    if not sep or head != kind or not value:
        raise CursorError("cursor is not a token returned by this endpoint")
    return value


def page_after(ids: list[str], after: str | None, limit: int) -> tuple[list[str], str | None]:
    """A page of sorted ids strictly after `after`, and the id to continue after (None at the end)."""
    start = bisect_right(ids, after) if after is not None else 0
    page = ids[start:start + limit]
    more = start + limit < len(ids)
    return page, (page[-1] if more and page else None)


class ViewReader:
    """Reads of one namespace for the API."""

    def __init__(self, redis: Redis, keys: ViewKeys) -> None:
        self.redis, self.keys = redis, keys

    async def cluster_ids(self, filters: dict[str, str]) -> list[str]:
        """Sorted ids of the clusters matching every filter (SINTER of the index sets)."""
        sets = [self.keys.index(f, v) for f, v in sorted(filters.items())] or [self.keys.all]
        members = await (self.redis.smembers(sets[0]) if len(sets) == 1 else self.redis.sinter(sets))
        return sorted(str(m) for m in members)

    async def clusters(self, ids: Sequence[str]) -> list[Doc]:
        if not ids:
            return []
        raws = await self.redis.mget([self.keys.cluster(c) for c in ids])
        return [json.loads(r) for r in raws if r is not None]

    async def cluster(self, cid: str) -> Doc | None:
        raw = await self.redis.get(self.keys.cluster(cid))
        return json.loads(raw) if raw else None

    async def clusterset_names(self) -> list[str]:
        return sorted(str(m) for m in await self.redis.smembers(self.keys.sets))

    async def clustersets(self, names: Sequence[str]) -> dict[str, Doc]:
        if not names:
            return {}
        raws = await self.redis.mget([self.keys.clusterset(n) for n in names])
        return {n: json.loads(r) for n, r in zip(names, raws, strict=True) if r is not None}

    async def clusterset(self, name: str) -> Doc | None:
        raw = await self.redis.get(self.keys.clusterset(name))
        return json.loads(raw) if raw else None

    async def set_hashes(self, names: Iterable[str]) -> dict[str, str | None]:
        docs = await self.clustersets(sorted(set(names)))
        return {n: d.get("configHash") for n, d in docs.items()}

    async def state_counts(self, names: Sequence[str]) -> dict[str, dict[str, int]]:
        """Clusters per state of each set, counted in Redis (SINTERCARD), without loading documents."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            for state in CLUSTER_STATES:
                pipe.sintercard(2, [self.keys.index("clusterset", name), self.keys.index("state", state)])
        results: list[Any] = await pipe.execute()
        out: dict[str, dict[str, int]] = {}
        for i, name in enumerate(names):
            chunk = results[i * len(CLUSTER_STATES):(i + 1) * len(CLUSTER_STATES)]
            out[name] = {s: int(n) for s, n in zip(CLUSTER_STATES, chunk, strict=True)}
        return out

    async def _members(self, index: Callable[[str, str], str], all_key: str, filters: dict[str, str]) -> list[str]:
        """Sorted index members ("<id>\t<kind>") matching every filter (SINTER of the index sets)."""
        sets = [index(f, v) for f, v in sorted(filters.items())] or [all_key]
        members = await (self.redis.smembers(sets[0]) if len(sets) == 1 else self.redis.sinter(sets))
        return sorted(str(m) for m in members)

    async def _docs(self, keys: list[str]) -> list[Doc]:
        if not keys:
            return []
        return [json.loads(r) for r in await self.redis.mget(keys) if r is not None]

    async def rollout_members(self, filters: dict[str, str]) -> list[str]:
        return await self._members(self.keys.rollout_index, self.keys.rollouts_all, filters)

    async def rollouts(self, members: Sequence[str]) -> list[Doc]:
        return await self._docs([self.keys.rollout(*split_member(mb)) for mb in members])

    async def rollout(self, rollout_id: str, kinds: Sequence[str]) -> list[Doc]:
        """The rollouts of these document kinds with this id (ids of the two kinds are separate namespaces)."""
        raws = await self.redis.mget([self.keys.rollout(kind, rollout_id) for kind in kinds])
        return [json.loads(r) for r in raws if r is not None]

    async def migration_members(self, filters: dict[str, str]) -> list[str]:
        return await self._members(self.keys.migration_index, self.keys.migrations_all, filters)

    async def migrations(self, members: Sequence[str]) -> list[Doc]:
        return await self._docs([self.keys.migration(*split_member(mb)) for mb in members])

    async def migration(self, doc_id: str, kinds: Sequence[str]) -> list[Doc]:
        """The documents of these kinds with this id (operation ids and pipeline ids are separate key spaces)."""
        keys = list(dict.fromkeys(self.keys.migration(kind, doc_id) for kind in kinds))
        return [d for d in await self._docs(keys) if d.get("kind") in kinds]

    async def history(self, key: str, start: int, limit: int) -> tuple[list[Doc], int]:
        """Entries [start, start+limit) of a history list, and its total length."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(self.keys.history(key), start, start + limit - 1)
        pipe.llen(self.keys.history(key))
        raws, total = await pipe.execute()
        return [json.loads(r) for r in raws], int(total)

    async def checkpoint(self) -> int:
        return await read_checkpoint(self.redis, self.keys)
