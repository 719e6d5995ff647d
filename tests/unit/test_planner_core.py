"""The planner's pure core: validation, membership, scale up/down, deletion, idempotency."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from services.planner.core import PlannerState, cluster_id_for, evolve, handle, retirement_order
from shared.events import (
    ClusterDeprovisioned,
    ClusterProtectionChanged,
    ClusterProvisioningFailed,
    ClusterReady,
    ClusterSetApplied,
    ClusterSetDeleted,
    Envelope,
    new_event,
)  # fmt: skip
from tests.conftest import example_documents

MODELSERVING = example_documents()["modelserving-prod-aws-us-east-1"]


def applied(doc: dict) -> Envelope:
    return new_event(ClusterSetApplied(document=doc), source="test")


def with_count(n: int, doc: dict = MODELSERVING) -> dict:
    d = copy.deepcopy(doc)
    d["spec"]["count"] = n
    return d


def run(events: list[Envelope], state: PlannerState | None = None) -> tuple[PlannerState | None, list[Envelope]]:
    out: list[Envelope] = []
    for e in events:
        state, emitted = handle(state, e)
        out.extend(emitted)
    return state, out


def types(events: list[Envelope]) -> list[str]:
    return [e.type for e in events]


def ready(state: PlannerState, cluster_id: str) -> Envelope:
    m = state.members[cluster_id]
    assert state.location
    return new_event(ClusterReady(cluster_id=m.cluster_id, clusterset=state.name, location=state.location,
                                  cluster_type="ModelServing", config_hash=m.config_hash, endpoint="https://x",
                                  infra_services=[]), source="test")  # fmt: skip


def test_every_example_is_accepted_with_its_count_of_requests():
    for name, doc in example_documents().items():
        state, events = run([applied(doc)])
        assert types(events) == ["ClusterSetAccepted"] + ["ClusterRequested"] * doc["spec"]["count"], name
        assert state and state.generation == 1 and len(state.alive()) == doc["spec"]["count"]


def test_cluster_ids_are_stable_unique_and_named_after_the_set():
    ids = {cluster_id_for("modelserving-prod-aws-us-east-1", s) for s in range(65536)}
    assert len(ids) == 65536
    assert cluster_id_for("modelserving-prod-aws-us-east-1", 0) == "modelserving-prod-aws-us-east-1-7f3a"
    assert cluster_id_for("x", 70000) != cluster_id_for("x", 70001)


def test_bad_input_is_rejected_naming_every_field_and_changes_nothing():
    bad = with_count(-1)
    bad["metadata"]["location"]["cloud"] = "ibm"
    bad["spec"]["features"] = ["teleport"]
    bad["spec"]["nodePools"][0]["minCount"] = "three"
    state, events = run([applied(bad)])
    assert state is None
    assert types(events) == ["ClusterSetRejected"]
    fields = {e["field"] for e in events[0].data["errors"]}
    assert {"spec.count", "metadata.location.cloud", "spec.features[0]", "spec.nodePools[0].minCount"} <= fields


def test_non_mapping_documents_are_rejected():
    base = applied(MODELSERVING)
    for data in ({"document": None}, {"document": "text"}, {"document": [1, 2]}, {}, {"doc": {}}):
        _, events = run([base.model_copy(update={"data": data})])
        assert types(events) == ["ClusterSetRejected"]
        assert events[0].data["errors"][0]["field"] == "(document)"


def test_location_cannot_change_for_an_existing_set():
    moved = copy.deepcopy(MODELSERVING)
    moved["metadata"]["location"]["region"] = "us-west-2"
    state, events = run([applied(MODELSERVING), applied(moved)])
    assert types(events)[-1] == "ClusterSetRejected"
    assert events[-1].data["errors"][0]["field"] == "metadata.location"
    assert state and state.location and state.location.region == "us-east-1"


def test_reapplying_the_same_document_keeps_the_generation_and_requests_nothing():
    state, events = run([applied(MODELSERVING), applied(MODELSERVING)])
    assert types(events).count("ClusterRequested") == 5
    assert events[-1].type == "ClusterSetAccepted" and events[-1].data["generation"] == 1


def test_scale_up_then_down_retires_not_ready_then_newest_first():
    state, events = run([applied(MODELSERVING)])
    assert state
    first_ids = [e.data["cluster_id"] for e in events if e.type == "ClusterRequested"]
    # Three of the five are READY; two are still provisioning.
    state, _ = run([ready(state, cid) for cid in first_ids[:3]], state)
    state, events = run([applied(with_count(7))], state)
    new_ids = [e.data["cluster_id"] for e in events if e.type == "ClusterRequested"]
    assert len(new_ids) == 2 and state and state.generation == 2
    state, events = run([applied(with_count(3))], state)
    retired = [e.data["cluster_id"] for e in events if e.type == "ClusterRetirementRequested"]
    # The four not-READY clusters go first, newest first; the READY ones stay.
    assert retired == [new_ids[1], new_ids[0], first_ids[4], first_ids[3]]
    assert state and sorted(m.cluster_id for m in state.alive()) == sorted(first_ids[:3])


def test_failed_clusters_are_retired_before_healthy_ones():
    state, events = run([applied(with_count(3))])
    assert state and state.location
    ids = [e.data["cluster_id"] for e in events if e.type == "ClusterRequested"]
    facts = [ready(state, ids[0]), ready(state, ids[2]), new_event(ClusterProvisioningFailed(
        cluster_id=ids[1], clusterset=state.name, location=state.location, operation="provision", step="cluster",
        code="QuotaExceeded", message="no", retryable=False), source="t")]  # fmt: skip
    state, _ = run(facts, state)
    assert state and [m.cluster_id for m in retirement_order(state)][0] == ids[1]


def test_delete_retires_every_cluster_and_reapply_starts_fresh_ids():
    state, events = run([applied(MODELSERVING)])
    ids = {e.data["cluster_id"] for e in events if e.type == "ClusterRequested"}
    state, events = run([new_event(ClusterSetDeleted(name=MODELSERVING["metadata"]["name"]), source="t")], state)
    assert types(events) == ["ClusterSetRetired"] + ["ClusterRetirementRequested"] * 5
    assert {e.data["cluster_id"] for e in events[1:]} == ids
    assert state and state.deleted and not state.alive()
    # Deleting again does nothing; re-applying requests new clusters with new ids.
    state, again = run([new_event(ClusterSetDeleted(name=state.name), source="t")], state)
    assert again == []
    state, events = run([applied(MODELSERVING)], state)
    new_ids = {e.data["cluster_id"] for e in events if e.type == "ClusterRequested"}
    assert len(new_ids) == 5 and not (new_ids & ids)


def test_deprovisioned_members_leave_the_state():
    state, events = run([applied(with_count(1))])
    assert state and state.location
    cid = events[1].data["cluster_id"]
    state, _ = run([new_event(ClusterSetDeleted(name=state.name), source="t")], state)
    assert state
    state, _ = run([new_event(ClusterDeprovisioned(cluster_id=cid, clusterset=state.name,
                                                   location=state.location), source="t")], state)  # fmt: skip
    assert state and state.members == {}


def test_facts_for_unknown_sets_or_clusters_are_ignored():
    state, _ = run([applied(with_count(1))])
    assert state
    stray = ready(state, next(iter(state.members))).model_copy(update={"data": {
        **ready(state, next(iter(state.members))).data, "cluster_id": "nope"}})
    assert evolve(state, stray) == state
    assert evolve(None, stray) is None


# ---------------------------------------------------------------- properties
counts = st.lists(st.integers(min_value=0, max_value=8), min_size=1, max_size=6)


def history_for(count_list: list[int], delete_at: int | None) -> list[Envelope]:
    events = [applied(with_count(n)) for n in count_list]
    if delete_at is not None:
        events.insert(min(delete_at, len(events)), new_event(ClusterSetDeleted(name=MODELSERVING["metadata"]["name"]),
                                                             source="t"))  # fmt: skip
    return events


@settings(max_examples=60, deadline=None)
@given(counts, st.one_of(st.none(), st.integers(min_value=0, max_value=6)))
def test_alive_membership_always_matches_the_last_count(count_list, delete_at):
    state, _ = run(history_for(count_list, delete_at))
    assert state is not None
    expected = 0 if (state.deleted) else count_list[-1]
    assert len(state.alive()) == expected


@settings(max_examples=60, deadline=None)
@given(counts, st.one_of(st.none(), st.integers(min_value=0, max_value=6)))
def test_handling_an_event_twice_equals_once(count_list, delete_at):
    history = history_for(count_list, delete_at)
    once, emitted_once = run(history)
    doubled: list[Envelope] = []
    for e in history:
        doubled += [e, e]
    twice, emitted_twice = run(doubled)
    # A repeated apply may answer Accepted again, but never requests or retires anything more.
    assert twice == once
    changes = lambda evs: [(e.type, e.data.get("cluster_id")) for e in evs if e.type != "ClusterSetAccepted"]  # noqa
    assert changes(emitted_twice) == changes(emitted_once)


@settings(max_examples=60, deadline=None)
@given(counts, st.one_of(st.none(), st.integers(min_value=0, max_value=6)))
def test_replaying_the_full_history_rebuilds_the_same_state(count_list, delete_at):
    """A fresh replica folding the stream (inputs and what was emitted, in order) gets the live state."""
    live: PlannerState | None = None
    stream: list[Envelope] = []
    for e in history_for(count_list, delete_at):
        live, emitted = handle(live, e)
        stream += [e, *emitted]
    replayed: PlannerState | None = None
    for e in stream:
        replayed = evolve(replayed, e)
    assert replayed == live


# ---------------------------------------------------------------- deletion protection
def protected(doc: dict, on: bool = True) -> dict:
    d = copy.deepcopy(doc)
    d["metadata"]["protected"] = on
    return d


def protect(state: PlannerState, cluster_id: str, on: bool = True) -> Envelope:
    return new_event(ClusterProtectionChanged(clusterset=state.name, cluster_id=cluster_id, protected=on), source="t")


def test_a_protected_set_refuses_scale_down_and_delete_until_the_mark_is_removed():
    state, _ = run([applied(protected(MODELSERVING))])
    assert state and state.protected
    state, events = run([applied(protected(with_count(2)))], state)
    assert types(events) == ["ClusterSetRejected"]
    error = events[0].data["errors"][0]
    assert error["field"] == "spec.count" and "protected" in error["message"]
    assert state and state.count == 5 and len(state.alive()) == 5  # nothing half-done
    state, events = run([new_event(ClusterSetDeleted(name=state.name), source="t")], state)
    assert types(events) == ["ClusterSetRejected"] and events[0].data["errors"][0]["field"] == "metadata.protected"
    assert state and not state.deleted
    # Scaling up stays allowed; removing the mark allows the delete.
    state, events = run([applied(protected(with_count(6)))], state)
    assert types(events) == ["ClusterSetAccepted", "ClusterRequested"]
    state, _ = run([applied(protected(with_count(6), on=False))], state)
    state, events = run([new_event(ClusterSetDeleted(name=MODELSERVING["metadata"]["name"]), source="t")], state)
    assert types(events) == ["ClusterSetRetired"] + ["ClusterRetirementRequested"] * 6


def test_a_protected_cluster_is_skipped_by_scale_down_and_blocks_delete():
    state, events = run([applied(with_count(3))])
    assert state
    ids = [e.data["cluster_id"] for e in events if e.type == "ClusterRequested"]
    state, events = run([protect(state, ids[2])], state)  # the newest: it would be retired first
    assert types(events) == ["ClusterProtectionUpdated"] and state and state.members[ids[2]].protected
    state, events = run([applied(with_count(2))], state)
    assert [e.data["cluster_id"] for e in events if e.type == "ClusterRetirementRequested"] == [ids[1]]
    # Only the protected one and one other remain: going to 0 would retire a protected cluster.
    state, events = run([applied(with_count(0))], state)
    assert types(events) == ["ClusterSetRejected"] and ids[2] in events[0].data["errors"][0]["message"]
    state, events = run([new_event(ClusterSetDeleted(name=MODELSERVING["metadata"]["name"]), source="t")], state)
    assert types(events) == ["ClusterSetRejected"] and events[0].data["errors"][0]["field"] == "clusters"
    # Unprotect: delete goes through. Protecting an unknown cluster is rejected.
    assert state
    state, events = run([protect(state, ids[2], on=False)], state)
    assert types(events) == ["ClusterProtectionUpdated"]
    state, events = run([protect(state, "nope-0000")], state)  # type: ignore[arg-type]
    assert types(events) == ["ClusterSetRejected"] and events[0].data["errors"][0]["field"] == "clusterId"
    state, events = run([new_event(ClusterSetDeleted(name=MODELSERVING["metadata"]["name"]), source="t")], state)
    assert types(events)[0] == "ClusterSetRetired"
