"""rotation's pure core against a simulated world: the availability and surge bounds hold under any order of facts."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.rotation.core import RotationState, evolve, handle
from services.rotation.windows import is_open, next_opening
from shared.cluster_ids import cluster_id_for
from shared.events import Envelope, new_event
from shared.events.clusterset import ClusterSpec, Location, MaintenanceWindow, UpdateStrategy
from shared.events.models import (
    ClusterDeprovisioned,
    ClusterDrained,
    ClusterInfraFailed,
    ClusterReady,
    RolloutControlRequested,
    RolloutMember,
    RolloutRequested,
    RolloutTick,
)

LOC = Location(env="prod", cloud="aws", region="us-east-1")
SET = "web-prod"
OLD_SPEC = ClusterSpec.model_validate({"kubernetesVersion": "1.30", "nodePools": [
    {"name": "default", "instanceTypes": ["m6i.large"], "minCount": 1, "maxCount": 3}]})  # fmt: skip
NEW_SPEC = OLD_SPEC.model_copy(update={"kubernetes_version": "1.31"})
OLD, NEW = OLD_SPEC.config_hash(), NEW_SPEC.config_hash()
T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def ids(ev: Envelope, **kw) -> dict:
    return {"cluster_id": ev.data["cluster_id"], "clusterset": SET, "location": LOC, **kw}


def request(count: int = 6, surge: int = 2, unavailable: int = 0, on_failure: str = "pause",
            windows: list[MaintenanceWindow] | None = None) -> Envelope:  # fmt: skip
    strategy = UpdateStrategy(type="cluster-rotation", max_surge=surge, max_unavailable=unavailable,
                              on_failure=on_failure, maintenance_windows=windows or [])  # type: ignore[arg-type]
    members = [RolloutMember(cluster_id=cluster_id_for(SET, i), serial=i, config_hash=OLD, state="READY")
               for i in range(count)]  # fmt: skip
    return new_event(RolloutRequested(
        clusterset=SET, location=LOC, rollout_id="r1", generation=2, from_config_hashes=[OLD], to_config_hash=NEW,
        cluster_type="Web", spec=NEW_SPEC, update_strategy=strategy, count=count, serial_base=count, members=members,
    ), source="planner", time=T0)  # fmt: skip


class World:
    """The rest of the system, reduced to: requested clusters become READY, drains finish, retirements delete.

    It counts from the moment things happen (not from when rotation learns them)."""

    def __init__(self, count: int, fail: set[int] | None = None) -> None:
        self.state: RotationState | None = None
        self.pending: list[Envelope] = []
        self.ready = {cluster_id_for(SET, i) for i in range(count)}
        self.alive = set(self.ready)
        self.min_ready = count
        self.max_alive = count
        self.requested = 0
        self.retired: list[str] = []
        self.fail = fail or set()
        self.clock = T0
        self.log: list[Envelope] = []

    def deliver(self, env: Envelope) -> list[Envelope]:
        self.state, out = handle(self.state, env)
        self.log.append(env)
        for ev in out:
            self.log.append(ev)
            self._effect(ev)
        return out

    def _effect(self, ev: Envelope) -> None:
        self.clock += timedelta(seconds=1)
        if ev.type == "ClusterRequested":
            self.requested += 1
            self.alive.add(ev.data["cluster_id"])
            if ev.data["serial"] in self.fail:
                self.pending.append(new_event(ClusterInfraFailed(**ids(ev), service="ingress", reason="x",
                                                                 retryable=False), source="w", time=self.clock))
            else:
                fact = ClusterReady(**ids(ev), cluster_type="Web", config_hash=NEW, endpoint="e", infra_services=[])
                self.pending.append(new_event(fact, source="w", time=self.clock))
        elif ev.type == "ClusterDrainRequested":
            self.ready.discard(ev.data["cluster_id"])
            self.pending.append(new_event(ClusterDrained(**ids(ev), rollout_id="r1"), source="w", time=self.clock))
        elif ev.type == "ClusterRetirementRequested":
            assert ev.data["cluster_id"] not in self.retired, "retired twice"
            self.retired.append(ev.data["cluster_id"])
            self.ready.discard(ev.data["cluster_id"])
            self.pending.append(new_event(ClusterDeprovisioned(**ids(ev)), source="w", time=self.clock))
        self.min_ready = min(self.min_ready, len(self.ready))
        self.max_alive = max(self.max_alive, len(self.alive))

    def step(self, pick: int) -> None:
        env = self.pending.pop(pick % len(self.pending))
        if env.type == "ClusterReady":
            self.ready.add(env.data["cluster_id"])
        if env.type == "ClusterDeprovisioned":
            self.alive.discard(env.data["cluster_id"])
        self.deliver(env)

    def run(self, picks: list[int]) -> None:
        i = 0
        while self.pending:
            self.step(picks[i % len(picks)] if picks else 0)
            i += 1


def types(events: list[Envelope]) -> list[str]:
    return [e.type for e in events]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 8), st.integers(0, 3), st.integers(0, 2), st.lists(st.integers(0, 50), max_size=40))
def test_rotation_keeps_the_ready_floor_and_the_surge_ceiling_in_any_order(count, surge, unavailable, picks):
    if surge == 0 and unavailable == 0:
        surge = 1
    world = World(count)
    out = world.deliver(request(count, surge, unavailable))
    assert types(out)[0] == "RolloutStarted"
    world.run(picks)
    assert world.state is not None and world.state.run is None, "the rollout ended"
    assert world.log[-1].type == "RolloutCompleted"
    assert world.min_ready >= count - unavailable
    assert world.max_alive <= count + surge
    assert world.requested == count and len(world.retired) == count
    assert world.alive == world.ready and len(world.alive) == count


def test_six_with_surge_two_goes_in_three_batches_oldest_first():
    world = World(6)
    world.deliver(request(6, 2, 0))
    world.run([0])
    drained = [e.data["cluster_id"] for e in world.log if e.type == "ClusterDrainRequested"]
    assert drained == [cluster_id_for(SET, i) for i in range(6)]
    batches = [e.data["batch"] for e in world.log if e.type == "RolloutProgressed" and e.data["replaced"] == 0]
    assert batches[:1] == [1] and max(e.data["batch"] for e in world.log if e.type == "RolloutProgressed") == 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=30))
def test_handling_every_message_twice_changes_nothing(picks):
    world = World(4)
    world.deliver(request(4, 1, 0))
    while world.pending:
        env = world.pending[picks[len(world.log) % len(picks)] % len(world.pending)] if picks else world.pending[0]
        world.step(world.pending.index(env))
        before = world.state
        again, emitted = handle(world.state, env)
        assert again == before
        # Re-emitted events carry the same ids: the runtime's ledger and JetStream dedup drop them.
        assert all(e.id in {x.id for x in world.log} for e in emitted)
    assert world.log[-1].type == "RolloutCompleted"


def test_replaying_the_log_rebuilds_the_state():
    world = World(5)
    world.deliver(request(5, 2, 1))
    world.run([3, 1, 4, 1, 5])
    replayed = None
    for env in world.log:
        replayed = evolve(replayed, env)
    assert replayed == world.state


def test_a_failed_new_cluster_pauses_and_no_old_cluster_is_retired():
    world = World(4, fail={4})
    world.deliver(request(4, 1, 0))
    world.run([0])
    paused = [e for e in world.log if e.type == "RolloutPaused"]
    assert len(paused) == 1 and paused[0].data["failed"] and paused[0].data["cluster_ids"] == [cluster_id_for(SET, 4)]
    assert world.retired == [] and world.state and world.state.run and world.state.run.mode == "paused"
    # Resume after a fix: the failed cluster is retired and replaced; the rollout completes.
    world.fail.clear()
    world.deliver(new_event(RolloutControlRequested(clusterset=SET, action="resume"), source="user", time=world.clock))
    world.run([0])
    assert world.log[-1].type == "RolloutCompleted"
    assert cluster_id_for(SET, 4) in world.retired and world.alive == world.ready and len(world.alive) == 4


def test_rollback_retires_the_new_clusters_and_keeps_the_old():
    world = World(4, fail={5})
    world.deliver(request(4, 2, 0))
    world.run([0])
    assert world.state and world.state.run and world.state.run.mode == "paused"
    rollback = RolloutControlRequested(clusterset=SET, action="rollback")
    world.deliver(new_event(rollback, source="user", time=world.clock))
    world.run([0])
    assert world.log[-1].type == "RolloutRolledBack"
    assert sorted(world.retired) == sorted([cluster_id_for(SET, 4), cluster_id_for(SET, 5)])
    assert world.alive == {cluster_id_for(SET, i) for i in range(4)}


def test_on_failure_rollback_rolls_back_by_itself():
    world = World(3, fail={3})
    world.deliver(request(3, 1, 0, on_failure="rollback"))
    world.run([0])
    assert "RolloutRollingBack" in types(world.log) and world.log[-1].type == "RolloutRolledBack"
    assert world.retired == [cluster_id_for(SET, 3)]


def test_pause_stops_new_work_and_resume_continues():
    world = World(3)
    world.deliver(request(3, 1, 0))
    world.deliver(new_event(RolloutControlRequested(clusterset=SET, action="pause"), source="user", time=T0))
    world.run([0])
    assert world.log[-1].type != "RolloutCompleted" and world.requested == 1
    world.deliver(new_event(RolloutControlRequested(clusterset=SET, action="resume"), source="user", time=T0))
    world.run([0])
    assert world.log[-1].type == "RolloutCompleted"


def test_a_timed_out_drain_pauses_and_resume_retires_it():
    world = World(2)
    world.deliver(request(2, 1, 0))
    ready = world.pending.pop()
    world.deliver(ready)
    drain = next(e for e in world.log if e.type == "ClusterDrainRequested")
    world.pending.clear()
    out = world.deliver(new_event(ClusterDrained(**ids(drain), rollout_id="r1", timed_out=True, remaining=3),
                                  source="installer", time=T0))  # fmt: skip
    assert types(out) == ["RolloutPaused"] and world.retired == []
    world.deliver(new_event(RolloutControlRequested(clusterset=SET, action="resume"), source="user", time=T0))
    assert world.retired == [drain.data["cluster_id"]]


def test_a_rollback_uncordons_the_old_clusters_it_drained_and_they_count_as_serving_again():
    world = World(2)
    world.deliver(request(2, 1, 0))
    world.deliver(world.pending.pop())  # the new cluster is READY: one old one is drained
    drain = next(e for e in world.log if e.type == "ClusterDrainRequested")
    world.pending.clear()
    world.deliver(new_event(ClusterDrained(**ids(drain), rollout_id="r1", timed_out=True, remaining=3),
                            source="installer", time=T0))  # fmt: skip
    out = world.deliver(new_event(RolloutControlRequested(clusterset=SET, action="rollback"), source="user", time=T0))
    uncordon = [e for e in out if e.type == "ClusterUncordonRequested"]
    assert [e.data["cluster_id"] for e in uncordon] == [drain.data["cluster_id"]]
    assert world.state is not None and world.state.members[drain.data["cluster_id"]].state == "READY"
    # A drain answer that crossed the uncordon on the way moves it back; the rollback asks again, once.
    late = world.deliver(new_event(ClusterDrained(**ids(drain), rollout_id="r1", evicted=5), source="installer",
                                   time=T0))  # fmt: skip
    assert types(late).count("ClusterUncordonRequested") == 1
    world.run([0])
    assert world.log[-1].type == "RolloutRolledBack"
    assert world.state is not None and all(m.state == "READY" for m in world.state.members.values())
    assert types(world.log).count("ClusterUncordonRequested") == 2


def test_drains_wait_for_the_maintenance_window():
    # Saturday 02:00 UTC for 4 hours; T0 is a Saturday 10:00, so the next opening is a week later.
    window = MaintenanceWindow(days=["Sat"], start="02:00", duration_minutes=240)
    world = World(2)
    world.deliver(request(2, 1, 0, windows=[window]))
    world.step(0)  # the new cluster is READY: a drain is due, but the window is closed
    waiting = [e for e in world.log if e.type == "RolloutWaiting"]
    assert len(waiting) == 1 and waiting[0].data["until"].startswith("2026-11-28T02:00")
    assert "ClusterDrainRequested" not in types(world.log)
    tick = new_event(RolloutTick(clusterset=SET, location=LOC, rollout_id="r1", bucket=1), source="rotation",
                     time=datetime(2026, 11, 28, 2, 30, tzinfo=UTC))  # fmt: skip
    out = world.deliver(tick)
    assert "ClusterDrainRequested" in types(out)


def test_window_arithmetic():
    w = [MaintenanceWindow(days=["Mon", "Tue"], start="23:00", duration_minutes=120)]
    monday_late = datetime(2026, 11, 23, 23, 30, tzinfo=UTC)
    tuesday_early = datetime(2026, 11, 24, 0, 30, tzinfo=UTC)
    assert is_open(w, monday_late) and is_open(w, tuesday_early)
    assert not is_open(w, datetime(2026, 11, 24, 2, 0, tzinfo=UTC))
    assert next_opening(w, datetime(2026, 11, 24, 2, 0, tzinfo=UTC)) == datetime(2026, 11, 24, 23, 0, tzinfo=UTC)
    assert is_open([], monday_late) and next_opening([], monday_late) is None


def test_a_duplicate_request_after_the_end_does_not_restart_it():
    world = World(2)
    req = request(2, 1, 0)
    world.deliver(req)
    world.run([0])
    assert world.log[-1].type == "RolloutCompleted"
    assert world.deliver(req) == []


def test_facts_for_sets_without_a_rollout_are_not_kept():
    ready = new_event(ClusterReady(cluster_id="x-1", clusterset=SET, location=LOC, cluster_type="Web",
                                   config_hash=OLD, endpoint="e", infra_services=[]), source="w")  # fmt: skip
    assert handle(None, ready) == (None, [])


def test_random_interleavings_with_failures_never_retire_twice():
    rng = random.Random(7)
    for _ in range(30):
        world = World(5, fail={rng.randrange(5, 8)})
        world.deliver(request(5, rng.randint(1, 3), rng.randint(0, 1)))
        world.run([rng.randrange(100) for _ in range(20)])
        world.fail.clear()
        world.deliver(new_event(RolloutControlRequested(clusterset=SET, action="resume"), source="u", time=world.clock))
        world.run([rng.randrange(100) for _ in range(20)])
        assert world.log[-1].type == "RolloutCompleted"
        assert len(world.alive) == 5 and world.alive == world.ready
