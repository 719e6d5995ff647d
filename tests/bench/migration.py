"""`make bench` (second part): one control-plane migration of a 10,000-key etcd on the `local` driver.

Real etcd processes (Debian's etcd-server), driven through etcd_migration's own handler and journal
(tests/migrator_loop.py). The availability prober writes and reads through the public endpoint
every 50 ms; three "kubelets" renew their node leases through the internal endpoint every 0.5 s
(the migration waits for a renewal before it starts controller-manager). Prints the migration's
wall time, each step's duration, the outage and availability the prober measured, then the same
for an upgrade of the resulting three members, one at a time.
Floor: the unavoidable work on the same data, measured beside it: `etcdctl snapshot save` from the
node plus one `etcdctl snapshot restore` of that file. Last line: `migration_outage_vs_floor`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from datetime import datetime
from pathlib import Path

from redis.asyncio import Redis

from services.etcd_migration.app import Migrator
from services.etcd_migration.drivers import etcd
from services.etcd_migration.drivers.base import ControlPlaneRef
from services.etcd_migration.drivers.local import LocalDriver
from services.etcd_migration.probes import ProbeHub
from shared.embedded import redis_server
from shared.events import Envelope, decode_payload
from shared.events.models import ControlPlaneMigrationCompleted, ControlPlaneUpgradeCompleted
from tests.etcd_fixtures import dump, load, sample_keys
from tests.migrator_loop import request, run_operation


async def floor(endpoint: str, workdir: Path) -> float:
    """Seconds for `snapshot save` of the node plus one `snapshot restore` of the file."""
    started = time.perf_counter()
    path = workdir / "floor.db"
    await etcd.etcdctl("snapshot", "save", str(path), endpoints=[endpoint])
    await etcd.etcdctl("snapshot", "restore", str(path), "--data-dir", str(workdir / "floor-restored"),
                       "--name", "m0", "--initial-cluster", "m0=http://127.0.0.1:1",
                       "--initial-advertise-peer-urls", "http://127.0.0.1:1")  # fmt: skip
    return time.perf_counter() - started


async def kubelets(endpoint: str, leases: list[bytes], every_s: float = 0.5) -> None:
    """Renew each node lease through the internal endpoint, as kubelets do; failures are waited out."""
    target = etcd.GatewayProbeTarget(endpoint, timeout_s=1.0)
    try:
        while True:
            for key in leases:
                with contextlib.suppress(Exception):
                    await target.put(key, b"renewed")
            await asyncio.sleep(every_s)
    finally:
        await target.aclose()


def step_times(events: list[Envelope], first: Envelope) -> list[tuple[str, float]]:
    """(step, ms) from the previous event's time to this step's completion."""
    out, last = [], first.time
    for env in events:
        step = env.data.get("step")
        node = env.data.get("node")
        at: datetime = env.time
        if step:
            out.append((f"{node}:{step}" if node else str(step), (at - last).total_seconds() * 1000))
        last = at
    return out


async def main(keys: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="flotilla-bench-migration-"))
    server = redis_server(workdir / "redis").start()
    redis = Redis.from_url(f"redis://127.0.0.1:{server.port}/0", decode_responses=True)
    driver = LocalDriver(workdir / "controlplanes", redis)
    renewing: asyncio.Task[None] | None = None
    try:
        ref = ControlPlaneRef("bench-cp", "seed")
        info = await driver.ensure_control_plane(ref, "1.29")
        items = sample_keys(keys)
        await load(info.public_endpoint, items)
        leases = [k for k, _ in items if k.startswith(etcd.LEASE_PREFIX)]
        renewing = asyncio.create_task(kubelets(info.internal_endpoint, leases))
        floor_s = await floor(info.members[0].client_url, workdir)
        migrator = Migrator(driver, ProbeHub(redis, "bench", driver, interval_s=0.05))

        first = request("bench-cp", "migrate-1")
        started = time.perf_counter()
        events = await run_operation(migrator, first)
        wall = time.perf_counter() - started
        done = decode_payload(events[-1])
        assert isinstance(done, ControlPlaneMigrationCompleted) and done.availability, events[-1].data
        assert done.endpoint == info.public_endpoint, "clients keep their address"
        after = await dump(info.public_endpoint)
        assert {k: v for k, v in after.items() if not k.startswith(etcd.LEASE_PREFIX)} == {
            k: v for k, v in items if not k.startswith(etcd.LEASE_PREFIX)}, "every key and value kept"

        up_first = request("bench-cp", "upgrade-1", kind="upgrade", to_version="1.30")
        up_started = time.perf_counter()
        up_events = await run_operation(migrator, up_first)
        up_wall = time.perf_counter() - up_started
        upgraded = decode_payload(up_events[-1])
        assert isinstance(upgraded, ControlPlaneUpgradeCompleted) and upgraded.availability, up_events[-1].type
    finally:
        if renewing is not None:
            renewing.cancel()
        await driver.destroy_all()
        await redis.aclose()
        server.stop()

    a, u = done.availability, upgraded.availability
    print(f"keys={keys}")
    print(f"migration_wall_s={wall:.2f}")
    print("migration_step_ms=" + " ".join(f"{s}={ms:.0f}" for s, ms in step_times(events, first)))
    print(f"migration_outage_s={a.downtime_s:.3f} availability_pct={a.availability_pct:.1f}"
          f" requests={a.requests} succeeded_without_quorum={a.succeeded_without_quorum}")
    print(f"upgrade_wall_s={up_wall:.2f} availability_pct={u.availability_pct:.1f} requests={u.requests}"
          f" outage_s={u.downtime_s:.3f} succeeded_without_quorum={u.succeeded_without_quorum}")
    print(f"floor_snapshot_save_restore_s={floor_s:.2f}")
    print(f"migration_outage_vs_floor={a.downtime_s / floor_s:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().keys))
