"""A real `vllm serve` behind the gateway, alone: a client's disconnect aborts its request there.

Its own module, without the in-process engine of test_vllm_engine.py, on purpose. With that
engine loaded (idle) beside the gateway in this process's scheduling group, and `vllm serve`
generating in its own, the gateway got no CPU for a minute or more on a two-core runner (a
CPU-bound probe beside an idle vLLM engine: 0-2 % of a core, against 30-50 % without it). The
starved gateway could not abort the stream, so `vllm serve` generated on, and the test failed
at its bound. The cause is the two CPU engines on two cores, not the gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from llmserve.config import Settings
from tests.conftest import RunningServer, serve
from tests.engine.hang_up import stream_then_hang_up
from tests.engine.served import SERVED, served_model, vllm_serve_metric
from tests.routing.helpers import wait_ready

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served_gateway() -> AsyncIterator[RunningServer]:
    async with serve(Settings(models=[served_model()])) as running:
        await wait_ready(running.url, within_s=400)
        yield running


async def test_streams_through_vllm_serve_and_a_disconnect_aborts_there(
    served_gateway: RunningServer,
) -> None:
    """A client that hangs up mid-stream gets its request aborted in `vllm serve`: the request
    stops running long before the 4,000 tokens it asked for (about four minutes here), and vLLM
    never counts it finished (it counts only requests that end by themselves, not aborts).

    Bounds are generous and nothing is sampled while the stream runs: the abort needs this
    process to run, and a two-core runner busy with `vllm serve` gives it little CPU."""
    generated = "vllm:generation_tokens_total"
    finished = "vllm:request_success_total"
    assert await vllm_serve_metric(served_gateway, "vllm:num_requests_running") == 0
    tokens_before = await vllm_serve_metric(served_gateway, generated)
    finished_before = await vllm_serve_metric(served_gateway, finished)
    body = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True}
    body["ignore_eos"] = True
    async with stream_then_hang_up(served_gateway.url, body):
        pass  # three tokens in: the client hangs up
    deadline = time.monotonic() + 240
    while await vllm_serve_metric(served_gateway, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vllm serve still runs the abandoned request"
        await asyncio.sleep(0.2)
    tokens = await vllm_serve_metric(served_gateway, generated) - tokens_before
    assert 3 <= tokens < 4000, f"{tokens:g} tokens generated"
    assert await vllm_serve_metric(served_gateway, finished) == finished_before, "it finished"
