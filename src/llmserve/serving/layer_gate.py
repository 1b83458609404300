"""The gate of one HTTP request that vLLM's OpenAI layer serves (in-process models).

vLLM renders the request and calls ``generate`` (``encode`` for embeddings) once per prompt;
each call comes here (``engines.gated_client``) before anything reaches the engine. The first
engine request to start, or the route itself for a stream, opens the gate once for all of them:
the key's quota is reserved for the exact rendered prompt tokens plus max_tokens x n (an
embeddings request: its prompt tokens alone; 429 when over it), then a queue slot is taken (503
when full, wait and deadline as for every request). Every engine request is bounded by the
request's deadline and aborted on any early exit; ``close`` gives back the slot and the unused
quota and records the request, exactly once, whatever happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from starlette.requests import Request

from llmserve.auth.principal import principal_for
from llmserve.engines.events import ChoiceFinished, TextDelta, UsageReport, finish_reason
from llmserve.engines.gated_client import EngineRequest
from llmserve.errors import EngineTimeout, LLMServeError
from llmserve.limits.limiter import Reservation
from llmserve.quota import QuotaSnapshot
from llmserve.scheduling.admission import Permit
from llmserve.serving.gateway import Gateway
from llmserve.serving.record import RequestRecord
from llmserve.serving.ticket import ticket_for
from llmserve.validation.request import RequestKind, SamplingOptions, ValidatedRequest


class LayerGate:
    def __init__(
        self,
        request: Request,
        gw: Gateway,
        model: str,
        kind: RequestKind,
        request_id: str,
        priority: int,
        abort: Any,
    ) -> None:
        self._request = request
        self._gw = gw
        self._model = model
        self._kind: RequestKind = kind
        self._request_id = request_id
        self._priority = priority
        self._abort = abort
        self._subs: list[tuple[int, Any]] = []
        self._lock = asyncio.Lock()
        self._opened = False
        self._closed = False
        self._timeout_s = gw.settings.limits.request_timeout_s
        self._deadline = asyncio.get_running_loop().time() + self._timeout_s
        self._reservation: Reservation | None = None
        self._permit: Permit | None = None
        self._unfinished = 0
        self.record: RequestRecord | None = None
        # The key's quota after the reservation, for the x-ratelimit-* headers (api.headers).
        self.quota: QuotaSnapshot | None = None
        # The llmserve error that stopped the request, for the route to answer with its own
        # status: vLLM's serving code turns exceptions into its own error responses.
        self.error: LLMServeError | None = None

    @property
    def opened(self) -> bool:
        """Whether the quota and the queue have let the request in."""
        return self._opened

    @property
    def entered(self) -> bool:
        """Whether vLLM has asked for an engine request yet (so the prompt is known)."""
        return bool(self._subs)

    def enter(
        self, request_id: str, prompt_tokens: int, params: Any, start: EngineRequest
    ) -> AsyncGenerator[Any, None]:
        self._subs.append((prompt_tokens, params))
        return self._run(request_id, start)

    async def open(self) -> None:
        """Quota, then a queue slot, for every engine request vLLM asked for; once."""
        async with self._lock:
            if self._opened:
                return
            try:
                await self._open()
            except LLMServeError as exc:
                self.error = exc
                if self.record is not None:
                    self.record.ended(exc)
                raise
            self._opened = True

    async def _open(self) -> None:
        generation = self._generation()
        principal = principal_for(self._request)
        config = self._gw.models.config(self._model)
        ticket = ticket_for(self._request.headers, generation, principal, config, self._timeout_s)
        self._reservation = await self._gw.limiter.reserve(principal, ticket.cost, self._request_id)
        if self._reservation is not None:
            self.quota = self._reservation.quota
        self.record = RequestRecord(generation, principal.name)
        self.record.start_span(self._request.headers)
        self._request.scope.setdefault("state", {})["record"] = self.record
        self._permit = await self._gw.models.admission(self._model).acquire(ticket)
        self.record.admitted(self._permit.waited_s)

    def _generation(self) -> ValidatedRequest:
        """What admission, limits and metrics know of the request: the sum of its prompts."""
        params = self._subs[0][1] if self._subs else None
        n = int(getattr(params, "n", 1) or 1)
        max_tokens = sum(int(getattr(p, "max_tokens", 0) or 0) for _, p in self._subs)
        # Pooling (embeddings) generates nothing: its cost is its prompt tokens alone.
        pooling = self._kind == "embeddings"
        sampling = SamplingOptions(
            max_tokens=0 if pooling else max(max_tokens // max(n, 1), 1),
            temperature=getattr(params, "temperature", None),
            top_p=getattr(params, "top_p", None),
            top_k=getattr(params, "top_k", None),
            seed=getattr(params, "seed", None),
            n=n,
        )
        return ValidatedRequest(
            request_id=self._request_id,
            model=self._model,
            kind=self._kind,
            prompt="",
            prompt_token_ids=None,
            prompt_tokens=sum(tokens for tokens, _ in self._subs),
            sampling=sampling,
            priority=self._priority,
        )

    async def _run(self, request_id: str, start: EngineRequest) -> AsyncGenerator[Any, None]:
        await self.open()
        loop = asyncio.get_running_loop()
        expired = False

        aborting: list[asyncio.Future[Any]] = []

        def expire() -> None:
            nonlocal expired
            expired = True
            aborting.append(asyncio.ensure_future(self._abort(request_id)))

        timer = loop.call_at(self._deadline, expire)
        outputs = start()
        finished = False
        self._unfinished += 1
        try:
            async for output in outputs:
                self._observe(output)
                yield output
            finished = not expired
        except BaseException as exc:
            if isinstance(exc, LLMServeError):
                self.error = exc  # vLLM would answer it as its own error: the route uses ours
            if self.record is not None:
                self.record.ended(exc)
            raise
        finally:
            timer.cancel()
            self._unfinished -= 1
            with anyio.CancelScope(shield=True):
                if not finished and not expired:
                    await self._abort(request_id)
                await outputs.aclose()
        if expired:
            self.error = EngineTimeout(
                f"the request did not finish within {self._timeout_s:g} s", code="request_timeout"
            )
            if self.record is not None:
                self.record.ended(self.error)
            raise self.error

    def _observe(self, output: Any) -> None:
        record = self.record
        if record is None or self._kind == "embeddings":  # a pooling output has no tokens
            return
        for choice in output.outputs:
            if choice.token_ids:
                record.observe(TextDelta(choice.index, "", len(choice.token_ids)))
            if choice.finish_reason is not None:
                record.observe(ChoiceFinished(choice.index, finish_reason(choice.finish_reason)))

    async def close(self, completed: bool) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._permit is not None:
                self._permit.release()
            record = self.record
            used = 0
            if record is not None:
                prompt = record.generation.prompt_tokens
                record.observe(UsageReport(prompt, record.completion_tokens))
                used = prompt + record.completion_tokens
                if completed and self.error is None:
                    record.ended(None)
            await self._gw.limiter.release(self._reservation, used)
            if record is not None:
                record.finish()
