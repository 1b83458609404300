"""OpenAI-compatible routes other than generation (``generation_routes``): the model list."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.requests import Request

from llmserve.api.state import Gateway, gateway
from llmserve.auth.principal import principal_for
from llmserve.config import RemoteModel

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
    if isinstance(config, RemoteModel):  # its codec only estimates: report what was configured
        return config.max_model_len
    try:
        return gw.models.get(name).codec.max_model_len
    except Exception:  # an engine still loading has no codec yet
        return None
