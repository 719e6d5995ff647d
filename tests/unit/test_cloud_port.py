"""Rules every real cloud driver shares (services/cloud_provisioner/providers/base.py)."""

from __future__ import annotations

import pytest

from services.cloud_provisioner.providers.base import ClusterContext, TerminalCloudError, managed_spec
from tests.conftest import example_documents
from tests.helpers import cluster_context

context = cluster_context


def test_managed_control_planes_are_built_and_self_managed_ones_refused_before_anything_is_created():
    for name, doc in example_documents().items():
        ctx = context(name)
        if doc["spec"]["controlPlane"]["mode"] == "managed":
            assert managed_spec(ctx, "EKS") is ctx.spec
        else:
            with pytest.raises(TerminalCloudError) as err:
                managed_spec(ctx, "EKS")
            assert err.value.code == "UnsupportedControlPlane" and "self-managed" in err.value.message


def test_a_context_without_spec_is_an_invalid_request():
    ctx = context("modelserving-prod-aws-us-east-1")
    bare = ClusterContext(cluster_id=ctx.cluster_id, clusterset=ctx.clusterset, location=ctx.location, spec=None)
    with pytest.raises(TerminalCloudError) as err:
        managed_spec(bare, "GKE")
    assert err.value.code == "InvalidRequest"
