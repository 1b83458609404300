"""The generation routes, /v1/chat/completions, /v1/completions, /v1/responses,
/v1/embeddings and /generate, as raw ASGI endpoints.

Why not FastAPI routes like the others: these are the hot path, and FastAPI's per-request
machinery (dependency solving, the Request/Response wrappers, the tasks of a streaming response)
cost more CPU than everything llmserve itself does for a request
(``benchmarks/results/overhead-profile.md``). They are still Starlette routes of the same app,
behind the same middleware (access log, security headers, body limit, CORS, auth), and an error
raised before the first byte is answered by ``api.errors`` like any other route's. The OpenAPI
document describes them (``api.openapi``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmserve.api import layer_routes
from llmserve.api.body import load_json, parse_json
from llmserve.api.respond import respond
from llmserve.auth.principal import authorize, principal_for
from llmserve.config import Limits
from llmserve.errors import InvalidRequest
from llmserve.serving.gateway import Gateway
from llmserve.serving.request_run import Caller, start_run
from llmserve.streaming.encoders import (
    GenerateStreamEncoder,
    OpenAIStreamEncoder,
    ResponsesStreamEncoder,
    StreamEncoder,
)
from llmserve.validation.codec import PromptCodec
from llmserve.validation.request import RequestKind, ValidatedRequest
from llmserve.validation.validate import (
    validate_chat,
    validate_completion,
    validate_embeddings,
    validate_generate,
    validate_responses,
)
from llmserve.wire.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    GenerateRequest,
    ResponsesRequest,
)

# What a route makes of its body: the validated request, and how to stream it (None: whole).
Prepared = tuple[ValidatedRequest, StreamEncoder | None]
Prepare = Callable[[Request, Gateway, bytes], Awaitable[Prepared]]
OpenAIBody = TypeVar("OpenAIBody", ChatCompletionRequest, CompletionRequest)


class GenerationRoute:
    """One generation route: body → validated request → quota, queue, engine → response.
    Chat and completions for an in-process vLLM model go to vLLM's own OpenAI layer instead
    (``api.layer_routes``)."""

    def __init__(self, prepare: Prepare, layer: RequestKind | None = None) -> None:
        self._prepare = prepare
        self._layer = layer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        gw: Gateway = scope["app"].state.gateway
        raw = await request.body()
        if self._layer is not None and await _served_by_layer(request, send, gw, raw, self._layer):
            return
        generation, encoder = await self._prepare(request, gw, raw)
        run = await start_run(gw, generation, Caller(principal_for(request), request.headers))
        scope.setdefault("state", {})["record"] = run.record  # for the access line
        await respond(request, send, run, generation, encoder, gw.settings.keepalive_interval_s)


async def _served_by_layer(
    request: Request, send: Send, gw: Gateway, raw: bytes, kind: RequestKind
) -> bool:
    """Serve the request with vLLM's OpenAI layer if its model has one; False if not."""
    data = load_json(raw)
    requested = data.get("model") if isinstance(data, dict) else None
    if not isinstance(requested, str) or requested not in gw.models.public_names:
        return False  # the wire schema's own errors (a missing model, a 404) answer it
    name = gw.models.canonical(requested)
    engine = gw.models.get(name)
    if getattr(engine, "layer", None) is None:
        return False
    authorize(request, requested, name)
    assert isinstance(data, dict)
    await layer_routes.serve(request, send, gw, engine, {**data, "model": name}, kind)
    return True


def _openai(
    schema: type[OpenAIBody],
    validate: Callable[[OpenAIBody, PromptCodec, Limits, bool], Awaitable[ValidatedRequest]],
) -> Prepare:
    """Chat or completions: the same steps, each with its own schema and validation."""

    async def prepare(request: Request, gw: Gateway, raw: bytes) -> Prepared:
        body = parse_json(schema, raw)
        name = gw.models.canonical(body.model)
        authorize(request, body.model, name)
        if name != body.model:  # an alias: responses, limits and metrics use the model's name
            body = body.model_copy(update={"model": name})
        forwards = gw.models.forwards_body(name)
        codec = gw.models.get(name).codec
        generation = await validate(body, codec, gw.settings.limits, forwards)
        if forwards:  # the upstream gets the client's own body: every field, as sent
            generation = replace(generation, body=body.model_dump(exclude_unset=True))
        return generation, _openai_encoder(generation, body)

    return prepare


def _openai_encoder(generation: ValidatedRequest, body: OpenAIBody) -> StreamEncoder | None:
    if not body.stream:
        return None
    options = body.stream_options
    return OpenAIStreamEncoder(generation, bool(options and options.include_usage))


async def _generate(request: Request, gw: Gateway, raw: bytes) -> Prepared:
    """The original design's ``/generate``: always a stream of ``{"token": ...}`` events."""
    body = parse_json(GenerateRequest, raw)
    requested = body.model or gw.models.default
    model = gw.models.canonical(requested)
    authorize(request, requested, model)
    generation = await validate_generate(
        body, model, gw.models.get(model).codec, gw.settings.limits
    )
    return generation, GenerateStreamEncoder()


async def _embeddings(request: Request, gw: Gateway, raw: bytes) -> Prepared:
    """Reached when vLLM's layer did not serve it: an upstream or managed ``vllm serve``
    gets the client's body, counted and queued like any request; other engines cannot."""
    body = _forwarded(request, gw, parse_json(EmbeddingsRequest, raw), "embeddings")
    codec = gw.models.get(body.model).codec
    return await validate_embeddings(body, codec, gw.settings.limits), None


async def _responses(request: Request, gw: Gateway, raw: bytes) -> Prepared:
    """Reached when vLLM's layer did not serve it: an upstream or managed ``vllm serve`` gets
    the client's body and its events are relayed; other engines cannot serve it."""
    body = _forwarded(request, gw, parse_json(ResponsesRequest, raw), "the Responses API")
    codec = gw.models.get(body.model).codec
    generation = await validate_responses(body, codec, gw.settings.limits)
    return generation, ResponsesStreamEncoder(generation) if body.stream else None


ForwardedBody = TypeVar("ForwardedBody", EmbeddingsRequest, ResponsesRequest)


def _forwarded(request: Request, gw: Gateway, body: ForwardedBody, what: str) -> ForwardedBody:
    """A body only an OpenAI server behind the gateway can take (the layer took the in-process
    models' already), under the model's own name; a 400 naming ``model`` for other engines."""
    name = gw.models.canonical(body.model)  # 404 for an unknown model
    authorize(request, body.model, name)
    if not gw.models.forwards_body(name):
        raise InvalidRequest(
            f"the model '{body.model[:256]}' does not serve {what}: it is served by in-process "
            "models (engine: vllm) and OpenAI servers behind the gateway (engine: openai, "
            "managed)",
            param="model",
            code="unsupported_model",
        )
    return body.model_copy(update={"model": name}) if name != body.model else body


ROUTES = [
    Route("/v1/embeddings", GenerationRoute(_embeddings, layer="embeddings"), methods=["POST"]),
    Route("/v1/responses", GenerationRoute(_responses, layer="responses"), methods=["POST"]),
    Route(
        "/v1/chat/completions",
        GenerationRoute(_openai(ChatCompletionRequest, validate_chat), layer="chat"),
        methods=["POST"],
    ),
    Route(
        "/v1/completions",
        GenerationRoute(_openai(CompletionRequest, validate_completion), layer="completion"),
        methods=["POST"],
    ),
    Route("/generate", GenerationRoute(_generate), methods=["POST"]),
]
