"""The `local` ControlPlaneDriver on real etcd 3.4: the migration step by step, its rollbacks, fencing,
a restarted service finding a half-done migration, member replacement under a prober, and faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.etcd_migration.drivers.base import DriverError
from services.etcd_migration.drivers.faults import Fault
from services.etcd_migration.drivers.local import FIRST_NODE, LocalDriver, pick_port
from services.etcd_migration.drivers.proxy import ProxyConfig, applied_generation
from services.etcd_migration.prober import Prober
from shared.embedded import ServerProcess
from tests.etcd_fixtures import (
    VERSION,
    dump,
    ha_cluster,
    heartbeat,
    load,
    local_driver_fixture,  # noqa: F401 (the local_driver fixture)
    migrate,
    new_names,
    phase1,
    phase2,
    phase3,
    ref,
    rollback,
    sample_keys,
    try_put,
)
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]


async def test_migration_of_10000_keys_to_three_members(local_driver: LocalDriver) -> None:
    driver, r = local_driver, ref()
    info = await driver.ensure_control_plane(r, VERSION)
    assert [m.name for m in info.members] == [FIRST_NODE] and info.members[0].healthy
    assert await driver.ensure_control_plane(r, VERSION) == info  # idempotent
    public = info.public_endpoint
    await load(public, sample_keys(10_000))
    before = await dump(public)
    assert len(before) == 10_000 and sum(k.startswith(b"/registry/") for k in before) > 7000
    old_revision = (await driver.describe(r)).members[0].revision

    snapshot = await phase1(driver, r)
    assert snapshot.revision == old_revision and snapshot.hash and snapshot.total_keys >= 10_000
    await phase2(driver, r, snapshot)
    dark = await driver.describe(r)
    assert sorted(m.name for m in dark.members) == new_names(r)
    assert all(m.healthy for m in dark.members) and sum(m.is_leader for m in dark.members) == 1
    assert len({m.hashkv for m in dark.members}) == 1
    assert all(m.revision > old_revision for m in dark.members)
    assert dark.load_balanced and not dark.load_balancers_open and not await try_put(public)

    # The leases were last written before the restore: not heartbeating until the "kubelets" renew them.
    since = max(m.revision for m in dark.members)
    assert not await driver.kubelets_heartbeating(r, since)
    # Kubelets reach the new members through the internal endpoint once it opens; clients still cannot.
    await driver.open_internal_load_balancer(r)
    assert not await try_put(public) and (await driver.describe(r)).members[0].name != FIRST_NODE
    await heartbeat(driver, r)
    assert await driver.kubelets_heartbeating(r, since)
    with pytest.raises(DriverError, match="no rollback"):
        await driver.remove_new_nodes(r)  # past this point the new members take writes
    await phase3(driver, r)

    after = await driver.describe(r)
    assert (after.public_endpoint, after.internal_endpoint) == (info.public_endpoint, info.internal_endpoint)
    assert after.load_balanced and after.load_balancers_open and not after.mutations_stopped
    assert await dump(public) == before  # through the same address as before the migration
    for member in after.members:
        assert await dump(member.client_url) == before
    assert (await driver.validate(r)).ok

    # Lose a member (the leader, the harder case): the load balancer routes around it.
    leader = next(m for m in after.members if m.is_leader)
    await driver.kill_member(r, leader.name)
    assert await driver.down_members(r) == 1
    await wait_until(lambda: try_put(public), within=15)
    for i in range(20):
        assert await try_put(public, b"/app/after-loss", str(i).encode())
    assert (await dump(after.internal_endpoint))[b"/app/after-loss"] == b"19"


async def test_mutations_stop_lbs_stay_closed_and_the_old_node_is_fenced(local_driver: LocalDriver) -> None:
    driver, r = local_driver, ref()
    info = await driver.ensure_control_plane(r, VERSION)
    public, internal = info.public_endpoint, info.internal_endpoint
    assert await try_put(public) and await try_put(internal)

    await driver.stop_mutations(r)
    await driver.stop_mutations(r)  # a redo
    assert not await try_put(public) and not await try_put(internal)
    status = await driver.describe(r)
    assert status.mutations_stopped and status.members[0].healthy  # etcd still up, for the snapshot
    snapshot = await driver.snapshot_save(r)
    assert await driver.snapshot_save(r) == snapshot  # a redo reuses the verified file

    with pytest.raises(DriverError, match="running"):
        await driver.snapshot_disk(r, FIRST_NODE)  # a disk snapshot of a running VM would not be consistent
    await driver.stop_node(r, FIRST_NODE)
    assert await driver.down_members(r) == 1
    await phase2(driver, r, snapshot, until="create_load_balancers")
    assert not await try_put(public) and not await try_put(internal)  # closed: accepted and dropped
    await phase2(driver, r, snapshot)
    assert not await try_put(public)  # members up, still no traffic
    with pytest.raises(DriverError) as refused:
        await driver.start_node(r, FIRST_NODE)  # no longer a member: never beside the new ones
    assert not refused.value.retryable

    await phase3(driver, r)
    assert await try_put(public) and await try_put(internal)
    with pytest.raises(DriverError, match="fenced") as fenced:
        await driver.start_node(r, FIRST_NODE)
    assert not fenced.value.retryable
    assert (driver.state_dir / r.cluster_id / "nodes" / FIRST_NODE / "FENCED").exists()
    with pytest.raises(DriverError):
        await driver.remove_new_nodes(r)  # past phase 3 there is no rollback
    await driver.open_load_balancers(r)  # a redo
    assert await try_put(public)


@pytest.mark.parametrize("until", ["snapshot_save", "stop_node", "create_load_balancers", "restored"])
async def test_rollback_serves_the_same_data_from_the_same_address(local_driver: LocalDriver, until: str) -> None:
    driver, r = local_driver, ref()
    info = await driver.ensure_control_plane(r, VERSION)
    await load(info.public_endpoint, sample_keys(500))
    before = await dump(info.public_endpoint)

    snapshot = await phase1(driver, r, until=until)
    if until not in ("snapshot_save", "stop_node"):
        await phase2(driver, r, snapshot, until=None if until == "restored" else until)
    await rollback(driver, r)
    await rollback(driver, r)  # every rollback step is a redo-safe ensure

    back = await driver.describe(r)
    assert [m.name for m in back.members] == [FIRST_NODE] and back.members[0].healthy
    assert not back.load_balanced and not back.mutations_stopped
    assert back.public_endpoint == info.public_endpoint
    assert await dump(info.public_endpoint) == before
    assert not any((driver.state_dir / r.cluster_id / "nodes" / n).exists() for n in new_names(r))
    assert (await driver.validate(r)).ok

    if until != "restored":
        return
    # A new attempt afterwards goes through.
    again = ref(operation_id="op2")
    await migrate(driver, again)
    assert await dump(info.public_endpoint) == before
    assert sorted(m.name for m in (await driver.describe(again)).members) == new_names(again)


async def test_a_restarted_service_finds_a_half_done_migration(tmp_path: Path) -> None:
    state_dir, r = tmp_path / "controlplanes", ref()
    first = LocalDriver(state_dir)
    try:
        info = await first.ensure_control_plane(r, VERSION)
        await load(info.public_endpoint, sample_keys(300))
        before = await dump(info.public_endpoint)
        # The "service" runs phase 1 and half of phase 2 in its own process and is SIGKILLed mid-step.
        service = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.etcd_fixtures", str(state_dir), r.cluster_id, r.operation_id,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert service.stdout is not None
        line = await asyncio.wait_for(service.stdout.readline(), 60)
        assert line.strip() == b"STALLED"
        os.kill(service.pid, signal.SIGKILL)
        await asyncio.wait_for(service.wait(), 10)

        restarted = LocalDriver(state_dir)  # what the restarted service constructs
        found = await restarted.describe(r)
        assert found.mutations_stopped and found.load_balanced and not found.load_balancers_open
        assert found.public_endpoint == info.public_endpoint and found.members[0].name == FIRST_NODE
        # The load balancers its predecessor started outlived it, closed, on the same addresses.
        assert not await try_put(info.public_endpoint)
        meta = json.loads((state_dir / r.cluster_id / "cluster.json").read_text())
        assert sorted(n for n, node in meta["nodes"].items() if node["operation_id"]) == new_names(r)

        # It redoes the step that was running and carries on.
        snapshot = await restarted.snapshot_save(r)  # journaled result, here fetched by a redo
        await phase2(restarted, r, snapshot)
        await phase3(restarted, r)
        assert await dump(info.public_endpoint) == before
        assert (await restarted.validate(r)).ok
    finally:
        await LocalDriver(state_dir).destroy_all()


async def test_replace_node_keeps_quorum_under_the_prober(local_driver: LocalDriver) -> None:
    driver, r = local_driver, ref()
    public = await ha_cluster(driver, r)
    before = await dump(public)
    names = [m.name for m in (await driver.describe(r)).members]

    leader_windows: list[tuple[float, float]] = []
    async with Prober(public, lambda: driver.down_members(r), interval_s=0.05) as prober:
        await asyncio.sleep(0.5)
        for name in names:
            was_leader = any(m.is_leader for m in (await driver.describe(r)).members if m.name == name)
            started = time.time()
            await driver.replace_node(r, name, "1.30")
            await driver.replace_node(r, name, "1.30")  # a redo does nothing
            if was_leader:
                leader_windows.append((started, time.time()))
            assert (await driver.validate(r)).ok
        await asyncio.sleep(0.5)
    summary = await prober.summary()
    assert summary.requests > 40 and summary.requests_without_quorum == 0
    # Quorum holds throughout. The one allowed window is the leader's replacement: a request caught by the
    # leader change ("leader changed", a dropped proposal) fails there and nowhere else.
    failed = [s for s in await prober.samples() if not s.ok]
    assert all(any(a <= s.t <= b for a, b in leader_windows) for s in failed), (summary, leader_windows)
    assert summary.availability_pct >= 95.0, summary

    status = await driver.describe(r)
    assert {m.version for m in status.members} == {"1.30"} and all(m.healthy for m in status.members)
    assert await dump(public) == before

    # With one member already down, replacing another would leave one of three: refused.
    await driver.kill_member(r, names[0])
    with pytest.raises(DriverError, match="quorum"):
        await driver.replace_node(r, names[1], "1.31")
    # Bringing the crashed member back is a replacement too (same disk and identity).
    await driver.replace_node(r, names[0], "1.30")
    assert (await driver.validate(r)).ok


async def test_faults_make_a_step_fail_before_or_after_its_work(local_driver: LocalDriver) -> None:
    driver, r = local_driver, ref()
    info = await driver.ensure_control_plane(r, VERSION)
    await driver.fail_on("stop_mutations", times=2)
    for _ in range(2):
        with pytest.raises(DriverError, match="injected") as failed:
            await driver.stop_mutations(r)
        assert not failed.value.retryable
    assert await try_put(info.public_endpoint)  # failed before doing anything

    await driver.fail_on("stop_mutations", after=True, retryable=True)
    with pytest.raises(DriverError):
        await driver.stop_mutations(r)
    assert not await try_put(info.public_endpoint)  # done, though the caller heard of a failure
    await driver.stop_mutations(r)  # the redo
    with pytest.raises(ValueError):
        await driver.fail_on("no_such_step")
    await driver.inject(Fault("validate", cluster_id="other"))
    assert not (await driver.validate(r)).ok  # mutations are stopped: the endpoint write fails
    await driver.resume_mutations(r)
    assert (await driver.validate(r)).ok  # the fault was for another cluster


async def test_faults_through_redis_reach_another_driver_instance(tmp_path: Path, redis_proc: ServerProcess) -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{redis_proc.port}/0", decode_responses=True)
    service_side = LocalDriver(tmp_path / "cp", redis)
    try:
        r = ref()
        await service_side.ensure_control_plane(r, VERSION)
        # The test's own instance injects; the "service's" instance fails, once.
        await LocalDriver(tmp_path / "cp", redis).fail_on("snapshot_save", cluster_id=r.cluster_id)
        with pytest.raises(DriverError, match="injected"):
            await service_side.snapshot_save(r)
        assert (await service_side.snapshot_save(r)).total_keys >= 1
        await service_side.clear_faults()
    finally:
        await service_side.destroy_all()
        await redis.aclose()


async def test_the_proxy_tries_the_next_backend_and_changes_in_place(tmp_path: Path) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"backend:" + await reader.read(100))
        await writer.drain()
        writer.close()

    async def ask(port: int) -> bytes:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hi")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(100), 2)
            writer.close()
            return answer
        except ConnectionError:
            return b""

    backend = await asyncio.start_server(echo, "127.0.0.1", 0)
    up = backend.sockets[0].getsockname()[1]
    down, listen = pick_port(set()), pick_port(set())  # nothing listens on `down`
    config = tmp_path / "lb.json"
    config.write_text(ProxyConfig(open=True, backends=[f"127.0.0.1:{down}", f"127.0.0.1:{up}"]).to_json())
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.etcd_migration.drivers.proxy", "--listen", f"127.0.0.1:{listen}",
        "--config", str(config), cwd=REPO,
    )  # fmt: skip
    try:
        await wait_until(lambda: applied_generation(config) == 0)
        assert [await ask(listen) for _ in range(4)] == [b"backend:hi"] * 4  # the refusing one is skipped

        config.write_text(ProxyConfig(open=False, backends=[f"127.0.0.1:{up}"], generation=1).to_json())
        proxy.send_signal(signal.SIGHUP)
        await wait_until(lambda: applied_generation(config) == 1)
        assert await ask(listen) == b""  # closed: accepted, and closed with nothing forwarded

        config.write_text(ProxyConfig(open=True, backends=[f"127.0.0.1:{up}"], generation=2).to_json())
        proxy.send_signal(signal.SIGHUP)
        await wait_until(lambda: applied_generation(config) == 2)
        assert await ask(listen) == b"backend:hi"  # same address throughout
    finally:
        proxy.terminate()
        await proxy.wait()
        backend.close()
