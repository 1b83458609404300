"""The cost of one cache-aware routing decision (route + choose), without I/O: prompts of a
multi-turn workload (6 turns, 4 system prompts of ~1,200 characters) over 4 and 8 replicas.

    .venv/bin/python -m benchmarks.routing_decision
"""

from __future__ import annotations

import time

from llmserve.config import RoutingConfig
from llmserve.routing.balancer import Balancer
from llmserve.routing.policy import RoutePolicy
from llmserve.validation.request import ChatMessage, SamplingOptions, ValidatedRequest

SYSTEM = "You are a careful assistant. " * 40


def request(system: str, turns: list[str]) -> ValidatedRequest:
    messages = [ChatMessage("system", system)]
    messages += [ChatMessage("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return ValidatedRequest(
        "r", "m", "chat", "", None, 10, SamplingOptions(16), messages=tuple(messages)
    )


def per_decision_us(replicas: int, rounds: int = 5) -> float:
    balancer = Balancer([f"r{i}" for i in range(replicas)])
    for i in range(replicas):
        balancer.checked(i, True)
    policy = RoutePolicy("m", RoutingConfig(policy="cache_aware"), balancer)
    history = [f"turn {i}: " + "some words of a conversation " * 6 for i in range(6)]
    requests = [request(SYSTEM + str(i % 4), history[: 1 + i % 6]) for i in range(1000)]
    for r in requests:
        policy.choose(policy.route(r))
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for r in requests:
            policy.choose(policy.route(r))
        best = min(best, (time.perf_counter() - started) / len(requests) * 1e6)
    return best


if __name__ == "__main__":
    for n in (4, 8):
        print(f"{n} replicas: {per_decision_us(n):.1f} µs per decision (best of 5 rounds)")
