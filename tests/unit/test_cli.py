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
from typing import Any

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
    api_url_from_settings,
    load_clustersets,
)
from shared.config import Settings
from shared.events import FieldError, Location, new_event
from shared.events.models import ClusterReady
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

    async def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def stub(monkeypatch: pytest.MonkeyPatch) -> type[StubClient]:
    StubClient.instances = []
    for attr, value in dict(reject={}, timeout_names=set(), known=set(), cluster_items=[], clusterset_items=[],
                            ready_events=[], fail_with=None).items():  # fmt: skip
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
    assert sorted(d.name for d in loaded.documents) == sorted(example_documents())
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
def _ready(n: int, cloud: str = "aws") -> ClusterReady:
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
    items = [
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
