"""The fleet benchmark's simulated replica, checked against its configuration: prefix-cache hits
are what the cache size implies, TTFT is linear in the uncached prompt, decode steps lengthen with
the batch, and the waiting queue bounds the batch. The engine is pure, driven here in virtual time;
one test serves it over a socket."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from benchmarks.fleet.blocks import block_hashes, render_chat, tokenize
from benchmarks.fleet.client import Sample
from benchmarks.fleet.engine import Emission, SimConfig, SimEngine, SimRequest
from benchmarks.fleet.prefix_cache import PrefixCache
from benchmarks.fleet.report import row
from benchmarks.fleet.routers import launcher, parse_name
from benchmarks.fleet.run import sim_config
from benchmarks.fleet.sim_metrics import parse
from benchmarks.fleet.sim_replica import Replica
from benchmarks.fleet.workload import Spec, hot_prompt, multi_turn, no_sharing

BLOCK = 16
CONFIG = SimConfig(
    block_size=BLOCK,
    capacity_blocks=64,
    max_num_seqs=4,
    prefill_base_ms=10,
    prefill_ms_per_token=0.5,
    decode_base_ms=20,
    decode_ms_per_seq=2,
)


def prompt(n: int, tag: str = "p") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


class Sim:
    """An engine in virtual time: requests are submitted at a time, events played to the end."""

    def __init__(self, config: SimConfig = CONFIG) -> None:
        self.engine = SimEngine(config)
        self.emissions: list[Emission] = []
        self.now = 0.0
        self._ids = 0

    def submit(self, tokens: list[str], max_tokens: int = 2, at: float = 0.0) -> SimRequest:
        self.advance(at)
        self._ids += 1
        request = SimRequest(self._ids, tokens, max_tokens)
        self.engine.submit(request, at)
        return request

    def advance(self, until: float) -> None:
        self.emissions += self.engine.advance(until)
        self.now = max(self.now, until)

    def drain(self) -> None:
        while (due := self.engine.next_event_s()) is not None:
            self.advance(due)

    def one(self, tokens: list[str], max_tokens: int = 2, at: float | None = None) -> SimRequest:
        """A request alone on the engine, run to its end."""
        self.drain()
        request = self.submit(tokens, max_tokens, self.now + 1 if at is None else at)
        self.drain()
        return request


def ttft(request: SimRequest) -> float:
    assert request.first_token_s is not None
    return request.first_token_s - request.arrived_s


# The prefix cache alone


def test_a_repeated_prompt_hits_all_but_its_last_partial_block() -> None:
    sim = Sim()
    first = sim.one(prompt(40))
    again = sim.one(prompt(40))
    assert (first.cached_tokens, again.cached_tokens) == (0, 32)
    assert sim.engine.counters.prefix_queries == 80
    assert sim.engine.counters.prefix_hits == 32


def test_a_prompt_of_whole_blocks_recomputes_its_last_block() -> None:
    # Its last token's logits are needed, so the last block is never a hit (as in vLLM).
    sim = Sim()
    sim.one(prompt(48))
    assert sim.one(prompt(48)).cached_tokens == 32


def test_a_shared_prefix_hits_only_up_to_the_first_differing_block() -> None:
    sim = Sim()
    sim.one(prompt(64))
    other = prompt(64)
    other[40] = "x"  # inside block 2 (tokens 32..47): blocks 0 and 1 still match
    assert sim.one(other).cached_tokens == 32


def test_a_block_is_identified_by_everything_before_it() -> None:
    sim = Sim()
    sim.one(prompt(64))
    other = prompt(64)
    other[0] = "x"  # the same tokens from 16 on, but not the same prefix: nothing hits
    assert sim.one(other).cached_tokens == 0


def test_the_generated_answer_is_cached_for_the_next_turn() -> None:
    sim = Sim()
    messages = [{"role": "system", "content": " ".join(prompt(60))}]
    first = sim.one(tokenize(render_chat(messages)), max_tokens=40)
    answer = "".join(f" {t}" for t in first.output_tokens())
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    second = sim.one(tokenize(render_chat(messages)))
    full = len(first.tokens) + 40
    assert second.tokens[:full] == first.tokens + first.output_tokens()
    assert second.cached_tokens == full // BLOCK * BLOCK


def test_a_cache_of_n_blocks_evicts_the_least_recently_used() -> None:
    # 64 blocks: A, B, C of 16 full blocks each (+1 for the answer) fill 51; touching A then
    # adding D (17 more, 68 > 64) evicts from B, the least recently used, and A still hits.
    sim = Sim()
    a, b, c, d = (prompt(256, tag) for tag in "abcd")
    for tokens in (a, b, c):
        sim.one(tokens, max_tokens=1)
    assert sim.one(a, max_tokens=1).cached_tokens == 15 * BLOCK
    sim.one(d, max_tokens=1)
    assert sim.one(a, max_tokens=1).cached_tokens == 15 * BLOCK
    assert sim.one(c, max_tokens=1).cached_tokens == 15 * BLOCK
    assert sim.one(b, max_tokens=1).cached_tokens < 15 * BLOCK


def test_the_cache_holds_what_its_capacity_implies() -> None:
    # Prompts of 8 blocks cycled through a 64-block cache: 7 fit (8 blocks each with the answer's
    # partial block freed), so a cycle of 7 hits every time round and a cycle of 9 never does.
    for count, expect_hits in ((7, True), (9, False)):
        sim = Sim()
        prompts = [prompt(8 * BLOCK, f"{chr(97 + i)}") for i in range(count)]
        for tokens in prompts:
            sim.one(tokens, max_tokens=1)
        second = [sim.one(tokens, max_tokens=1).cached_tokens for tokens in prompts]
        assert all(hit == 7 * BLOCK for hit in second) if expect_hits else not any(second)


def test_blocks_of_running_requests_are_not_evicted() -> None:
    cache = PrefixCache(4)
    chain = block_hashes(prompt(48), BLOCK)
    assert cache.acquire([], 3)
    cache.publish(chain)  # a running request holds 3 hashed blocks
    assert not cache.acquire([], 2)  # only 1 free, none evictable
    cache.release(chain, 0)
    assert cache.acquire([], 2)  # one free block, one evicted: the chain's tail goes first
    assert cache.match(chain) == 2


def test_a_block_computed_twice_is_stored_once() -> None:
    cache = PrefixCache(8)
    chain = block_hashes(prompt(32), BLOCK)
    assert cache.acquire([], 2) and cache.acquire([], 2)
    cache.publish(chain)
    cache.publish(chain)
    assert (cache.used, cache.cached) == (2, 2)
    cache.release(chain, 0)
    cache.release(chain, 0)
    assert (cache.used, cache.cached) == (0, 2)


# Timing


def test_ttft_grows_linearly_with_uncached_tokens() -> None:
    for n in (0, 100, 400, 1000):
        request = Sim().one(prompt(n + 1), max_tokens=1, at=0)
        assert ttft(request) == pytest.approx((10 + 0.5 * (n + 1)) / 1000)


def test_cached_tokens_cost_nothing_to_prefill() -> None:
    sim = Sim()
    sim.one(prompt(400))
    again = sim.one(prompt(410))  # 400 cached (25 blocks), 10 to compute
    assert again.cached_tokens == 400
    assert ttft(again) == pytest.approx((10 + 0.5 * 10) / 1000)


def test_ttft_includes_waiting_for_the_prefills_before() -> None:
    sim = Sim()
    first = sim.submit(prompt(100, "a"), max_tokens=1)
    second = sim.submit(prompt(100, "b"), max_tokens=1)
    sim.drain()
    assert ttft(first) == pytest.approx(0.060)
    assert ttft(second) == pytest.approx(0.120)


def step_times(sim: Sim, request: SimRequest) -> list[float]:
    times = [e.at_s for e in sim.emissions if e.request is request]
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_a_decode_step_lengthens_with_the_batch(batch: int) -> None:
    sim = Sim()
    requests = [sim.submit(prompt(1, f"r{i}"), max_tokens=30) for i in range(batch)]
    sim.drain()
    # Once every request is decoding, each step takes base + per-seq x batch.
    assert step_times(sim, requests[0])[-5:] == pytest.approx([(20 + 2 * batch) / 1000] * 5)


def test_every_answer_is_max_tokens_long() -> None:
    sim = Sim()
    request = sim.one(prompt(10), max_tokens=7)
    assert request.generated == 7
    assert [e.generated for e in sim.emissions] == list(range(1, 8))
    assert sim.emissions[-1].finished


# The batch and the queue


def test_the_waiting_queue_bounds_the_batch() -> None:
    sim = Sim()
    requests = [sim.submit(prompt(10, f"r{i}"), max_tokens=5) for i in range(6)]
    assert (sim.engine.running, len(sim.engine.waiting)) == (4, 2)
    sim.drain()
    first_done = min(r.finished_s for r in requests[:4] if r.finished_s is not None)
    assert all(r.first_token_s is not None for r in requests)
    assert all((r.first_token_s or 0) > first_done for r in requests[4:])


def test_a_request_waits_for_kv_blocks_even_with_room_in_the_batch() -> None:
    sim = Sim()
    big = sim.submit(prompt(40 * BLOCK, "a"), max_tokens=3)
    blocked = sim.submit(prompt(40 * BLOCK, "b"), max_tokens=3)  # 41 + 41 > 64 blocks
    behind = sim.submit(prompt(10, "c"), max_tokens=3)  # fits, but FIFO keeps it behind
    assert (sim.engine.running, len(sim.engine.waiting)) == (1, 2)
    sim.drain()
    assert big.finished_s is not None and blocked.first_token_s is not None
    assert blocked.first_token_s > big.finished_s
    assert behind.first_token_s is not None and behind.first_token_s > big.finished_s


def test_a_prompt_larger_than_the_cache_is_refused() -> None:
    with pytest.raises(ValueError):
        Sim().submit(prompt(64 * BLOCK), max_tokens=1)


def test_an_aborted_request_frees_its_slot_and_blocks() -> None:
    sim = Sim()
    requests = [sim.submit(prompt(100, f"r{i}"), max_tokens=50) for i in range(5)]
    sim.advance(0.2)
    sim.engine.abort(requests[1], 0.2)
    assert requests[4] not in sim.engine.waiting
    sim.drain()
    assert sim.engine.cache.used == 0
    assert requests[1].generated < 50


def test_the_engine_is_deterministic() -> None:
    def run() -> list[tuple[int, float, int]]:
        sim = Sim()
        for i in range(10):
            sim.submit(prompt(50 + 30 * i, "s"), max_tokens=5 + i, at=0.01 * i)
        sim.drain()
        return [(e.request.id, e.at_s, e.generated) for e in sim.emissions]

    assert run() == run()


# Workloads


SMALL = Spec(users=20, system_prompts=2, system_tokens=200)


def test_workloads_are_reproducible_and_within_their_lengths() -> None:
    workload = multi_turn(SMALL)
    assert workload == multi_turn(SMALL)
    assert workload != multi_turn(Spec(users=20, system_prompts=2, system_tokens=200, seed=1))
    assert len({c.system for c in workload.conversations}) == 2
    starts = [c.start_s for c in workload.conversations]
    assert starts == sorted(starts)
    for turn in (t for c in workload.conversations for t in c.turns):
        assert 50 <= len(tokenize(turn.user)) <= 300
        assert 100 <= turn.max_tokens <= 300


def test_the_control_shares_nothing_and_keeps_the_lengths() -> None:
    shared, control = multi_turn(SMALL), no_sharing(SMALL)
    assert [len(c.turns) for c in shared.conversations] == [
        len(c.turns) for c in control.conversations
    ]
    contexts = [t.context for c in control.conversations for t in c.turns]
    assert all(contexts) and len({c[:20] for c in contexts if c}) == len(contexts)


def test_the_hot_prompt_puts_one_system_prompt_before_everything() -> None:
    workload = hot_prompt(SMALL)
    assert len({c.system for c in workload.conversations}) == 1
    assert len(tokenize(workload.conversations[0].system)) == SMALL.hot_system_tokens
    assert all(len(c.turns) == 1 for c in workload.conversations)


# Routers, settings, report


def test_router_names_carry_the_policy_and_its_options() -> None:
    assert parse_name("llmserve:cache_aware:load_ratio=1.25,index=tokens") == (
        "llmserve",
        "cache_aware",
        {"load_ratio": 1.25, "index": "tokens"},
    )
    assert callable(launcher("sglang:cache_aware"))
    assert callable(launcher("llmserve@HEAD:prefix"))
    with pytest.raises(ValueError):
        launcher("nginx:round_robin")


def test_the_time_scale_stretches_every_timing_only() -> None:
    config = sim_config(["capacity_blocks=100", "decode_base_ms=10"], time_scale=2)
    assert (config.capacity_blocks, config.decode_base_ms) == (100, 20)
    assert config.prefill_ms_per_token == 2 * SimConfig().prefill_ms_per_token


def test_the_report_reads_hit_rates_and_shares() -> None:
    samples = [Sample(0, i, ttft_s=0.1, tokens=10, status=200, replica="a") for i in range(3)]
    samples.append(Sample(1, 0, ttft_s=0.3, tokens=10, status=200, replica="b"))
    before = [{"vllm:prefix_cache_queries_total": 100.0}, {}]
    after = [
        {"vllm:prefix_cache_queries_total": 300.0, "vllm:prefix_cache_hits_total": 150.0},
        {"vllm:prefix_cache_queries_total": 200.0, "vllm:prefix_cache_hits_total": 50.0},
    ]
    result = row("r", "w", samples, 2.0, ["a", "b"], before, after)
    assert result.hit_rate == pytest.approx(0.5)
    assert (result.max_share, result.min_share) == (0.75, 0.25)
    assert result.output_tok_s == 20
    assert result.ttft_p99_ms == pytest.approx(300)


# Over a socket


@pytest.fixture
async def replica_url() -> AsyncIterator[str]:
    replica = Replica(CONFIG, "sim", "r1")
    runner = web.AppRunner(replica.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_the_replica_streams_and_reports_its_cache(replica_url: str) -> None:
    body = {
        "model": "sim",
        "messages": [{"role": "system", "content": " ".join(prompt(70))}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(replica_url + "/v1/chat/completions", json=body) as r:
                assert r.headers["x-replica"] == "r1"
                lines = [line.strip() async for line in r.content if line.strip()]
        async with session.post(replica_url + "/v1/completions", json={"prompt": "a b"}) as r:
            whole = await r.json()
        async with session.get(replica_url + "/metrics") as r:
            metrics = parse(await r.text())
        async with session.get(replica_url + "/v1/models") as r:
            models = await r.json()
        async with session.get(replica_url + "/server_info") as r:
            info = await r.json()
    assert lines[-1] == b"data: [DONE]"
    chunks = [orjson.loads(line[5:]) for line in lines[:-1]]
    text = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([t for t in text if t]) == 5
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    assert {c["system_fingerprint"] for c in chunks} == {"replica-r1"}
    assert whole["usage"]["completion_tokens"] == 16
    assert metrics["vllm:prefix_cache_hits_total"] == 64
    assert metrics["vllm:request_success_total"] == 3
    assert metrics["vllm:num_requests_running"] == 0
    assert models["data"][0]["id"] == "sim"
    assert info["served_model_name"] == "sim"  # what sglang-router registers the model as


async def test_a_client_that_leaves_frees_its_place_in_the_batch(replica_url: str) -> None:
    body = {"model": "sim", "prompt": "a b c", "max_tokens": 1000, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(replica_url + "/v1/completions", json=body) as r:
            await r.content.readline()
        for _ in range(100):
            async with session.get(replica_url + "/metrics") as r:
                metrics = parse(await r.text())
            if metrics["vllm:num_requests_running"] == 0:
                break
            await asyncio.sleep(0.02)
    assert metrics["vllm:num_requests_running"] == 0
    assert metrics["vllm:kv_cache_usage_perc"] == 0
    assert metrics["vllm:generation_tokens_total"] < 1000


def test_parse_reads_vllm_metrics() -> None:
    text = (
        '# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{model_name="m"} 5.0\n'
    )
    assert parse(text) == {"vllm:prefix_cache_hits_total": 5.0}
