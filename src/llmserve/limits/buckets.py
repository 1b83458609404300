"""Pure rate-limit state for the in-memory store: token buckets and concurrency, clock passed in.

Buckets refill continuously (capacity = the per-minute limit, refilled over 60 s), as OpenAI's
limits do. Tokens are reserved at admission (prompt + max_tokens * n) and the unused part is
refunded at the end, so a burst of concurrent requests can never overrun the limit. The Redis
store's Lua script (``redis_store.py``) implements the same rules; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmserve.quota import QuotaSnapshot

WINDOW_S = 60.0


@dataclass(slots=True)
class Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        elapsed = max(now - self.updated, 0.0)
        self.level = min(self.capacity, self.level + elapsed * self.capacity / WINDOW_S)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        return max(amount - self.level, 0.0) * WINDOW_S / self.capacity

    def seconds_to_full(self) -> float:
        return (self.capacity - self.level) * WINDOW_S / self.capacity


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    # "requests", "tokens" or "concurrency" when refused.
    reason: str
    retry_after_s: float
    snapshot: QuotaSnapshot


@dataclass(slots=True)
class KeyLimits:
    """One key's buckets and running requests."""

    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    requests: Bucket | None = None
    tokens: Bucket | None = None
    running: set[str] = field(default_factory=set)

    def reserve(self, cost: int, request_id: str, now: float) -> Decision:
        self._refill(now)
        reason, wait = "", 0.0
        if self.requests is not None and self.requests.level < 1:
            reason, wait = "requests", self.requests.seconds_until(1)
        if self.tokens is not None and self.tokens.level < cost:
            reason = reason or "tokens"
            wait = max(wait, self.tokens.seconds_until(cost))
        if self.max_concurrent is not None and len(self.running) >= self.max_concurrent:
            reason, wait = reason or "concurrency", max(wait, 1.0)
        if not reason:
            if self.requests is not None:
                self.requests.level -= 1
            if self.tokens is not None:
                self.tokens.level -= cost
            self.running.add(request_id)
        return Decision(not reason, reason, wait, self.snapshot())

    def release(self, request_id: str, refund: int, now: float) -> None:
        """Free and refund a reservation; a no-op for one that does not exist (released
        already, or never made), so a release can safely be sent when unsure."""
        self._refill(now)
        if request_id not in self.running:
            return
        self.running.discard(request_id)
        if self.tokens is not None and refund > 0:
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + refund)

    def snapshot(self) -> QuotaSnapshot:
        r, t = self.requests, self.tokens
        return QuotaSnapshot(
            self.rpm,
            int(r.level) if r else None,
            r.seconds_to_full() if r else None,
            self.tpm,
            int(t.level) if t else None,
            t.seconds_to_full() if t else None,
        )

    def _refill(self, now: float) -> None:
        if self.rpm is not None and self.requests is None:
            self.requests = Bucket(self.rpm, self.rpm, now)
        if self.tpm is not None and self.tokens is None:
            self.tokens = Bucket(self.tpm, self.tpm, now)
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)
