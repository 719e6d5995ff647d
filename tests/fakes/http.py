"""The loopback JSON-over-HTTP(S) server the test fakes share: each fake supplies only `handle(Request)`.

`handle` answers (status, payload) or (status, payload, headers); the payload goes out as JSON, except None,
which sends an empty body (and no Content-Type). HEAD answers carry no body.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Reply = tuple[int, Any] | tuple[int, Any, Mapping[str, str]]
DEFAULT_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # as sent, with the query
    headers: Message
    body: bytes


class _JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stalls
    reply: Callable[[Request], Reply]  # set on the per-server subclass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, payload, *rest = type(self).reply(Request(self.command, self.path, self.headers, raw))
        headers: Mapping[str, str] = rest[0] if rest else {}
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def json_server(handle: Callable[[Request], Reply], *, tls: tuple[Path, Path] | None = None,
                methods: Iterable[str] = DEFAULT_METHODS) -> ThreadingHTTPServer:  # fmt: skip
    """A server bound to a free loopback port (not yet serving); `tls` is (certificate file, key file)."""
    attrs: dict[str, Any] = {"reply": staticmethod(handle)}
    attrs.update({f"do_{m}": _JsonHandler._serve for m in methods})
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_JsonHandler,), attrs))
    server.daemon_threads = True
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    return server


def serve(server: ThreadingHTTPServer, name: str, poll_interval: float = 0.05) -> threading.Thread:
    """Run `server` on a daemon thread."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), name=name, daemon=True)
    thread.start()
    return thread


def start_json_server(handle: Callable[[Request], Reply], name: str, *, tls: tuple[Path, Path] | None = None,
                      methods: Iterable[str] = DEFAULT_METHODS, poll_interval: float = 0.05
                      ) -> ThreadingHTTPServer:  # fmt: skip
    """`json_server(...)`, serving on a daemon thread."""
    server = json_server(handle, tls=tls, methods=methods)
    serve(server, name, poll_interval)
    return server


def stop_server(server: ThreadingHTTPServer, *, serving: bool = True) -> None:
    """Stop serving (when it is: shutdown() waits for serve_forever) and close the socket."""
    if serving:
        server.shutdown()
    server.server_close()
