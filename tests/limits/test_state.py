"""The pure limit state (``limits/buckets.py``) and the memory store, on an injected clock; and the
x-ratelimit-* header formats."""

from __future__ import annotations

import asyncio
import re

import pytest

from llmserve.api.headers import duration, rate_limit_headers
from llmserve.auth.principal import Principal
from llmserve.limits.buckets import Bucket, KeyLimits
from llmserve.limits.store import MemoryStore
from llmserve.quota import QuotaSnapshot


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- buckets -----------------------------------------------------------------------------------


def test_a_bucket_refills_continuously_over_sixty_seconds_and_caps_at_capacity() -> None:
    bucket = Bucket(capacity=120, level=0, updated=0.0)
    bucket.refill(0.5)
    assert bucket.level == pytest.approx(1.0)  # 120 per 60 s = 2 per second
    bucket.refill(15.0)
    assert bucket.level == pytest.approx(30.0)
    bucket.refill(60.0)
    assert bucket.level == pytest.approx(120.0)
    bucket.refill(600.0)
    assert bucket.level == 120  # never above capacity
    bucket.refill(500.0)  # a clock going backwards adds nothing
    assert bucket.level == 120
    bucket.level = 20
    assert bucket.seconds_until(30) == pytest.approx(5.0)
    assert bucket.seconds_until(10) == 0
    assert bucket.seconds_to_full() == pytest.approx(50.0)


def test_requests_per_minute_refill_continuously_not_per_window() -> None:
    limits = KeyLimits(rpm=60, tpm=None, max_concurrent=None)
    for i in range(60):
        assert limits.reserve(1, f"r{i}", 0.0).allowed
    refused = limits.reserve(1, "late", 0.0)
    assert not refused.allowed and refused.reason == "requests"
    assert refused.retry_after_s == pytest.approx(1.0)
    # Half a request's worth of refill is not enough; a whole one is.
    half = limits.reserve(1, "late", 0.5)
    assert not half.allowed and half.retry_after_s == pytest.approx(0.5)
    assert limits.reserve(1, "late", 1.0).allowed
    # 30 s later exactly 30 more are available, not a fresh 60.
    allowed = sum(limits.reserve(1, f"s{i}", 31.0).allowed for i in range(60))
    assert allowed == 30


def test_retry_after_for_requests_is_the_time_to_one_request() -> None:
    limits = KeyLimits(rpm=3, tpm=None, max_concurrent=None)
    for i in range(3):
        assert limits.reserve(1, str(i), 0.0).allowed
    assert limits.reserve(1, "x", 0.0).retry_after_s == pytest.approx(20.0)
    assert limits.reserve(1, "x", 5.0).retry_after_s == pytest.approx(15.0)
    assert limits.reserve(1, "x", 19.9).retry_after_s == pytest.approx(0.1)
    assert limits.reserve(1, "x", 20.0).allowed


# --- tokens: reserve and refund ----------------------------------------------------------------


def test_tokens_are_reserved_up_front_and_the_unused_part_refunded() -> None:
    limits = KeyLimits(rpm=None, tpm=300, max_concurrent=None)
    for i in range(3):
        decision = limits.reserve(100, f"r{i}", 0.0)
        assert decision.allowed
        assert decision.snapshot.remaining_tokens == 200 - 100 * i
    refused = limits.reserve(100, "r3", 0.0)
    assert not refused.allowed and refused.reason == "tokens"
    assert refused.retry_after_s == pytest.approx(20.0)  # 100 tokens at 5 tokens/s
    assert refused.snapshot.remaining_tokens == 0  # a refusal takes nothing

    # r0 used only 3 of its 100: 97 come back at once.
    limits.release("r0", 97, 0.0)
    assert limits.snapshot().remaining_tokens == 97
    short = limits.reserve(100, "r3", 0.0)
    assert not short.allowed and short.retry_after_s == pytest.approx(0.6)  # 3 tokens short
    assert limits.reserve(97, "r3", 0.0).allowed

    # A refund never lifts the bucket above its capacity.
    limits.release("r1", 100, 0.0)
    limits.release("r2", 100, 0.0)
    limits.release("r3", 100, 60.0)
    assert limits.tokens is not None and limits.tokens.level == 300
    # Refunding nothing (the request used all it reserved) changes nothing.
    limits.reserve(100, "r4", 60.0)
    limits.release("r4", 0, 60.0)
    assert limits.snapshot().remaining_tokens == 200


async def test_a_burst_of_concurrent_reservations_cannot_overrun_tpm() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    key = Principal("burst", tpm=300)
    decisions = await asyncio.gather(*(store.reserve(key, 100, f"r{i}") for i in range(20)))
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 3
    assert sum(100 for _ in admitted) <= 300
    assert {d.reason for d in decisions if not d.allowed} == {"tokens"}
    # A smaller request still fits nowhere: everything is reserved until refunds or refill.
    assert not (await store.reserve(key, 1, "tiny")).allowed
    clock.now += 0.2  # 1 token refilled
    assert (await store.reserve(key, 1, "tiny")).allowed


def test_a_refused_reservation_takes_nothing_from_any_limit() -> None:
    limits = KeyLimits(rpm=2, tpm=100, max_concurrent=5)
    assert limits.reserve(90, "big", 0.0).allowed
    refused = limits.reserve(20, "over", 0.0)
    assert refused.reason == "tokens"
    snap = limits.snapshot()
    assert (snap.remaining_requests, snap.remaining_tokens) == (1, 10)
    assert limits.running == {"big"}
    assert limits.reserve(10, "fits", 0.0).allowed


def test_when_several_limits_are_short_the_wait_covers_all_of_them() -> None:
    limits = KeyLimits(rpm=6, tpm=60, max_concurrent=None)
    for i in range(6):
        assert limits.reserve(10, str(i), 0.0).allowed
    refused = limits.reserve(30, "x", 0.0)
    assert refused.reason == "requests"  # the first limit checked names the refusal
    # 1 request at 0.1/s = 10 s; 30 tokens at 1/s = 30 s: the longer wait.
    assert refused.retry_after_s == pytest.approx(30.0)


# --- concurrency -------------------------------------------------------------------------------


def test_concurrency_is_held_until_release() -> None:
    limits = KeyLimits(rpm=None, tpm=None, max_concurrent=2)
    assert limits.reserve(1, "a", 0.0).allowed
    assert limits.reserve(1, "b", 0.0).allowed
    refused = limits.reserve(1, "c", 0.0)
    assert not refused.allowed and refused.reason == "concurrency"
    assert refused.retry_after_s == 1.0
    # Time alone frees nothing.
    assert not limits.reserve(1, "c", 3600.0).allowed
    limits.release("a", 0, 3600.0)
    assert limits.reserve(1, "c", 3600.0).allowed
    assert limits.running == {"b", "c"}
    # Releasing an unknown or already released request is harmless.
    limits.release("a", 0, 3600.0)
    limits.release("never", 0, 3600.0)
    assert limits.running == {"b", "c"}
    assert not limits.reserve(1, "d", 3600.0).allowed


def test_a_concurrency_refusal_waits_a_second_unless_another_limit_waits_longer() -> None:
    limits = KeyLimits(rpm=1, tpm=None, max_concurrent=1)
    assert limits.reserve(1, "a", 0.0).allowed
    refused = limits.reserve(1, "b", 0.0)  # short of both a request and a slot
    assert refused.reason == "requests"
    assert refused.retry_after_s == pytest.approx(60.0)
    slots_only = KeyLimits(rpm=None, tpm=None, max_concurrent=1)
    slots_only.reserve(1, "a", 0.0)
    assert slots_only.reserve(1, "b", 0.0).retry_after_s == 1.0


# --- snapshot ----------------------------------------------------------------------------------


def test_snapshot_reports_limits_remaining_and_time_to_full() -> None:
    limits = KeyLimits(rpm=10, tpm=600, max_concurrent=3)
    decision = limits.reserve(150, "a", 0.0)
    snap = decision.snapshot
    assert snap.limit_requests == 10 and snap.remaining_requests == 9
    assert snap.reset_requests_s == pytest.approx(6.0)  # 1 of 10 per minute
    assert snap.limit_tokens == 600 and snap.remaining_tokens == 450
    assert snap.reset_tokens_s == pytest.approx(15.0)  # 150 of 600 per minute
    later = limits.snapshot()
    assert later == snap
    # 3 s later: requests 9 + 0.5 refilled - 1 taken = 8.5; tokens 450 + 30 refilled.
    snap = limits.reserve(0, "b", 3.0).snapshot
    assert snap.remaining_requests == 8  # whole requests only
    assert snap.reset_requests_s == pytest.approx(9.0)
    assert snap.remaining_tokens == 480
    assert snap.reset_tokens_s == pytest.approx(12.0)


def test_snapshot_has_none_for_limits_the_key_does_not_have() -> None:
    snap = KeyLimits(rpm=None, tpm=None, max_concurrent=4).reserve(5, "a", 0.0).snapshot
    assert snap == QuotaSnapshot()
    rpm_only = KeyLimits(rpm=7, tpm=None, max_concurrent=None).reserve(5, "a", 0.0).snapshot
    assert rpm_only.limit_tokens is None and rpm_only.remaining_tokens is None
    assert rpm_only.remaining_requests == 6


def test_remaining_floors_fractional_levels() -> None:
    limits = KeyLimits(rpm=60, tpm=None, max_concurrent=None)
    for i in range(60):
        limits.reserve(1, str(i), 0.0)
    limits.reserve(1, "x", 1.9)  # level 1.9 → allowed, 0.9 left
    assert limits.snapshot().remaining_requests == 0


# --- the memory store --------------------------------------------------------------------------


async def test_memory_store_keeps_state_per_key_name() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    a, b = Principal("a", rpm=1), Principal("b", rpm=1)
    assert (await store.reserve(a, 1, "1")).allowed
    assert not (await store.reserve(a, 1, "2")).allowed
    assert (await store.reserve(b, 1, "3")).allowed  # another key, its own bucket
    clock.now += 60
    assert (await store.reserve(a, 1, "4")).allowed


async def test_memory_store_restarts_buckets_when_limits_change_but_keeps_running_requests() -> (
    None
):
    clock = Clock()
    store = MemoryStore(clock)
    old = Principal("k", rpm=1, max_concurrent=1)
    assert (await store.reserve(old, 1, "running")).allowed
    new = Principal("k", rpm=5, max_concurrent=1)  # the keys file raised the rpm
    refused = await store.reserve(new, 1, "next")
    assert refused.reason == "concurrency"  # the running request still counts
    assert refused.snapshot.remaining_requests == 5  # a fresh, full bucket at the new limit
    await store.release(new, "running", 0)
    assert (await store.reserve(new, 1, "next")).allowed


async def test_memory_store_refunds_through_release() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    key = Principal("t", tpm=100)
    assert (await store.reserve(key, 100, "a")).allowed
    assert not (await store.reserve(key, 1, "b")).allowed
    await store.release(key, "a", 60)
    decision = await store.reserve(key, 60, "b")
    assert decision.allowed and decision.snapshot.remaining_tokens == 0


# --- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (-3.0, "0ms"),
        (0.0004, "1ms"),
        (0.25, "250ms"),
        (0.999, "999ms"),
        (1.0, "1s"),
        (1.2, "2s"),
        (59.0, "59s"),
        (59.5, "1m0s"),
        (60.0, "1m0s"),
        (61.0, "1m1s"),
        (360.0, "6m0s"),
        (3599.0, "59m59s"),
    ],
)
def test_duration_uses_openai_reset_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text
    assert re.fullmatch(r"\d+ms|\d+s|\d+m\d+s", text)


def test_rate_limit_headers_for_each_limit() -> None:
    both = rate_limit_headers(QuotaSnapshot(3, 2, 20.0, 300, 200, 20.0))
    assert both == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "20s",
        "x-ratelimit-limit-tokens": "300",
        "x-ratelimit-remaining-tokens": "200",
        "x-ratelimit-reset-tokens": "20s",
    }
    requests_only = rate_limit_headers(QuotaSnapshot(3, 0, 60.0))
    assert requests_only == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }
    tokens_only = rate_limit_headers(QuotaSnapshot(limit_tokens=10, remaining_tokens=-4))
    assert tokens_only == {
        "x-ratelimit-limit-tokens": "10",
        "x-ratelimit-remaining-tokens": "0",  # never negative
        "x-ratelimit-reset-tokens": "0ms",
    }
    assert rate_limit_headers(QuotaSnapshot()) == {}
