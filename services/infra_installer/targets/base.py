"""The `KubernetesTarget` port: what the installer needs from a cluster's API server.

Shaped for the real adapter (official `kubernetes` client): `apply_service` is a
server-side apply of a service's objects with one field manager, so applying the same
thing twice changes nothing; `service_healthy` is the health gate (rollouts available,
webhooks answering). The installer never creates or deletes anything any other way.
`drain` is one pass of a cluster drain: cordon every node, evict what may leave now (drain_plan.py), report.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.infra_installer.bundles.model import RenderContext
from services.infra_installer.drain_plan import DrainReport
from shared.bus.consumer import RetryableError

FIELD_MANAGER = "flotilla-infra-installer"

__all__ = ["FIELD_MANAGER", "ClusterRef", "DrainReport", "HealthTimeout", "InstallError", "KubernetesTarget"]


@dataclass(frozen=True)
class ClusterRef:
    """How to reach one cluster. `credential_ref` names where a token comes from; it is never a secret."""

    cluster_id: str
    endpoint: str
    credential_ref: str | None = None
    # SHA-256 of the API server's CA, from provisioning: the CA fetched at run time must match it.
    ca_fingerprint: str | None = None
    cloud: str | None = None
    region: str | None = None
    # What the cluster's bundles are rendered from (spec, provisioning results); None before the spec is known.
    context: RenderContext | None = None


class InstallError(RetryableError):
    """Applying a service failed (API error, conflict, admission webhook down): worth another try."""


class HealthTimeout(RetryableError):
    """A service was applied but did not become healthy in time."""


class KubernetesTarget(abc.ABC):
    #: How often `wait_healthy` polls `service_healthy`.
    health_poll_s: float = 0.5

    @abc.abstractmethod
    async def apply_service(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]) -> None:
        """Ensure `service` at `version` with `values` is applied. Idempotent; raises InstallError on failure."""

    @abc.abstractmethod
    async def remove_service(self, cluster: ClusterRef, service: str) -> None:
        """Delete every object of `service` (by its ownership labels). Not found is done."""

    @abc.abstractmethod
    async def correct_drift(self, cluster: ClusterRef, service: str, version: str, values: Mapping[str, Any]
                            ) -> list[str]:  # fmt: skip
        """Re-apply what changed on the cluster behind our back; return the objects corrected (empty: no drift)."""

    @abc.abstractmethod
    async def service_healthy(self, cluster: ClusterRef, service: str) -> bool:
        """Whether the applied service is up (its workloads available). Never raises for 'not yet'."""

    @abc.abstractmethod
    async def drain(self, cluster: ClusterRef) -> DrainReport:
        """One drain pass: cordon every node, evict the pods that may leave now through the Eviction API
        (never more than their disruption budgets allow, never forced), and report what is left.
        Returns at once; the caller comes back for the next pass. Raises InstallError when the API fails."""

    @abc.abstractmethod
    async def uncordon(self, cluster: ClusterRef) -> int:
        """Make the nodes a drain cordoned schedulable again (only those: a node someone else cordoned stays so);
        returns how many. Idempotent. Raises InstallError when the API fails."""

    async def wait_healthy(self, cluster: ClusterRef, service: str, timeout_s: float) -> None:
        """Poll the health gate until it passes; raise HealthTimeout after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.service_healthy(cluster, service):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HealthTimeout(f"{service} on {cluster.cluster_id} not healthy after {timeout_s:g}s")
            await asyncio.sleep(min(self.health_poll_s, remaining))
