"""The status API: read models over HTTP (FastAPI; OpenAPI at /openapi.json).

Every request reads the namespace `{prefix}:views:current` points at, so a rebuild switches
what is served atomically. Lists are sorted by id and paginated with an opaque `cursor`
(alias `continue`); filters intersect Redis index sets, so a filtered page over 10,000
clusters costs one SINTER, a sort and one MGET of the page. Bad input is a 422 with a
message naming the parameter; unknown query parameters are refused too (a typo must not
silently widen a query); unknown ids are a 404.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from redis.asyncio import Redis
from starlette.exceptions import HTTPException

from services.status_projector import controlplane as cp
from services.status_projector import render, schemas
from services.status_projector import rollouts as ro
from services.status_projector.projector import Projector
from services.status_projector.store import (
    CursorError,
    ViewKeys,
    ViewReader,
    current_namespace,
    decode_cursor,
    encode_cursor,
    page_after,
)
from shared.bus import Bus
from shared.config import Settings
from shared.service import redis_client

SET_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV = r"^[a-z0-9][-a-z0-9]{0,30}$"
REGION = r"^[a-z0-9][-a-z0-9]{1,39}$"
CLUSTER_TYPE = r"^[A-Za-z][A-Za-z0-9-]{0,62}$"
CLUSTER_ID = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class JSON(Response):
    """Compact JSON without a validation pass: the documents are produced (and schema-tested) by the core."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def _error(status: int, error: str, message: str, detail: Any = None) -> JSON:
    return JSON({"error": error, "message": message, "detail": detail}, status_code=status)


def _not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"{what} not found")


def _invalid(param: str, message: str, value: Any = None) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("query", param), "msg": message, "input": value}])


def only_params(*allowed: str) -> Any:
    """Refuse query parameters the endpoint does not know (e.g. `?cluster_set=` instead of `?clusterset=`)."""
    known = set(allowed)

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise RequestValidationError([
                {"type": "extra_forbidden", "loc": ("query", name),
                 "msg": f"unknown query parameter; this endpoint accepts: {', '.join(sorted(known)) or 'none'}",
                 "input": request.query_params.get(name)}
                for name in unknown
            ])  # fmt: skip

    return Depends(check)


def _cursor(cursor: str | None, continue_: str | None) -> str | None:
    # An empty token means "first page" (clients that always send the parameter send `cursor=`).
    cursor, continue_ = cursor or None, continue_ or None
    if cursor is not None and continue_ is not None and cursor != continue_:
        raise _invalid("continue", "give either cursor or continue, not two different tokens", continue_)
    return cursor if cursor is not None else continue_


def _decode(token: str | None, kind: str) -> str | None:
    if token is None:
        return None
    try:
        return decode_cursor(token, kind)
    except CursorError as exc:
        raise _invalid("cursor", str(exc), token) from exc


async def _reader(request: Request) -> ViewReader:
    """The namespace served right now (one GET per request, so a rebuild's switch is atomic for readers)."""
    redis: Redis = request.app.state.views_redis()
    prefix: str = request.app.state.views_prefix
    return ViewReader(redis, ViewKeys(prefix, await current_namespace(redis, prefix)))


Reader = Annotated[ViewReader, Depends(_reader)]
Limit = Annotated[int, Query(ge=1, le=1000, description="page size (1..1000)")]
Cursor = Annotated[str | None, Query(max_length=1024, description="`next` of the previous page")]
Continue = Annotated[str | None, Query(alias="continue", max_length=1024, description="alias of cursor")]
_SET_FILTER = "rollouts of this ClusterSet, and the fleet rollouts that cover it"
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": schemas.ErrorBody, "description": "unknown id"},
    422: {"model": schemas.ErrorBody, "description": "invalid query parameter"},
}


def create_app(
    settings: Settings,
    *,
    redis: Redis | None = None,
    bus: Bus | None = None,
    projector: Projector | None = None,
) -> FastAPI:
    """The API. Without `redis` it opens (and closes) its own client in the app's lifespan."""
    prefix = settings.redis_prefix
    holder: dict[str, Redis] = {}
    if redis is not None:
        holder["redis"] = redis

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = "redis" not in holder
        if own:
            holder["redis"] = redis_client(settings)
        try:
            yield
        finally:
            if own:
                await holder.pop("redis").aclose()

    app = FastAPI(
        title="Flotilla status API",
        version="1",
        description="Read models of the fleet (cluster sets, clusters, rollouts, control-plane migrations, their "
                    "history) and cluster discovery.",
        lifespan=lifespan,
        default_response_class=JSON,
    )

    app.state.views_redis = lambda: holder["redis"]
    app.state.views_prefix = prefix

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSON:
        errors = jsonable_encoder(exc.errors())
        parts = []
        for e in errors:
            loc = [str(p) for p in e.get("loc", ()) if p not in ("query", "path")]
            parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg')}")
        return _error(422, "invalid request", "; ".join(parts), errors)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSON:
        error = {404: "not found", 405: "method not allowed", 409: "conflict"}.get(exc.status_code, "error")
        return _error(exc.status_code, error, str(exc.detail))

    # ------------------------------------------------------------------ health
    @app.get("/healthz", responses={200: {"model": schemas.Health}}, tags=["health"])
    async def healthz() -> JSON:
        """The process is alive."""
        return JSON({"status": "ok"})

    @app.get("/readyz", responses={200: {"model": schemas.Readiness}, 503: {"model": schemas.Readiness}},
             tags=["health"])  # fmt: skip
    async def readyz() -> JSON:
        """Redis and NATS reachable and the projector subscribed; with checkpoint, stream position and lag."""
        r = holder["redis"]
        redis_ok, checkpoint, namespace = False, None, None
        try:
            namespace = await asyncio.wait_for(current_namespace(r, prefix), 2)
            checkpoint = await asyncio.wait_for(ViewReader(r, ViewKeys(prefix, namespace)).checkpoint(), 2)
            redis_ok = True
        except Exception:
            pass
        nats_ok = bus is not None and bus.nc.is_connected
        last_seq = None
        if nats_ok and projector is not None:
            try:
                last_seq = await asyncio.wait_for(projector.stream_last_seq(), 2)
            except Exception:
                nats_ok = False
        proj = {
            "running": bool(projector and projector.running),
            "subscribed": bool(projector and projector.subscribed),
            "namespace": namespace,
            "checkpoint": checkpoint,
            "streamLastSeq": last_seq,
            "lag": (last_seq - checkpoint) if last_seq is not None and checkpoint is not None else None,
            "lastError": projector.last_error if projector else None,
        }
        ready = redis_ok and nats_ok and proj["running"] and proj["subscribed"]
        return JSON({"ready": ready, "redis": redis_ok, "nats": nats_ok, "projector": proj},
                    status_code=200 if ready else 503)  # fmt: skip

    # ------------------------------------------------------------------ cluster sets
    @app.get("/v1/clustersets", responses={200: {"model": schemas.ClusterSetPage}, **_ERRORS}, tags=["clustersets"],
             dependencies=[only_params("limit", "cursor", "continue")])  # fmt: skip
    async def list_clustersets(views: Reader, limit: Limit = 100, cursor: Cursor = None,
                               continue_: Continue = None) -> JSON:  # fmt: skip
        """Every cluster set (accepted, only rejected, or deleted) with counts by state, sorted by name."""
        after = _decode(_cursor(cursor, continue_), "s")
        names, last = page_after(await views.clusterset_names(), after, limit)
        docs = await views.clustersets(names)
        counts = await views.state_counts([n for n in names if n in docs])
        items = [render.clusterset_summary(docs[n], counts[n]) for n in names if n in docs]
        return JSON({"items": items, "next": encode_cursor("s", last) if last else None})

    @app.get("/v1/clustersets/{name}", responses={200: {"model": schemas.ClusterSet}, **_ERRORS},
             tags=["clustersets"], dependencies=[only_params("includeClusters")])  # fmt: skip
    async def get_clusterset(
        views: Reader,
        name: Annotated[str, Path(max_length=256)],
        includeClusters: Annotated[bool, Query(description="list member clusters in status.clusters")] = True,
    ) -> JSON:
        """One cluster set: spec, generation, last rejection, rollout, and status with its member clusters."""
        doc = await views.clusterset(name)
        if doc is None:
            raise _not_found(f"clusterset {name!r}")
        if not includeClusters:
            counts = (await views.state_counts([name]))[name]
            return JSON(render.clusterset_summary(doc, counts))
        members = await views.clusters(await views.cluster_ids({"clusterset": name}))
        return JSON(render.clusterset_view(doc, members))

    @app.get("/v1/clustersets/{name}/events", responses={200: {"model": schemas.EventPage}, **_ERRORS},
             tags=["clustersets"], dependencies=[only_params("limit", "cursor", "continue")])  # fmt: skip
    async def clusterset_events(views: Reader, name: Annotated[str, Path(max_length=256)], limit: Limit = 100,
                                cursor: Cursor = None, continue_: Continue = None) -> JSON:  # fmt: skip
        """The set's own events (accepted, rejected, retired, rollouts), oldest first."""
        if await views.clusterset(name) is None:
            raise _not_found(f"clusterset {name!r}")
        return JSON(await _history(views, f"clusterset:{name}", limit, _cursor(cursor, continue_)))

    # ------------------------------------------------------------------ clusters
    @app.get("/v1/clusters", responses={200: {"model": schemas.ClusterPage}, **_ERRORS}, tags=["clusters"],
             dependencies=[only_params("clusterset", "state", "env", "cloud", "region", "clusterType", "limit",
                                       "cursor", "continue")])  # fmt: skip
    async def list_clusters(
        views: Reader,
        clusterset: Annotated[str | None, Query(pattern=SET_NAME, max_length=58)] = None,
        state: Annotated[schemas.ClusterStateName | None, Query()] = None,
        env: Annotated[str | None, Query(pattern=ENV)] = None,
        cloud: Annotated[schemas.CloudName | None, Query()] = None,
        region: Annotated[str | None, Query(pattern=REGION)] = None,
        clusterType: Annotated[str | None, Query(pattern=CLUSTER_TYPE)] = None,
        limit: Limit = 100,
        cursor: Cursor = None,
        continue_: Continue = None,
    ) -> JSON:
        """Clusters matching every filter given, sorted by id, paginated."""
        filters = {"clusterset": clusterset, "state": state, "env": env, "cloud": cloud, "region": region,
                   "clusterType": clusterType}  # fmt: skip
        after = _decode(_cursor(cursor, continue_), "c")
        ids, last = page_after(await views.cluster_ids({k: v for k, v in filters.items() if v}), after, limit)
        docs = await views.clusters(ids)
        hashes = await views.set_hashes(d["clusterset"] for d in docs)
        items = [render.cluster_view(d, hashes.get(d["clusterset"])) for d in docs]
        return JSON({"items": items, "next": encode_cursor("c", last) if last else None})

    @app.get("/v1/clusters/{cluster_id}", responses={200: {"model": schemas.Cluster}, **_ERRORS},
             tags=["clusters"], dependencies=[only_params()])  # fmt: skip
    async def get_cluster(views: Reader, cluster_id: Annotated[str, Path(max_length=256)]) -> JSON:
        """One cluster: state, spec and config hash, endpoint, network, resources, infra services, failure."""
        doc = await views.cluster(cluster_id)
        if doc is None:
            raise _not_found(f"cluster {cluster_id!r}")
        hashes = await views.set_hashes([doc["clusterset"]])
        return JSON(render.cluster_view(doc, hashes.get(doc["clusterset"])))

    @app.get("/v1/clusters/{cluster_id}/events", responses={200: {"model": schemas.EventPage}, **_ERRORS},
             tags=["clusters"], dependencies=[only_params("limit", "cursor", "continue")])  # fmt: skip
    async def cluster_events(views: Reader, cluster_id: Annotated[str, Path(max_length=256)], limit: Limit = 100,
                             cursor: Cursor = None, continue_: Continue = None) -> JSON:  # fmt: skip
        """The cluster's history: every event that concerned it (id, type, time, source, stream seq), oldest first."""
        if await views.cluster(cluster_id) is None:
            raise _not_found(f"cluster {cluster_id!r}")
        return JSON(await _history(views, f"cluster:{cluster_id}", limit, _cursor(cursor, continue_)))

    # ------------------------------------------------------------------ discovery
    @app.get("/v1/discovery", responses={200: {"model": schemas.DiscoveryPage}, **_ERRORS}, tags=["discovery"],
             dependencies=[only_params("clusterset", "env", "cloud", "region", "clusterType", "limit", "cursor",
                                       "continue")])  # fmt: skip
    async def discovery(
        views: Reader,
        clusterset: Annotated[str | None, Query(pattern=SET_NAME, max_length=58)] = None,
        env: Annotated[str | None, Query(pattern=ENV)] = None,
        cloud: Annotated[schemas.CloudName | None, Query()] = None,
        region: Annotated[str | None, Query(pattern=REGION)] = None,
        clusterType: Annotated[str | None, Query(pattern=CLUSTER_TYPE)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000, description="page size (1..10000)")] = 1000,
        cursor: Cursor = None,
        continue_: Continue = None,
    ) -> JSON:
        """READY clusters with their endpoints, for other control planes. Sorted by id, paginated."""
        filters = {"state": "READY", "clusterset": clusterset, "env": env, "cloud": cloud, "region": region,
                   "clusterType": clusterType}  # fmt: skip
        after = _decode(_cursor(cursor, continue_), "d")
        ids, last = page_after(await views.cluster_ids({k: v for k, v in filters.items() if v}), after, limit)
        items = [render.discovery_entry(d) for d in await views.clusters(ids) if d.get("state") == "READY"]
        return JSON({"items": items, "next": encode_cursor("d", last) if last else None})

    # ------------------------------------------------------------------ rollouts
    @app.get("/v1/rollouts", responses={200: {"model": schemas.RolloutPage}, **_ERRORS}, tags=["rollouts"],
             dependencies=[only_params("kind", "clusterset", "state", "limit", "cursor", "continue")])  # fmt: skip
    async def list_rollouts(
        views: Reader,
        kind: Annotated[schemas.RolloutKindName | None, Query(description="clusterset or fleet")] = None,
        clusterset: Annotated[str | None, Query(pattern=SET_NAME, max_length=58, description=_SET_FILTER)] = None,
        state: Annotated[schemas.RolloutStateName | None, Query()] = None,
        limit: Limit = 100,
        cursor: Cursor = None,
        continue_: Continue = None,
    ) -> JSON:  # fmt: skip
        """ClusterSet rollouts and fleet rollouts (told apart by `kind`), sorted by id, paginated.

        Listings leave out the long lists (timeline, per-set entries, cluster ids): GET /v1/rollouts/{id} has them.
        """
        filters = {"kind": ro.KINDS[kind] if kind else None, "clusterset": clusterset, "state": state}
        return await _index_page("r", _cursor(cursor, continue_), limit, filters, views.rollout_members,
                                 views.rollouts, render.rollout_listing)  # fmt: skip

    @app.get("/v1/rollouts/{rollout_id}",
             responses={200: {"model": schemas.RolloutDetail}, 409: {"model": schemas.ErrorBody,
                                                                     "description": "the id names both kinds"},
                        **_ERRORS},
             tags=["rollouts"], dependencies=[only_params("kind")])  # fmt: skip
    async def get_rollout(
        views: Reader,
        rollout_id: Annotated[str, Path(max_length=256)],
        kind: Annotated[schemas.RolloutKindName | None, Query(description="only needed if the id names both")] = None,
    ) -> JSON:
        """One rollout, either kind: state, progress, timeline, and the clusters (or ClusterSets) it covers."""
        docs = await views.rollout(rollout_id, [ro.KINDS[kind]] if kind else list(ro.KINDS.values()))
        if not docs:
            raise _not_found(f"rollout {rollout_id!r}")
        if len(docs) > 1:
            raise HTTPException(status_code=409, detail=f"{rollout_id!r} names a clusterset rollout and a fleet "
                                                        "rollout: add ?kind=clusterset or ?kind=fleet")  # fmt: skip
        return JSON(docs[0])

    # ------------------------------------------------------------------ control-plane migrations and upgrades
    @app.get("/v1/migrations", responses={200: {"model": schemas.MigrationPage}, **_ERRORS}, tags=["migrations"],
             dependencies=[only_params("kind", "clusterset", "cluster", "state", "limit", "cursor",
                                       "continue")])  # fmt: skip
    async def list_migrations(
        views: Reader,
        kind: Annotated[schemas.MigrationKindName | None, Query(description="migration, upgrade or pipeline")] = None,
        clusterset: Annotated[str | None, Query(pattern=SET_NAME, max_length=58)] = None,
        cluster: Annotated[str | None, Query(pattern=CLUSTER_ID, max_length=128,
                                             description="its operations, and the pipelines that cover it")] = None,
        state: Annotated[schemas.MigrationStateName | None, Query()] = None,
        limit: Limit = 100,
        cursor: Cursor = None,
        continue_: Continue = None,
    ) -> JSON:  # fmt: skip
        """Control-plane migrations and upgrades (one per cluster operation) and their pipelines, told apart by
        `kind`, sorted by id, paginated.

        Listings leave out the step timeline and the per-cluster entries: GET /v1/migrations/{id} has them.
        """
        filters = {"kind": kind, "clusterset": clusterset, "cluster": cluster, "state": state}
        return await _index_page("m", _cursor(cursor, continue_), limit, filters, views.migration_members,
                                 views.migrations, render.migration_listing)  # fmt: skip

    @app.get("/v1/migrations/{migration_id}",
             responses={200: {"model": schemas.MigrationDetail}, 409: {"model": schemas.ErrorBody,
                                                                       "description": "the id names both kinds"},
                        **_ERRORS},
             tags=["migrations"], dependencies=[only_params("kind")])  # fmt: skip
    async def get_migration(
        views: Reader,
        migration_id: Annotated[str, Path(max_length=256, description="an operation id or a pipeline id")],
        kind: Annotated[schemas.MigrationKindName | None, Query(description="only needed if the id names both")] = None,
    ) -> JSON:
        """One migration or upgrade with its step timeline, failure, availability and duration; or one pipeline
        with its clusters."""
        docs = await views.migration(migration_id, [kind] if kind else list(cp.KINDS))
        if not docs:
            raise _not_found(f"migration {migration_id!r}")
        if len(docs) > 1:
            raise HTTPException(status_code=409, detail=f"{migration_id!r} names an operation and a pipeline: add "
                                                        "?kind=pipeline or the operation's kind")  # fmt: skip
        return JSON(docs[0])

    return app


async def _index_page(kind: str, token: str | None, limit: int, filters: dict[str, str | None],
                      members: Callable[[dict[str, str]], Awaitable[list[str]]],
                      docs: Callable[[Sequence[str]], Awaitable[list[dict[str, Any]]]],
                      listing: Callable[[dict[str, Any]], dict[str, Any]]) -> JSON:  # fmt: skip
    """One page of an index (rollouts, migrations): the ids matching the filters after the cursor, rendered."""
    after = _decode(token, kind)
    page, last = page_after(await members({k: v for k, v in filters.items() if v}), after, limit)
    items = [listing(d) for d in await docs(page)]
    return JSON({"items": items, "next": encode_cursor(kind, last) if last else None})


async def _history(views: ViewReader, key: str, limit: int, token: str | None) -> dict[str, Any]:
    raw = _decode(token, "e")
    if raw is not None and not re.fullmatch(r"\d{1,12}", raw):
        raise _invalid("cursor", "cursor is not a token returned by this endpoint", token)
    start = int(raw) if raw is not None else 0
    items, total = await views.history(key, start, limit)
    more = start + limit < total
    return {"items": items, "next": encode_cursor("e", start + limit) if more else None, "total": total}
