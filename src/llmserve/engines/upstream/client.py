"""An OpenAI-compatible upstream engine (``vllm serve`` first of all; TGI, SGLang, llama.cpp too).

aiohttp, not httpx: httpx's pool is known to collapse under hundreds of concurrent streams. Closing
an upstream stream is how a request is aborted: vLLM's server aborts on client disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from llmserve.config import ManagedModel, UpstreamModel
from llmserve.engines.events import EngineEvent
from llmserve.engines.upstream.answers import (
    RESPONSES_TERMINAL,
    embeddings_event,
    responses_frame,
    responses_usage,
)
from llmserve.engines.upstream.body import forwarded_body
from llmserve.engines.upstream.chunks import chunk_events
from llmserve.engines.upstream.codec import EstimatingCodec
from llmserve.engines.upstream.failures import interrupt, no_token, unreachable, upstream_error
from llmserve.engines.upstream.silence import Silence
from llmserve.errors import (
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    LLMServeError,
)
from llmserve.validation.request import ValidatedRequest

log = logging.getLogger(__name__)

# After [DONE], how long the end of the body may take before the connection is just closed.
_AFTER_DONE_S = 1.0


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
        self._metrics_session: aiohttp.ClientSession | None = None
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

    def generate(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        if request.kind == "embeddings":
            return self._embeddings(request)
        if request.kind == "responses":
            return self._responses(request)
        return self._chunks(request)

    async def _chunks(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        """Chat and completions: the upstream's SSE chunks, read as engine events."""
        chat = request.messages is not None
        path = "v1/chat/completions" if chat else "v1/completions"
        # One deadline for the first token, whatever arrives before it (headers, keep-alives).
        first_token_by = asyncio.get_running_loop().time() + self._config.first_token_timeout_s
        response = await self._connect(path, request, first_token_by)
        self._open[request.request_id] = response
        loop = asyncio.get_running_loop()
        silence = Silence(loop, first_token_by, response)
        between = self._config.between_tokens_timeout_s
        done = False  # [DONE] seen: the stream is complete, whatever follows
        started = False  # an event was yielded: later failures are "between tokens"
        try:
            if response.status != 200:
                raise await upstream_error(response, self._secret)
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
            failure = _broken(exc, silence.expired, started)
            if failure is exc:
                raise
            raise failure from exc
        finally:
            silence.cancel()
            self._open.pop(request.request_id, None)
            if done and response.content.is_eof():
                response.release()  # kept alive for the next request
            else:
                response.close()

    async def _connect(
        self, path: str, request: ValidatedRequest, deadline: float
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
            raise unreachable(exc) from exc
        except TimeoutError as exc:
            raise no_token(started=False) from exc

    async def _embeddings(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        """A whole (unstreamed) embeddings answer, as one usage event carrying its body. The
        first-token timeout bounds the whole answer: it is the first and only event."""
        deadline = asyncio.get_running_loop().time() + self._config.first_token_timeout_s
        response = await self._connect("v1/embeddings", request, deadline)
        self._open[request.request_id] = response
        read = False
        try:
            if response.status != 200:
                raise await upstream_error(response, self._secret)
            async with asyncio.timeout_at(deadline):
                raw = await response.read()
            read = True
        except TimeoutError as exc:
            raise no_token(started=False) from exc
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

    async def _responses(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        """The Responses API's stream, event for event (``RawFrame``), always asked for as a
        stream so the first-token and between-token timeouts, failover and abort hold; its
        terminal event's response object is also the whole answer (the usage report's
        fields), for a client that did not ask for a stream."""
        loop = asyncio.get_running_loop()
        first_token_by = loop.time() + self._config.first_token_timeout_s
        response = await self._connect("v1/responses", request, first_token_by)
        self._open[request.request_id] = response
        silence = Silence(loop, first_token_by, response)
        between = self._config.between_tokens_timeout_s
        started = finished = False
        try:
            if response.status != 200:
                raise await upstream_error(response, self._secret)
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
                raise no_token(started) from exc
            raise EngineFailure(
                f"the upstream stream broke ({type(exc).__name__})", code="upstream_broken_stream"
            ) from exc
        finally:
            silence.cancel()
            self._open.pop(request.request_id, None)
            response.close()

    async def _post(self, path: str, request: ValidatedRequest) -> aiohttp.ClientResponse:
        body, headers = forwarded_body(request, self._model), dict(request.trace_headers)
        try:
            return await self._client().post(path, json=body, headers=headers)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # no connection could be made: the upstream is down
            # A pooled keep-alive connection the upstream had just closed: nothing reached it,
            # so the request is sent again, once, on a new connection.
            log.debug("upstream %s closed a pooled connection; sending again", self._url)
            return await self._client().post(path, json=body, headers=headers)

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
                        raise await upstream_error(response, self._secret)
                    return await response.read()
        except aiohttp.ClientError as exc:
            raise unreachable(exc) from exc
        except TimeoutError as exc:
            raise no_token(started=False) from exc

    async def fetch_metrics(self) -> str:
        """The server's Prometheus text (``GET /metrics``), for its engine's own load."""
        if self._metrics_session is None:
            # A connection of its own: a poll never takes one of the generation pool's, nor
            # meets a connection the upstream is closing under a request.
            self._metrics_session = aiohttp.ClientSession(
                base_url=self._url + "/",
                headers=self._client().headers,
                connector=aiohttp.TCPConnector(
                    limit=1, keepalive_timeout=self._config.keepalive_timeout_s
                ),
                timeout=aiohttp.ClientTimeout(total=self._config.health.timeout_s),
            )
        try:
            async with self._metrics_session.get("metrics") as response:
                if response.status != 200:
                    raise EngineFailure(
                        f"/metrics answered {response.status}", code="upstream_http_error"
                    )
                return await response.text()
        except aiohttp.ClientError as exc:
            raise unreachable(exc) from exc
        except TimeoutError as exc:
            raise no_token(started=False) from exc

    async def abort(self, request_id: str) -> None:
        response = self._open.pop(request_id, None)
        if response is not None:
            interrupt(response, aiohttp.ClientConnectionError("aborted"))

    async def check_health(self) -> bool:
        try:
            async with self._client().get("health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, LLMServeError):
            return False

    async def close(self) -> None:
        if self._metrics_session is not None:
            await self._metrics_session.close()
            self._metrics_session = None
        if self._session is not None:
            await self._session.close()
            self._session = None


def _broken(exc: BaseException, expired: bool, started: bool) -> LLMServeError:
    """What a stream that ended early is called: a timeout if the timer cut it, else broken."""
    if expired or isinstance(exc, TimeoutError):
        return no_token(started)
    if isinstance(exc, aiohttp.ClientError):
        return EngineFailure(
            f"the upstream stream broke ({type(exc).__name__})", code="upstream_broken_stream"
        )
    assert isinstance(exc, LLMServeError)
    return exc
