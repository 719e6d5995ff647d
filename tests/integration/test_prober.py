"""The availability prober: the pure summary, and probing real etcd through the driver's endpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.asyncio import Redis

from services.etcd_migration.drivers.local import FIRST_NODE, LocalDriver
from services.etcd_migration.prober import Prober, ProbeSample, summarize
from shared.embedded import ServerProcess
from tests.etcd_fixtures import (
    VERSION,
    ha_cluster,
    local_driver_fixture,  # noqa: F401 (the local_driver fixture)
    ref,
)
from tests.helpers import wait_until


def s(t: float, ok: bool, down: int = 0, op: str = "put") -> ProbeSample:
    return ProbeSample(t, op, ok, down)


# ---------------------------------------------------------------- summarize (pure)
def test_nothing_probed_is_nothing_failed() -> None:
    summary = summarize([])
    assert (summary.requests, summary.succeeded, summary.availability_pct, summary.downtime_s) == (0, 0, 100.0, 0.0)


def test_availability_and_the_longest_outage() -> None:
    samples = [s(0.0, True), s(0.1, False), s(0.2, False), s(0.3, True),  # 0.2 s outage
               s(1.0, False), s(1.1, False), s(1.2, False), s(1.5, True),  # 0.5 s outage
               s(2.0, False), s(2.05, True)]  # fmt: skip
    summary = summarize(list(reversed(samples)))  # order of arrival does not matter: sorted by send time
    assert summary.requests == 10 and summary.succeeded == 4
    assert summary.availability_pct == 40.0
    assert summary.downtime_s == 0.5


def test_a_trailing_outage_counts_up_to_its_last_failure() -> None:
    summary = summarize([s(0.0, True), s(1.0, False), s(1.75, False)])
    assert summary.downtime_s == 0.75 and round(summary.availability_pct, 2) == 33.33


def test_requests_without_quorum_are_those_sent_with_two_or_more_nodes_down() -> None:
    samples = [s(0, True, down=1), s(1, False, down=2), s(2, False, down=3), s(3, True, down=2, op="range")]
    summary = summarize(samples)
    assert (summary.requests_without_quorum, summary.succeeded_without_quorum) == (3, 1)
    assert summarize(samples, quorum_lost_at=1).requests_without_quorum == 4  # a single node: one down is all


def test_samples_round_trip_through_their_stored_form() -> None:
    sample = ProbeSample(1_700_000_000.1234, "range", False, 2)
    assert ProbeSample.decode(sample.encode()) == sample


# ---------------------------------------------------------------- probing real etcd
async def test_the_prober_sees_mutations_stop_and_resume(local_driver: LocalDriver) -> None:
    driver, r = local_driver, ref()
    info = await driver.ensure_control_plane(r, VERSION)
    async with Prober(info.public_endpoint, lambda: driver.down_members(r), interval_s=0.05) as prober:
        await wait_until(lambda: len(prober._kept) >= 10)
        await driver.stop_mutations(r)
        await asyncio.sleep(1.0)
        await driver.resume_mutations(r)
        await asyncio.sleep(0.5)
    summary = await prober.summary()
    samples = await prober.samples()
    assert {x.op for x in samples} == {"put", "range"}
    assert 0 < summary.succeeded < summary.requests
    assert 0.8 <= summary.downtime_s <= 2.5, summary
    assert summary.requests_without_quorum == 0  # one node, up throughout: only its API servers were off


async def test_quorum_loss_fails_every_request_and_samples_survive_a_restart(
    local_driver: LocalDriver, redis_proc: ServerProcess, tmp_path: Path
) -> None:
    driver, r = local_driver, ref()
    public = await ha_cluster(driver, r, keys=50)
    members = [m.name for m in (await driver.describe(r)).members]
    redis = Redis.from_url(f"redis://127.0.0.1:{redis_proc.port}/0", decode_responses=True)
    key = "test:{etcd_migration}:probe:op1"
    try:
        async with Prober(public, lambda: driver.down_members(r), redis=redis, key=key, timeout_s=0.5) as first:
            await wait_until(lambda: len(first._kept) >= 10)
        stored = len(await first.samples())
        assert stored >= 10 and (await first.summary()).availability_pct == 100.0

        # The "restarted service" probes on under the same key: one tally. Two of three members go down.
        async with Prober(public, lambda: driver.down_members(r), redis=redis, key=key, timeout_s=0.5) as second:
            for name in members[:2]:
                await driver.kill_member(r, name)
            await asyncio.sleep(1.5)
        summary = await second.summary()
        assert summary.requests > stored
        assert summary.requests_without_quorum > 0 and summary.succeeded_without_quorum == 0
        assert summary.availability_pct < 100.0

        for name in members[:2]:  # a crashed member comes back from its own disk
            await driver.start_node(r, name)
        assert (await driver.validate(r)).ok
        assert FIRST_NODE not in members
    finally:
        await redis.aclose()
