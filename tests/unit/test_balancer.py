"""The replica choice, without servers: least outstanding, affinity, ejection and return."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from llmserve.routing.balancer import Balancer


def healthy_balancer(n: int, eject_after: int = 1) -> Balancer:
    balancer = Balancer([f"r{i}" for i in range(n)], eject_after)
    for i in range(n):
        balancer.checked(i, True)
    return balancer


def test_unchecked_replicas_are_used_but_not_counted_healthy() -> None:
    balancer = Balancer(["a", "b"])
    assert balancer.pick() is not None
    assert not balancer.any_healthy
    assert balancer.failed(0) is True  # a failed request takes an unchecked replica out too
    assert balancer.pick() == 1
    balancer.checked(1, True)
    assert balancer.healthy_count == 1


def test_the_last_replica_in_is_taken_out_only_by_a_health_check() -> None:
    balancer = healthy_balancer(2)
    assert balancer.failed(0) is True
    assert balancer.failed(1) is False  # nowhere else to go: keep trying it
    assert balancer.pick() == 1
    balancer.checked(1, False)
    assert balancer.pick() is None


def test_least_outstanding_goes_to_the_least_busy_replica() -> None:
    balancer = healthy_balancer(3)
    balancer.started(0)
    balancer.started(0)
    balancer.started(2)
    assert balancer.pick() == 1


def test_equal_replicas_share_requests_evenly() -> None:
    balancer = healthy_balancer(3)
    counts: Counter[int] = Counter()
    for _ in range(300):
        index = balancer.pick()
        assert index is not None
        counts[index] += 1
        balancer.started(index)  # long requests: nothing ends
    assert set(counts.values()) == {100}


def test_equal_replicas_take_turns_when_requests_end_at_once() -> None:
    balancer = healthy_balancer(2)
    picks = []
    for _ in range(4):
        index = balancer.pick()
        assert index is not None
        picks.append(index)
        balancer.started(index)
        balancer.ended(index)
    assert sorted(Counter(picks).values()) == [2, 2]


def test_one_failure_takes_a_replica_out_and_a_passing_check_brings_it_back() -> None:
    balancer = healthy_balancer(2)
    assert balancer.failed(0) is True
    assert all(balancer.pick() == 1 for _ in range(10))
    balancer.checked(0, True)
    assert {balancer.pick() for _ in range(10)} == {0, 1}


def test_ejection_after_n_consecutive_failures_only() -> None:
    balancer = healthy_balancer(2, eject_after=3)
    assert balancer.failed(0) is False
    balancer.succeeded(0)  # a success in between starts the count over
    assert balancer.failed(0) is False
    assert balancer.failed(0) is False
    assert balancer.failed(0) is True
    assert balancer.healthy_count == 1


def test_excluded_replicas_are_not_picked() -> None:
    balancer = healthy_balancer(2)
    assert balancer.pick(exclude=[0]) == 1
    assert balancer.pick(exclude=[0, 1]) is None
    assert balancer.pick("session", exclude=[0, 1]) is None


def test_the_same_key_always_goes_to_the_same_replica() -> None:
    balancer = healthy_balancer(4)
    first = balancer.pick("user-42")
    balancer.started(first or 0)  # load does not move an affinity key
    assert all(balancer.pick("user-42") == first for _ in range(20))


def test_keys_spread_over_all_replicas() -> None:
    balancer = healthy_balancer(4)
    counts = Counter(balancer.pick(f"session-{i}") for i in range(400))
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 60  # 100 each on average


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50, unique=True))
def test_a_replica_leaving_moves_only_its_own_keys(keys: list[str]) -> None:
    balancer = healthy_balancer(4)
    before = {key: balancer.pick(key) for key in keys}
    balancer.checked(2, False)
    after = {key: balancer.pick(key) for key in keys}
    for key in keys:
        if before[key] != 2:
            assert after[key] == before[key]
        else:
            assert after[key] != 2
