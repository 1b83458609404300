"""A fake OpenAI-compatible upstream for overhead benchmarks: streams pre-encoded chunks at a
fixed token rate after a fixed first-token latency, and costs as little CPU as it can, so what
is measured is the gateway in front of it. Not a model, not a test double for correctness.

    python -m benchmarks.fake_upstream --port 9000 --tokens-per-second 50 --ttft-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiohttp import web

from benchmarks.servers import run_aiohttp


def _chunk(kind: str, index: int, finish: str | None) -> bytes:
    if kind == "tools":  # a tool call whose arguments stream a piece per token
        call: dict[str, object] = {"index": 0, "function": {"arguments": f" tok{index}"}}
        if index == 0:
            call.update(id="call_fake", type="function")
            call["function"] = {"name": "get_weather", "arguments": ""}
        delta = {"tool_calls": [call]}
        reason = "tool_calls" if finish else None
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        obj = "chat.completion.chunk"
    elif kind == "chat":
        choice = {"index": 0, "delta": {"content": f" tok{index}"}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": f" tok{index}", "finish_reason": finish}
        obj = "text_completion"
    body = {"id": "fake", "object": obj, "created": 0, "model": "fake", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def build_app(tokens_per_second: float, ttft_s: float) -> web.Application:
    interval = 1.0 / tokens_per_second
    cache: dict[tuple[str, int], list[bytes]] = {}

    def frames(kind: str, n: int) -> list[bytes]:
        if (kind, n) not in cache:
            out = [_chunk(kind, i, "length" if i == n - 1 else None) for i in range(n)]
            usage = {
                "id": "fake",
                "object": "x",
                "created": 0,
                "model": "fake",
                "choices": [],
                "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8},
            }
            out.append(b"data: " + orjson.dumps(usage) + b"\n\n" + b"data: [DONE]\n\n")
            cache[(kind, n)] = out
        return cache[(kind, n)]

    async def generate(request: web.Request, kind: str) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if kind == "chat" and body.get("tools"):
            kind = "tools"
        n = int(body.get("max_tokens") or 16)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = time.monotonic() + ttft_s
        for i, frame in enumerate(frames(kind, n)):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await response.write(frame)
        return response

    async def chat(request: web.Request) -> web.StreamResponse:
        # A request with tools is answered with a streamed tool call, as vLLM's parsers send.
        return await generate(request, "chat")

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, "completion")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens-per-second", type=float, default=50)
    parser.add_argument("--ttft-ms", type=float, default=50)
    args = parser.parse_args()
    run_aiohttp(build_app(args.tokens_per_second, args.ttft_ms / 1000), args.port)


if __name__ == "__main__":
    main()
