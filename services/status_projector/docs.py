"""Primitives every read-model document shares: canonical timestamps and JSON, camelCase, bookkeeping. Pure."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from pydantic.alias_generators import to_camel

from shared.events import Envelope

Doc = dict[str, Any]


def ts(value: datetime) -> str:
    """RFC 3339 UTC timestamp with a 'Z', microseconds only when present: one spelling per instant."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    frac = f".{value.microsecond:06d}" if value.microsecond else ""
    return value.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def ts_or_none(value: datetime | None) -> str | None:
    return ts(value) if value is not None else None


def canonical(obj: Any) -> str:
    """The one serialisation of a document: sorted keys, no whitespace. Byte-for-byte comparable."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=4096)
def _camel_key(key: str) -> str:
    return to_camel(key)


def camel(obj: Any) -> Any:
    """Payload data as the API spells it (camelCase keys, recursively)."""
    if isinstance(obj, dict):
        return {_camel_key(k) if isinstance(k, str) else k: camel(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [camel(v) for v in obj]
    return obj


def stamp(doc: Doc, seq: int, env: Envelope, time: str) -> None:
    """Which event changed a document last, and how many did."""
    doc["updatedAt"] = time
    doc["lastEventId"] = env.id
    doc["lastEventSeq"] = seq
    doc["eventCount"] = int(doc.get("eventCount") or 0) + 1


def fill_defaults(doc: Doc, blank: Doc) -> None:
    """Keys added by a newer projector: documents stored by an older one get their defaults."""
    for key, value in blank.items():
        doc.setdefault(key, value)


def document(store: dict[str, Doc], key: str, blank: Doc) -> Doc:
    """The stored document under `key` (given the defaults a newer projector added), or `blank`, now stored."""
    doc = store.setdefault(key, blank)
    fill_defaults(doc, blank)
    return doc


def add_sorted(values: list[str], value: str) -> list[str]:
    """A sorted list of unique ids with `value` in it (order-independent, so replays agree)."""
    return values if value in values else sorted([*values, value])


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one canonical timestamp to another (both from event times, so replays agree)."""
    if not start or not end:
        return None
    delta = datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))
    return round(delta.total_seconds(), 6)


def bounded(entries: list[Doc], limit: int) -> list[Doc]:
    """A timeline that a pathological producer cannot grow without bound: the first entry and the latest ones."""
    return entries if len(entries) <= limit else [entries[0], *entries[-(limit - 1):]]


def in_plan_order(items: list[Doc], key: str, order: list[str]) -> list[Doc]:
    """Planned items first, in plan order; anything seen before the plan keeps its place after them."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(items, key=lambda item: rank.get(item[key], len(order)))  # stable: unplanned keep their order


def member(kind: str, doc_id: str) -> str:
    """The member of an index set of documents of several kinds. A tab sorts below every id character, so
    members sort by id."""
    return f"{doc_id}\t{kind}"


def split_member(value: str) -> tuple[str, str]:
    doc_id, _, kind = value.rpartition("\t")
    return kind, doc_id
