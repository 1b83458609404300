"""The served OpenAPI document, made to describe the API as it is.

The generation routes are raw ASGI endpoints that parse their JSON themselves (orjson, whatever
the Content-Type), so FastAPI sees neither them nor their request bodies; every route answers
errors with OpenAI's error body; generation streams as ``text/event-stream``; /metrics serves
Prometheus text. This adds all of that to what FastAPI generates, once, when the document is
first asked for.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llmserve.wire.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    GenerateRequest,
)

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingsRequest,
    "/generate": GenerateRequest,
}
# (summary, operationId) of each generation route, as FastAPI would have named them.
_OPERATIONS = {
    "/v1/chat/completions": ("Chat Completions", "chat_completions_v1_chat_completions_post"),
    "/v1/completions": ("Completions", "completions_v1_completions_post"),
    "/generate": ("Generate", "generate_generate_post"),
    "/v1/responses": ("Responses", "responses_v1_responses_post"),
    "/v1/embeddings": ("Embeddings", "embeddings_v1_embeddings_post"),
}
# Served by vLLM's own request types (in-process models), which the gateway alone does not
# import: described by what they require.
_VLLM_BODIES: dict[str, dict[str, Any]] = {
    "/v1/responses": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {"model": {"type": "string"}, "input": {}},
    },
}
_REF = "#/components/schemas/{model}"
_ERROR = "OpenAIError"
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_GENERATION_ERRORS = {
    "400": "Invalid request (the param names the field), or the prompt does not fit the context",
    "401": "Missing or invalid API key",
    "403": "This key may not use the model",
    "404": "Unknown model",
    "408": "The request body did not arrive in time",
    "413": "The request body is too large",
    "429": "Over the key's rate limits (Retry-After)",
    "502": "The engine failed",
    "503": "Queue full, draining, or no healthy replica (Retry-After)",
    "504": "No first token in time, or the request timed out",
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(
                get_openapi(title=app.title, version=app.version, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(spec: dict[str, Any]) -> dict[str, Any]:
    refs, definitions = models_json_schema(
        [(model, "validation") for model in REQUEST_BODIES.values()], ref_template=_REF
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(definitions.get("$defs", {}))
    schemas[_ERROR] = _ERROR_SCHEMA
    generation = {
        path: {"post": {"summary": summary, "operationId": operation_id, "responses": {}}}
        for path, (summary, operation_id) in _OPERATIONS.items()
    }
    spec["paths"] = {**generation, **spec.get("paths", {})}
    error = {"application/json": {"schema": {"$ref": _REF.format(model=_ERROR)}}}
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            # Every route may be refused (no key, a body too large, ...) with the same body.
            responses["default"] = {"description": "An error", "content": error}
            if path in REQUEST_BODIES:
                schema = refs[(REQUEST_BODIES[path], "validation")]
            elif path in _VLLM_BODIES:
                schema = _VLLM_BODIES[path]
            else:
                continue
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
            ok = responses.setdefault("200", {"description": "Successful Response"})
            ok["content"] = {
                "application/json": {"schema": {"type": "object"}},
                # Each event's data: one JSON chunk (OpenAI routes end with the string [DONE]).
                "text/event-stream": {"schema": {}},
            }
            for status, description in _GENERATION_ERRORS.items():
                responses[status] = {"description": description, "content": error}
    metrics = spec["paths"].get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"]["content"] = {
            "text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}
        }
    return spec
