"""Admission, the async face of QueueState: waiting for a slot, QueueFull, QueueTimeout,
cancellation, idempotent permits, draining, and no leaked slot after a random mix of exits."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

from llmserve.api.headers import error_headers
from llmserve.errors import QueueFull, QueueTimeout
from llmserve.scheduling.admission import Admission, Permit, Ticket
from llmserve.scheduling.queue_state import QueueLimits


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def make(
    *,
    max_in_flight: int = 1,
    max_waiting_requests: int = 100,
    max_waiting_tokens: int = 10_000,
    group_window_s: float = 0.0,
    clock: FakeClock | None = None,
) -> Admission:
    lim = QueueLimits(
        max_waiting_requests=max_waiting_requests,
        max_waiting_tokens=max_waiting_tokens,
        max_in_flight=max_in_flight,
        group_window_s=group_window_s,
    )
    return Admission(lim) if clock is None else Admission(lim, clock=clock)


def ticket(
    request_id: str,
    *,
    tenant: str = "t",
    cost: int = 10,
    timeout_s: float = 5.0,
    priority: int = 0,
) -> Ticket:
    return Ticket(request_id, tenant, cost, 5, timeout_s, priority=priority)


async def settle() -> None:
    """Let every ready callback and task run (no timers)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def now_acquire(adm: Admission, t: Ticket) -> Permit:
    """An acquire that must not wait."""
    return await asyncio.wait_for(adm.acquire(t), timeout=0.5)


def assert_empty(adm: Admission) -> None:
    assert adm.state.running == {}
    assert adm.state.waiting == {}
    assert adm.state.waiting_tokens == 0
    assert adm._waiters == {}


def assert_retry_after(exc: QueueFull | QueueTimeout) -> None:
    assert exc.status == 503
    assert exc.retry_after_s is not None and 1 <= exc.retry_after_s <= 60
    assert error_headers(exc)["Retry-After"] == str(exc.retry_after_s)


# --- room / waiting -------------------------------------------------------------------------------


async def test_acquire_returns_at_once_when_there_is_room() -> None:
    adm = make(max_in_flight=2)
    p1 = await now_acquire(adm, ticket("r1"))
    p2 = await now_acquire(adm, ticket("r2"))
    assert adm.in_flight == 2 and adm.queued == 0
    assert set(adm.state.running) == {"r1", "r2"}
    assert p1.waited_s < 0.5 and p2.waited_s < 0.5
    p1.release()
    p2.release()
    assert_empty(adm)


async def test_waited_s_comes_from_the_injected_clock() -> None:
    clock = FakeClock()
    adm = make(clock=clock)
    first = await now_acquire(adm, ticket("r1"))
    assert first.waited_s == 0.0
    waiting = asyncio.create_task(adm.acquire(ticket("r2", timeout_s=60)))
    await settle()
    clock.now += 2.5
    first.release()
    second = await asyncio.wait_for(waiting, 0.5)
    assert second.waited_s == pytest.approx(2.5)
    second.release()
    assert_empty(adm)


async def test_one_more_than_max_in_flight_waits_until_a_release() -> None:
    adm = make(max_in_flight=2)
    held = [await now_acquire(adm, ticket(f"r{i}")) for i in range(2)]
    third = asyncio.create_task(adm.acquire(ticket("r2")))
    await asyncio.sleep(0.02)
    assert not third.done()
    assert adm.queued == 1 and adm.in_flight == 2
    assert list(adm.state.waiting) == ["r2"]

    held[0].release()
    permit = await asyncio.wait_for(third, 0.5)
    assert adm.in_flight == 2 and adm.queued == 0
    assert set(adm.state.running) == {"r1", "r2"}
    permit.release()
    held[1].release()
    assert_empty(adm)


async def test_waiters_are_served_in_fifo_order_within_a_tenant() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("first"))
    served: list[str] = []

    async def client(rid: str) -> None:
        with await adm.acquire(ticket(rid)):
            served.append(rid)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(client(f"w{i}")) for i in range(5)]
    await settle()
    held.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
    assert served == [f"w{i}" for i in range(5)]
    assert_empty(adm)


async def test_better_priority_waiter_gets_the_freed_slot_first() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("first"))
    low = asyncio.create_task(adm.acquire(ticket("low", priority=1)))
    await settle()
    high = asyncio.create_task(adm.acquire(ticket("high", priority=0)))
    await settle()
    held.release()
    permit = await asyncio.wait_for(high, 0.5)
    assert not low.done()
    permit.release()
    (await asyncio.wait_for(low, 0.5)).release()
    assert_empty(adm)


async def test_grouping_window_holds_a_lone_request_and_the_timer_releases_it() -> None:
    adm = make(max_in_flight=4, group_window_s=0.05)
    start = time.monotonic()
    permit = await asyncio.wait_for(adm.acquire(ticket("r1")), 1.0)
    assert time.monotonic() - start >= 0.045
    assert permit.waited_s >= 0.045
    permit.release()
    assert_empty(adm)


async def test_grouping_window_does_not_delay_a_group_that_fills_the_slots() -> None:
    adm = make(max_in_flight=2, group_window_s=5.0)
    tasks = [asyncio.create_task(adm.acquire(ticket(f"r{i}"))) for i in range(2)]
    permits = await asyncio.wait_for(asyncio.gather(*tasks), 0.5)
    for p in permits:
        p.release()
    assert_empty(adm)


# --- QueueFull ------------------------------------------------------------------------------------


async def test_queue_full_is_raised_at_once_with_retry_after() -> None:
    adm = make(max_in_flight=1, max_waiting_requests=1)
    held = await now_acquire(adm, ticket("run"))
    waiting = asyncio.create_task(adm.acquire(ticket("wait")))
    await settle()
    with pytest.raises(QueueFull) as info:
        await asyncio.wait_for(adm.acquire(ticket("extra")), 0.5)
    exc = info.value
    assert exc.code == "queue_full"
    assert_retry_after(exc)
    assert exc.retry_after_s == 5  # something waits and no drain rate is known yet
    assert list(adm.state.waiting) == ["wait"]  # the rejected one left no trace
    assert "extra" not in adm._waiters

    held.release()
    (await asyncio.wait_for(waiting, 0.5)).release()
    assert_empty(adm)


async def test_queue_full_on_waiting_tokens() -> None:
    adm = make(max_in_flight=1, max_waiting_tokens=100)
    held = await now_acquire(adm, ticket("run", cost=500))  # running tokens do not count
    waiting = asyncio.create_task(adm.acquire(ticket("wait", cost=90)))
    await settle()
    with pytest.raises(QueueFull) as info:
        await adm.acquire(ticket("extra", cost=11))
    assert info.value.code == "queue_tokens_full"
    assert_retry_after(info.value)
    assert adm.state.waiting_tokens == 90
    held.release()
    (await asyncio.wait_for(waiting, 0.5)).release()
    assert_empty(adm)


async def test_draining_refuses_new_requests_but_serves_the_waiting_ones() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("run"))
    waiting = asyncio.create_task(adm.acquire(ticket("wait")))
    await settle()
    adm.draining = True
    with pytest.raises(QueueFull) as info:
        await adm.acquire(ticket("new"))
    assert info.value.code == "draining"
    assert info.value.retry_after_s == 5
    assert list(adm.state.waiting) == ["wait"]
    held.release()
    (await asyncio.wait_for(waiting, 0.5)).release()
    assert_empty(adm)


async def test_draining_refuses_even_an_idle_admission() -> None:
    adm = make(max_in_flight=8)
    adm.draining = True
    with pytest.raises(QueueFull) as info:
        await adm.acquire(ticket("new"))
    assert info.value.code == "draining"
    assert_empty(adm)


async def test_zero_waiting_room_admits_while_slots_are_free() -> None:
    adm = make(max_in_flight=2, max_waiting_requests=0)
    p1 = await now_acquire(adm, ticket("r1"))
    p2 = await now_acquire(adm, ticket("r2"))
    with pytest.raises(QueueFull) as info:
        await adm.acquire(ticket("r3"))
    assert info.value.code == "queue_full"
    assert adm.queued == 0
    p1.release()
    (await now_acquire(adm, ticket("r4"))).release()
    p2.release()
    assert_empty(adm)


# --- QueueTimeout ---------------------------------------------------------------------------------


async def test_queue_timeout_when_the_wait_outlasts_the_ticket() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("run"))
    start = time.monotonic()
    with pytest.raises(QueueTimeout) as info:
        await asyncio.wait_for(adm.acquire(ticket("slow", timeout_s=0.05)), 1.0)
    elapsed = time.monotonic() - start
    assert 0.045 <= elapsed < 0.5
    assert info.value.code == "queue_timeout"
    assert_retry_after(info.value)
    assert adm.state.waiting == {} and adm.state.waiting_tokens == 0
    assert set(adm.state.running) == {"run"}
    held.release()
    assert_empty(adm)


async def test_one_waiter_timing_out_does_not_disturb_the_next() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("run"))
    short = asyncio.create_task(adm.acquire(ticket("short", timeout_s=0.03)))
    long = asyncio.create_task(adm.acquire(ticket("long", timeout_s=5.0)))
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(short, 1.0)
    assert list(adm.state.waiting) == ["long"]
    held.release()
    (await asyncio.wait_for(long, 0.5)).release()
    assert_empty(adm)


async def test_waiter_past_its_deadline_when_a_slot_frees_times_out_and_the_next_gets_it() -> None:
    clock = FakeClock()
    adm = make(clock=clock)
    held = await now_acquire(adm, ticket("run"))
    late = asyncio.create_task(adm.acquire(ticket("late", timeout_s=10)))
    ontime = asyncio.create_task(adm.acquire(ticket("ontime", timeout_s=100)))
    await settle()
    clock.now += 11  # past late's deadline (by the injected clock), not ontime's
    held.release()
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(late, 0.5)
    permit = await asyncio.wait_for(ontime, 0.5)
    assert set(adm.state.running) == {"ontime"}
    permit.release()
    assert_empty(adm)


# --- cancellation ---------------------------------------------------------------------------------


async def test_cancelling_a_waiting_acquire_takes_it_out_of_the_queue() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("run"))
    gone = asyncio.create_task(adm.acquire(ticket("gone", cost=77)))
    nxt = asyncio.create_task(adm.acquire(ticket("next", cost=5)))
    await settle()
    assert adm.state.waiting_tokens == 82

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert list(adm.state.waiting) == ["next"]
    assert adm.state.waiting_tokens == 5
    assert "gone" not in adm._waiters

    held.release()
    permit = await asyncio.wait_for(nxt, 0.5)
    assert set(adm.state.running) == {"next"}
    permit.release()
    assert_empty(adm)


async def test_cancelled_waiter_leaves_the_queue_empty() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("run"))
    gone = asyncio.create_task(adm.acquire(ticket("gone")))
    await settle()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert adm.state.waiting == {} and adm.state.waiting_tokens == 0
    held.release()
    assert_empty(adm)


async def test_admitted_in_the_same_instant_it_was_cancelled_gives_the_slot_back() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("run"))
    picked = asyncio.create_task(adm.acquire(ticket("picked")))
    nxt = asyncio.create_task(adm.acquire(ticket("next")))
    await settle()
    held.release()  # "picked" is granted the slot...
    picked.cancel()  # ...and cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await picked
    permit = await asyncio.wait_for(nxt, 0.5)
    assert set(adm.state.running) == {"next"}
    permit.release()
    assert_empty(adm)


async def test_cancelled_then_released_in_the_same_instant_next_waiter_gets_the_slot() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("run"))
    gone = asyncio.create_task(adm.acquire(ticket("gone")))
    nxt = asyncio.create_task(adm.acquire(ticket("next", timeout_s=0.3)))
    await settle()
    gone.cancel()  # the cancellation is pending...
    held.release()  # ...when the slot frees
    with pytest.raises(asyncio.CancelledError):
        await gone
    permit = await asyncio.wait_for(nxt, 1.0)
    permit.release()
    assert_empty(adm)


# --- permits --------------------------------------------------------------------------------------


async def test_permit_release_is_idempotent() -> None:
    adm = make()
    held = await now_acquire(adm, ticket("run"))
    w1 = asyncio.create_task(adm.acquire(ticket("w1")))
    w2 = asyncio.create_task(adm.acquire(ticket("w2")))
    await settle()
    held.release()
    held.release()
    held.release()
    await settle()
    assert w1.done() and not w2.done()  # only one slot was freed
    assert adm.in_flight == 1 and adm.queued == 1
    p1 = w1.result()
    with p1:
        pass
    p1.release()  # after __exit__: still a no-op
    p2 = await asyncio.wait_for(w2, 0.5)
    assert adm.in_flight == 1
    p2.release()
    assert_empty(adm)


async def test_permit_as_context_manager_releases_on_error() -> None:
    adm = make()
    permit = await now_acquire(adm, ticket("r1"))
    with pytest.raises(RuntimeError, match="boom"), permit:
        assert adm.in_flight == 1
        raise RuntimeError("boom")
    assert_empty(adm)


# --- no leaked slot after a random mix of exits ---------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_random_mix_of_exits_leaks_no_slot(seed: int) -> None:
    rng = random.Random(seed)
    max_in_flight = 3
    adm = make(max_in_flight=max_in_flight, max_waiting_requests=15, max_waiting_tokens=400)
    outcomes: Counter[str] = Counter()
    peak = 0

    async def client(i: int) -> None:
        nonlocal peak
        await asyncio.sleep(rng.uniform(0, 0.05))
        t = ticket(
            f"r{i}",
            tenant=rng.choice("abc"),
            cost=rng.randint(1, 60),
            timeout_s=rng.choice([0.01, 0.05, 1.0, 1.0]),
            priority=rng.choice([0, 0, 1]),
        )
        hold = rng.uniform(0, 0.04)
        try:
            permit = await adm.acquire(t)
        except QueueFull:
            outcomes["full"] += 1
            return
        except QueueTimeout:
            outcomes["timeout"] += 1
            return
        except asyncio.CancelledError:
            outcomes["cancelled_waiting"] += 1
            raise
        with permit:
            peak = max(peak, adm.in_flight)
            assert adm.in_flight <= max_in_flight
            try:
                await asyncio.sleep(hold)
            except asyncio.CancelledError:
                outcomes["cancelled_running"] += 1
                raise
        outcomes["completed"] += 1

    tasks = {f"r{i}": asyncio.create_task(client(i)) for i in range(60)}

    async def canceller() -> None:
        """Cancels some waiting and some running clients, now and then both in one loop turn."""
        budget = {"waiting": 8, "running": 5}
        while not all(t.done() for t in tasks.values()):
            await asyncio.sleep(rng.uniform(0.002, 0.008))
            for where, ids in (("waiting", adm.state.waiting), ("running", adm.state.running)):
                if ids and budget[where] > 0 and rng.random() < 0.5:
                    budget[where] -= 1
                    tasks[rng.choice(sorted(ids))].cancel()

    await asyncio.wait_for(canceller(), 5.0)
    await asyncio.gather(*tasks.values(), return_exceptions=True)

    assert sum(outcomes.values()) == len(tasks)
    # the mix really was mixed
    assert outcomes["completed"] > 0 and outcomes["full"] > 0 and outcomes["timeout"] > 0
    assert outcomes["cancelled_waiting"] + outcomes["cancelled_running"] > 0
    assert peak == max_in_flight
    assert_empty(adm)
    # and the admission still works afterwards
    (await now_acquire(adm, ticket("after"))).release()
    assert_empty(adm)
