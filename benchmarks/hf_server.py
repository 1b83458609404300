"""A plain Hugging Face transformers server for the OpenAI completions API: the baseline that
"vLLM gives 3-5x the throughput" is measured against (``benchmarks/hf_vs_vllm.py``).

What a plain transformers server does: load the model once, and for each request call
``model.generate`` in a worker thread, streaming the text through a ``TextIteratorStreamer``.
``generate`` serves one sequence at a time, so requests are serialised by a lock: a request waits
for the model while another one generates, and concurrent clients only queue. That is the default
here (``--batch 1``).

``--batch N`` (N > 1) is the "HF batched" variant: static batching. Whatever requests are waiting
when the model frees up (after a short collection window) are left-padded into one batch of up to N
and generated together to the end of the longest; a request that arrives meanwhile waits for the
whole batch to finish (no continuous batching, unlike vLLM).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (streaming and not).
Request fields honoured: ``prompt`` (a string or a list of one), ``max_tokens`` (default 16),
``temperature`` (0 means greedy; default 1), ``top_p``, ``seed``, ``ignore_eos`` (vLLM's extension,
done here as ``min_new_tokens = max_tokens``: EOS is forbidden where vLLM samples it and carries
on, so greedy texts part at the first EOS; the token count and the cost per step are the same),
``stream`` and ``stream_options.include_usage``. ``usage`` reports
prompt and completion tokens. fp32 by default, like the vLLM runs it is compared with.

    .venv/bin/python -m benchmarks.hf_server --model DIR [--port 8311] [--batch 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch
from aiohttp import web
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("hf_server")


class BadRequest(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Params:
    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    ignore_eos: bool
    seed: int | None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Params:
        max_tokens = int(body.get("max_tokens") or 16)
        if max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1")
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else float(temperature)
        top_p = body.get("top_p")
        top_p = 1.0 if top_p is None else float(top_p)
        seed = body.get("seed")
        return cls(
            max_tokens=max_tokens,
            do_sample=temperature > 0,
            temperature=temperature,
            top_p=top_p,
            ignore_eos=bool(body.get("ignore_eos", False)),
            seed=int(seed) if seed is not None else None,
        )

    def generate_kwargs(self, longest: int | None = None) -> dict[str, Any]:
        max_new = longest or self.max_tokens
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs |= {"temperature": self.temperature, "top_p": self.top_p}
        if self.ignore_eos:
            kwargs["min_new_tokens"] = max_new
        return kwargs


def prompt_of(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise BadRequest("prompt: one string (or a list of one) is supported")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    if int(body.get("n") or 1) != 1:
        raise BadRequest("n must be 1")
    return prompt


class TokenTextStreamer(TextIteratorStreamer):
    """``TextIteratorStreamer`` flushing after every token, as vLLM streams, instead of at word
    boundaries (the stock heuristic holds each word back until the next one starts, which would
    add a token's time to every chunk and to TTFT). Text is held back only while it ends in an
    incomplete UTF-8 sequence. Also counts the generated tokens."""

    def __init__(self, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.generated = 0

    def put(self, value: torch.Tensor) -> None:
        if len(value.shape) > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.generated += len(value)
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        if text.endswith("\ufffd"):
            return
        printable, self.print_len = text[self.print_len :], len(text)
        self.on_finalized_text(printable)


class Cancelled(StoppingCriteria):
    """Stops generation when the client has gone away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def finish_reason(tokens: int, params: Params) -> str:
    return "length" if tokens >= params.max_tokens else "stop"


class Model:
    def __init__(self, path: Path, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        # What ``.eval()`` does (``train(False)``); transformers leaves ``eval`` unannotated.
        self.model.train(False)
        self.eos_id = self.tokenizer.eos_token_id
        # One thread runs generate; the model never sees two calls at once.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def run_generate(self, params: Params, **kwargs: Any) -> torch.Tensor:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            # The ignore: transformers wraps ``generate`` in ``@torch.no_grad()``, and mypy then
            # rejects its explicit ``self: GenerativePreTrainedModel`` annotation.
            output = self.model.generate(  # type: ignore[misc]
                pad_token_id=self.tokenizer.pad_token_id, **kwargs
            )
        # No ``return_dict_in_generate``: generate returns the token ids as a plain tensor.
        assert isinstance(output, torch.Tensor)
        return output


@dataclass(slots=True, eq=False)
class Completion:
    """One request: its settings, its token counts as they grow, and (batched engine) its text
    pieces as they are produced, then ``None`` at the end."""

    params: Params
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)


class PlainEngine:
    """One request at a time: a lock around ``generate`` + ``TextIteratorStreamer``."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.lock = asyncio.Lock()

    async def complete(self, prompt: str, completion: Completion) -> AsyncGenerator[str, None]:
        """Yields the text as it is generated; counts tokens in ``completion``."""
        params = completion.params
        ids = self.model.encode(prompt)
        completion.prompt_tokens = len(ids)
        loop = asyncio.get_running_loop()
        async with self.lock:
            streamer = TokenTextStreamer(self.model.tokenizer)
            cancel = Cancelled()
            inputs = torch.tensor([ids])
            work = loop.run_in_executor(
                self.model.pool,
                lambda: self.model.run_generate(
                    params,
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([cancel]),
                    **params.generate_kwargs(),
                ),
            )
            try:
                iterator = iter(streamer)
                while (text := await loop.run_in_executor(None, next, iterator, None)) is not None:
                    completion.completion_tokens = streamer.generated
                    yield text
                output = await work
                completion.completion_tokens = output.shape[1] - len(ids)
            finally:
                cancel.event.set()
                with contextlib.suppress(Exception):
                    await work


class BatchStreamer(BaseStreamer):
    """Per-row incremental detokenisation of a batched ``generate``; pushes each row's text to
    its request's queue from the generate thread, and stops once every row is done."""

    def __init__(self, model: Model, rows: list[Completion], loop: asyncio.AbstractEventLoop):
        self.model = model
        self.rows = rows
        self.loop = loop
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.printed = [0] * len(rows)
        self.done = [False] * len(rows)
        self.cancelled = [False] * len(rows)
        self.seen_prompt = False

    def push(self, i: int, text: str | None) -> None:
        self.loop.call_soon_threadsafe(self.rows[i].pieces.put_nowait, text)

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            row = self.rows[i]
            if self.cancelled[i]:
                self.done[i] = True
                self.push(i, None)
                continue
            self.tokens[i].append(token)
            row.completion_tokens = len(self.tokens[i])
            text = self.model.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence of ids decodes to one string
            if not text.endswith("\ufffd"):
                self.push(i, text[self.printed[i] :])
                self.printed[i] = len(text)
            eos = token == self.model.eos_id and not row.params.ignore_eos
            if eos or len(self.tokens[i]) >= row.params.max_tokens:
                self.done[i] = True
                self.push(i, None)

    def end(self) -> None:
        for i, done in enumerate(self.done):
            if not done:
                self.done[i] = True
                self.push(i, None)

    def all_done(self) -> bool:
        return all(d or c for d, c in zip(self.done, self.cancelled, strict=True))


class AllDone(StoppingCriteria):
    def __init__(self, streamer: BatchStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        return torch.full((input_ids.shape[0],), self.streamer.all_done(), dtype=torch.bool)


@dataclass(slots=True, eq=False)
class Waiting:
    ids: list[int]
    completion: Completion
    cancelled: bool = False
    streamer: BatchStreamer | None = None
    row: int = 0


class BatchEngine:
    """Static batching: requests with the same sampling settings that are waiting when the model
    frees up run together; the batch runs until its last row is done."""

    def __init__(self, model: Model, max_batch: int, window_s: float) -> None:
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self.waiting: list[Waiting] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def key(self, params: Params) -> tuple[Any, ...]:
        return (params.do_sample, params.temperature, params.top_p, params.ignore_eos, params.seed)

    async def scheduler(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self.wakeup.clear()
                await self.wakeup.wait()
            if self.window_s:
                await asyncio.sleep(self.window_s)
            key = self.key(self.waiting[0].completion.params)
            batch = [w for w in self.waiting if self.key(w.completion.params) == key]
            batch = [w for w in batch if not w.cancelled][: self.max_batch]
            taken = {id(w) for w in batch}
            self.waiting = [w for w in self.waiting if id(w) not in taken and not w.cancelled]
            if batch:
                await self.run_batch(batch, loop)

    async def run_batch(self, batch: list[Waiting], loop: asyncio.AbstractEventLoop) -> None:
        longest = max(len(w.ids) for w in batch)
        pad = self.model.tokenizer.pad_token_id
        inputs = torch.tensor([[pad] * (longest - len(w.ids)) + w.ids for w in batch])
        mask = torch.tensor([[0] * (longest - len(w.ids)) + [1] * len(w.ids) for w in batch])
        streamer = BatchStreamer(self.model, [w.completion for w in batch], loop)
        for row, w in enumerate(batch):
            w.streamer, w.row = streamer, row
        params = batch[0].completion.params
        max_new = max(w.completion.params.max_tokens for w in batch)
        try:
            await loop.run_in_executor(
                self.model.pool,
                lambda: self.model.run_generate(
                    params,
                    input_ids=inputs,
                    attention_mask=mask,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([AllDone(streamer)]),
                    **params.generate_kwargs(max_new),
                ),
            )
        except Exception:
            log.exception("batched generate failed")
            streamer.end()

    async def complete(self, prompt: str, completion: Completion) -> AsyncGenerator[str, None]:
        if self.task is None:
            self.task = asyncio.create_task(self.scheduler())
        ids = self.model.encode(prompt)
        completion.prompt_tokens = len(ids)
        waiting = Waiting(ids, completion)
        self.waiting.append(waiting)
        self.wakeup.set()
        try:
            while (text := await completion.pieces.get()) is not None:
                yield text
        finally:
            waiting.cancelled = True
            if waiting.streamer is not None:
                waiting.streamer.cancelled[waiting.row] = True


Engine = PlainEngine | BatchEngine


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app["engine"]
    name: str = request.app["model_name"]
    try:
        body = orjson.loads(await request.read())
        prompt = prompt_of(body)
        params = Params.from_body(body)
    except (orjson.JSONDecodeError, BadRequest, TypeError, ValueError) as exc:
        error = {"error": {"message": str(exc), "type": "invalid_request_error"}}
        return web.json_response(error, status=400, dumps=lambda o: orjson.dumps(o).decode())
    completion = Completion(params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": name}

    if not body.get("stream"):
        async with contextlib.aclosing(engine.complete(prompt, completion)) as pieces:
            text = "".join([piece async for piece in pieces])
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason(completion.completion_tokens, params),
        }
        payload = {**base, "choices": [choice], "usage": usage(completion)}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    # aclosing: a client that goes away stops its generation and frees the model at once.
    async with contextlib.aclosing(engine.complete(prompt, completion)) as pieces:
        async for text in pieces:
            if text:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
                await response.write(sse({**base, "choices": [choice]}))
    reason = finish_reason(completion.completion_tokens, params)
    choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
    await response.write(sse({**base, "choices": [choice]}))
    if include_usage:
        await response.write(sse({**base, "choices": [], "usage": usage(completion)}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(request: web.Request) -> web.Response:
    name = request.app["model_name"]
    payload = {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "hf"}]}
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def make_app(model: Model, batch: int, window_s: float) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app["model_name"] = model.name
    app["engine"] = PlainEngine(model) if batch <= 1 else BatchEngine(model, batch, window_s)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face model folder")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--batch", type=int, default=1, help="1: one request at a time; N > 1: static batches"
    )
    parser.add_argument(
        "--batch-window-ms", type=float, default=10.0, help="how long a batch collects requests"
    )
    args = parser.parse_args()
    model = Model(args.model, args.served_model_name or args.model.name, getattr(torch, args.dtype))
    app = make_app(model, args.batch, args.batch_window_ms / 1000)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
