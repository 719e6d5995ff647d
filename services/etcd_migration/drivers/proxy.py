"""A small TCP proxy, run as its own process: the `local` driver's API servers and load balancers.

    python -m services.etcd_migration.drivers.proxy --listen 127.0.0.1:PORT --config FILE
    python -m services.etcd_migration.drivers.proxy --listen 127.0.0.1:PORT --backends h:p,h:p [--closed]

It binds one address and keeps it: opening, closing or changing the backends happens in place
(the driver rewrites the JSON config file and sends SIGHUP), so clients never see the address
change. Closed, it accepts and closes every connection at once, so nothing reaches a backend
(a cloud load balancer with no healthy target group); closing also cuts the connections already
proxied. Open, each connection goes to the next backend in turn, and to the one after it if that
one refuses. Once a config is in effect the proxy writes its generation to `<config>.applied`, so
the driver knows when a change is live. Only the standard library: it starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("flotilla.proxy")

CONNECT_TIMEOUT_S = 1.0
_CHUNK = 64 * 1024


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename (with fsync), so a reader or a process killed mid-write never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ProxyConfig:
    open: bool
    backends: list[str] = field(default_factory=list)  # "host:port"
    generation: int = 0

    def to_json(self) -> str:
        return json.dumps({"open": self.open, "backends": self.backends, "generation": self.generation})

    @classmethod
    def read(cls, path: Path) -> ProxyConfig | None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return cls(open=bool(raw["open"]), backends=list(raw["backends"]), generation=int(raw["generation"]))


def applied_path(config_path: Path) -> Path:
    return config_path.with_name(config_path.name + ".applied")


def applied_generation(config_path: Path) -> int | None:
    try:
        return int(applied_path(config_path).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class Proxy:
    def __init__(self, listen: str, config: ProxyConfig, config_path: Path | None) -> None:
        self.listen = listen
        self.config = config
        self.config_path = config_path
        self._next = 0
        self._connections: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Handlers before the bind: once the port listens, the driver may signal us.
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        host, port = _split(self.listen)
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        self._mark_applied()
        log.info("listening on %s open=%s backends=%s", self.listen, self.config.open, self.config.backends)
        await self._stopped.wait()
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def reload(self) -> None:
        if self.config_path is None:
            return
        try:
            config = ProxyConfig.read(self.config_path)
        except (OSError, ValueError, KeyError) as exc:
            log.error("config %s unreadable, keeping the current one: %s", self.config_path, exc)
            return
        if config is None:
            return
        was_open = self.config.open
        self.config = config
        if was_open and not config.open:
            # Closing means no traffic reaches the backends any more, not just no new connections.
            for task in list(self._connections):
                task.cancel()
        log.info("config %d: open=%s backends=%s", config.generation, config.open, config.backends)
        self._mark_applied()

    def _mark_applied(self) -> None:
        if self.config_path is not None:
            atomic_write_text(applied_path(self.config_path), str(self.config.generation))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.config.open or not self.config.backends:
            return
        backends = self.config.backends
        start = self._next % len(backends)
        self._next += 1
        for address in backends[start:] + backends[:start]:
            host, port = _split(address)
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                continue  # a stopped member: the next one
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
            return


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other direction may still carry a response
    except (ConnectionError, OSError):
        writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="proxy", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="host:port to bind (kept for the proxy's lifetime)")
    parser.add_argument("--config", type=Path, help="JSON config re-read on SIGHUP (wins over the flags)")
    parser.add_argument("--backends", default="", help="comma-separated host:port list")
    parser.add_argument("--closed", action="store_true", help="accept and close every connection")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ProxyConfig(open=not args.closed, backends=[b for b in args.backends.split(",") if b])
    if args.config is not None:
        config = ProxyConfig.read(args.config) or config
    asyncio.run(Proxy(args.listen, config, args.config).run())


if __name__ == "__main__":
    main()
