"""The decider pattern's one loop: decide on an event, then fold it and everything decided into the state."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from shared.events import Envelope

S = TypeVar("S")


def decide_and_evolve(decide: Callable[[S | None, Envelope], list[Envelope]],
                      evolve: Callable[[S | None, Envelope], S | None], state: S | None,
                      env: Envelope) -> tuple[S | None, list[Envelope]]:  # fmt: skip
    """The events `decide` emits for `env`, and the state after `env` and each of them (pure)."""
    events = decide(state, env)
    new_state = evolve(state, env)
    for e in events:
        new_state = evolve(new_state, e)
    return new_state, events
