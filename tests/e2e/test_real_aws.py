"""The whole pipeline on the real AWS driver: every service as its own process, boto3 against moto's server.

A user applies a ClusterSet; planner → cloud_provisioner (EKS via boto3) → infra_installer →
status_projector take it to READY; scaling down deprovisions through the same driver.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import example_documents
from tests.e2e.fleet import Fleet
from tests.fakes.moto_server import MotoServer, inventory, moto_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "modelserving-prod-aws-us-east-1"


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture
def aws_fleet(tmp_path: Path, moto: MotoServer) -> Iterator[Fleet]:
    fleet = Fleet(workdir=tmp_path, env_overrides={**moto.env(), "FLOTILLA_CLOUD_POLL_S": "0.2"}).start()
    yield fleet
    fleet.stop()


async def test_a_clusterset_goes_ready_on_eks_and_scales_down_through_the_real_driver(aws_fleet: Fleet,
                                                                                      moto: MotoServer):  # fmt: skip
    doc = copy.deepcopy(example_documents()[NAME])
    doc["spec"]["count"] = 2
    async with aws_fleet.client() as client:
        await aws_fleet.wait_for(client.ready, what="status API ready")
        assert (await client.apply(doc)).accepted
        states = await aws_fleet.wait_states(client, {"READY": 2}, timeout=240)
        ours = inventory(moto)
        assert set(ours) == set(states)
        for cid in states:
            view = await client.cluster(cid)
            assert view and view["credentialRef"].startswith("eks://us-east-1/")
            assert view["endpoint"].startswith("https://")
            assert ours[cid]["eks_cluster"] == 1 and ours[cid]["nodegroup"] == 1 and ours[cid]["vpc"] == 1
        doc["spec"]["count"] = 1
        assert (await client.apply(doc)).accepted
        final = await aws_fleet.wait_states(client, {"READY": 1, "DELETED": 1}, timeout=240)
    gone = next(cid for cid, state in final.items() if state == "DELETED")
    left = inventory(moto)
    assert gone not in left or sum(left[gone].values()) == 0, left.get(gone)
