"""OpenAI-compatible routes other than generation (``generation_routes``): the model list."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.requests import Request

from llmserve.api.state import gateway
from llmserve.auth.principal import principal_for
from llmserve.config import RemoteModel
from llmserve.errors import ModelNotFound
from llmserve.serving.gateway import Gateway

router = APIRouter()
GatewayDep = Annotated[Gateway, Depends(gateway)]


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
        data.append(_entry(gw, public, name, created))
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request, gw: GatewayDep) -> dict[str, Any]:
    """One model by any of its public names, as OpenAI's ``models.retrieve``: 404 for a name
    that is not served or that this key may not use (it does not learn that it exists).
    Unlike the list, a model whose replicas are all down right now is still answered."""
    principal = principal_for(request)
    name = gw.models.canonical(model)  # 404 for an unknown name
    if not (principal.allows(model) or principal.allows(name)):
        raise ModelNotFound(f"The model '{model[:256]}' does not exist.", param="model")
    return _entry(gw, model, name, int(time.time()))


def _entry(gw: Gateway, public: str, name: str, created: int) -> dict[str, Any]:
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
    return entry


def _max_model_len(gw: Gateway, name: str) -> int | None:
    config = gw.models.config(name)
    if isinstance(config, RemoteModel):  # its codec only estimates: report what was configured
        return config.max_model_len
    try:
        return gw.models.get(name).codec.max_model_len
    except Exception:  # an engine still loading has no codec yet
        return None
