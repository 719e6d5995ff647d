"""The fleet rollout orchestrator's pure core: validation, stages, approval, soak, in-flight limit, failure
budget, pause/resume/abort, idempotence."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.rotation.catalog import CatalogEntry
from services.rotation.fleet import FleetState, due, handle
from shared.events import Envelope, Location, new_event
from shared.events.clusterset import Cloud, UpdateStrategy
from shared.events.models import (
    ClusterSetConverged,
    ClusterSetPatchRequested,
    ClusterSetRejected,
    ClusterSetUpdateFailed,
    Event,
    FieldError,
    FleetRolloutApproved,
    FleetRolloutControlRequested,
    FleetRolloutRejected,
    FleetRolloutRequested,
    FleetRolloutStageCompleted,
    FleetRolloutStarted,
    FleetRolloutTick,
    FleetSelector,
    FleetStage,
    RolloutAborted,
    RolloutPaused,
    RolloutRolledBack,
)
from tests.helpers import PLAIN, example_spec

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
RID = "k8s-131"
SPEC = example_spec(PLAIN)
STRATEGY = UpdateStrategy(type="cluster-rotation", max_surge=1)


def entry(name: str, env: str, region: str, cloud: Cloud = "aws", cluster_type: str = "ModelServing") -> CatalogEntry:
    return CatalogEntry(name=name, cluster_type=cluster_type, location=Location(env=env, cloud=cloud, region=region),
                        generation=3, config_hash=SPEC.config_hash(), count=2, spec=SPEC,
                        update_strategy=STRATEGY)  # fmt: skip


# Six sets of one type in three places, one of another type.
CATALOG = {e.name: e for e in [
    entry("ms-dev-use1", "dev", "us-east-1"),
    entry("ms-prod-euw1", "prod", "eu-west-1"),
    entry("ms-prod-euc1", "prod", "eu-central-1"),
    entry("ms-prod-use1", "prod", "us-east-1"),
    entry("ms-prod-use2", "prod", "us-east-2"),
    entry("ms-prod-usw2", "prod", "us-west-2"),
    entry("core-prod-use1", "prod", "us-east-1", cluster_type="Core"),
]}  # fmt: skip
STAGES = [
    FleetStage(name="canary", selector=FleetSelector(envs=["dev"]), soak_seconds=60),
    FleetStage(name="eu", selector=FleetSelector(regions=["eu-west-1", "eu-central-1"]), soak_seconds=120,
               approval=True),  # fmt: skip
    FleetStage(name="rest"),
]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def user(payload: Event, t: float = 0) -> Envelope:
    return new_event(payload, source="test", time=at(t))


def request(t: float = 0, **changes: Any) -> Envelope:
    fields: dict[str, Any] = dict(rollout_id=RID, cluster_type="ModelServing", patch={"kubernetesVersion": "1.31"},
                                  stages=STAGES, max_in_flight=2, failure_budget=0)  # fmt: skip
    fields.update(changes)
    return user(FleetRolloutRequested(**fields), t)


def approve(stage: str, t: float = 0, rid: str = RID) -> Envelope:
    return user(FleetRolloutApproved(rollout_id=rid, stage=stage, approver="alice"), t)


def control(action: str, t: float = 0) -> Envelope:
    return user(FleetRolloutControlRequested(rollout_id=RID, action=action, reason=f"{action} it"), t)  # type: ignore[arg-type]


def tick(t: float) -> Envelope:
    return user(FleetRolloutTick(rollout_id=RID, bucket=int(t)), t)


def converged(name: str, t: float = 0, rid: str | None = RID) -> Envelope:
    return user(ClusterSetConverged(clusterset=name, location=CATALOG[name].location, generation=4, config_hash="c",
                                    count=2, fleet_rollout_id=rid), t)  # fmt: skip


def update_failed(name: str, t: float = 0) -> Envelope:
    return user(ClusterSetUpdateFailed(clusterset=name, location=CATALOG[name].location, generation=4,
                                       config_hash="c", cluster_ids=[f"{name}-1"], reason="node pool stuck",
                                       fleet_rollout_id=RID), t)  # fmt: skip


def run(events: list[Envelope], state: FleetState | None = None,
        catalog: dict[str, CatalogEntry] = CATALOG) -> tuple[FleetState, list[Envelope]]:  # fmt: skip
    out: list[Envelope] = []
    for e in events:
        state, emitted = handle(state, e, catalog)
        out.extend(emitted)
    assert state is not None
    return state, out


def types(events: list[Envelope]) -> list[str]:
    return [e.type for e in events]


def patched(events: list[Envelope]) -> list[str]:
    return [e.data["clusterset"] for e in events if e.type == "ClusterSetPatchRequested"]


def started(t: float = 0, **changes: Any) -> tuple[FleetState, list[Envelope]]:
    return run([request(t, **changes)])


# ---------------------------------------------------------------- planning
def test_sets_go_to_the_first_matching_stage_the_empty_selector_takes_the_rest_in_name_order() -> None:
    state, events = started()
    assert types(events) == ["FleetRolloutStarted", "FleetRolloutStageStarted", "ClusterSetPatchRequested"]
    plan = FleetRolloutStarted.model_validate(events[0].data)
    assert [(s.name, s.clustersets) for s in plan.stages] == [
        ("canary", ["ms-dev-use1"]),
        ("eu", ["ms-prod-euc1", "ms-prod-euw1"]),
        ("rest", ["ms-prod-use1", "ms-prod-use2", "ms-prod-usw2"]),  # the Core set is another cluster type
    ]
    assert (plan.max_in_flight, plan.failure_budget, plan.patch) == (2, 0, {"kubernetesVersion": "1.31"})
    patch = ClusterSetPatchRequested.model_validate(events[2].data)
    assert (patch.clusterset, patch.stage, patch.fleet_rollout_id, patch.patch) == (
        "ms-dev-use1", "canary", RID, {"kubernetesVersion": "1.31"})  # fmt: skip
    assert patch.location == CATALOG["ms-dev-use1"].location
    assert patch.subject() == "fleet.cluster_set_patch_requested.aws.us-east-1.ms-dev-use1"
    # Everything it emitted carries the request's time and a deterministic id.
    assert {e.time for e in events} == {T0} and [e.causation_id for e in events] == [events[0].causation_id] * 3
    assert state.status == "running" and state.sets["ms-prod-usw2"].stage == "rest"


def test_the_rollout_selector_narrows_and_sets_in_no_stage_are_left_out() -> None:
    stages = [FleetStage(name="us", selector=FleetSelector(regions=["us-east-1", "us-east-2"]))]
    state, events = started(selector=FleetSelector(envs=["prod"]), stages=stages, max_in_flight=5)
    plan = FleetRolloutStarted.model_validate(events[0].data)
    assert [(s.name, s.clustersets) for s in plan.stages] == [("us", ["ms-prod-use1", "ms-prod-use2"])]
    assert sorted(state.sets) == ["ms-prod-use1", "ms-prod-use2"] and patched(events) == sorted(state.sets)


def rejection(events: list[Envelope]) -> list[FieldError]:
    assert types(events) == ["FleetRolloutRejected"]
    return FleetRolloutRejected.model_validate(events[0].data).errors


def test_a_patch_may_only_touch_cluster_spec_fields() -> None:
    _, events = run([request(patch={"count": 9, "updateStrategy": {"maxSurge": 3}, "metadata": {"name": "x"},
                                    "kubernetes_version": "1.31", "tags": {"a": "b"}})])  # fmt: skip
    errors = {e.field: e.message for e in rejection(events)}
    assert set(errors) == {"patch.count", "patch.updateStrategy", "patch.metadata", "patch.kubernetes_version"}
    assert "scale" in errors["patch.count"] and "kubernetesVersion" in errors["patch.kubernetes_version"]
    assert rejection(run([request(patch={})])[1]) == [FieldError(field="patch",
                                                                 message="empty: there is nothing to roll out")]


def test_every_set_must_accept_the_patched_spec_each_bad_field_named_once_with_its_sets() -> None:
    bad = {"kubernetesVersion": "one-thirty-one", "nodePools": [{"name": "Bad_Name", "instanceTypes": [],
                                                                 "minCount": 3, "maxCount": 1}]}  # fmt: skip
    errors = rejection(run([request(patch=bad)])[1])
    fields = [e.field for e in errors]
    assert "patch.kubernetesVersion" in fields and "patch.nodePools[0].name" in fields
    assert "patch.nodePools[0].instanceTypes" in fields
    assert len(fields) == len(set(fields))  # one error per problem, not one per set
    version = next(e for e in errors if e.field == "patch.kubernetesVersion")
    assert "ms-dev-use1, ms-prod-euc1, ms-prod-euw1, ms-prod-use1, ms-prod-use2 +1 more" in version.message
    # Removing a required field is caught too; so is a feature without what it needs.
    assert [e.field for e in rejection(run([request(patch={"kubernetesVersion": None})])[1])] == [
        "patch.kubernetesVersion"]  # fmt: skip
    assert [e.field for e in rejection(run([request(patch={"features": ["byon"]})])[1])] == ["patch.network"]


def test_stage_names_unique_and_something_must_match() -> None:
    dup = [FleetStage(name="a"), FleetStage(name="a")]
    assert [e.field for e in rejection(run([request(stages=dup)])[1])] == ["stages[1].name"]
    errors = rejection(run([request(cluster_type="Nope")])[1])
    assert [e.field for e in errors] == ["selector"]
    only_gcp = [FleetStage(name="gcp", selector=FleetSelector(clouds=["gcp"]))]
    assert [e.field for e in rejection(run([request(stages=only_gcp)])[1])] == ["stages"]
    assert [e.field for e in rejection(run([request()], catalog={})[1])] == ["selector"]


def test_a_rollout_id_is_used_once_and_a_rejected_one_stays_rejected() -> None:
    state, _ = run([request(patch={"count": 1})])
    assert state.status == "rejected"
    again, events = run([request(t=5)], state)
    assert again == state and events == []
    state, _ = started()
    assert run([request(t=9, max_in_flight=9)], state) == (state, [])


# ---------------------------------------------------------------- stages, soak, approval
def test_soak_is_timed_from_the_completing_event_and_the_next_stage_starts_only_after_it() -> None:
    state, _ = started()
    state, events = run([converged("ms-dev-use1", t=10)], state)
    assert types(events) == ["FleetRolloutSetFinished", "FleetRolloutStageCompleted"]
    completed = FleetRolloutStageCompleted.model_validate(events[1].data)
    assert completed.stage == "canary" and completed.soak_until == at(70)
    assert not due(state, at(69)) and due(state, at(70))
    # Anything before the soak ends moves nothing; the tick at its end asks for the approval of "eu".
    assert run([tick(69), approve("nope", 69)], state)[1] == []
    state, events = run([tick(70)], state)
    assert types(events) == ["FleetRolloutAwaitingApproval"] and events[0].data["stage"] == "eu"
    assert not due(state, at(1000))  # waiting for a person, not a timer
    state, events = run([approve("eu", 500)], state)
    assert types(events) == ["FleetRolloutStageStarted", "ClusterSetPatchRequested", "ClusterSetPatchRequested"]
    assert patched(events) == ["ms-prod-euc1", "ms-prod-euw1"] and {e.time for e in events} == {at(500)}


def test_an_early_approval_is_remembered_even_before_the_request() -> None:
    state, events = run([approve("eu", -5)], None)
    assert events == [] and state is not None and state.approvals == ["eu"] and state.status == "new"
    # Controls before the request mean nothing.
    assert run([control("abort", -4)], state) == (state, [])
    state, _ = run([request(), approve("canary", 1)], state)  # "canary" needs no approval: ignored
    assert state.approvals == ["eu"]
    state, events = run([converged("ms-dev-use1", 10), tick(70)], state)
    assert "FleetRolloutAwaitingApproval" not in types(events)
    assert types(events)[-3:] == ["FleetRolloutStageStarted", "ClusterSetPatchRequested", "ClusterSetPatchRequested"]


def test_approvals_for_unknown_running_or_finished_stages_are_ignored() -> None:
    state, _ = started(stages=[FleetStage(name="one", approval=True), FleetStage(name="two", approval=True)])
    assert state.stages[0].status == "awaiting_approval"
    state2, _ = run([approve("one", 1), approve("one", 2), approve("ghost", 3)], state)
    assert state2 is not None and state2.approvals == ["one"] and state2.stages[0].status == "running"


def test_stage_order_over_a_whole_run_and_completion_counts() -> None:
    state, events = started(failure_budget=1, max_in_flight=3)
    inputs = [converged("ms-dev-use1", 10), tick(70), approve("eu", 80), converged("ms-prod-euc1", 90),
              update_failed("ms-prod-euw1", 95), tick(200), tick(215), converged("ms-prod-use1", 300),
              converged("ms-prod-use2", 301), converged("ms-prod-usw2", 302)]  # fmt: skip
    state, more = run(inputs, state)
    events += more
    stage_events = [(e.type, e.data.get("stage")) for e in events if e.type.startswith("FleetRolloutStage")]
    assert stage_events == [("FleetRolloutStageStarted", "canary"), ("FleetRolloutStageCompleted", "canary"),
                            ("FleetRolloutStageStarted", "eu"), ("FleetRolloutStageCompleted", "eu"),
                            ("FleetRolloutStageStarted", "rest"), ("FleetRolloutStageCompleted", "rest")]
    eu_done = next(e for e in events if e.type == "FleetRolloutStageCompleted" and e.data["stage"] == "eu")
    rest_start = next(e for e in events if e.type == "FleetRolloutStageStarted" and e.data["stage"] == "rest")
    assert eu_done.time == at(95) and rest_start.time == at(215)  # 95 + 120 s soak; the tick at 200 was early
    assert types(events)[-1] == "FleetRolloutCompleted" and events[-1].data | {} == {
        "rollout_id": RID, "succeeded": 5, "failed": 1}  # fmt: skip
    assert state.status == "completed"
    assert state.sets["ms-prod-euw1"].reason == "in-place update failed: node pool stuck"
    assert Counter(patched(events)) == Counter({name: 1 for name in state.sets})
    assert len({e.id for e in events}) == len(events)


def test_an_empty_stage_passes_straight_through_without_soak() -> None:
    stages = [FleetStage(name="asia", selector=FleetSelector(regions=["ap-south-1"]), soak_seconds=999),
              FleetStage(name="all")]  # fmt: skip
    state, events = started(stages=stages, max_in_flight=10)
    assert types(events)[:4] == ["FleetRolloutStarted", "FleetRolloutStageStarted", "FleetRolloutStageCompleted",
                                 "FleetRolloutStageStarted"]  # fmt: skip
    assert events[2].data["soak_until"] is None and len(patched(events)) == 6


# ---------------------------------------------------------------- limits
def test_at_most_max_in_flight_sets_at_once() -> None:
    stages = [FleetStage(name="all")]
    state, events = started(stages=stages, max_in_flight=2)
    assert patched(events) == ["ms-dev-use1", "ms-prod-euc1"]
    state, events = run([converged("ms-prod-euc1", 5)], state)
    assert patched(events) == ["ms-prod-euw1"]
    # A duplicate or stray outcome frees nothing.
    assert run([converged("ms-prod-euc1", 6), converged("ms-prod-use2", 6)], state)[1] == []
    # Outcomes naming another fleet rollout (or none) are not ours.
    assert run([converged("ms-dev-use1", 7, rid="other"), converged("ms-dev-use1", 7, rid=None)], state)[1] == []
    state, events = run([converged("ms-dev-use1", 8), converged("ms-prod-euw1", 9)], state)
    assert patched(events) == ["ms-prod-use1", "ms-prod-use2"]
    assert len(state.with_status("in_flight")) == 2


def test_failures_beyond_the_budget_halt_and_in_flight_sets_still_report() -> None:
    stages = [FleetStage(name="all")]
    state, _ = started(stages=stages, max_in_flight=3, failure_budget=1)
    loc = CATALOG["ms-prod-euc1"].location
    state, events = run([update_failed("ms-dev-use1", 1)], state)
    assert types(events) == ["FleetRolloutSetFinished", "ClusterSetPatchRequested"]  # within budget: continue
    paused_by_hand = user(RolloutPaused(clusterset="ms-prod-euc1", location=loc, rollout_id="r1", reason="op",
                                        fleet_rollout_id=RID), 2)  # fmt: skip
    assert run([paused_by_hand], state)[1] == []  # an operator's pause is not a failure
    failed_pause = user(RolloutPaused(clusterset="ms-prod-euc1", location=loc, rollout_id="r1", reason="new cluster "
                                      "failed", failed=True, fleet_rollout_id=RID), 3)  # fmt: skip
    state, events = run([failed_pause], state)
    assert types(events) == ["FleetRolloutSetFinished", "FleetRolloutHalted"]
    assert events[1].data["failed_sets"] == ["ms-dev-use1", "ms-prod-euc1"]
    assert state.status == "halted"
    # Sets still in flight report; nothing new starts, and the rollout never completes.
    state, events = run([converged("ms-prod-euw1", 4), converged("ms-prod-use1", 5), tick(999)], state)
    assert types(events) == ["FleetRolloutSetFinished", "FleetRolloutSetFinished"]
    assert state.with_status("pending") == ["ms-prod-use2", "ms-prod-usw2"]
    assert run([control("resume", 6), control("abort", 7)], state)[1] == []


def test_every_kind_of_set_failure_counts() -> None:
    stages = [FleetStage(name="all")]
    state, _ = started(stages=stages, max_in_flight=6, failure_budget=10)
    names = sorted(n for n in CATALOG if n.startswith("ms-"))
    loc = CATALOG[names[0]].location
    failures = [
        update_failed(names[0], 1),
        user(RolloutRolledBack(clusterset=names[1], location=loc, rollout_id="r", reason="x", fleet_rollout_id=RID)),
        user(RolloutAborted(clusterset=names[2], location=loc, rollout_id="r", reason="y", fleet_rollout_id=RID)),
        user(ClusterSetRejected(clusterset=names[3], cloud="aws", region="us-east-1", fleet_rollout_id=RID,
                                errors=[FieldError(field="spec.kubernetesVersion", message="rollout running")])),
    ]  # fmt: skip
    state, events = run(failures, state)
    assert state.with_status("failed") == names[:4]
    assert state.sets[names[3]].reason == "patch rejected: spec.kubernetesVersion: rollout running"
    assert state.sets[names[1]].reason == "rollout r rolled back: x"


# ---------------------------------------------------------------- control
def test_pause_starts_nothing_new_resume_continues_abort_stops_for_good() -> None:
    stages = [FleetStage(name="all")]
    state, _ = started(stages=stages, max_in_flight=1)
    state, events = run([control("pause", 1), control("pause", 2)], state)
    assert types(events) == ["FleetRolloutPaused"] and events[0].data["reason"] == "pause it"
    state, events = run([converged("ms-dev-use1", 3)], state)
    assert types(events) == ["FleetRolloutSetFinished"]  # recorded, but the next set waits
    state, events = run([control("resume", 4), control("resume", 5)], state)
    assert types(events) == ["FleetRolloutResumed", "ClusterSetPatchRequested"]
    state, events = run([control("abort", 6)], state)
    assert types(events) == ["FleetRolloutAborted"]
    state, events = run([converged("ms-prod-euc1", 7), control("resume", 8), control("pause", 8), tick(9)], state)
    assert types(events) == ["FleetRolloutSetFinished"]
    assert state.status == "aborted" and len(state.with_status("pending")) == 4


def test_a_stage_that_finishes_while_paused_completes_but_the_next_waits_for_resume() -> None:
    state, _ = started()
    state, events = run([control("pause", 1), converged("ms-dev-use1", 2), tick(500)], state)
    assert types(events) == ["FleetRolloutPaused", "FleetRolloutSetFinished", "FleetRolloutStageCompleted"]
    assert not due(state, at(500))
    state, events = run([approve("eu", 501)], state)
    assert events == []
    state, events = run([control("resume", 502)], state)
    assert types(events) == ["FleetRolloutResumed", "FleetRolloutStageStarted", "ClusterSetPatchRequested",
                             "ClusterSetPatchRequested"]  # fmt: skip


# ---------------------------------------------------------------- properties
def _pool() -> list[Envelope]:
    """Every kind of input a rollout sees, at assorted times, including strays and repeats of a kind."""
    names = sorted(n for n in CATALOG if n.startswith("ms-"))
    pool: list[Envelope] = []
    for i, name in enumerate(names):
        pool += [converged(name, 10 + 40 * i), update_failed(name, 30 + 40 * i)]
    pool += [approve("eu", 5), approve("eu", 400), approve("rest", 50), approve("ghost", 60)]
    pool += [control(a, t) for a, t in (("pause", 20), ("resume", 25), ("abort", 600), ("pause", 300),
                                        ("resume", 320))]  # fmt: skip
    pool += [tick(t) for t in (70, 100, 200, 400, 800)]
    pool += [converged("ms-dev-use1", 15, rid="other-rollout")]
    return pool


POOL = _pool()
histories = st.lists(st.integers(min_value=0, max_value=len(POOL) - 1), max_size=30).map(
    lambda idx: [request(), *(POOL[i] for i in idx)]
)
budgets = st.integers(min_value=0, max_value=3)
in_flight = st.integers(min_value=1, max_value=3)


def _requested(history: list[Envelope], budget: int, max_in_flight: int) -> list[Envelope]:
    stages = [*STAGES[:2], FleetStage(name="rest", approval=True, soak_seconds=10)]
    return [request(failure_budget=budget, max_in_flight=max_in_flight, stages=stages), *history[1:]]


@settings(max_examples=150, deadline=None)
@given(history=histories, budget=budgets, max_in_flight=in_flight)
def test_the_same_event_twice_is_the_same_as_once(history: list[Envelope], budget: int, max_in_flight: int) -> None:
    state: FleetState | None = None
    for env in _requested(history, budget, max_in_flight):
        state, _ = handle(state, env, CATALOG)
        again, emitted = handle(state, env, CATALOG)
        assert again == state and emitted == []


@settings(max_examples=150, deadline=None)
@given(history=histories, budget=budgets, max_in_flight=in_flight)
def test_replay_from_scratch_gives_the_same_state_and_events(history: list[Envelope], budget: int,
                                                             max_in_flight: int) -> None:  # fmt: skip
    inputs = _requested(history, budget, max_in_flight)
    first, events = run(inputs)
    assert run(inputs) == (first, events)
    assert first is not None and FleetState.model_validate_json(first.model_dump_json()) == first
    # What every run promises whatever arrives: each set patched and finished at most once, never more
    # than max_in_flight at once, stages in order, and nothing started once halted, aborted or paused.
    assert len({e.id for e in events}) == len(events)
    assert all(n == 1 for n in Counter(patched(events)).values())
    finished = [e.data["clusterset"] for e in events if e.type == "FleetRolloutSetFinished"]
    assert len(finished) == len(set(finished))
    started_stages = [e.data["stage"] for e in events if e.type == "FleetRolloutStageStarted"]
    assert started_stages == [s.name for s in STAGES][: len(started_stages)]
    state: FleetState | None = None
    stopped = False
    for env in inputs:
        state, emitted = handle(state, env, CATALOG)
        assert state is not None and len(state.with_status("in_flight")) <= max_in_flight
        for e in emitted:
            assert not (stopped and e.type in ("ClusterSetPatchRequested", "FleetRolloutStageStarted"))
            if e.type in ("FleetRolloutHalted", "FleetRolloutAborted"):
                stopped = True
        if state.status == "paused":
            assert not any(e.type == "ClusterSetPatchRequested" for e in emitted)
