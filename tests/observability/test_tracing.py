"""OpenTelemetry: one GenAI span per request (attributes, events, status), W3C traceparent in
and out (through a gateway in front of another), the GenAI metrics, and a real OTLP/HTTP export.

A process may set its global tracer and meter providers once only, and ``tracing.TRACER`` and
the GenAI instruments are proxies created at import that follow whatever is set. So this module
sets an SDK TracerProvider (with an in-memory exporter) and MeterProvider (with an in-memory
reader) once for the process. The tracer provider samples through a switch that is on only while
this module runs, so later tests see non-recording spans, as with tracing off. ``setup()``,
which sets the providers itself, is exercised in a subprocess."""

from __future__ import annotations

import asyncio
import gzip
import os
import secrets
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceState
from opentelemetry.util.types import AnyValue, Attributes

from llmserve.config import Limits, UpstreamModel
from llmserve.observability import tracing
from tests.conftest import serve
from tests.observability.helpers import (
    PROMPT,
    chat,
    completion,
    read_stream,
    settings,
    sim_model,
)
from tests.support.eventually import eventually

REPO = Path(__file__).resolve().parents[2]


def number(attributes: Attributes, key: str) -> float:
    """The numeric attribute ``key`` (an int or a float) of a span or an event."""
    value = (attributes or {})[key]
    assert isinstance(value, int | float), f"{key}: {value!r}"
    return value


def sequence(attributes: Attributes, key: str) -> tuple[AnyValue, ...]:
    """The sequence attribute ``key`` of a span, as a tuple."""
    value = (attributes or {})[key]
    assert isinstance(value, Sequence), f"{key}: {value!r}"
    return tuple(value)


class SwitchSampler(Sampler):
    """ParentBased(ALWAYS_ON) while ``on``; drops everything otherwise."""

    def __init__(self) -> None:
        self.on = False
        self._inner = ParentBased(ALWAYS_ON)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if not self.on:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "SwitchSampler"


_SWITCH = SwitchSampler()
_EXPORTER = InMemorySpanExporter()
_READER = InMemoryMetricReader()
_TRACER_PROVIDER = TracerProvider(sampler=_SWITCH)
_TRACER_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
_METER_PROVIDER = MeterProvider(metric_readers=[_READER])


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(_TRACER_PROVIDER)
    if trace.get_tracer_provider() is not _TRACER_PROVIDER:
        pytest.skip("another tracer provider was set in this process before this module")
    _SWITCH.on = True
    try:
        yield _EXPORTER
    finally:
        _SWITCH.on = False
        _EXPORTER.clear()


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    if not isinstance(metrics.get_meter_provider(), MeterProvider):
        metrics.set_meter_provider(_METER_PROVIDER)
    if metrics.get_meter_provider() is not _METER_PROVIDER:
        pytest.skip("another meter provider was set in this process before this module")
    return _READER


async def spans_of(
    exporter: InMemorySpanExporter, model: str, count: int, within: float = 5.0
) -> list[ReadableSpan]:
    """The finished spans of ``model`` once there are ``count`` (a stream's span ends when the
    stream closes, just after its last byte)."""

    def found() -> list[ReadableSpan]:
        spans = exporter.get_finished_spans()
        return [s for s in spans if (s.attributes or {}).get("gen_ai.request.model") == model]

    await eventually(lambda: len(found()) >= count, within, f"{count} spans of {model}", 0.02)
    spans = found()
    assert len(spans) == count, [s.name for s in spans]
    return spans


def ready(client: httpx.AsyncClient) -> Callable[[], Awaitable[bool]]:
    """Whether the gateway behind ``client`` is ready (its engines start in the background)."""

    async def is_ready() -> bool:
        return (await client.get("/ready")).status_code == 200

    return is_ready


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def test_a_span_per_request_with_genai_attributes(
    exporter: InMemorySpanExporter,
) -> None:
    model = "obs-t-sim"
    async with (
        serve(settings(sim_model(model))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        r = await client.post(
            "/v1/chat/completions",
            json=chat(model, 4, temperature=0.5, top_p=0.9, seed=7),
        )
        assert r.status_code == 200, r.text
        chat_body = r.json()
        streamed = await read_stream(
            client, "/v1/completions", completion(model, 3, stream=True, temperature=0.0)
        )
        assert streamed.status == 200 and streamed.usage
        generated = await read_stream(
            client, "/generate", {"model": model, "prompt": PROMPT, "max_tokens": 2}
        )
        assert generated.status == 200 and generated.usage
        spans = await spans_of(exporter, model, 3)

    by_op: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_op.setdefault(str((span.attributes or {})["gen_ai.operation.name"]), []).append(span)
    assert sorted((op, len(s)) for op, s in by_op.items()) == [("chat", 1), ("text_completion", 2)]

    (chat_span,) = by_op["chat"]
    a = dict(chat_span.attributes or {})
    assert chat_span.name == f"chat {model}"
    assert chat_span.kind == SpanKind.SERVER
    assert chat_span.status.status_code == StatusCode.UNSET
    assert chat_span.parent is None  # no traceparent sent: a trace of its own
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.request.max_tokens"] == 4
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.request.seed"] == 7
    assert a["gen_ai.response.id"] == chat_body["id"]
    assert sequence(a, "gen_ai.response.finish_reasons") == ("length",)
    assert a["gen_ai.usage.input_tokens"] == chat_body["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == chat_body["usage"]["completion_tokens"] == 4
    assert a["llmserve.status"] == "ok"
    assert a["llmserve.key.name"] == "anonymous"

    usage_by_max = {3: streamed.usage, 2: generated.usage}
    for span in by_op["text_completion"]:
        a = dict(span.attributes or {})
        assert span.name == f"text_completion {model}"
        max_tokens = a["gen_ai.request.max_tokens"]
        assert isinstance(max_tokens, int)
        assert max_tokens in usage_by_max
        usage = usage_by_max.pop(max_tokens)
        assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == max_tokens
        assert sequence(a, "gen_ai.response.finish_reasons") == ("length",)
        if max_tokens == 3:
            assert a["gen_ai.request.temperature"] == 0.0
        assert span.status.status_code == StatusCode.UNSET

    for span in spans:
        names = [e.name for e in span.events]
        assert names == ["llmserve.admitted", "gen_ai.first_token"], names
        admitted = span.events[0]
        assert number(admitted.attributes, "llmserve.queue_wait_s") >= 0
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= admitted.timestamp <= span.events[1].timestamp
        assert span.events[1].timestamp <= span.end_time


async def test_failed_requests_have_error_status(exporter: InMemorySpanExporter) -> None:
    slow, full = "obs-t-timeout", "obs-t-full"
    models = (
        sim_model(slow, tokens_per_second=10),
        sim_model(full, tokens_per_second=20, max_in_flight=1, max_waiting_requests=0),
    )
    async with (
        serve(settings(*models, limits=Limits(request_timeout_s=0.4))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        r = await client.post("/v1/chat/completions", json=chat(slow, 50))
        assert r.status_code == 504, r.text
        holder = asyncio.create_task(client.post("/v1/completions", json=completion(full, 3)))
        await eventually(lambda: server.models.admission(full).in_flight == 1, within=5.0)
        r = await client.post("/v1/completions", json=completion(full, 1))
        assert r.status_code == 503, r.text
        assert (await holder).status_code == 200
        (timed_out,) = await spans_of(exporter, slow, 1)
        refused, served = sorted(
            await spans_of(exporter, full, 2),
            key=lambda s: number(s.attributes, "gen_ai.request.max_tokens"),
        )

    assert timed_out.status.status_code == StatusCode.ERROR
    assert timed_out.status.description == "timeout"
    assert (timed_out.attributes or {})["llmserve.status"] == "timeout"
    # It had started generating: the tokens before the timeout are on the span.
    assert 0 < number(timed_out.attributes, "gen_ai.usage.output_tokens") < 50
    assert [e.name for e in timed_out.events] == ["llmserve.admitted", "gen_ai.first_token"]

    assert refused.status.status_code == StatusCode.ERROR
    assert refused.status.description == "queue_full"
    assert (refused.attributes or {})["gen_ai.usage.output_tokens"] == 0
    assert [e.name for e in refused.events] == []  # never admitted, no token
    assert served.status.status_code == StatusCode.UNSET


async def test_client_traceparent_is_the_parent(exporter: InMemorySpanExporter) -> None:
    model = "obs-t-parent"
    header, trace_id, span_id = traceparent()
    async with (
        serve(settings(sim_model(model))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        r = await client.post(
            "/v1/completions", json=completion(model, 2), headers={"traceparent": header}
        )
        assert r.status_code == 200, r.text
        result = await read_stream(
            client,
            "/v1/chat/completions",
            chat(model, 2, stream=True),
            headers={"traceparent": header},
        )
        assert result.status == 200
        spans = await spans_of(exporter, model, 2)
    for span in spans:
        assert span.context is not None and span.parent is not None
        assert format(span.context.trace_id, "032x") == trace_id
        assert format(span.parent.span_id, "016x") == span_id
        assert span.parent.is_remote
        assert format(span.context.span_id, "016x") != span_id


async def test_traceparent_is_forwarded_to_an_upstream_gateway(
    exporter: InMemorySpanExporter,
) -> None:
    """Gateway B serves "obs-t-front" from gateway A's "obs-t-back": A's span is a child of B's,
    which is a child of the caller's."""
    back, front = "obs-t-back", "obs-t-front"
    header, trace_id, span_id = traceparent()
    async with serve(settings(sim_model(back))) as a:
        upstream = UpstreamModel(engine="openai", name=front, url=a.url, upstream_model=back)
        async with (
            serve(settings(upstream)) as b,
            httpx.AsyncClient(base_url=b.url, timeout=10) as client,
        ):
            await eventually(ready(client), within=5.0, what="B ready", interval=0.02)
            r = await client.post(
                "/v1/chat/completions", json=chat(front, 3), headers={"traceparent": header}
            )
            assert r.status_code == 200, r.text
            result = await read_stream(client, "/v1/completions", completion(front, 2, stream=True))
            assert result.status == 200 and not result.errors
            front_spans = await spans_of(exporter, front, 2)
            back_spans = await spans_of(exporter, back, 2)

    def op(span: ReadableSpan) -> str:
        return str((span.attributes or {})["gen_ai.operation.name"])

    fronts = {op(s): s for s in front_spans}
    backs = {op(s): s for s in back_spans}
    assert set(fronts) == set(backs) == {"chat", "text_completion"}
    # With the caller's traceparent: caller → B → A, one trace.
    b_span, a_span = fronts["chat"], backs["chat"]
    assert b_span.context is not None and a_span.context is not None
    assert b_span.parent is not None and a_span.parent is not None
    assert format(b_span.context.trace_id, "032x") == trace_id
    assert format(b_span.parent.span_id, "016x") == span_id
    assert a_span.context.trace_id == b_span.context.trace_id
    assert a_span.parent.span_id == b_span.context.span_id
    assert (a_span.attributes or {})["gen_ai.usage.output_tokens"] == 3
    # Without one: B starts the trace, A joins it.
    b_span, a_span = fronts["text_completion"], backs["text_completion"]
    assert b_span.parent is None
    assert a_span.parent is not None and a_span.context is not None
    assert b_span.context is not None
    assert a_span.context.trace_id == b_span.context.trace_id
    assert a_span.parent.span_id == b_span.context.span_id


def _points(reader: InMemoryMetricReader, name: str, model: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    found: list[Any] = []
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        assert p.attributes is not None
                        if p.attributes.get("gen_ai.request.model") == model:
                            found.append(p)
    return found


async def test_genai_metrics(reader: InMemoryMetricReader) -> None:
    model = "obs-t-metrics"
    async with (
        serve(settings(sim_model(model))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        usages = []
        for body in (chat(model, 5), completion(model, 1)):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = await client.post(path, json=body)
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
        result = await read_stream(client, "/v1/completions", completion(model, 4, stream=True))
        assert result.usage is not None
        usages.append(result.usage)

        def all_recorded() -> bool:
            points = _points(reader, "gen_ai.server.request.duration", model)
            return len(points) == 2 and sum(p.count for p in points) == 3

        await eventually(all_recorded, within=5.0, what="three durations", interval=0.02)

    tokens = _points(reader, "gen_ai.client.token.usage", model)
    by_type: dict[tuple[str, str], Any] = {
        (p.attributes["gen_ai.token.type"], p.attributes["gen_ai.operation.name"]): p
        for p in tokens
    }
    assert set(by_type) == {
        ("input", "chat"),
        ("output", "chat"),
        ("input", "text_completion"),
        ("output", "text_completion"),
    }
    assert sum(p.sum for (t, _), p in by_type.items() if t == "input") == sum(
        u["prompt_tokens"] for u in usages
    )
    assert (
        sum(p.sum for (t, _), p in by_type.items() if t == "output")
        == sum(u["completion_tokens"] for u in usages)
        == 10
    )
    assert by_type[("output", "chat")].sum == 5
    assert sum(p.count for p in tokens) == 2 * 3

    for name in ("gen_ai.server.time_to_first_token", "gen_ai.server.request.duration"):
        points = _points(reader, name, model)
        assert sum(p.count for p in points) == 3, name
        assert all(p.sum > 0 for p in points), name
    # Time per output token: only where there was more than one token.
    per_token = _points(reader, "gen_ai.server.time_per_output_token", model)
    assert sum(p.count for p in per_token) == 2


def test_setup_without_endpoint_installs_nothing() -> None:
    before_tracer, before_meter = trace.get_tracer_provider(), metrics.get_meter_provider()
    tracing.setup(None, "obs-nothing")
    tracing.setup("", "obs-nothing")
    assert trace.get_tracer_provider() is before_tracer
    assert metrics.get_meter_provider() is before_meter


_EXPORT_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import sys

    import httpx
    from opentelemetry import metrics, trace

    from llmserve.config import Settings, SimulatedModel
    from llmserve.observability import tracing
    from tests.support.gateway import serve

    async def main(endpoint: str) -> None:
        tracing.setup(endpoint, "obs-otlp-service")
        model = SimulatedModel(
            engine="simulated", name="obs-otlp-sim", tokens_per_second=1000,
            first_token_latency_s=0.0,
        )
        async with serve(Settings(models=[model])) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                r = await client.post(
                    "/v1/chat/completions",
                    json={"model": "obs-otlp-sim", "max_tokens": 3,
                          "messages": [{"role": "user", "content": "hi"}]},
                    headers={"traceparent": sys.argv[2]},
                )
                r.raise_for_status()
        assert trace.get_tracer_provider().force_flush(10_000)
        assert metrics.get_meter_provider().force_flush(10_000)
        print("exported")

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_setup_exports_over_otlp_http(tmp_path: Path) -> None:
    """``setup()`` sets the global providers, so it runs in a subprocess, against a collector
    stand-in on loopback here."""
    received: dict[str, list[bytes]] = {"/v1/traces": [], "/v1/metrics": []}

    async def accept(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        received[request.path].append(body)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", accept)
    app.router.add_post("/v1/metrics", accept)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    header, trace_id, span_id = traceparent()
    script = tmp_path / "export.py"
    script.write_text(_EXPORT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            f"http://127.0.0.1:{port}/",
            header,
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        await runner.cleanup()
    assert process.returncode == 0, err.decode()[-3000:]
    assert b"exported" in out

    spans: list[tuple[dict[str, str], SpanProto]] = []
    for body in received["/v1/traces"]:
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                spans.extend((resource, s) for s in scope_spans.spans)
    assert len(spans) == 1, spans
    resource, span = spans[0]
    assert resource["service.name"] == "obs-otlp-service"
    assert span.name == "chat obs-otlp-sim"
    assert span.trace_id.hex() == trace_id
    assert span.parent_span_id.hex() == span_id
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gen_ai.operation.name"].string_value == "chat"
    assert attributes["gen_ai.request.model"].string_value == "obs-otlp-sim"
    assert attributes["gen_ai.usage.output_tokens"].int_value == 3
    assert [e.name for e in span.events] == ["llmserve.admitted", "gen_ai.first_token"]

    names: set[str] = set()
    for body in received["/v1/metrics"]:
        export = ExportMetricsServiceRequest.FromString(body)
        for resource_metrics in export.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                names.update(m.name for m in scope_metrics.metrics)
    assert {
        "gen_ai.client.token.usage",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.request.duration",
    } <= names


async def test_unsampled_traceparent_is_still_forwarded_upstream(
    exporter: InMemorySpanExporter,
) -> None:
    """A caller that decided not to sample (flags 00): B records nothing, and A, which sees the
    caller's context through B, records nothing either (ParentBased sampling, as the SDK's
    default)."""
    back, front = "obs-t-back-unsampled", "obs-t-front-unsampled"
    header, _, _ = traceparent()
    header = header[:-2] + "00"
    async with serve(settings(sim_model(back))) as a:
        upstream = UpstreamModel(engine="openai", name=front, url=a.url, upstream_model=back)
        async with (
            serve(settings(upstream)) as b,
            httpx.AsyncClient(base_url=b.url, timeout=10) as client,
        ):
            await eventually(ready(client), within=5.0, what="B ready", interval=0.02)
            r = await client.post(
                "/v1/chat/completions", json=chat(front, 2), headers={"traceparent": header}
            )
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.1)
    assert await spans_of(exporter, front, 0) == []
    assert await spans_of(exporter, back, 0) == []
