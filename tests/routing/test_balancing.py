"""Load balancing over a model's replicas: least outstanding requests (the default), session
affinity (a header, else the body's ``user``), prompt-prefix affinity, per-replica API keys.

The replicas are real llmserve servers with the simulated engine; which one generated a
request is read from its engine's ``started`` records.
"""

from __future__ import annotations

import asyncio
import time

from llmserve.config import AdmissionConfig, Settings, SimulatedModel, UpstreamModel
from tests.conftest import sim_engine
from tests.routing.helpers import (
    assert_full,
    call_many,
    gateway,
    served_by,
    sim_replicas,
    started_counts,
    started_since,
    upstream_model,
)
from tests.support.client import call
from tests.support.fake_upstream import FakeUpstream, fake_text


async def test_concurrent_streams_split_evenly_by_default() -> None:
    """No routing configured: least outstanding. Ten concurrent streams of about half a second
    each land five and five (each pick sees the other replica's outstanding count)."""
    async with (
        sim_replicas(2) as replicas,
        gateway(upstream_model("rt-even", [r.url for r in replicas], upstream="slow")) as gw,
    ):
        before = started_counts(replicas, "slow")
        seen = await call_many(10, lambda _: call(gw.url, "rt-even", max_tokens=5))
        counts = started_since(replicas, before, "slow")

    for s in seen:
        assert_full(s, 5, model="rt-even")
    assert sum(counts) == 10, counts
    assert abs(counts[0] - counts[1]) <= 2, f"uneven split of 10 concurrent streams: {counts}"


async def test_a_replica_with_more_outstanding_requests_gets_fewer_new_ones() -> None:
    """Replica 0 takes about 0.85 s per request and replica 1 about 0.03 s, so replica 0's
    requests stay outstanding longer. In a closed loop of six clients, least-outstanding sends
    most new requests to the fast replica; round robin or random would split them about evenly.

    The gap is wide on purpose: the replicas and the gateway share this test's event loop, so
    on a loaded two-core runner the fast replica's requests are outstanding too, and a slow
    replica only fifteen times slower once got 9 requests to the fast one's 24. Here, with two
    busy loops beside it, the split was 6 to 22-24 (idle: 6 to 30-41); round robin would be
    one to one, so "at least twice as many" still tells them apart."""
    slow_sim = Settings(
        models=[
            SimulatedModel(
                engine="simulated", name="sim", tokens_per_second=5, first_token_latency_s=0.05
            )
        ]
    )
    async with (
        sim_replicas(1, slow_sim) as (slow,),
        sim_replicas(1) as (fast,),
        gateway(upstream_model("rt-busy", [slow.url, fast.url])) as gw,
    ):
        before = started_counts([slow, fast])
        stop_at = time.monotonic() + 1.5

        async def client() -> int:
            done = 0
            while time.monotonic() < stop_at:
                assert_full(await call(gw.url, "rt-busy", max_tokens=4), 4)
                done += 1
            return done

        completed = sum(await asyncio.gather(*(client() for _ in range(6))))
        on_slow, on_fast = started_since([slow, fast], before)

    assert on_slow + on_fast == completed
    assert on_slow >= 1, "the slow replica was never used"
    assert on_fast >= 2 * on_slow, f"slow replica got {on_slow}, fast {on_fast}"


# Affinity keys per test: odd, and the second round runs them in reverse, so that a policy
# that ignored the key and alternated between the replicas would move every key. Enough of them
# that a correct hash does not put them all on one replica by chance, which the tests also check:
# each key lands on either replica with p = 1/2 (the labels are random ports), so the chance is
# 2^(1 - KEYS). At 13 keys that is 1 in 4,096 per test, and a fresh-clone `make test` met it
# once; at 25, 1 in 16 million.
KEYS = 25


def two_rounds() -> list[tuple[int, int]]:
    """(round, key) pairs: every key once in order, then once in reverse order."""
    return [(0, k) for k in range(KEYS)] + [(1, k) for k in reversed(range(KEYS))]


async def test_session_header_pins_a_session_to_one_replica() -> None:
    async with (
        sim_replicas(2) as replicas,
        gateway(
            upstream_model("rt-session", [r.url for r in replicas], policy="session"),
        ) as gw,
    ):
        placement: dict[str, set[int]] = {}
        for round_, session in two_rounds():
            sid = f"session-{session}"
            where = await served_by(
                replicas,
                call(
                    gw.url,
                    "rt-session",
                    max_tokens=2,
                    stream=bool(round_),
                    headers={"x-session-id": sid},
                ),
            )
            placement.setdefault(sid, set()).add(where)

    moved = {sid: places for sid, places in placement.items() if len(places) != 1}
    assert not moved, f"sessions served by both replicas: {moved}"
    used = set().union(*placement.values())
    assert used == {0, 1}, f"{KEYS} sessions all on replica(s) {used}"


async def test_session_header_name_is_configurable() -> None:
    async with (
        sim_replicas(2) as replicas,
        gateway(
            upstream_model(
                "rt-session-hdr",
                [r.url for r in replicas],
                policy="session",
                routing={"session_header": "x-conversation"},
            ),
        ) as gw,
    ):
        placement: dict[str, set[int]] = {}
        for _, session in two_rounds():
            sid = f"conversation-{session}"
            where = await served_by(
                replicas,
                call(gw.url, "rt-session-hdr", max_tokens=2, headers={"x-conversation": sid}),
            )
            placement.setdefault(sid, set()).add(where)

    assert all(len(places) == 1 for places in placement.values()), placement
    assert set().union(*placement.values()) == {0, 1}, placement


async def test_user_field_pins_a_session_when_there_is_no_header() -> None:
    async with (
        sim_replicas(2) as replicas,
        gateway(
            upstream_model("rt-session-user", [r.url for r in replicas], policy="session")
        ) as gw,
    ):
        placement: dict[str, set[int]] = {}
        for round_, user in two_rounds():
            name = f"user-{user}"
            route = ("chat", "completions")[round_]
            where = await served_by(
                replicas,
                call(gw.url, "rt-session-user", route=route, max_tokens=2, user=name),
            )
            placement.setdefault(name, set()).add(where)

    assert all(len(places) == 1 for places in placement.values()), placement
    assert set().union(*placement.values()) == {0, 1}, placement


async def test_session_header_wins_over_the_user_field() -> None:
    """Same header, different users: one replica (the header is the session)."""
    async with (
        sim_replicas(2) as replicas,
        gateway(
            upstream_model("rt-session-both", [r.url for r in replicas], policy="session")
        ) as gw,
    ):
        placement: dict[str, set[int]] = {}
        for session in range(6):
            sid = f"header-{session}"
            for user in range(3):
                where = await served_by(
                    replicas,
                    call(
                        gw.url,
                        "rt-session-both",
                        max_tokens=2,
                        headers={"x-session-id": sid},
                        user=f"someone-{session}-{user}",
                    ),
                )
                placement.setdefault(sid, set()).add(where)

    assert all(len(places) == 1 for places in placement.values()), placement


def _document(group: int) -> str:
    # Groups differ within their first 8 characters; every prompt is longer than prefix_chars.
    return f"Doc {group:02d} " + "about the routing of requests to replicas. " * 2


async def test_prompts_with_a_common_prefix_go_to_the_same_replica() -> None:
    async with (
        sim_replicas(2) as replicas,
        gateway(
            upstream_model(
                "rt-prefix",
                [r.url for r in replicas],
                policy="prefix",
                routing={"prefix_chars": 32},
            ),
        ) as gw,
    ):
        placement: dict[int, set[int]] = {}
        for question, group in two_rounds():
            prompt = _document(group) + f"Question {question}: why?"
            where = await served_by(
                replicas,
                call(gw.url, "rt-prefix", route="completions", max_tokens=2, prompt=prompt),
            )
            placement.setdefault(group, set()).add(where)

    assert all(len(places) == 1 for places in placement.values()), placement
    assert set().union(*placement.values()) == {0, 1}, placement


async def test_chats_with_a_common_system_prompt_go_to_the_same_replica() -> None:
    async with (
        sim_replicas(2) as replicas,
        gateway(
            upstream_model(
                "rt-prefix-chat",
                [r.url for r in replicas],
                policy="prefix",
                routing={"prefix_chars": 32},
            ),
        ) as gw,
    ):
        placement: dict[int, set[int]] = {}
        for question, group in two_rounds():
            messages = [
                {"role": "system", "content": _document(group)},
                {"role": "user", "content": f"Question {question}: why?"},
            ]
            where = await served_by(
                replicas,
                call(gw.url, "rt-prefix-chat", max_tokens=2, messages=messages),
            )
            placement.setdefault(group, set()).add(where)

    assert all(len(places) == 1 for places in placement.values()), placement
    assert set().union(*placement.values()) == {0, 1}, placement


async def test_each_replica_gets_its_own_api_key() -> None:
    async with (
        FakeUpstream() as first,
        FakeUpstream() as second,
        gateway(
            upstream_model(
                "rt-keys", [first.url, second.url], api_keys=["key-one", None], upstream="m"
            )
        ) as gw,
    ):
        seen = await call_many(6, lambda _: call(gw.url, "rt-keys", max_tokens=3))

    for s in seen:
        assert s.ok, s
        assert s.text == fake_text(3)
    assert first.received and second.received, (first.received, second.received)
    assert set(first.authorizations) == {"Bearer key-one"}
    assert set(second.authorizations) == {None}


async def test_a_single_url_is_still_one_replica() -> None:
    async with sim_replicas(1) as (replica,):
        model = UpstreamModel(
            engine="openai", name="rt-single", url=replica.url, upstream_model="sim"
        )
        async with gateway(model) as gw:
            before = started_counts([replica])
            seen = await call(gw.url, "rt-single", max_tokens=3)
            assert_full(seen, 3, model="rt-single")
            assert started_since([replica], before) == [1]


async def test_the_model_queue_bounds_requests_across_all_its_replicas() -> None:
    """max_in_flight is the model's, not each replica's: with 2 allowed and 2 replicas, never
    more than 2 generations run on the two together, and the rest wait in the gateway."""
    model = "rt-bal-queue"
    async with (
        sim_replicas(2) as replicas,
        gateway(
            upstream_model(
                model,
                [r.url for r in replicas],
                upstream="slow",
                admission=AdmissionConfig(max_in_flight=2, max_waiting_requests=16),
            )
        ) as gw,
    ):
        engines = [sim_engine(r, "slow") for r in replicas]
        peak = 0
        clients = asyncio.gather(*(call(gw.url, model, max_tokens=3) for _ in range(6)))
        while not clients.done():
            peak = max(peak, sum(len(e.active) for e in engines))
            await asyncio.sleep(0.005)
        seen = await clients

    for s in seen:
        assert_full(s, 3, model=model)
    assert peak == 2, f"{peak} generations ran at once on the replicas together"
