"""One model served by several engines (replicas): routing, failover and health in one place.

A request goes to the replica the balancer picks. If that replica fails *before the first
event*, the request is tried once more on another healthy replica; after the first event it is
never retried (the client has text already, a retry would duplicate it) and the error reaches
the client in band. A failed request counts against its replica (passive health), which is
taken out and probed back in by the active checks (GET /health of each replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llmserve.config import HealthConfig, RoutingConfig
from llmserve.engines.base import Engine
from llmserve.engines.events import EngineEvent
from llmserve.errors import EngineFailure, EngineTimeout, EngineUnavailable, LLMServeError
from llmserve.observability import metrics as prom
from llmserve.observability.collectors import ReplicaGauges
from llmserve.routing.balancer import Balancer
from llmserve.routing.engine_signals import EngineSignals, parse_signals
from llmserve.routing.policy import RoutePolicy
from llmserve.validation.codec import PromptCodec
from llmserve.validation.request import ValidatedRequest

log = logging.getLogger(__name__)

# Failures that say nothing about the request itself: another replica may well succeed.
_RETRYABLE = (EngineUnavailable, EngineFailure, EngineTimeout)
# Error code → the failure kind in llmserve_upstream_failures_total (a bounded set).
_KINDS = {
    "upstream_unreachable": "unreachable",
    "upstream_connect_timeout": "connect_timeout",
    "first_token_timeout": "first_token_timeout",
    "between_tokens_timeout": "between_tokens_timeout",
    "upstream_http_error": "http_error",
    "upstream_broken_stream": "broken_stream",
    "upstream_malformed": "malformed",
    "upstream_error": "upstream_error",
    "upstream_overloaded": "overloaded",
}
# An overloaded replica is busy, not broken: fail over, but do not take it out.
_NOT_EJECTING = frozenset({"upstream_overloaded"})


@dataclass(slots=True)
class _Ejection:
    """One replica's side of passive health, beside the balancer's (pure) state: ejections in a
    row, until when it stays out, and the event that wakes its health-check loop early. A
    replica whose /health passes while its requests fail is kept out longer each time."""

    count: int = 0
    out_until: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@runtime_checkable
class JsonCalls(Protocol):
    """A replica that answers whole JSON calls besides generation (an OpenAI server)."""

    async def post_json(self, path: str, body: dict[str, Any]) -> bytes: ...


@runtime_checkable
class MetricsSource(Protocol):
    """A replica whose server exports Prometheus metrics (``vllm serve``'s own load)."""

    async def fetch_metrics(self) -> str: ...


class ReplicatedEngine:
    """An Engine over replica Engines (upstream servers, managed ``vllm serve`` processes)."""

    def __init__(
        self,
        model: str,
        replicas: Sequence[Engine],
        labels: Sequence[str],
        routing: RoutingConfig,
        health: HealthConfig,
    ) -> None:
        self._model = model
        self._replicas = list(replicas)
        self._routing = routing
        self._health = health
        self._balancer = Balancer(
            list(labels), health.eject_after_failures, routing.load_factor, routing.load_slack
        )
        self._policy = RoutePolicy(model, routing, self._balancer)
        self._running: dict[str, int] = {}  # request id → replica index
        self._aborted: set[str] = set()
        self._watchers: list[asyncio.Task[None]] = []
        self._ejections = [_Ejection() for _ in self._replicas]
        self._signals: list[EngineSignals | None] = [None] * len(self._replicas)

    @property
    def codec(self) -> PromptCodec:
        return self._replicas[0].codec

    @property
    def replicas(self) -> list[Engine]:
        return list(self._replicas)

    def status(self) -> list[ReplicaGauges]:
        return [
            ReplicaGauges(
                r.label,
                r.healthy is True,
                r.outstanding,
                r.load,
                r.engine_requests,
                signals.kv_cache_usage if signals is not None else None,
            )
            for r, signals in zip(self._balancer.replicas, self._signals, strict=True)
        ]

    async def start(self) -> None:
        """Returns once the replicas are set up; each joins when its first check passes, which
        the watcher runs at once (a replica that hangs holds back nothing)."""
        await asyncio.gather(*(replica.start() for replica in self._replicas))
        self._watchers = [
            asyncio.create_task(self._watch(index)) for index in range(len(self._replicas))
        ]
        interval = self._routing.signals_interval_s
        if interval is not None:
            self._watchers += [
                asyncio.create_task(self._read_signals(index, interval))
                for index, replica in enumerate(self._replicas)
                if isinstance(replica, MetricsSource)
            ]

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(replica.close() for replica in self._replicas))

    async def check_health(self) -> bool:
        """Whether any replica is in; the checks themselves run on their own schedule."""
        return self._balancer.any_healthy

    async def abort(self, request_id: str) -> None:
        index = self._running.get(request_id)
        if index is not None:
            self._aborted.add(request_id)
            await self._replicas[index].abort(request_id)

    async def generate(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        route = self._policy.route(request)
        tried: list[int] = []
        # The next replica to try: picked once per attempt, and a failover uses the pick that
        # decided it could fail over.
        picked = self._policy.choose(route)
        try:
            while True:
                if picked is None:
                    raise self._none_left()
                index = picked
                tried.append(index)
                started = False
                events = self._replicas[index].generate(request)
                self._running[request.request_id] = index
                self._balancer.started(index)
                try:
                    async for event in events:
                        started = True
                        yield event
                    self._balancer.succeeded(index)
                    self._ejections[index].count = 0
                    return
                except _RETRYABLE as exc:
                    if request.request_id in self._aborted:
                        raise  # stopped on purpose (deadline): not the replica's fault
                    self._failed(index, exc)
                    if started or len(tried) > 1:
                        raise
                    picked = self._policy.choose(route, exclude=tried)
                    if picked is None:
                        raise
                    prom.FAILOVERS.labels(self._model).inc()
                    log.warning(
                        "model %s: replica %s failed before the first token (%s); retrying on "
                        "another replica",
                        self._model,
                        self._balancer.replicas[index].label,
                        exc.code,
                    )
                finally:
                    self._balancer.ended(index)
                    self._running.pop(request.request_id, None)
                    await events.aclose()
        finally:
            self._aborted.discard(request.request_id)

    async def post_json(self, path: str, body: dict[str, Any]) -> bytes:
        """A whole JSON call to one healthy replica (``tokenize``, ...), tried once more on
        another when the first fails for a reason of its own; no queue, no quota: it costs
        the engine no generation."""
        tried: list[int] = []
        while True:
            index = self._balancer.pick(exclude=tried)
            if index is None:
                raise self._none_left()
            tried.append(index)
            replica = self._replicas[index]
            if not isinstance(replica, JsonCalls):
                raise EngineUnavailable(f"model '{self._model}' has no OpenAI server behind it")
            try:
                return await replica.post_json(path, body)
            except _RETRYABLE as exc:
                self._failed(index, exc)
                if len(tried) > 1:
                    raise

    def _failed(self, index: int, exc: LLMServeError) -> None:
        label = self._balancer.replicas[index].label
        kind = _KINDS.get(exc.code or "", "engine_error")
        prom.UPSTREAM_FAILURES.labels(self._model, label, kind).inc()
        if exc.code in _NOT_EJECTING:
            return
        if not self._balancer.failed(index):
            replica = self._balancer.replicas[index]
            if replica.failures >= self._health.eject_after_failures:
                # Kept in only as the last one in: check it now, so a replica that is really
                # down goes out within a round trip.
                self._ejections[index].wake.set()
            return
        ejection = self._ejections[index]
        ejection.count += 1
        hold = min(
            self._health.probe_interval_s * 2 ** (ejection.count - 1),
            self._health.max_ejection_s,
        )
        ejection.out_until = asyncio.get_running_loop().time() + hold
        ejection.wake.set()
        log.warning(
            "model %s: replica %s taken out after a failed request (%s); probing it again in %g s",
            self._model,
            label,
            kind,
            hold,
        )

    def _none_left(self) -> EngineUnavailable:
        total = len(self._replicas)
        return EngineUnavailable(
            f"no healthy replica of model '{self._model}' ({total - self._balancer.healthy_count}"
            f" of {total} out)",
            code="no_healthy_replica",
            retry_after_s=max(1, math.ceil(self._health.probe_interval_s)),
        )

    async def _watch(self, index: int) -> None:
        """One loop per replica, so a check that hangs delays no other replica's: a healthy
        replica is checked every interval_s, one that is out every probe_interval_s (after its
        ejection time, when a failed request took it out)."""
        loop = asyncio.get_running_loop()
        replica = self._balancer.replicas[index]
        ejection = self._ejections[index]
        while True:
            ejection.wake.clear()  # before reading the state: a later ejection wakes us
            hold = ejection.out_until - loop.time()
            if hold > 0:
                await self._sleep(index, hold)
                continue
            healthy = await self._check(index)
            if healthy != replica.healthy:
                change = "up" if replica.healthy is None else "back in"
                log.log(
                    logging.INFO if healthy else logging.WARNING,
                    "model %s: replica %s is %s",
                    self._model,
                    replica.label,
                    change if healthy else "out (health check failed)",
                )
            if not healthy and replica.healthy is not False:
                self._policy.forget(index)
            self._balancer.checked(index, healthy)
            h = self._health
            await self._sleep(index, h.interval_s if healthy else h.probe_interval_s)

    async def _read_signals(self, index: int, interval_s: float) -> None:
        """The replica engine's own load, every ``interval_s``; when it cannot be read (down,
        not vLLM), balancing falls back to this gateway's counts until it can again."""
        replica = self._replicas[index]
        assert isinstance(replica, MetricsSource)
        while True:
            signals = None
            if self._balancer.replicas[index].healthy is not False:
                try:
                    signals = parse_signals(await replica.fetch_metrics())
                except (OSError, TimeoutError, LLMServeError):
                    signals = None
            self._signals[index] = signals
            self._balancer.signal(index, signals.requests if signals is not None else None)
            await asyncio.sleep(interval_s)

    async def _sleep(self, index: int, seconds: float) -> None:
        """Sleep, or less when a failed request took the replica out meanwhile."""
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for can swallow a cancellation
        # that arrives as the wait ends, and close() would then wait for this loop forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._ejections[index].wake.wait()

    async def _check(self, index: int) -> bool:
        try:
            async with asyncio.timeout(self._health.timeout_s):
                return await self._replicas[index].check_health()
        except (TimeoutError, OSError, LLMServeError):
            return False
