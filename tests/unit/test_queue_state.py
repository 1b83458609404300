"""QueueState on its own: bounds, dispatch order (priority, fair queueing), deadlines, removal,
drain rate and grouping. Synchronous: the clock is the ``now`` passed in."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.scheduling.queue_state import Entry, QueueLimits, QueueState, Rejected

INF = math.inf


def limits(
    *,
    max_waiting_requests: int = 1_000,
    max_waiting_tokens: int = 1_000_000,
    max_in_flight: int = 1,
    group_window_s: float = 0.0,
    group_buckets: tuple[int, ...] = (),
) -> QueueLimits:
    return QueueLimits(
        max_waiting_requests=max_waiting_requests,
        max_waiting_tokens=max_waiting_tokens,
        max_in_flight=max_in_flight,
        group_window_s=group_window_s,
        group_buckets=group_buckets,
    )


def entry(
    id: str,
    *,
    tenant: str = "a",
    cost: int = 10,
    prompt_tokens: int = 5,
    at: float = 0.0,
    deadline: float = INF,
    weight: float = 1.0,
    priority: int = 0,
) -> Entry:
    return Entry(id, tenant, cost, prompt_tokens, at, deadline, weight, priority)


def offer_ok(state: QueueState, e: Entry, now: float = 0.0) -> None:
    assert state.offer(e, now) is None, f"{e.id} was rejected"


def dispatch_one_at_a_time(state: QueueState, count: int, now: float = 0.0) -> list[Entry]:
    """Pop, finish, pop, finish...: the dispatch order of ``count`` entries through one slot."""
    order: list[Entry] = []
    for _ in range(count):
        popped = state.pop_ready(now)
        assert len(popped) == 1
        order.append(popped[0])
        state.finish(popped[0].id, now)
    return order


def ids(entries: Iterable[Entry]) -> list[str]:
    return [e.id for e in entries]


def complete_at(state: QueueState, times: Iterable[float]) -> None:
    """Run one entry through the queue to completion at each of ``times`` (queue left empty)."""
    for i, t in enumerate(times):
        offer_ok(state, entry(f"done-{t}-{i}", cost=1, at=t), t)
        assert len(state.pop_ready(t)) == 1
        state.finish(f"done-{t}-{i}", t)


# --- admission up to max_in_flight ----------------------------------------------------------------


def test_offer_queues_the_entry_and_counts_its_tokens() -> None:
    state = QueueState(limits())
    offer_ok(state, entry("r1", cost=7))
    offer_ok(state, entry("r2", cost=5))
    assert list(state.waiting) == ["r1", "r2"]
    assert state.waiting_tokens == 12
    assert state.running == {}


def test_pop_ready_on_an_empty_queue_dispatches_nothing() -> None:
    state = QueueState(limits(max_in_flight=4))
    assert state.pop_ready(0.0) == []
    assert state.running == {}


def test_entries_run_up_to_max_in_flight_then_wait() -> None:
    state = QueueState(limits(max_in_flight=2))
    for i in range(5):
        offer_ok(state, entry(f"r{i}", cost=10))

    first = state.pop_ready(0.0)
    assert ids(first) == ["r0", "r1"]
    assert set(state.running) == {"r0", "r1"}
    assert list(state.waiting) == ["r2", "r3", "r4"]
    assert state.waiting_tokens == 30

    assert state.pop_ready(0.0) == []  # full: nothing more runs
    assert len(state.running) == 2

    state.finish("r0", 1.0)
    assert ids(state.pop_ready(1.0)) == ["r2"]
    assert set(state.running) == {"r1", "r2"}
    assert state.waiting_tokens == 20


def test_pop_ready_dispatches_all_waiting_when_there_is_room() -> None:
    state = QueueState(limits(max_in_flight=10))
    for i in range(3):
        offer_ok(state, entry(f"r{i}"))
    assert ids(state.pop_ready(0.0)) == ["r0", "r1", "r2"]
    assert state.waiting == {}
    assert state.waiting_tokens == 0


# --- bounds of the waiting room -------------------------------------------------------------------


def test_waiting_request_bound_rejects_with_queue_full() -> None:
    state = QueueState(limits(max_waiting_requests=3, max_in_flight=1))
    for i in range(3):
        offer_ok(state, entry(f"r{i}"))
    rejected = state.offer(entry("r3"), 0.0)
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "queue_full"
    assert 1 <= rejected.retry_after_s <= 60
    assert "r3" not in state.waiting
    assert state.waiting_tokens == 30


def test_request_bound_counts_only_waiting_entries_not_running_ones() -> None:
    state = QueueState(limits(max_waiting_requests=1, max_in_flight=2))
    offer_ok(state, entry("r0"))
    assert len(state.pop_ready(0.0)) == 1  # r0 runs, the waiting room is empty again
    offer_ok(state, entry("r1"))
    rejected = state.offer(entry("r2"), 0.0)
    assert isinstance(rejected, Rejected) and rejected.reason == "queue_full"


def test_waiting_token_bound_rejects_with_queue_tokens_full() -> None:
    state = QueueState(limits(max_waiting_tokens=100))
    offer_ok(state, entry("r0", cost=60))
    offer_ok(state, entry("r1", cost=40))  # exactly at the bound: accepted
    assert state.waiting_tokens == 100
    rejected = state.offer(entry("r2", cost=1), 0.0)
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "queue_tokens_full"
    assert 1 <= rejected.retry_after_s <= 60
    assert state.waiting_tokens == 100
    assert "r2" not in state.waiting


def test_request_bound_is_checked_before_token_bound() -> None:
    state = QueueState(limits(max_waiting_requests=1, max_waiting_tokens=10))
    offer_ok(state, entry("r0", cost=10))
    rejected = state.offer(entry("r1", cost=50), 0.0)
    assert isinstance(rejected, Rejected) and rejected.reason == "queue_full"


def test_entry_bigger_than_token_bound_is_accepted_into_an_empty_waiting_room() -> None:
    """Otherwise a request above max_waiting_tokens could never be served."""
    state = QueueState(limits(max_waiting_tokens=100, max_in_flight=1))
    offer_ok(state, entry("big", cost=500))
    assert state.waiting_tokens == 500
    # ...but while it waits nothing else fits, not even a small one.
    rejected = state.offer(entry("small", cost=1), 0.0)
    assert isinstance(rejected, Rejected) and rejected.reason == "queue_tokens_full"
    # Once it runs the waiting room is empty, and the next big one is accepted too.
    assert ids(state.pop_ready(0.0)) == ["big"]
    offer_ok(state, entry("big2", cost=500))
    assert list(state.waiting) == ["big2"]


def test_entry_bigger_than_token_bound_is_rejected_when_others_wait() -> None:
    state = QueueState(limits(max_waiting_tokens=100))
    offer_ok(state, entry("small", cost=1))
    rejected = state.offer(entry("big", cost=500), 0.0)
    assert isinstance(rejected, Rejected) and rejected.reason == "queue_tokens_full"
    assert state.waiting_tokens == 1


def test_zero_waiting_room_still_admits_into_free_slots() -> None:
    """max_waiting_requests=0 means 'never wait', not 'never run'."""
    state = QueueState(limits(max_waiting_requests=0, max_in_flight=2))
    assert state.offer(entry("r0"), 0.0) is None
    assert state.offer(entry("r1"), 0.0) is None
    assert ids(state.pop_ready(0.0)) == ["r0", "r1"]
    rejected = state.offer(entry("r2"), 0.0)  # both slots busy: it would have to wait
    assert isinstance(rejected, Rejected) and rejected.reason == "queue_full"


def test_waiting_bounds_apply_only_to_entries_that_will_really_wait() -> None:
    state = QueueState(limits(max_waiting_requests=1, max_waiting_tokens=10, max_in_flight=3))
    for i in range(3):  # each fits a free slot: taken whatever the bounds
        offer_ok(state, entry(f"r{i}", cost=50))
    assert state.waiting_tokens == 150
    rejected = state.offer(entry("r3", cost=1), 0.0)
    assert isinstance(rejected, Rejected) and rejected.reason == "queue_full"
    assert ids(state.pop_ready(0.0)) == ["r0", "r1", "r2"]
    offer_ok(state, entry("w0", cost=50))  # alone in the waiting room: accepted though big
    rejected = state.offer(entry("w1", cost=1), 0.0)
    assert isinstance(rejected, Rejected) and rejected.reason == "queue_full"


def test_rejected_offer_leaves_no_trace_in_fairness_accounting() -> None:
    """A tenant turned away many times is not pushed back in line for it."""
    state = QueueState(limits(max_waiting_requests=2, max_in_flight=1))
    offer_ok(state, entry("b0", tenant="b"))  # tag 10
    offer_ok(state, entry("b1", tenant="b"))  # tag 20
    for i in range(20):
        rejected = state.offer(entry(f"a-rej{i}", tenant="a", cost=1_000), 0.0)
        assert isinstance(rejected, Rejected)
    assert ids(dispatch_one_at_a_time(state, 1)) == ["b0"]
    offer_ok(state, entry("a0", tenant="a"))  # tag 10 if the rejections left no trace
    assert ids(dispatch_one_at_a_time(state, 2)) == ["a0", "b1"]


# --- order: FIFO, priority, fair queueing ---------------------------------------------------------


def test_fifo_within_one_tenant_whatever_the_costs() -> None:
    state = QueueState(limits(max_in_flight=1))
    costs = [50, 1, 300, 7, 7, 120, 2]
    for i, cost in enumerate(costs):
        offer_ok(state, entry(f"r{i}", cost=cost))
    assert ids(dispatch_one_at_a_time(state, len(costs))) == [f"r{i}" for i in range(len(costs))]


def test_lower_priority_number_goes_first_regardless_of_arrival() -> None:
    state = QueueState(limits(max_in_flight=1))
    offer_ok(state, entry("p2", priority=2))
    offer_ok(state, entry("p1", priority=1))
    offer_ok(state, entry("p0-late", priority=0, tenant="z"))
    offer_ok(state, entry("p1b", priority=1))
    order = ids(dispatch_one_at_a_time(state, 4))
    assert order == ["p0-late", "p1", "p1b", "p2"]


def test_priority_beats_fair_share() -> None:
    """A flooding tenant in a better priority class is served entirely before a lower class."""
    state = QueueState(limits(max_in_flight=1))
    offer_ok(state, entry("low", tenant="b", priority=1, cost=1))
    for i in range(10):
        offer_ok(state, entry(f"hi{i}", tenant="a", priority=0, cost=100))
    order = ids(dispatch_one_at_a_time(state, 11))
    assert order == [f"hi{i}" for i in range(10)] + ["low"]


def test_equal_tags_across_tenants_break_ties_by_arrival() -> None:
    state = QueueState(limits(max_in_flight=1))
    offer_ok(state, entry("b0", tenant="b"))
    offer_ok(state, entry("a0", tenant="a"))
    offer_ok(state, entry("c0", tenant="c"))
    assert ids(dispatch_one_at_a_time(state, 3)) == ["b0", "a0", "c0"]


def test_flooding_tenant_does_not_starve_a_later_one() -> None:
    state = QueueState(limits(max_in_flight=1))
    for i in range(50):
        offer_ok(state, entry(f"a{i}", tenant="a"))
    offer_ok(state, entry("b0", tenant="b"))
    order = ids(dispatch_one_at_a_time(state, 51))
    assert order.index("b0") <= 1
    # and a's own requests stay in their order
    assert [x for x in order if x != "b0"] == [f"a{i}" for i in range(50)]


def test_flooding_tenant_already_running_does_not_starve_a_later_one() -> None:
    state = QueueState(limits(max_in_flight=2))
    for i in range(50):
        offer_ok(state, entry(f"a{i}", tenant="a"))
    assert ids(state.pop_ready(0.0)) == ["a0", "a1"]
    offer_ok(state, entry("b0", tenant="b"))
    state.finish("a0", 1.0)
    assert ids(state.pop_ready(1.0)) == ["b0"]


def test_late_tenant_gets_its_share_not_a_burst_of_catch_up() -> None:
    """A tenant arriving late starts at the current virtual time: it is interleaved, not served
    back to back to make up for the time it was absent."""
    state = QueueState(limits(max_in_flight=1))
    for i in range(10):
        offer_ok(state, entry(f"a{i}", tenant="a"))
    dispatch_one_at_a_time(state, 5)
    for i in range(5):
        offer_ok(state, entry(f"b{i}", tenant="b"))
    nxt = [e.tenant for e in dispatch_one_at_a_time(state, 6)]
    assert Counter(nxt) == {"a": 3, "b": 3}
    assert "bb" not in "".join(nxt) and "aa" not in "".join(nxt)


def test_weights_two_to_one_give_dispatch_shares_two_to_one() -> None:
    state = QueueState(limits(max_in_flight=1))
    for i in range(400):
        offer_ok(state, entry(f"a{i}", tenant="a", weight=2.0))
        offer_ok(state, entry(f"b{i}", tenant="b", weight=1.0))
    counts = Counter(e.tenant for e in dispatch_one_at_a_time(state, 300))
    assert counts["a"] + counts["b"] == 300
    assert counts["a"] / counts["b"] == pytest.approx(2.0, rel=0.03)
    # and over any short window too, b is never shut out
    window = [e.tenant for e in dispatch_one_at_a_time(state, 9)]
    assert Counter(window) == {"a": 6, "b": 3}


def test_three_equal_tenants_share_equally() -> None:
    state = QueueState(limits(max_in_flight=1))
    for i in range(30):
        for t in "abc":
            offer_ok(state, entry(f"{t}{i}", tenant=t))
    counts = Counter(e.tenant for e in dispatch_one_at_a_time(state, 30))
    assert counts == {"a": 10, "b": 10, "c": 10}


def test_fairness_is_over_tokens_not_requests() -> None:
    """A tenant whose requests cost 10x as much gets about a tenth as many dispatches."""
    state = QueueState(limits(max_in_flight=1))
    for i in range(100):
        offer_ok(state, entry(f"big{i}", tenant="big", cost=100))
        offer_ok(state, entry(f"small{i}", tenant="small", cost=10))
    served = dispatch_one_at_a_time(state, 55)
    counts = Counter(e.tenant for e in served)
    assert counts["small"] > 5 * counts["big"]
    tokens = Counter[str]()
    for e in served:
        tokens[e.tenant] += e.cost
    # token shares within one big request of each other
    assert abs(tokens["big"] - tokens["small"]) <= 100


def test_idle_queue_forgets_a_past_burst() -> None:
    """Once the waiting room empties, a tenant that flooded earlier is not behind a newcomer."""
    state = QueueState(limits(max_in_flight=1))
    for i in range(50):
        offer_ok(state, entry(f"a{i}", tenant="a"))
    dispatch_one_at_a_time(state, 50)
    assert state.waiting == {}
    offer_ok(state, entry("a-new", tenant="a"))
    offer_ok(state, entry("b-new", tenant="b"))
    assert ids(dispatch_one_at_a_time(state, 2)) == ["a-new", "b-new"]


# --- deadlines ------------------------------------------------------------------------------------


def test_expired_removes_exactly_the_late_entries() -> None:
    state = QueueState(limits(max_in_flight=1))
    offer_ok(state, entry("run", deadline=1.0, cost=1))
    assert ids(state.pop_ready(0.0)) == ["run"]  # running: never expired
    offer_ok(state, entry("late1", deadline=1.0, cost=3))
    offer_ok(state, entry("ok1", deadline=5.0, cost=5))
    offer_ok(state, entry("late2", deadline=2.0, cost=7))  # deadline == now: late
    offer_ok(state, entry("ok2", deadline=INF, cost=11))

    late = state.expired(2.0)
    assert sorted(ids(late)) == ["late1", "late2"]
    assert list(state.waiting) == ["ok1", "ok2"]
    assert state.waiting_tokens == 16
    assert "run" in state.running
    assert state.expired(2.0) == []  # nothing left to expire at that time


def test_expired_on_empty_queue_returns_nothing() -> None:
    assert QueueState(limits()).expired(100.0) == []


def test_next_deadline_is_the_earliest_waiting_deadline() -> None:
    state = QueueState(limits(max_in_flight=1))
    assert state.next_deadline() is None
    offer_ok(state, entry("run", deadline=0.5))
    state.pop_ready(0.0)
    assert state.next_deadline() is None  # running entries have no queue deadline
    offer_ok(state, entry("x", deadline=9.0))
    offer_ok(state, entry("y", deadline=3.0))
    offer_ok(state, entry("z", deadline=6.0))
    assert state.next_deadline() == 3.0
    state.expired(3.0)
    assert state.next_deadline() == 6.0
    state.remove("z")
    assert state.next_deadline() == 9.0


# --- remove and finish ----------------------------------------------------------------------------


def test_remove_releases_exactly_the_entry_tokens() -> None:
    state = QueueState(limits(max_in_flight=1))
    for i, cost in enumerate([13, 29, 7]):
        offer_ok(state, entry(f"r{i}", cost=cost))
    before = state.waiting_tokens
    offer_ok(state, entry("gone", cost=12345))
    assert state.waiting_tokens == before + 12345
    removed = state.remove("gone")
    assert removed is not None and removed.id == "gone" and removed.cost == 12345
    assert state.waiting_tokens == before
    assert list(state.waiting) == ["r0", "r1", "r2"]
    # removed entries are never dispatched
    assert "gone" not in ids(dispatch_one_at_a_time(state, 3))


def test_remove_unknown_or_running_id_is_a_no_op() -> None:
    state = QueueState(limits(max_in_flight=1))
    offer_ok(state, entry("run", cost=5))
    state.pop_ready(0.0)
    offer_ok(state, entry("wait", cost=8))
    assert state.remove("nope") is None
    assert state.remove("run") is None
    assert set(state.running) == {"run"}
    assert list(state.waiting) == ["wait"]
    assert state.waiting_tokens == 8
    assert state.remove("wait") is not None
    assert state.remove("wait") is None  # twice: the second is a no-op
    assert state.waiting_tokens == 0


def test_finish_frees_a_slot_exactly_once() -> None:
    state = QueueState(limits(max_in_flight=1))
    for i in range(3):
        offer_ok(state, entry(f"r{i}"))
    assert ids(state.pop_ready(0.0)) == ["r0"]
    state.finish("r0", 1.0)
    state.finish("r0", 1.0)  # double finish
    assert ids(state.pop_ready(1.0)) == ["r1"]
    assert state.pop_ready(1.0) == []  # the double finish did not free a second slot
    assert len(state.running) == 1


def test_finish_of_unknown_or_waiting_id_changes_nothing() -> None:
    state = QueueState(limits(max_in_flight=1))
    offer_ok(state, entry("run"))
    state.pop_ready(0.0)
    offer_ok(state, entry("wait"))
    state.finish("nope", 1.0)
    state.finish("wait", 2.0)
    assert set(state.running) == {"run"}
    assert list(state.waiting) == ["wait"]
    assert state.drain_rate(3.0) == 0.0  # no-op finishes are not counted as completions


# --- drain rate and retry_after -------------------------------------------------------------------


def test_drain_rate_needs_two_recent_finishes() -> None:
    state = QueueState(limits())
    assert state.drain_rate(10.0) == 0.0
    complete_at(state, [5.0])
    assert state.drain_rate(10.0) == 0.0
    complete_at(state, [6.0])
    assert state.drain_rate(10.0) > 0.0


def test_drain_rate_counts_finishes_per_second() -> None:
    state = QueueState(limits())
    complete_at(state, [float(t) for t in range(10)])  # one a second for 10 s
    assert state.drain_rate(10.0) == pytest.approx(1.0)
    fast = QueueState(limits())
    complete_at(fast, [t / 10 for t in range(10)])  # ten a second
    assert fast.drain_rate(1.0) == pytest.approx(10.0)


def test_drain_rate_forgets_finishes_older_than_a_minute() -> None:
    state = QueueState(limits())
    complete_at(state, [0.0, 1.0, 2.0])
    assert state.drain_rate(30.0) > 0.0
    assert state.drain_rate(62.5) == 0.0


def test_retry_after_without_a_rate() -> None:
    state = QueueState(limits(max_in_flight=1))
    assert state.retry_after(0.0) == 1  # nothing waits
    offer_ok(state, entry("r0"))
    assert state.retry_after(0.0) == 5  # something waits, drain unknown


def _with_rate(per_second: float, waiting: int, lim: QueueLimits | None = None) -> QueueState:
    """20 completions at ``per_second``, ending at 100 + 20 / per_second; then ``waiting`` wait."""
    state = QueueState(lim or limits(max_in_flight=1))
    complete_at(state, [100.0 + i / per_second for i in range(20)])
    end = 100.0 + 20 / per_second
    for i in range(waiting):
        offer_ok(state, entry(f"w{i}", at=end), end)
    return state


def test_retry_after_shrinks_as_drain_rate_grows() -> None:
    values = []
    for rate in (0.5, 1.0, 2.0, 5.0, 20.0):
        state = _with_rate(rate, waiting=19)
        now = 100.0 + 20 / rate
        assert state.drain_rate(now) == pytest.approx(rate)
        values.append(state.retry_after(now))
    # ceil((19 + 1) / rate) clamped to 1..60
    assert values == [40, 20, 10, 4, 1]


def test_retry_after_is_clamped_to_one_minute() -> None:
    state = _with_rate(0.4, waiting=100)
    now = 150.0
    assert state.drain_rate(now) == pytest.approx(0.4)
    assert state.retry_after(now) == 60


def test_rejection_carries_the_measured_retry_after() -> None:
    state = _with_rate(2.0, waiting=9, lim=limits(max_waiting_requests=9, max_in_flight=1))
    now = 110.0
    rejected = state.offer(entry("x", at=now), now)
    assert isinstance(rejected, Rejected) and rejected.reason == "queue_full"
    assert rejected.retry_after_s == state.retry_after(now) == 5


# --- grouping -------------------------------------------------------------------------------------


def test_grouping_holds_entries_back_until_the_window_passes() -> None:
    state = QueueState(limits(max_in_flight=4, group_window_s=1.0))
    offer_ok(state, entry("r0", at=0.0), 0.0)
    offer_ok(state, entry("r1", at=0.3), 0.3)
    assert state.pop_ready(0.3) == []
    assert state.pop_ready(0.999) == []
    assert state.next_wakeup() == 1.0  # oldest + window
    assert ids(state.pop_ready(1.0)) == ["r0", "r1"]
    assert state.next_wakeup() is None


def test_grouping_dispatches_at_once_when_waiting_entries_fill_the_free_slots() -> None:
    state = QueueState(limits(max_in_flight=3, group_window_s=1.0))
    for i in range(3):
        offer_ok(state, entry(f"r{i}", at=0.0))
    assert ids(state.pop_ready(0.0)) == ["r0", "r1", "r2"]
    # one slot frees: one waiting entry already fills it, no need to wait
    offer_ok(state, entry("r3", at=0.1), 0.1)
    assert state.pop_ready(0.1) == []  # still full
    state.finish("r0", 0.2)
    assert ids(state.pop_ready(0.2)) == ["r3"]


def test_next_wakeup_is_oldest_waiting_plus_window() -> None:
    assert QueueState(limits()).next_wakeup() is None  # grouping off
    state = QueueState(limits(max_in_flight=8, group_window_s=0.5))
    assert state.next_wakeup() is None  # nothing waits
    offer_ok(state, entry("r0", at=2.0), 2.0)
    offer_ok(state, entry("r1", at=1.0), 2.0)
    offer_ok(state, entry("r2", at=3.0), 3.0)
    assert state.next_wakeup() == 1.5
    state.remove("r1")
    assert state.next_wakeup() == 2.5


def test_no_wakeup_when_grouping_is_off_even_with_waiting_entries() -> None:
    state = QueueState(limits(max_in_flight=1))
    offer_ok(state, entry("r0"))
    offer_ok(state, entry("r1"))
    state.pop_ready(0.0)
    assert state.next_wakeup() is None


def test_after_the_window_free_slots_go_to_the_head_bucket_first() -> None:
    state = QueueState(limits(max_in_flight=2, group_window_s=1.0, group_buckets=(128, 512)))
    offer_ok(state, entry("short1", prompt_tokens=50, at=0.0), 0.0)
    offer_ok(state, entry("long", prompt_tokens=600, at=0.1), 0.1)
    offer_ok(state, entry("mid", prompt_tokens=200, at=0.2), 0.2)
    offer_ok(state, entry("short2", prompt_tokens=60, at=0.3), 0.3)
    assert ids(state.pop_ready(1.0)) == ["short1", "short2"]
    assert list(state.waiting) == ["long", "mid"]


def test_grouping_fills_remaining_slots_from_other_buckets_in_order() -> None:
    state = QueueState(limits(max_in_flight=3, group_window_s=1.0, group_buckets=(128, 512)))
    offer_ok(state, entry("short1", prompt_tokens=50, at=0.0), 0.0)
    offer_ok(state, entry("long", prompt_tokens=600, at=0.1), 0.1)
    assert state.pop_ready(0.5) == []
    offer_ok(state, entry("mid", prompt_tokens=200, at=0.2), 0.2)
    offer_ok(state, entry("short2", prompt_tokens=60, at=0.3), 0.3)
    # 4 waiting >= 3 free: dispatched at once, head bucket first, then the others in order
    assert ids(state.pop_ready(0.5)) == ["short1", "short2", "long"]


def test_bucket_edges_are_lower_inclusive() -> None:
    """Edges (128,) give buckets <128 and >=128: a 128-token head groups with a 200."""
    state = QueueState(limits(max_in_flight=2, group_window_s=1.0, group_buckets=(128,)))
    offer_ok(state, entry("edge", prompt_tokens=128, at=0.0), 0.0)
    offer_ok(state, entry("below", prompt_tokens=127, at=0.1), 0.1)
    offer_ok(state, entry("above", prompt_tokens=200, at=0.2), 0.2)
    assert ids(state.pop_ready(1.0)) == ["edge", "above"]


def test_grouping_head_is_chosen_by_priority() -> None:
    state = QueueState(limits(max_in_flight=2, group_window_s=1.0, group_buckets=(128,)))
    offer_ok(state, entry("short-lo", prompt_tokens=10, priority=1, at=0.0), 0.0)
    offer_ok(state, entry("long-hi", prompt_tokens=500, priority=0, at=0.1), 0.1)
    offer_ok(state, entry("short-lo2", prompt_tokens=20, priority=1, at=0.2), 0.2)
    offer_ok(state, entry("long-lo", prompt_tokens=600, priority=1, at=0.3), 0.3)
    assert ids(state.pop_ready(1.0)) == ["long-hi", "long-lo"]


# --- invariants under any sequence of operations --------------------------------------------------


@dataclass
class Model:
    """What the state should hold, kept by hand."""

    waiting: dict[str, int] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)


op = st.one_of(
    st.tuples(
        st.just("offer"),
        st.sampled_from("abc"),
        st.integers(1, 60),  # cost
        st.integers(0, 700),  # prompt tokens
        st.integers(0, 2),  # priority
        st.sampled_from([0.5, 1.0, 2.0]),  # weight
        st.floats(0.0, 5.0),  # timeout
    ),
    st.tuples(st.just("pop")),
    st.tuples(st.just("finish"), st.integers(0, 40)),
    st.tuples(st.just("remove"), st.integers(0, 40)),
    st.tuples(st.just("expired")),
    st.tuples(st.just("tick"), st.floats(0.0, 2.0)),
)


@settings(max_examples=250, deadline=None)
@given(
    ops=st.lists(op, max_size=60),
    max_in_flight=st.integers(1, 4),
    max_waiting_requests=st.integers(0, 8),
    max_waiting_tokens=st.integers(20, 200),
    group_window_s=st.sampled_from([0.0, 0.0, 0.7]),
)
def test_invariants_hold_after_any_sequence_of_operations(
    ops: list[tuple[Any, ...]],
    max_in_flight: int,
    max_waiting_requests: int,
    max_waiting_tokens: int,
    group_window_s: float,
) -> None:
    lim = limits(
        max_in_flight=max_in_flight,
        max_waiting_requests=max_waiting_requests,
        max_waiting_tokens=max_waiting_tokens,
        group_window_s=group_window_s,
        group_buckets=(128, 512),
    )
    state = QueueState(lim)
    model = Model()
    now = 0.0
    offered = 0
    for step in ops:
        kind = step[0]
        if kind == "offer":
            _, tenant, cost, prompt, prio, weight, timeout = step
            eid = f"e{offered}"
            offered += 1
            e = entry(eid, tenant=tenant, cost=cost, prompt_tokens=prompt, at=now)
            e.deadline, e.weight, e.priority = now + timeout, weight, prio
            before = state.waiting_tokens
            rejected = state.offer(e, now)
            if rejected is None:
                model.waiting[eid] = cost
            else:
                # never turned away while a slot is free for it
                assert len(model.running) + len(model.waiting) >= max_in_flight
                assert 1 <= rejected.retry_after_s <= 60
                assert state.waiting_tokens == before
                if rejected.reason == "queue_full":
                    assert len(model.waiting) >= max_waiting_requests
                else:
                    assert model.waiting and sum(model.waiting.values()) + cost > (
                        max_waiting_tokens
                    )
        elif kind == "pop":
            free = max_in_flight - len(model.running)
            popped = state.pop_ready(now)
            assert len(popped) <= max(free, 0)
            for p in popped:
                assert p.id in model.waiting
                del model.waiting[p.id]
                model.running.add(p.id)
            if group_window_s == 0.0:
                # work conserving: all slots filled, or nothing left waiting
                assert len(model.running) == max_in_flight or not model.waiting
                prios = [p.priority for p in popped]
                assert prios == sorted(prios)
        elif kind == "finish":
            eid = f"e{step[1]}"
            state.finish(eid, now)
            model.running.discard(eid)
        elif kind == "remove":
            eid = f"e{step[1]}"
            removed = state.remove(eid)
            if eid in model.waiting:
                assert removed is not None and removed.id == eid
                del model.waiting[eid]
                model.gone.add(eid)
            else:
                assert removed is None
        elif kind == "expired":
            late = state.expired(now)
            for e in late:
                assert e.deadline <= now
                del model.waiting[e.id]
                model.gone.add(e.id)
            assert all(w.deadline > now for w in state.waiting.values())
        else:
            now += step[1]

        assert set(state.waiting) == set(model.waiting)
        assert set(state.running) == model.running
        assert not (set(state.waiting) & set(state.running))
        assert not (model.gone & set(state.running))
        assert state.waiting_tokens == sum(e.cost for e in state.waiting.values())
        assert len(state.running) <= max_in_flight
        # the waiting room exceeds its bounds only by entries that have a free slot to go to
        free = max_in_flight - len(state.running)
        assert len(state.waiting) <= max(max_waiting_requests, free)
        assert state.waiting_tokens <= max_waiting_tokens or len(state.waiting) <= max(1, free)
        assert 1 <= state.retry_after(now) <= 60
