"""The `flotilla` CLI at unit level: argument validation, file loading, output formatting.

The client is replaced by a stub (no NATS, no HTTP); the real client is covered in
tests/integration/test_client.py.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from shared import cli
from shared.client import (
    ApplyResult,
    DeleteResult,
    DocumentError,
    FlotillaError,
    FlotillaTimeout,
    FlotillaUnavailable,
    InvalidRequest,
    RequestResult,
    _intent,
    api_url_from_settings,
    control_plane_change,
    load_clustersets,
    load_fleet_rollout,
    parse_fleet_rollout,
)
from shared.config import Settings
from shared.events import FieldError, Location, new_event
from shared.events.models import (
    ClusterReady,
    ClusterSetRejected,
    ControlPlaneChangeRequested,
    ControlPlanePipelineRequested,
    FleetRolloutApproved,
    FleetRolloutControlRequested,
    FleetRolloutRejected,
    FleetRolloutRequested,
    PipelineCluster,
    RolloutControlRequested,
    RolloutPaused,
)
from shared.stack import Progress, SetProgress, expected_counts, progress_from, render
from tests.conftest import EXAMPLES_DIR, example_documents

runner = CliRunner()


class StubClient:
    """Records what the CLI asked for and answers from canned data."""

    instances: list[StubClient] = []

    def __init__(self, nats_url: str, api_url: str) -> None:
        self.nats_url, self.api_url = nats_url, api_url
        self.applied: list[dict[str, Any]] = []
        self.filters: dict[str, Any] = {}
        self.watch_args: tuple[Any, ...] = ()
        self.closed = False
        StubClient.instances.append(self)

    # behaviour knobs, set per test on the class
    reject: dict[str, list[FieldError]] = {}
    timeout_names: set[str] = set()
    known: set[str] = set()
    cluster_items: list[dict[str, Any]] = []
    clusterset_items: list[dict[str, Any]] = []
    ready_events: list[ClusterReady] = []
    fail_with: Exception | None = None

    async def apply(self, document: dict[str, Any], wait_s: float = 30) -> ApplyResult:
        if self.fail_with:
            raise self.fail_with
        name = document["metadata"]["name"]
        self.applied.append(document)
        if name in self.timeout_names:
            raise FlotillaTimeout(f"no answer from the planner for ClusterSet {name} within {wait_s:g}s")
        if name in self.reject:
            return ApplyResult(accepted=False, name=name, errors=self.reject[name])
        return ApplyResult(accepted=True, name=name, generation=1, config_hash="abcd1234")

    async def delete(self, name: str, wait_s: float = 15) -> DeleteResult:
        if name in self.known:
            return DeleteResult(name=name, retired=True, clusters=["c1", "c2"], generation=2)
        return DeleteResult(name=name, retired=False, timed_out=True)

    async def clustersets(self) -> list[dict[str, Any]]:
        if self.fail_with:
            raise self.fail_with
        return self.clusterset_items

    async def clusters(self, limit: int | None = None, **filters: Any) -> list[dict[str, Any]]:
        self.filters = {k: v for k, v in filters.items() if v is not None}
        return self.cluster_items[:limit] if limit else self.cluster_items

    async def watch_ready_events(self, cloud=None, region=None, cluster_type=None, since_start=False
                                 ) -> AsyncIterator[tuple[Any, ClusterReady]]:  # fmt: skip
        self.watch_args = (cloud, region, cluster_type, since_start)
        for ready in self.ready_events:
            yield new_event(ready, source="test"), ready

    # rollouts: every request is validated as the real client does, and recorded
    requests: list[Any] = []
    answer: Any = None  # the answer of a waited-for request (None: no answer in time)
    rollout_items: list[dict[str, Any]] = []
    rollout_filters: dict[str, Any] = {}

    def _result(self, payload: Any, wait_s: float) -> RequestResult:
        StubClient.requests.append(payload)
        return RequestResult(event_id="ev-1", subject=payload.subject(), waited=wait_s > 0,
                             answer=self.answer if wait_s > 0 else None)  # fmt: skip

    async def rollout_control(self, clusterset: str, action: str, *, rollout_id: str | None = None, reason: str = "",
                              wait_s: float = 0) -> RequestResult:  # fmt: skip
        payload = _intent(RolloutControlRequested, f"rollout {action} request", clusterset=clusterset, action=action,
                          rollout_id=rollout_id, reason=reason)  # fmt: skip
        return self._result(payload, wait_s)

    async def start_fleet_rollout(self, request: FleetRolloutRequested, wait_s: float = 0) -> RequestResult:
        return self._result(request, wait_s)

    async def approve_fleet_rollout(self, rollout_id: str, stage: str, approver: str = "",
                                    wait_s: float = 0) -> RequestResult:  # fmt: skip
        return self._result(_intent(FleetRolloutApproved, "approval", rollout_id=rollout_id, stage=stage,
                                    approver=approver), wait_s)  # fmt: skip

    async def fleet_rollout_control(self, rollout_id: str, action: str, reason: str = "",
                                    wait_s: float = 0) -> RequestResult:  # fmt: skip
        return self._result(_intent(FleetRolloutControlRequested, "request", rollout_id=rollout_id, action=action,
                                    reason=reason), wait_s)  # fmt: skip

    async def rollouts(self, limit: int | None = None, **filters: Any) -> list[dict[str, Any]]:
        StubClient.rollout_filters = {k: v for k, v in filters.items() if v is not None}
        return self.rollout_items[:limit] if limit else self.rollout_items

    async def rollout(self, rollout_id: str, kind: str | None = None) -> dict[str, Any] | None:
        return next((r for r in self.rollout_items if r["id"] == rollout_id), None)

    # control planes: validated as the real client does, and recorded with the other requests
    migration_items: list[dict[str, Any]] = []
    migration_filters: dict[str, Any] = {}

    async def request_control_plane_change(self, clusterset: str, operation: str, *, cluster_ids: Any = (),
                                           to_version: str | None = None, concurrency: int = 1,
                                           failure_budget: int = 0, wait_s: float = 0) -> RequestResult:  # fmt: skip
        return self._result(control_plane_change(clusterset, operation, cluster_ids=cluster_ids,
                                                 to_version=to_version, concurrency=concurrency,
                                                 failure_budget=failure_budget), wait_s)  # fmt: skip

    async def migrations(self, limit: int | None = None, **filters: Any) -> list[dict[str, Any]]:
        StubClient.migration_filters = {k: v for k, v in filters.items() if v is not None}
        return self.migration_items[:limit] if limit else self.migration_items

    async def migration(self, migration_id: str, kind: str | None = None) -> dict[str, Any] | None:
        return next((r for r in self.migration_items if r["id"] == migration_id), None)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def stub(monkeypatch: pytest.MonkeyPatch) -> type[StubClient]:
    StubClient.instances = []
    knobs: dict[str, Any] = dict(reject={}, timeout_names=set(), known=set(), cluster_items=[], clusterset_items=[],
                                 ready_events=[], fail_with=None, requests=[], answer=None, rollout_items=[],
                                 rollout_filters={}, migration_items=[], migration_filters={})  # fmt: skip
    for attr, value in knobs.items():
        monkeypatch.setattr(StubClient, attr, value)
    monkeypatch.setattr(cli, "make_client", StubClient)
    # Wide consoles so tables are not truncated; they still write to the runner's captured streams.
    monkeypatch.setattr(cli, "out", Console(width=250))
    monkeypatch.setattr(cli, "err", Console(width=250, stderr=True))
    monkeypatch.delenv("FLOTILLA_API_URL", raising=False)
    return StubClient


def invoke(*args: str) -> Any:
    return runner.invoke(cli.app, ["--nats-url", "nats://n:1", "--api-url", "http://a:2", *args])


def write(tmp_path: Path, name: str, docs: list[Any]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


MODELSERVING = "modelserving-prod-aws-us-east-1"


# ----------------------------------------------------------------------------- loader
def test_loader_reads_directory_and_skips_other_kinds() -> None:
    loaded = load_clustersets([EXAMPLES_DIR])
    assert sorted(str(d.name) for d in loaded.documents) == sorted(example_documents())
    assert [Path(s).name for s, _ in loaded.skipped] == ["clusterset-status.yaml"]
    assert expected_counts(loaded.documents) == {name: d["spec"]["count"] for name, d in example_documents().items()}
    assert sum(expected_counts(loaded.documents).values()) == 12


def test_loader_multi_document_and_dates(tmp_path: Path) -> None:
    a, b = example_documents()[MODELSERVING], example_documents()["core-prod-aws-eu-west-1"]
    b = {**b, "metadata": {**b["metadata"], "labels": {"since": "x"}}}
    path = tmp_path / "two.yaml"
    # An unquoted date must reach the planner as the string the user wrote, not fail JSON encoding.
    path.write_text(yaml.safe_dump(a) + "---\n---\n" + yaml.safe_dump(b) + "extra: 2026-11-21\n")
    loaded = load_clustersets([path])
    assert [d.source for d in loaded.documents] == [f"{path}#0", f"{path}#1"]
    assert loaded.documents[1].document["extra"] == "2026-11-21"


@pytest.mark.parametrize(
    ("content", "message"),
    [("a: [1, 2\n", "not valid YAML"), ("- just\n- a list\n", "must be a mapping")],
)
def test_loader_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(DocumentError, match=message):
        load_clustersets([path])
    with pytest.raises(DocumentError, match="no such file"):
        load_clustersets([tmp_path / "missing.yaml"])


def test_api_url_from_settings() -> None:
    settings = Settings(api_host="0.0.0.0", api_port=9999)
    assert api_url_from_settings(settings, {}) == "http://127.0.0.1:9999"
    assert api_url_from_settings(settings, {"FLOTILLA_API_URL": "http://x:1/"}) == "http://x:1"


# ----------------------------------------------------------------------------- apply / delete
def test_apply_directory_accepts_every_clusterset(stub: type[StubClient]) -> None:
    result = invoke("apply", "-f", str(EXAMPLES_DIR))
    assert result.exit_code == 0, result.output
    client = stub.instances[0]
    assert (client.nats_url, client.api_url, client.closed) == ("nats://n:1", "http://a:2", True)
    assert sorted(d["metadata"]["name"] for d in client.applied) == sorted(example_documents())
    assert f"clusterset/{MODELSERVING} accepted (generation 1, config abcd1234)" in result.stdout
    assert "skipped" in result.stderr and "clusterset-status.yaml" in result.stderr


def test_apply_rejected_prints_every_field_and_exits_1(stub: type[StubClient], tmp_path: Path) -> None:
    stub.reject = {MODELSERVING: [
        FieldError(field="spec.count", message="must be >= 0"),
        FieldError(field="metadata.location.region", message="not an aws region"),
    ]}  # fmt: skip
    docs = example_documents()
    path = write(tmp_path, "a.yaml", [docs[MODELSERVING], docs["core-prod-aws-eu-west-1"]])
    result = invoke("apply", "-f", str(path))
    assert result.exit_code == 1
    assert f"clusterset/{MODELSERVING} rejected" in result.stderr
    assert "spec.count: must be >= 0" in result.stderr
    assert "metadata.location.region: not an aws region" in result.stderr
    # The other document is still applied (kubectl-like).
    assert "clusterset/core-prod-aws-eu-west-1 accepted" in result.stdout


def test_apply_repeatable_and_timeout(stub: type[StubClient], tmp_path: Path) -> None:
    stub.timeout_names = {MODELSERVING}
    a = write(tmp_path, "a.yaml", [example_documents()[MODELSERVING]])
    b = write(tmp_path, "b.yaml", [example_documents()["core-prod-aws-eu-west-1"]])
    result = invoke("apply", "-f", str(a), "-f", str(b), "--wait", "2")
    assert result.exit_code == 1
    assert "no answer from the planner" in result.stderr and "within 2s" in result.stderr
    assert len(stub.instances[0].applied) == 2


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["apply"], 2, "Missing option"),
        (["apply", "-f", "/nonexistent.yaml"], 2, "no such file"),
        (["apply", "-f", "{status}"], 2, "no ClusterSet documents"),
        (["apply", "-f", "{examples}", "--wait", "0"], 2, "--wait"),
    ],
)
def test_apply_argument_errors(args: list[str], code: int, text: str, stub: type[StubClient]) -> None:
    args = [a.format(status=EXAMPLES_DIR / "clusterset-status.yaml", examples=EXAMPLES_DIR) for a in args]
    result = invoke(*args)
    assert result.exit_code == code
    assert text in result.output
    assert not any(c.applied for c in stub.instances)


def test_connection_error_is_one_line_not_a_traceback(stub: type[StubClient]) -> None:
    stub.fail_with = FlotillaUnavailable("cannot connect to NATS at nats://n:1: refused")
    result = invoke("apply", "-f", str(EXAMPLES_DIR))
    assert result.exit_code == 1
    assert "error: cannot connect to NATS" in result.stderr
    assert "Traceback" not in result.output


def test_delete(stub: type[StubClient]) -> None:
    stub.known = {"known-set"}
    ok = invoke("delete", "known-set")
    assert ok.exit_code == 0 and "clusterset/known-set deleted (2 cluster(s) retiring)" in ok.stdout
    unknown = invoke("delete", "nope", "--wait", "1")
    assert unknown.exit_code == 1 and "no answer within 1s" in unknown.stderr


# ----------------------------------------------------------------------------- get
CLUSTER = {
    "id": "modelserving-prod-aws-us-east-1-7f3a", "clusterset": MODELSERVING,
    "location": {"env": "prod", "cloud": "aws", "region": "us-east-1"}, "clusterType": "ModelServing",
    "state": "READY", "configHash": "9c1e0d2a", "endpoint": "https://7f3a.example",
}  # fmt: skip


def test_get_clusters_filters_and_table(stub: type[StubClient]) -> None:
    stub.cluster_items = [CLUSTER, {**CLUSTER, "id": "x-2", "state": "FAILED", "endpoint": None}]
    result = invoke("get", "clusters", "--state", "ready", "--cloud", "AWS", "--type", "ModelServing",
                    "--region", "us-east-1", "--clusterset", MODELSERVING, "--env", "prod")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stub.instances[0].filters == dict(state="READY", cloud="aws", cluster_type="ModelServing",
                                             region="us-east-1", clusterset=MODELSERVING, env="prod")  # fmt: skip
    header = result.stdout.splitlines()[0].split()
    assert header == ["ID", "CLUSTERSET", "ENV", "CLOUD", "REGION", "TYPE", "STATE", "CONFIG", "ENDPOINT"]
    row = result.stdout.splitlines()[1].split()
    assert row == [CLUSTER["id"], MODELSERVING, "prod", "aws", "us-east-1", "ModelServing", "READY", "9c1e0d2a",
                   "https://7f3a.example"]  # fmt: skip


def test_get_clusters_json(stub: type[StubClient]) -> None:
    stub.cluster_items = [CLUSTER]
    result = invoke("get", "clusters", "-o", "json", "--limit", "5")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [CLUSTER]


@pytest.mark.parametrize(
    "args", [["--state", "RUNNING"], ["--cloud", "ibm"], ["-o", "yaml"], ["--limit", "0"]]
)
def test_get_clusters_rejects_bad_arguments(args: list[str], stub: type[StubClient]) -> None:
    result = invoke("get", "clusters", *args)
    assert result.exit_code == 2
    assert not stub.instances or not stub.instances[0].filters


def test_get_clustersets_table(stub: type[StubClient]) -> None:
    stub.clusterset_items = [{
        "name": MODELSERVING, "location": {"env": "prod", "cloud": "aws", "region": "us-east-1"},
        "clusterType": "ModelServing", "generation": 3, "spec": {"count": 5},
        "status": {"readyClusters": 3, "counts": {"READY": 3, "PROVISIONING": 2}, "clusters": []},
    }, {  # the status_projector's shape: count beside the spec, desiredClusters 0 once deleted
        "name": "gone", "location": {"env": "dev", "cloud": "gcp", "region": "europe-west4"}, "clusterType": "T",
        "generation": 2, "count": 3, "accepted": True, "deleted": True, "spec": {},
        "status": {"desiredClusters": 0, "readyClusters": 0, "counts": {"DELETED": 3, "READY": 0}},
    }, {"name": "bad", "accepted": False, "deleted": False, "generation": None, "count": None, "location": None,
        "status": {"readyClusters": 0, "counts": {}}}]  # fmt: skip
    result = invoke("get", "clustersets")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert rows[0] == [MODELSERVING, "prod", "aws", "us-east-1", "ModelServing", "3", "3/5",
                       "PROVISIONING=2", "READY=3"]  # fmt: skip
    assert rows[1] == ["gone", "dev", "gcp", "europe-west4", "T", "2", "0/0", "DELETED=3", "deleted"]
    assert rows[2] == ["bad", "0/?", "rejected"]
    assert json.loads(invoke("get", "clustersets", "-o", "json").stdout)[0]["name"] == MODELSERVING


def test_get_api_error_exits_1(stub: type[StubClient]) -> None:
    stub.fail_with = FlotillaError("status API at http://a:2 not reachable")
    result = invoke("get", "clustersets")
    assert result.exit_code == 1 and "not reachable" in result.stderr


# ----------------------------------------------------------------------------- watch
def _ready(n: int, cloud: Literal["aws", "azure", "gcp"] = "aws") -> ClusterReady:
    return ClusterReady(
        location=Location(env="prod", cloud=cloud, region="us-east-1" if cloud == "aws" else "westeurope"),
        cluster_id=f"c-{n}", clusterset="cs", cluster_type="ModelServing", config_hash="h",
        endpoint=f"https://c-{n}.example", infra_services=[],
    )  # fmt: skip


def test_watch_prints_ready_events_and_stops_after_count(stub: type[StubClient]) -> None:
    stub.ready_events = [_ready(1), _ready(2), _ready(3)]
    result = invoke("watch", "--cloud", "aws", "--region", "us-east-1", "--type", "ModelServing", "--count", "2")
    assert result.exit_code == 0, result.output
    assert stub.instances[0].watch_args == ("aws", "us-east-1", "ModelServing", False)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "READY c-1 cs prod/aws/us-east-1 ModelServing https://c-1.example" in lines[0]


def test_watch_json_lines_since_start(stub: type[StubClient]) -> None:
    stub.ready_events = [_ready(1)]
    result = invoke("watch", "--since-start", "-o", "json")
    assert result.exit_code == 0
    assert stub.instances[0].watch_args[3] is True
    event = json.loads(result.stdout.strip())
    assert event["cluster_id"] == "c-1" and event["endpoint"] == "https://c-1.example" and "time" in event


def test_watch_rejects_unknown_cloud() -> None:
    assert invoke("watch", "--cloud", "oracle").exit_code == 2


def test_up_rejects_missing_examples_dir(tmp_path: Path) -> None:
    result = invoke("up", "--once", "--examples", str(tmp_path / "nope"))
    assert result.exit_code == 2 and "does not exist" in re.sub(r"[│\s]+", " ", result.output)


# ----------------------------------------------------------------------------- stack progress (pure)
def test_progress_from_status_items() -> None:
    expected = {"a": 2, "b": 3}
    items: list[dict[str, Any]] = [
        {"name": "a", "generation": 1, "location": {"env": "prod", "cloud": "aws", "region": "us-east-1"},
         "clusterType": "T", "status": {"readyClusters": 2, "counts": {"READY": 2}}},
        # No readyClusters: counted from the cluster states.
        {"name": "b", "status": {"clusters": [{"state": "READY"}, {"status": {"state": "INSTALLING"}}]}},
        {"name": "not-applied-here", "status": {"readyClusters": 9}},
    ]  # fmt: skip
    progress = progress_from(items, expected)
    assert (progress.ready, progress.expected, progress.done) == (3, 5, False)
    assert [s.done for s in progress.sets] == [True, False]
    assert progress.totals() == {"READY": 3, "INSTALLING": 1}
    assert progress.line() == "progress: 3/5 ready  INSTALLING=1 READY=3"
    assert progress_from([], expected).ready == 0
    console = Console(width=200, record=True)
    console.print(render(progress, "http://127.0.0.1:8080", 1.0))
    text = console.export_text()
    assert "a  prod/aws/us-east-1  T  gen 1" in text and "2/2" in text and "1/3" in text


def test_progress_never_prints_a_ready_line_before_the_end() -> None:
    # `make run ONCE=1` checks the last line is `READY n/n`; progress lines must not look like it.
    done = Progress([SetProgress(name="a", expected=1, ready=1, counts={"READY": 1})])
    assert done.done and not done.line().startswith("READY")


def test_one_stack_per_run_dir(tmp_path: Path) -> None:
    from shared.stack import Stack, StackFailure, StackOptions

    first = Stack(StackOptions(run_dir=tmp_path))
    first._prepare_dirs()
    try:
        with pytest.raises(StackFailure, match=f"pid {os.getpid()}"):
            Stack(StackOptions(run_dir=tmp_path))._prepare_dirs()
    finally:
        first.stop()
    second = Stack(StackOptions(run_dir=tmp_path))
    second._prepare_dirs()  # free again once the first one stopped
    second.stop()


class ProgressingClient:
    """Status API stand-in for the stack's progress loop: one more READY cluster per poll."""

    def __init__(self) -> None:
        self.polls = 0

    async def clustersets(self) -> list[dict[str, Any]]:
        self.polls += 1
        ready = min(self.polls, 3)
        return [{"name": "a", "status": {"readyClusters": ready, "counts": {"READY": ready, "INSTALLING": 3 - ready}}}]


async def test_stack_once_ends_with_ready_line_or_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from shared import stack as stack_mod
    from shared.stack import Stack, StackFailure, StackOptions

    monkeypatch.setattr(stack_mod, "POLL_S", 0.01)
    quiet = Console(file=io.StringIO())
    done = Stack(StackOptions(once=True, run_dir=tmp_path), out=quiet, err=quiet)
    done._stopping = asyncio.Event()
    assert await done._watch(ProgressingClient(), {"a": 3}) == 0  # type: ignore[arg-type]
    assert done.final_line == "READY 3/3"

    slow = Stack(StackOptions(once=True, run_dir=tmp_path, timeout_s=0), out=quiet, err=quiet)
    slow._stopping = asyncio.Event()
    with pytest.raises(StackFailure, match=r"not everything READY after 0s: progress: 1/3 ready  INSTALLING=2 READY=1"):
        await slow._watch(ProgressingClient(), {"a": 3})  # type: ignore[arg-type]
    assert slow.final_line is None


# ----------------------------------------------------------------------------- rollouts
@pytest.mark.parametrize("action", ["pause", "resume", "abort", "rollback"])
def test_rollout_control_publishes_the_request(action: str, stub: type[StubClient]) -> None:
    result = invoke("rollout", action, MODELSERVING, "--rollout-id", "r1", "--reason", "change freeze")
    assert result.exit_code == 0, result.output
    (request,) = stub.requests
    assert isinstance(request, RolloutControlRequested)
    assert (request.clusterset, request.action, request.rollout_id, request.reason) == (
        MODELSERVING, action, "r1", "change freeze")
    assert f"{action} of the rollout of clusterset/{MODELSERVING} requested (event ev-1)" in result.stdout


def test_rollout_control_waits_for_the_answer(stub: type[StubClient]) -> None:
    paused = RolloutPaused(location=Location(env="prod", cloud="aws", region="us-east-1"), clusterset=MODELSERVING,
                           rollout_id="r1", reason="operator")  # fmt: skip
    stub.answer = new_event(paused, source="rotation")
    result = invoke("rollout", "pause", MODELSERVING, "--wait", "3")
    assert result.exit_code == 0, result.output
    assert "RolloutPaused (operator)" in result.stdout and stub.requests[0].rollout_id is None
    stub.answer = None
    result = invoke("rollout", "resume", MODELSERVING, "--wait", "0.5")
    assert result.exit_code == 1 and "no answer within 0.5s" in result.stderr and "ev-1 is stored" in result.stderr


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["rollout", "pause", "x" * 70], "clusterset"),
        (["rollout", "abort", "set", "--reason", "r" * 501], "reason"),
        (["fleet-rollout", "approve", "f1", "s" * 41], "stage"),
    ],
)
def test_rollout_requests_are_validated_before_publishing(args: list[str], text: str, stub: type[StubClient]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "nothing was published" in result.stderr and f"  {text}: " in result.stderr
    assert stub.requests == []


def test_rollout_arguments_are_checked(stub: type[StubClient]) -> None:
    assert invoke("rollout", "pause").exit_code == 2  # the set is required
    assert invoke("rollout", "pause", "s", "--wait", "-1").exit_code == 2
    assert invoke("rollout", "list", "--kind", "weekly").exit_code == 2
    assert invoke("rollout", "explode", "s").exit_code == 2
    assert stub.requests == []


SET_ROLLOUT = {
    "id": "r-0042", "kind": "ClusterSetRollout", "clusterset": MODELSERVING, "state": "PAUSED", "count": 5,
    "replaced": 2, "fromConfigHashes": ["9c1e0d2a"], "toConfigHash": "77aa01bc", "reason": "new cluster failed",
    "updatedAt": "2026-11-21T10:05:00Z", "createdClusters": ["n1", "n2"], "failedClusterIds": ["n2"],
    "timeline": [{"state": "REQUESTED", "time": "2026-11-21T10:00:00Z", "reason": None},
                 {"state": "PAUSED", "time": "2026-11-21T10:05:00Z", "reason": "new cluster failed"}],
}  # fmt: skip
FLEET_ROLLOUT = {
    "id": "k8s-131", "kind": "FleetRollout", "clusterType": "ModelServing", "state": "HALTED",
    "setCounts": {"PENDING": 3, "IN_PROGRESS": 0, "SUCCEEDED": 1, "FAILED": 1}, "reason": "budget exceeded",
    "updatedAt": "2026-11-21T11:00:00Z",
    "stages": [{"name": "canary", "state": "COMPLETED", "approval": False, "soakUntil": None, "clustersets": ["a"]},
               {"name": "rest", "state": "IN_PROGRESS", "approval": True, "soakUntil": None,
                "clustersets": ["b", "c", "d", "e"]}],
    "sets": [{"clusterset": "a", "stage": "canary", "state": "SUCCEEDED", "updatePath": "rotation",
              "rollout": {"state": "COMPLETED", "replaced": 2, "count": 2}, "reason": None},
             {"clusterset": "b", "stage": "rest", "state": "FAILED", "updatePath": "in-place", "rollout": None,
              "reason": "upgrade failed"}],
}  # fmt: skip


def test_rollout_list_table_json_and_filters(stub: type[StubClient]) -> None:
    stub.rollout_items = [FLEET_ROLLOUT, SET_ROLLOUT]
    result = invoke("rollout", "list", "--kind", "FLEET", "--state", "halted", "--clusterset", "a")
    assert result.exit_code == 0, result.output
    assert stub.rollout_filters == {"kind": "fleet", "state": "HALTED", "clusterset": "a"}
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "KIND", "SCOPE", "STATE", "PROGRESS", "DETAIL", "UPDATED"]
    assert lines[1].split()[:4] == ["k8s-131", "fleet", "ModelServing", "HALTED"]
    assert "1/5 sets, 1 failed" in lines[1] and "stage rest budget exceeded" in lines[1]
    assert lines[2].split()[:4] == ["r-0042", "clusterset", MODELSERVING, "PAUSED"]
    assert "2/5 replaced" in lines[2] and "9c1e0d2a -> 77aa01bc (new cluster failed)" in lines[2]
    assert json.loads(invoke("rollout", "list", "-o", "json").stdout) == [FLEET_ROLLOUT, SET_ROLLOUT]
    stub.rollout_items = []
    assert "no rollouts match" in invoke("rollout", "list").stderr


def test_rollout_get_shows_stages_sets_and_timeline(stub: type[StubClient]) -> None:
    stub.rollout_items = [FLEET_ROLLOUT, SET_ROLLOUT]
    fleet = invoke("rollout", "get", "k8s-131")
    assert fleet.exit_code == 0, fleet.output
    text = fleet.stdout
    assert "stages" in text and "canary" in text and "clustersets" in text
    row = next(line for line in text.splitlines() if line.startswith("b "))
    assert row.split()[:4] == ["b", "rest", "FAILED", "in-place"] and "upgrade failed" in row
    assert "COMPLETED 2/2" in text
    one = invoke("rollout", "get", "r-0042")
    assert "createdClusters: n1 n2" in one.stdout and "failedClusterIds: n2" in one.stdout
    assert "2026-11-21T10:05:00Z PAUSED (new cluster failed)" in one.stdout
    assert json.loads(invoke("rollout", "get", "r-0042", "-o", "json").stdout) == SET_ROLLOUT
    missing = invoke("rollout", "get", "nope")
    assert missing.exit_code == 1 and "not found" in missing.stderr


FLEET_FILE = {
    "kind": "FleetRollout", "rolloutId": "k8s-131", "clusterType": "ModelServing",
    "selector": {"envs": ["prod"], "clouds": ["aws", "gcp"]},
    "patch": {"kubernetesVersion": "1.31"},
    "stages": [{"name": "canary", "selector": {"names": [MODELSERVING]}, "soakSeconds": 3600},
               {"name": "rest", "approval": True}],
    "maxInFlight": 5, "failureBudget": 1,
}  # fmt: skip


def test_fleet_rollout_start_reads_camel_case_yaml(stub: type[StubClient], tmp_path: Path) -> None:
    result = invoke("fleet-rollout", "start", str(write(tmp_path, "f.yaml", [FLEET_FILE])))
    assert result.exit_code == 0, result.output
    (request,) = stub.requests
    assert isinstance(request, FleetRolloutRequested)
    assert (request.rollout_id, request.cluster_type, request.max_in_flight, request.failure_budget) == (
        "k8s-131", "ModelServing", 5, 1)
    assert request.selector.clouds == ["aws", "gcp"] and request.patch == {"kubernetesVersion": "1.31"}
    assert [(s.name, s.soak_seconds, s.approval) for s in request.stages] == [("canary", 3600, False),
                                                                               ("rest", 0, True)]  # fmt: skip
    assert request.stages[0].selector.names == [MODELSERVING]
    assert "fleet-rollout/k8s-131 requested (event ev-1)" in result.stdout
    # The same in JSON with python names is the same request; --dry-run publishes nothing.
    snake = {"rollout_id": "k8s-131", "cluster_type": "ModelServing", "patch": {"kubernetesVersion": "1.31"},
             "selector": FLEET_FILE["selector"], "max_in_flight": 5, "failure_budget": 1,
             "stages": [{"name": "canary", "selector": {"names": [MODELSERVING]}, "soak_seconds": 3600},
                        {"name": "rest", "approval": True}]}  # fmt: skip
    path = tmp_path / "f.json"
    path.write_text(json.dumps(snake))
    dry = invoke("fleet-rollout", "start", str(path), "--dry-run")
    assert dry.exit_code == 0 and "is valid (2 stage(s): canary, rest); nothing published" in dry.stdout
    assert stub.requests == [request]
    assert load_fleet_rollout(path) == request


def test_fleet_rollout_start_prints_every_bad_field_and_publishes_nothing(stub: type[StubClient],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    bad = {**FLEET_FILE, "rolloutId": "K8s 1.31", "maxInFlight": 0, "colour": "red",
           "patch": {"kubernetesVersoin": "1.31", "count": 9},
           "stages": [{"name": "canary", "soakSeconds": -5}, {"name": "canary", "selector": {"clouds": ["ibm"]}}]}
    result = invoke("fleet-rollout", "start", str(write(tmp_path, "bad.yaml", [bad])))
    assert result.exit_code == 2, result.output
    assert "nothing was published" in result.stderr and stub.requests == []
    fields = {line.split(":")[0].strip() for line in result.stderr.splitlines() if line.startswith("  ")}
    assert fields == {"rolloutId", "maxInFlight", "colour", "patch.kubernetesVersoin", "patch.count",
                      "stages[0].soakSeconds", "stages[1].name", "stages[1].selector.clouds[0]"}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "text"),
    [("a: [1\n", "not valid YAML"), ("a: 1\n---\nb: 2\n", "found 2"), ("", "found 0"),
     ("- a list\n", "must be a mapping")],
)
def test_fleet_rollout_start_file_errors(content: str, text: str, tmp_path: Path, stub: type[StubClient]) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(content)
    result = invoke("fleet-rollout", "start", str(path))
    assert result.exit_code == 2 and text in result.stderr, result.output
    missing = invoke("fleet-rollout", "start", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "cannot read" in missing.stderr
    assert stub.requests == []


def test_fleet_rollout_start_waits_and_shows_a_rejection(stub: type[StubClient], tmp_path: Path) -> None:
    errors = [FieldError(field="patch.nodePools", message="unknown pool")]
    stub.answer = new_event(FleetRolloutRejected(rollout_id="k8s-131", errors=errors), source="fleet")
    result = invoke("fleet-rollout", "start", str(write(tmp_path, "f.yaml", [FLEET_FILE])), "--wait", "5")
    assert result.exit_code == 1 and "fleet-rollout/k8s-131 rejected" in result.stderr
    assert "patch.nodePools: unknown pool" in result.stderr


def test_fleet_rollout_approve_and_control(stub: type[StubClient]) -> None:
    assert invoke("fleet-rollout", "approve", "k8s-131", "rest", "--approver", "alice").exit_code == 0
    approval = stub.requests[-1]
    assert isinstance(approval, FleetRolloutApproved) and (approval.stage, approval.approver) == ("rest", "alice")
    assert invoke("fleet-rollout", "approve", "k8s-131", "rest").exit_code == 0
    assert isinstance(stub.requests[-1].approver, str)  # the local user, or anonymous without one
    for action in ("pause", "resume", "abort"):
        result = invoke("fleet-rollout", action, "k8s-131", "--reason", "incident 42")
        assert result.exit_code == 0, result.output
        control = stub.requests[-1]
        assert isinstance(control, FleetRolloutControlRequested)
        assert (control.rollout_id, control.action, control.reason) == ("k8s-131", action, "incident 42")
        assert f"{action} of fleet-rollout/k8s-131 requested" in result.stdout
    assert invoke("fleet-rollout", "rollback", "k8s-131").exit_code == 2  # not a fleet action


def test_parse_fleet_rollout_rules() -> None:
    model, errors = parse_fleet_rollout(FLEET_FILE)
    assert model is not None and errors == []
    _, errors = parse_fleet_rollout({**FLEET_FILE, "max_in_flight": 3})
    assert [e.field for e in errors] == ["maxInFlight"] and "given twice" in errors[0].message
    _, errors = parse_fleet_rollout({**FLEET_FILE, "kind": "ClusterSet", "patch": {}})
    assert {e.field for e in errors} == {"kind", "patch"}
    _, errors = parse_fleet_rollout({**FLEET_FILE, "patch": {"updateStrategy": {"type": "in-place"},
                                                             "node_pools": []}})  # fmt: skip
    assert [e.field for e in errors] == ["patch.updateStrategy"]  # python spelling of a spec field is fine
    assert parse_fleet_rollout([1])[1][0].field == "(document)"
    with pytest.raises(InvalidRequest, match="rollout_id|rolloutId"):
        _intent(FleetRolloutApproved, "approval", rollout_id="", stage="s")


# ----------------------------------------------------------------------------- control planes
CORE = "core-prod-aws-eu-west-1"


def test_controlplane_migrate_and_upgrade_publish_the_request(stub: type[StubClient]) -> None:
    result = invoke("controlplane", "migrate", CORE, "--cluster", "c1", "--cluster", "c2", "--concurrency", "2",
                    "--failure-budget", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    (request,) = stub.requests
    assert request == ControlPlaneChangeRequested(clusterset=CORE, operation="migrate", cluster_ids=["c1", "c2"],
                                                  concurrency=2, failure_budget=1)  # fmt: skip
    assert request.subject() == f"clusterset.controlplane.{CORE}"
    assert f"control-plane migrate of clusterset/{CORE} requested (event ev-1)" in result.stdout
    result = invoke("controlplane", "upgrade", CORE, "--to-version", "1.31")
    assert result.exit_code == 0, result.output
    assert stub.requests[-1] == ControlPlaneChangeRequested(clusterset=CORE, operation="upgrade", to_version="1.31")


def test_controlplane_requests_name_every_bad_field_and_publish_nothing(stub: type[StubClient]) -> None:
    result = invoke("controlplane", "upgrade", "Core_Set", "--to-version", "2.0", "--concurrency", "0",
                    "--failure-budget", "-1", "--cluster", "c1", "--cluster", "c1", "--cluster", " ")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "invalid control-plane upgrade request; nothing was published" in result.stderr
    for field in ("clusterset", "toVersion", "concurrency", "failureBudget", "clusterIds[1]", "clusterIds[2]"):
        assert f"  {field}: " in result.stderr, field
    missing = invoke("controlplane", "upgrade", CORE)
    assert missing.exit_code == 2 and "  toVersion: an upgrade needs the version" in missing.stderr
    too_many = invoke("controlplane", "migrate", CORE, "--concurrency", "101")
    assert too_many.exit_code == 2 and "  concurrency: " in too_many.stderr
    assert invoke("controlplane", "migrate", CORE, "--to-version", "1.31").exit_code == 2  # no such option
    assert invoke("controlplane", "migrate", CORE, "--concurrency", "two").exit_code == 2
    assert invoke("controlplane", "list", "--kind", "rotation").exit_code == 2
    assert stub.requests == [] and stub.instances == []  # refused before a client (a connection) was made


def test_controlplane_request_waits_for_the_pipeline(stub: type[StubClient]) -> None:
    loc = Location(env="prod", cloud="aws", region="eu-west-1")
    started = ControlPlanePipelineRequested(location=loc, clusterset=CORE, pipeline_id="pl-1", operation="migrate",
                                            clusters=[PipelineCluster(cluster_id="c1", clusterset=CORE, location=loc)],
                                            concurrency=2)  # fmt: skip
    stub.answer = new_event(started, source="etcd_migration")
    result = invoke("controlplane", "migrate", CORE, "--concurrency", "2", "--wait", "5")
    assert result.exit_code == 0, result.output
    assert "pipeline pl-1 started over 1 cluster(s), 2 at a time" in result.stdout
    stub.answer = new_event(ClusterSetRejected(clusterset=CORE, errors=[
        FieldError(field="operation", message="the set's control planes are HA already")]), source="planner")
    result = invoke("controlplane", "migrate", CORE, "--wait", "5")
    assert result.exit_code == 1 and f"control-plane migrate of clusterset/{CORE} rejected" in result.stderr
    assert "  operation: the set's control planes are HA already" in result.stderr
    stub.answer = None
    result = invoke("controlplane", "migrate", CORE, "--wait", "0.5")
    assert result.exit_code == 1 and "no answer within 0.5s" in result.stderr


def _projected_operations() -> list[dict[str, Any]]:
    """Real read-model documents: a pipeline of two migrations (one rolled back) and a halted upgrade."""
    from datetime import timedelta

    from services.status_projector import core
    from services.status_projector import testing as T

    sm = T.parse(example_documents()[CORE])
    acc = T.accepted(sm)
    events = [*T.fleet_history(sm, ["c1", "c2"]),
              *T.pipeline(sm, acc, "pl-1", ["c1", "c2"], T.T0 + timedelta(hours=1), fail=["c2"], failure_budget=1),
              *T.upgrade(sm, acc, "c1", "up-1", T.T0 + timedelta(hours=2), fail_node=1)]  # fmt: skip
    views = core.Views()
    for seq, env in enumerate(events, 1):
        core.apply(views, seq, env)
    return sorted([*views.cp_operations.values(), *views.cp_pipelines.values()], key=lambda d: str(d["id"]))


def test_controlplane_list_table_json_and_filters(stub: type[StubClient]) -> None:
    stub.migration_items = _projected_operations()
    result = invoke("controlplane", "list", "--kind", "MIGRATION", "--state", "rolled_back", "--cluster", "c2",
                    "--clusterset", CORE)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stub.migration_filters == {"kind": "migration", "state": "ROLLED_BACK", "cluster": "c2",
                                      "clusterset": CORE}  # fmt: skip
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {"pl-1", "pl-1-c1", "pl-1-c2", "up-1"}
    assert "HALTED" not in rows["pl-1"] and "1/2 succeeded, 1 failed" in rows["pl-1"]
    assert "ROLLED_BACK" in rows["pl-1-c2"] and "phase 2 resume-mutations" in rows["pl-1-c2"]
    assert "95%" in rows["pl-1-c2"] and "13s" in rows["pl-1-c2"]
    assert "FAILED" in rows["up-1"] and "c1-cp-1 rollback-node" in rows["up-1"] and "1.31" in rows["up-1"]
    assert json.loads(invoke("controlplane", "list", "-o", "json").stdout) == stub.migration_items
    stub.migration_items = []
    assert "no control-plane operations match" in invoke("controlplane", "list").stderr


def test_controlplane_get_shows_the_timeline_and_availability(stub: type[StubClient]) -> None:
    stub.migration_items = _projected_operations()
    result = invoke("controlplane", "get", "pl-1-c2")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "failed at step restore-members: restore-members: injected failure (rolled back)" in text
    assert "availability: 95% of 600 requests succeeded (570), longest downtime 9s" in text
    assert "duration: 13s" in text and "pipeline: pl-1" in text
    timeline = text[text.index("timeline"):]
    for step in ("stop-mutations", "create-load-balancers", "remove-new-nodes", "resume-mutations"):
        assert step in timeline, step
    assert "restore-members" not in timeline  # it failed: no completion
    assert "rollback" in timeline and '{"hash":3141592,"revision":10042}' in timeline
    upgrade = invoke("controlplane", "get", "up-1").stdout
    assert "failed at node c1-cp-1: validation: hashkv differs (rolled back)" in upgrade
    assert "nodes: c1-cp-0 c1-cp-1" in upgrade and "availability: 100% of 900 requests" in upgrade
    pipeline = invoke("controlplane", "get", "pl-1").stdout
    assert "clusters" in pipeline and re.search(r"c2\s+FAILED\s+pl-1-c2\s+ROLLED_BACK", pipeline)
    assert json.loads(invoke("controlplane", "get", "up-1", "-o", "json").stdout)["kind"] == "upgrade"
    missing = invoke("controlplane", "get", "nope")
    assert missing.exit_code == 1 and "control-plane operation 'nope' not found" in missing.stderr
