"""The simulated engine of one replica: a bounded running batch with a FIFO waiting queue, one
prefill at a time, decode steps whose length grows with the batch, and the prefix cache. Pure
state and a discrete-event timeline: every method takes the time, nothing sleeps, so tests drive
it synchronously and the replica's asyncio loop drives it with the wall clock.

- Admission (FIFO, as vLLM's scheduler): the head of the queue is admitted while the batch has
  fewer than ``max_num_seqs`` requests and the KV blocks of its prompt and whole answer fit (a
  request reserves them all up front, so there are no preemptions).
- Prefill: admitted requests are prefilled one at a time, beside the decode steps (as chunked
  prefill keeps decoding going); a prefill lasts ``prefill_base_ms`` + the prompt's uncached
  tokens x ``prefill_ms_per_token`` and yields the first token. TTFT is the wait plus that.
- Decode: each decoding request gets one token per step; a step lasts ``decode_base_ms`` +
  ``decode_ms_per_seq`` x the batch, so each stream slows as the batch grows. Every answer is
  ``max_tokens`` long (ignore_eos).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from benchmarks.fleet.blocks import block_hashes, generated_token, prompt_seed
from benchmarks.fleet.prefix_cache import PrefixCache


@dataclass(frozen=True, slots=True)
class SimConfig:
    block_size: int = 16
    capacity_blocks: int = 4096
    max_num_seqs: int = 32
    prefill_base_ms: float = 10.0
    prefill_ms_per_token: float = 0.1
    decode_base_ms: float = 15.0
    decode_ms_per_seq: float = 0.5

    def prefill_s(self, uncached_tokens: int) -> float:
        return (self.prefill_base_ms + uncached_tokens * self.prefill_ms_per_token) / 1000

    def step_s(self, batch: int) -> float:
        return (self.decode_base_ms + batch * self.decode_ms_per_seq) / 1000


@dataclass(slots=True, eq=False)
class SimRequest:
    id: int
    tokens: list[str]  # the prompt's
    max_tokens: int
    arrived_s: float = 0.0
    hashes: list[bytes] = field(default_factory=list)  # the prompt's full blocks
    cached_blocks: int = 0  # prompt blocks found in the cache at admission
    cached_tokens: int = 0
    reserved: int = 0  # KV blocks reserved at admission
    generated: int = 0
    first_token_s: float | None = None
    finished_s: float | None = None
    seed: int = field(init=False)

    def __post_init__(self) -> None:
        self.seed = prompt_seed(self.tokens)

    def output_tokens(self, start: int = 0, end: int | None = None) -> list[str]:
        """The tokens generated so far (or those from ``start`` to ``end``)."""
        stop = self.generated if end is None else end
        return [generated_token(self.seed, i) for i in range(start, stop)]


@dataclass(frozen=True, slots=True)
class Emission:
    """Tokens a request produced at ``at_s``: its running total, and whether it is done."""

    request: SimRequest
    at_s: float
    generated: int
    finished: bool


@dataclass(slots=True)
class Counters:
    prefix_queries: int = 0  # prompt tokens looked up in the cache (vLLM's counter)
    prefix_hits: int = 0  # of those, the tokens found
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: int = 0


class SimEngine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.cache = PrefixCache(config.capacity_blocks)
        self.counters = Counters()
        self.waiting: deque[SimRequest] = deque()
        self.prefill_queue: deque[SimRequest] = deque()
        self.decoding: list[SimRequest] = []
        self._prefilling: SimRequest | None = None
        self._prefill_end = 0.0
        self._step: list[SimRequest] = []  # the batch of the step in progress
        self._step_end = 0.0

    @property
    def running(self) -> int:
        return len(self.prefill_queue) + (self._prefilling is not None) + len(self.decoding)

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        return -(-(prompt_tokens + max_tokens) // self.config.block_size)

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request could ever run: its blocks fit in an empty cache."""
        return self.blocks_needed(prompt_tokens, max_tokens) <= self.config.capacity_blocks

    def submit(self, request: SimRequest, now: float) -> None:
        if not self.fits(len(request.tokens), request.max_tokens):
            raise ValueError("the request needs more KV blocks than the replica has")
        request.arrived_s = now
        self.waiting.append(request)
        self._schedule(now)

    def next_event_s(self) -> float | None:
        """When the next prefill or decode step ends; None when the engine is idle."""
        times = [self._step_end] if self._step else []
        if self._prefilling is not None:
            times.append(self._prefill_end)
        return min(times, default=None)

    def advance(self, now: float) -> list[Emission]:
        """Play every event due by ``now``, each at its own time, in order."""
        out: list[Emission] = []
        while (due := self.next_event_s()) is not None and due <= now:
            if self._prefilling is not None and self._prefill_end == due:
                self._end_prefill(due, out)
            else:
                self._end_step(due, out)
            self._schedule(due)
        return out

    def abort(self, request: SimRequest, now: float) -> None:
        """A client went away: the request leaves the queue or the batch and frees its blocks."""
        if request in self.waiting:
            self.waiting.remove(request)
            return
        if request.finished_s is not None:
            return
        for queue in (self.prefill_queue, self.decoding, self._step):
            if request in queue:
                queue.remove(request)
        if request is self._prefilling:
            self._prefilling = None
        self._release(request, published=request.first_token_s is not None, generated=False)
        request.finished_s = now
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        self._admit()
        if self._prefilling is None and self.prefill_queue:
            request = self.prefill_queue.popleft()
            self._prefilling = request
            uncached = len(request.tokens) - request.cached_tokens
            self._prefill_end = now + self.config.prefill_s(uncached)
        if not self._step and self.decoding:
            self._step = list(self.decoding)
            self._step_end = now + self.config.step_s(len(self._step))

    def _admit(self) -> None:
        size = self.config.block_size
        while self.waiting and self.running < self.config.max_num_seqs:
            request = self.waiting[0]
            if not request.hashes:  # once: a head that waits for blocks is tried every event
                request.hashes = block_hashes(request.tokens, size)
            # The last prompt token is always computed (its logits give the first token), so a
            # prompt of whole blocks can hit all but its last block, as in vLLM.
            lookup = request.hashes[: (len(request.tokens) - 1) // size]
            hit = self.cache.match(lookup)
            reserved = self.blocks_needed(len(request.tokens), request.max_tokens)
            if not self.cache.acquire(request.hashes[:hit], reserved - hit):
                return  # head-of-line: it waits for blocks, and so does everyone behind it
            self.waiting.popleft()
            request.cached_blocks = hit
            request.cached_tokens = hit * size
            request.reserved = reserved
            self.counters.prefix_queries += len(request.tokens)
            self.counters.prefix_hits += hit * size
            self.counters.prompt_tokens += len(request.tokens)
            self.prefill_queue.append(request)

    def _end_prefill(self, now: float, out: list[Emission]) -> None:
        request = self._prefilling
        assert request is not None
        self._prefilling = None
        self.cache.publish(request.hashes[request.cached_blocks :])
        request.first_token_s = now
        self._emit(request, now, out)
        if request.finished_s is None:
            self.decoding.append(request)

    def _end_step(self, now: float, out: list[Emission]) -> None:
        batch, self._step = self._step, []
        for request in batch:
            self._emit(request, now, out)
        self.decoding = [r for r in self.decoding if r.finished_s is None]

    def _emit(self, request: SimRequest, now: float, out: list[Emission]) -> None:
        request.generated += 1
        self.counters.generation_tokens += 1
        done = request.generated >= request.max_tokens
        if done:
            request.finished_s = now
            self.counters.finished += 1
            self._release(request, published=True, generated=True)
        out.append(Emission(request, now, request.generated, done))

    def _release(self, request: SimRequest, *, published: bool, generated: bool) -> None:
        """Unpin a request's blocks; a finished one first caches the blocks it generated."""
        hashes = request.hashes if published else request.hashes[: request.cached_blocks]
        if generated:
            tail = len(hashes) * self.config.block_size
            rest = (request.tokens + request.output_tokens())[tail:]
            parent = hashes[-1] if hashes else b""
            more = block_hashes(rest, self.config.block_size, parent)
            self.cache.publish(more)
            hashes = hashes + more
        self.cache.release(hashes, request.reserved - len(hashes))
