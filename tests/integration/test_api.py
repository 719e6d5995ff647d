"""The status API over real Redis (views projected from a real NATS stream): reads, filters, pages, 404s, 422s."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.status_projector import core, schemas
from services.status_projector import testing as T
from services.status_projector.api import create_app
from services.status_projector.projector import Projector
from services.status_projector.store import Loaded, ViewKeys, encode_cursor, stage_batch
from shared.bus import Bus
from shared.config import Settings
from shared.events import Envelope, new_event
from shared.events import models as m
from tests.conftest import example_documents

DOCS = example_documents()
CS = T.parse(DOCS["modelserving-prod-aws-us-east-1"])
AZ = T.parse(DOCS["dataeng-staging-azure-westeurope"])
SM = T.parse(DOCS["core-prod-aws-eu-west-1"])
MS, DE, CORE = CS.metadata.name, AZ.metadata.name, SM.metadata.name


def history() -> list[Envelope]:
    return [*T.fleet_history(CS, ["ms-1", "ms-2", "ms-3"], retired=["ms-3"]), *T.fleet_history(AZ, ["de-1"])]


@pytest.fixture
async def projector(bus: Bus, redis: Redis, settings: Settings) -> AsyncIterator[Projector]:
    p = Projector(bus, redis, settings.redis_prefix, idle_check_s=0.3, heartbeat_s=0.5)
    await p.start()
    yield p
    await p.stop()


def rollout_history() -> list[Envelope]:
    """A fleet rollout over both sets (k131: halted; its AWS set's rotation k131-a: completed), then a rotation
    of the Azure set of its own (de-rot: in progress)."""
    fleet = T.fleet_rollout_history("k131", (CS, ["ms-1", "ms-2"]), (AZ, ["de-1"]), T.T0 + T.STEP * 1000)
    solo = T.rotation(AZ, T.with_spec(AZ, kubernetes_version="1.32"), T.accepted(AZ), "de-rot", ["de-1"], ["de-2"],
                      T.T0 + T.STEP * 2000)  # fmt: skip
    return [*fleet, *solo[:2]]  # de-rot: requested and started


@contextlib.asynccontextmanager
async def api_over(events: list[Envelope], bus: Bus, redis: Redis, settings: Settings,
                   projector: Projector) -> AsyncIterator[httpx.AsyncClient]:  # fmt: skip
    """The API in-process (ASGI) over the views of `events`, published to FLEET and projected."""
    for env in events:
        await bus.publish(env)
    await projector.wait_for(len(events), 20)
    app = create_app(settings, redis=redis, bus=bus, projector=projector)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
        yield c


@pytest.fixture
async def client(bus: Bus, redis: Redis, settings: Settings, projector: Projector) -> AsyncIterator[httpx.AsyncClient]:
    async with api_over(history(), bus, redis, settings, projector) as c:
        yield c


def control_plane_history() -> list[Envelope]:
    """A self-managed set of three clusters; a migration pipeline (two at a time, budget 0) whose second cluster
    rolls back, halting it before the third; then an upgrade of the first cluster, one node at a time."""
    acc = T.accepted(SM)
    return [*T.fleet_history(SM, ["cp-1", "cp-2", "cp-3"]),
            *T.pipeline(SM, acc, "pl-1", ["cp-1", "cp-2", "cp-3"], T.T0 + T.STEP * 1000, fail=["cp-2"]),
            *T.upgrade(SM, acc, "cp-1", "up-1", T.T0 + T.STEP * 2000, to_version="1.30")]  # fmt: skip


@pytest.fixture
async def migrations(bus: Bus, redis: Redis, settings: Settings,
                     projector: Projector) -> AsyncIterator[httpx.AsyncClient]:  # fmt: skip
    async with api_over([*history(), *control_plane_history()], bus, redis, settings, projector) as c:
        yield c


@pytest.fixture
async def rollouts(bus: Bus, redis: Redis, settings: Settings,
                   projector: Projector) -> AsyncIterator[httpx.AsyncClient]:  # fmt: skip
    async with api_over([*history(), *rollout_history()], bus, redis, settings, projector) as c:
        yield c


async def get(client: httpx.AsyncClient, url: str, status: int = 200, **params: Any) -> Any:
    r = await client.get(url, params=params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


# ---------------------------------------------------------------- cluster sets
async def test_clustersets(client: httpx.AsyncClient) -> None:
    page = await get(client, "/v1/clustersets")
    assert [s["name"] for s in page["items"]] == sorted([MS, DE]) and page["next"] is None
    ms = next(s for s in page["items"] if s["name"] == MS)
    assert ms["status"]["counts"]["READY"] == 2 and ms["status"]["counts"]["DELETED"] == 1
    assert ms["status"]["readyClusters"] == 2 and "clusters" not in ms["status"]

    one = await get(client, f"/v1/clustersets/{MS}")
    assert one["accepted"] and one["generation"] == 1 and one["count"] == 5 and one["clusterType"] == "ModelServing"
    assert one["status"]["observedGeneration"] == 1 and one["status"]["readyClusters"] == 2
    assert [c["name"] for c in one["status"]["clusters"]] == ["ms-1", "ms-2"]
    member = one["status"]["clusters"][0]
    assert member["kind"] == "Cluster" and member["status"]["state"] == "READY"
    assert member["status"]["endpoint"] == "https://ms-1.example.aws.test"
    assert member["status"]["network"]["vpcId"] == "net-ms-1" and member["spec"]["configHash"] == one["configHash"]

    summary = await get(client, f"/v1/clustersets/{MS}", includeClusters="false")
    assert "clusters" not in summary["status"] and summary["status"]["counts"] == one["status"]["counts"]

    events = await get(client, f"/v1/clustersets/{MS}/events")
    assert [e["type"] for e in events["items"]] == ["ClusterSetAccepted"] and events["total"] == 1

    first = await get(client, "/v1/clustersets", limit=1)
    second = await get(client, "/v1/clustersets", limit=1, cursor=first["next"])
    assert [s["name"] for s in first["items"] + second["items"]] == sorted([MS, DE]) and second["next"] is None


# ---------------------------------------------------------------- clusters
async def test_cluster_filters(client: httpx.AsyncClient) -> None:
    ids = lambda page: [c["id"] for c in page["items"]]  # noqa: E731
    assert ids(await get(client, "/v1/clusters")) == ["de-1", "ms-1", "ms-2", "ms-3"]
    assert ids(await get(client, "/v1/clusters", state="READY")) == ["de-1", "ms-1", "ms-2"]
    assert ids(await get(client, "/v1/clusters", state="DELETED")) == ["ms-3"]
    assert ids(await get(client, "/v1/clusters", cloud="azure")) == ["de-1"]
    assert ids(await get(client, "/v1/clusters", cloud="gcp")) == []
    assert ids(await get(client, "/v1/clusters", clusterset=MS, state="READY")) == ["ms-1", "ms-2"]
    assert ids(await get(client, "/v1/clusters", env="prod", region="us-east-1")) == ["ms-1", "ms-2", "ms-3"]
    assert ids(await get(client, "/v1/clusters", clusterType=AZ.metadata.cluster_type)) == ["de-1"]
    assert ids(await get(client, "/v1/clusters", clusterset="no-such-set")) == []


async def test_cluster_pagination(client: httpx.AsyncClient) -> None:
    seen, token, pages = [], None, 0
    while True:
        page = await get(client, "/v1/clusters", limit=3, **({"continue": token} if token else {}))
        seen += [c["id"] for c in page["items"]]
        pages += 1
        token = page["next"]
        if token is None:
            break
    assert seen == ["de-1", "ms-1", "ms-2", "ms-3"] and pages == 2
    page = await get(client, "/v1/clusters", limit=1, cursor=encode_cursor("c", "ms-1"))
    assert [c["id"] for c in page["items"]] == ["ms-2"]
    page = await get(client, "/v1/clusters", limit=2, cursor="")  # an empty token is the first page
    assert [c["id"] for c in page["items"]] == ["de-1", "ms-1"]


async def test_the_python_client_reads_the_api(client: httpx.AsyncClient, settings: Settings) -> None:
    """shared.client.FlotillaClient is what users and the CLI call: it must understand these pages."""
    from shared.client import FlotillaClient

    api = FlotillaClient(settings.nats_url, "http://api", page_size=2)
    await api._http.aclose()
    api._http = client  # route its requests into the ASGI app
    assert [c["id"] for c in await api.clusters(state="READY")] == ["de-1", "ms-1", "ms-2"]
    assert [s["name"] for s in await api.clustersets()] == sorted([MS, DE])
    assert (await api.cluster("ms-1") or {})["state"] == "READY" and await api.cluster("nope") is None


async def test_one_cluster_and_its_history(client: httpx.AsyncClient) -> None:
    c = await get(client, "/v1/clusters/ms-1")
    assert c["state"] == "READY" and c["outdated"] is False and c["clusterset"] == MS
    assert c["location"] == {"env": "prod", "cloud": "aws", "region": "us-east-1"}
    assert set(c["resources"]) == {"network", "cluster", "node_pools", "iam", "log_stream"}
    assert c["createdAt"] == "2026-11-21T10:00:01Z" and c["failure"] is None

    events = await get(client, "/v1/clusters/ms-1/events")
    assert events["total"] == c["eventCount"] == len(events["items"])
    assert events["items"][0]["type"] == "ClusterRequested" and events["items"][-1]["type"] == "ClusterReady"
    assert [e["seq"] for e in events["items"]] == sorted(e["seq"] for e in events["items"])

    got, token = [], None
    while True:
        page = await get(client, "/v1/clusters/ms-1/events", limit=4, **({"cursor": token} if token else {}))
        got += page["items"]
        token = page["next"]
        if not token:
            break
    assert got == events["items"]


async def test_discovery_lists_ready_clusters_with_endpoints(client: httpx.AsyncClient) -> None:
    page = await get(client, "/v1/discovery")
    assert [c["id"] for c in page["items"]] == ["de-1", "ms-1", "ms-2"]
    entry = page["items"][1]
    assert entry["endpoint"] == "https://ms-1.example.aws.test" and entry["configHash"]
    assert entry["location"]["cloud"] == "aws" and entry["clusterType"] == "ModelServing"
    assert "credentialRef" not in entry
    assert [c["id"] for c in (await get(client, "/v1/discovery", cloud="aws", region="us-east-1"))["items"]] == [
        "ms-1", "ms-2"]  # fmt: skip
    assert (await get(client, "/v1/discovery", env="staging", cloud="aws"))["items"] == []


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("url", "params", "param"),
    [
        ("/v1/clusters", {"state": "RUNNING"}, "state"),
        ("/v1/clusters", {"state": "ready"}, "state"),
        ("/v1/clusters", {"cloud": "mars"}, "cloud"),
        ("/v1/clusters", {"limit": "0"}, "limit"),
        ("/v1/clusters", {"limit": "1001"}, "limit"),
        ("/v1/clusters", {"limit": "many"}, "limit"),
        ("/v1/clusters", {"cursor": "%%%not-a-token"}, "cursor"),
        ("/v1/clusters", {"cursor": encode_cursor("e", 3)}, "cursor"),
        ("/v1/clusters", {"cursor": encode_cursor("c", "a"), "continue": encode_cursor("c", "b")}, "continue"),
        ("/v1/clusters", {"env": "Prod!"}, "env"),
        ("/v1/clusters", {"clusterset": "Bad_Name"}, "clusterset"),
        ("/v1/clusters", {"cluster_set": "x"}, "cluster_set"),
        ("/v1/discovery", {"cloud": "oracle"}, "cloud"),
        ("/v1/discovery", {"state": "READY"}, "state"),
        ("/v1/discovery", {"limit": "10001"}, "limit"),
        ("/v1/clustersets", {"cursor": "bm9wZQ"}, "cursor"),
        ("/v1/clusters/ms-1/events", {"cursor": encode_cursor("e", "x")}, "cursor"),
        ("/v1/clusters/ms-1/events", {"limit": "-1"}, "limit"),
        ("/v1/rollouts", {"kind": "weekly"}, "kind"),
        ("/v1/rollouts", {"state": "RUNNING"}, "state"),
        ("/v1/rollouts", {"state": "paused"}, "state"),
        ("/v1/rollouts", {"clusterset": "Bad_Name"}, "clusterset"),
        ("/v1/rollouts", {"cluster": "x"}, "cluster"),
        ("/v1/rollouts", {"limit": "1001"}, "limit"),
        ("/v1/rollouts", {"cursor": encode_cursor("c", "ms-1")}, "cursor"),
        ("/v1/rollouts/k131", {"kind": "both"}, "kind"),
        ("/v1/rollouts/k131", {"state": "HALTED"}, "state"),
        ("/v1/migrations", {"kind": "rotation"}, "kind"),
        ("/v1/migrations", {"state": "RUNNING"}, "state"),
        ("/v1/migrations", {"state": "halted"}, "state"),
        ("/v1/migrations", {"clusterset": "Bad_Name"}, "clusterset"),
        ("/v1/migrations", {"cluster": "Bad_Id"}, "cluster"),
        ("/v1/migrations", {"cluster": "c" * 129}, "cluster"),
        ("/v1/migrations", {"operation": "migrate"}, "operation"),
        ("/v1/migrations", {"limit": "0"}, "limit"),
        ("/v1/migrations", {"cursor": encode_cursor("r", "pl-1")}, "cursor"),
        ("/v1/migrations/pl-1", {"kind": "fleet"}, "kind"),
        ("/v1/migrations/pl-1", {"state": "HALTED"}, "state"),
    ],
)
async def test_bad_query_parameters_are_422_with_a_message(
    client: httpx.AsyncClient, url: str, params: dict[str, str], param: str
) -> None:
    body = await get(client, url, 422, **params)
    assert body["error"] == "invalid request"
    assert body["message"].startswith(f"{param}: ") or f"; {param}: " in body["message"], body["message"]
    assert any(d["loc"][-1] == param for d in body["detail"])


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("/v1/clusters/nope", "cluster 'nope'"),
        ("/v1/clusters/nope/events", "cluster 'nope'"),
        ("/v1/clustersets/nope", "clusterset 'nope'"),
        ("/v1/clustersets/nope/events", "clusterset 'nope'"),
        ("/v1/rollouts/nope", "rollout 'nope'"),
        ("/v1/migrations/nope", "migration 'nope'"),
    ],
)
async def test_unknown_ids_are_404_with_a_message(client: httpx.AsyncClient, url: str, what: str) -> None:
    body = await get(client, url, 404)
    assert body == {"error": "not found", "message": f"{what} not found", "detail": None}


# ---------------------------------------------------------------- health, OpenAPI
async def test_health_readiness_and_openapi(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, bus: Bus, projector: Projector
) -> None:
    assert await get(client, "/healthz") == {"status": "ok"}
    ready = await get(client, "/readyz")
    n = len(history())
    assert ready["ready"] and ready["redis"] and ready["nats"]
    assert ready["projector"] | {"lastError": None} == {"running": True, "subscribed": True, "namespace": "live",
                                                        "checkpoint": n, "streamLastSeq": n, "lag": 0,
                                                        "lastError": None}  # fmt: skip
    spec = await get(client, "/openapi.json")
    assert {"/v1/clustersets", "/v1/clustersets/{name}", "/v1/clusters", "/v1/clusters/{cluster_id}",
            "/v1/clusters/{cluster_id}/events", "/v1/discovery", "/healthz", "/readyz", "/v1/rollouts",
            "/v1/rollouts/{rollout_id}", "/v1/migrations",
            "/v1/migrations/{migration_id}"} <= set(spec["paths"])  # fmt: skip
    params = {p["name"] for p in spec["paths"]["/v1/rollouts"]["get"]["parameters"]}
    assert {"kind", "clusterset", "state", "limit", "cursor", "continue"} <= params
    assert {"ClusterSetRollout", "FleetRollout", "FleetSetEntry", "RolloutPage"} <= set(spec["components"]["schemas"])
    params = {p["name"] for p in spec["paths"]["/v1/migrations"]["get"]["parameters"]}
    assert {"kind", "clusterset", "cluster", "state", "limit", "cursor", "continue"} <= params
    assert {"ControlPlaneOperation", "ControlPlanePipeline", "MigrationStep", "Availability", "MigrationPage",
            "ClusterControlPlane"} <= set(spec["components"]["schemas"])  # fmt: skip
    params = {p["name"] for p in spec["paths"]["/v1/clusters"]["get"]["parameters"]}
    assert {"clusterset", "state", "env", "cloud", "region", "clusterType", "limit", "cursor", "continue"} <= params
    assert "Cluster" in spec["components"]["schemas"] and "Member" in spec["components"]["schemas"]

    await projector.stop()
    app = create_app(settings, redis=redis, bus=bus, projector=projector)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c2:
        r = await c2.get("/readyz")
        assert r.status_code == 503 and r.json()["projector"]["running"] is False


# ---------------------------------------------------------------- rollouts
def ids_and_kinds(page: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["id"], r["kind"]) for r in page["items"]]


async def test_rollouts_of_both_kinds_filtered(rollouts: httpx.AsyncClient) -> None:
    page = await get(rollouts, "/v1/rollouts")
    assert ids_and_kinds(page) == [("de-rot", "ClusterSetRollout"), ("k131", "FleetRollout"),
                                   ("k131-a", "ClusterSetRollout")] and page["next"] is None  # fmt: skip
    schemas.RolloutPage.model_validate(page)
    fleet = page["items"][1]
    assert "sets" not in fleet and "timeline" not in fleet and fleet["setCounts"]["FAILED"] == 1
    assert fleet["state"] == "HALTED" and fleet["stages"][0]["name"] == "canary"
    assert "createdClusters" not in page["items"][2] and page["items"][2]["state"] == "COMPLETED"

    async def ids(**params: str) -> list[str]:
        r = await rollouts.get("/v1/rollouts", params=params)
        assert r.status_code == 200, r.text
        return [item["id"] for item in r.json()["items"]]

    assert await ids(kind="fleet") == ["k131"]
    assert await ids(kind="clusterset") == ["de-rot", "k131-a"]
    assert await ids(clusterset=MS) == ["k131", "k131-a"]  # a fleet rollout is listed under every set it covers
    assert await ids(clusterset=DE) == ["de-rot", "k131"]
    assert await ids(clusterset=DE, kind="clusterset") == ["de-rot"]
    assert await ids(state="HALTED") == ["k131"]
    assert await ids(state="IN_PROGRESS") == ["de-rot"]
    assert await ids(state="COMPLETED", clusterset=MS) == ["k131-a"]
    assert await ids(clusterset="no-such-set") == []

    seen, token = [], None
    while True:
        page = await get(rollouts, "/v1/rollouts", limit=1, **({"continue": token} if token else {}))
        seen += [r["id"] for r in page["items"]]
        token = page["next"]
        if not token:
            break
    assert seen == ["de-rot", "k131", "k131-a"]


async def test_one_rollout_of_either_kind_in_full(rollouts: httpx.AsyncClient) -> None:
    fleet = await get(rollouts, "/v1/rollouts/k131")
    schemas.RolloutDetail.model_validate(fleet)
    assert fleet["kind"] == "FleetRollout" and fleet["state"] == "HALTED" and fleet["budgetExceeded"] is True
    assert [(e["clusterset"], e["stage"], e["state"]) for e in fleet["sets"]] == [(MS, "canary", "SUCCEEDED"),
                                                                                 (DE, "rest", "FAILED")]
    canary = fleet["sets"][0]
    assert canary["rolloutId"] == "k131-a" and canary["rollout"]["state"] == "COMPLETED"
    assert canary["rollout"]["replaced"] == 2 and canary["converged"]["generation"] == 2
    assert [t["state"] for t in fleet["timeline"]] == ["IN_PROGRESS", "SOAKING", "AWAITING_APPROVAL", "IN_PROGRESS",
                                                       "HALTED"]  # fmt: skip

    one = await get(rollouts, "/v1/rollouts/k131-a")
    schemas.RolloutDetail.model_validate(one)
    assert one["kind"] == "ClusterSetRollout" and one["clusterset"] == MS and one["fleetRolloutId"] == "k131"
    assert one["createdClusters"] == ["ms-1-v2", "ms-2-v2"] and one["retiredClusters"] == ["ms-1", "ms-2"]
    assert [t["state"] for t in one["timeline"]] == ["REQUESTED", "IN_PROGRESS", "COMPLETED"]
    assert (await get(rollouts, "/v1/rollouts/k131-a", kind="clusterset"))["id"] == "k131-a"
    assert (await get(rollouts, "/v1/rollouts/k131-a", 404, kind="fleet"))["message"] == "rollout 'k131-a' not found"

    # The set and its clusters point at the rollouts that changed them.
    ms = await get(rollouts, f"/v1/clustersets/{MS}")
    assert ms["rollout"]["rolloutId"] == "k131-a" and ms["fleetRollout"]["fleetRolloutId"] == "k131"
    assert ms["convergedGeneration"] == 2 and ms["lastChange"]["updatePath"] == "rotation"
    assert (await get(rollouts, "/v1/clusters/ms-1-v2"))["createdByRolloutId"] == "k131-a"
    retired = await get(rollouts, "/v1/clusters/ms-1")
    assert retired["state"] == "DELETED" and retired["retirement"]["rolloutId"] == "k131-a"
    assert retired["drain"]["evicted"] == 12


async def test_an_id_of_both_kinds_needs_the_kind(rollouts: httpx.AsyncClient, bus: Bus, projector: Projector) -> None:
    """Rollout ids and fleet rollout ids are separate namespaces: the same id can name one of each."""
    paused = new_event(m.RolloutPaused(location=AZ.metadata.location, clusterset=DE, rollout_id="k131",
                                       reason="operator"), source="rotation")  # fmt: skip
    await bus.publish(paused)
    await projector.wait_for(await projector.stream_last_seq(), 20)
    body = await get(rollouts, "/v1/rollouts/k131", 409)
    assert body["error"] == "conflict" and "?kind=clusterset or ?kind=fleet" in body["message"]
    assert (await get(rollouts, "/v1/rollouts/k131", kind="clusterset"))["state"] == "PAUSED"
    assert (await get(rollouts, "/v1/rollouts/k131", kind="fleet"))["state"] == "HALTED"
    page = await get(rollouts, "/v1/rollouts", clusterset=DE)
    assert ids_and_kinds(page) == [("de-rot", "ClusterSetRollout"), ("k131", "ClusterSetRollout"),
                                   ("k131", "FleetRollout")]  # fmt: skip


async def test_the_python_client_reads_rollouts(rollouts: httpx.AsyncClient, settings: Settings) -> None:
    from shared.client import FlotillaClient

    api = FlotillaClient(settings.nats_url, "http://api", page_size=1)
    await api._http.aclose()
    api._http = rollouts
    assert [r["id"] for r in await api.rollouts()] == ["de-rot", "k131", "k131-a"]
    assert [r["id"] for r in await api.rollouts(kind="fleet", clusterset=DE)] == ["k131"]
    assert [r["id"] for r in await api.rollouts(state="COMPLETED")] == ["k131-a"]
    assert len(await api.rollouts(limit=2)) == 2
    assert (await api.rollout("k131") or {})["kind"] == "FleetRollout"
    assert await api.rollout("nope") is None and await api.rollout("k131", kind="clusterset") is None
    with pytest.raises(TypeError, match="unknown rollout kind"):
        await api.rollouts(kind="weekly")


# ---------------------------------------------------------------- control-plane migrations and upgrades
async def test_migrations_upgrades_and_pipelines_listed_and_filtered(migrations: httpx.AsyncClient) -> None:
    page = await get(migrations, "/v1/migrations")
    schemas.MigrationPage.model_validate(page)
    assert [(d["id"], d["kind"], d["state"]) for d in page["items"]] == [
        ("pl-1", "pipeline", "HALTED"), ("pl-1-cp-1", "migration", "COMPLETED"),
        ("pl-1-cp-2", "migration", "ROLLED_BACK"), ("up-1", "upgrade", "COMPLETED")] and page["next"] is None
    assert not {"timeline", "clusters"} & {k for d in page["items"] for k in d}  # long lists: detail only
    pipeline = page["items"][0]
    assert (pipeline["succeeded"], pipeline["failed"], pipeline["pending"], pipeline["budgetExceeded"]) == (
        1, 1, 1, True)

    async def ids(**params: str) -> list[str]:
        r = await migrations.get("/v1/migrations", params=params)
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()["items"]]

    assert await ids(kind="pipeline") == ["pl-1"]
    assert await ids(kind="upgrade") == ["up-1"]
    assert await ids(kind="migration", clusterset=CORE) == ["pl-1-cp-1", "pl-1-cp-2"]
    assert await ids(cluster="cp-1") == ["pl-1", "pl-1-cp-1", "up-1"]  # a pipeline is listed under its clusters
    assert await ids(cluster="cp-3") == ["pl-1"]
    assert await ids(state="HALTED") == ["pl-1"]
    assert await ids(state="ROLLED_BACK", cluster="cp-2") == ["pl-1-cp-2"]
    assert await ids(state="COMPLETED", kind="migration") == ["pl-1-cp-1"]
    assert await ids(clusterset=MS) == [] and await ids(cluster="ms-1") == []

    seen, token = [], None
    while True:
        page = await get(migrations, "/v1/migrations", limit=3, **({"continue": token} if token else {}))
        seen += [d["id"] for d in page["items"]]
        token = page["next"]
        if not token:
            break
    assert seen == ["pl-1", "pl-1-cp-1", "pl-1-cp-2", "up-1"]


async def test_one_migration_with_its_timeline_and_what_the_cluster_and_set_show(
    migrations: httpx.AsyncClient,
) -> None:
    done = await get(migrations, "/v1/migrations/pl-1-cp-1")
    schemas.MigrationDetail.model_validate(done)
    assert (done["kind"], done["state"], done["clusterId"], done["pipelineId"]) == ("migration", "COMPLETED", "cp-1",
                                                                                    "pl-1")  # fmt: skip
    assert [(t["phase"], t["step"]) for t in done["timeline"]] == list(T.MIGRATION_STEPS)
    assert all(t["completedAt"] and t["startedAt"] and t["durationS"] == 0.5 for t in done["timeline"])
    assert done["availability"]["availabilityPct"] == 99.0 and done["availability"]["downtimeS"] == 2.5
    assert done["durationS"] == 13.0 and done["members"] == ["cp-1-cp-0", "cp-1-cp-1", "cp-1-cp-2"]

    rolled_back = await get(migrations, "/v1/migrations/pl-1-cp-2")
    assert rolled_back["failure"]["step"] == "restore-members" and rolled_back["failure"]["rolledBack"] is True
    assert [t["step"] for t in rolled_back["timeline"] if t["rollback"]] == list(T.ROLLBACK_STEPS)

    upgrade = await get(migrations, "/v1/migrations/up-1")
    assert upgrade["toVersion"] == "1.30" and upgrade["nodes"] == ["cp-1-cp-0", "cp-1-cp-1", "cp-1-cp-2"]
    assert len(upgrade["timeline"]) == 13 and upgrade["availability"]["requestsWithoutQuorum"] == 0

    pipeline = await get(migrations, "/v1/migrations/pl-1")
    schemas.MigrationDetail.model_validate(pipeline)
    assert [(e["clusterId"], e["state"], e["operationId"]) for e in pipeline["clusters"]] == [
        ("cp-1", "SUCCEEDED", "pl-1-cp-1"), ("cp-2", "FAILED", "pl-1-cp-2"), ("cp-3", "PENDING", None)]
    assert pipeline["reason"] == "1 cluster(s) failed; the failure budget is 0" and pipeline["concurrency"] == 2
    assert (await get(migrations, "/v1/migrations/pl-1", kind="pipeline"))["id"] == "pl-1"
    assert (await get(migrations, "/v1/migrations/pl-1", 404, kind="migration"))["message"] == \
        "migration 'pl-1' not found"

    cp1 = await get(migrations, "/v1/clusters/cp-1")
    assert cp1["state"] == "READY" and cp1["controlPlane"] | {"lastOperation": None} == {
        "mode": "self-managed", "ha": True, "members": ["cp-1-cp-0", "cp-1-cp-1", "cp-1-cp-2"],
        "endpoint": "https://cp-1.example.aws.test", "version": "1.30", "lastOperation": None}  # fmt: skip
    assert cp1["controlPlane"]["lastOperation"]["operationId"] == "up-1"
    cp2 = await get(migrations, "/v1/clusters/cp-2")
    assert cp2["controlPlane"]["ha"] is False and cp2["controlPlane"]["lastOperation"]["state"] == "ROLLED_BACK"
    cp3 = await get(migrations, "/v1/clusters/cp-3")
    assert cp3["controlPlane"] == {"mode": "self-managed", "ha": False, "members": [], "endpoint": None,
                                   "version": "1.29", "lastOperation": None}  # fmt: skip
    events = await get(migrations, "/v1/clusters/cp-2/events")
    assert events["items"][-1]["type"] == "ControlPlaneMigrationRolledBack"
    core_set = await get(migrations, f"/v1/clustersets/{CORE}")
    assert core_set["controlPlanePipeline"]["pipelineId"] == "pl-1" and core_set["controlPlanePipeline"]["state"] \
        == "HALTED"


async def test_an_operation_and_a_pipeline_with_one_id_need_the_kind(
    migrations: httpx.AsyncClient, bus: Bus, projector: Projector
) -> None:
    """Operation ids and pipeline ids are separate key spaces: the same id can name one of each."""
    await bus.publish(new_event(m.ControlPlaneMigrationRequested(
        location=SM.metadata.location, clusterset=CORE, cluster_id="cp-3", operation_id="pl-1"), source="planner"))
    await projector.wait_for(await projector.stream_last_seq(), 20)
    body = await get(migrations, "/v1/migrations/pl-1", 409)
    assert body["error"] == "conflict" and "?kind=pipeline" in body["message"]
    assert (await get(migrations, "/v1/migrations/pl-1", kind="migration"))["state"] == "REQUESTED"
    assert (await get(migrations, "/v1/migrations/pl-1", kind="pipeline"))["state"] == "HALTED"
    assert [(d["id"], d["kind"]) for d in (await get(migrations, "/v1/migrations", cluster="cp-3"))["items"]] == [
        ("pl-1", "migration"), ("pl-1", "pipeline")]


async def test_the_python_client_reads_migrations(migrations: httpx.AsyncClient, settings: Settings) -> None:
    from shared.client import FlotillaClient

    api = FlotillaClient(settings.nats_url, "http://api", page_size=1)
    await api._http.aclose()
    api._http = migrations
    assert [d["id"] for d in await api.migrations()] == ["pl-1", "pl-1-cp-1", "pl-1-cp-2", "up-1"]
    assert [d["id"] for d in await api.migrations(kind="migration", cluster="cp-2")] == ["pl-1-cp-2"]
    assert [d["id"] for d in await api.migrations(state="COMPLETED", clusterset=CORE, limit=1)] == ["pl-1-cp-1"]
    assert (await api.migration("up-1") or {})["kind"] == "upgrade"
    assert await api.migration("nope") is None and await api.migration("up-1", kind="pipeline") is None
    with pytest.raises(TypeError, match="unknown migration kind"):
        await api.migrations(kind="rotation")


# ---------------------------------------------------------------- scale
async def test_ten_thousand_clusters_filter_and_page_fast(redis: Redis, settings: Settings) -> None:
    """Seeds 10,000 cluster documents through the same staging code the projector uses, then queries."""
    views = core.Views()
    for seq, env in enumerate(T.fleet_history(CS, ["tmpl"]), 1):
        core.apply(views, seq, env)
    template = views.clusters.pop("tmpl")
    clouds = [("aws", "us-east-1"), ("azure", "westeurope"), ("gcp", "europe-west4")]
    states = ["READY"] * 7 + ["PROVISIONING", "FAILED", "DELETED"]
    for i in range(10_000):
        doc = copy.deepcopy(template)
        cloud, region = clouds[i % 3]
        doc.update(id=f"c-{i:05d}", name=f"c-{i:05d}", state=states[i % 10], clusterset=f"set-{i % 50:02d}",
                   location={"env": "prod" if i % 2 else "dev", "cloud": cloud, "region": region})  # fmt: skip
        views.clusters[doc["id"]] = doc
    keys = ViewKeys(settings.redis_prefix, "live")
    pipe = redis.pipeline(transaction=False)
    stage_batch(pipe, keys, Loaded(), core.Views(clusters=views.clusters), (), 1)
    await pipe.execute()

    app = create_app(settings, redis=redis)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        started = time.perf_counter()
        page = await get(client, "/v1/clusters", limit=1000, state="READY", cloud="aws", env="prod")
        filtered = time.perf_counter() - started
        expected = sorted(f"c-{i:05d}" for i in range(10_000)
                          if i % 3 == 0 and i % 2 == 1 and states[i % 10] == "READY")  # fmt: skip
        assert [c["id"] for c in page["items"]] == expected[:1000]
        assert (page["next"] is not None) == (len(expected) > 1000)

        started = time.perf_counter()
        total, token = 0, None
        while True:
            page = await get(client, "/v1/clusters", limit=1000, **({"cursor": token} if token else {}))
            total += len(page["items"])
            token = page["next"]
            if not token:
                break
        full_scan = time.perf_counter() - started
        assert total == 10_000

        started = time.perf_counter()
        found = await get(client, "/v1/discovery", limit=10_000)
        discovery = time.perf_counter() - started
        assert len(found["items"]) == 7_000
    # Generous bounds for a loaded 2-core CI box; typical is a few tens of milliseconds per page.
    assert filtered < 1.0, filtered
    assert full_scan < 5.0, full_scan
    assert discovery < 5.0, discovery
