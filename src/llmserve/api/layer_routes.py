"""Chat, completions, Responses and embeddings for in-process models, served by vLLM's own
OpenAI layer.

The body is vLLM's request type, so every field has `vllm serve`'s meaning (tools, structured
outputs, echo, prompt logprobs, several prompts, token-id prompts, every sampling extra). A
field vLLM would accept and ignore is refused with a 400 naming it, except the old ``guided_*``
names, which vLLM 0.32 drops with a warning and so does llmserve (docs/api.md). llmserve's own
bounds (``Limits``) apply on top; quota, queue, deadline and abort are the gate's
(``serving.layer_gate``); the response is vLLM's, sent by llmserve.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Send

from llmserve.api.headers import rate_limit_headers
from llmserve.api.keepalive import KeepAlive, Opened
from llmserve.config import Limits
from llmserve.engines import vllm_compat
from llmserve.engines.gated_client import CURRENT_GATE
from llmserve.errors import (
    ClientDisconnected,
    ContextLengthExceeded,
    InvalidRequest,
    LLMServeError,
    ModelNotFound,
)
from llmserve.serving.gateway import Gateway
from llmserve.serving.layer_gate import LayerGate
from llmserve.streaming import sse
from llmserve.streaming.disconnect import DisconnectWatch
from llmserve.validation.request import RequestKind
from llmserve.validation.schema_errors import invalid_request
from llmserve.validation.validate import (
    check_message_count,
    check_responses_limits,
    embedding_inputs,
)
from llmserve.wire.errors import body_for

log = logging.getLogger(__name__)

# vLLM 0.32 logs and ignores these (structured_outputs replaced them); llmserve does the same.
_REMOVED_BY_VLLM = frozenset(
    {
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
        "guided_json_object",
    }
)
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


class LayerRejected(LLMServeError):
    """vLLM's own error response (its status, type and message), as an llmserve error."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None) -> None:
        super().__init__(message, param=param)
        self.status = status  # type: ignore[misc]
        self.error_type = error_type  # type: ignore[misc]


_SCHEMAS = {
    "chat": "ChatCompletionRequest",
    "completion": "CompletionRequest",
    "responses": "ResponsesRequest",
    "embeddings": "EmbeddingRequest",
}
# The layer's serving object of each kind (None on a model that cannot serve it: a pooling
# model has no chat, a generative one no embeddings) and the id prefix of its requests.
_SERVING = {
    "chat": ("openai_serving_chat", "chatcmpl"),
    "completion": ("openai_serving_completion", "cmpl"),
    "responses": ("openai_serving_responses", "resp"),
    "embeddings": ("serving_embedding", "embd"),
}
_WHAT = {
    "chat": "chat completions",
    "completion": "completions",
    "responses": "the Responses API",
    "embeddings": "embeddings",
}


async def serve(
    request: Request,
    send: Send,
    gw: Gateway,
    engine: Any,
    body: dict[str, Any],
    kind: RequestKind,
) -> None:
    serving = _serving(engine.layer, kind, body["model"])
    if "request_id" in body:
        # vLLM names the response and its engine requests after it; llmserve's gate, quota
        # reservations and abort need ids no client can make collide.
        raise InvalidRequest(
            "request_id is set by llmserve: every response carries an id of its own (an "
            "X-Request-Id header is echoed and logged, to correlate)",
            param="request_id",
        )
    wire = parse_vllm(vllm_compat.vllm_type(_SCHEMAS[kind]), body)
    if kind == "responses":
        _check_responses_limits(wire, gw.settings.limits)
        # vLLM's own id ("resp_..."), the one its engine requests are named after.
        gate_id = wire.request_id
    else:
        if kind == "embeddings":
            embedding_inputs(wire, gw.settings.limits)
        else:
            _check_limits(wire, gw.settings.limits, kind == "chat")
        wire.request_id = os.urandom(16).hex()
        gate_id = f"{_SERVING[kind][1]}-{wire.request_id}"
    gate = LayerGate(
        request,
        gw,
        wire.model,
        kind,
        gate_id,
        int(getattr(wire, "priority", 0) or 0),
        engine.abort,
    )
    token = CURRENT_GATE.set(gate)
    opened = completed = False
    result: Any = None
    try:
        with DisconnectWatch(request.receive) as watch:
            result = await _create(serving, wire, kind)
            if watch.gone:  # vLLM answered the cancellation with an error response of its own
                raise ClientDisconnected("the client disconnected")
            if gate.error is not None:
                raise gate.error
            if isinstance(result, vllm_compat.error_response()):
                raise rejected(result)
            if isinstance(result, BaseModel | Response):
                completed = True
                await gate.close(completed=True)
                opened = True
                if isinstance(result, Response):  # embeddings: vLLM's own response, as it is
                    response = result
                    response.headers.update(rate_limit_headers(gate.quota))
                else:
                    response = Response(
                        result.model_dump_json(by_alias=kind == "responses"),
                        200,
                        rate_limit_headers(gate.quota),
                        media_type="application/json",
                    )
                await response(request.scope, request.receive, send)
            else:
                # 429 / 503 before the stream's first byte, unless the queue holds it past the
                # keep-alive interval: then the stream opens with comments, and errors are in band.
                started = Opened()
                interval = gw.settings.keepalive_interval_s
                keepalive = KeepAlive(send, lambda: _head(gate), interval, started)
                try:
                    if gate.entered:  # else the first engine request opens it (``_run``)
                        await gate.open()
                    first = await _read_to_the_gate(gate, result)
                    if gate.error is not None:
                        raise gate.error
                except LLMServeError as exc:
                    if not await keepalive.stop():
                        raise
                    opened = True
                    await _end(send, _in_band(exc, kind))
                    return
                except BaseException:
                    await keepalive.stop()
                    raise
                opened = True
                if not await keepalive.stop():
                    await send(_head(gate))
                await _stream(send, first, result, kind)
                completed = gate.error is None
    finally:
        CURRENT_GATE.reset(token)
        if isinstance(result, AsyncGenerator):
            await result.aclose()
        await gate.close(completed=completed)
    if watch.gone and not opened:
        raise ClientDisconnected("the client disconnected")


def _serving(layer: Any, kind: RequestKind, model: str) -> Any:
    serving = getattr(layer, _SERVING[kind][0], None)
    if serving is None:
        raise InvalidRequest(
            f"the model '{model[:256]}' does not serve {_WHAT[kind]}: "
            + ("it is not an embedding model" if kind == "embeddings" else "it is a pooling model"),
            param="model",
            code="unsupported_model",
        )
    return serving


async def _create(serving: Any, wire: Any, kind: RequestKind) -> Any:
    try:
        if kind == "chat":
            return await serving.create_chat_completion(wire, None)
        if kind == "responses":
            result = await serving.create_responses(wire, None)
            if isinstance(result, AsyncGenerator):
                return _responses_sse(result)
            return result
        if kind == "embeddings":  # a Response, or an exception for a bad request
            return await serving(wire, None)
        return await serving.create_completion(wire, None)
    except LLMServeError:
        raise
    except Exception as exc:  # vLLM raises some request errors instead of returning them
        error = rejected(vllm_compat.error_response_for(exc))
        if error.status >= 500:
            log.exception("vLLM failed on a request")
        raise error from None


def _head(gate: LayerGate) -> Message:
    headers = [
        *_SSE_HEADERS,
        *((k.lower().encode(), v.encode()) for k, v in rate_limit_headers(gate.quota).items()),
    ]
    return {"type": "http.response.start", "status": 200, "headers": headers}


async def _read_to_the_gate(gate: LayerGate, result: AsyncGenerator[str, None]) -> str | None:
    """The stream's frames up to the one that opened the gate, as one: vLLM's Responses
    streams announce the response (``response.created``) before they ask for an engine
    request, and the quota and the queue must still answer before the first byte."""
    frames: list[str] = []
    while True:
        frame = await anext(result, None)
        if frame is None:
            break
        frames.append(frame)
        if gate.opened or gate.error is not None:
            break
    return "".join(frames) if frames else None


async def _stream(send: Send, first: str | None, rest: Any, kind: RequestKind) -> None:
    try:
        if first is not None:
            await send({"type": "http.response.body", "body": first.encode(), "more_body": True})
        async for frame in rest:
            await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})
    except OSError:
        return  # the connection broke: the same as a disconnect
    except LLMServeError as exc:
        # Chat and completions streams answer errors in band themselves; Responses streams
        # raise them (a deadline, an engine restart): llmserve ends those in band.
        await _end(send, _in_band(exc, kind))
        return
    await _end(send, [])


def _in_band(exc: LLMServeError, kind: RequestKind) -> list[bytes]:
    if kind == "responses":
        return [sse.event("error", body_for(exc))]
    return [sse.data(body_for(exc)), sse.DONE]


async def _end(send: Send, frames: list[bytes]) -> None:
    with contextlib.suppress(OSError):
        await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})


def parse_vllm(schema: Any, body: dict[str, Any]) -> Any:
    """``body`` as vLLM's request type ``schema``: one model class, or a union of them
    (embeddings: text, one chat, batches of chats), whose chosen member decides which fields
    are known. A field the type does not know is refused: vLLM would accept and ignore it."""
    model = isinstance(schema, type) and issubclass(schema, BaseModel)
    if model:
        _refuse_unknown(schema, body)
    try:
        wire = schema.model_validate(body) if model else _adapter(schema).validate_python(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False), body) from None
    except Exception as exc:  # vLLM's own validators raise its client errors unwrapped
        raise rejected(vllm_compat.error_response_for(exc)) from None
    _refuse_unknown(type(wire), body)
    return wire


_ADAPTERS: dict[int, TypeAdapter[Any]] = {}


def _adapter(schema: Any) -> TypeAdapter[Any]:
    """One TypeAdapter per union type: building one costs milliseconds."""
    adapter = _ADAPTERS.get(id(schema))
    if adapter is None:
        adapter = _ADAPTERS[id(schema)] = TypeAdapter(schema)
    return adapter


def _refuse_unknown(schema: type[BaseModel], body: dict[str, Any]) -> None:
    names = set()
    for name, field in schema.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    unknown = sorted(set(body) - names - _REMOVED_BY_VLLM)
    if unknown:
        raise InvalidRequest(
            f"unknown field '{unknown[0][:64]}': not part of the API this model serves",
            param=unknown[0][:64],
            code="unknown_field",
        )


async def _responses_sse(events: AsyncGenerator[Any, None]) -> AsyncGenerator[str, None]:
    """The Responses API's events as SSE, named by their type, as `vllm serve` sends them."""
    try:
        async for event in events:
            kind = getattr(event, "type", "unknown")
            yield f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
    finally:
        await events.aclose()


def _check_responses_limits(wire: Any, limits: Limits) -> None:
    check_responses_limits(wire, limits)
    if wire.max_output_tokens is None:  # vLLM's default would be the whole rest of the context
        wire.max_output_tokens = limits.default_max_tokens


def _check_limits(wire: Any, limits: Limits, chat: bool) -> None:
    if getattr(wire, "use_beam_search", False):
        raise InvalidRequest(
            "beam search is not served: its cost has no bound the queue can see",
            param="use_beam_search",
        )
    max_tokens = getattr(wire, "max_completion_tokens", None) or wire.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens must be at most {limits.max_tokens}", param="max_tokens")
    if max_tokens is None:  # vLLM's default would be the whole rest of the context
        if chat:
            wire.max_completion_tokens = limits.default_max_tokens
        else:
            wire.max_tokens = limits.default_max_tokens
    if (wire.n or 1) > limits.max_n:
        raise InvalidRequest(f"n must be at most {limits.max_n}", param="n")
    stop = wire.stop
    sequences = [stop] if isinstance(stop, str) else list(stop or ())
    if len(sequences) > limits.max_stop_sequences:
        raise InvalidRequest(
            f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop"
        )
    if any(len(s) > limits.max_stop_sequence_chars for s in sequences):
        raise InvalidRequest(
            f"each stop sequence must be at most {limits.max_stop_sequence_chars} characters",
            param="stop",
        )
    param = "top_logprobs" if chat else "logprobs"
    logprobs = wire.top_logprobs if chat else wire.logprobs
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise InvalidRequest(f"{param} must be at most {limits.max_logprobs}", param=param)
    if chat:
        check_message_count(len(wire.messages), limits)
    prompt = None if chat else wire.prompt
    if (
        isinstance(prompt, list)
        and prompt
        and not isinstance(prompt[0], int)
        and len(prompt) > limits.max_n
    ):
        raise InvalidRequest(f"at most {limits.max_n} prompts per request", param="prompt")


def rejected(error: Any) -> LLMServeError:
    """vLLM's error response as llmserve's error, with OpenAI's types and codes."""
    info = error.error
    message, param = str(info.message), info.param
    status = int(info.code) if 400 <= int(info.code) < 600 else 400
    if status == 400:
        if "maximum context length" in message:
            return ContextLengthExceeded(message, param=param)
        return InvalidRequest(message, param=param)
    if status == 404:
        return ModelNotFound(message, param=param)
    return LayerRejected(
        status, message, "server_error" if status >= 500 else str(info.type), param
    )
