"""Event contracts: envelope, payload models, subjects. The single source of truth."""

from shared.events import subjects
from shared.events.clusterset import ClusterSet, ClusterSpec, FieldError, Location, validate_clusterset
from shared.events.envelope import Envelope, derive_id, utcnow
from shared.events.factory import decode_payload, new_event
from shared.events.models import *  # noqa: F403
from shared.events.models import EVENT_TYPES, Event

__all__ = [
    "EVENT_TYPES", "ClusterSet", "ClusterSpec", "Envelope", "Event", "FieldError", "Location",
    "decode_payload", "derive_id", "new_event", "subjects", "utcnow", "validate_clusterset",
]  # fmt: skip
