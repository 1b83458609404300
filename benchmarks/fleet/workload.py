"""The fleet benchmark's workloads, as data: seeded, so every router replays the same requests.

- ``multi_turn``: users arrive (Poisson), each with one conversation under one of a few shared
  system prompts; each next turn resends the whole history (the answers the replicas gave).
- ``no_sharing``: the control. The same users, turns and lengths, but every prompt is unique:
  each turn is sent as a fresh context as long as the history would be, and nothing repeats.
- ``hot_prompt``: one long system prompt in front of every request, each a short unique turn.

Lengths are in the simulated model's tokens (``blocks.tokenize``): a word of 1-4 letters is one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, slots=True)
class Turn:
    user: str
    max_tokens: int
    # For a stateless conversation, the unique context sent instead of the history.
    context: str | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    system: str
    turns: tuple[Turn, ...]
    start_s: float
    think_s: float  # the pause between an answer and the user's next turn


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    conversations: tuple[Conversation, ...]

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


@dataclass(frozen=True, slots=True)
class Spec:
    """The knobs of every workload; the defaults are the full run's."""

    users: int = 200
    system_prompts: int = 4
    system_tokens: int = 1000
    turns: tuple[int, int] = (3, 6)
    user_tokens: tuple[int, int] = (50, 300)
    answer_tokens: tuple[int, int] = (100, 300)
    users_per_s: float = 2.0
    think_s: float = 1.0
    hot_system_tokens: int = 2000
    hot_user_tokens: tuple[int, int] = (10, 60)
    hot_requests_per_s: float = 8.0
    seed: int = 0


def text(rng: random.Random, tokens: int) -> str:
    """Random words of 1-4 letters: ``tokens`` tokens of the sim's tokeniser."""
    return " ".join("".join(rng.choices(_LETTERS, k=rng.randint(1, 4))) for _ in range(tokens))


def length(rng: random.Random, bounds: tuple[int, int]) -> int:
    """A log-normal length clipped to ``bounds`` (ShareGPT's turns have a long right tail),
    its median the bounds' geometric mean."""
    low, high = bounds
    mu, sigma = math.log(math.sqrt(low * high)), math.log(high / low) / 3
    return int(min(high, max(low, rng.lognormvariate(mu, sigma))))


def _arrivals(rng: random.Random, count: int, rate: float) -> list[float]:
    now, out = 0.0, []
    for _ in range(count):
        now += rng.expovariate(rate)
        out.append(now)
    return out


def multi_turn(spec: Spec) -> Workload:
    rng = random.Random(spec.seed)
    systems = [text(rng, spec.system_tokens) for _ in range(spec.system_prompts)]
    conversations = []
    for i, start in enumerate(_arrivals(rng, spec.users, spec.users_per_s)):
        system = systems[rng.randrange(len(systems))]
        count = rng.randint(*spec.turns)
        turns = tuple(
            Turn(text(rng, length(rng, spec.user_tokens)), length(rng, spec.answer_tokens))
            for _ in range(count)
        )
        conversations.append(Conversation(i, system, turns, start, spec.think_s))
    return Workload("multi_turn", tuple(conversations))


def no_sharing(spec: Spec) -> Workload:
    # The same draws as multi_turn (same seed), then each turn's history replaced by a unique
    # context of the history's length: "role: " and the generation prompt add ~3 tokens a turn.
    rng = random.Random(spec.seed ^ 0x5EED)
    conversations = []
    for shared in multi_turn(spec).conversations:
        history = spec.system_tokens + 2
        turns = []
        for turn in shared.turns:
            turns.append(Turn(turn.user, turn.max_tokens, text(rng, history)))
            history += len(turn.user.split()) + turn.max_tokens + 6
        unique = Conversation(shared.id, "", tuple(turns), shared.start_s, shared.think_s)
        conversations.append(unique)
    return Workload("no_sharing", tuple(conversations))


def hot_prompt(spec: Spec) -> Workload:
    rng = random.Random(spec.seed)
    system = text(rng, spec.hot_system_tokens)
    count = spec.users * sum(spec.turns) // 2  # as many requests as multi_turn, about
    conversations = [
        Conversation(
            i,
            system,
            (Turn(text(rng, length(rng, spec.hot_user_tokens)), length(rng, spec.answer_tokens)),),
            start,
            0.0,
        )
        for i, start in enumerate(_arrivals(rng, count, spec.hot_requests_per_s))
    ]
    return Workload("hot_prompt", tuple(conversations))


WORKLOADS: dict[str, Callable[[Spec], Workload]] = {
    "multi_turn": multi_turn,
    "no_sharing": no_sharing,
    "hot_prompt": hot_prompt,
}
