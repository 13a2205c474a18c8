"""Optional OpenTelemetry spans: the upstream call of each proxied request, and each renewal.

Off by default, and free when off: nothing is imported and the request path takes no branch
per request (the handler picks its traced or plain send once). On when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the ``otel`` extra is installed
(``pip install 'repairy-gateway[otel]'``: ``opentelemetry-sdk`` and the OTLP/HTTP exporter);
set without it, a warning says what to install. Spans go out in batches over OTLP/HTTP
(protobuf) to ``<endpoint>/v1/traces`` from a provider of the gateway's own (no global state
is touched); ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_HEADERS``
and ``OTEL_BSP_*`` apply, the per-signal endpoint and the protocol variables do not.

* ``repairy.upstream`` (client span): the exchange with Repairy up to its answer's head, retries
  and the 401 replay included; a child of the caller's ``traceparent`` when it sent one. The
  caller's trace headers still go upstream untouched: the gateway adds none.
* ``repairy.token.renewal``: a login or refresh, with its kind, outcome and reason.

Attributes carry the method, route template, path, status and counts, never a token, a
secret or a header value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.config_values import parse_otlp_endpoint
from gateway.declare import setting

log = logging.getLogger("gateway.tracing")


@dataclass(frozen=True)
class TracingConfig:
    """Where spans go (OpenTelemetry)."""

    SECTION: ClassVar[str] = "logging"

    otel_endpoint: str = setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT", parse_otlp_endpoint, "",
        "OpenTelemetry: send spans of upstream calls and renewals over OTLP/HTTP (protobuf) to "
        "<this>/v1/traces (needs the otel extra; empty: off). OTEL_SERVICE_NAME, "
        "OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_HEADERS apply.")


class Tracing:
    """A tracer with its own provider and OTLP/HTTP exporter (see the module's docstring)."""

    def __init__(self, endpoint: str, service_version: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.propagate import extract
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode

        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win; "repairy-gateway" otherwise.
        resource = Resource.create({"service.version": service_version})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "repairy-gateway"}))
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
        self._tracer = self._provider.get_tracer("repairy-gateway", service_version)
        self._extract = extract
        self._client, self._internal = SpanKind.CLIENT, SpanKind.INTERNAL
        self._error = Status(StatusCode.ERROR)
        self._status, self._code = Status, StatusCode

    @contextmanager
    def upstream(self, method: str, route: str, path: str,
                 caller_headers: Mapping[str, str]) -> Iterator[Any]:
        """The span of one upstream exchange, a child of the caller's trace context."""
        parent = self._extract({k: v for k, v in caller_headers.items()
                                if k.lower() in ("traceparent", "tracestate")})
        with self._tracer.start_as_current_span(
                "repairy.upstream", context=parent, kind=self._client,
                attributes={"http.request.method": method, "http.route": route,
                            "url.path": path.partition("?")[0]},
                record_exception=False, set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as exc:
                span.set_attribute("error.type", getattr(exc, "code", type(exc).__name__))
                span.set_status(self._error)
                raise

    def answered(self, span: Any, status: int, retries: int, replayed: bool) -> None:
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("repairy.retries", retries)
        span.set_attribute("repairy.replayed", replayed)
        if status >= 500:
            span.set_status(self._error)

    def renewal(self, kind: str, ok: bool, reason: str, seconds: float) -> None:
        """A span for a renewal that just ended and took ``seconds``."""
        end = time.time_ns()
        span = self._tracer.start_span(
            "repairy.token.renewal", kind=self._internal,
            start_time=end - int(max(0.0, seconds) * 1e9),
            attributes={"repairy.renewal.kind": kind,
                        "repairy.renewal.outcome": "success" if ok else "failure",
                        "repairy.renewal.reason": reason})
        if not ok:
            span.set_status(self._status(self._code.ERROR, reason))
        span.end(end_time=end)

    def shutdown(self) -> None:
        """Send what is pending and stop (at the gateway's stop)."""
        self._provider.shutdown()


def tracing_for(endpoint: str, service_version: str) -> Tracing | None:
    """The tracer when an OTLP endpoint is configured and the SDK is installed, else None."""
    if not endpoint:
        return None
    try:
        tracing = Tracing(endpoint, service_version)
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set, but OpenTelemetry is not installed: "
                    "pip install 'repairy-gateway[otel]' to send spans", extra={"fields": {
                        "event": "tracing_unavailable"}})
        return None
    log.info("sending OpenTelemetry spans", extra={"fields": {
        "event": "tracing_enabled", "endpoint": endpoint}})
    return tracing
