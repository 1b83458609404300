"""``/v1/embeddings`` with the embedded embedding model (all-MiniLM-L6-v2) served both ways: in
process, by vLLM's own embedding serving object, and by a managed `vllm serve` whose answer the
gateway relays. The same inputs must give the same vectors and counts either way, and each way
reserves the key's quota for its input tokens.

Small models only (22 M parameters): both engines load in about a minute on two cores.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from llmserve.config import (
    EMBEDDED_EMBEDDING_NAME,
    Limits,
    ManagedModel,
    ModelConfig,
    Settings,
    VllmModel,
)
from llmserve.embedded.minilm import ensure_minilm
from tests.auth.helpers import add_key, auth_settings, bearer
from tests.conftest import RunningServer, serve
from tests.routing.helpers import wait_ready
from tests.support.errors import assert_openai_error

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

IN_PROCESS = EMBEDDED_EMBEDDING_NAME
SERVED = "minilm-served"
DIMENSIONS = 384  # all-MiniLM-L6-v2's
KEYS: dict[str, str] = {}
MAX_INPUTS = 16

SENTENCES = [
    "A cat is sleeping on the sofa.",
    "The kitten naps on the couch.",  # a paraphrase of the first
    "Interest rates rose by half a point in March.",  # unrelated
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    path: Path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    KEYS["free"] = add_key(path, "free")
    KEYS["small"] = add_key(path, "small", tpm=20)
    folder = ensure_minilm(Settings().cache_dir)
    # As the in-process engine runs on CPU (fp32, eager), so both compute the same way.
    served = ManagedModel(
        engine="managed",
        name=SERVED,
        model=str(folder),
        args=("--dtype", "float32", "--enforce-eager"),
        startup_timeout_s=400,
    )
    models: list[ModelConfig] = [
        VllmModel(name=IN_PROCESS, embedded=EMBEDDED_EMBEDDING_NAME),
        served,
    ]
    settings = auth_settings(path, models=models, limits=Limits(max_embedding_inputs=MAX_INPUTS))
    async with serve(settings) as running:
        await wait_ready(running.url, within_s=400)
        try:
            yield running
        finally:
            while _clients:  # closed in the module's own event loop
                await _clients.pop().close()


_clients: list[AsyncOpenAI] = []


def sdk(server: RunningServer) -> AsyncOpenAI:
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key=KEYS["free"], max_retries=0)
    _clients.append(client)
    return client


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.parametrize("model", [IN_PROCESS, SERVED])
async def test_embeddings_have_the_models_dimension_and_rank_a_paraphrase_first(
    gateway: RunningServer, model: str
) -> None:
    answer = await sdk(gateway).embeddings.create(model=model, input=SENTENCES)
    assert answer.model == model
    assert [d.index for d in answer.data] == [0, 1, 2]
    vectors = [d.embedding for d in answer.data]
    assert all(len(v) == DIMENSIONS for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)  # normalised
    paraphrase, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert paraphrase > unrelated + 0.2, (paraphrase, unrelated)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(SENTENCES) * 2


async def test_in_process_and_vllm_serve_give_the_same_vectors_and_counts(
    gateway: RunningServer,
) -> None:
    """The differential check: vLLM's embedding object in the gateway and `vllm serve`
    behind it, on one model and the same inputs (texts and token ids)."""
    for batch in (SENTENCES, [[101, 7592, 2088, 102]]):
        ours = await sdk(gateway).embeddings.create(model=IN_PROCESS, input=batch)
        theirs = await sdk(gateway).embeddings.create(model=SERVED, input=batch)
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
        for mine, served in zip(ours.data, theirs.data, strict=True):
            pairs = zip(mine.embedding, served.embedding, strict=True)
            assert max(abs(x - y) for x, y in pairs) < 1e-4


@pytest.mark.parametrize("model", [IN_PROCESS, SERVED])
async def test_base64_encoding_and_vllm_fields_reach_the_engine(
    gateway: RunningServer, model: str
) -> None:
    """``encoding_format`` and vLLM's own ``truncate_prompt_tokens`` have their meaning in
    both modes: honoured in process, forwarded to `vllm serve`."""
    body: dict[str, str | int] = {
        "model": model,
        "input": SENTENCES[0],
        "encoding_format": "base64",
    }
    body["truncate_prompt_tokens"] = 4
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        r = await http.post("/v1/embeddings", json=body, headers=bearer(KEYS["free"]))
    assert r.status_code == 200, r.text
    answer = r.json()
    packed = base64.b64decode(answer["data"][0]["embedding"])
    assert len(packed) == DIMENSIONS * 4  # float32
    assert all(math.isfinite(x) for x in struct.unpack(f"<{DIMENSIONS}f", packed))
    assert answer["usage"]["prompt_tokens"] == 4  # truncated as asked
    assert answer["id"].startswith("embd-") and answer["model"] == model


@pytest.mark.parametrize("model", [IN_PROCESS, SERVED])
async def test_too_many_inputs_and_unknown_fields_are_named(
    gateway: RunningServer, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as many:
        await sdk(gateway).embeddings.create(model=model, input=["x"] * (MAX_INPUTS + 1))
    assert many.value.param == "input"
    if model == IN_PROCESS:  # an upstream is sent unknown fields, and answers them itself
        with pytest.raises(openai.BadRequestError) as unknown:
            await sdk(gateway).embeddings.create(
                model=model, input="x", extra_body={"pooling_kind": "max"}
            )
        assert unknown.value.param == "pooling_kind"
    with pytest.raises(openai.BadRequestError) as too_long:
        await sdk(gateway).embeddings.create(model=model, input="word " * 600)
    assert "256" in too_long.value.message  # the model's context, from vLLM either way


async def test_an_embedding_model_refuses_chat_by_name(
    gateway: RunningServer,
) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        await sdk(gateway).chat.completions.create(
            model=IN_PROCESS, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert chat.value.param == "model" and chat.value.code == "unsupported_model"


@pytest.mark.parametrize("model", [IN_PROCESS, SERVED])
async def test_embeddings_reserve_their_input_tokens_from_the_keys_quota(
    gateway: RunningServer, model: str
) -> None:
    """The key may use 20 tokens a minute: a short input passes, one whose tokens alone are
    over it is refused before any engine work, and nothing of it is charged."""
    headers = bearer(KEYS["small"])
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        over = await http.post(
            "/v1/embeddings",
            json={"model": model, "input": "one two three four five six " * 6},
            headers=headers,
        )
        assert_openai_error(over, 429, type="rate_limit_error")
        small = {"model": model, "input": "hi"}
        ok = await http.post("/v1/embeddings", json=small, headers=headers)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] == 3  # [CLS] hi [SEP]


async def test_metrics_count_embedding_requests_and_their_tokens(gateway: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        await sdk(gateway).embeddings.create(model=IN_PROCESS, input="counted")
        text = (await http.get("/metrics")).text
    requests = _series(text, "llmserve_requests_total", IN_PROCESS, 'status="ok"')
    prompt = _series(text, "llmserve_prompt_tokens_total", IN_PROCESS, "")
    assert requests >= 1 and prompt >= 3


def _series(text: str, name: str, model: str, also: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line and also in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
