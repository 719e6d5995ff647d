"""The infra_installer's pure core (and its handler over an in-memory target): order, guards, properties."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.infra_installer import core
from services.infra_installer.app import Installer, drained_envelope, reconcile_reason
from services.infra_installer.core import AnswerDrains, DrainPass, EmitReady, Fail, Install, InstallerState
from services.infra_installer.targets.base import ClusterRef, DrainReport, HealthTimeout, InstallError, KubernetesTarget
from shared.catalog import CATALOG, install_order
from shared.events import Envelope, decode_payload, derive_id, new_event
from shared.events.clusterset import ClusterSpec, InfraServiceRef
from shared.events.models import (
    ClusterDrained,
    ClusterDrainRequested,
    ClusterInfraFailed,
    ClusterProvisioned,
    ClusterReady,
    ClusterRequested,
    ClusterResourcesUpdated,
    ClusterUncordoned,
    ClusterUncordonRequested,
    ClusterUpdateRequested,
    Event,
    InfraReconcileRequested,
    InfraServiceInstalled,
)
from tests.helpers import EXAMPLES, cluster_provisioned, cluster_requested, retirement_requested


def cluster_events(name: str, spec: ClusterSpec | None = None, generation: int = 1
                   ) -> tuple[ClusterRequested, ClusterProvisioned]:  # fmt: skip
    requested = cluster_requested(name, spec=spec, generation=generation)
    return requested, cluster_provisioned(requested)


def drive(inputs: Sequence[Event], state: InstallerState | None = None) -> tuple[InstallerState | None, list[Event]]:
    """Run the decider loop the way the service does: one action per handled message, own events fed back."""
    queue: deque[Event] = deque(inputs)
    emitted: list[Event] = []
    while queue:
        state = core.evolve(state, queue.popleft())
        action = core.next_action(state)
        if state is None:
            continue
        out: Event | None = None
        if isinstance(action, Install):
            out = core.installed_event(state, action.service)
        elif isinstance(action, core.Remove):
            out = core.removed_event(state, action)
        elif isinstance(action, EmitReady):
            out = core.ready_event(state, action)
        elif isinstance(action, Fail):
            out = core.failed_event(state, action.service, action.reason, action.retryable)
        if out is not None:
            state = core.evolve(state, out)
            emitted.append(out)
            queue.append(out)
    return state, emitted


def installs(emitted: Sequence[Event]) -> list[tuple[str, str]]:
    return [(e.service, e.version) for e in emitted if isinstance(e, InfraServiceInstalled)]


# ---------------------------------------------------------------- dependency order per example
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_installs_in_dependency_order_then_ready(name: str) -> None:
    requested, provisioned = cluster_events(name)
    names = requested.spec.infra_service_names()
    state, emitted = drive([requested, provisioned])

    order = [s for s, _ in installs(emitted)]
    assert order == install_order(names)
    assert sorted(order) == sorted(names)  # every listed service, each once
    for i, svc in enumerate(order):
        for dep in (*CATALOG[svc].depends_on, *CATALOG[svc].after):
            if dep in names:
                assert order.index(dep) < i, f"{dep} must come before {svc}"
    assert all(version == CATALOG[svc].version for svc, version in installs(emitted))

    ready = emitted[-1]
    assert isinstance(ready, ClusterReady) and sum(isinstance(e, ClusterReady) for e in emitted) == 1
    assert ready.infra_services == [{"name": s, "version": CATALOG[s].version} for s in order]
    assert (ready.cluster_type, ready.config_hash, ready.endpoint) == (
        requested.cluster_type, requested.config_hash, provisioned.endpoint)  # fmt: skip
    loc = requested.location
    assert ready.subject() == f"fleet.cluster_ready.{loc.cloud}.{loc.region}.{requested.cluster_id}"
    assert state is not None and state.ready and core.next_action(state) is None


def test_spec_version_and_values_override_the_catalog() -> None:
    spec = ClusterSpec.model_validate({
        "kubernetesVersion": "1.30", "nodePools": [{"name": "p", "instanceTypes": ["m"], "minCount": 1, "maxCount": 1}],
        "infraServices": ["namespaces", "rbac", {"name": "ingress", "version": "9.9.9", "values": {"replicas": 3}}],
    })  # fmt: skip
    services, unknown = core.plan(spec)
    assert unknown == []
    assert [(s.name, s.version, s.values) for s in services] == [
        ("namespaces", "1.0.0", {}), ("rbac", "1.0.0", {}), ("ingress", "9.9.9", {"replicas": 3})]  # fmt: skip
    requested, provisioned = cluster_events("modelserving-prod-aws-us-east-1", spec=spec)
    _, emitted = drive([requested, provisioned])
    assert installs(emitted) == [("namespaces", "1.0.0"), ("rbac", "1.0.0"), ("ingress", "9.9.9")]
    ready = emitted[-1]
    assert isinstance(ready, ClusterReady) and ready.infra_services[-1] == {"name": "ingress", "version": "9.9.9"}


def test_no_infra_services_is_ready_at_once() -> None:
    base, _ = cluster_events("core-prod-aws-eu-west-1")
    requested, provisioned = cluster_events("core-prod-aws-eu-west-1",
                                            spec=base.spec.model_copy(update={"infra_services": []}))  # fmt: skip
    state = core.evolve(core.evolve(None, requested), provisioned)
    assert core.next_action(state) == EmitReady(())
    _, emitted = drive([requested, provisioned])
    assert len(emitted) == 1 and isinstance(emitted[0], ClusterReady) and emitted[0].infra_services == []


def test_nothing_happens_until_spec_and_provisioning_are_both_known() -> None:
    requested, provisioned = cluster_events("modelserving-prod-aws-us-east-1")
    assert core.next_action(core.evolve(None, requested)) is None
    assert core.next_action(core.evolve(None, provisioned)) is None
    assert core.next_action(None) is None
    assert isinstance(core.next_action(core.evolve(core.evolve(None, provisioned), requested)), Install)


def test_retirement_stops_the_chain_and_late_chain_messages_install_nothing() -> None:
    requested, provisioned = cluster_events("modelserving-prod-aws-us-east-1")
    retire = retirement_requested(requested)
    state = core.replay([requested, provisioned])
    assert state is not None
    first = core.next_action(state)
    assert isinstance(first, Install) and first.service.name == "namespaces"
    late = core.installed_event(state, first.service)
    state = core.evolve(state, retire)
    assert core.next_action(state) is None
    state, emitted = drive([late], state)  # the chain message that was already in flight
    assert emitted == [] and state is not None and state.retired
    # Retirement before anything else: nothing ever starts.
    _, emitted = drive([retire, requested, provisioned])
    assert emitted == []


def test_recorded_failure_stops_the_chain() -> None:
    requested, provisioned = cluster_events("modelserving-prod-aws-us-east-1")
    state = core.replay([requested, provisioned])
    assert state is not None
    failed = core.failed_event(state, "namespaces", "boom", retryable=True)
    state = core.evolve(state, failed)
    assert state is not None and state.failure == core.InfraFailure(service="namespaces", reason="boom",
                                                                    retryable=True)  # fmt: skip
    assert core.next_action(state) is None


def test_unknown_service_fails_without_touching_the_cluster() -> None:
    base, _ = cluster_events("core-prod-aws-eu-west-1")
    spec = base.spec.model_copy(update={"infra_services": ["namespaces", "mystery-mesh"]})
    requested, provisioned = cluster_events("core-prod-aws-eu-west-1", spec=spec)
    action = core.next_action(core.replay([requested, provisioned]))
    assert isinstance(action, Fail) and action.service == "mystery-mesh" and action.retryable is False


def test_newest_generation_wins_in_any_order() -> None:
    old, provisioned = cluster_events("core-prod-aws-eu-west-1")
    new_spec = old.spec.model_copy(update={"infra_services": ["namespaces"]})
    new, _ = cluster_events("core-prod-aws-eu-west-1", spec=new_spec, generation=2)
    a = core.replay([old, new, provisioned])
    b = core.replay([new, provisioned, old])
    assert a == b and a is not None and a.generation == 2 and a.config_hash == new_spec.config_hash()


def test_events_for_other_services_leave_the_state_alone() -> None:
    requested, _ = cluster_events("core-prod-aws-eu-west-1")
    state = core.evolve(None, requested)
    drained = ClusterDrained(location=requested.location, cluster_id=requested.cluster_id,
                             clusterset=requested.clusterset)  # fmt: skip
    assert core.evolve(state, drained) == state
    assert core.evolve(None, drained) is None


def update_requested(requested: ClusterRequested, spec: ClusterSpec, generation: int = 2) -> ClusterUpdateRequested:
    return ClusterUpdateRequested(location=requested.location, cluster_id=requested.cluster_id,
                                  clusterset=requested.clusterset, generation=generation,
                                  config_hash=spec.config_hash(), spec=spec,
                                  changes=["spec.infraServices"])  # fmt: skip


def resources_updated(requested: ClusterRequested, generation: int, resources: dict[str, dict[str, Any]] | None = None
                      ) -> ClusterResourcesUpdated:  # fmt: skip
    return ClusterResourcesUpdated(location=requested.location, cluster_id=requested.cluster_id,
                                   clusterset=requested.clusterset, generation=generation, config_hash="h",
                                   resources=resources or {}, changed=["node_pools"])  # fmt: skip


# ---------------------------------------------------------------- properties
def _event_pool() -> list[Event]:
    """Every kind of event the installer folds, for one cluster, including conflicting ones."""
    name = "serverless-prod-gcp-europe-west4"
    requested, provisioned = cluster_events(name)
    small = requested.spec.model_copy(update={"infra_services": ["namespaces", "rbac"]})
    requested2, provisioned2 = cluster_events(name, spec=small, generation=2)
    provisioned2 = provisioned2.model_copy(update={"endpoint": "https://moved.example"})
    state = core.replay([requested, provisioned])
    assert state is not None
    pool: list[Event] = [requested, requested2, provisioned, provisioned2]
    for svc in core.plan(requested.spec)[0]:
        pool.append(core.installed_event(state, svc))
    pool.append(core.installed_event(state, core.PlannedService("ingress", "0.0.1")))
    pool.append(core.ready_event(state, EmitReady(tuple(core.plan(requested.spec)[0]))))
    pool.append(core.failed_event(state, "ingress", "timeout", retryable=True))
    pool.append(retirement_requested(requested, reason="rotation"))
    update = update_requested(requested, small, generation=3)
    pool.append(update)
    pool.append(resources_updated(requested, 3, {"log_stream": {"name": "new"}}))
    pool.append(resources_updated(requested, 2, {"log_stream": {"name": "old"}}))
    return pool


POOL = _event_pool()
histories = st.lists(st.integers(min_value=0, max_value=len(POOL) - 1), max_size=25).map(
    lambda idx: [POOL[i] for i in idx]
)


@settings(max_examples=200, deadline=None)
@given(history=histories, extra=st.integers(min_value=0, max_value=len(POOL) - 1))
def test_evolve_twice_equals_once(history: list[Event], extra: int) -> None:
    state = core.replay(history)
    once = core.evolve(state, POOL[extra])
    assert core.evolve(once, POOL[extra]) == once


@settings(max_examples=200, deadline=None)
@given(history=histories)
def test_replaying_a_history_gives_the_same_state(history: list[Event]) -> None:
    first = core.replay(history)
    assert core.replay(list(history)) == first
    # Redelivering each event right after itself (at-least-once) changes nothing either.
    assert core.replay([e for e in history for _ in (0, 1)]) == first
    if first is not None:  # and the state survives the store's JSON round trip
        assert InstallerState.model_validate_json(first.model_dump_json()) == first


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(EXAMPLES)), data=st.data())
def test_any_arrival_order_of_requested_and_provisioned_gives_the_same_installs(name: str, data: st.DataObject) -> None:
    requested, provisioned = cluster_events(name)
    # Any order, with redeliveries of either.
    inputs = data.draw(st.permutations([requested, provisioned]))
    inputs = inputs + data.draw(st.lists(st.sampled_from([requested, provisioned]), max_size=3))
    state, emitted = drive(inputs)
    expected = [(s, CATALOG[s].version) for s in install_order(requested.spec.infra_service_names())]
    assert installs(emitted) == expected
    assert sum(isinstance(e, ClusterReady) for e in emitted) == 1
    # The running state equals a replay of everything that happened, from scratch.
    assert core.replay([*inputs, *emitted]) == state


# ---------------------------------------------------------------- the handler over an in-memory target
class MemoryTarget(KubernetesTarget):
    """In-memory stand-in for unit tests only (integration tests use the Redis-backed sim)."""

    health_poll_s = 0.0

    def __init__(self, fail: int = 0, healthy: bool = True) -> None:
        self.applied: list[tuple[str, str, str, dict[str, Any]]] = []
        self.fail, self.healthy = fail, healthy
        self.reports: list[DrainReport | Exception] = []  # what the next drain passes return (or raise)
        self.drains = 0
        self.uncordons = 0

    async def apply_service(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("api down")
        self.applied.append((cluster.cluster_id, service, version, dict(values)))

    async def remove_service(self, cluster: ClusterRef, service: str) -> None:
        self.applied = [a for a in self.applied if not (a[0] == cluster.cluster_id and a[1] == service)]

    async def correct_drift(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]
                            ) -> list[str]:  # fmt: skip
        return []

    async def service_healthy(self, cluster: ClusterRef, service: str) -> bool:
        return self.healthy

    async def drain(self, cluster: ClusterRef) -> DrainReport:
        self.drains += 1
        report = self.reports.pop(0) if self.reports else DrainReport(evicted=0, remaining=0)
        if isinstance(report, Exception):
            raise report
        return report

    async def uncordon(self, cluster: ClusterRef) -> int:
        self.uncordons += 1
        return 3


def envelope(payload: Event, cause: Envelope | None = None) -> Envelope:
    return new_event(payload, source="test", cause=cause, discriminator="x")


async def run_handler(installer: Installer, inputs: list[Envelope]) -> tuple[InstallerState | None, list[Envelope]]:
    state: InstallerState | None = None
    queue, out = deque(inputs), list[Envelope]()
    while queue:
        outcome = await installer.handle(queue.popleft(), state)
        state = outcome.state if outcome.state is not None else state
        for emitted in outcome.events:  # the new state already has each emitted event folded in
            assert core.evolve(state, decode_payload(emitted)) == state
        out.extend(outcome.events)
        queue.extend(outcome.events)
    return state, out


async def test_handler_applies_through_the_port_and_emits_deterministic_ids() -> None:
    requested, provisioned = cluster_events("modelserving-prod-aws-us-east-1")
    envs = [envelope(requested), envelope(provisioned)]
    target = MemoryTarget()
    state, out = await run_handler(Installer(target), envs)
    order = install_order(requested.spec.infra_service_names())
    assert [a[1] for a in target.applied] == order
    assert [e.type for e in out] == ["InfraServiceInstalled"] * len(order) + ["ClusterReady"]
    assert all(e.source == "infra_installer" and e.subject == requested.cluster_id for e in out)
    # Handling the same messages again (a fresh state, e.g. a replay) re-emits the same ids.
    _, again = await run_handler(Installer(MemoryTarget()), envs)
    assert [e.id for e in again] == [e.id for e in out]
    assert state is not None and state.ready


async def test_handler_failure_raises_and_exhaustion_records_cluster_infra_failed() -> None:
    requested, provisioned = cluster_events("core-prod-aws-eu-west-1")
    installer = Installer(MemoryTarget(fail=1))
    state = (await installer.handle(envelope(requested), None)).state
    prov = envelope(provisioned)
    with pytest.raises(RuntimeError):
        await installer.handle(prov, state)
    retried = await installer.handle(prov, state)  # the redelivery succeeds
    assert [e.type for e in retried.events] == ["InfraServiceInstalled"]

    exhausted = await installer.on_exhausted(prov, state, "RuntimeError: api down")
    (failed,) = exhausted.events
    payload = decode_payload(failed)
    assert isinstance(payload, ClusterInfraFailed)
    assert (payload.service, payload.retryable, payload.reason) == ("namespaces", True, "RuntimeError: api down")
    assert exhausted.state is not None and exhausted.state.failure is not None
    assert core.next_action(exhausted.state) is None


async def test_a_terminal_target_error_fails_the_cluster_at_once_naming_the_object() -> None:
    class CaMismatch(Exception):
        retryable = False
        object = "apiserver CA"

    class Refusing(MemoryTarget):
        async def apply_service(self, cluster: ClusterRef, service: str, version: str,
                                values: Mapping[str, Any]) -> None:  # fmt: skip
            raise CaMismatch("CA of the API server does not match the provisioned fingerprint")

    requested, provisioned = cluster_events("core-prod-aws-eu-west-1")
    installer = Installer(Refusing())
    state = (await installer.handle(envelope(requested), None)).state
    out = await installer.handle(envelope(provisioned), state)
    (failed,) = [decode_payload(e) for e in out.events]
    assert isinstance(failed, ClusterInfraFailed)
    assert (failed.service, failed.retryable, failed.object) == ("namespaces", False, "apiserver CA")
    assert "does not match" in failed.reason
    assert out.state is not None and core.next_action(out.state) is None


async def test_health_timeout_raises_a_retryable_error() -> None:
    requested, provisioned = cluster_events("core-prod-aws-eu-west-1")
    installer = Installer(MemoryTarget(healthy=False), health_timeout_s=0.01)
    state = (await installer.handle(envelope(requested), None)).state
    with pytest.raises(HealthTimeout):
        await installer.handle(envelope(provisioned), state)


async def test_spec_refs_survive_the_envelope_round_trip() -> None:
    base, _ = cluster_events("core-prod-aws-eu-west-1")
    spec = base.spec.model_copy(update={"infra_services": ["namespaces", InfraServiceRef(name="rbac", version="2.0.0",
                                                                                          values={"k": "v"})]})
    requested, provisioned = cluster_events("core-prod-aws-eu-west-1", spec=spec)
    target = MemoryTarget()
    await run_handler(Installer(target), [envelope(requested), envelope(provisioned)])
    assert target.applied[-1][1:] == ("rbac", "2.0.0", {"k": "v"})


# ---------------------------------------------------------------- in place update, retry, drift
def test_update_reapplies_for_the_new_spec_then_prunes_dependents_first_then_is_ready_with_the_new_hash() -> None:
    requested, provisioned = cluster_events("modelserving-prod-aws-us-east-1")
    state, _ = drive([requested, provisioned])
    spec = requested.spec.model_copy(update={"infra_services": [
        "namespaces", "rbac", "observability", InfraServiceRef(name="logging", version="3.2.0")]})
    update = update_requested(requested, spec)
    state, emitted = drive([update, resources_updated(requested, 2)], state)
    # Every listed service is re-applied for the new spec (unchanged objects are server-side-apply no-ops).
    assert [(type(e).__name__, getattr(e, "service", None)) for e in emitted] == [
        ("InfraServiceInstalled", "namespaces"),
        ("InfraServiceInstalled", "rbac"),
        ("InfraServiceInstalled", "observability"),
        ("InfraServiceInstalled", "logging"),
        ("InfraServiceRemoved", "ingress"),
        ("InfraServiceRemoved", "cert-manager"),
        ("InfraServiceRemoved", "registry-secrets"),
        ("ClusterReady", None),
    ]
    assert isinstance(emitted[-1], ClusterReady) and emitted[-1].config_hash == spec.config_hash()
    assert state is not None and state.installed["logging"] == "3.2.0" and "ingress" not in state.installed
    # The same update again (or an older generation) changes nothing.
    assert drive([update], state)[1] == []


# ---------------------------------------------------------------- the in-place gate
def _ready_cluster(name: str = "modelserving-prod-aws-us-east-1") -> tuple[ClusterRequested, InstallerState]:
    requested, provisioned = cluster_events(name)
    state, _ = drive([requested, provisioned])
    assert state is not None and state.ready
    return requested, state


def step(inputs: Sequence[Event], state: InstallerState) -> tuple[InstallerState, list[Event]]:
    new, emitted = drive(inputs, state)
    assert new is not None
    return new, emitted


def test_ready_after_an_update_waits_for_the_cloud_side_of_the_same_generation() -> None:
    requested, state = _ready_cluster()
    spec = requested.spec.model_copy(update={"infra_services": ["namespaces", "rbac"]})
    state, emitted = step([update_requested(requested, spec, generation=2)], state)
    # Re-applied (and pruned) at once, but not READY: the node pools may still be converging.
    assert [type(e).__name__ for e in emitted][:2] == ["InfraServiceInstalled", "InfraServiceInstalled"]
    assert not any(isinstance(e, ClusterReady) for e in emitted)
    assert not state.ready and core.next_action(state) is None
    # An older generation's cloud side does not open the gate.
    state, emitted = step([resources_updated(requested, 1)], state)
    assert emitted == [] and core.next_action(state) is None
    state, emitted = step([resources_updated(requested, 2)], state)
    (ready,) = emitted
    assert isinstance(ready, ClusterReady) and ready.config_hash == spec.config_hash()
    # A redelivery of it changes nothing and emits nothing.
    assert drive([resources_updated(requested, 2)], state) == (state, [])


def test_the_cloud_side_may_finish_first() -> None:
    requested, state = _ready_cluster()
    spec = requested.spec.model_copy(update={"infra_services": ["namespaces", "rbac"]})
    state, emitted = step([resources_updated(requested, 2)], state)
    assert emitted == [] and state.ready  # nothing to do before the update itself
    state, emitted = step([update_requested(requested, spec, generation=2)], state)
    ready = emitted[-1]
    assert isinstance(ready, ClusterReady) and ready.config_hash == spec.config_hash()
    # ... and a newer generation's results open the gate for an older update too.
    requested2, state2 = _ready_cluster()
    state2, _ = step([resources_updated(requested2, 3)], state2)
    state2, emitted2 = step([update_requested(requested2, spec, generation=2)], state2)
    assert isinstance(emitted2[-1], ClusterReady)


def test_new_provisioning_results_are_recorded_and_every_service_is_rendered_again() -> None:
    requested, state = _ready_cluster("serverless-prod-gcp-europe-west4")
    update = update_requested(requested, requested.spec, generation=2)  # e.g. only node pools changed
    stream = {"log_stream": {"name": "logs-v2", "topic": "projects/p/topics/logs-v2"}}
    state, emitted = step([resources_updated(requested, 2, stream), update], state)
    assert state.resources["log_stream"]["name"] == "logs-v2"
    names = install_order(requested.spec.infra_service_names())
    assert [e.service for e in emitted if isinstance(e, InfraServiceInstalled)] == names
    assert isinstance(emitted[-1], ClusterReady)
    # Results that change nothing re-render nothing; a late ClusterProvisioned does not undo the update's.
    again = core.evolve(state, resources_updated(requested, 3, stream))
    assert again is not None and again.installed_for == state.installed_for
    late = core.evolve(state, cluster_provisioned(requested).model_copy(update={"resources": {"log_stream": {}}}))
    assert late is not None and late.resources == state.resources


# ---------------------------------------------------------------- drains
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def drain_env(requested: ClusterRequested, timeout_s: float = 60, at: datetime = T0, rollout: str = "r1") -> Envelope:
    payload = ClusterDrainRequested(location=requested.location, cluster_id=requested.cluster_id,
                                    clusterset=requested.clusterset, rollout_id=rollout, timeout_seconds=timeout_s)
    return new_event(payload, source="rotation", time=at)


def with_drain(state: InstallerState, env: Envelope) -> InstallerState:
    new = core.evolve(state, decode_payload(env), env)
    assert new is not None
    return new


def test_a_drain_request_is_recorded_with_its_deadline_once() -> None:
    requested, state = _ready_cluster()
    env = drain_env(requested, timeout_s=90)
    state = with_drain(state, env)
    (request,) = state.drain.pending
    assert (request.id, request.rollout_id, request.requested_at) == (env.id, "r1", T0)
    assert request.deadline == T0 + timedelta(seconds=90)
    assert with_drain(state, env) == state  # redelivered: the same request
    assert core.drain_action(state) == DrainPass() and reconcile_reason(state) == "drain"
    assert core.drift_check(state) == []  # a cluster on its way out is not checked for drift
    with pytest.raises(ValueError):
        core.evolve(state, decode_payload(env))  # its time and id are part of it


def test_passes_until_nothing_is_left_then_one_answer() -> None:
    requested, state = _ready_cluster()
    state = with_drain(state, env := drain_env(requested))
    state, answers = core.settle_drain(state, DrainReport(evicted=2, remaining=3, blocked=3), T0)
    assert answers == [] and state.drain.pending and state.drain.remaining == 3
    state, answers = core.settle_drain(state, DrainReport(evicted=3, remaining=0), T0 + timedelta(seconds=5))
    (answer,) = answers
    assert answer.request.id == env.id
    assert (answer.event.timed_out, answer.event.evicted, answer.event.remaining, answer.event.rollout_id) == (
        False, 5, 0, "r1")  # fmt: skip
    assert state.drain.drained and not state.drain.pending and core.drain_action(state) is None
    assert reconcile_reason(state) is None  # drained: no drift checks, nothing to nudge
    # The request again (after the ledger forgot it) is not answered twice.
    assert with_drain(state, env) == state


def test_a_drain_past_its_deadline_is_answered_timed_out_and_never_forced() -> None:
    requested, state = _ready_cluster()
    state = with_drain(state, drain_env(requested, timeout_s=30))
    blocked = DrainReport(evicted=0, remaining=4, blocked=4)
    state, answers = core.settle_drain(state, blocked, T0 + timedelta(seconds=29))
    assert answers == []
    state, answers = core.settle_drain(state, blocked, T0 + timedelta(seconds=30))
    (answer,) = answers
    assert (answer.event.timed_out, answer.event.remaining, answer.event.evicted) == (True, 4, 0)
    assert not state.drain.drained and core.drain_action(state) is None
    # A new request drains again (pods are still there), with its own deadline.
    state = with_drain(state, drain_env(requested, at=T0 + timedelta(minutes=5), rollout="r2"))
    assert core.drain_action(state) == DrainPass()


def test_a_failed_pass_still_times_out_with_what_the_last_pass_saw() -> None:
    requested, state = _ready_cluster()
    state = with_drain(state, drain_env(requested, timeout_s=10))
    state, _ = core.settle_drain(state, DrainReport(evicted=1, remaining=2, blocked=2), T0)
    state, answers = core.settle_drain(state, None, T0 + timedelta(seconds=5))
    assert answers == [] and state.drain.remaining == 2
    state, (answer,) = core.settle_drain(state, None, T0 + timedelta(seconds=11))
    assert (answer.event.timed_out, answer.event.remaining, answer.event.evicted) == (True, 2, 1)


def test_two_open_requests_each_get_their_own_answer() -> None:
    requested, state = _ready_cluster()
    first, second = drain_env(requested, timeout_s=10, rollout="a"), drain_env(requested, timeout_s=100, rollout="b")
    state = with_drain(with_drain(state, first), second)
    state, answers = core.settle_drain(state, DrainReport(0, 1, 1), T0 + timedelta(seconds=20))
    assert [(a.request.id, a.event.timed_out) for a in answers] == [(first.id, True)]
    state, answers = core.settle_drain(state, DrainReport(1, 0), T0 + timedelta(seconds=30))
    assert [(a.request.id, a.event.timed_out, a.event.rollout_id) for a in answers] == [(second.id, False, "b")]


def test_a_drained_cluster_is_not_drained_again_and_a_retired_one_not_at_all() -> None:
    requested, state = _ready_cluster()
    state = with_drain(state, drain_env(requested))
    state, _ = core.settle_drain(state, DrainReport(evicted=2, remaining=0), T0)
    state = with_drain(state, drain_env(requested, rollout="r2"))
    assert core.drain_action(state) == AnswerDrains()

    retired = core.evolve(_ready_cluster()[1], retirement_requested(requested, reason="rotation"))
    assert retired is not None
    assert with_drain(retired, drain_env(requested)) == retired and core.drain_action(retired) is None
    # Retired while a drain is open: no more passes.
    draining = with_drain(_ready_cluster()[1], drain_env(requested))
    gone = core.evolve(draining, retirement_requested(requested, reason="manual"))
    assert gone is not None and core.drain_action(gone) is None and reconcile_reason(gone) is None


async def test_the_handler_drains_through_the_port_and_answers_once_with_a_deterministic_id() -> None:
    requested, state = _ready_cluster()
    target = MemoryTarget()
    target.reports = [DrainReport(evicted=2, remaining=1, blocked=1), InstallError("api down"),
                      DrainReport(evicted=1, remaining=0)]  # fmt: skip
    installer = Installer(target, clock=lambda: T0)
    env = drain_env(requested)
    out = await installer.handle(env, state)
    assert not out.events and out.state is not None and out.state.drain.remaining == 1
    nudge = InfraReconcileRequested(location=requested.location, cluster_id=requested.cluster_id,
                                    clusterset=requested.clusterset, reason="drain", bucket=1)  # fmt: skip
    failed = await installer.handle(envelope(nudge), out.state)  # a failing pass holds nothing and answers nothing
    assert not failed.events and failed.state == out.state
    done = await installer.handle(envelope(nudge.model_copy(update={"bucket": 2})), out.state)
    (drained,) = done.events
    assert drained.id == derive_id(env.id, "ClusterDrained") and drained.causation_id == env.id
    assert drained.correlation_id == env.correlation_id and drained.source == "infra_installer"
    payload = decode_payload(drained)
    assert isinstance(payload, ClusterDrained) and (payload.evicted, payload.timed_out) == (3, False)
    assert drained_envelope(core.settle_drain(out.state, DrainReport(0, 0), T0)[1][0]).id == drained.id
    # Later nudges and the request again do nothing, and never reach the cluster.
    assert done.state is not None
    again = await installer.handle(envelope(nudge.model_copy(update={"bucket": 3})), done.state)
    assert not again.events and target.drains == 3
    assert not (await installer.handle(env, done.state)).events


async def test_a_new_request_on_a_drained_cluster_is_answered_without_a_pass() -> None:
    requested, state = _ready_cluster()
    target = MemoryTarget()
    installer = Installer(target, clock=lambda: T0)
    first = await installer.handle(drain_env(requested), state)
    assert len(first.events) == 1 and target.drains == 1
    assert first.state is not None
    second = await installer.handle(drain_env(requested, rollout="r2"), first.state)
    (answer,) = [decode_payload(e) for e in second.events]
    assert isinstance(answer, ClusterDrained) and answer.rollout_id == "r2" and not answer.timed_out
    assert target.drains == 1


async def test_an_uncordon_calls_the_drain_off_gives_the_nodes_back_and_a_later_drain_starts_afresh() -> None:
    requested, state = _ready_cluster()
    target = MemoryTarget()
    target.reports = [DrainReport(evicted=2, remaining=4, blocked=4)]
    installer = Installer(target, clock=lambda: T0)
    draining = await installer.handle(drain_env(requested), state)
    assert draining.state is not None and draining.state.drain.pending and not draining.events
    ask = ClusterUncordonRequested(location=requested.location, cluster_id=requested.cluster_id,
                                   clusterset=requested.clusterset, rollout_id="r1", reason="rolled back")  # fmt: skip
    out = await installer.handle(envelope(ask), draining.state)
    (uncordoned,) = [decode_payload(e) for e in out.events]
    assert isinstance(uncordoned, ClusterUncordoned) and uncordoned.nodes == 3 and target.uncordons == 1
    assert out.state is not None and not out.state.drain.pending and not out.state.drain.drained
    assert not core.draining(out.state) and core.drain_action(out.state) is None  # drift checks resume
    # The dropped request is never answered; a new one (a later rollout) drains from the start.
    target.reports = [DrainReport(evicted=6, remaining=0)]
    again = await installer.handle(drain_env(requested, rollout="r2"), out.state)
    (answer,) = [decode_payload(e) for e in again.events]
    assert isinstance(answer, ClusterDrained) and answer.rollout_id == "r2" and target.drains == 2


def test_the_periodic_retry_clears_only_a_retryable_failure() -> None:
    requested, provisioned = cluster_events("modelserving-prod-aws-us-east-1")
    base = core.replay([requested, provisioned])
    assert base is not None
    nudge = InfraReconcileRequested(location=requested.location, cluster_id=requested.cluster_id,
                                    clusterset=requested.clusterset, reason="retry", bucket=1)  # fmt: skip
    for retryable in (True, False):
        failed = core.evolve(base, core.failed_event(base, "namespaces", "boom", retryable=retryable))
        after = core.evolve(failed, nudge)
        assert after is not None
        assert (after.failure is None) is retryable
        assert (core.next_action(after) is not None) is retryable


def test_drift_checks_only_ready_clusters() -> None:
    requested, provisioned = cluster_events("serverless-prod-gcp-europe-west4")
    half = core.replay([requested, provisioned])
    assert core.drift_check(half) == []
    ready, _ = drive([requested, provisioned])
    assert [s.name for s in core.drift_check(ready)] == install_order(requested.spec.infra_service_names())
    retired = core.evolve(ready, retirement_requested(requested))
    assert core.drift_check(retired) == []
