"""``routing: {policy: cache_aware}`` over real replicas on loopback: a conversation's next turn
goes to the replica that served its history, users who share one long system prompt spread
within the load bound instead of piling onto one replica, and the decisions are counted.

The replicas are llmserve servers with the simulated engine; which one generated a request is
read from its engine's ``started`` records (tests/routing/helpers.py).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from tests.observability.helpers import Deltas
from tests.routing.helpers import (
    call_many,
    gateway,
    served_by,
    sim_replicas,
    started_counts,
    started_since,
    upstream_model,
)
from tests.support.client import call

SYSTEM = "You answer questions about serving language models, briefly. " * 25  # ~1,500 chars


def conversation(*turns: str) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, turn in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn})
    return messages


async def test_the_next_turn_goes_where_the_history_is() -> None:
    # The replicas' "slow" model: a 4,096-token context holds a conversation.
    async with (
        sim_replicas(4) as replicas,
        gateway(
            upstream_model(
                "rt-cache", [r.url for r in replicas], policy="cache_aware", upstream="slow"
            )
        ) as gw,
    ):
        for user in range(8):  # every replica gets the system prompt and some history
            await call(
                gw.url, "rt-cache", max_tokens=2, messages=conversation(f"user {user}: hello " * 20)
            )
        history = ["How does paged attention allocate memory? " * 8]
        first = await served_by(
            replicas,
            call(gw.url, "rt-cache", max_tokens=2, messages=conversation(*history)),
            "slow",
        )
        answer = "It allocates fixed-size blocks on demand and maps them per sequence. " * 4
        for follow_up in ("And when memory runs out? " * 8, "What about prefix sharing? " * 8):
            history += [answer, follow_up]
            later = conversation(*history)
            request = call(gw.url, "rt-cache", max_tokens=2, messages=later)
            assert await served_by(replicas, request, "slow") == first


async def test_users_sharing_a_system_prompt_spread_within_the_bound() -> None:
    """16 users start at once with the same long system prompt. Prefix affinity alone would
    send all 16 to the one replica that holds it; the bound (1.25 x the mean, or 2 above the
    least loaded) spreads them."""
    urls_model: dict[str, Any] = {"upstream": "slow"}  # 10 tokens/s: all 16 are in flight at once
    async with (
        sim_replicas(4) as replicas,
        gateway(
            upstream_model(
                "rt-spread", [r.url for r in replicas], policy="cache_aware", **urls_model
            )
        ) as gw,
    ):
        deltas = await Deltas.start(gw.url)
        before = started_counts(replicas, "slow")
        seen = await call_many(
            16,
            lambda user: call(
                gw.url, "rt-spread", max_tokens=4, messages=conversation(f"I am user {user}. " * 6)
            ),
        )
        counts = started_since(replicas, before, "slow")
        await deltas.after()
    assert all(s.ok for s in seen), [s for s in seen if not s.ok]
    assert sum(counts) == 16
    assert max(counts) <= math.ceil(1.25 * 16 / 4), counts
    decisions = {
        reason: deltas("llmserve_routing_decisions_total", model="rt-spread", reason=reason)
        for reason in ("affinity", "load_bound", "fallback")
    }
    assert sum(decisions.values()) == 16, decisions
    assert decisions["affinity"] >= 1 and decisions["load_bound"] >= 1, decisions
    hits = deltas("llmserve_routing_prefix_blocks_total", model="rt-spread", outcome="hit")
    assert hits > 0  # the shared system prompt was sent before, to the replicas that got it


async def test_several_prompts_at_once_share_what_each_replica_was_sent() -> None:
    """Two groups of users with two system prompts, interleaved: each prompt's blocks are
    indexed on the replicas they went to, and a second round of the same users hits them."""
    async with (
        sim_replicas(2) as replicas,
        gateway(upstream_model("rt-two", [r.url for r in replicas], policy="cache_aware")) as gw,
    ):
        deltas = await Deltas.start(gw.url)
        for _ in range(2):
            await asyncio.gather(
                *(
                    call(gw.url, "rt-two", messages=conversation(f"group {u % 2} user {u}" * 10))
                    for u in range(6)
                )
            )
        await deltas.after()
    hits = deltas("llmserve_routing_prefix_blocks_total", model="rt-two", outcome="hit")
    misses = deltas("llmserve_routing_prefix_blocks_total", model="rt-two", outcome="miss")
    assert hits > misses, (hits, misses)
