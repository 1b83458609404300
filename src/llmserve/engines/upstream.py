"""An OpenAI-compatible upstream engine (``vllm serve`` first of all; TGI, SGLang, llama.cpp too).

aiohttp, not httpx: httpx's pool is known to collapse under hundreds of concurrent streams. Closing
an upstream stream is how a request is aborted: vLLM's server aborts on client disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from llmserve.config import ManagedModel, UpstreamModel
from llmserve.engines.events import EngineEvent
from llmserve.engines.upstream_events import (
    RESPONSES_TERMINAL,
    chunk_events,
    embeddings_event,
    redact,
    responses_frame,
    responses_usage,
)
from llmserve.errors import (
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    LLMServeError,
)
from llmserve.validation.request import ChatMessage, GenerationRequest

log = logging.getLogger(__name__)

# Without the upstream's tokenizer we estimate: about four bytes of UTF-8 per token for English.
_BYTES_PER_TOKEN = 4
# After [DONE], how long the end of the body may take before the connection is just closed.
_AFTER_DONE_S = 1.0
# Fields of the client's body that are llmserve's, not the upstream's: the queue honours the
# priority (vLLM refuses one unless started with priority scheduling); the stream is llmserve's.
_NOT_FORWARDED = ("priority", "stream", "stream_options")


class EstimatingCodec:
    """Token counts estimated from bytes; the upstream applies its own template and limits."""

    @property
    def max_model_len(self) -> int | None:
        # An estimate must not reject a prompt the upstream would take: let the upstream decide.
        return None

    @property
    def exact(self) -> bool:
        return False

    def render_chat(self, messages: tuple[ChatMessage, ...]) -> str:
        return "\n".join(f"{m.role}: {m.content}" for m in messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * math.ceil(len(text.encode()) / _BYTES_PER_TOKEN)


class UpstreamEngine:
    """One OpenAI-compatible server: one replica of a model (``ReplicatedEngine`` routes among
    them). Every failure carries a ``code`` saying what went wrong, for failover and metrics."""

    def __init__(
        self, config: UpstreamModel | ManagedModel, url: str, api_key: SecretStr | None = None
    ) -> None:
        self._config = config
        self._url = url
        self._api_key = api_key
        self._codec = EstimatingCodec()
        self._session: aiohttp.ClientSession | None = None
        self._open: dict[str, aiohttp.ClientResponse] = {}
        self._model = config.upstream_model or config.name
        # Upstream error messages reach clients; an upstream may quote the key it was sent.
        self._secret = api_key.get_secret_value() if api_key is not None else None

    @property
    def url(self) -> str:
        return self._url

    @property
    def codec(self) -> EstimatingCodec:
        return self._codec

    async def start(self) -> None:
        headers = {}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        self._session = aiohttp.ClientSession(
            base_url=self._url + "/",
            headers=headers,
            # Idle connections are dropped before the upstream drops them (uvicorn, under
            # vllm serve, closes them after 5 s), so a request rarely meets a closed one.
            connector=aiohttp.TCPConnector(
                limit=self._config.max_connections,
                keepalive_timeout=self._config.keepalive_timeout_s,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self._config.connect_timeout_s,
                sock_read=None,  # first-token and between-token timeouts are applied per read
            ),
            read_bufsize=1 << 20,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise EngineUnavailable("the upstream engine is not started")
        return self._session

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        if request.kind == "embeddings":
            async for event in self._embeddings(request):
                yield event
            return
        if request.kind == "responses":
            async for event in self._responses(request):
                yield event
            return
        chat = request.messages is not None
        path = "v1/chat/completions" if chat else "v1/completions"
        # One deadline for the first token, whatever arrives before it (headers, keep-alives).
        first_token_by = asyncio.get_running_loop().time() + self._config.first_token_timeout_s
        response = await self._connect(path, request, first_token_by)
        self._open[request.request_id] = response
        loop = asyncio.get_running_loop()
        silence = _Silence(loop, first_token_by, response)
        between = self._config.between_tokens_timeout_s
        done = False  # [DONE] seen: the stream is complete, whatever follows
        started = False  # an event was yielded: later failures are "between tokens"
        try:
            if response.status != 200:
                raise await _upstream_error(response, self._secret)
            # One flat loop over whatever bytes arrived (usually one whole event): this is the
            # per-token hot path of upstream streams.
            buffered = b""
            async for data in response.content.iter_any():
                if done:
                    continue  # nothing is expected after [DONE] but the end of the body
                lines = (buffered + data).split(b"\n")
                buffered = lines.pop()  # an incomplete last line waits for more bytes
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments (keep-alives), event names
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        # Read on to the end of the body (it follows at once), so the
                        # connection goes back to the pool instead of being closed: a new
                        # connection per request costs the gateway more than the request.
                        done = True
                        silence.end_soon(loop.time() + _AFTER_DONE_S)
                        break
                    try:
                        chunk = orjson.loads(payload)
                    except orjson.JSONDecodeError as exc:
                        raise EngineFailure(
                            "the upstream engine sent a malformed event", code="upstream_malformed"
                        ) from exc
                    for event in chunk_events(chunk, chat, request.sampling.n, self._secret):
                        # Comments and blank lines do not move the deadline: an upstream that
                        # only sends keep-alives still times out.
                        silence.move(loop.time() + between)
                        started = True
                        yield event
            if not done:
                raise EngineFailure(
                    "the upstream stream ended without [DONE]", code="upstream_broken_stream"
                )
        except (aiohttp.ClientError, EngineFailure, TimeoutError) as exc:
            if done:
                return  # complete; the body's end did not follow in time: just close
            if silence.expired or isinstance(exc, TimeoutError):
                raise _no_token(started) from exc
            if isinstance(exc, aiohttp.ClientError):
                raise EngineFailure(
                    f"the upstream stream broke ({type(exc).__name__})",
                    code="upstream_broken_stream",
                ) from exc
            raise
        finally:
            silence.cancel()
            self._open.pop(request.request_id, None)
            if done and response.content.is_eof():
                response.release()  # kept alive for the next request
            else:
                response.close()

    async def _connect(
        self, path: str, request: GenerationRequest, deadline: float
    ) -> aiohttp.ClientResponse:
        """The upstream's response head, with every way of not getting one named by its code."""
        try:
            async with asyncio.timeout_at(deadline):
                return await self._post(path, request)
        except aiohttp.ServerTimeoutError as exc:  # a connect timeout (also a TimeoutError)
            raise EngineTimeout(
                "the upstream engine did not accept the connection in time",
                code="upstream_connect_timeout",
            ) from exc
        except aiohttp.ClientError as exc:
            raise _unreachable(exc) from exc
        except TimeoutError as exc:
            raise _no_token(started=False) from exc

    async def _embeddings(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        """A whole (unstreamed) embeddings answer, as one usage event carrying its body. The
        first-token timeout bounds the whole answer: it is the first and only event."""
        deadline = asyncio.get_running_loop().time() + self._config.first_token_timeout_s
        response = await self._connect("v1/embeddings", request, deadline)
        self._open[request.request_id] = response
        read = False
        try:
            if response.status != 200:
                raise await _upstream_error(response, self._secret)
            async with asyncio.timeout_at(deadline):
                raw = await response.read()
            read = True
        except TimeoutError as exc:
            raise _no_token(started=False) from exc
        except aiohttp.ClientError as exc:
            raise EngineFailure(
                f"the upstream answer broke ({type(exc).__name__})", code="upstream_broken_stream"
            ) from exc
        finally:
            self._open.pop(request.request_id, None)
            if read:
                response.release()  # kept alive for the next request
            else:
                response.close()
        yield embeddings_event(raw)

    async def _responses(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        """The Responses API's stream, event for event (``RawFrame``), always asked for as a
        stream so the first-token and between-token timeouts, failover and abort hold; its
        terminal event's response object is also the whole answer (the usage report's
        fields), for a client that did not ask for a stream."""
        loop = asyncio.get_running_loop()
        first_token_by = loop.time() + self._config.first_token_timeout_s
        response = await self._connect("v1/responses", request, first_token_by)
        self._open[request.request_id] = response
        silence = _Silence(loop, first_token_by, response)
        between = self._config.between_tokens_timeout_s
        started = finished = False
        try:
            if response.status != 200:
                raise await _upstream_error(response, self._secret)
            name = None
            async for line in response.content:
                line = line.rstrip(b"\r\n")
                if line.startswith(b"event:"):
                    name = line[6:].strip().decode()
                    continue
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments (keep-alives)
                frame = responses_frame(name, line[5:].strip(), self._secret)
                silence.move(loop.time() + between)
                started = True
                yield frame
                if frame.type in RESPONSES_TERMINAL:
                    finished = True
                    yield responses_usage(frame)
                    break
            if not finished:
                raise EngineFailure(
                    "the upstream stream ended before the response did",
                    code="upstream_broken_stream",
                )
        # ValueError: a line longer than the read buffer.
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if silence.expired or isinstance(exc, TimeoutError):
                raise _no_token(started) from exc
            raise EngineFailure(
                f"the upstream stream broke ({type(exc).__name__})", code="upstream_broken_stream"
            ) from exc
        finally:
            silence.cancel()
            self._open.pop(request.request_id, None)
            response.close()

    async def _post(self, path: str, request: GenerationRequest) -> aiohttp.ClientResponse:
        body, headers = self._body(request), dict(request.trace_headers)
        try:
            return await self._client().post(path, json=body, headers=headers)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # no connection could be made: the upstream is down
            # A pooled keep-alive connection the upstream had just closed: nothing reached it,
            # so the request is sent again, once, on a new connection.
            log.debug("upstream %s closed a pooled connection; sending again", self._url)
            return await self._client().post(path, json=body, headers=headers)

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        if request.kind in ("embeddings", "responses"):
            assert request.body is not None
            sent = {k: v for k, v in request.body.items() if k != "priority"}
            sent["model"] = self._model
            if request.kind == "responses":
                sent["stream"] = True  # read as a stream, whatever the client asked for
            return sent
        if request.body is not None:
            # The client's own request, every field as sent: the upstream gives each one its
            # meaning (tools, response_format, min_tokens, content parts, chat_template_kwargs,
            # ...). Only the model name and the streaming llmserve reads are set here.
            sent = {k: v for k, v in request.body.items() if k not in _NOT_FORWARDED}
            sent["model"] = self._model
            sent["stream"] = True
            sent["stream_options"] = {"include_usage": True}
            return sent
        s = request.sampling
        body: dict[str, Any] = {
            "model": self._model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": s.n,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
        }
        if s.ignore_eos:
            body["ignore_eos"] = True
        optional = {
            # Only what the client asked for: the upstream knows its context, we only estimate.
            "max_tokens": s.requested_max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "seed": s.seed,
            "stop": list(s.stop) or None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if request.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            if s.logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = s.logprobs
        else:
            body["prompt"] = request.prompt
            if s.logprobs is not None:
                body["logprobs"] = s.logprobs
        return body

    async def post_json(self, path: str, body: dict[str, Any]) -> bytes:
        """One whole JSON call that is no generation (``tokenize``, ``detokenize``): the
        client's body with the upstream's model name, the upstream's answer as it came. The
        first-token timeout bounds it; failures carry the codes failover reads."""
        sent = {**body, "model": self._model} if "model" in body else dict(body)
        deadline = asyncio.get_running_loop().time() + self._config.first_token_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                async with self._client().post(path, json=sent) as response:
                    if response.status == 404:  # not a server that has it: not its failure
                        raise InvalidRequest(
                            f"the upstream engine does not serve /{path}",
                            param="model",
                            code="unsupported_model",
                        )
                    if response.status != 200:
                        raise await _upstream_error(response, self._secret)
                    return await response.read()
        except aiohttp.ClientError as exc:
            raise _unreachable(exc) from exc
        except TimeoutError as exc:
            raise _no_token(started=False) from exc

    async def abort(self, request_id: str) -> None:
        response = self._open.pop(request_id, None)
        if response is not None:
            _interrupt(response, aiohttp.ClientConnectionError("aborted"))

    async def check_health(self) -> bool:
        try:
            async with self._client().get("health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, LLMServeError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Silence:
    """Closes the upstream response when no token arrives before ``deadline``. Each token moves
    the deadline with one float store; the timer re-arms itself lazily when it fires early, so a
    stream costs one timer, not one per token."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deadline: float, response: aiohttp.ClientResponse
    ) -> None:
        self.deadline = deadline
        self.expired = False
        self._loop = loop
        self._response = response
        self._armed_at = deadline
        self._handle = loop.call_at(deadline, self._check)

    def move(self, deadline: float) -> None:
        self.deadline = deadline
        if deadline < self._armed_at:  # earlier than the timer: re-arm (the first token, once)
            self._handle.cancel()
            self._armed_at = deadline
            self._handle = self._loop.call_at(deadline, self._check)

    def end_soon(self, deadline: float) -> None:
        """A hard deadline, earlier or later than the current one."""
        self._handle.cancel()
        self.deadline = self._armed_at = deadline
        self._handle = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        if self._loop.time() < self.deadline:
            self._armed_at = self.deadline
            self._handle = self._loop.call_at(self.deadline, self._check)
            return
        self.expired = True
        _interrupt(self._response, TimeoutError())

    def cancel(self) -> None:
        self._handle.cancel()


def _unreachable(exc: aiohttp.ClientError) -> EngineUnavailable:
    return EngineUnavailable(
        f"the upstream engine is unreachable ({type(exc).__name__})", code="upstream_unreachable"
    )


def _no_token(started: bool) -> EngineTimeout:
    if started:
        return EngineTimeout(
            "the upstream engine stopped sending tokens", code="between_tokens_timeout"
        )
    return EngineTimeout("the upstream engine sent no token in time", code="first_token_timeout")


def _interrupt(response: aiohttp.ClientResponse, exc: BaseException) -> None:
    """Close the upstream stream and wake a reader blocked on it (closing alone does not)."""
    response.content.set_exception(exc)
    response.close()


def _retry_after(value: str | None) -> int:
    """The upstream's Retry-After in whole seconds (1 when absent or an HTTP date)."""
    try:
        return max(1, math.ceil(float(value or "1")))
    except ValueError:
        return 1


async def _upstream_error(response: aiohttp.ClientResponse, secret: str | None) -> LLMServeError:
    param = code = None
    try:
        error = (await response.json(content_type=None, loads=orjson.loads))["error"]
        message = redact(str(error["message"]), secret)
        param, code = error.get("param"), error.get("code")
    except Exception:
        message = f"status {response.status}"
    if response.status in (400, 422):
        return InvalidRequest(
            f"the upstream engine rejected the request: {message}",
            param=param if isinstance(param, str) else None,
            code=code if isinstance(code, str) else None,
        )
    if response.status in (404,):
        return EngineFailure(
            f"the upstream engine does not serve this model: {message}", code="upstream_http_error"
        )
    if response.status in (429, 503):
        return EngineUnavailable(
            f"the upstream engine is overloaded: {message}",
            code="upstream_overloaded",
            retry_after_s=_retry_after(response.headers.get("Retry-After")),
        )
    return EngineFailure(f"the upstream engine failed: {message}", code="upstream_http_error")
