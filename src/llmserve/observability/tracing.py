"""OpenTelemetry, GenAI semantic conventions: a span per request and the GenAI metrics.

Off unless ``observability.otlp_endpoint`` is set: the API's no-op tracer and meter then cost a
few attribute-free calls per request. With it, spans and metrics are exported over OTLP/HTTP.
W3C ``traceparent`` from the client is honoured (the span joins the caller's trace) and passed
on to upstream engines.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context

log = logging.getLogger(__name__)

TRACER = trace.get_tracer("llmserve")
_METER = metrics.get_meter("llmserve")

# GenAI semantic-convention metrics (names and units from the spec).
TOKEN_USAGE = _METER.create_histogram(
    "gen_ai.client.token.usage", unit="{token}", description="Tokens used, by gen_ai.token.type."
)
TIME_TO_FIRST_TOKEN = _METER.create_histogram(
    "gen_ai.server.time_to_first_token", unit="s", description="Time to the first token."
)
TIME_PER_OUTPUT_TOKEN = _METER.create_histogram(
    "gen_ai.server.time_per_output_token",
    unit="s",
    description="Time per output token after the first.",
)
REQUEST_DURATION = _METER.create_histogram(
    "gen_ai.server.request.duration", unit="s", description="Server-side request duration."
)


def setup(endpoint: str | None, service_name: str) -> None:
    """Install OTLP exporters for traces and metrics (once per process)."""
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    base = endpoint.rstrip("/")
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
    )
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics"), export_interval_millis=10_000
    )
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    log.info("OpenTelemetry export to %s", base)


def incoming_context(headers: Mapping[str, str]) -> Context:
    """The caller's trace context (W3C traceparent), if it sent one."""
    return propagate.extract(headers)


def outgoing_headers() -> dict[str, str]:
    """traceparent (and tracestate) of the current span, for an upstream request."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
