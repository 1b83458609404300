"""Upstream answers that are not chat or completion chunks: the Responses API's named events
and whole embeddings answers, read as engine events. Anything not shaped as expected is an
``EngineFailure`` with code ``upstream_malformed``."""

from __future__ import annotations

import orjson

from llmserve.engines.events import RawFrame, UsageReport
from llmserve.engines.upstream.failures import redact
from llmserve.errors import EngineFailure

# Events that end a Responses stream: the response object they carry is the whole answer.
RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def responses_frame(name: str | None, payload: bytes, secret: str | None) -> RawFrame:
    try:
        data = orjson.loads(payload)
        kind = str(data.get("type") or name or "")
    except (orjson.JSONDecodeError, AttributeError) as exc:
        raise EngineFailure(
            "the upstream engine sent a malformed event", code="upstream_malformed"
        ) from exc
    if kind == "error":
        message = redact(str(data.get("message") or data.get("error") or data), secret)
        raise EngineFailure(f"the upstream engine failed: {message}", code="upstream_error")
    # Deltas of generated text (output, reasoning) count one token each, for metrics only.
    return RawFrame(kind, data, 1 if kind.endswith(".delta") else 0)


def responses_usage(frame: RawFrame) -> UsageReport:
    response = frame.data.get("response")
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(response, dict) or not isinstance(usage, dict):
        raise EngineFailure("the upstream response carries no usage", code="upstream_malformed")
    try:
        return UsageReport(int(usage["input_tokens"]), int(usage["output_tokens"]), None, response)
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineFailure(
            "the upstream response carries no usage", code="upstream_malformed"
        ) from exc


def embeddings_event(raw: bytes) -> UsageReport:
    """An upstream's embeddings answer: its counts, and its body (data, object, created, ...)
    as the fields that carried them; llmserve sets the id and the model name."""
    try:
        body = orjson.loads(raw)
        usage = body["usage"]
        prompt = int(usage["prompt_tokens"])
        if prompt < 0 or not isinstance(body.get("data"), list):
            raise ValueError("no embeddings")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EngineFailure(
            f"the upstream engine sent a malformed answer ({type(exc).__name__})",
            code="upstream_malformed",
        ) from exc
    details = {k: v for k, v in usage.items() if k not in ("prompt_tokens", "total_tokens")}
    fields = {k: v for k, v in body.items() if k not in ("id", "model", "usage")}
    return UsageReport(prompt, 0, details or None, fields)
