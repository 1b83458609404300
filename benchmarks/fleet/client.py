"""Replays a workload through a router's OpenAI API, streaming: each conversation starts at its
arrival time, sends its turns one after another (the next after the answer and a pause, with the
answer the replica gave in the history), and every request is measured: TTFT, output tokens, and
which replica served it. A request never raises: a failure is a ``Sample`` with ``error`` set."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from benchmarks.fleet.workload import Conversation, Turn, Workload


@dataclass(slots=True)
class Sample:
    conversation: int
    turn: int
    start_s: float = 0.0  # from the start of the run
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    replica: str | None = None
    status: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def messages_for(
    conversation: Conversation, turn: Turn, history: list[dict[str, str]]
) -> list[dict[str, str]]:
    if turn.context is not None:  # stateless: a unique context instead of the history
        return [{"role": "system", "content": turn.context}, {"role": "user", "content": turn.user}]
    system = [{"role": "system", "content": conversation.system}] if conversation.system else []
    return [*system, *history, {"role": "user", "content": turn.user}]


def body_for(
    model: str, conversation: Conversation, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    return {
        # A session for the routers that route by one: llmserve's `session` and vllm-router's
        # `consistent_hash` read `user` (and the x-session-id header, sent too). First, as
        # vllm-router finds the field by the first `"user"` in the text, not by parsing.
        "user": f"user-{conversation.id}",
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_turn(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], sample: Sample
) -> str:
    """Send one streamed chat request, fill ``sample`` in, return the answer's text."""
    start = time.perf_counter()
    parts: list[str] = []
    try:
        headers = {"x-session-id": str(body["user"])}
        path = url + "/v1/chat/completions"
        async with session.post(path, json=body, headers=headers) as response:
            sample.status = response.status
            sample.replica = response.headers.get("x-replica")
            if response.status != 200:
                sample.error = (await response.read())[:200].decode(errors="replace")
                return ""
            done = await _read_stream(response, sample, parts, start)
            if not done:
                sample.error = "the stream ended without data: [DONE]"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        sample.error = repr(exc)[:200]
    sample.e2e_s = time.perf_counter() - start
    sample.tokens = sample.tokens or len(parts)
    return "".join(parts)


async def _read_stream(
    response: aiohttp.ClientResponse, sample: Sample, parts: list[str], start: float
) -> bool:
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return True
        chunk = orjson.loads(payload)
        if fingerprint := chunk.get("system_fingerprint"):
            sample.replica = str(fingerprint).removeprefix("replica-")
        for choice in chunk.get("choices") or ():
            if content := (choice.get("delta") or {}).get("content"):
                if not parts:
                    sample.ttft_s = time.perf_counter() - start
                parts.append(content)
        if usage := chunk.get("usage"):
            sample.tokens = int(usage.get("completion_tokens") or 0)
            sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        if "error" in chunk:
            sample.error = orjson.dumps(chunk["error"])[:200].decode()
    return False


async def _conversation(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    conversation: Conversation,
    t0: float,
    time_scale: float,
) -> list[Sample]:
    await asyncio.sleep(max(0.0, t0 + conversation.start_s * time_scale - time.perf_counter()))
    history: list[dict[str, str]] = []
    samples = []
    for index, turn in enumerate(conversation.turns):
        if index:
            await asyncio.sleep(conversation.think_s * time_scale)
        messages = messages_for(conversation, turn, history)
        sample = Sample(conversation.id, index, start_s=time.perf_counter() - t0)
        answer = await one_turn(
            session, url, body_for(model, conversation, messages, turn.max_tokens), sample
        )
        history += [
            {"role": "user", "content": turn.user},
            {"role": "assistant", "content": answer},
        ]
        samples.append(sample)
    return samples


async def replay(
    url: str, model: str, workload: Workload, time_scale: float = 1.0
) -> tuple[list[Sample], float]:
    """Every request's sample, and the run's wall time (first arrival to last answer)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:
        t0 = time.perf_counter()
        per = await asyncio.gather(
            *(_conversation(session, url, model, c, t0, time_scale) for c in workload.conversations)
        )
        seconds = time.perf_counter() - t0
    return [s for samples in per for s in samples], seconds
