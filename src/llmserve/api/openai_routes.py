"""OpenAI-compatible routes: chat completions, completions, models."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from llmserve.api.body import json_body
from llmserve.api.protocol import ChatCompletionRequest, CompletionRequest
from llmserve.api.respond import authorize, respond_stream, respond_whole, start
from llmserve.api.state import Gateway, gateway
from llmserve.auth.principal import principal_for
from llmserve.config import ManagedModel, UpstreamModel
from llmserve.streaming.encoders import OpenAIStreamEncoder
from llmserve.validation.request import GenerationRequest
from llmserve.validation.validate import validate_chat, validate_completion

router = APIRouter()
GatewayDep = Annotated[Gateway, Depends(gateway)]


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
    request: Request,
    gw: GatewayDep,
) -> Response:
    name = gw.models.canonical(body.model)
    authorize(request, body.model, name)
    if name != body.model:  # an alias: responses, limits and metrics use the model's name
        body = body.model_copy(update={"model": name})
    generation = await validate_chat(body, gw.models.get(name).codec, gw.settings.limits)
    return await _respond(request, gw, generation, body.stream, body.stream_options)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
    request: Request,
    gw: GatewayDep,
) -> Response:
    name = gw.models.canonical(body.model)
    authorize(request, body.model, name)
    if name != body.model:  # an alias: responses, limits and metrics use the model's name
        body = body.model_copy(update={"model": name})
    generation = await validate_completion(body, gw.models.get(name).codec, gw.settings.limits)
    return await _respond(request, gw, generation, body.stream, body.stream_options)


async def _respond(
    request: Request, gw: Gateway, generation: GenerationRequest, stream: bool, options: Any
) -> Response:
    run = await start(request, gw, generation)
    if not stream:
        return await respond_whole(request, run, generation)
    encoder = OpenAIStreamEncoder(generation, bool(options and options.include_usage))
    return await respond_stream(request, run, encoder, gw.settings.keepalive_interval_s)


@router.get("/v1/models")
async def list_models(request: Request, gw: GatewayDep) -> dict[str, Any]:
    """The models this key may use and that can answer now (at least one healthy replica),
    under every public name; an alias names its model in ``root``."""
    created = int(time.time())
    principal = principal_for(request)
    data = []
    healthy = await gw.models.health()
    for public, name in gw.models.public_names.items():
        if not healthy.get(name) or not (principal.allows(public) or principal.allows(name)):
            continue
        entry: dict[str, Any] = {
            "id": public,
            "object": "model",
            "created": created,
            "owned_by": "llmserve",
            "root": name,
        }
        codec_len = _max_model_len(gw, name)
        if codec_len is not None:
            entry["max_model_len"] = codec_len
        data.append(entry)
    return {"object": "list", "data": data}


def _max_model_len(gw: Gateway, name: str) -> int | None:
    config = gw.models.config(name)
    if isinstance(
        config, UpstreamModel | ManagedModel
    ):  # its codec only estimates: report what was configured
        return config.max_model_len
    try:
        return gw.models.get(name).codec.max_model_len
    except Exception:  # an engine still loading has no codec yet
        return None
