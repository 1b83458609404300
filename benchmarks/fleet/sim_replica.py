"""One simulated vLLM replica over the OpenAI API, a benchmark double any router can sit in front
of: chat and text completions (streamed, with ``stream_options.include_usage``, or whole),
``/health``, ``/v1/models`` and ``/metrics`` under vLLM's names. The model inside is
``engine.SimEngine``: a prefix cache of KV blocks, a bounded batch with a waiting queue, TTFT
from uncached prompt tokens, decode steps that slow with the batch.

Which replica answered is in the ``x-replica`` header and in every chunk's
``system_fingerprint`` (``replica-<id>``), which routers relay even when they drop headers.

    python -m benchmarks.fleet.sim_replica --port 9100 [--capacity-blocks 4096] [--max-num-seqs 32]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from benchmarks.fleet.blocks import render_chat, tokenize
from benchmarks.fleet.engine import Emission, SimConfig, SimEngine, SimRequest
from benchmarks.fleet.engine_loop import EngineLoop
from benchmarks.fleet.sim_metrics import registry_for, render
from benchmarks.servers import run_aiohttp

LOOP = web.AppKey("loop", EngineLoop)


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One parsed request: what the engine runs and how the answer is shaped."""

    chat: bool
    tokens: list[str]
    max_tokens: int
    stream: bool
    include_usage: bool


def parse_call(body: dict[str, Any], chat: bool) -> Call:
    if chat:
        text = render_chat(body.get("messages") or [])
    else:
        prompt = body.get("prompt") or ""
        text = "".join(prompt) if isinstance(prompt, list) else str(prompt)
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    options = body.get("stream_options") or {}
    return Call(
        chat,
        tokenize(text),
        int(max_tokens),
        bool(body.get("stream")),
        bool(options.get("include_usage")),
    )


class Replica:
    """The HTTP side of one replica: turns calls into engine requests and answers into JSON."""

    def __init__(self, config: SimConfig, model: str, replica_id: str) -> None:
        self.engine = SimEngine(config)
        self.loop = EngineLoop(self.engine)
        self.model = model
        self.replica_id = replica_id
        self._ids = itertools.count()
        self._registry = registry_for(self.engine, model)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        # sglang-router reads the served model's name from these at registration (else
        # "unknown"); /server_info's fields are its ServerInfo's. No model_path: it would take
        # that for a Hugging Face name and try to download its tokenizer.
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/model_info", self.model_info)
        app.cleanup_ctx.append(self._engine_task)
        return app

    async def _engine_task(self, _: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self.loop.run())
        yield
        task.cancel()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, _: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "sim"}
        return web.json_response({"object": "list", "data": [card]})

    async def server_info(self, _: web.Request) -> web.Response:
        config = self.engine.config
        info = {
            "served_model_name": self.model,
            "dp_size": 1,
            "max_running_requests": config.max_num_seqs,
            "max_total_tokens": config.capacity_blocks * config.block_size,
        }
        return web.json_response(info)

    async def model_info(self, _: web.Request) -> web.Response:
        return web.json_response({"is_generation": True, "model_type": "sim"})

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=render(self._registry), content_type="text/plain")

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            call = parse_call(orjson.loads(await request.read()), chat)
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, f"malformed request: {type(exc).__name__}")
        if not self.engine.fits(len(call.tokens), call.max_tokens):
            return _error(400, "prompt and max_tokens need more KV blocks than this replica has")
        sim = SimRequest(next(self._ids), call.tokens, call.max_tokens)
        queue = self.loop.submit(sim)
        try:
            if call.stream:
                return await self._stream(request, call, sim, queue)
            while not (await queue.get()).finished:
                pass
            return web.json_response(self._whole(call, sim), headers=self._headers)
        finally:
            self.loop.abort(sim)  # a no-op once it has finished; frees a client's who left

    async def _stream(
        self, request: web.Request, call: Call, sim: SimRequest, queue: asyncio.Queue[Emission]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={**self._headers, "Content-Type": "text/event-stream"}
        )
        await response.prepare(request)
        if call.chat:
            await response.write(
                self._frame(call, sim, {"role": "assistant", "content": ""}, finish_reason=None)
            )
        sent, finished = 0, False
        while not finished:
            emission = await queue.get()
            while not queue.empty():  # a late loop delivers several tokens at once
                emission = queue.get_nowait()
            finished = emission.finished
            frames = [
                self._token_frame(call, sim, i, word, finished and i == emission.generated - 1)
                for i, word in enumerate(sim.output_tokens(sent, emission.generated), sent)
            ]
            sent = emission.generated
            await response.write(b"".join(frames))
        tail = self._usage_frame(call, sim) if call.include_usage else b""
        await response.write(tail + b"data: [DONE]\n\n")
        return response

    @property
    def _headers(self) -> dict[str, str]:
        return {"x-replica": self.replica_id}

    def _envelope(self, call: Call, sim: SimRequest) -> dict[str, Any]:
        return {
            "id": f"{'chatcmpl' if call.chat else 'cmpl'}-{self.replica_id}-{sim.id}",
            "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": f"replica-{self.replica_id}",
        }

    def _frame(self, call: Call, sim: SimRequest, delta: dict[str, Any], **choice: Any) -> bytes:
        part = {"delta": delta} if call.chat else {"text": delta["content"]}
        body = {**self._envelope(call, sim), "choices": [{"index": 0, **part, **choice}]}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _token_frame(self, call: Call, sim: SimRequest, i: int, word: str, last: bool) -> bytes:
        return self._frame(
            call, sim, {"content": f" {word}"}, finish_reason="length" if last else None
        )

    def _usage_frame(self, call: Call, sim: SimRequest) -> bytes:
        body = {**self._envelope(call, sim), "choices": [], "usage": _usage(sim)}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _whole(self, call: Call, sim: SimRequest) -> dict[str, Any]:
        text = "".join(f" {word}" for word in sim.output_tokens())
        if call.chat:
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice, kind = {"text": text}, "text_completion"
        choice.update(index=0, finish_reason="length")
        return {
            **self._envelope(call, sim),
            "object": kind,
            "choices": [choice],
            "usage": _usage(sim),
        }


def _usage(sim: SimRequest) -> dict[str, Any]:
    prompt = len(sim.tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": sim.generated,
        "total_tokens": prompt + sim.generated,
        "prompt_tokens_details": {"cached_tokens": sim.cached_tokens},
    }


def _error(status: int, message: str) -> web.Response:
    error = {"message": message, "type": "BadRequestError", "code": status}
    return web.json_response({"error": error}, status=status)


def config_from(args: argparse.Namespace) -> SimConfig:
    return SimConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig)})


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--model", default="sim")
    parser.add_argument("--replica-id", help="what x-replica says; default: the port")
    for f in dataclasses.fields(SimConfig):
        kind = int if isinstance(f.default, int) else float
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")
    return parser


def main() -> None:
    args = parser().parse_args()
    replica = Replica(config_from(args), args.model, args.replica_id or str(args.port))
    run_aiohttp(replica.app(), args.port)


if __name__ == "__main__":
    main()
