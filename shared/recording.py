"""A subscription that only records what it receives, per aggregate.

rotation and etcd_migration are wired with it until their lifecycle logic lands: their
consumers exist, are durable and idempotent, and what they saw is inspectable in Redis.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from shared.bus import Outcome, Subscription
from shared.events import Envelope

MAX_RECORDED = 500


class Received(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: str
    time: str


class Inbox(BaseModel):
    model_config = ConfigDict(extra="forbid")
    received: list[Received] = []


async def record(env: Envelope, state: Inbox | None) -> Outcome[Inbox]:
    inbox = state or Inbox()
    if any(r.id == env.id for r in inbox.received):
        return Outcome()
    entry = Received(id=env.id, type=env.type, time=env.time.isoformat())
    return Outcome(state=Inbox(received=[*inbox.received, entry][-MAX_RECORDED:]))


def recording_subscription(
    durable: str, stream: str, filter_subjects: list[str], key: Callable[[Envelope], str] | None = None
) -> Subscription[Inbox]:
    sub = Subscription(durable=durable, stream=stream, filter_subjects=filter_subjects, state_model=Inbox,
                       handle=record)  # fmt: skip
    if key is not None:
        sub.key = key
    return sub
