"""Language-neutral contracts in `proto/`, generated from the pydantic models.

    python -m shared.contracts            regenerate proto/ (what `make proto` runs)
    python -m shared.contracts --check    exit 1 and list the stale files, change nothing

Generated: a JSON Schema for the envelope, one per event payload (the envelope's `data`),
one for the ClusterSet document users write, and an AsyncAPI 3.0 document that ties them
to the NATS subjects. Subject patterns are not spelled here: each event class's own
`subject()` is called on a sample built from placeholders, so the patterns are exactly
what `shared.events.subjects` produces. Output is deterministic (sorted keys, no
timestamps) so that a test can compare it with proto/ byte for byte.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.bus.connection import MSG_ID
from shared.config import Settings
from shared.events import subjects
from shared.events.clusterset import ClusterSet, Location
from shared.events.envelope import SCHEMA_VERSION, Envelope
from shared.events.models import EVENT_TYPES, Event

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Same namespace as the ClusterSet apiVersion (flotilla.dev/v1); the ids name the schemas, they need not resolve.
SCHEMA_BASE = "https://flotilla.dev/schemas/"
ASYNCAPI_VERSION = "3.0.0"

# Headers the bus sets on every event (shared/bus/connection.py) and on dead letters (shared/bus/consumer.py).
TYPE_HEADER = "Flotilla-Type"
TRACE_HEADER = "traceparent"
DEADLETTER_HEADERS: dict[str, str] = {
    "Flotilla-Error": "why the message was given up on (last error, at most 1000 characters)",
    "Flotilla-Service": "the service whose consumer gave up",
    "Flotilla-Original-Subject": "the subject the message was first published on",
    "Flotilla-Original-Stream-Seq": "its sequence number in the original stream",
    "Flotilla-Deliveries": "how many deliveries were attempted",
    MSG_ID: "dedup id of the dead letter itself",
}


# ---------------------------------------------------------------- subject patterns
@dataclass(frozen=True)
class Parameter:
    name: str
    pointer: str  # JSON pointer into the envelope, e.g. /data/location/cloud
    description: str


@dataclass(frozen=True)
class SubjectPattern:
    address: str  # e.g. fleet.cluster_ready.{cloud}.{region}.{aggregate}
    parameters: tuple[Parameter, ...]


class _Placeholders:
    """Subject-safe stand-ins (`__p0__`, ...) for payload fields, remembering where each came from."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, ...]] = []

    def __call__(self, *path: str) -> str:
        self.paths.append(path)
        return f"__p{len(self.paths) - 1}__"

    def path_of(self, tok: str) -> tuple[str, ...] | None:
        if tok.startswith("__p") and tok.endswith("__") and tok[3:-2].isdigit():
            return self.paths[int(tok[3:-2])]
        return None


def _sample(cls: type[Event], ph: _Placeholders) -> Event:
    """An unvalidated instance whose every field is a placeholder, enough for `subject()`."""
    values: dict[str, Any] = {}
    for name in cls.model_fields:
        if name == "location":
            values[name] = Location.model_construct(
                env=ph(name, "env"), cloud=ph(name, "cloud"), region=ph(name, "region")
            )
        elif name == "document":  # ClusterSetApplied: the raw user document, named by metadata.name
            values[name] = {"metadata": {"name": ph(name, "metadata", "name")}}
        else:
            values[name] = ph(name)
    return cls.model_construct(**values)


def subject_pattern(cls: type[Event]) -> SubjectPattern:
    """The subject pattern of an event type, derived from its own `subject()`."""
    ph = _Placeholders()
    sample = _sample(cls, ph)
    subject, aggregate = sample.subject(), sample.aggregate()
    tokens: list[str] = []
    params: list[Parameter] = []
    for tok in subject.split("."):
        path = ph.path_of(tok)
        if path is None:
            if "__p" in tok:
                raise ValueError(f"{cls.__name__}: a field is only part of subject token {tok!r}")
            tokens.append(tok)
            continue
        field = ".".join(path)
        if tok == aggregate and cls.stream == subjects.STREAM_FLEET:
            # Every FLEET subject ends in the aggregate id, whichever field holds it: one grammar to filter on.
            name, what = "aggregate", f"the aggregate id: the payload's `{field}`"
        else:
            name, what = path[-1], f"the payload's `{field}`"
        if path == ("location", "cloud"):  # validated; a rejected set's raw cloud may be anything
            what += f" ({', '.join(Location.model_fields['cloud'].annotation.__args__)})"  # type: ignore[union-attr]
        params.append(Parameter(name, "/data/" + "/".join(path), f"{what}, made subject-safe (`_` when empty)"))
        tokens.append("{" + name + "}")
    if len({p.name for p in params}) != len(params):
        raise ValueError(f"{cls.__name__}: two subject tokens map to the same parameter name")
    return SubjectPattern(".".join(tokens), tuple(params))


def deadletter_pattern() -> SubjectPattern:
    service = "__service__"
    address = subjects.deadletter(service, ">").replace(service, "{service}")
    param = Parameter("service", "", "the service whose consumer gave up on the message")
    return SubjectPattern(address, (param,))


# ---------------------------------------------------------------- JSON Schemas
def _doc(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")


def envelope_schema() -> dict[str, Any]:
    schema = Envelope.model_json_schema()
    schema["description"] = (
        "The envelope every Flotilla event travels in (JSON, UTF-8). `type` names the payload schema "
        "(events/<type>.schema.json) that `data` follows; `subject` is the aggregate id."
    )
    return {"$schema": DIALECT, "$id": SCHEMA_BASE + "envelope.schema.json", **schema}


def event_schema(cls: type[Event]) -> dict[str, Any]:
    # by_alias=False: payloads go on the wire with their Python field names (new_event dumps by_alias=False).
    schema = cls.model_json_schema(by_alias=False)
    pattern = subject_pattern(cls)
    schema["$comment"] = (
        f"The `data` of an envelope whose `type` is {cls.__name__}. "
        f"Stream {cls.stream}, subject {pattern.address}."
    )
    return {"$schema": DIALECT, "$id": f"{SCHEMA_BASE}events/{cls.__name__}.schema.json", **schema}


def clusterset_schema() -> dict[str, Any]:
    schema = ClusterSet.model_json_schema(by_alias=True)
    schema["description"] = "A ClusterSet: `count` identical clusters of one clusterType in one location."
    schema["$comment"] = (
        "Field-level rules only. Cross-field rules (region format per cloud, `network` exactly with feature "
        "`byon`, unique node-pool names, known infra services and their dependencies, minCount <= maxCount, "
        "a rotation that can progress) are checked by the planner, which names every bad field in "
        "ClusterSetRejected."
    )
    return {"$schema": DIALECT, "$id": SCHEMA_BASE + "clusterset.schema.json", **schema}


# ---------------------------------------------------------------- AsyncAPI
def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)}


def _channel_parameters(pattern: SubjectPattern) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pattern.parameters:
        param: dict[str, Any] = {"description": p.description}
        if p.pointer:
            param["location"] = f"$message.payload#{p.pointer}"
        out[p.name] = param
    return out


CORRELATION_ID = {
    "description": "the id of the event that started the chain (usually a user's apply)",
    "location": "$message.payload#/correlation_id",
}


def asyncapi() -> dict[str, Any]:
    classes = list(EVENT_TYPES.values())
    models: list[type[BaseModel]] = [Envelope, *classes]
    # One pool of schemas for every payload and the envelope, referenced from the messages.
    _, defs = models_json_schema(
        [(cls, "validation") for cls in models],
        by_alias=False,
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = dict(defs["$defs"])
    missing = [c.__name__ for c in models if c.__name__ not in schemas]
    if missing:  # pydantic renames models whose names collide; the refs below would dangle
        raise ValueError(f"schema names collide for {missing}")
    schemas["EventHeaders"] = {
        "type": "object",
        "properties": {
            MSG_ID: {"type": "string", "description": "the envelope id: JetStream drops a repeat inside its "
                                                      "duplicate window, consumers' ledgers after that"},
            TYPE_HEADER: {"type": "string", "description": "the envelope type (set by Flotilla's publishers)"},
            TRACE_HEADER: {"type": "string", "description": "W3C trace context of the producing span"},
        },
        "required": [MSG_ID],  # Flotilla-Type is informational: consumers read the envelope's type
    }  # fmt: skip
    schemas["DeadLetterHeaders"] = {
        "type": "object",
        "properties": {name: {"type": "string", "description": d} for name, d in DEADLETTER_HEADERS.items()},
        "required": list(DEADLETTER_HEADERS),
    }

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for cls in classes:
        name = cls.__name__
        pattern = subject_pattern(cls)
        description = f"{name} events on stream {cls.stream}."
        if cls.stream == subjects.STREAM_FLEET:
            description += f" All of them: `{subjects.fleet_filter(name)}`; narrow by cloud and region."
        channels[name] = {
            "address": pattern.address,
            "description": description,
            "messages": {name: _ref("components", "messages", name)},
            "parameters": _channel_parameters(pattern),
        }
        messages[name] = {
            "name": name,
            "title": name,
            "summary": _doc(cls) or f"{name} event.",
            "contentType": "application/json",
            # Inline rather than a $ref to components/correlationIds: some AsyncAPI tools accept only the object.
            "correlationId": CORRELATION_ID,
            "headers": _ref("components", "schemas", "EventHeaders"),
            "payload": {
                "allOf": [
                    _ref("components", "schemas", "Envelope"),
                    {
                        "type": "object",
                        "properties": {"type": {"const": name}, "data": _ref("components", "schemas", name)},
                        "required": ["type", "data"],
                    },
                ]
            },
        }
        for action in ("send", "receive"):
            operations[f"{action}{name}"] = {
                "action": action,
                "channel": _ref("channels", name),
                "messages": [_ref("channels", name, "messages", name)],
                "summary": f"{'Publish' if action == 'send' else 'Consume'} {name}.",
            }

    dl = deadletter_pattern()
    channels["DeadLetter"] = {
        "address": dl.address,
        "description": (
            f"Messages a service gave up on after its last delivery attempt, on stream {subjects.STREAM_DEADLETTER}. "
            "The subject continues with the original subject."
        ),
        "messages": {"DeadLetter": _ref("components", "messages", "DeadLetter")},
        "parameters": _channel_parameters(dl),
    }
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "DeadLetter",
        "summary": "The original message bytes, unchanged (an envelope unless it could not be decoded).",
        "headers": _ref("components", "schemas", "DeadLetterHeaders"),
        "payload": {"description": "the original message, byte for byte"},
    }
    operations["sendDeadLetter"] = {
        "action": "send",
        "channel": _ref("channels", "DeadLetter"),
        "messages": [_ref("channels", "DeadLetter", "messages", "DeadLetter")],
        "summary": "A consumer dead-letters a message it could not handle.",
    }
    operations["receiveDeadLetter"] = {
        "action": "receive",
        "channel": _ref("channels", "DeadLetter"),
        "messages": [_ref("channels", "DeadLetter", "messages", "DeadLetter")],
        "summary": "Operators inspect and replay dead letters.",
    }

    streams = "; ".join(f"{s}: {', '.join(subs)}" for s, subs in subjects.STREAM_SUBJECTS.items())
    nats_host = urlparse(Settings.model_fields["nats_url"].default).netloc
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Flotilla events",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": (
                "Typed events between Flotilla's services on NATS JetStream. Every message is a JSON envelope "
                "(envelope.schema.json) whose `data` is the payload named by `type`. Publish to the stream "
                f"(never core NATS) with header {MSG_ID} = envelope id. Streams: {streams}. "
                f"info.version follows the envelope's schema_version ({SCHEMA_VERSION})."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": nats_host,
                "protocol": "nats",
                "description": "NATS with JetStream; FLOTILLA_NATS_URL. On a fleet: a three-node cluster, "
                "stream replicas 3.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
        },
    }


# ---------------------------------------------------------------- files
class _NoAliasDumper(yaml.SafeDumper):
    """Shared sub-dicts must be written out, not as YAML anchors that some AsyncAPI tools reject."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _yaml(doc: dict[str, Any]) -> str:
    """Top-level sections in the document's own order (asyncapi, info, servers, ...), everything below sorted."""
    header = "# Generated by `python -m shared.contracts` (make proto). Do not edit.\n"
    sections = [
        yaml.dump({key: value}, Dumper=_NoAliasDumper, sort_keys=True, allow_unicode=True, width=120)
        for key, value in doc.items()
    ]
    return header + "".join(sections)


def _readme() -> str:
    lines = [
        "# proto/: Flotilla's language-neutral contracts",
        "",
        "Generated from the pydantic models by `python -m shared.contracts` (`make proto`). Do not edit:",
        "a unit test fails when these files differ from what the models generate.",
        "",
        "- `asyncapi.yaml`: AsyncAPI 3.0, every channel (NATS subject pattern), message and schema.",
        "- `envelope.schema.json`: the envelope every event travels in (JSON Schema 2020-12).",
        "- `events/<Type>.schema.json`: the `data` of an envelope whose `type` is `<Type>`.",
        "- `clusterset.schema.json`: the ClusterSet document users write (camelCase).",
        "",
        "| event | stream | subject |",
        "|---|---|---|",
    ]
    for name, cls in EVENT_TYPES.items():
        lines.append(f"| {name} | {cls.stream} | `{subject_pattern(cls).address}` |")
    lines.append(f"| (dead letter) | {subjects.STREAM_DEADLETTER} | `{deadletter_pattern().address}` |")
    return "\n".join(lines) + "\n"


def render() -> dict[str, str]:
    """Every generated file: path relative to proto/ -> content."""
    files = {
        "README.md": _readme(),
        "asyncapi.yaml": _yaml(asyncapi()),
        "clusterset.schema.json": _json(clusterset_schema()),
        "envelope.schema.json": _json(envelope_schema()),
    }
    for name, cls in EVENT_TYPES.items():
        files[f"events/{name}.schema.json"] = _json(event_schema(cls))
    return dict(sorted(files.items()))


def stale(out_dir: Path = PROTO_DIR) -> list[str]:
    """Files under out_dir that are missing, different, or no longer generated."""
    expected = render()
    present = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    wrong = [rel for rel, text in expected.items() if rel not in present or (out_dir / rel).read_text() != text]
    return sorted(wrong + [rel for rel in present if rel not in expected])


def write(out_dir: Path = PROTO_DIR) -> list[str]:
    """Bring out_dir to what render() produces; returns the files written or removed."""
    changed = stale(out_dir)
    expected = render()
    for rel in changed:
        path = out_dir / rel
        if rel in expected:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(expected[rel])
        else:
            path.unlink()
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.contracts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if proto/ is stale; write nothing")
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output directory (default: proto/)")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(args.out)
        for rel in bad:
            print(f"stale: {args.out / rel}")
        if bad:
            print("run `make proto` (python -m shared.contracts)", file=sys.stderr)
        return 1 if bad else 0
    for rel in write(args.out):
        print(f"wrote {args.out / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
