"""FlotillaClient against real nats-server / redis-server; the test plays the planner (and the status API).

Also the embedded stack's failure path: a service that dies is named with its log, and nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import uvicorn
from fastapi import FastAPI, HTTPException
from nats.js import api as jsapi
from rich.console import Console

from shared.bus import Bus
from shared.client import ApiError, FlotillaClient, FlotillaError, FlotillaTimeout, InvalidRequest
from shared.config import Settings
from shared.embedded import ServerProcess, free_port
from shared.events import Envelope, FieldError, Location, new_event, subjects, validate_clusterset
from shared.events.factory import payload_as
from shared.events.models import (
    ClusterReady,
    ClusterSetAccepted,
    ClusterSetApplied,
    ClusterSetDeleted,
    ClusterSetRejected,
    ClusterSetRetired,
    ControlPlaneChangeRequested,
    ControlPlanePipelineRequested,
    FleetRolloutApproved,
    FleetRolloutControlRequested,
    FleetRolloutRejected,
    FleetRolloutRequested,
    FleetRolloutStarted,
    PipelineCluster,
    RolloutControlRequested,
    RolloutPaused,
)
from shared.stack import StackOptions, run
from tests.conftest import EXAMPLES_DIR, example_documents
from tests.helpers import wait_until

MODELSERVING = "modelserving-prod-aws-us-east-1"


class FakePlanner:
    """Answers intents like the planner: validate, then Accepted/Rejected (or Retired), caused by the intent."""

    def __init__(self, bus: Bus, noise: bool = False) -> None:
        self.bus = bus
        self.noise = noise  # first publish an answer caused by some other event: the client must ignore it
        self.seen: list[Envelope] = []
        self.known: dict[str, ClusterSetAccepted] = {}

    async def start(self) -> None:
        self.sub = await self.bus.js.subscribe(
            subjects.CLUSTERSETS_ALL, stream=subjects.STREAM_CLUSTERSETS, ordered_consumer=True,
            deliver_policy=jsapi.DeliverPolicy.ALL, cb=self.on_msg,
        )  # fmt: skip

    async def on_msg(self, msg: Any) -> None:
        env = Envelope.from_bytes(msg.data)
        self.seen.append(env)
        if self.noise:
            other = new_event(ClusterSetDeleted(name="other"), source="someone")
            await self.bus.publish(new_event(ClusterSetRejected(clusterset="x", errors=[]), source="planner",
                                             cause=other))  # fmt: skip
        if env.type == ClusterSetApplied.type_name():
            doc = payload_as(env, ClusterSetApplied).document
            model, errors = validate_clusterset(doc)
            if model is None:
                loc = doc.get("metadata", {}).get("location", {}) if isinstance(doc.get("metadata"), dict) else {}
                answer: Any = ClusterSetRejected(clusterset=doc.get("metadata", {}).get("name"), errors=errors,
                                                 cloud=loc.get("cloud"), region=loc.get("region"))  # fmt: skip
            else:
                previous = self.known.get(model.metadata.name)
                config_hash = model.spec.cluster_spec().config_hash()
                generation = (previous.generation if previous and previous.config_hash == config_hash
                              else (previous.generation + 1 if previous else 1))  # fmt: skip
                answer = ClusterSetAccepted(
                    location=model.metadata.location, clusterset=model.metadata.name, generation=generation,
                    cluster_type=model.metadata.cluster_type, count=model.spec.count, config_hash=config_hash,
                    spec=model.spec.cluster_spec(), update_strategy=model.spec.update_strategy,
                    document_hash=config_hash,
                )  # fmt: skip
                self.known[model.metadata.name] = answer
        else:
            name = payload_as(env, ClusterSetDeleted).name
            accepted = self.known.pop(name, None)
            if accepted is None:
                return  # unknown set: the planner says nothing
            answer = ClusterSetRetired(location=accepted.location, clusterset=name, generation=accepted.generation,
                                       clusters=[f"{name}-{i}" for i in range(accepted.count)])  # fmt: skip
        await self.bus.publish(new_event(answer, source="planner", cause=env))


@pytest.fixture
async def planner(bus: Bus) -> AsyncIterator[FakePlanner]:
    p = FakePlanner(bus)
    await p.start()
    yield p
    await p.sub.unsubscribe()


@pytest.fixture
async def client(settings: Settings, bus: Bus) -> AsyncIterator[FlotillaClient]:
    c = FlotillaClient(settings.nats_url, "http://127.0.0.1:1")
    yield c
    await c.close()


# ----------------------------------------------------------------------------- apply / delete
async def test_apply_accepted_round_trip(client: FlotillaClient, planner: FakePlanner, bus: Bus) -> None:
    doc = example_documents()[MODELSERVING]
    result = await client.apply(doc, wait_s=10)
    assert result.accepted and result.name == MODELSERVING and result.generation == 1 and not result.errors
    # What the planner received: the document as written, on the documented subject, with the answered id.
    (intent,) = planner.seen
    assert intent.id == result.event_id and intent.source == "cli"
    assert payload_as(intent, ClusterSetApplied).document == doc
    stored = await bus.js.get_last_msg(subjects.STREAM_CLUSTERSETS, subjects.clusterset_applied(MODELSERVING))
    assert Envelope.from_bytes(stored.data or b"").id == result.event_id
    # Applying the same document again: accepted with the same generation; a change bumps it.
    assert (await client.apply(doc, wait_s=10)).generation == 1
    changed = {**doc, "spec": {**doc["spec"], "kubernetesVersion": "1.31"}}
    assert (await client.apply(changed, wait_s=10)).generation == 2


async def test_apply_rejected_names_every_field(client: FlotillaClient, planner: FakePlanner) -> None:
    doc = example_documents()[MODELSERVING]
    bad = {**doc, "metadata": {**doc["metadata"], "location": {"env": "prod", "cloud": "aws", "region": "mars-1"}},
           "spec": {**doc["spec"], "count": -1}}  # fmt: skip
    result = await client.apply(bad, wait_s=10)
    assert not result.accepted and result.generation is None
    fields = {e.field for e in result.errors}
    assert "spec.count" in fields and any(f.startswith("metadata.location") for f in fields), result.errors


async def test_apply_matches_on_causation_id(client: FlotillaClient, bus: Bus) -> None:
    noisy = FakePlanner(bus, noise=True)
    await noisy.start()
    try:
        result = await client.apply(example_documents()["core-prod-aws-eu-west-1"], wait_s=10)
        assert result.accepted and result.name == "core-prod-aws-eu-west-1"
    finally:
        await noisy.sub.unsubscribe()


async def test_apply_times_out_with_a_clear_message(client: FlotillaClient, bus: Bus) -> None:
    with pytest.raises(FlotillaTimeout, match="no answer from the planner.*is the planner running"):
        await client.apply(example_documents()[MODELSERVING], wait_s=0.3)
    # The intent is stored all the same: the planner handles it whenever it runs.
    info = await bus.js.stream_info(subjects.STREAM_CLUSTERSETS)
    assert info.state.messages == 1


async def test_delete_retires_or_times_out_for_unknown(client: FlotillaClient, planner: FakePlanner) -> None:
    await client.apply(example_documents()[MODELSERVING], wait_s=10)
    result = await client.delete(MODELSERVING, wait_s=10)
    assert result.retired and len(result.clusters) == 5 and not result.timed_out
    unknown = await client.delete("never-applied", wait_s=0.3)
    assert not unknown.retired and unknown.timed_out


async def test_missing_streams_and_missing_server_are_clear_errors(nats_proc: ServerProcess) -> None:
    async with FlotillaClient(f"nats://127.0.0.1:{nats_proc.port}", "http://127.0.0.1:1") as c:
        with pytest.raises(FlotillaError, match="stream CLUSTERSETS does not exist"):
            await c.apply(example_documents()[MODELSERVING], wait_s=1)
    async with FlotillaClient(f"nats://127.0.0.1:{free_port()}", "http://127.0.0.1:1") as c:
        with pytest.raises(FlotillaError, match="cannot connect to NATS"):
            await c.apply(example_documents()[MODELSERVING], wait_s=1)


# ----------------------------------------------------------------------------- rollout intents
async def stored(bus: Bus, subject: str) -> tuple[Envelope, dict[str, str]]:
    """The last message on a CLUSTERSETS subject: its envelope and headers."""
    msg = await bus.js.get_last_msg(subjects.STREAM_CLUSTERSETS, subject)
    return Envelope.from_bytes(msg.data or b""), dict(msg.headers or {})


FLEET_FILE: dict[str, Any] = {
    "rolloutId": "k8s-131", "clusterType": "ModelServing", "patch": {"kubernetesVersion": "1.31"},
    "stages": [{"name": "canary", "selector": {"names": [MODELSERVING]}, "soakSeconds": 600},
               {"name": "rest", "approval": True}],
    "maxInFlight": 3, "failureBudget": 1,
}  # fmt: skip


async def test_rollout_and_fleet_intents_land_on_clustersets(client: FlotillaClient, bus: Bus) -> None:
    control = await client.rollout_control(MODELSERVING, "rollback", rollout_id="r1", reason="bad canary")
    assert control.subject == subjects.clusterset_rollout(MODELSERVING) == f"clusterset.rollout.{MODELSERVING}"
    assert not control.waited and control.answer is None
    env, headers = await stored(bus, control.subject)
    assert env.id == control.event_id == headers["Nats-Msg-Id"] and env.source == "cli"
    assert payload_as(env, RolloutControlRequested) == RolloutControlRequested(
        clusterset=MODELSERVING, action="rollback", rollout_id="r1", reason="bad canary")

    start = await client.start_fleet_rollout(FLEET_FILE)
    assert start.subject == subjects.fleet_rollout_intent("k8s-131") == "clusterset.fleetrollout.k8s-131"
    env, headers = await stored(bus, start.subject)
    request = payload_as(env, FleetRolloutRequested)
    assert headers["Nats-Msg-Id"] == start.event_id and request.rollout_id == "k8s-131"
    assert request.stages[0].soak_seconds == 600 and request.max_in_flight == 3

    approve = await client.approve_fleet_rollout("k8s-131", "rest", approver="alice")
    env, _ = await stored(bus, approve.subject)
    assert env.id == approve.event_id and payload_as(env, FleetRolloutApproved).approver == "alice"
    pause = await client.fleet_rollout_control("k8s-131", "pause", reason="incident")
    env, _ = await stored(bus, pause.subject)
    assert env.id == pause.event_id and payload_as(env, FleetRolloutControlRequested).action == "pause"

    info = await bus.js.stream_info(subjects.STREAM_CLUSTERSETS)
    assert info.state.messages == 4
    # Bad input is refused before anything is published, naming every field.
    with pytest.raises(InvalidRequest) as bad:
        await client.start_fleet_rollout({**FLEET_FILE, "maxInFlight": 0, "patch": {"count": 3}})
    assert {e.field for e in bad.value.errors} == {"maxInFlight", "patch.count"}
    with pytest.raises(InvalidRequest, match="action"):
        await client.rollout_control(MODELSERVING, "explode")
    assert (await bus.js.stream_info(subjects.STREAM_CLUSTERSETS)).state.messages == 4


class FakeRotation:
    """Answers rollout and fleet intents as rotation / the fleet orchestrator would: caused by the intent."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def start(self) -> None:
        self.sub = await self.bus.js.subscribe(subjects.CLUSTERSETS_ALL, stream=subjects.STREAM_CLUSTERSETS,
                                               ordered_consumer=True, cb=self.on_msg)  # fmt: skip

    async def on_msg(self, msg: Any) -> None:
        env = Envelope.from_bytes(msg.data)
        answer: Any = None
        if env.type == RolloutControlRequested.type_name():
            control = payload_as(env, RolloutControlRequested)
            if control.rollout_id in (None, "r1") and control.action == "pause":
                answer = RolloutPaused(location=Location(env="prod", cloud="aws", region="us-east-1"),
                                       clusterset=control.clusterset, rollout_id="r1", reason=control.reason)
        elif env.type == FleetRolloutRequested.type_name():
            request = payload_as(env, FleetRolloutRequested)
            if request.cluster_type == "Unknown":
                answer = FleetRolloutRejected(rollout_id=request.rollout_id,
                                              errors=[FieldError(field="clusterType", message="no such sets")])
            else:
                answer = FleetRolloutStarted(rollout_id=request.rollout_id, cluster_type=request.cluster_type,
                                             patch=request.patch, stages=[], max_in_flight=request.max_in_flight,
                                             failure_budget=request.failure_budget)  # fmt: skip
        if answer is not None:
            await self.bus.publish(new_event(answer, source="rotation", cause=env))


async def test_waiting_for_the_answer_to_an_intent(client: FlotillaClient, bus: Bus) -> None:
    rotation = FakeRotation(bus)
    await rotation.start()
    try:
        paused = await client.rollout_control(MODELSERVING, "pause", reason="freeze", wait_s=10)
        assert paused.waited and paused.answered and paused.answer is not None
        assert paused.answer.type == "RolloutPaused" and paused.answer.causation_id == paused.event_id
        assert payload_as(paused.answer, RolloutPaused).reason == "freeze"
        # Nothing to act on (another rollout is running): no answer, and the request is stored all the same.
        ignored = await client.rollout_control(MODELSERVING, "pause", rollout_id="r0", wait_s=0.3)
        assert ignored.waited and not ignored.answered
        started = await client.start_fleet_rollout(FLEET_FILE, wait_s=10)
        assert started.answer is not None and started.answer.type == "FleetRolloutStarted"
        rejected = await client.start_fleet_rollout({**FLEET_FILE, "clusterType": "Unknown"}, wait_s=10)
        assert rejected.answer is not None
        assert payload_as(rejected.answer, FleetRolloutRejected).errors[0].field == "clusterType"
    finally:
        await rotation.sub.unsubscribe()


# ----------------------------------------------------------------------------- control-plane intents
CORE = "core-prod-aws-eu-west-1"


async def test_control_plane_intents_land_on_clustersets_and_bad_ones_are_refused(
    client: FlotillaClient, bus: Bus
) -> None:
    migrate = await client.request_control_plane_change(CORE, "migrate", cluster_ids=[f"{CORE}-7f3a"],
                                                        concurrency=2, failure_budget=1)  # fmt: skip
    assert migrate.subject == subjects.clusterset_controlplane(CORE) == f"clusterset.controlplane.{CORE}"
    assert not migrate.waited and migrate.answer is None
    env, headers = await stored(bus, migrate.subject)
    assert env.id == migrate.event_id == headers["Nats-Msg-Id"] and env.source == "cli"
    assert payload_as(env, ControlPlaneChangeRequested) == ControlPlaneChangeRequested(
        clusterset=CORE, operation="migrate", cluster_ids=[f"{CORE}-7f3a"], concurrency=2, failure_budget=1)
    upgrade = await client.request_control_plane_change(CORE, "upgrade", to_version="1.31")
    env, headers = await stored(bus, upgrade.subject)
    assert headers["Nats-Msg-Id"] == upgrade.event_id != migrate.event_id
    assert payload_as(env, ControlPlaneChangeRequested).to_version == "1.31"
    assert (await bus.js.stream_info(subjects.STREAM_CLUSTERSETS)).state.messages == 2

    with pytest.raises(InvalidRequest) as bad:
        await client.request_control_plane_change("Core", "upgrade", cluster_ids=["a", "a"], to_version="1.3.1",
                                                  concurrency=0, failure_budget=-2)  # fmt: skip
    assert {e.field for e in bad.value.errors} == {"clusterset", "toVersion", "concurrency", "failureBudget",
                                                   "clusterIds[1]"}  # fmt: skip
    with pytest.raises(InvalidRequest, match="toVersion"):
        await client.request_control_plane_change(CORE, "migrate", to_version="1.31")
    with pytest.raises(InvalidRequest, match="operation"):
        await client.request_control_plane_change(CORE, "rollback")
    assert (await bus.js.stream_info(subjects.STREAM_CLUSTERSETS)).state.messages == 2


async def test_waiting_for_the_pipeline_a_control_plane_request_starts(client: FlotillaClient, bus: Bus) -> None:
    """The planner answers with the pipeline it starts, or a refusal, caused by the request (played here)."""
    location = Location(env="prod", cloud="aws", region="eu-west-1")

    async def on_msg(msg: Any) -> None:
        env = Envelope.from_bytes(msg.data)
        request = payload_as(env, ControlPlaneChangeRequested)
        if "nope" in request.cluster_ids:
            await bus.publish(new_event(ClusterSetRejected(clusterset=request.clusterset, errors=[
                FieldError(field="clusterIds", message="not live clusters of the set: nope")]), source="planner",
                cause=env))  # fmt: skip
        elif request.cluster_ids:  # (a stand-in for a planner that never answers)
            await bus.publish(new_event(ControlPlanePipelineRequested(
                location=location, clusterset=request.clusterset, pipeline_id=f"pl-{env.id[:8]}",
                operation=request.operation, concurrency=request.concurrency,
                clusters=[PipelineCluster(cluster_id=c, clusterset=request.clusterset, location=location)
                          for c in request.cluster_ids]), source="planner", cause=env))  # fmt: skip

    sub = await bus.js.subscribe(subjects.CONTROLPLANE_INTENTS, stream=subjects.STREAM_CLUSTERSETS,
                                 ordered_consumer=True, cb=on_msg)  # fmt: skip
    try:
        started = await client.request_control_plane_change(CORE, "migrate", cluster_ids=["c1", "c2"],
                                                            concurrency=2, wait_s=10)  # fmt: skip
        assert started.answer is not None and started.answer.causation_id == started.event_id
        pipeline = payload_as(started.answer, ControlPlanePipelineRequested)
        assert [c.cluster_id for c in pipeline.clusters] == ["c1", "c2"] and pipeline.concurrency == 2
        refused = await client.request_control_plane_change(CORE, "upgrade", cluster_ids=["nope"], to_version="1.31",
                                                            wait_s=10)  # fmt: skip
        assert refused.answer is not None and refused.answer.type == "ClusterSetRejected"
        assert payload_as(refused.answer, ClusterSetRejected).errors[0].field == "clusterIds"
        unanswered = await client.request_control_plane_change(CORE, "migrate", wait_s=0.3)
        assert unanswered.waited and not unanswered.answered
    finally:
        await sub.unsubscribe()


# ----------------------------------------------------------------------------- watch
def ready_event(n: int, cloud: Literal["aws", "azure", "gcp"], cluster_type: str) -> Envelope:
    region = {"aws": "us-east-1", "gcp": "europe-west4", "azure": "westeurope"}[cloud]
    payload = ClusterReady(
        location=Location(env="prod", cloud=cloud, region=region), cluster_id=f"c{n}-{cloud}", clusterset="cs",
        cluster_type=cluster_type, config_hash="h", endpoint=f"https://c{n}", infra_services=[],
    )  # fmt: skip
    return new_event(payload, source="infra_installer")


def fleet_consumers_are(bus: Bus, n: int) -> Callable[[], Awaitable[bool]]:
    """A `wait_until` predicate: FLEET has exactly `n` consumers (the watch's ordered consumer is one)."""

    async def check() -> bool:
        return len(await bus.js.consumers_info(subjects.STREAM_FLEET)) == n

    return check


async def collect(agen: AsyncGenerator[ClusterReady, None], n: int, into: list[ClusterReady]) -> None:
    async with contextlib.aclosing(agen):
        async for item in agen:
            into.append(item)
            if len(into) >= n:
                return


async def test_watch_ready_filters_by_cloud_and_type(client: FlotillaClient, bus: Bus) -> None:
    await bus.publish(ready_event(0, "aws", "ModelServing"))  # before the watch: not delivered (only new ones)
    got: list[ClusterReady] = []
    task = asyncio.create_task(collect(client.watch_ready(cloud="aws", cluster_type="ModelServing"), 2, got))
    await wait_until(fleet_consumers_are(bus, 1), within=10)
    published: list[tuple[int, Literal["aws", "azure", "gcp"], str]] = [
        (1, "aws", "Core"), (2, "gcp", "ModelServing"), (3, "aws", "ModelServing"), (4, "azure", "ModelServing"),
        (5, "aws", "ModelServing")]  # fmt: skip
    for n, cloud, cluster_type in published:
        await bus.publish(ready_event(n, cloud, cluster_type))
    await asyncio.wait_for(task, 10)
    assert [r.cluster_id for r in got] == ["c3-aws", "c5-aws"]
    # The ordered consumer is ephemeral: it goes away with the watch.
    await wait_until(fleet_consumers_are(bus, 0), within=3)


async def test_watch_ready_since_start_replays_and_skips_repeated_ids(client: FlotillaClient, bus: Bus) -> None:
    first, second = ready_event(1, "gcp", "Serverless"), ready_event(2, "gcp", "Serverless")
    await bus.publish(first)
    # The same event id stored again (re-published after the dedup window): shown once.
    await bus.publish_raw(subjects.fleet("ClusterReady", "gcp", "europe-west4", "c1-gcp"),
                          first.to_bytes(), {"Nats-Msg-Id": "other"}, subjects.STREAM_FLEET)  # fmt: skip
    await bus.publish(second)
    got: list[ClusterReady] = []
    await asyncio.wait_for(collect(client.watch_ready(cloud="gcp", region="europe-west4", since_start=True), 2, got),
                           10)  # fmt: skip
    assert [r.cluster_id for r in got] == ["c1-gcp", "c2-gcp"]


# ----------------------------------------------------------------------------- status API reads
def fake_status_api(n_clusters: int) -> FastAPI:
    api = FastAPI()
    clusters = [{"id": f"c{i:03d}", "clusterset": "a" if i % 2 else "b", "state": "READY" if i % 3 else "FAILED",
                 "location": {"env": "prod", "cloud": "aws", "region": "us-east-1"}, "clusterType": "T",
                 "configHash": "h", "endpoint": None} for i in range(n_clusters)]  # fmt: skip
    seen_params: list[dict[str, str]] = []
    api.state.seen = seen_params

    @api.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/clusters")
    async def list_clusters(limit: int = 100, cursor: str | None = None, clusterset: str | None = None,
                            state: str | None = None, clusterType: str | None = None) -> dict[str, Any]:  # noqa: N803
        seen_params.append({k: v for k, v in dict(clusterset=clusterset, state=state, clusterType=clusterType,
                                                 cursor=cursor).items() if v})  # fmt: skip
        rows = [c for c in clusters if (not clusterset or c["clusterset"] == clusterset)
                and (not state or c["state"] == state)]  # fmt: skip
        start = int(cursor or 0)
        nxt = start + limit
        return {"items": rows[start:nxt], "next": str(nxt) if nxt < len(rows) else None}

    @api.get("/v1/clusters/{cluster_id}")
    async def get_cluster(cluster_id: str) -> dict[str, Any]:
        for c in clusters:
            if c["id"] == cluster_id:
                return c
        raise HTTPException(404, "no such cluster")

    @api.get("/v1/clustersets")
    async def list_sets() -> dict[str, Any]:
        raise HTTPException(503, "projector catching up")

    return api


@contextlib.asynccontextmanager
async def serve(api: FastAPI) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for this)
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_reads_follow_pagination_and_map_errors() -> None:
    api = fake_status_api(25)
    async with serve(api) as url, FlotillaClient("nats://127.0.0.1:1", url, page_size=4) as c:
        assert await c.ready()
        everything = await c.clusters()
        assert [x["id"] for x in everything] == [f"c{i:03d}" for i in range(25)]
        failed_b = await c.clusters(clusterset="b", state="FAILED", cluster_type="T")
        assert {x["id"] for x in failed_b} == {f"c{i:03d}" for i in range(0, 25, 6)}
        assert api.state.seen[-1]["clusterType"] == "T"
        assert len(await c.clusters(limit=6)) == 6
        assert (await c.cluster("c001") or {})["id"] == "c001"
        assert await c.cluster("nope") is None
        with pytest.raises(ApiError, match="503.*projector catching up"):
            await c.clustersets()
        with pytest.raises(TypeError, match="unknown cluster filter"):
            await c.clusters(colour="red")
    async with FlotillaClient("nats://127.0.0.1:1", f"http://127.0.0.1:{free_port()}") as c:
        assert not await c.ready()
        with pytest.raises(FlotillaError, match="not reachable"):
            await c.clusters()


# ----------------------------------------------------------------------------- the stack's failure path
def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if text in cmd:
                    found.append(f"{pid}: {cmd}")
    return found


def test_stack_reports_a_dead_service_and_leaves_nothing_running(tmp_path: Path) -> None:
    err = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
    out = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
    run_dir = tmp_path / "run"
    options = StackOptions(once=True, examples=EXAMPLES_DIR, api_port=free_port(), run_dir=run_dir,
                           services=("no_such_service",), startup_timeout_s=20)  # fmt: skip
    code = run(options, out=out, err=err)
    text = err.export_text()
    assert code != 0
    assert "no_such_service exited with code 1" in text
    assert "No module named services.no_such_service" in text  # its last log lines
    assert (run_dir / "logs" / "no_such_service.log").exists()
    assert _processes_mentioning(str(run_dir)) == []  # nats-server and redis-server stopped
    assert "READY" not in out.export_text()
