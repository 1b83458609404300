"""A replica engine's own load, read from its /metrics, and what balancing makes of it: the
engine's count of every gateway's requests, plus this gateway's since it was read; this
gateway's own count alone when the engine does not report."""

from __future__ import annotations

import pytest

from llmserve.routing.balancer import Balancer
from llmserve.routing.engine_signals import EngineSignals, parse_signals

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600.0
vllm:num_requests_running_bogus 99
process_cpu_seconds_total 12.5
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VLLM, EngineSignals(3.0, 2.0, 0.25, 600.0, 1000.0)),
        (
            "vllm:num_requests_running 1\nvllm:num_requests_waiting 0 1700000000\n",
            EngineSignals(1, 0),
        ),
        (  # two engines (data parallel) of one server: summed
            'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 4\n'
            'vllm:num_requests_waiting{engine="0"} 0\nvllm:num_requests_waiting{engine="1"} 1\n',
            EngineSignals(5, 1),
        ),
        ("process_cpu_seconds_total 1\n", None),  # not vLLM
        ("vllm:num_requests_running 1\n", None),  # no waiting count: not a load
        ('vllm:num_requests_running{a="}"} x\nvllm:num_requests_waiting 0\n', None),
    ],
)
def test_parse_signals(text: str, expected: EngineSignals | None) -> None:
    assert parse_signals(text) == expected


def test_the_load_is_the_engines_count_plus_what_this_gateway_did_since() -> None:
    b = Balancer(["a", "b"])
    b.started(0)
    b.signal(0, 10.0)  # the engine has 10: 9 of them other gateways'
    assert b.replicas[0].load == 10
    b.started(0)
    b.started(0)
    assert b.replicas[0].load == 12
    b.ended(0)
    assert b.replicas[0].load == 11
    b.signal(0, None)  # stopped reporting: this gateway's own count
    assert b.replicas[0].load == 2


def test_least_outstanding_avoids_a_replica_busy_with_other_gateways_requests() -> None:
    b = Balancer(["a", "b"])
    for i in (0, 1):
        b.checked(i, True)
    b.signal(0, 8.0)
    b.signal(1, 0.0)
    picks = []
    for _ in range(6):
        picked = b.pick()
        assert picked is not None
        b.started(picked)
        picks.append(picked)
    assert picks == [1] * 6  # a's 8 are more than b's 6
