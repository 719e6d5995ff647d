"""Tracing (OpenTelemetry, W3C traceparent in NATS headers) and structured JSON logs."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_STD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS})
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = format(span.trace_id, "032x")
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(service: str, level: str = "INFO", console_spans: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nats").setLevel(logging.WARNING)
    provider = TracerProvider(resource=Resource.create({"service.name": f"flotilla-{service}"}))
    if console_spans:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer("flotilla")


def inject_trace_headers(headers: dict[str, str]) -> None:
    inject(headers)


@contextmanager
def consume_span(name: str, headers: Mapping[str, str] | None, attributes: dict[str, Any]) -> Iterator[None]:
    """A consumer span that continues the trace of the message that caused it."""
    ctx = extract(dict(headers or {}))
    token = otel_context.attach(ctx)
    try:
        with tracer().start_as_current_span(name, kind=trace.SpanKind.CONSUMER, attributes=attributes):
            yield
    finally:
        otel_context.detach(token)
