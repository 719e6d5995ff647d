"""Building envelopes from payloads and reading payloads back."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TypeVar

from shared.events.envelope import Envelope, derive_id, utcnow
from shared.events.models import EVENT_TYPES, Event

E = TypeVar("E", bound=Event)


def new_event(
    payload: Event,
    *,
    source: str,
    cause: Envelope | None = None,
    discriminator: str = "",
    time: datetime | None = None,
    event_id: str | None = None,
) -> Envelope:
    """Wrap a payload. With a cause, the id is derived from it, so re-handling re-emits the same id."""
    type_name = payload.type_name()
    if event_id is None:
        event_id = derive_id(cause.id, type_name, discriminator) if cause else str(uuid.uuid4())
    return Envelope(
        id=event_id,
        type=type_name,
        source=source,
        subject=payload.aggregate(),
        time=time or utcnow(),
        causation_id=cause.id if cause else None,
        correlation_id=cause.correlation_id if cause else event_id,
        data=payload.model_dump(mode="json", by_alias=False),
    )


def decode_payload(envelope: Envelope) -> Event:
    """The typed payload of an envelope. Raises KeyError for an unknown type, ValidationError for bad data."""
    cls = EVENT_TYPES[envelope.type]
    return cls.model_validate(envelope.data)


def payload_as(envelope: Envelope, cls: type[E]) -> E:
    if envelope.type != cls.type_name():
        raise TypeError(f"expected {cls.type_name()}, got {envelope.type}")
    return cls.model_validate(envelope.data)


def subject_of(envelope: Envelope) -> str:
    return decode_payload(envelope).subject()


def stream_of(envelope: Envelope) -> str:
    return EVENT_TYPES[envelope.type].stream
