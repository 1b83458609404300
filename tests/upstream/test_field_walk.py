"""The walk of tests/unit/test_field_walk.py, for the engines that are not vLLM's layer: every
OpenAI request field (as the official SDK types it) reaches an upstream exactly as sent, and
the simulated engine honours it or refuses it with a 400 naming it. Nothing is accepted and
ignored."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import serve, simulated_settings
from tests.support.errors import assert_openai_error
from tests.support.fake_upstream import HEALTHY, answer
from tests.unit.test_field_walk import CASES, COMPLETION_SAMPLES, SAMPLES, _openai_fields
from tests.upstream.test_upstream_engine import gateway_before

pytestmark = pytest.mark.asyncio(loop_scope="module")

PATHS = {
    "ChatCompletionRequest": "/v1/chat/completions",
    "CompletionRequest": "/v1/completions",
    "EmbeddingRequest": "/v1/embeddings",
}
# llmserve's own: it always reads an upstream's stream with usage, and its queue takes the
# priority (tests/upstream/test_upstream_transparency.py checks what is sent instead).
NOT_FORWARDED = {"stream", "stream_options", "priority"}
# What the simulated engine serves (the README's list; `user` is the session for affinity
# routing, `best_of` only at n, `stream_options` is llmserve's own stream's).
SIMULATED_HONOURS = {
    "frequency_penalty",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream_options",
    "temperature",
    "top_logprobs",
    "top_p",
    "user",
    "best_of",
}


def sample(schema: str, field: str) -> Any:
    if schema == "CompletionRequest" and field in COMPLETION_SAMPLES:
        return COMPLETION_SAMPLES[field]
    if field == "best_of":
        return 1  # the default n: the only value a server without best_of can honour
    return SAMPLES.get(field, {"sent": True})


# What the upstream answers: an embedding, or a healthy stream in the path's shape.
EMBEDDING = answer(
    {
        "data": [{"index": 0, "object": "embedding", "embedding": [1.0]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
)


@pytest.mark.parametrize(("schema", "params", "required"), CASES)
async def test_every_openai_field_reaches_the_upstream_as_sent(
    schema: str, params: Any, required: dict[str, Any]
) -> None:
    fields = sorted(_openai_fields(params) - set(required) - NOT_FORWARDED)
    body = {"model": "up", **required, **{f: sample(schema, f) for f in fields}}
    async with (
        gateway_before(EMBEDDING if schema == "EmbeddingRequest" else HEALTHY) as (b, fake),
        httpx.AsyncClient(base_url=b.url, timeout=10) as http,
    ):
        r = await http.post(PATHS[schema], json=body)
    assert r.status_code == 200, r.text
    [sent] = fake.bodies
    for field in fields:
        assert sent.get(field) == body[field], field


@pytest.mark.parametrize(("schema", "params", "required"), CASES[:2])
async def test_the_simulated_engine_honours_each_field_or_names_it(
    schema: str, params: Any, required: dict[str, Any]
) -> None:
    refused, honoured = set(), set()
    async with (
        serve(simulated_settings()) as a,
        httpx.AsyncClient(base_url=a.url, timeout=10) as http,
    ):
        for field in sorted(_openai_fields(params) - set(required)):
            body = {"model": "sim", "max_tokens": 2, **required, field: sample(schema, field)}
            if field == "stream_options":
                body["stream"] = True
            if field == "top_logprobs":
                body["logprobs"] = True
            r = await http.post(PATHS[schema], json=body)
            if r.status_code == 200:
                honoured.add(field)
                continue
            assert_openai_error(r, 400, param=field)
            refused.add(field)
    assert honoured == SIMULATED_HONOURS & _openai_fields(params)
    assert "logit_bias" in refused  # known to the wire schema, still not served: named
