"""Fixtures shared by every suite: real nats-server and redis-server on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from redis.asyncio import Redis

from shared.bus import Bus, connect_bus
from shared.config import Settings
from shared.embedded import ServerProcess, nats_server, redis_server

EXAMPLES_DIR = Path(os.environ.get("FLOTILLA_EXAMPLES", Path(__file__).resolve().parents[2] / "shared" / "examples"))


def example_documents() -> dict[str, dict]:
    """The ClusterSet files users write, by metadata.name (status example excluded)."""
    docs = {}
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "ClusterSet":
            docs[doc["metadata"]["name"]] = doc
    return docs


@pytest.fixture
def nats_proc(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = nats_server(tmp_path / "nats").start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = redis_server(tmp_path / "redis").start()
    yield proc
    proc.stop()


def make_settings(nats_port: int, redis_port: int, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        nats_url=f"nats://127.0.0.1:{nats_port}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        backoff_s=[0.05, 0.1, 0.2, 0.4],
        ack_wait_s=5.0,
        shutdown_grace_s=2.0,
        sim_latency_s=0.0,
        sim_install_latency_s=0.0,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(nats_proc: ServerProcess, redis_proc: ServerProcess) -> Settings:
    return make_settings(nats_proc.port, redis_proc.port)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = await connect_bus(settings, name="tests")
    yield b
    await b.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    r = Redis.from_url(settings.redis_url, decode_responses=True)
    yield r
    await r.aclose()
