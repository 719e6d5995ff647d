"""proto/ is generated from the models and must match them byte for byte; its contents must be usable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import contracts
from shared.events import EVENT_TYPES, Envelope, new_event, subjects, validate_clusterset
from shared.events.clusterset import FieldError
from shared.events.models import (
    ClusterReady,
    ClusterSetAccepted,
    ClusterSetApplied,
    ClusterSetRejected,
    FleetRolloutEvent,
)
from tests.conftest import example_documents

PROTO = contracts.PROTO_DIR


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_proto_matches_the_models(tmp_path: Path) -> None:
    contracts.write(tmp_path)
    generated, committed = _files(tmp_path), _files(PROTO)
    stale = sorted(rel for rel in generated.keys() | committed.keys() if generated.get(rel) != committed.get(rel))
    assert not stale, f"proto/ is stale, run `make proto` (python -m shared.contracts): {stale}"


def test_check_flag_reports_missing_changed_and_extra_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path)]
    assert contracts.main(["--check", *out]) == 1  # nothing generated yet
    assert contracts.main(out) == 0
    assert contracts.main(["--check", *out]) == 0
    capsys.readouterr()

    (tmp_path / "events" / "ClusterReady.schema.json").write_text("{}\n")
    (tmp_path / "events" / "Retired.schema.json").write_text("{}\n")  # an event type that no longer exists
    (tmp_path / "asyncapi.yaml").unlink()
    assert contracts.main(["--check", *out]) == 1
    listed = capsys.readouterr().out
    for rel in ("events/ClusterReady.schema.json", "events/Retired.schema.json", "asyncapi.yaml"):
        assert rel in listed

    assert sorted(contracts.write(tmp_path)) == [
        "asyncapi.yaml", "events/ClusterReady.schema.json", "events/Retired.schema.json",
    ]  # fmt: skip
    assert contracts.stale(tmp_path) == []


def test_one_schema_file_per_event_type() -> None:
    files = {p.name.removesuffix(".schema.json") for p in (PROTO / "events").glob("*.schema.json")}
    assert files == set(EVENT_TYPES)


# ---------------------------------------------------------------- subject patterns
def _pattern_regex(address: str) -> re.Pattern[str]:
    rx = re.escape(address).replace(re.escape(">"), r"[^ ]+")
    return re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[A-Za-z0-9_-]+", rx) + "$")


def test_subject_patterns_are_the_documented_grammar() -> None:
    assert contracts.subject_pattern(EVENT_TYPES["ClusterSetApplied"]).address == "clusterset.applied.{name}"
    assert contracts.subject_pattern(EVENT_TYPES["ClusterSetDeleted"]).address == "clusterset.deleted.{name}"
    assert contracts.deadletter_pattern().address == "deadletter.{service}.>"
    for name, cls in EVENT_TYPES.items():
        if cls.stream == subjects.STREAM_FLEET:
            address = contracts.subject_pattern(cls).address
            # Fleet-wide rollouts span locations: their cloud and region tokens are the empty token `_`.
            where = "_._" if issubclass(cls, FleetRolloutEvent) else "{cloud}.{region}"
            assert address == f"fleet.{subjects.snake(name)}.{where}.{{aggregate}}", name
            # Streams must capture every channel, or a publish would fail with no responders.
            assert any(_pattern_regex(f).match(address.replace("{", "").replace("}", ""))
                       for f in subjects.STREAM_SUBJECTS[cls.stream])  # fmt: skip


def _sample_events() -> list[Envelope]:
    doc = example_documents()["modelserving-prod-aws-us-east-1"]
    model, errors = validate_clusterset(doc)
    assert model is not None, errors
    spec, loc = model.spec.cluster_spec(), model.metadata.location
    applied = new_event(ClusterSetApplied(document=doc), source="cli")
    accepted = ClusterSetAccepted(
        location=loc, clusterset=model.metadata.name, generation=1, cluster_type=model.metadata.cluster_type,
        count=model.spec.count, config_hash=spec.config_hash(), spec=spec, update_strategy=model.spec.update_strategy,
        document_hash="0" * 16,
    )  # fmt: skip
    ready = ClusterReady(
        location=loc, cluster_id="modelserving-prod-aws-us-east-1-7f3a", clusterset=model.metadata.name,
        cluster_type="ModelServing", config_hash=spec.config_hash(), endpoint="https://7f3a.example",
        infra_services=[{"name": "cert-manager", "version": "v1.15.3"}],
    )  # fmt: skip
    rejected = ClusterSetRejected(clusterset="bad", cloud="mars", errors=[FieldError(field="f", message="m")])
    return [applied] + [new_event(p, source="planner", cause=applied) for p in (accepted, ready, rejected)]


def test_real_subjects_match_their_channel_address() -> None:
    for env in _sample_events():
        cls = EVENT_TYPES[env.type]
        subject = cls.model_validate(env.data).subject()
        assert _pattern_regex(contracts.subject_pattern(cls).address).match(subject), (env.type, subject)


# ---------------------------------------------------------------- the AsyncAPI document hangs together
def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"external $ref {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_asyncapi_document_is_consistent() -> None:
    doc = yaml.safe_load((PROTO / "asyncapi.yaml").read_text())
    assert doc["asyncapi"] == "3.0.0"
    for ref in _refs(doc):
        _resolve(doc, ref)  # raises KeyError when dangling
    assert set(doc["channels"]) == set(EVENT_TYPES) | {"DeadLetter"}
    for name, channel in doc["channels"].items():
        assert set(re.findall(r"\{(\w+)\}", channel["address"])) == set(channel.get("parameters", {})), name
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive")
        channel_ref = op["channel"]["$ref"]
        assert all(m["$ref"].startswith(channel_ref + "/messages/") for m in op["messages"]), name
    assert {op["channel"]["$ref"] for op in doc["operations"].values()} == {f"#/channels/{c}" for c in doc["channels"]}


def test_asyncapi_document_fits_faststreams_asyncapi_3_model() -> None:
    # Not the official JSON Schema, but an independent AsyncAPI 3.0 model that ships with a dependency.
    from faststream.specification.asyncapi.v3_0_0.schema.schema import ApplicationSchema

    doc = yaml.safe_load((PROTO / "asyncapi.yaml").read_text())
    doc["servers"]["nats"].setdefault("pathname", "")  # optional in the spec, required by FastStream's model
    model = ApplicationSchema.model_validate(doc)
    assert set(model.channels or {}) == set(doc["channels"])


def test_deadletter_headers_are_the_ones_the_runtime_sets() -> None:
    source = (Path(contracts.__file__).parent / "bus" / "consumer.py").read_text()
    for header in contracts.DEADLETTER_HEADERS:
        assert f'"{header}"' in source or header == contracts.MSG_ID, header


# ---------------------------------------------------------------- validation with a JSON Schema library
def _validator(schema_path: Path) -> Any:
    # jsonschema is not a dependency of the project (yet): skip only these checks when it is absent.
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (add it to the dev extras)")
    import json

    schema = json.loads(schema_path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_every_example_clusterset_validates_against_the_schema() -> None:
    validator = _validator(PROTO / "clusterset.schema.json")
    docs = example_documents()
    assert docs, "no example ClusterSets found"
    for name, doc in docs.items():
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, (name, errors)
    bad = {**docs["modelserving-prod-aws-us-east-1"], "kind": "Cluster"}
    assert list(validator.iter_errors(bad)), "the schema must be able to reject a document"


def test_real_envelopes_validate_against_the_schemas() -> None:
    envelope = _validator(PROTO / "envelope.schema.json")
    for env in _sample_events():
        wire = env.model_dump(mode="json")
        assert not list(envelope.iter_errors(wire)), env.type
        payload = _validator(PROTO / "events" / f"{env.type}.schema.json")
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in payload.iter_errors(wire["data"])]
        assert not errors, (env.type, errors)
