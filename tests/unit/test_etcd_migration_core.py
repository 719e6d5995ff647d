"""etcd_migration's pure parts: the migration/upgrade journal, the pipeline, and the planner's triggers."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.etcd_migration import core, pipeline
from services.etcd_migration.core import Finish, Step
from services.planner.core import PlannerState, handle
from shared.events import Envelope, new_event
from shared.events.clusterset import Location
from shared.events.models import (
    ClusterReady,
    ControlPlaneChangeRequested,
    ControlPlaneMigrationCompleted,
    ControlPlaneMigrationFailed,
    ControlPlaneMigrationRequested,
    ControlPlaneMigrationRolledBack,
    ControlPlaneMigrationStepCompleted,
    ControlPlanePipelineCompleted,
    ControlPlanePipelineHalted,
    ControlPlanePipelineRequested,
    ControlPlaneUpgradeFailed,
    ControlPlaneUpgradeRequested,
    ControlPlaneUpgradeStepCompleted,
    PipelineCluster,
)
from tests.conftest import example_documents
from tests.unit.test_planner_core import applied, run, types

LOC = Location(env="prod", cloud="aws", region="eu-west-1")
IDS = {"cluster_id": "core-1", "clusterset": "core", "location": LOC, "operation_id": "op1"}


def ev(payload) -> Envelope:
    return new_event(payload, source="t")


def fold(events: list[Envelope], state: core.CPState | None = None) -> core.CPState | None:
    for e in events:
        state = core.evolve(state, e)
    return state


def migrate_done(step: str, phase: int, rollback: bool = False) -> Envelope:
    return ev(ControlPlaneMigrationStepCompleted(**IDS, phase=phase, step=step, rollback=rollback))


# ---------------------------------------------------------------- migration journal
def test_a_migration_walks_the_three_phases_in_order_then_finishes():
    state = fold([ev(ControlPlaneMigrationRequested(**IDS))])
    seen = []
    for _ in range(len(core.MIGRATION_STEPS)):
        action = core.next_action(state)
        assert isinstance(action, Step) and not action.rollback
        seen.append((action.phase, action.step))
        state = fold([migrate_done(action.step, action.phase)], state)
    assert tuple(seen) == core.MIGRATION_STEPS
    assert core.next_action(state) == Finish(outcome="completed")


@pytest.mark.parametrize("failing", [s for _, s in core.MIGRATION_STEPS])
def test_a_failure_before_phase_three_rolls_back_and_one_in_phase_three_stops(failing: str):
    events = [ev(ControlPlaneMigrationRequested(**IDS))]
    for phase, step in core.MIGRATION_STEPS:
        if step == failing:
            break
        events.append(migrate_done(step, phase))
    allowed = core.rollback_allowed(failing)
    events.append(ev(ControlPlaneMigrationFailed(**IDS, step=failing, reason="x", rolling_back=allowed)))
    state = fold(events)
    assert state is not None and state.op is not None
    if not allowed:
        assert state.op.status == "failed" and core.next_action(state) is None
        return
    rolled = []
    while isinstance(action := core.next_action(state), Step):
        assert action.rollback
        rolled.append(action.step)
        state = fold([migrate_done(action.step, action.phase, rollback=True)], state)
    expected = () if failing == "precheck" else core.ROLLBACK_STEPS  # a failed precheck touched nothing
    assert tuple(rolled) == expected and action == Finish(outcome="rolled-back")


@pytest.mark.parametrize("failing", [s for p, s in core.MIGRATION_STEPS if p == 3])
def test_a_migration_stopped_in_phase_three_resumes_at_the_failed_step_when_asked_again(failing: str):
    events = [ev(ControlPlaneMigrationRequested(**IDS))]
    for phase, step in core.MIGRATION_STEPS:
        if step == failing:
            break
        events.append(migrate_done(step, phase))
    events.append(ev(ControlPlaneMigrationFailed(**IDS, step=failing, reason="x", rolling_back=False)))
    stopped = fold(events)
    assert stopped is not None and stopped.op is not None and stopped.op.status == "failed"
    assert core.next_action(stopped) is None  # stopped: waits for an operator

    again = fold([ev(ControlPlaneMigrationRequested(**{**IDS, "operation_id": "op2"}))], stopped)
    assert again is not None and again.op is not None
    assert again.op.operation_id == "op2" and again.op.resumes == "op1" and again.op.driver_operation_id == "op1"
    assert core.next_action(again) == Step(kind="migrate", step=failing, phase=3)
    # A resume of the resume still names the first operation's nodes.
    failed2 = ev(ControlPlaneMigrationFailed(**{**IDS, "operation_id": "op2"}, step=failing, reason="y",
                                             rolling_back=False))  # fmt: skip
    third = fold([failed2, ev(ControlPlaneMigrationRequested(**{**IDS, "operation_id": "op3"}))], again)
    assert third is not None and third.op is not None and third.op.driver_operation_id == "op1"


def test_a_rolled_back_migration_asked_again_starts_afresh():
    events = [ev(ControlPlaneMigrationRequested(**IDS)), migrate_done("precheck", 0),
              ev(ControlPlaneMigrationFailed(**IDS, step="stop-mutations", reason="x", rolling_back=True))]
    events += [migrate_done(step, 1, rollback=True) for step in core.ROLLBACK_STEPS]
    events.append(ev(ControlPlaneMigrationRolledBack(**IDS, from_step="stop-mutations")))
    again = fold([ev(ControlPlaneMigrationRequested(**{**IDS, "operation_id": "op2"}))], fold(events))
    assert again is not None and again.op is not None and again.op.resumes is None and again.op.done == []
    assert core.next_action(again) == Step(kind="migrate", step="precheck", phase=0)


def test_a_migration_of_a_cluster_that_is_ha_already_completes_after_its_precheck():
    state = fold([ev(ControlPlaneMigrationRequested(**IDS)),
                  ev(ControlPlaneMigrationStepCompleted(**IDS, phase=0, step="precheck",
                                                        detail={"already_ha": True}))])  # fmt: skip
    assert core.next_action(state) == Finish(outcome="completed")


def test_one_operation_per_cluster_and_duplicates_change_nothing():
    first = ev(ControlPlaneMigrationRequested(**IDS))
    state = fold([first, migrate_done("precheck", 0)])
    again = fold([first, migrate_done("precheck", 0)], state)
    assert again is not None and state is not None and again.op == state.op
    other = ev(ControlPlaneUpgradeRequested(**{**IDS, "operation_id": "op2"}, to_version="1.31"))
    assert fold([other], state).op.operation_id == "op1"  # type: ignore[union-attr]


def test_the_chain_acts_on_its_own_continuation_but_not_on_a_stale_duplicate():
    req = ev(ControlPlaneMigrationRequested(**IDS))
    s1 = core.evolve(None, req)
    assert core.should_act(None, s1, req)
    done = migrate_done("precheck", 0)
    s2 = core.evolve(s1, done)
    assert core.should_act(s1, s2, done)  # news
    assert core.should_act(s2, core.evolve(s2, done), done)  # the awaited continuation (redelivered)
    assert not core.should_act(s2, core.evolve(s2, req), req)  # an old request again: nothing


@settings(max_examples=50, deadline=None)
@given(st.integers(0, len(core.MIGRATION_STEPS)), st.booleans())
def test_folding_twice_equals_once(upto: int, fail: bool):
    events = [ev(ControlPlaneMigrationRequested(**IDS))]
    events += [migrate_done(s, p) for p, s in core.MIGRATION_STEPS[:upto]]
    if fail and upto < len(core.MIGRATION_STEPS):
        step = core.MIGRATION_STEPS[upto][1]
        events.append(ev(ControlPlaneMigrationFailed(**IDS, step=step, reason="x",
                                                     rolling_back=core.rollback_allowed(step))))  # fmt: skip
    doubled = [e for e in events for _ in (0, 1)]
    assert (fold(doubled) or core.CPState(**{k: IDS[k] for k in ("cluster_id", "clusterset", "location")})).op == \
        (fold(events) or core.CPState(**{k: IDS[k] for k in ("cluster_id", "clusterset", "location")})).op


# ---------------------------------------------------------------- upgrade journal
def upgrade_done(node: str, step: str, **detail) -> Envelope:
    return ev(ControlPlaneUpgradeStepCompleted(**IDS, node=node, step=step, detail=detail))


def test_an_upgrade_goes_node_by_node_and_a_failed_validation_rolls_that_node_back():
    state = fold([ev(ControlPlaneUpgradeRequested(**IDS, to_version="1.31")),
                  upgrade_done("cluster", "precheck", order=["b", "c", "a"], versions={"a": "1.30", "b": "1.30",
                                                                                       "c": "1.30"})])  # fmt: skip
    steps = []
    while isinstance(action := core.next_action(state), Step) and (action.node, action.step) != ("c", "validate"):
        steps.append(f"{action.node}:{action.step}")
        state = fold([upgrade_done(action.node or "", action.step)], state)
    assert steps[:4] == ["b:precheck", "b:snapshot", "b:replace", "b:validate"] and steps[4:] == [
        "c:precheck", "c:snapshot", "c:replace"]
    failed = ev(ControlPlaneUpgradeFailed(**IDS, node="c", reason="validation failed"))
    # Folded where it is emitted, and again when it comes back through the stream: one rollback either way.
    state = fold([failed, failed], state)
    action = core.next_action(state)
    assert action == Step(kind="upgrade", step="rollback-node", node="c", rollback=True)
    state = fold([ev(ControlPlaneUpgradeStepCompleted(**IDS, node="c", step="rollback-node", rollback=True))], state)
    assert core.next_action(state) == Finish(outcome="failed")
    state = fold([ev(ControlPlaneUpgradeFailed(**IDS, node="c", reason="validation failed", rolled_back=True))], state)
    assert state is not None and state.op is not None and state.op.status == "failed"
    assert core.next_action(state) is None, "halted: node a is never touched"


# ---------------------------------------------------------------- pipeline
def clusters(n: int) -> list[PipelineCluster]:
    return [PipelineCluster(cluster_id=f"c{i}", clusterset="core", location=LOC) for i in range(n)]


def pipe_request(n: int, concurrency: int, budget: int) -> Envelope:
    return ev(ControlPlanePipelineRequested(clusterset="core", location=LOC, pipeline_id="p1", operation="migrate",
                                            clusters=clusters(n), concurrency=concurrency, failure_budget=budget))


def outcome(cluster_id: str, ok: bool) -> Envelope:
    ids = {"cluster_id": cluster_id, "clusterset": "core", "location": LOC,
           "operation_id": pipeline.operation_id("p1", cluster_id), "pipeline_id": "p1"}
    if ok:
        return ev(ControlPlaneMigrationCompleted(**ids))
    return ev(ControlPlaneMigrationFailed(**ids, step="open-load-balancers", reason="x", rolling_back=False))


def requested(events: list[Envelope]) -> list[str]:
    return [e.data["cluster_id"] for e in events if e.type == "ControlPlaneMigrationRequested"]


def test_a_pipeline_keeps_its_concurrency_and_completes():
    state, out = pipeline.handle(None, pipe_request(5, 2, 0))
    assert requested(out) == ["c0", "c1"]
    state, out = pipeline.handle(state, outcome("c0", True))
    assert requested(out) == ["c2"]
    for cid in ["c1", "c2", "c3"]:
        state, out = pipeline.handle(state, outcome(cid, True))
    state, out = pipeline.handle(state, outcome("c4", True))
    assert types(out) == ["ControlPlanePipelineCompleted"] and out[0].data["succeeded"] == [f"c{i}" for i in range(5)]


def test_a_pipeline_halts_past_its_failure_budget_and_lets_in_flight_finish():
    state, out = pipeline.handle(None, pipe_request(6, 2, 0))
    state, out = pipeline.handle(state, outcome("c0", False))
    assert types(out)[0] == "ControlPlanePipelineHalted" and requested(out) == []
    state, out = pipeline.handle(state, outcome("c1", True))
    assert types(out) == ["ControlPlanePipelineCompleted"]
    assert out[0].data == {**out[0].data, "succeeded": ["c1"], "failed": ["c0"]}
    assert pipeline.handle(state, outcome("c1", True))[1] == []


def test_an_intermediate_failure_is_not_an_outcome():
    state, _ = pipeline.handle(None, pipe_request(2, 1, 0))
    ids = {"cluster_id": "c0", "clusterset": "core", "location": LOC,
           "operation_id": pipeline.operation_id("p1", "c0"), "pipeline_id": "p1"}
    _, out = pipeline.handle(state, ev(ControlPlaneMigrationFailed(**ids, step="stop-node", reason="x",
                                                                   rolling_back=True)))  # fmt: skip
    assert out == []


# ---------------------------------------------------------------- planner triggers
CORE = example_documents()["core-prod-aws-eu-west-1"]


def ready_core() -> PlannerState:
    state, _ = run([applied(CORE)])
    assert state is not None and state.location
    for m in list(state.members.values()):
        state, _ = handle(state, ev(ClusterReady(cluster_id=m.cluster_id, clusterset=state.name,
                                                 location=state.location, cluster_type="Core",
                                                 config_hash=m.config_hash, endpoint="e", infra_services=[])))
    assert state is not None
    return state


def with_cp(doc: dict, **cp) -> dict:
    d = copy.deepcopy(doc)
    d["spec"]["controlPlane"] = {**d["spec"]["controlPlane"], **cp}
    return d


def test_ha_on_a_self_managed_set_starts_a_migration_pipeline_over_its_clusters():
    state = ready_core()
    state, out = handle(state, applied(with_cp(CORE, ha=True)))
    assert types(out) == ["ClusterSetAccepted", "ControlPlanePipelineRequested"]
    pipe = out[1].data
    assert pipe["operation"] == "migrate" and len(pipe["clusters"]) == 2 and pipe["config_hash"]
    assert state is not None and state.pipeline_id == pipe["pipeline_id"]
    # While it runs, other spec changes are refused, naming the pipeline.
    _, refused = handle(state, applied(with_cp(CORE, ha=True) | {"spec": {**CORE["spec"], "tags": {"a": "b"},
                                                                            "controlPlane": {"mode": "self-managed",
                                                                                             "ha": True}}}))
    assert types(refused) == ["ClusterSetRejected"] and pipe["pipeline_id"] in str(refused[0].data)


def test_a_version_change_on_a_self_managed_set_is_an_upgrade_and_mixed_changes_are_refused():
    state = ready_core()
    doc = copy.deepcopy(CORE)
    doc["spec"]["kubernetesVersion"] = "1.30"
    _, out = handle(state, applied(doc))
    assert types(out) == ["ClusterSetAccepted", "ControlPlanePipelineRequested"]
    assert out[1].data["operation"] == "upgrade" and out[1].data["to_version"] == "1.30"
    doc["spec"]["tags"] = {"team": "core"}
    _, out = handle(state, applied(doc))
    assert types(out) == ["ClusterSetRejected"] and out[0].data["errors"][0]["field"] == "spec.tags"


def test_going_back_from_ha_is_refused():
    state, _ = run([applied(with_cp(CORE, ha=True))])
    _, out = handle(state, applied(with_cp(CORE, ha=False)))
    assert types(out) == ["ClusterSetRejected"] and out[0].data["errors"][0]["field"] == "spec.controlPlane.ha"


def test_a_completed_migration_brings_the_cluster_to_the_new_config_and_the_set_converges():
    state = ready_core()
    state, out = handle(state, applied(with_cp(CORE, ha=True)))
    assert state is not None and state.location
    pipe = out[1].data
    converged = []
    for c in pipe["clusters"]:
        done = ControlPlaneMigrationCompleted(cluster_id=c["cluster_id"], clusterset=state.name,
                                              location=state.location, operation_id="o",
                                              pipeline_id=pipe["pipeline_id"], config_hash=pipe["config_hash"])
        state, emitted = handle(state, ev(done))
        converged += emitted
    assert state is not None and state.location
    finished = ControlPlanePipelineCompleted(clusterset=state.name, location=state.location,
                                             pipeline_id=pipe["pipeline_id"], succeeded=[], failed=[])
    state, out = handle(state, ev(finished))
    assert "ClusterSetConverged" in types(converged + out)
    assert state is not None and state.pipeline_id is None


@pytest.mark.parametrize("ending", ["halted", "completed-with-failures"])
def test_a_spec_pipeline_that_ends_with_failed_clusters_reports_the_set_update_failed_once(ending: str):
    state = ready_core()
    state, out = handle(state, applied(with_cp(CORE, ha=True)))
    assert state is not None and state.location
    pipe = out[1].data
    first, second = (c["cluster_id"] for c in pipe["clusters"])
    done = ControlPlaneMigrationCompleted(cluster_id=first, clusterset=state.name, location=state.location,
                                          operation_id="o", pipeline_id=pipe["pipeline_id"],
                                          config_hash=pipe["config_hash"])  # fmt: skip
    state, _ = handle(state, ev(done))
    assert state is not None and state.location
    ids = {"clusterset": state.name, "location": state.location, "pipeline_id": pipe["pipeline_id"]}
    end = (ControlPlanePipelineHalted(**ids, reason="1 failed, more than the budget of 0", failed=[second])
           if ending == "halted" else ControlPlanePipelineCompleted(**ids, succeeded=[first], failed=[second]))
    after, out = handle(state, ev(end))
    assert types(out) == ["ClusterSetUpdateFailed"]
    assert out[0].data["cluster_ids"] == [second] and pipe["pipeline_id"] in out[0].data["reason"]
    assert after is not None and after.pipeline_id is None
    _, again = handle(after, ev(end))  # a redelivery says nothing new
    assert again == []


def test_after_a_halted_ha_pipeline_the_cli_finishes_the_clusters_left_and_the_set_converges():
    state = ready_core()
    state, out = handle(state, applied(with_cp(CORE, ha=True)))
    assert state is not None and state.location
    pipe = out[1].data
    first, second = (c["cluster_id"] for c in pipe["clusters"])
    ids = {"clusterset": state.name, "location": state.location}
    done = ControlPlaneMigrationCompleted(cluster_id=first, **ids, operation_id="o1", pipeline_id=pipe["pipeline_id"],
                                          config_hash=pipe["config_hash"])  # fmt: skip
    state, _ = handle(state, ev(done))
    assert state is not None
    state, out = handle(state, ev(ControlPlanePipelineHalted(**ids, pipeline_id=pipe["pipeline_id"], reason="x",
                                                             failed=[second])))  # fmt: skip
    assert types(out) == ["ClusterSetUpdateFailed"]
    # A migration of the migrated one alone is refused (nothing to do); the one left is taken, to the set's config.
    _, refused = handle(state, ev(ControlPlaneChangeRequested(clusterset=state.name, operation="migrate",
                                                              cluster_ids=[first])))  # fmt: skip
    assert types(refused) == ["ClusterSetRejected"]
    state, out = handle(state, ev(ControlPlaneChangeRequested(clusterset=state.name, operation="migrate")))
    assert types(out) == ["ControlPlanePipelineRequested"] and out[0].data["config_hash"] == pipe["config_hash"]
    assert state is not None
    retry = out[0].data
    done = ControlPlaneMigrationCompleted(cluster_id=second, **ids, operation_id="o2", pipeline_id=retry["pipeline_id"],
                                          config_hash=retry["config_hash"])  # fmt: skip
    state, converged = handle(state, ev(done))
    state, out = handle(state, ev(ControlPlanePipelineCompleted(**ids, pipeline_id=retry["pipeline_id"],
                                                                succeeded=[first, second], failed=[])))  # fmt: skip
    assert "ClusterSetConverged" in types(converged + out)


def test_a_cli_pipeline_on_a_converged_set_that_fails_changes_no_set_outcome():
    state = ready_core()
    assert state is not None and state.location
    one = next(iter(state.members))
    state, out = handle(state, ev(ControlPlaneChangeRequested(clusterset=state.name, operation="migrate",
                                                              cluster_ids=[one])))  # fmt: skip
    assert state is not None and state.location
    halted = ControlPlanePipelineHalted(clusterset=state.name, location=state.location,
                                        pipeline_id=out[0].data["pipeline_id"], reason="x", failed=[one])
    _, out = handle(state, ev(halted))
    assert "ClusterSetUpdateFailed" not in types(out)


def test_the_cli_request_is_checked_and_becomes_a_pipeline_of_the_chosen_clusters():
    state = ready_core()
    one = next(iter(state.members))
    _, out = handle(state, ev(ControlPlaneChangeRequested(clusterset=state.name, operation="migrate",
                                                          cluster_ids=[one])))
    assert types(out) == ["ControlPlanePipelineRequested"]
    assert [c["cluster_id"] for c in out[0].data["clusters"]] == [one]
    _, out = handle(state, ev(ControlPlaneChangeRequested(clusterset=state.name, operation="upgrade",
                                                          cluster_ids=["nope"])))
    assert types(out) == ["ClusterSetRejected"]
    assert {e["field"] for e in out[0].data["errors"]} == {"toVersion", "clusterIds"}
