"""Settings from the environment, one prefix (FLOTILLA_) for every service."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOTILLA_", extra="ignore", frozen=True)

    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Key prefix in Redis so several deployments (or tests) can share one server.
    redis_prefix: str = Field(default="flotilla", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    stream_replicas: int = Field(default=1, ge=1, le=5)
    duplicate_window_s: float = Field(default=120.0, gt=0)

    # Consumer runtime
    max_deliver: int = Field(default=8, ge=1, le=1000)
    backoff_s: list[float] = Field(default=[0.5, 1, 2, 5, 10, 30, 60])
    ack_wait_s: float = Field(default=30.0, gt=0)
    max_inflight: int = Field(default=64, ge=1, le=10_000)
    fetch_batch: int = Field(default=64, ge=1, le=1000)
    handler_timeout_s: float = Field(default=600.0, gt=0)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    ledger_ttl_s: int = Field(default=30 * 24 * 3600, ge=60)

    # Status API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)

    # Sim cloud / sim Kubernetes: latency per operation and fault rates (0..1).
    sim_latency_s: float = Field(default=0.3, ge=0)
    sim_latency_jitter: float = Field(default=0.5, ge=0, le=1)
    sim_throttle_rate: float = Field(default=0.0, ge=0, le=1)
    sim_failure_rate: float = Field(default=0.0, ge=0, le=1)
    sim_install_latency_s: float = Field(default=0.1, ge=0)
    sim_seed: int | None = None

    # Which driver serves each cloud: the simulated cloud or the real one through its SDK.
    # One deployment may mix them, e.g. {"aws": "real", "azure": "sim", "gcp": "sim"}.
    cloud_drivers: dict[Literal["aws", "azure", "gcp"], Literal["sim", "real"]] = Field(
        default={"aws": "sim", "azure": "sim", "gcp": "sim"}
    )
    # Real drivers use each SDK's standard credential chain; these only pick the account and,
    # for tests or private endpoints, the API address.
    # Cloud calls that keep failing retryably (throttling, 5xx) are retried for hours, each cluster on
    # its own: with the default backoff (capped at 60 s) 400 deliveries are about 6.5 hours.
    cloud_max_deliver: int = Field(default=400, ge=1, le=100_000)
    # How often real drivers poll a cloud's long-running operations.
    cloud_poll_s: float = Field(default=5.0, gt=0, le=300)
    aws_endpoint_url: str | None = None
    azure_subscription_id: str | None = None
    azure_base_url: str | None = None
    gcp_project: str | None = None
    gcp_api_endpoint: str | None = None
    # How the installer reaches clusters: the simulated API, or each cluster's real API server.
    k8s_target: Literal["sim", "kubernetes"] = "sim"
    # Directories of bundles users add (each a bundle.yaml plus manifests): ClusterSets may list them.
    custom_bundle_dirs: list[str] = Field(default_factory=list)
    # Where the registry pull secret comes from (env://VAR or file:///path); never the secret itself.
    registry_secret_ref: str | None = None
    install_health_timeout_s: float = Field(default=300.0, gt=0)
    # The installer's periodic pass over its clusters: retry retryable failures, correct drift.
    installer_reconcile_interval_s: float = Field(default=300.0, gt=0)
    installer_reconcile_batch: int = Field(default=200, ge=1, le=100_000)
    # Where self-managed control planes run: real etcd processes on this machine (`local`), or simulated
    # VMs kept in Redis with the sim cloud's latency and throttling (`sim`, for fleet-scale runs).
    controlplane_driver: Literal["local", "sim"] = "local"
    # The local driver's machines: one directory per cluster (etcd data, pid files, load-balancer config).
    controlplane_state_dir: str = ".run/controlplanes"
    # How often the availability prober sends a write and a read through the control plane's endpoint.
    controlplane_probe_interval_s: float = Field(default=0.05, gt=0, le=60)

    otel_console: bool = False
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("backoff_s")
    @classmethod
    def _backoff_positive(cls, value: list[float]) -> list[float]:
        if not value or any(v < 0 for v in value):
            raise ValueError("backoff_s needs at least one non-negative delay")
        return value

    def backoff_for(self, delivery: int) -> float:
        """Delay before the next delivery after attempt number `delivery` (1-based)."""
        return self.backoff_s[min(delivery, len(self.backoff_s)) - 1]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
