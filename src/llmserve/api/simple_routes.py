"""Liveness, readiness and metrics (``/generate`` is in ``generation_routes``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.responses import Response

from llmserve.api.state import gateway
from llmserve.serving.gateway import Gateway
from llmserve.wire.errors import json_response

router = APIRouter()
GatewayDep = Annotated[Gateway, Depends(gateway)]


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves HTTP. Engine trouble shows on /ready, not here."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(gw: GatewayDep) -> Response:
    """Ready when every model can answer (a replicated model: at least one healthy replica).
    The body says which cannot, and how many replicas each has in."""
    models = await gw.models.health()
    body: dict[str, Any] = {"models": models}
    replicas = {
        name: {"healthy": sum(r.healthy for r in status), "total": len(status)}
        for name in models
        if (status := gw.models.replicas(name)) is not None
    }
    if replicas:
        body["replicas"] = replicas
    if gw.models.draining:
        return json_response(503, {"status": "draining", **body})
    unready = [name for name, ok in models.items() if not ok]
    if unready:
        return json_response(503, {"status": "not ready", "not_ready": unready, **body})
    return json_response(200, {"status": "ready", **body})


# HEAD too (same status, no body): load balancers and uptime checkers probe with it.
@router.head("/health", include_in_schema=False)
async def health_head() -> Response:
    return Response(status_code=200)


@router.head("/ready", include_in_schema=False)
async def ready_head(gw: GatewayDep) -> Response:
    return Response(status_code=(await ready(gw)).status_code)


@router.get("/metrics")
async def metrics(gw: GatewayDep) -> Response:
    """Prometheus exposition: llmserve's and vLLM's metrics, then the scrape-time gauges."""
    body = generate_latest(REGISTRY) + generate_latest(gw.metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
