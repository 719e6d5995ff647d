"""Cloud drivers behind the `CloudProvider` port, chosen per cluster by `location.cloud`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from redis.asyncio import Redis

from services.cloud_provisioner.providers.base import (
    CloudError,
    CloudProvider,
    ClusterContext,
    NotInPlaceError,
    ResourceNotFoundError,
    TerminalCloudError,
    ThrottlingError,
    TransientCloudError,
    Updated,
    cloud_error,
)
from services.cloud_provisioner.providers.sim import SimProvider
from services.cloud_provisioner.providers.simcloud import SimCloud
from shared.config import Settings

# The real driver of each cloud, imported only when a deployment selects it (settings.cloud_drivers),
# so a sim-only deployment needs none of the cloud SDKs at start-up. Each module has
# `build(settings) -> CloudProvider`.
REAL_DRIVERS: dict[str, str] = {
    "aws": "services.cloud_provisioner.providers.aws",
    "azure": "services.cloud_provisioner.providers.azure",
    "gcp": "services.cloud_provisioner.providers.gcp",
}


class ProviderRegistry:
    """Maps a cluster's cloud to the driver that provisions it."""

    def __init__(self, by_cloud: Mapping[str, CloudProvider]) -> None:
        self._by_cloud = dict(by_cloud)

    def for_cloud(self, cloud: str) -> CloudProvider:
        try:
            return self._by_cloud[cloud]
        except KeyError:
            raise TerminalCloudError("UnsupportedCloud", f"no driver configured for cloud {cloud!r}") from None

    def clouds(self) -> list[str]:
        return sorted(self._by_cloud)


def build_registry(settings: Settings, redis: Redis) -> ProviderRegistry:
    drivers: dict[str, CloudProvider] = {}
    sim: SimProvider | None = None
    for cloud, driver in settings.cloud_drivers.items():
        if driver == "real":
            drivers[cloud] = importlib.import_module(REAL_DRIVERS[cloud]).build(settings)
        else:
            sim = sim or SimProvider.from_settings(SimCloud.from_settings(redis, settings), settings)
            drivers[cloud] = sim
    return ProviderRegistry(drivers)


__all__ = [
    "REAL_DRIVERS", "CloudError", "CloudProvider", "ClusterContext", "NotInPlaceError", "ProviderRegistry",
    "ResourceNotFoundError", "SimCloud", "SimProvider", "TerminalCloudError", "ThrottlingError", "TransientCloudError",
    "Updated", "build_registry", "cloud_error",
]  # fmt: skip
