"""The infra_installer's pure core (and its handler over an in-memory target): order, guards, properties."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.infra_installer import core
from services.infra_installer.app import Installer
from services.infra_installer.core import EmitReady, Fail, Install, InstallerState
from services.infra_installer.targets.base import ClusterRef, HealthTimeout, KubernetesTarget
from shared.catalog import CATALOG, install_order
from shared.events import Envelope, decode_payload, new_event
from shared.events.clusterset import ClusterSpec, InfraServiceRef
from shared.events.models import (
    ClusterDrainRequested,
    ClusterInfraFailed,
    ClusterProvisioned,
    ClusterReady,
    ClusterRequested,
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
    drain = ClusterDrainRequested(location=requested.location, cluster_id=requested.cluster_id,
                                  clusterset=requested.clusterset)  # fmt: skip
    assert core.evolve(state, drain) == state
    assert core.evolve(None, drain) is None


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
    update = ClusterUpdateRequested(location=requested.location, cluster_id=requested.cluster_id,
                                    clusterset=requested.clusterset, generation=2, config_hash=spec.config_hash(),
                                    spec=spec, changes=["spec.infraServices"])  # fmt: skip
    state, emitted = drive([update], state)
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
