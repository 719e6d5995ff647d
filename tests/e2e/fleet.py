"""A whole Flotilla on loopback for end-to-end tests and benchmarks.

Real nats-server and redis-server, every service as its own process (optionally two
replicas each), the sim cloud's state in Redis. Services can be SIGKILLed and restarted.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from services.cloud_provisioner.providers.simcloud import SimCloud
from shared.bus import connect_bus
from shared.client import FlotillaClient
from shared.config import Settings
from shared.embedded import SERVICES, ServerProcess, free_port, nats_server, redis_server, service_env, start_service
from shared.events import Envelope, subjects
from shared.stack import stop_control_planes
from tests.helpers import fleet_events


@dataclass
class Fleet:
    workdir: Path
    replicas: int = 1
    env_overrides: dict[str, str] = field(default_factory=dict)
    nats: ServerProcess | None = None
    redis: ServerProcess | None = None
    procs: dict[tuple[str, int], subprocess.Popen[bytes]] = field(default_factory=dict)
    api_ports: dict[int, int] = field(default_factory=dict)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> Fleet:
        self.nats = nats_server(self.workdir / "nats").start()
        self.redis = redis_server(self.workdir / "redis").start()
        for name in SERVICES:
            for replica in range(self.replicas):
                self.start_service(name, replica)
        return self

    def env(self, replica: int = 0) -> dict[str, str]:
        assert self.nats and self.redis
        if replica not in self.api_ports:
            self.api_ports[replica] = free_port()
        extra = {
            "FLOTILLA_API_PORT": str(self.api_ports[replica]),
            "FLOTILLA_SIM_LATENCY_S": "0.05",
            "FLOTILLA_SIM_INSTALL_LATENCY_S": "0.01",
            "FLOTILLA_BACKOFF_S": "[0.1, 0.2, 0.5, 1]",
            "FLOTILLA_ACK_WAIT_S": "10",
            "FLOTILLA_SHUTDOWN_GRACE_S": "3",
            "FLOTILLA_CONTROLPLANE_STATE_DIR": str(self.controlplane_dir),
            **self.env_overrides,
        }
        return service_env(self.nats.port, self.redis.port, **extra)

    def start_service(self, name: str, replica: int = 0) -> None:
        self.procs[(name, replica)] = start_service(name, self.env(replica), self.workdir / "logs" / f"r{replica}")

    def kill(self, name: str, replica: int = 0) -> None:
        proc = self.procs[(name, replica)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, name: str, replica: int = 0) -> None:
        self.stop_service(name, replica)
        self.start_service(name, replica)

    def stop_service(self, name: str, replica: int = 0) -> None:
        proc = self.procs[(name, replica)]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def dead(self) -> list[str]:
        return [f"{n}#{r} (exit {p.returncode})" for (n, r), p in self.procs.items() if p.poll() is not None]

    @property
    def controlplane_dir(self) -> Path:
        return self.workdir / "controlplanes"

    def stop(self) -> None:
        for key in list(self.procs):
            self.stop_service(*key)
        stop_control_planes(self.controlplane_dir)  # the local driver's etcd and proxies outlive the services
        for server in (self.nats, self.redis):
            if server:
                server.stop()

    # ------------------------------------------------------------- access
    @property
    def settings(self) -> Settings:
        assert self.nats and self.redis
        return Settings(nats_url=f"nats://127.0.0.1:{self.nats.port}", redis_url=f"redis://127.0.0.1:{self.redis.port}/0")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_ports[0]}"

    def client(self) -> FlotillaClient:
        return FlotillaClient(self.settings.nats_url, self.api_url)

    def redis_client(self) -> Redis:
        return Redis.from_url(self.settings.redis_url, decode_responses=True)

    async def events(self) -> list[Envelope]:
        """Every FLEET event so far, in stream order."""
        bus = await connect_bus(self.settings, "e2e-history", ensure_streams=False)
        try:
            return await fleet_events(bus)
        finally:
            await bus.close()

    async def sim_inventory(self, cluster_id: str | None = None) -> dict[str, dict[str, int]]:
        redis = self.redis_client()
        try:
            return await SimCloud.from_settings(redis, self.settings).inventory(cluster_id)
        finally:
            await redis.aclose()

    async def wait_for(self, check: Callable[[], Awaitable[Any]], timeout: float = 120, what: str = "") -> Any:
        """Poll `check` until it returns something truthy; fail early if a service died."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.dead():
                raise AssertionError(f"service died: {self.dead()}; logs in {self.workdir / 'logs'}")
            try:
                last = await check()
            except Exception as exc:  # API not up yet, etc.
                last = exc
            if last and not isinstance(last, Exception):
                return last
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or check}: last={last!r}")

    async def states(self, client: FlotillaClient, **filters: str) -> dict[str, str]:
        return {c["id"]: c["state"] for c in await client.clusters(**filters)}

    async def wait_states(self, client: FlotillaClient, expected: dict[str, int], timeout: float = 120,
                          **filters: str) -> dict[str, str]:  # fmt: skip
        """Wait until the counts of cluster states (for the filters) equal `expected` exactly."""

        async def check() -> dict[str, str] | None:
            states = await self.states(client, **filters)
            counts: dict[str, int] = {}
            for s in states.values():
                counts[s] = counts.get(s, 0) + 1
            return states if counts == expected else None

        return await self.wait_for(check, timeout, what=f"states {expected} for {filters}")

    async def consumers_idle(self) -> bool:
        """Every durable consumer has delivered and had acked everything in its stream."""
        from shared.bus import connect_bus

        bus = await connect_bus(self.settings, "fleet-check", ensure_streams=False)
        try:
            for stream in (subjects.STREAM_CLUSTERSETS, subjects.STREAM_FLEET):
                async for info in _consumers(bus, stream):
                    if info.num_pending or info.num_ack_pending:
                        return False
            return True
        finally:
            await bus.close()


async def _consumers(bus: Any, stream: str) -> Any:
    for info in await bus.js.consumers_info(stream):
        yield info
