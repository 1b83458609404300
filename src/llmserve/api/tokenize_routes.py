"""``/tokenize`` and ``/detokenize``, as `vllm serve` answers them: for in-process models,
vLLM's own tokenization serving object renders (chat template, tools) and counts; upstream and
managed models are asked themselves (one healthy replica). The simulated engine does not serve
them: its tokenizer is no model's."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from llmserve.api.body import load_json
from llmserve.api.layer_routes import parse_vllm, rejected
from llmserve.api.state import gateway
from llmserve.auth.principal import authorize
from llmserve.engines import vllm_compat
from llmserve.errors import InvalidRequest
from llmserve.routing.replicated import ReplicatedEngine
from llmserve.serving.gateway import Gateway
from llmserve.validation.validate import check_message_count

router = APIRouter()
GatewayDep = Annotated[Gateway, Depends(gateway)]


@router.post("/tokenize")
async def tokenize(request: Request, gw: GatewayDep) -> Response:
    """A prompt or chat conversation → its token ids (``count``, ``max_model_len``)."""
    body = await _body(request)
    schema = "TokenizeChatRequest" if "messages" in body else "TokenizeCompletionRequest"
    return await _serve(request, gw, body, schema, "create_tokenize")


@router.post("/detokenize")
async def detokenize(request: Request, gw: GatewayDep) -> Response:
    """Token ids → the text they decode to."""
    return await _serve(request, gw, await _body(request), "DetokenizeRequest", "create_detokenize")


async def _body(request: Request) -> dict[str, Any]:
    body = load_json(await request.body())
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


async def _serve(
    request: Request, gw: Gateway, body: dict[str, Any], schema: str, method: str
) -> Response:
    requested = body.get("model") or gw.models.default  # optional, as in vllm serve
    if not isinstance(requested, str):
        raise InvalidRequest("model must be a string", param="model")
    name = gw.models.canonical(requested)
    authorize(request, requested, name)
    engine = gw.models.get(name)
    layer = getattr(engine, "layer", None)
    if layer is None and isinstance(engine, ReplicatedEngine) and gw.models.forwards_body(name):
        # `vllm serve` behind the gateway tokenizes with its own tokenizer: asked as it is.
        answer = await engine.post_json(request.url.path.lstrip("/"), {**body, "model": name})
        return Response(answer, 200, media_type="application/json")
    if layer is None:
        raise InvalidRequest(
            f"the model '{requested[:256]}' does not serve {request.url.path}: it is served by "
            "in-process models (engine: vllm) and OpenAI servers behind the gateway",
            param="model",
            code="unsupported_model",
        )
    wire = parse_vllm(vllm_compat.vllm_type(schema), {**body, "model": name})
    check_message_count(len(getattr(wire, "messages", None) or ()), gw.settings.limits)
    try:
        result = await getattr(vllm_compat.tokenization(layer), method)(wire, None)
    except Exception as exc:  # vLLM raises some request errors instead of returning them
        raise rejected(vllm_compat.error_response_for(exc)) from None
    if isinstance(result, vllm_compat.error_response()):
        raise rejected(result)
    return Response(result.model_dump_json(), 200, media_type="application/json")
