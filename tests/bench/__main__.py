"""`make bench`: the pipeline against its floor, measured in the same run on the same machine.

Pipeline: one ClusterSet of N clusters (sim cloud, zero latency) from apply until the status
API shows all N READY, through every service as its own process over real NATS and Redis.
Floor: bare nats-py publishing the same number of messages of the same size to a JetStream
file stream and fetching + acking them back, on the same nats-server.
Rotation: the same N clusters get a Kubernetes minor version bump with maxSurge 10% and are
replaced batch by batch until the rollout completes: wall time, FLEET events per rotated
cluster, and the orchestration overhead per batch (how long rotation takes to react to the
fact that lets a batch move on: READY -> drain, drained -> retire, deleted -> next batch),
taken from event times in the stream. It has its own floor (the same number of messages).
Control planes: a self-managed ClusterSet of N clusters (created first, not timed) gets
`controlPlane.ha: true`, so every control plane is migrated from one node to three on the `sim`
driver (zero latency), `maxUnavailable` (N/20) at a time, each with its availability prober:
wall time until the set converges, FLEET events per migration, the orchestration overhead per
step (ms from a step's event to the next step's event of the same cluster), etcd_migration's CPU
per migration, the outage the probers measured, and a floor of the same number of messages.
Last line: `pipeline_vs_floor=<pipeline seconds / floor seconds>`.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import nats
from nats.js import api as jsapi

from shared.events import subjects
from tests.conftest import example_documents
from tests.e2e.fleet import Fleet


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (where the pipeline's time goes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def fleet_stats(fleet: Fleet) -> tuple[int, int]:
    nc = await nats.connect(fleet.settings.nats_url)
    info = await nc.jetstream().stream_info(subjects.STREAM_FLEET)
    await nc.close()
    return info.state.messages, info.state.bytes


async def pipeline(fleet: Fleet, clusters: int) -> float:
    doc = bench_document(clusters)
    async with fleet.client() as client:
        await fleet.wait_for(client.ready, what="status API")
        started = time.perf_counter()
        result = await client.apply(doc, wait_s=120)
        assert result.accepted, result.errors

        async def all_ready() -> bool:
            view = await client.clusterset(doc["metadata"]["name"])
            return bool(view) and view["status"]["readyClusters"] >= clusters

        await fleet.wait_for(all_ready, timeout=1800, what=f"{clusters} clusters READY")
        return time.perf_counter() - started


async def rotation(fleet: Fleet, clusters: int) -> float:
    doc = bench_document(clusters)
    doc["spec"]["kubernetesVersion"] = "1.31"
    doc["spec"]["updateStrategy"] = {"type": "cluster-rotation", "maxSurge": max(1, clusters // 10),
                                     "maxUnavailable": 0}  # fmt: skip
    async with fleet.client() as client:
        started = time.perf_counter()
        result = await client.apply(doc, wait_s=120)
        assert result.accepted, result.errors

        async def completed() -> bool:
            view = await client.clusterset(doc["metadata"]["name"]) or {}
            return (view.get("rollout") or {}).get("state") == "COMPLETED"

        await fleet.wait_for(completed, timeout=3600, what="rotation completed")
        return time.perf_counter() - started


async def history(fleet: Fleet, first_seq: int) -> AsyncIterator[dict]:
    """FLEET events from `first_seq` on, decoded, in stream order."""
    nc = await nats.connect(fleet.settings.nats_url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(subjects.FLEET_ALL, stream=subjects.STREAM_FLEET,
                                  config=jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE,
                                                              opt_start_seq=first_seq,
                                                              ack_policy=jsapi.AckPolicy.NONE))  # fmt: skip
    try:
        while True:
            try:
                msgs = await sub.fetch(500, timeout=2)
            except nats.errors.TimeoutError:
                return
            for m in msgs:
                yield json.loads(m.data)
    finally:
        await nc.close()


async def rotation_reactions(fleet: Fleet, first_seq: int) -> dict[str, float]:
    """Mean ms from the fact that allowed a rotation decision to the decision, per kind of decision."""
    times: dict[str, tuple[str, datetime]] = {}
    delays: dict[str, list[float]] = {"drain": [], "retire": [], "create": []}
    kind = {"ClusterDrainRequested": "drain", "ClusterRetirementRequested": "retire", "ClusterRequested": "create"}
    async for env in history(fleet, first_seq):
        at = datetime.fromisoformat(env["time"])
        times[env["id"]] = (env["type"], at)
        cause = times.get(env.get("causation_id") or "")
        if env["source"] == "rotation" and env["type"] in kind and cause:
            delays[kind[env["type"]]].append((at - cause[1]).total_seconds() * 1000)
    return {k: (sum(v) / len(v) if v else 0.0) for k, v in delays.items()}


def self_managed_document(clusters: int, ha: bool) -> dict:
    doc = copy.deepcopy(example_documents()["core-prod-aws-eu-west-1"])
    doc["metadata"]["name"] = "bench-core-aws-eu-west-1"
    doc["spec"]["count"] = clusters
    doc["spec"]["controlPlane"] = {"mode": "self-managed", "ha": ha}
    doc["spec"]["updateStrategy"] = {"type": "in-place", "maxUnavailable": max(1, clusters // 20)}
    return doc


async def controlplanes(fleet: Fleet, clusters: int) -> tuple[float, int]:
    """Create the self-managed set (untimed), then time its migration to HA; returns (seconds, first FLEET seq)."""
    async with fleet.client() as client:
        doc = self_managed_document(clusters, ha=False)
        assert (await client.apply(doc, wait_s=120)).accepted

        async def ready() -> bool:
            view = await client.clusterset(doc["metadata"]["name"])
            return bool(view) and view["status"]["readyClusters"] >= clusters

        await fleet.wait_for(ready, timeout=1800, what=f"{clusters} self-managed clusters READY")
        first_seq = (await fleet_stats(fleet))[0] + 1
        started = time.perf_counter()
        result = await client.apply(self_managed_document(clusters, ha=True), wait_s=120)
        assert result.accepted, result.errors

        async def migrated() -> bool:
            found = await client.migrations(kind="pipeline", clusterset=doc["metadata"]["name"])
            return any(p.get("state") in ("COMPLETED", "HALTED") for p in found)

        await fleet.wait_for(migrated, timeout=3600, what="control-plane pipeline ended")
        elapsed = time.perf_counter() - started
        ended = await client.migrations(kind="migration", clusterset=doc["metadata"]["name"])
        assert sum(m["state"] == "COMPLETED" for m in ended) == clusters, "every control plane migrated"
        return elapsed, first_seq


async def controlplane_figures(fleet: Fleet, first_seq: int) -> dict[str, float]:
    """Per-step orchestration overhead and what the probers measured, from the FLEET history of the phase."""
    last_step: dict[str, datetime] = {}
    gaps: list[float] = []
    downtime: list[float] = []
    availability: list[float] = []
    migrations = 0
    steps = ("ControlPlaneMigrationRequested", "ControlPlaneMigrationStepCompleted", "ControlPlaneMigrationCompleted")
    async for env in history(fleet, first_seq):
        at, data = datetime.fromisoformat(env["time"]), env["data"]
        if env["type"] in steps:
            cid = data["cluster_id"]
            if cid in last_step and env["type"] != "ControlPlaneMigrationRequested":
                gaps.append((at - last_step[cid]).total_seconds() * 1000)
            last_step[cid] = at
        if env["type"] == "ControlPlaneMigrationCompleted":
            migrations += 1
            if data.get("availability"):
                downtime.append(data["availability"]["downtime_s"])
                availability.append(data["availability"]["availability_pct"])
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"migrations": migrations, "step_ms": mean(gaps), "downtime_s": mean(downtime),
            "max_downtime_s": max(downtime, default=0.0), "availability_pct": mean(availability)}  # fmt: skip


def bench_document(clusters: int) -> dict:
    doc = copy.deepcopy(example_documents()["modelserving-prod-aws-us-east-1"])
    doc["metadata"]["name"] = "bench-prod-aws-us-east-1"
    doc["spec"]["count"] = clusters
    return doc


async def floor(nats_url: str, messages: int, size: int) -> tuple[float, float]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(jsapi.StreamConfig(name="BENCHFLOOR", subjects=["benchfloor.>"],
                                           storage=jsapi.StorageType.FILE))  # fmt: skip
    payload = b"x" * size
    started = time.perf_counter()
    pending = []
    for i in range(messages):
        pending.append(await js.publish_async(f"benchfloor.{i % 100}", payload, headers={"Nats-Msg-Id": str(i)}))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    publish_s = time.perf_counter() - started
    sub = await js.pull_subscribe("benchfloor.>", durable="floor", stream="BENCHFLOOR")
    started = time.perf_counter()
    got = 0
    while got < messages:
        msgs = await sub.fetch(min(256, messages - got), timeout=10)
        for m in msgs:
            await m.ack()
        got += len(msgs)
    consume_s = time.perf_counter() - started
    await js.delete_stream("BENCHFLOOR")
    await nc.close()
    return publish_s, consume_s


async def main(clusters: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="flotilla-bench-"))
    fleet = Fleet(workdir=workdir, env_overrides={
        "FLOTILLA_SIM_LATENCY_S": "0", "FLOTILLA_SIM_INSTALL_LATENCY_S": "0", "FLOTILLA_LOG_LEVEL": "WARNING",
        "FLOTILLA_MAX_INFLIGHT": "128", "FLOTILLA_CONTROLPLANE_DRIVER": "sim",
        "FLOTILLA_CONTROLPLANE_PROBE_INTERVAL_S": "0.25",
    }).start()  # fmt: skip
    try:
        wall = await pipeline(fleet, clusters)
        events, stream_bytes = await fleet_stats(fleet)
        rss = {name: rss_mib(proc.pid) for (name, _), proc in fleet.procs.items()}
        cpu = {name: cpu_s(proc.pid) for (name, _), proc in fleet.procs.items()}
        assert fleet.nats and fleet.redis and fleet.nats.proc and fleet.redis.proc
        cpu["nats-server"] = cpu_s(fleet.nats.proc.pid)
        cpu["redis-server"] = cpu_s(fleet.redis.proc.pid)
        publish_s, consume_s = await floor(fleet.settings.nats_url, events, max(1, stream_bytes // max(events, 1)))
        rotate_wall = await rotation(fleet, clusters)
        all_events, all_bytes = await fleet_stats(fleet)
        rotate_events = all_events - events
        reactions = await rotation_reactions(fleet, events + 1)
        rot_publish_s, rot_consume_s = await floor(fleet.settings.nats_url, rotate_events,
                                                   max(1, (all_bytes - stream_bytes) // max(rotate_events, 1)))
        rotation_cpu = cpu_s(fleet.procs[("rotation", 0)].pid) - cpu["rotation"]
        migrator_cpu = cpu_s(fleet.procs[("etcd_migration", 0)].pid)
        cp_wall, cp_first = await controlplanes(fleet, clusters)
        migrator_cpu = cpu_s(fleet.procs[("etcd_migration", 0)].pid) - migrator_cpu
        cp_events = (await fleet_stats(fleet))[0] - cp_first + 1
        cp = await controlplane_figures(fleet, cp_first)
        cp_publish_s, cp_consume_s = await floor(fleet.settings.nats_url, cp_events, 1000)
    finally:
        fleet.stop()
    batches = -(-clusters // max(1, clusters // 10))
    floor_s = publish_s + consume_s
    print(f"clusters={clusters}")
    print(f"pipeline_wall_s={wall:.2f}")
    print(f"fleet_events={events} avg_event_bytes={stream_bytes // max(events, 1)}")
    print(f"pipeline_events_per_s={events / wall:.0f}")
    print(f"clusters_ready_per_s={clusters / wall:.1f}")
    print(f"floor_publish_s={publish_s:.2f} ({events / publish_s:.0f} msg/s)")
    print(f"floor_fetch_ack_s={consume_s:.2f} ({events / consume_s:.0f} msg/s)")
    print(f"floor_s={floor_s:.2f}")
    print("service_rss_mib=" + json.dumps({k: round(v, 1) for k, v in rss.items()}))
    print("cpu_s=" + json.dumps({k: round(v, 1) for k, v in cpu.items()}))
    print(f"rotation_wall_s={rotate_wall:.2f} batches={batches} max_surge={max(1, clusters // 10)}")
    print(f"rotation_events={rotate_events} events_per_rotated_cluster={rotate_events / clusters:.1f}")
    print("rotation_reaction_ms=" + json.dumps({k: round(v, 1) for k, v in reactions.items()}))
    print(f"rotation_orchestration_ms_per_batch={sum(reactions.values()):.1f}"
          f" rotation_cpu_ms_per_batch={rotation_cpu * 1000 / batches:.0f}")
    print(f"rotation_vs_floor={rotate_wall / (rot_publish_s + rot_consume_s):.1f}")
    print(f"controlplane_wall_s={cp_wall:.2f} migrations={cp['migrations']:.0f}"
          f" concurrency={max(1, clusters // 20)} migrations_per_s={cp['migrations'] / cp_wall:.1f}")
    print(f"controlplane_events={cp_events} events_per_migration={cp_events / max(cp['migrations'], 1):.1f}")
    print(f"controlplane_step_orchestration_ms={cp['step_ms']:.1f}"
          f" migrator_cpu_ms_per_migration={migrator_cpu * 1000 / max(cp['migrations'], 1):.0f}")
    print(f"controlplane_outage_s_mean={cp['downtime_s']:.3f} max={cp['max_downtime_s']:.3f}"
          f" availability_pct_mean={cp['availability_pct']:.1f}")
    print(f"controlplane_vs_floor={cp_wall / (cp_publish_s + cp_consume_s):.1f}")
    print(f"pipeline_vs_floor={wall / floor_s:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clusters", type=int, default=1000)
    asyncio.run(main(parser.parse_args().clusters))
