"""The status_projector process: the projector loop and the HTTP API in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from services.status_projector.api import create_app
from services.status_projector.projector import Projector
from services.status_projector.rebuild import RebuildResult, rebuild
from shared.bus import connect_bus
from shared.config import Settings
from shared.service import redis_client

log = logging.getLogger("flotilla.status_projector")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM stops the projector and the API together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bound_address(server: uvicorn.Server, settings: Settings) -> str:
    for srv in server.servers:
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            return f"http://{host}:{port}"
    return f"http://{settings.api_host}:{settings.api_port}"


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus = await connect_bus(settings, name="flotilla-status_projector")
    redis = redis_client(settings)
    projector = Projector(bus, redis, settings.redis_prefix)
    await projector.start()
    app = create_app(settings, redis=redis, bus=bus, projector=projector)
    config = uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_config=None,
                            access_log=False, lifespan="on")  # fmt: skip
    server = _Server(config)
    api = asyncio.create_task(server.serve(), name="status-api")
    try:
        while not server.started and not api.done():  # noqa: ASYNC110 - uvicorn offers no 'started' event
            await asyncio.sleep(0.02)
        if api.done():
            await api  # raises what made it fail (e.g. the port is taken)
            raise RuntimeError("status API stopped during start-up")
        log.info("status API listening on %s (OpenAPI at /openapi.json)", _bound_address(server, settings))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, api}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        log.info("status_projector stopping")
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(api, timeout=settings.shutdown_grace_s + 5)
        await projector.stop()
        with contextlib.suppress(Exception):
            await bus.close()
        await redis.aclose()


async def run_rebuild(settings: Settings, *, swap: bool, namespace: str | None, grace_s: float) -> RebuildResult:
    bus = await connect_bus(settings, name="flotilla-status_projector-rebuild")
    redis = redis_client(settings)
    try:
        return await rebuild(bus, redis, settings.redis_prefix, swap=swap, namespace=namespace, grace_s=grace_s)
    finally:
        with contextlib.suppress(Exception):
            await bus.close()
        await redis.aclose()
