"""Everything recorded about one request: Prometheus metrics, the OTel GenAI span and metrics,
and the fields of its access-log line. Fed by ``RequestRun`` as events pass; finished once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from llmserve.engines.events import ChoiceFinished, EngineEvent, TextDelta, UsageReport
from llmserve.observability import metrics as prom
from llmserve.observability import tracing
from llmserve.observability.reasons import reason_for
from llmserve.validation.request import ValidatedRequest

# Generated tokens reach the counter this many at a time while a request streams (at 50 tokens/s,
# about three times a second), and the rest when it ends.
_COUNT_STEP = 16

_OPERATION = {
    "chat": "chat",
    "completion": "text_completion",
    "generate": "text_completion",
    "responses": "chat",
    "embeddings": "embeddings",
}


@dataclass(slots=True)
class RequestRecord:
    generation: ValidatedRequest
    key: str
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    queue_wait_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    # "disconnect" until the run reports how it ended: a run that never started (the client
    # left before) ends as a disconnect.
    status: str = "disconnect"
    span: Any = None
    # The span's W3C context, for an upstream engine; empty while tracing is off.
    trace_headers: tuple[tuple[str, str], ...] = ()
    # Labelled histogram children looked up once, not per token.
    _ttft: Any = None
    _itl: Any = None
    _generated: Any = None
    _counted: int = 0  # generated tokens already added to the counter
    _ended: bool = False

    def __post_init__(self) -> None:
        self._ttft = prom.TIME_TO_FIRST_TOKEN.labels(self.generation.model)
        self._itl = prom.INTER_TOKEN_LATENCY.labels(self.generation.model)
        self._generated = prom.GENERATION_TOKENS.labels(self.generation.model, self.key)

    def start_span(self, headers: Mapping[str, str]) -> None:
        """Open the request's span in the caller's trace (W3C traceparent, if sent)."""
        g = self.generation
        operation = _OPERATION[g.kind]
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": g.model,
            "gen_ai.request.max_tokens": g.sampling.max_tokens,
            "gen_ai.response.id": g.request_id,
            "llmserve.key.name": self.key,
        }
        for name, value in (
            ("temperature", g.sampling.temperature),
            ("top_p", g.sampling.top_p),
            ("top_k", g.sampling.top_k),
            ("seed", g.sampling.seed),
        ):
            if value is not None:
                attributes[f"gen_ai.request.{name}"] = value
        self.span = tracing.TRACER.start_span(
            f"{operation} {g.model}",
            context=tracing.incoming_context(headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        # Forwarded whenever the context is valid, sampled or not, so the upstream follows the
        # caller's sampling decision instead of starting a trace of its own.
        if self.span.get_span_context().is_valid:
            with trace.use_span(self.span, end_on_exit=False):
                self.trace_headers = tuple(tracing.outgoing_headers().items())

    def admitted(self, waited_s: float) -> None:
        self.queue_wait_s = waited_s
        prom.QUEUE_WAIT.labels(self.generation.model).observe(waited_s)
        if self.span is not None:
            self.span.add_event("llmserve.admitted", {"llmserve.queue_wait_s": waited_s})

    def observe(self, event: EngineEvent) -> None:
        if isinstance(event, TextDelta):
            self._tokens(event.num_tokens)
        elif isinstance(event, ChoiceFinished):
            self.finish_reasons.append(event.reason)
        elif isinstance(event, UsageReport):
            self.prompt_tokens = event.prompt_tokens
            self.completion_tokens = event.completion_tokens
        elif event.tokens:  # a relayed event that carries generated text
            self._tokens(event.tokens)

    def _tokens(self, count: int) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self._ttft.observe(now - self.arrived)
            if self.span is not None:
                self.span.add_event("gen_ai.first_token")
        elif self.last_token_at is not None:
            self._itl.observe(now - self.last_token_at)
        self.last_token_at = now
        self.completion_tokens += count
        # Counted as they stream, so rate() follows long generations smoothly; in steps of
        # _COUNT_STEP tokens, not one by one, because each step takes the counter's lock.
        if self.completion_tokens - self._counted >= _COUNT_STEP:
            self._generated.inc(self.completion_tokens - self._counted)
            self._counted = self.completion_tokens

    def ended(self, error: BaseException | None) -> None:
        """How the run ended (None: completed); the first report wins."""
        if self._ended:
            return
        self._ended = True
        if error is None:
            self.status = "ok"
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.status = "disconnect"
        else:
            self.status = reason_for(error)

    def finish(self) -> None:
        model, key = self.generation.model, self.key
        duration = time.perf_counter() - self.arrived
        prompt = self.prompt_tokens or self.generation.prompt_tokens
        prom.REQUESTS.labels(model, key, self.status).inc()
        prom.REQUEST_DURATION.labels(model).observe(duration)
        prom.PROMPT_TOKENS.labels(model, key).inc(prompt)
        if self.completion_tokens > self._counted:  # the last step, or the engine's usage
            self._generated.inc(self.completion_tokens - self._counted)
        self._finish_otel(model, prompt, duration)

    def _finish_otel(self, model: str, prompt: int, duration: float) -> None:
        base = {
            "gen_ai.operation.name": _OPERATION[self.generation.kind],
            "gen_ai.request.model": model,
        }
        tracing.TOKEN_USAGE.record(prompt, {**base, "gen_ai.token.type": "input"})
        tracing.TOKEN_USAGE.record(self.completion_tokens, {**base, "gen_ai.token.type": "output"})
        tracing.REQUEST_DURATION.record(duration, base)
        if self.first_token_at is not None:
            tracing.TIME_TO_FIRST_TOKEN.record(self.first_token_at - self.arrived, base)
            if self.completion_tokens > 1 and self.last_token_at is not None:
                per_token = (self.last_token_at - self.first_token_at) / (
                    self.completion_tokens - 1
                )
                tracing.TIME_PER_OUTPUT_TOKEN.record(per_token, base)
        if self.span is None:
            return
        self.span.set_attributes(
            {
                "gen_ai.usage.input_tokens": prompt,
                "gen_ai.usage.output_tokens": self.completion_tokens,
                "gen_ai.response.finish_reasons": self.finish_reasons,
                "llmserve.status": self.status,
            }
        )
        if self.status != "ok":
            self.span.set_status(Status(StatusCode.ERROR, self.status))
        self.span.end()
