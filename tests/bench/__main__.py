"""`make bench`: the pipeline against its floor, measured in the same run on the same machine.

Pipeline: one ClusterSet of N clusters (sim cloud, zero latency) from apply until the status
API shows all N READY, through every service as its own process over real NATS and Redis.
Floor: bare nats-py publishing the same number of messages of the same size to a JetStream
file stream and fetching + acking them back, on the same nats-server.
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
    doc = copy.deepcopy(example_documents()["modelserving-prod-aws-us-east-1"])
    doc["metadata"]["name"] = "bench-prod-aws-us-east-1"
    doc["spec"]["count"] = clusters
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
        "FLOTILLA_MAX_INFLIGHT": "128",
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
    finally:
        fleet.stop()
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
    print(f"pipeline_vs_floor={wall / floor_s:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clusters", type=int, default=1000)
    asyncio.run(main(parser.parse_args().clusters))
