"""Pure admission state for one model: no ``await``, no clock of its own (``now`` is passed in).

What waits, what runs and what is turned away:
- at most ``max_in_flight`` requests run on the engine; the rest wait here, not in vLLM;
- the waiting room is bounded in requests and in tokens; beyond it, an offer is rejected at once;
- waiting requests leave in priority order (lower number first), and within a priority by
  start-time fair queueing over tokens, so a tenant that floods the queue cannot starve others:
  each tenant's requests get virtual finish tags spaced by cost / weight;
- optionally, dispatch is grouped: the first waiting request waits up to ``group_window_s`` for
  company, and free slots go first to requests whose prompt length falls in the same bucket.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

RejectReason = Literal["queue_full", "queue_tokens_full"]


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_waiting_requests: int
    max_waiting_tokens: int
    max_in_flight: int
    group_window_s: float = 0.0
    # Prompt-token bucket edges for grouping: [128, 512] gives buckets <128, 128-511, >=512.
    group_buckets: tuple[int, ...] = ()


@dataclass(slots=True)
class Entry:
    """One request's place in the queue."""

    id: str
    tenant: str
    cost: int  # tokens it may use: prompt + max_tokens
    prompt_tokens: int
    enqueued_at: float
    deadline: float
    weight: float = 1.0
    priority: int = 0
    finish_tag: float = 0.0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: RejectReason
    retry_after_s: int


@dataclass(slots=True)
class QueueState:
    limits: QueueLimits
    waiting: dict[str, Entry] = field(default_factory=dict)
    running: dict[str, Entry] = field(default_factory=dict)
    waiting_tokens: int = 0
    _virtual_time: float = 0.0
    _tenant_finish: dict[str, float] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _finished_at: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def offer(self, entry: Entry, now: float) -> Rejected | None:
        """Queue ``entry``, or say why not. Queued entries leave through ``pop_ready``.

        The waiting-room bounds apply only to entries that will really wait: one for which a
        slot is free now is always taken, even with ``max_waiting_requests: 0``."""
        will_wait = len(self.running) + len(self.waiting) >= self.limits.max_in_flight
        if will_wait and len(self.waiting) >= self.limits.max_waiting_requests:
            return Rejected("queue_full", self.retry_after(now))
        if (
            will_wait
            and self.waiting
            and self.waiting_tokens + entry.cost > self.limits.max_waiting_tokens
        ):
            return Rejected("queue_tokens_full", self.retry_after(now))
        start = max(self._virtual_time, self._tenant_finish.get(entry.tenant, 0.0))
        entry.finish_tag = start + entry.cost / max(entry.weight, 1e-9)
        entry.seq = next(self._seq)
        self._tenant_finish[entry.tenant] = entry.finish_tag
        self.waiting[entry.id] = entry
        self.waiting_tokens += entry.cost
        return None

    def pop_ready(self, now: float) -> list[Entry]:
        """Entries to dispatch now, in dispatch order; they count as running from here."""
        free = self.limits.max_in_flight - len(self.running)
        if free <= 0 or not self.waiting:
            return []
        ordered = sorted(self.waiting.values(), key=_order)
        if self.limits.group_window_s > 0:
            oldest = min(e.enqueued_at for e in ordered)
            if now < oldest + self.limits.group_window_s and len(ordered) < free:
                return []  # wait for company; ``next_wakeup`` says until when
            head_bucket = self._bucket(ordered[0])
            ordered.sort(key=lambda e: (self._bucket(e) != head_bucket, _order(e)))
        chosen = ordered[:free]
        for entry in chosen:
            self._take(entry)
            self.running[entry.id] = entry
            self._virtual_time = max(
                self._virtual_time, entry.finish_tag - entry.cost / max(entry.weight, 1e-9)
            )
        return chosen

    def next_wakeup(self) -> float | None:
        """When grouping holds entries back: the time ``pop_ready`` should be called again."""
        if self.limits.group_window_s <= 0 or not self.waiting:
            return None
        return min(e.enqueued_at for e in self.waiting.values()) + self.limits.group_window_s

    def remove(self, entry_id: str) -> Entry | None:
        """Take a waiting entry out (client gone, deadline passed). None if it is not waiting."""
        entry = self.waiting.get(entry_id)
        if entry is not None:
            self._take(entry)
        return entry

    def finish(self, entry_id: str, now: float) -> None:
        """A running entry ended (any way at all): its slot is free again."""
        if self.running.pop(entry_id, None) is not None:
            self._finished_at.append(now)

    def unadmit(self, entry_id: str) -> None:
        """Free the slot of an entry dispatched to nobody (its waiter left): not a finish, so
        it does not count towards the drain rate."""
        self.running.pop(entry_id, None)

    def expired(self, now: float) -> list[Entry]:
        """Remove and return the waiting entries whose deadline has passed."""
        late = [e for e in self.waiting.values() if e.deadline <= now]
        for entry in late:
            self._take(entry)
        return late

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self.waiting.values()), default=None)

    def drain_rate(self, now: float) -> float:
        """Requests finished per second, over the recent finishes (0 when unknown)."""
        recent = [t for t in self._finished_at if t > now - 60.0]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], 1e-3)
        return len(recent) / span

    def retry_after(self, now: float) -> int:
        """Seconds until the waiting room has likely drained, from the measured rate; 1..60."""
        rate = self.drain_rate(now)
        if rate <= 0:
            return 5 if self.waiting else 1
        return max(1, min(60, math.ceil((len(self.waiting) + 1) / rate)))

    def _take(self, entry: Entry) -> None:
        del self.waiting[entry.id]
        self.waiting_tokens -= entry.cost
        if not self.waiting:
            # An idle queue forgets history: a tenant is not punished for an earlier burst.
            self._tenant_finish.clear()

    def _bucket(self, entry: Entry) -> int:
        return bisect.bisect_right(self.limits.group_buckets, entry.prompt_tokens)


def _order(entry: Entry) -> tuple[int, float, int]:
    return (entry.priority, entry.finish_tag, entry.seq)
