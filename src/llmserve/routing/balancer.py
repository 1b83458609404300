"""Which replica takes the next request: pure state, no I/O and no clock, so it is tested
exhaustively without servers.

- least outstanding requests (the default): the replica with the fewest requests in flight, ties
  taken in turn, so equal replicas share the load evenly;
- affinity (a session id, or a prompt prefix): rendezvous hashing over the healthy replicas, so
  the same key lands on the same replica (and its prefix cache), and when a replica leaves, only
  the keys it held move.

A replica is taken out after ``eject_after`` consecutive failed requests or a failed health
check, and comes back after a passing one. Before its first check it is used (a request to a
replica that is not up yet fails over and takes it out), but not counted as healthy for readiness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(slots=True)
class ReplicaState:
    label: str
    outstanding: int = 0
    healthy: bool | None = None  # None: not checked yet
    failures: int = 0  # consecutive failed requests


class Balancer:
    def __init__(self, labels: list[str], eject_after: int = 1) -> None:
        if not labels:
            raise ValueError("a model needs at least one replica")
        self.replicas = [ReplicaState(label) for label in labels]
        self._eject_after = eject_after
        self._turn = 0

    @property
    def any_healthy(self) -> bool:
        return any(r.healthy is True for r in self.replicas)

    @property
    def healthy_count(self) -> int:
        return sum(r.healthy is True for r in self.replicas)

    def pick(self, affinity: str | None = None, exclude: Collection[int] = ()) -> int | None:
        """The replica for a request, or None when no healthy one is left to try."""
        candidates = [
            i for i, r in enumerate(self.replicas) if r.healthy is not False and i not in exclude
        ]
        if not candidates:
            return None
        if affinity is not None:
            return max(candidates, key=lambda i: _score(affinity, self.replicas[i].label))
        # Rotate where the scan starts, so ties do not all go to the first replica.
        self._turn = (self._turn + 1) % len(self.replicas)
        n = len(self.replicas)
        return min(candidates, key=lambda i: (self.replicas[i].outstanding, (i - self._turn) % n))

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
