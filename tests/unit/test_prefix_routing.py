"""Cache-aware routing as pure state: the prefix index (what each replica was sent), the load
bound every affinity is held to, and what a user notices of both: a conversation stays on the
replica that holds its history, users who share a system prompt spread out, and no replica
takes more than its bound."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.config import RoutingConfig
from llmserve.routing.balancer import Balancer
from llmserve.routing.policy import RoutePolicy
from llmserve.routing.prefix_index import PrefixIndex
from llmserve.validation.request import ChatMessage, SamplingOptions, ValidatedRequest

SYSTEM = "You are a careful assistant. " * 40  # ~1,200 characters: 18 blocks of 64


def index(replicas: int = 4, capacity: int = 1000) -> PrefixIndex:
    return PrefixIndex(replicas, block_chars=64, capacity=capacity, max_blocks=512)


def chat(*turns: str, system: str = SYSTEM) -> ValidatedRequest:
    messages = [ChatMessage("system", system)]
    for i, turn in enumerate(turns):
        messages.append(ChatMessage("user" if i % 2 == 0 else "assistant", turn))
    return ValidatedRequest(
        "r", "m", "chat", "", None, 10, SamplingOptions(16), messages=tuple(messages)
    )


# --- the index ----------------------------------------------------------------------------------


def test_blocks_are_chained_so_a_block_names_its_whole_prefix() -> None:
    idx = index()
    a = idx.blocks("x" * 64 + "y" * 64 + "z" * 10)
    b = idx.blocks("w" * 64 + "y" * 64)
    assert len(a) == 2  # the partial last block is not a block
    assert a[1] != b[1]  # the same characters after another prefix are another block
    assert idx.blocks("x" * 64 + "y" * 64) == a


def test_a_replica_matches_the_leading_blocks_it_was_sent() -> None:
    idx = index(replicas=3)
    long = idx.blocks(SYSTEM + "question one" * 20)
    idx.insert(1, long)
    idx.insert(2, long[:5])
    assert idx.matches(long) == [0, len(long), 5]
    other = idx.blocks("a different start" * 50)
    assert idx.matches(other) == [0, 0, 0]


def test_each_replica_keeps_its_most_recent_blocks_only() -> None:
    idx = index(replicas=2, capacity=10)
    first, second = idx.blocks("a" * 640), idx.blocks("b" * 640)
    idx.insert(0, first)
    idx.insert(0, second)  # ten more: the first ten are out
    assert idx.size(0) == 10
    assert idx.matches(first) == [0, 0] and idx.matches(second) == [10, 0]


def test_a_forgotten_replica_holds_nothing_and_the_others_keep_theirs() -> None:
    idx = index(replicas=2)
    blocks = idx.blocks(SYSTEM)
    idx.insert(0, blocks)
    idx.insert(1, blocks)
    idx.forget(0)
    assert idx.matches(blocks) == [0, len(blocks)]


# --- the bound ----------------------------------------------------------------------------------


def balancer(n: int, factor: float = 1.25, slack: int = 2) -> Balancer:
    b = Balancer([f"r{i}" for i in range(n)], load_factor=factor, load_slack=slack)
    for i in range(n):
        b.checked(i, True)
    return b


def test_the_longest_prefix_wins_and_ties_go_to_the_least_loaded() -> None:
    b = balancer(3)
    b.started(1)
    assert b.pick_cached([2, 5, 0]) == (1, "affinity")
    assert b.pick_cached([4, 4, 0]) == (0, "affinity")  # r1 is busier
    assert b.pick_cached([0, 0, 0])[1] == "fallback"


def test_past_the_bound_the_next_longest_prefix_takes_it() -> None:
    b = balancer(2, factor=1.25, slack=1)
    for _ in range(4):
        b.started(0)
    assert b.pick_cached([9, 3]) == (1, "load_bound")
    assert b.pick_cached([9, 0]) == (1, "load_bound")  # nothing cached there: still sent


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 8),
    factor=st.floats(1.0, 2.0),
    slack=st.integers(1, 4),
    steps=st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 30), min_size=8, max_size=8)),
        max_size=300,
    ),
)
def test_no_pick_leaves_a_replica_above_the_bound(
    n: int, factor: float, slack: int, steps: list[tuple[bool, list[int]]]
) -> None:
    """Whatever the matches say, a replica is given a request only while its load stays within
    load_factor x the mean (the request counted) or slack above the least loaded."""
    b = balancer(n, factor, slack)
    running: list[int] = []
    for end_one, matches in steps:
        if end_one and running:
            b.ended(running.pop(0))
            continue
        loads = [r.outstanding for r in b.replicas]
        picked, _ = b.pick_cached(matches[:n])
        assert picked is not None
        bound = max(factor * (sum(loads) + 1) / n, min(loads) + slack)
        assert loads[picked] + 1 <= bound + 1e-9
        b.started(picked)
        running.append(picked)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60, unique=True))
def test_a_replica_leaving_moves_only_the_sessions_it_held(sessions: list[str]) -> None:
    b = balancer(4)
    before = {s: b.pick_bounded(s)[0] for s in sessions}
    b.checked(2, False)
    after = {s: b.pick_bounded(s)[0] for s in sessions}
    for session in sessions:
        if before[session] != 2:
            assert after[session] == before[session]
        else:
            assert after[session] != 2


# --- what a user notices ------------------------------------------------------------------------


def policy(n: int = 4) -> tuple[RoutePolicy, Balancer]:
    b = balancer(n)
    return RoutePolicy("m", RoutingConfig(policy="cache_aware"), b), b


def test_a_conversation_stays_on_the_replica_that_holds_its_history() -> None:
    p, _ = policy()
    # Other users first, so every replica holds the system prompt.
    for user in range(8):
        p.choose(p.route(chat(f"hello from user {user} " * 10)))
    turn = chat("What is a KV cache? " * 10)
    first = p.choose(p.route(turn))
    reply = "A KV cache keeps the attention keys and values of earlier tokens. " * 5
    later = chat("What is a KV cache? " * 10, reply, "And why route by prefix? " * 10)
    assert p.choose(p.route(later)) == first


def test_users_sharing_a_system_prompt_spread_within_the_bound() -> None:
    p, b = policy(4)
    for user in range(40):  # 40 conversations open at once, each on its own replica's slot
        picked = p.choose(p.route(chat(f"user {user} asks something " * 8)))
        assert picked is not None
        b.started(picked)
    loads = [r.outstanding for r in b.replicas]
    assert max(loads) <= math.ceil(1.25 * sum(loads) / len(loads)), loads
