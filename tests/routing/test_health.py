"""Replica health: passive (a failed or stalled request ejects its replica, which is then
probed back in) and active (a replica whose /health fails is taken out); readiness says which
models have no healthy replica; ``llmserve_replica_healthy`` follows each replica.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from llmserve.config import SimulatedModel
from tests.conftest import free_port, serve, simulated_settings
from tests.routing.helpers import (
    Deltas,
    assert_error,
    assert_full,
    assert_in_band,
    call_many,
    gateway,
    get_json,
    healthy_gauge,
    replica_labels,
    scrape,
    sim_replicas,
    started_counts,
    started_since,
    until_gauge,
    upstream_model,
)
from tests.support.client import call
from tests.support.fake_upstream import (
    FakeUpstream,
    chat_chunk,
    error,
    fake_text,
    sse_frames,
)


async def test_failed_replica_is_ejected_then_used_again_when_it_comes_back() -> None:
    """Passive health: replica A dies; the first request that meets it fails over and A is
    out (no request tries it again); A restarts on the same port, a probe finds it within a
    second or so, and requests reach it again."""
    model = "rt-health-passive"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with AsyncExitStack() as first_life, sim_replicas(1) as (b,):
        await first_life.enter_async_context(serve(simulated_settings(), port))
        async with gateway(upstream_model(model, [url, b.url])) as gw:
            assert await healthy_gauge(gw.url, model, url, 0) == 1
            await first_life.aclose()  # A dies (active checks run every 60 s here)

            metrics = await Deltas.start(gw.url)
            for s in await call_many(4, lambda _: call(gw.url, model)):
                assert_full(s, 5, model=model)
            await metrics.after()
            assert metrics("llmserve_failovers_total", model=model) >= 1
            await until_gauge(gw.url, model, url, 0, 0, within_s=1.0)

            # Out: nothing tries A any more (no more failovers), everything succeeds on B.
            metrics = await Deltas.start(gw.url)
            before_b = started_counts([b])
            for s in await call_many(6, lambda _: call(gw.url, model, stream=False)):
                assert_full(s, 5, model=model)
            await metrics.after()
            assert metrics("llmserve_failovers_total", model=model) == 0
            assert started_since([b], before_b) == [6]

            # A comes back where it was: probed back in, then used.
            async with serve(simulated_settings(), port) as a_again:
                back_after = await until_gauge(gw.url, model, url, 0, 1, within_s=3.0)
                before = started_counts([a_again, b])
                for s in await call_many(6, lambda _: call(gw.url, model)):
                    assert_full(s, 5, model=model)
                on_a, on_b = started_since([a_again, b], before)
    assert back_after < 3.0
    assert on_a >= 1, f"the returned replica got nothing ({on_a} vs {on_b})"


async def test_replica_is_ejected_after_eject_after_failures_failed_requests() -> None:
    """eject_after_failures=3: two failed requests leave the replica in, the third takes it
    out. Pairs of concurrent requests put one request on each replica while both are in."""
    model = "rt-health-threshold"
    # Its /health answers 200: probed often, it would be back in at once. Keep it out.
    three_strikes = {"eject_after_failures": 3, "probe_interval_s": 30.0}
    async with (
        FakeUpstream(error(500, "boom")) as bad,
        sim_replicas(1) as (good,),
        gateway(upstream_model(model, [bad.url, good.url], health=three_strikes)) as gw,
    ):
        history = []
        for _ in range(6):
            for s in await call_many(2, lambda _: call(gw.url, model)):
                assert_full(s, 5, model=model)
            history.append((len(bad.requests), await healthy_gauge(gw.url, model, bad.url, 0)))

    for failed, gauge in history:
        assert failed <= 3, history
        assert gauge == (1 if failed < 3 else 0), history
    assert history[-1] == (3, 0), history


async def test_replica_whose_health_check_fails_is_taken_out_and_put_back() -> None:
    """Active health: /health answering 503 takes a replica out though its generations work."""
    model = "rt-health-active"
    fast_checks = {"interval_s": 0.2, "probe_interval_s": 0.2}
    async with (
        FakeUpstream() as sick,
        FakeUpstream() as well,
        gateway(
            upstream_model(model, [sick.url, well.url], health=fast_checks, upstream="m")
        ) as gw,
    ):
        sick.health = 503
        await until_gauge(gw.url, model, sick.url, 0, 0, within_s=3.0)
        assert await healthy_gauge(gw.url, model, well.url, 1) == 1
        received = sick.received
        for s in await call_many(8, lambda _: call(gw.url, model, max_tokens=3)):
            assert s.ok and s.text == fake_text(3), s
        assert sick.received == received, "a request went to the replica that failed its check"

        sick.health = 200
        await until_gauge(gw.url, model, sick.url, 0, 1, within_s=3.0)
        for s in await call_many(8, lambda _: call(gw.url, model, max_tokens=3)):
            assert s.ok, s
        assert sick.received > received, "the recovered replica got nothing"


async def test_stream_that_stops_producing_tokens_ejects_its_replica() -> None:
    """Passive health counts a stalled stream too, not only errors and refused connections."""
    stalls = sse_frames(chat_chunk(" one"), ending="hang")
    model = "rt-health-stall"
    slow_probes = {"probe_interval_s": 30.0}  # once out, it stays out for this test
    async with (
        FakeUpstream(stalls) as staller,
        sim_replicas(1) as (good,),
        gateway(upstream_model(model, [staller.url, good.url], health=slow_probes)) as gw,
    ):
        seen = await call_many(2, lambda _: call(gw.url, model))
        assert len(staller.requests) == 1, "expected one of two concurrent streams on each"
        stalled = [s for s in seen if not s.ok]
        assert len(stalled) == 1, seen
        assert_in_band(stalled[0], "between_tokens_timeout")
        await until_gauge(gw.url, model, staller.url, 0, 0, within_s=1.0)
        for s in await call_many(4, lambda _: call(gw.url, model)):
            assert_full(s, 5, model=model)
        assert len(staller.requests) == 1


async def test_ready_names_the_model_without_a_healthy_replica() -> None:
    up, down = "rt-ready-up", "rt-ready-down"
    fast_checks = {"interval_s": 0.2, "probe_interval_s": 0.2}
    async with (
        sim_replicas(1) as (replica,),
        FakeUpstream() as d1,
        FakeUpstream() as d2,
        gateway(
            upstream_model(up, [replica.url], health=fast_checks),
            upstream_model(down, [d1.url, d2.url], health=fast_checks, upstream="m"),
        ) as gw,
    ):
        status, body, _ = await get_json(gw.url, "/ready")
        assert status == 200, body
        assert body["models"] == {up: True, down: True}
        assert body["replicas"][up] == {"healthy": 1, "total": 1}
        assert body["replicas"][down] == {"healthy": 2, "total": 2}

        d1.health = 503
        await until_gauge(gw.url, down, d1.url, 0, 0, within_s=3.0)
        status, body, _ = await get_json(gw.url, "/ready")
        assert status == 200, body  # one healthy replica is enough
        assert body["replicas"][down] == {"healthy": 1, "total": 2}

        d2.health = 503
        await until_gauge(gw.url, down, d2.url, 1, 0, within_s=3.0)
        status, body, _ = await get_json(gw.url, "/ready")
        assert status == 503, body
        assert body["models"] == {up: True, down: False}
        assert body["replicas"][down] == {"healthy": 0, "total": 2}
        assert body["replicas"][up] == {"healthy": 1, "total": 1}

        # The other model still serves; this one is refused at once.
        assert_full(await call(gw.url, up), 5, model=up)
        refused = await call(gw.url, down)
        assert_error(refused, 503, "no_healthy_replica")
        assert refused.headers.get("retry-after"), refused

        d2.health = 200
        await until_gauge(gw.url, down, d2.url, 1, 1, within_s=3.0)
        status, body, _ = await get_json(gw.url, "/ready")
        assert status == 200, body
        assert body["replicas"][down] == {"healthy": 1, "total": 2}
        served = await call(gw.url, down, max_tokens=3)
        assert served.ok and served.text == fake_text(3), served


async def test_ready_covers_in_process_models_beside_upstream_ones() -> None:
    """An in-process model counts as one replica in the readiness body."""
    up = "rt-ready-mixed-up"
    local = SimulatedModel(engine="simulated", name="rt-ready-mixed-local")
    async with (
        sim_replicas(1) as (replica,),
        gateway(upstream_model(up, [replica.url]), local) as gw,
    ):
        status, body, _ = await get_json(gw.url, "/ready")
    assert status == 200, body
    assert body["models"] == {up: True, "rt-ready-mixed-local": True}
    assert body["replicas"][up] == {"healthy": 1, "total": 1}
    # Whether an in-process model is listed among "replicas" is the implementation's choice;
    # if it is, it counts as one healthy replica.
    assert body["replicas"].get("rt-ready-mixed-local", {"healthy": 1, "total": 1}) == {
        "healthy": 1,
        "total": 1,
    }


async def test_replica_gauge_names_every_replica() -> None:
    model = "rt-health-gauge"
    async with (
        sim_replicas(2) as replicas,
        gateway(upstream_model(model, [r.url for r in replicas])) as gw,
    ):
        snapshot = await scrape(gw.url)
        labels = replica_labels(snapshot, "llmserve_replica_healthy", model)
        values = [await healthy_gauge(gw.url, model, r.url, i) for i, r in enumerate(replicas)]
    assert len(labels) == 2, labels
    assert values == [1, 1], (values, labels)


async def test_a_wedged_health_endpoint_is_out_and_slows_no_other_check() -> None:
    """/health that never answers: the check's own timeout (timeout_s) takes the replica out,
    and the other replica is still checked every interval (not once per wedged timeout)."""
    model = "rt-health-wedged"
    checks = {"interval_s": 0.2, "probe_interval_s": 0.2, "timeout_s": 1.5}
    async with (
        FakeUpstream(health=None) as wedged,
        FakeUpstream() as fine,
        gateway(
            upstream_model(model, [wedged.url, fine.url], health=checks, upstream="m"), ready=False
        ) as gw,
    ):
        await until_gauge(gw.url, model, fine.url, 1, 1, within_s=3.0)
        checked = fine.health_checks
        await asyncio.sleep(2.0)
        checks_in_2s = fine.health_checks - checked
        await until_gauge(gw.url, model, wedged.url, 0, 0, within_s=3.0)
    # Every 0.2 s: about 10. Checks that wait for the wedged one: at most 2.
    assert checks_in_2s >= 5, f"the healthy replica was checked {checks_in_2s} times in 2 s"
