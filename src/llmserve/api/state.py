"""How a route reaches the gateway's shared parts (``serving.gateway``): ``request.app.state``."""

from __future__ import annotations

from starlette.requests import Request

from llmserve.serving.gateway import Gateway


async def gateway(request: Request) -> Gateway:
    # async on purpose: FastAPI runs a plain-def dependency on a worker thread, a thread hop
    # per request for a dictionary lookup.
    state: Gateway = request.app.state.gateway
    return state
