"""Which replica takes the next request: pure state, no I/O and no clock, so it is tested
exhaustively without servers.

- least outstanding requests (the default): the replica with the fewest requests in flight, ties
  taken in turn, so equal replicas share the load evenly. In flight means the engine's own
  count where it reports one (every gateway's requests), else this gateway's;
- affinity (a session id, or a prompt prefix): rendezvous hashing over the healthy replicas, so
  the same key lands on the same replica (and its prefix cache), and when a replica leaves, only
  the keys it held move;
- cache-aware: the replica holding the longest prefix of the prompt (``prefix_index``), ties to
  the least loaded.

Affinity never pushes a replica past the load bound: a replica may take a request while its
load stays within ``load_factor`` x the mean load of the candidates (the request counted), or
within ``load_slack`` of the least loaded one (so that at a handful of requests, a session's
replica is not refused for being one request ahead). Past the bound, the next choice in the
policy's order takes it (consistent hashing with bounded loads, Mirrokni et al. 2018).

A replica is taken out after ``eject_after`` consecutive failed requests or a failed health
check, and comes back after a passing one. Before its first check it is used (a request to a
replica that is not up yet fails over and takes it out), but not counted as healthy for readiness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

# Why a replica was picked (llmserve_routing_decisions_total): the affinity's own choice, the
# next one because the bound refused it, or the least loaded for want of any affinity.
Reason = Literal["affinity", "load_bound", "fallback"]


@dataclass(slots=True)
class ReplicaState:
    label: str
    outstanding: int = 0  # this gateway's requests on the replica
    healthy: bool | None = None  # None: not checked yet
    failures: int = 0  # consecutive failed requests
    # The engine's own count of running + waiting requests (every gateway's), when it reports
    # one (``engine_signals``), and this gateway's count when it was read.
    engine_requests: float | None = None
    outstanding_at_signal: int = 0

    @property
    def load(self) -> float:
        """Requests on the replica: the engine's count plus what this gateway started or ended
        since it was read, never less than this gateway's own; its own alone when the engine
        does not report."""
        if self.engine_requests is None:
            return self.outstanding
        since = self.outstanding - self.outstanding_at_signal
        return max(float(self.outstanding), self.engine_requests + since)


class Balancer:
    def __init__(
        self,
        labels: list[str],
        eject_after: int = 1,
        load_factor: float = 1.25,
        load_slack: int = 2,
    ) -> None:
        if not labels:
            raise ValueError("a model needs at least one replica")
        self.replicas = [ReplicaState(label) for label in labels]
        self._eject_after = eject_after
        self._load_factor = load_factor
        self._load_slack = load_slack
        self._turn = 0

    @property
    def any_healthy(self) -> bool:
        return any(r.healthy is True for r in self.replicas)

    @property
    def healthy_count(self) -> int:
        return sum(r.healthy is True for r in self.replicas)

    def pick(self, affinity: str | None = None, exclude: Collection[int] = ()) -> int | None:
        """The replica for a request, or None when no healthy one is left to try. With an
        ``affinity``, plain rendezvous hashing, unbounded (``pick_bounded`` bounds it)."""
        candidates = self._candidates(exclude)
        if not candidates:
            return None
        if affinity is not None:
            return max(candidates, key=lambda i: _score(affinity, self.replicas[i].label))
        # Rotate where the scan starts, so ties do not all go to the first replica.
        self._turn = (self._turn + 1) % len(self.replicas)
        n = len(self.replicas)
        return min(candidates, key=lambda i: (self.replicas[i].load, (i - self._turn) % n))

    def pick_bounded(
        self, affinity: str | None, exclude: Collection[int] = ()
    ) -> tuple[int | None, Reason]:
        """Rendezvous order for ``affinity``, the first replica within the load bound."""
        candidates = self._candidates(exclude)
        if not candidates:
            return None, "fallback"
        if affinity is None:
            return self.pick(exclude=exclude), "fallback"
        order = sorted(candidates, key=lambda i: _score(affinity, self.replicas[i].label))
        order.reverse()
        bound = self._bound(candidates)
        for rank, index in enumerate(order):
            if self.replicas[index].load + 1 <= bound:
                return index, "affinity" if rank == 0 else "load_bound"
        return self.pick(exclude=exclude), "load_bound"  # unreachable: the least is in bound

    def pick_cached(
        self, matches: Sequence[int], exclude: Collection[int] = ()
    ) -> tuple[int | None, Reason]:
        """The replica holding the longest prefix (``matches[i]`` blocks on replica i) within
        the load bound, ties to the least loaded; with no prefix anywhere, the least loaded."""
        candidates = self._candidates(exclude)
        if not candidates:
            return None, "fallback"
        best = max(matches[i] for i in candidates)
        if best == 0:
            return self.pick(exclude=exclude), "fallback"
        bound = self._bound(candidates)
        within = [i for i in candidates if self.replicas[i].load + 1 <= bound]
        longest = max(matches[i] for i in within)
        if longest == 0:
            return self.pick(exclude=exclude), "load_bound"
        n = len(self.replicas)
        self._turn = (self._turn + 1) % n
        index = min(
            (i for i in within if matches[i] == longest),
            key=lambda i: (self.replicas[i].load, (i - self._turn) % n),
        )
        return index, "affinity" if longest == best else "load_bound"

    def _candidates(self, exclude: Collection[int]) -> list[int]:
        return [
            i for i, r in enumerate(self.replicas) if r.healthy is not False and i not in exclude
        ]

    def _bound(self, candidates: list[int]) -> float:
        """A replica may take a request if its load stays at most this (the least loaded
        always may: ``load_slack`` is at least 1)."""
        loads = [self.replicas[i].load for i in candidates]
        mean_after = (sum(loads) + 1) / len(loads)
        return max(self._load_factor * mean_after, min(loads) + self._load_slack)

    def signal(self, index: int, engine_requests: float | None) -> None:
        """What the replica's engine reported (None: it stopped reporting: own counts only)."""
        replica = self.replicas[index]
        replica.engine_requests = engine_requests
        replica.outstanding_at_signal = replica.outstanding

    def started(self, index: int) -> None:
        self.replicas[index].outstanding += 1

    def ended(self, index: int) -> None:
        self.replicas[index].outstanding -= 1

    def succeeded(self, index: int) -> None:
        self.replicas[index].failures = 0

    def failed(self, index: int) -> bool:
        """Count a failed request; True when it took the replica out. The last replica in
        rotation is never taken out by failed requests (only by a failed health check): with
        nowhere else to go, refusing every request for a probe interval is worse than trying."""
        replica = self.replicas[index]
        replica.failures += 1
        others_in = any(r.healthy is not False for i, r in enumerate(self.replicas) if i != index)
        if others_in and replica.healthy is not False and replica.failures >= self._eject_after:
            replica.healthy = False
            return True
        return False

    def checked(self, index: int, healthy: bool) -> None:
        """The result of an active health check."""
        replica = self.replicas[index]
        replica.healthy = healthy
        if healthy:
            replica.failures = 0


def _score(key: str, label: str) -> int:
    # blake2b: fast, stable across processes and Python versions (unlike hash()).
    digest = hashlib.blake2b(f"{key}\x00{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
