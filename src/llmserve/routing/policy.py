"""A model's routing policy (``routing.policy``) over its balancer: what a request is routed by
(nothing, its session, its prompt prefix, or the blocks of its prompt), the choice, and the
metrics of the choice. ``cache_aware`` also keeps the prefix index up to date with what each
replica was sent."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from llmserve.config import RoutingConfig
from llmserve.observability import metrics as prom
from llmserve.routing.balancer import Balancer
from llmserve.routing.prefix_index import PrefixIndex
from llmserve.validation.request import ValidatedRequest


@dataclass(frozen=True, slots=True)
class Route:
    """What one request is routed by, worked out once for its first pick and any failover."""

    affinity: str | None = None
    blocks: list[int] | None = None


class RoutePolicy:
    def __init__(self, model: str, routing: RoutingConfig, balancer: Balancer) -> None:
        self._model = model
        self._routing = routing
        self._balancer = balancer
        self._index: PrefixIndex | None = None
        if routing.policy == "cache_aware":
            self._index = PrefixIndex(
                len(balancer.replicas),
                routing.block_chars,
                routing.index_blocks,
                routing.max_prompt_blocks,
            )
        self._decisions = {
            reason: prom.ROUTING_DECISIONS.labels(model, reason)
            for reason in ("affinity", "load_bound", "fallback")
        }

    def route(self, request: ValidatedRequest) -> Route:
        policy = self._routing.policy
        if policy == "session":
            return Route(affinity=request.session)
        if policy == "prefix":
            return Route(affinity=prompt_text(request)[: self._routing.prefix_chars])
        if self._index is not None:
            return Route(blocks=self._index.blocks(prompt_text(request)))
        return Route()

    def choose(self, route: Route, exclude: Collection[int] = ()) -> int | None:
        """The replica for this attempt (None: none left); a cache_aware pick also records
        that the replica now holds the prompt's blocks."""
        if self._routing.policy == "least_outstanding":
            return self._balancer.pick(exclude=exclude)
        if self._index is None or route.blocks is None:
            index, reason = self._balancer.pick_bounded(route.affinity, exclude)
        else:
            matches = self._index.matches(route.blocks)
            index, reason = self._balancer.pick_cached(matches, exclude)
            if index is not None:
                self._sent(index, route.blocks, matches[index])
        if index is not None:
            self._decisions[reason].inc()
        return index

    def forget(self, index: int) -> None:
        """The replica left (its cache will not survive a restart): assume nothing of it."""
        if self._index is not None:
            self._index.forget(index)

    def _sent(self, index: int, blocks: list[int], held: int) -> None:
        assert self._index is not None
        label = self._balancer.replicas[index].label
        if held:
            prom.PREFIX_BLOCKS.labels(self._model, label, "hit").inc(held)
        if len(blocks) > held:
            prom.PREFIX_BLOCKS.labels(self._model, label, "miss").inc(len(blocks) - held)
        self._index.insert(index, blocks)


def prompt_text(request: ValidatedRequest) -> str:
    """The prompt as routing sees it: a chat's messages in order (role, then content), which
    grows by appending as a conversation goes on, as its rendered prompt does."""
    if request.messages is not None:
        return "\x00".join(f"{m.role}\x01{m.content}" for m in request.messages)
    return request.prompt
