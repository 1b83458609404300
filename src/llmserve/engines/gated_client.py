"""vLLM's serving objects talk to the engine through an ``EngineClient``; llmserve hands them
this one, which is the AsyncLLM in every respect but ``generate``. A request that llmserve's
routes sent gets its engine requests passed through that request's gate (quota, queue,
deadline, abort, metrics: ``serving.layer_gate``), so vLLM renders, parses and formats while
llmserve decides who runs and when."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from llmserve.errors import EngineUnavailable

EngineRequest = Callable[[], AsyncGenerator[Any, None]]


class Gate(Protocol):
    def enter(
        self, request_id: str, prompt_tokens: int, params: Any, start: EngineRequest
    ) -> AsyncGenerator[Any, None]:
        """The engine request's outputs, once the gate let it in."""


# Set by the route for the duration of one HTTP request (the serving objects call generate
# from the route's own task, or tasks it starts, which copy the context).
CURRENT_GATE: contextvars.ContextVar[Gate | None] = contextvars.ContextVar(
    "llmserve_gate", default=None
)


class GatedEngineClient:
    """The AsyncLLM with llmserve's gate in front of ``generate`` and ``encode`` (pooling:
    embeddings)."""

    def __init__(self, llm: Any, priority_policy: bool, on_dead: Callable[[], None]) -> None:
        self._llm = llm
        self._priority_policy = priority_policy
        self._on_dead = on_dead

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        return self._gated(self._llm.generate, prompt, sampling_params, request_id, kwargs)

    def encode(
        self, prompt: Any, pooling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        return self._gated(self._llm.encode, prompt, pooling_params, request_id, kwargs)

    def _gated(
        self, run: Any, prompt: Any, params: Any, request_id: str, kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        if not self._priority_policy:
            # llmserve's queue honours the priority; vLLM refuses one unless configured for it.
            kwargs.pop("priority", None)

        def start() -> AsyncGenerator[Any, None]:
            return self._outputs(run, prompt, params, request_id, kwargs)

        gate = CURRENT_GATE.get()
        if gate is None:  # not one of llmserve's requests (vLLM's own warm-up, say)
            return start()
        return gate.enter(request_id, _prompt_tokens(prompt), params, start)

    async def _outputs(
        self, run: Any, prompt: Any, params: Any, request_id: str, kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for output in run(prompt, params, request_id, **kwargs):
                yield output
        except EngineDeadError as exc:
            # The engine core died (killed, OOM, a GPU fault): replaced in the background.
            self._on_dead()
            raise EngineUnavailable(
                "the inference engine stopped and is restarting; retry shortly",
                code="engine_restarting",
                retry_after_s=10,
            ) from exc


def _prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, dict):
        ids = prompt.get("prompt_token_ids")
        if ids is None and isinstance(prompt.get("decoder_prompt"), dict):
            ids = prompt["decoder_prompt"].get("prompt_token_ids")
        return len(ids or ())
    return len(getattr(prompt, "prompt_token_ids", None) or ())
