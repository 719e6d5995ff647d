"""The one envelope every event travels in, and deterministic ids for derived events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Namespace for uuid5 ids of derived events. Never change it: ids would stop matching on replay.
EVENT_NAMESPACE = uuid.UUID("6f1c2a52-3d0b-4c8e-9a57-1f1a0c0de7a1")
SCHEMA_VERSION = 1


def derive_id(cause_id: str, event_type: str, discriminator: str = "") -> str:
    """Id of an event caused by `cause_id`: the same cause handled twice yields the same id."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{cause_id}:{event_type}:{discriminator}"))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """CloudEvents-like envelope. `data` holds the typed payload as JSON (see catalog)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=80)
    source: str = Field(min_length=1, max_length=80)
    subject: str = Field(min_length=1, max_length=256, description="aggregate id")
    time: datetime
    causation_id: str | None = None
    correlation_id: str = Field(min_length=1, max_length=64)
    schema_version: int = SCHEMA_VERSION
    data: dict[str, Any]

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        return cls.model_validate_json(raw)
