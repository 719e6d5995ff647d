"""The cloud_provisioner's pure core, and its handler over an in-memory cloud: order, guards, properties."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cloud_provisioner import core
from services.cloud_provisioner.app import Provisioner, parse_reason
from services.cloud_provisioner.core import (
    Adopt,
    Delete,
    EmitDeprovisioned,
    EmitProvisioned,
    Ensure,
    ProvisionerState,
    Update,
)
from services.cloud_provisioner.providers import ProviderRegistry
from services.cloud_provisioner.providers.base import (
    CloudError,
    ClusterContext,
    NotInPlaceError,
    QuotaExceededError,
    ThrottlingError,
    Updated,
    cloud_error,
)
from shared.events import ClusterSpec, Envelope, new_event
from shared.events.models import (
    PROVISION_STEPS,
    ClusterDeprovisioned,
    ClusterProvisioned,
    ClusterProvisioningFailed,
    ClusterRequested,
    ClusterResourceDeprovisioned,
    ClusterResourceProvisioned,
    ClusterResourcesUpdated,
    ClusterUpdateRequested,
    Event,
    NetworkInfo,
    ProvisionStep,
)
from tests.helpers import BYON, PLAIN, cluster_requested, retirement_requested


def fake_resources(step: ProvisionStep, cluster_id: str) -> dict[str, Any]:
    if step == "network":
        return {"network_id": f"net-{cluster_id}", "subnet_ids": ["s-1", "s-2"], "owned": True}
    if step == "cluster":
        return {"endpoint": f"https://{cluster_id}.fake", "ca_fingerprint": "sha256:00",
                "credential_ref": f"fake://{cluster_id}"}  # fmt: skip
    return {"id": f"{step}-{cluster_id}"}


def env(payload: Event, cause: Envelope | None = None, discriminator: str = "") -> Envelope:
    return new_event(payload, source="test", cause=cause, discriminator=discriminator)


def changed_spec(spec: ClusterSpec, tags: dict[str, str] | None = None, **pool_changes: Any) -> ClusterSpec:
    """`spec` with new `tags` and/or its first node pool's fields changed (camelCase, e.g. maxCount=6)."""
    data = spec.model_dump(mode="json", by_alias=True)
    data["nodePools"][0].update(pool_changes)
    if tags is not None:
        data["tags"] = tags
    return ClusterSpec.model_validate(data, strict=False)


def with_pool(spec: ClusterSpec, name: str) -> ClusterSpec:
    """`spec` with one more node pool (a copy of the first, named `name`): a change only a rotation makes."""
    data = spec.model_dump(mode="json", by_alias=True)
    data["nodePools"].append({**data["nodePools"][0], "name": name})
    return ClusterSpec.model_validate(data, strict=False)


def update_requested(req: ClusterRequested, generation: int, spec: ClusterSpec | None = None,
                     tags: dict[str, str] | None = None, **pool_changes: Any) -> ClusterUpdateRequested:  # fmt: skip
    """The planner's in-place update of the cluster `req` asked for (`spec`, else req's with these changes)."""
    new = spec or changed_spec(req.spec, tags, **pool_changes)
    changes = [f"nodePools[{new.node_pools[0].name}].{k}" for k in pool_changes] + (["tags"] if tags else [])
    return ClusterUpdateRequested(cluster_id=req.cluster_id, clusterset=req.clusterset, location=req.location,
                                  generation=generation, config_hash=new.config_hash(), spec=new,
                                  changes=changes)  # fmt: skip


# ---------------------------------------------------------------- pure decider loop
def drive(state: ProvisionerState | None, inputs: list[Envelope], fail: dict[str, str] | None = None
          ) -> tuple[ProvisionerState | None, list[core.Action], list[Envelope]]:  # fmt: skip
    """One action per handled message, the resulting event fed back in: the service loop without I/O.

    `fail`: step (or "update") → the code its action fails with, terminally."""
    actions: list[core.Action] = []
    emitted: list[Envelope] = []
    queue = list(inputs)
    fail = fail or {}
    while queue:
        incoming = queue.pop(0)
        before = state
        state = core.evolve(state, incoming)
        if not core.should_act(before, state, incoming):
            continue
        action = core.next_action(state)
        if action is None:
            continue
        assert state is not None
        actions.append(action)
        step = core.step_of(action)
        payload: Event
        if step is not None and step in fail:
            payload = core.failed(state, action, fail[step], "boom", retryable=False)
        elif isinstance(action, Ensure):
            payload = core.resource_provisioned(state, action.step, fake_resources(action.step, state.cluster_id))
        elif isinstance(action, Adopt):
            payload = core.resource_provisioned(state, action.step, action.resources)
        elif isinstance(action, Delete):
            payload = core.resource_deprovisioned(state, action.step)
        elif isinstance(action, EmitProvisioned):
            payload = core.provisioned(state)
        elif isinstance(action, Update):
            if "update" in fail:
                payload = core.failed(state, action, fail["update"], "boom", retryable=False, step="node_pools")
            else:
                payload = core.resources_updated(state, state.resources, ["node_pools"])
        else:
            payload = core.deprovisioned(state)
        out = env(payload, cause=incoming, discriminator=str(step))
        state = core.evolve(state, out)
        emitted.append(out)
        queue.append(out)
    return state, actions, emitted


def test_provision_sequence() -> None:
    req = cluster_requested(PLAIN)
    state, actions, emitted = drive(None, [env(req)])
    assert actions == [Ensure(s) for s in PROVISION_STEPS] + [EmitProvisioned()]
    assert state is not None and state.provisioned and set(state.resources) == set(PROVISION_STEPS)
    last = emitted[-1]
    assert last.type == "ClusterProvisioned"
    prov = ClusterProvisioned.model_validate(last.data)
    assert prov.endpoint == f"https://{req.cluster_id}.fake" and prov.network.owned
    assert prov.credential_ref == f"fake://{req.cluster_id}"
    assert core.next_action(state) is None


def test_deprovision_sequence_is_reverse_and_ends_with_deprovisioned() -> None:
    req = cluster_requested(PLAIN)
    state, _, _ = drive(None, [env(req)])
    state, actions, emitted = drive(state, [env(retirement_requested(req))])
    assert actions == [Delete(s, fake_resources(s, req.cluster_id)) for s in reversed(PROVISION_STEPS)] + [
        EmitDeprovisioned()
    ]
    assert emitted[-1].type == "ClusterDeprovisioned"
    assert state is not None and state.resources == {} and state.deprovisioned
    assert core.remaining_steps(state) == []


def test_retire_mid_way_deletes_the_step_that_may_be_in_flight() -> None:
    req = cluster_requested(PLAIN)
    cid = req.cluster_id
    first = env(req)
    state = core.evolve(None, first)
    step: ProvisionStep
    for step in ("network", "iam", "cluster"):  # three steps done, node_pools was next
        assert state is not None
        state = core.evolve(state, env(core.resource_provisioned(state, step, fake_resources(step, cid)), first, step))
    assert core.next_action(state) == Ensure("node_pools")
    state, actions, _ = drive(state, [env(retirement_requested(req))])
    assert actions == [
        Delete("node_pools", None),  # unknown result: the provider looks it up by tag
        Delete("cluster", fake_resources("cluster", cid)),
        Delete("iam", fake_resources("iam", cid)),
        Delete("network", fake_resources("network", cid)),
        EmitDeprovisioned(),
    ]
    # The in-flight step reports late: it is recorded and deleted after.
    assert state is not None
    late = env(core.resource_provisioned(state, "log_stream", {"id": "late"}), discriminator="late")
    state2, actions2, _ = drive(state, [late])
    assert actions2 == [Delete("log_stream", {"id": "late"})]
    assert state2 is not None and core.remaining_steps(state2) == []


def test_result_of_an_already_deleted_step_is_ignored() -> None:
    req = cluster_requested(PLAIN)
    state, _, emitted = drive(None, [env(req)])
    old_network = next(e for e in emitted if e.type == "ClusterResourceProvisioned")
    state, _, _ = drive(state, [env(retirement_requested(req))])
    assert core.evolve(state, old_network) == state


def test_byon_adopts_and_never_deletes_the_network() -> None:
    req = cluster_requested(BYON)
    state, actions, emitted = drive(None, [env(req)])
    assert actions[0] == Adopt("network", {
        "network_id": "/subscriptions/0000/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/shared-vnet",
        "subnet_ids": ["snet-a", "snet-b"], "owned": False,
    })  # fmt: skip
    assert actions[1:] == [Ensure(s) for s in PROVISION_STEPS[1:]] + [EmitProvisioned()]
    prov = ClusterProvisioned.model_validate(emitted[-1].data)
    assert prov.network.owned is False and prov.network.subnet_ids == ["snet-a", "snet-b"]
    state, actions, _ = drive(state, [env(retirement_requested(req))])
    assert [a.step for a in actions if isinstance(a, Delete)] == ["log_stream", "node_pools", "cluster", "iam"]
    assert actions[-1] == EmitDeprovisioned()


def test_byon_retired_before_anything_never_touches_the_network() -> None:
    req = cluster_requested(BYON)
    state = core.evolve(None, env(req))
    state, actions, _ = drive(state, [env(retirement_requested(req))])
    assert actions == [EmitDeprovisioned()]


@pytest.mark.parametrize("name", [PLAIN, BYON])
def test_retirement_of_unknown_cluster_sweeps_every_step_by_tag_and_blocks_a_late_request(name: str) -> None:
    """No record of the cluster, yet a crashed first handling of its request may have created something."""
    req = cluster_requested(name)
    state, actions, emitted = drive(None, [env(retirement_requested(req))])
    # Every step, newest first, by tag (no ids known; no spec either, so byon cannot be told apart:
    # the provider's tag lookup is what keeps an adopted network safe).
    assert actions == [Delete(s, None) for s in reversed(PROVISION_STEPS)] + [EmitDeprovisioned()]
    assert [e.type for e in emitted] == ["ClusterResourceDeprovisioned"] * 5 + ["ClusterDeprovisioned"]
    assert ClusterDeprovisioned.model_validate(emitted[-1].data).cluster_id == req.cluster_id
    assert state is not None and state.deprovisioned and core.remaining_steps(state) == []
    state, actions, _ = drive(state, [env(req)])
    assert actions == [] and state is not None and state.spec is None


def test_unknown_cluster_sweep_records_a_late_result_and_never_deletes_an_adopted_network() -> None:
    req = cluster_requested(BYON)
    state = core.evolve(None, env(retirement_requested(req)))
    assert state is not None and state.unconfirmed == list(PROVISION_STEPS)
    assert core.next_action(state) == Delete("log_stream", None)
    adopted = core.byon_network(req.spec)
    state = core.evolve(state, env(core.resource_provisioned(state, "network", adopted), discriminator="n"))
    assert state is not None
    state = core.evolve(state, env(core.resource_provisioned(state, "iam", {"id": "late"}), discriminator="i"))
    assert state is not None and "network" not in core.remaining_steps(state)
    _, actions, _ = drive(state, [env(core.resource_deprovisioned(state, "log_stream"), discriminator="l")])
    assert actions == [Delete("node_pools", None), Delete("cluster", None), Delete("iam", {"id": "late"}),
                       EmitDeprovisioned()]  # fmt: skip


def test_terminal_failure_stops_then_retirement_cleans_up_and_rerequest_retries() -> None:
    req = cluster_requested(PLAIN)
    original = env(req)
    state, actions, emitted = drive(None, [original], fail={"node_pools": "QuotaExceeded"})
    assert actions == [Ensure("network"), Ensure("iam"), Ensure("cluster"), Ensure("node_pools")]
    failed = ClusterProvisioningFailed.model_validate(emitted[-1].data)
    assert (failed.operation, failed.step, failed.code, failed.retryable) == ("provision", "node_pools",
                                                                            "QuotaExceeded", False)  # fmt: skip
    assert state is not None and state.failure is not None and core.next_action(state) is None
    # A replay of the request that started it all (e.g. an expired ledger) does not retry ...
    assert drive(state, [original])[1] == []
    # ... the same cluster asked for again, after the failure, does: the failed step is retried.
    retried, actions2, _ = drive(state, [env(req)])
    assert actions2 == [Ensure("node_pools"), Ensure("log_stream"), EmitProvisioned()]
    # Or retired: what exists is removed, including the step that failed half-way.
    gone, actions3, _ = drive(state, [env(retirement_requested(req))])
    assert [a.step for a in actions3 if isinstance(a, Delete)] == ["node_pools", "cluster", "iam", "network"]
    assert gone is not None and gone.failure is None and gone.deprovisioned


def test_duplicate_request_with_another_id_starts_no_second_chain() -> None:
    req = cluster_requested(PLAIN)
    first = env(req)
    state = core.evolve(None, first)
    second = env(req)  # same content, new id (e.g. the planner re-emitting)
    again = core.evolve(state, second)
    assert again == state and not core.should_act(state, again, second)


def test_stale_own_event_does_not_fork_the_chain() -> None:
    req = cluster_requested(PLAIN)
    state, _, emitted = drive(None, [env(req)])
    stale = emitted[1]  # ClusterResourceProvisioned(cluster), long since handled
    after = core.evolve(state, stale)
    assert after == state and not core.should_act(state, after, stale)


def test_state_roundtrips_through_json() -> None:
    state, _, _ = drive(None, [env(cluster_requested(BYON))])
    assert state is not None
    assert ProvisionerState.model_validate_json(state.model_dump_json()) == state


def test_parse_reason() -> None:
    assert parse_reason("ThrottlingError: [Throttling] Rate exceeded") == ("Throttling", "Rate exceeded")
    assert parse_reason("TimeoutError: took too long") == ("TimeoutError", "took too long")


def test_error_classification() -> None:
    assert isinstance(cloud_error("Throttling"), ThrottlingError) and cloud_error("Throttling").retryable
    quota = cloud_error("QuotaExceeded", "vCPU limit")
    assert isinstance(quota, QuotaExceededError) and not quota.retryable and str(quota) == "[QuotaExceeded] vCPU limit"
    assert cloud_error("Weird", retryable=True).retryable and not cloud_error("Weird").retryable


# ---------------------------------------------------------------- hypothesis: evolve properties
def _random_history(name: str, picks: list[int]) -> list[Envelope]:
    """Events about one cluster in any order, with repeats: every type the provisioner folds."""
    req = cluster_requested(name)
    base: dict[str, Any] = dict(cluster_id=req.cluster_id, clusterset=req.clusterset, location=req.location)
    pool: list[Event] = [req, retirement_requested(req), ClusterProvisioned(
        **base, endpoint="https://x", ca_fingerprint="f", network=NetworkInfo(network_id="n", subnet_ids=["s"]),
        resources={}, credential_ref="sim://x"), ClusterDeprovisioned(**base)]  # fmt: skip
    for step in PROVISION_STEPS:
        pool.append(ClusterResourceProvisioned(**base, step=step, resources=fake_resources(step, req.cluster_id)))
        pool.append(ClusterResourceDeprovisioned(**base, step=step))
    pool.append(ClusterProvisioningFailed(**base, operation="provision", step="cluster", code="QuotaExceeded",
                                          message="m", retryable=False))  # fmt: skip
    pool.append(ClusterProvisioningFailed(**base, operation="deprovision", step="iam", code="AccessDenied",
                                          message="m", retryable=False))  # fmt: skip
    # In-place updates: two generations, their reports, and a failed update.
    for generation, max_count in ((2, 6), (3, 9)):
        update = update_requested(req, generation, maxCount=max_count)
        pool.append(update)
        pool.append(ClusterResourcesUpdated(**base, generation=generation, config_hash=update.config_hash,
                                            resources={"node_pools": {"id": f"np-{generation}"}},
                                            changed=["node_pools"]))  # fmt: skip
    pool.append(ClusterProvisioningFailed(**base, operation="update", step="node_pools", code="NotInPlace",
                                          message="m", retryable=False))  # fmt: skip
    envelopes = [env(p, discriminator=str(i)) for i, p in enumerate(pool)]
    return [envelopes[i % len(envelopes)] for i in picks]


histories = st.tuples(st.sampled_from([PLAIN, BYON]), st.lists(st.integers(0, 100), max_size=30))


@given(histories)
@settings(max_examples=200, deadline=None)
def test_evolve_twice_equals_once(case: tuple[str, list[int]]) -> None:
    state: ProvisionerState | None = None
    for e in _random_history(*case):
        once = core.evolve(state, e)
        assert core.evolve(once, e) == once
        state = once


@given(histories)
@settings(max_examples=200, deadline=None)
def test_replay_is_deterministic_and_duplicates_do_not_matter(case: tuple[str, list[int]]) -> None:
    history = _random_history(*case)
    doubled = [e for e in history for _ in (0, 1)]
    assert core.replay(history) == core.replay(list(history)) == core.replay(doubled)


# ---------------------------------------------------------------- the handler over an in-memory cloud
class FakeCloud:
    """A CloudProvider in memory: ensure is idempotent per (cluster, step); counts every create."""

    name = "fake"

    def __init__(self, faults: dict[tuple[str, ProvisionStep], list[CloudError]] | None = None) -> None:
        self.live: dict[tuple[str, str], dict[str, Any]] = {}
        self.creates: Counter[tuple[str, str]] = Counter()
        self.calls: list[tuple[str, str]] = []
        # Every delete as (step, resources, whether the spec was known): by id, or a lookup by our tag (None).
        self.deletes: list[tuple[ProvisionStep, dict[str, Any] | None, bool]] = []
        self.faults = faults or {}

    def _fault(self, op: str, step: ProvisionStep) -> None:
        queue = self.faults.get((op, step))
        if queue:
            raise queue.pop(0)

    async def ensure(self, step: ProvisionStep, ctx: ClusterContext) -> dict[str, Any]:
        self.calls.append(("ensure", step))
        self._fault("ensure", step)
        key = (ctx.cluster_id, step)
        if key not in self.live:
            self.creates[key] += 1
            self.live[key] = fake_resources(step, ctx.cluster_id)
        return dict(self.live[key])

    async def delete(self, step: ProvisionStep, ctx: ClusterContext, resources: dict[str, Any] | None) -> None:
        self.calls.append(("delete", step))
        self.deletes.append((step, resources, ctx.spec is not None))
        self._fault("delete", step)
        self.live.pop((ctx.cluster_id, step), None)

    async def update(self, step: ProvisionStep, ctx: ClusterContext) -> Updated:
        """Converges node pools to the spec in place (the config hash stands for what they look like)."""
        self.calls.append(("update", step))
        self._fault("update", step)
        key = (ctx.cluster_id, step)
        if key not in self.live:
            raise NotInPlaceError(f"{step} does not exist")
        if step != "node_pools":
            return Updated(dict(self.live[key]), False)
        assert ctx.spec is not None
        want = ctx.spec.config_hash()
        changed = self.live[key].get("spec") != want
        self.live[key] = {**self.live[key], "spec": want}
        return Updated(dict(self.live[key]), changed)


class Runtime:
    """What the consumer runtime does, in memory: ledger, state per key, retries, on_exhausted."""

    def __init__(self, provisioner: Provisioner, max_deliver: int = 5) -> None:
        self.p = provisioner
        self.max_deliver = max_deliver
        self.states: dict[str, ProvisionerState] = {}
        self.ledger: set[str] = set()
        self.attempts: Counter[str] = Counter()
        self.log: dict[str, list[Envelope]] = {}  # per cluster, in processing order (what replay folds)
        self.published: list[Envelope] = []

    async def deliver(self, e: Envelope) -> list[Envelope] | None:
        """Handle one delivery. None: it failed and must be redelivered."""
        if e.id in self.ledger:
            return []
        key = e.subject
        state = self.states.get(key)
        self.attempts[e.id] += 1
        try:
            outcome = await self.p.handle(e, state)
        except Exception as exc:
            if self.attempts[e.id] < self.max_deliver:
                return None
            outcome = await self.p.on_exhausted(e, state, f"{type(exc).__name__}: {exc}")
        self.ledger.add(e.id)
        if outcome.state is not None:
            self.states[key] = outcome.state
        self.log.setdefault(key, []).extend([e, *outcome.events])
        self.published.extend(outcome.events)
        return list(outcome.events)

    async def run(self, inputs: list[Envelope], order: random.Random | None = None,
                  inject: dict[int, Envelope] | None = None) -> None:  # fmt: skip
        queue = list(inputs)
        inject = dict(inject or {})
        n = 0
        while queue or inject:
            if n in inject:
                queue.append(inject.pop(n))
            if not queue:
                n += 1
                continue
            e = queue.pop(order.randrange(len(queue)) if order else 0)
            out = await self.deliver(e)
            queue.extend([e] if out is None else out)
            n += 1
            assert n < 500, "no convergence"


def registry(cloud: FakeCloud) -> ProviderRegistry:
    return ProviderRegistry({"aws": cloud, "azure": cloud, "gcp": cloud})


async def test_handler_provisions_and_retires() -> None:
    cloud = FakeCloud()
    rt = Runtime(Provisioner(registry(cloud)))
    req = cluster_requested(PLAIN)
    await rt.run([env(req)])
    types = [e.type for e in rt.published]
    assert types == ["ClusterResourceProvisioned"] * 5 + ["ClusterProvisioned"]
    assert len(cloud.live) == 5 and set(cloud.creates.values()) == {1}
    await rt.run([env(retirement_requested(req))])
    assert cloud.live == {}
    assert [e.type for e in rt.published[6:]] == ["ClusterResourceDeprovisioned"] * 5 + ["ClusterDeprovisioned"]
    assert core.replay(rt.log[req.cluster_id]) == rt.states[req.cluster_id]


async def test_redelivering_everything_without_a_ledger_changes_nothing() -> None:
    """Replay proof when the ledger has expired: the state guards alone keep handlers from acting."""
    cloud = FakeCloud()
    rt = Runtime(Provisioner(registry(cloud)))
    req = cluster_requested(PLAIN)
    await rt.run([env(req)])
    final, published = rt.states[req.cluster_id], list(rt.published)
    rt.ledger.clear()
    await rt.run([e for e in rt.log[req.cluster_id] if e.type != "ClusterProvisioned"])
    assert rt.published == published and rt.states[req.cluster_id] == final
    assert set(cloud.creates.values()) == {1} and cloud.calls.count(("ensure", "network")) == 1


async def test_handler_terminal_error_emits_failure_and_stops() -> None:
    cloud = FakeCloud({("ensure", "cluster"): [QuotaExceededError("QuotaExceeded", "no more clusters")]})
    rt = Runtime(Provisioner(registry(cloud)))
    req = cluster_requested(PLAIN)
    await rt.run([env(req)])
    failed = ClusterProvisioningFailed.model_validate(rt.published[-1].data)
    assert (failed.step, failed.code, failed.retryable, failed.operation) == ("cluster", "QuotaExceeded", False,
                                                                             "provision")  # fmt: skip
    assert cloud.calls.count(("ensure", "cluster")) == 1 and set(rt.attempts.values()) == {1}  # never retried
    await rt.run([env(retirement_requested(req))])
    assert cloud.live == {} and rt.published[-1].type == "ClusterDeprovisioned"


async def test_handler_retries_retryable_then_records_exhaustion() -> None:
    throttled: list[CloudError] = [ThrottlingError("Throttling", "slow down") for _ in range(20)]
    cloud = FakeCloud({("ensure", "iam"): throttled})
    rt = Runtime(Provisioner(registry(cloud)), max_deliver=4)
    req = cluster_requested(PLAIN)
    await rt.run([env(req)])
    failed = ClusterProvisioningFailed.model_validate(rt.published[-1].data)
    assert (failed.step, failed.code, failed.retryable) == ("iam", "Throttling", True)
    assert cloud.calls.count(("ensure", "iam")) == 4
    # A new request retries once the throttling is over.
    cloud.faults.clear()
    await rt.run([env(req)])
    assert rt.published[-1].type == "ClusterProvisioned"


async def test_compensates_a_create_that_lost_the_race_to_a_retirement() -> None:
    """Two replicas: one creates step X while the other retires the cluster; the late create is undone."""
    cloud = FakeCloud()
    p = Provisioner(registry(cloud))
    req = cluster_requested(PLAIN)
    first = env(req)
    state = core.evolve(None, first)
    # Replica A performs ensure(network) for `first` ...
    outcome_a = await p.handle(first, None)
    assert list(cloud.live) == [(req.cluster_id, "network")]
    # ... but replica B committed the request and then a retirement meanwhile: A's commit conflicts.
    retired = core.evolve(state, env(retirement_requested(req)))
    assert retired is not None and outcome_a.state is not None
    # The runtime re-runs A's handler on the new state: the create is compensated, nothing else happens.
    rerun = await p.handle(first, retired)
    assert cloud.live == {} and list(rerun.events) == []


async def test_retirement_sweeps_what_a_crashed_first_request_left_and_the_redelivery_creates_nothing() -> None:
    """The first handling of a request creates the network, then the process dies before its commit."""
    cloud = FakeCloud()
    req = cluster_requested(PLAIN)
    first = env(req)
    await Provisioner(registry(cloud)).handle(first, None)  # its outcome is never committed
    assert list(cloud.live) == [(req.cluster_id, "network")]
    rt = Runtime(Provisioner(registry(cloud)))  # the restarted process
    await rt.run([env(retirement_requested(req))])  # handled before the request is redelivered
    assert cloud.live == {}
    assert [e.type for e in rt.published] == ["ClusterResourceDeprovisioned"] * 5 + ["ClusterDeprovisioned"]
    assert [step for step, res, _ in cloud.deletes] == list(reversed(PROVISION_STEPS))
    assert all(res is None for _, res, _ in cloud.deletes)
    await rt.run([first])  # the redelivery
    assert cloud.live == {} and cloud.creates[(req.cluster_id, "network")] == 1 and len(rt.published) == 6
    assert core.replay(rt.log[req.cluster_id]) == rt.states[req.cluster_id]


# ---------------------------------------------------------------- hypothesis: random runs converge
@given(
    name=st.sampled_from([PLAIN, BYON]),
    retire_at=st.one_of(st.none(), st.integers(0, 10)),
    rerequest_at=st.one_of(st.none(), st.integers(0, 10)),
    throttles=st.dictionaries(st.sampled_from(PROVISION_STEPS), st.integers(0, 2)),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_random_runs_converge(name: str, retire_at: int | None, rerequest_at: int | None,
                                    throttles: dict[ProvisionStep, int], seed: int) -> None:  # fmt: skip
    faults: dict[tuple[str, ProvisionStep], list[CloudError]] = {}
    for op in ("ensure", "delete"):
        faults.update({(op, s): [ThrottlingError("Throttling", "x") for _ in range(n)] for s, n in throttles.items()})
    cloud = FakeCloud(faults)
    rt = Runtime(Provisioner(registry(cloud)), max_deliver=10)
    req = cluster_requested(name)
    inject: dict[int, Envelope] = {}
    if retire_at is not None:
        inject[retire_at] = env(retirement_requested(req))
    if rerequest_at is not None:  # the planner re-emitting the request (another event id)
        inject[rerequest_at + (1 if rerequest_at == retire_at else 0)] = env(req)
    await rt.run([env(req)], order=random.Random(seed), inject=inject)

    cid = req.cluster_id
    state = rt.states[cid]
    types = Counter(e.type for e in rt.published)
    assert len({e.id for e in rt.published}) == len(rt.published), "an event id was emitted twice"
    steps = Counter(e.data["step"] for e in rt.published if e.type == "ClusterResourceProvisioned")
    assert all(n == 1 for n in steps.values()), steps
    assert all(n == 1 for n in cloud.creates.values()), "a resource was created twice"
    if name == BYON:
        assert (cid, "network") not in cloud.creates
        # The byon network is never deleted by id: only the sweep of a cluster retired before any request was
        # recorded (no spec, so byon is unknown) looks for a network, by our tag, which an adopted one never carries.
        assert all(res is None and not spec_known for step, res, spec_known in cloud.deletes if step == "network")
        if rt.log[cid][0].type == "ClusterRequested":
            assert ("delete", "network") not in cloud.calls  # known to be byon: not even looked for
    if retire_at is None:
        assert types["ClusterProvisioned"] == 1 and types["ClusterDeprovisioned"] == 0
        owned = set(PROVISION_STEPS) - ({"network"} if name == BYON else set())
        assert {s for _, s in cloud.live} == owned
    else:
        assert types["ClusterDeprovisioned"] == 1
        assert cloud.live == {}, f"left behind: {cloud.live}"
        assert core.remaining_steps(state) == []
    assert core.replay(rt.log[cid]) == state


@pytest.mark.parametrize("step", PROVISION_STEPS)
def test_every_step_maps_to_one_action(step: ProvisionStep) -> None:
    state = core.evolve(None, env(cluster_requested(PLAIN)))
    assert state is not None
    for done in PROVISION_STEPS[: PROVISION_STEPS.index(step)]:
        assert state is not None
        state = core.evolve(state, env(core.resource_provisioned(state, done, fake_resources(done, "c")), None, done))
    assert core.next_action(state) == Ensure(step)


# ---------------------------------------------------------------- in-place updates (pure)
def provisioned_state(name: str = PLAIN) -> tuple[ClusterRequested, ProvisionerState]:
    req = cluster_requested(name)
    state, _, _ = drive(None, [env(req)])
    assert state is not None and state.provisioned
    return req, state


def test_an_update_of_a_provisioned_cluster_converges_in_place_and_reports_its_generation() -> None:
    req, state = provisioned_state()
    assert (state.generation, state.config_hash) == (1, req.config_hash)
    update = update_requested(req, 2, maxCount=6, labels={"tier": "gold"})
    after, actions, emitted = drive(state, [env(update)])
    assert actions == [Update(2)]  # nothing created: no Ensure
    assert [e.type for e in emitted] == ["ClusterResourcesUpdated"]
    report = ClusterResourcesUpdated.model_validate(emitted[0].data)
    assert (report.generation, report.config_hash, report.changed) == (2, update.config_hash, ["node_pools"])
    assert set(report.resources) == set(PROVISION_STEPS)
    assert after is not None and after.spec == update.spec and after.generation == 2
    assert after.pending_update is None and core.next_action(after) is None


def test_an_older_or_repeated_update_is_ignored() -> None:
    req, provisioned = provisioned_state()
    update = update_requested(req, 2, maxCount=6)
    state, _, _ = drive(provisioned, [env(update)])
    for again in (env(update), env(update_requested(req, 1, maxCount=4)), env(update_requested(req, 2, maxCount=5))):
        after = core.evolve(state, again)
        assert after == state and not core.should_act(state, after, again)


def test_an_update_while_provisioning_is_used_by_the_remaining_steps_then_applied_once_provisioned() -> None:
    req = cluster_requested(PLAIN)
    first = env(req)
    state = core.evolve(None, first)
    step: ProvisionStep
    for step in ("network", "iam"):
        assert state is not None
        state = core.evolve(state, env(core.resource_provisioned(state, step, fake_resources(step, req.cluster_id)),
                                       first, step))  # fmt: skip
    update = update_requested(req, 2, maxCount=7)
    later = update_requested(req, 3, maxCount=8)  # a newer one supersedes it before the cluster is done
    state, actions, emitted = drive(state, [env(update), env(later)])
    assert actions == [Ensure("cluster"), Ensure("node_pools"), Ensure("log_stream"), EmitProvisioned(), Update(3)]
    assert state is not None and state.spec == later.spec and state.pending_update is None
    reports = [ClusterResourcesUpdated.model_validate(e.data) for e in emitted if e.type == "ClusterResourcesUpdated"]
    assert [(r.generation, r.config_hash) for r in reports] == [(3, later.config_hash)]


def test_a_retired_or_unknown_cluster_ignores_updates() -> None:
    req, state = provisioned_state()
    retired, _, _ = drive(state, [env(retirement_requested(req))])
    update = env(update_requested(req, 2, maxCount=6))
    assert core.evolve(retired, update) == retired
    assert core.evolve(None, update) is None
    # A report that arrives after the retirement brings nothing back.
    assert retired is not None
    late = ClusterResourcesUpdated(cluster_id=req.cluster_id, clusterset=req.clusterset, location=req.location,
                                   generation=2, config_hash="x", resources={"node_pools": {"id": "np"}})  # fmt: skip
    assert core.evolve(retired, env(late)) == retired


def test_a_retirement_wins_over_a_pending_update() -> None:
    req, state = provisioned_state()
    pending = core.evolve(state, env(update_requested(req, 2, maxCount=6)))
    assert pending is not None and core.next_action(pending) == Update(2)
    gone, actions, _ = drive(pending, [env(retirement_requested(req))])
    assert not any(isinstance(a, Update) for a in actions) and actions[-1] == EmitDeprovisioned()
    assert gone is not None and gone.deprovisioned


def test_a_failed_update_stops_then_the_same_update_asked_again_or_a_newer_one_retries() -> None:
    req, state = provisioned_state()
    update = update_requested(req, 2, maxCount=6)
    original = env(update)
    failed_state, actions, emitted = drive(state, [original], fail={"update": "NotInPlace"})
    assert actions == [Update(2)]
    failure = ClusterProvisioningFailed.model_validate(emitted[-1].data)
    assert (failure.operation, failure.step, failure.code, failure.retryable) == ("update", "node_pools",
                                                                                "NotInPlace", False)  # fmt: skip
    assert failed_state is not None and failed_state.pending_update is not None
    assert core.next_action(failed_state) is None
    assert drive(failed_state, [original])[1] == []  # a replay of the update that failed does not retry
    retried, actions, _ = drive(failed_state, [env(update)])  # asked again, after the failure: retried
    assert actions == [Update(2)] and retried is not None and retried.pending_update is None
    newer, actions, _ = drive(failed_state, [env(update_requested(req, 3, maxCount=9))])
    assert actions == [Update(3)] and newer is not None and newer.failure is None


def test_an_update_does_not_clear_a_provisioning_failure() -> None:
    req = cluster_requested(PLAIN)
    state, _, _ = drive(None, [env(req)], fail={"cluster": "QuotaExceeded"})
    update = update_requested(req, 2, maxCount=6)
    after, actions, _ = drive(state, [env(update)])
    assert actions == [] and after is not None and after.failure is not None and after.spec == update.spec
    # The planner asking for the cluster again retries provisioning, with the new spec, then the update runs.
    _, actions, _ = drive(after, [env(req)])
    assert actions == [Ensure("cluster"), Ensure("node_pools"), Ensure("log_stream"), EmitProvisioned(), Update(2)]


# ---------------------------------------------------------------- in-place updates through the handler
async def test_handler_updates_in_place_creating_nothing_and_a_replay_does_nothing() -> None:
    cloud = FakeCloud()
    rt = Runtime(Provisioner(registry(cloud)))
    req = cluster_requested(PLAIN)
    await rt.run([env(req)])
    creates = Counter(cloud.creates)
    update = update_requested(req, 2, maxCount=6, labels={"tier": "gold"})
    await rt.run([env(update)])
    reports = [e for e in rt.published if e.type == "ClusterResourcesUpdated"]
    assert len(reports) == 1 and reports[0].data["changed"] == ["node_pools"]
    assert cloud.creates == creates and cloud.live[(req.cluster_id, "node_pools")]["spec"] == update.config_hash
    assert [c for c in cloud.calls if c[0] == "update"] == [("update", s) for s in PROVISION_STEPS]
    published = list(rt.published)
    rt.ledger.clear()  # replay without the ledger: the state guards alone
    await rt.run(list(rt.log[req.cluster_id]))
    assert rt.published == published and cloud.creates == creates
    assert core.replay(rt.log[req.cluster_id]) == rt.states[req.cluster_id]


async def test_handler_terminal_update_error_names_the_step_and_exhaustion_is_retryable() -> None:
    cloud = FakeCloud({("update", "node_pools"): [NotInPlaceError("pool gpu does not exist")]})
    rt = Runtime(Provisioner(registry(cloud)), max_deliver=3)
    req = cluster_requested(PLAIN)
    await rt.run([env(req), env(update_requested(req, 2, maxCount=6))])
    failure = ClusterProvisioningFailed.model_validate(rt.published[-1].data)
    assert (failure.operation, failure.step, failure.code, failure.retryable) == ("update", "node_pools",
                                                                                "NotInPlace", False)  # fmt: skip
    cloud.faults[("update", "node_pools")] = [ThrottlingError("Throttling", "slow down") for _ in range(10)]
    await rt.run([env(update_requested(req, 3, maxCount=7))])
    failure = ClusterProvisioningFailed.model_validate(rt.published[-1].data)
    assert (failure.operation, failure.code, failure.retryable) == ("update", "Throttling", True)
    cloud.faults.clear()
    await rt.run([env(update_requested(req, 3, maxCount=7))])  # asked again: retried, and done
    assert rt.published[-1].type == "ClusterResourcesUpdated" and rt.published[-1].data["generation"] == 3


@given(
    retire_at=st.one_of(st.none(), st.integers(0, 12)),
    updates=st.lists(st.tuples(st.integers(1, 12), st.integers(2, 4)), max_size=4),
    throttles=st.dictionaries(st.sampled_from(PROVISION_STEPS), st.integers(0, 2)),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_random_runs_with_updates_converge_to_the_newest_generation(
        retire_at: int | None, updates: list[tuple[int, int]], throttles: dict[ProvisionStep, int], seed: int
) -> None:  # fmt: skip
    """Requests, updates (any generation, repeated, in any order) and a retirement, with throttling: nothing is
    created twice, no event id twice, at most one report per generation, and the cloud ends on the newest spec.

    The request is committed first (message 0, its network step not throttled): the planner only updates
    clusters it has seen provisioned, and an update of a cluster with no record is ignored."""
    faults: dict[tuple[str, ProvisionStep], list[CloudError]] = {}
    for op in ("ensure", "update", "delete"):
        faults.update({(op, s): [ThrottlingError("Throttling", "x") for _ in range(n)] for s, n in throttles.items()
                       if (op, s) != ("ensure", "network")})  # fmt: skip
    cloud = FakeCloud(faults)
    # One update message converges every step in turn: up to 5 steps x 2 throttles before it succeeds. Enough
    # deliveries that it never runs out (running out is the test above), so the run must converge.
    rt = Runtime(Provisioner(registry(cloud)), max_deliver=30)
    req = cluster_requested(PLAIN)
    specs = {g: update_requested(req, g, maxCount=3 + g) for g in (2, 3, 4)}
    inject: dict[int, Envelope] = {}
    for at, generation in updates:
        while at in inject:
            at += 1
        inject[at] = env(specs[generation])
    if retire_at is not None:
        while retire_at in inject:
            retire_at += 1
        inject[retire_at] = env(retirement_requested(req))
    await rt.run([env(req)], order=random.Random(seed), inject=inject)

    cid = req.cluster_id
    state = rt.states[cid]
    assert len({e.id for e in rt.published}) == len(rt.published), "an event id was emitted twice"
    assert all(n == 1 for n in cloud.creates.values()), "a resource was created twice"
    reports = Counter(e.data["generation"] for e in rt.published if e.type == "ClusterResourcesUpdated")
    assert all(n == 1 for n in reports.values()), reports
    assert core.replay(rt.log[cid]) == state
    if retire_at is not None:
        assert cloud.live == {} and core.remaining_steps(state) == []
        return
    newest = max((g for _, g in updates), default=1)
    assert state.generation == newest and state.pending_update is None
    assert state.spec == (specs[newest].spec if newest > 1 else req.spec)
    if updates:
        assert max(reports) == newest
        assert cloud.live[(cid, "node_pools")]["spec"] == specs[newest].config_hash
