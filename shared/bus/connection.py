"""NATS connection, stream set-up and publishing with dedup ids and checked acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import BadRequestError, NotFoundError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from shared.config import Settings
from shared.events import EVENT_TYPES, Envelope, subjects
from shared.events.factory import stream_of, subject_of
from shared.telemetry import inject_trace_headers

log = logging.getLogger("flotilla.bus")

# Publishing survives a NATS restart or leader election: these are worth retrying.
_TRANSIENT = (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError,
              nats.errors.ConnectionReconnectingError, nats.errors.ConnectionClosedError)  # fmt: skip
MSG_ID = "Nats-Msg-Id"


class PublishError(RuntimeError):
    pass


def stream_configs(settings: Settings) -> list[jsapi.StreamConfig]:
    return [
        jsapi.StreamConfig(
            name=name, subjects=subs, description=f"flotilla {name.lower()}", storage=jsapi.StorageType.FILE,
            num_replicas=settings.stream_replicas, duplicate_window=settings.duplicate_window_s,
            retention=jsapi.RetentionPolicy.LIMITS,
        )  # fmt: skip
        for name, subs in subjects.STREAM_SUBJECTS.items()
    ]


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext
    settings: Settings

    async def ensure_streams(self) -> None:
        """Create the streams, or bring an existing one to the configured settings."""
        for config in stream_configs(self.settings):
            assert config.name
            try:
                info = await self.js.stream_info(config.name)
            except NotFoundError:
                try:
                    await self.js.add_stream(config)
                    continue
                except BadRequestError:  # created meanwhile by another replica
                    info = await self.js.stream_info(config.name)
            current = info.config
            if (current.subjects, current.num_replicas, current.duplicate_window) != (
                config.subjects, config.num_replicas, config.duplicate_window,
            ):  # fmt: skip
                await self.js.update_stream(config)

    async def publish(self, envelope: Envelope, extra_headers: dict[str, str] | None = None) -> bool:
        """Publish to the event's stream and check the ack. Returns False when it was a duplicate."""
        if EVENT_TYPES[envelope.type].local_only:
            raise PublishError(f"{envelope.type} is handled locally and never published")
        headers = {MSG_ID: envelope.id, "Flotilla-Type": envelope.type, **(extra_headers or {})}
        inject_trace_headers(headers)
        subject, stream = subject_of(envelope), stream_of(envelope)
        ack = await self.publish_raw(subject, envelope.to_bytes(), headers, stream)
        if ack.stream != stream:
            raise PublishError(f"{subject} landed in {ack.stream}, expected {stream}")
        return not ack.duplicate

    async def publish_all(self, envelopes: Sequence[Envelope]) -> None:
        # Order matters within one handler's output (e.g. provisioned before ready): publish in sequence.
        for env in envelopes:
            await self.publish(env)

    async def publish_raw(self, subject: str, payload: bytes, headers: dict[str, str], stream: str) -> jsapi.PubAck:
        """Publish to a stream, retrying what a NATS restart or leader election causes; the PubAck is checked."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_TRANSIENT),
            wait=wait_exponential_jitter(initial=0.1, max=3),
            stop=stop_after_delay(60),
            reraise=True,
        ):
            with attempt:
                return await self.js.publish(subject, payload, stream=stream, headers=headers, timeout=5)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def close(self) -> None:
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
        if not self.nc.is_closed:
            await self.nc.close()


async def connect_bus(settings: Settings, name: str, ensure_streams: bool = True) -> Bus:
    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    nc = await nats.connect(
        [u.strip() for u in settings.nats_url.split(",") if u.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    bus = Bus(nc=nc, js=nc.jetstream(timeout=10), settings=settings)
    if ensure_streams:
        await bus.ensure_streams()
    return bus
