"""A bounded soak: a few hundred concurrent clients against one gateway process for a minute,
then a full reckoning.

The gateway runs as its own process (``python -m llmserve serve --config FILE``, the simulated
engine, API keys on, the in-memory limits store), so its resident memory can be read from
/proc. Clients (``SOAK_CLIENTS``, 300 by default) loop until the time is up, each as one kind
of tenant:

- unlimited key, model ``soak`` (room for every request: never queued or refused): streams and
  whole requests, about a third of them cut by the client at a random point;
- a key with ``max_concurrent``, one with ``rpm``, one with ``tpm``: refused with 429 often,
  and also disconnecting mid-stream (a held concurrency slot would show at the end);
- unlimited key, model ``soak-narrow`` (4 in flight, 8 waiting): 503 ``queue_full`` and,
  with a short ``X-Queue-Timeout``, 503 ``queue_timeout`` (in-band after keep-alives when the
  wait outlasts the keep-alive interval), plus streams cut while they wait;
- an unknown key: 401.

Chat, completions and ``/generate``; streamed and whole. At the end:

- every request is accounted for on the client side: completed, rejected (status + code, or an
  in-band error), or aborted by its client; no transport error, no hang;
- the server agrees exactly: ``llmserve_requests_total`` by model, key and status equals the
  client's counts (ok = completed, disconnect = aborted, queue_full / deadline = those 503s),
  and ``llmserve_rejections_total`` by reason and key equals the client's pre-byte refusals;
- nothing is held: in-flight and queue gauges at 0, and the ``max_concurrent`` key can again
  run exactly its limit at once (one more is refused);
- the server's RSS grew by less than ``RSS_GROWTH_BOUND`` between the end of the warm-up and
  the end of the soak, and it logged no traceback.

Duration ``LLMSERVE_SOAK_S`` seconds (default 60); ``LLMSERVE_SOAK_CLIENTS`` clients. A longer
run, e.g. ten minutes with 500 clients:

    LLMSERVE_SOAK_S=600 LLMSERVE_SOAK_CLIENTS=500 \\
        .venv/bin/pytest tests/reliability/test_soak.py -q -s -p no:cacheprovider -o timeout=900
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tests.auth.helpers import add_key, bearer
from tests.observability.helpers import Scrape, scrape
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually
from tests.support.gateway import ServerProcess, gateway_process
from tests.support.sse import Comment, Event, aiter_sse

SOAK_S = float(os.environ.get("LLMSERVE_SOAK_S", "60"))
SOAK_CLIENTS = int(os.environ.get("LLMSERVE_SOAK_CLIENTS", "300"))
# The RSS baseline is taken here, once every client has run for a while.
WARMUP_S = min(max(10.0, SOAK_S / 4), SOAK_S / 2)
# Bound on RSS growth from the end of the warm-up to the end of the soak. Measured on a 2-core
# machine with the defaults: RSS about 86 MiB, +0.6 MiB over the last 45 s (27k requests, about
# 24 bytes each: the simulated engine keeps every request id it saw, by design). Keeping a few
# KB per request (a request's record, buffers or task) would cross the bound within a minute.
RSS_GROWTH_BOUND = 24 * 2**20 * max(1.0, SOAK_S / 60)
TOKENS_PER_SECOND = 20
LONG = 400  # max_tokens of requests a client will cut: 20 s, never done when the cut comes
PROMPT = "soak the gateway"

CONFIG = """\
log_level: warning
keepalive_interval_s: 1.0
auth: {{enabled: true, keys_file: {keys}, reload_interval_s: 1.0}}
rate_limits: {{store: memory}}
models:
  - engine: simulated
    name: soak
    tokens_per_second: {tps}
    first_token_latency_s: 0.05
    admission: {{max_in_flight: 1024, max_waiting_requests: 64}}
  - engine: simulated
    name: soak-narrow
    tokens_per_second: {tps}
    first_token_latency_s: 0.05
    admission: {{max_in_flight: 4, max_waiting_requests: 8, queue_timeout_s: 15}}
"""
LIMITED = {
    "soak-conc": {"max_concurrent": 6},
    "soak-rpm": {"rpm": 120, "max_concurrent": 20},
    "soak-tpm": {"tpm": 3000, "max_concurrent": 20},
}


@dataclass(frozen=True)
class Profile:
    key: str  # key name ("unknown": a key the server does not know)
    model: str
    cut_share: float  # share of requests its client cuts
    whole_cut: bool = False  # may cut whole requests (only where no refusal can race the cut)
    queue_timeout: bool = False  # sends a short X-Queue-Timeout on requests it will not cut


def profile(index: int) -> Profile:
    slot = index % 20
    if slot < 12:
        return Profile("soak-free", "soak", cut_share=0.35, whole_cut=True)
    if slot < 14:
        return Profile("soak-conc", "soak", cut_share=0.3)
    if slot < 15:
        return Profile("soak-rpm", "soak", cut_share=0.2)
    if slot < 16:
        return Profile("soak-tpm", "soak", cut_share=0.2)
    if slot < 19:
        return Profile("soak-free", "soak-narrow", cut_share=0.15, queue_timeout=slot % 2 == 0)
    return Profile("unknown", "soak", cut_share=0.0)


@dataclass(frozen=True)
class Outcome:
    key: str
    model: str
    kind: str  # "completed", "rejected", "in_band", "aborted", "unexpected"
    status: int = 200
    code: str | None = None
    detail: str = ""
    whole: bool = False  # an aborted whole request (not a stream)


class Soak:
    def __init__(self, gateway: ServerProcess, keys: dict[str, str]) -> None:
        self.gateway = gateway
        self.keys = keys
        self.outcomes: list[Outcome] = []
        self.rss: list[tuple[float, int]] = []
        self.in_flight: list[int] = []

    async def client(self, index: int, session: aiohttp.ClientSession, until: float) -> None:
        rng = random.Random(index)
        who = profile(index)
        while time.monotonic() < until:
            outcome = await self.request(session, who, rng)
            self.outcomes.append(outcome)
            if outcome.kind == "rejected":
                await asyncio.sleep(rng.uniform(0.1, 0.6))  # back off, not the full Retry-After
            else:
                await asyncio.sleep(rng.uniform(0.0, 0.1))

    async def request(
        self, session: aiohttp.ClientSession, who: Profile, rng: random.Random
    ) -> Outcome:
        route = rng.choices(["chat", "completions", "generate"], [5, 3, 2])[0]
        stream = route == "generate" or rng.random() < 0.8
        cut = rng.random() < who.cut_share and (stream or who.whole_cut)
        max_tokens = LONG if cut else rng.randint(4, 40)
        headers = bearer(self.keys[who.key])
        if who.queue_timeout and not cut and rng.random() < 0.6:
            headers["X-Queue-Timeout"] = f"{rng.uniform(0.2, 2.5):.2f}"
        path, body = _body(route, who.model, stream, max_tokens)
        try:
            if cut and not stream:
                return await self.give_up(session, who, path, body, headers, rng)
            stop = (rng.randint(0, 15), rng.uniform(0.05, 1.5)) if cut else None
            async with asyncio.timeout(60):
                return await self.exchange(session, who, path, body, headers, stop)
        except TimeoutError:
            return Outcome(who.key, who.model, "unexpected", detail="no answer within 60 s")
        except aiohttp.ClientError as exc:
            return Outcome(who.key, who.model, "unexpected", detail=repr(exc))

    async def give_up(
        self,
        session: aiohttp.ClientSession,
        who: Profile,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        rng: random.Random,
    ) -> Outcome:
        """A whole request given up on a while after it was sent. Its answer cannot be ready
        sooner (20 s of tokens), and this tenant is never refused, so nothing can come back
        first. The wait starts once the body is sent: a request cut while still connecting
        never reaches the server, which then has nothing to count."""
        sent = asyncio.Event()
        exchange = asyncio.ensure_future(
            self.exchange(session, who, path, body, headers, None, {"sent": sent})
        )
        waiter = asyncio.ensure_future(sent.wait())
        await asyncio.wait({exchange, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if sent.is_set() and not exchange.done():
            await asyncio.wait({exchange}, timeout=rng.uniform(0.05, 1.5))
        if not exchange.done():
            exchange.cancel()  # aiohttp closes the connection: the client went away
            await asyncio.wait({exchange})
            if sent.is_set():
                return Outcome(who.key, who.model, "aborted", whole=True)
            return Outcome(who.key, who.model, "unexpected", detail="request not sent in 60 s")
        return exchange.result()

    async def exchange(
        self,
        session: aiohttp.ClientSession,
        who: Profile,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        stop: tuple[int, float] | None,
        trace: dict[str, asyncio.Event] | None = None,
    ) -> Outcome:
        async with session.post(
            self.gateway.url + path, json=body, headers=headers, trace_request_ctx=trace
        ) as response:
            if response.status != 200:
                error = assert_openai_error(await response.json())
                return Outcome(who.key, who.model, "rejected", response.status, error["code"])
            if response.content_type == "application/json":
                data = await response.json()
                assert data["choices"][0]["finish_reason"] == "length", data
                return Outcome(who.key, who.model, "completed")
            # A stream: read it to its end, unless this client cuts it after ``stop`` events
            # or seconds (whichever first; keep-alive comments count as events).
            started, seen = time.monotonic(), 0
            items = aiter_sse(response.content.iter_any())
            async for item in items:
                if stop is not None and (seen >= stop[0] or time.monotonic() - started >= stop[1]):
                    response.close()  # the client goes away mid-stream
                    return Outcome(who.key, who.model, "aborted")
                seen += 1
                if isinstance(item, Comment):
                    continue
                if item.done:
                    return Outcome(who.key, who.model, "completed")
                data = item.json()
                if "error" in data:
                    code = assert_openai_error(data)["code"]
                    if path != "/generate":  # OpenAI streams end with [DONE] after the error
                        tail = [rest async for rest in items]
                        assert tail == [Event("[DONE]")], tail
                    return Outcome(who.key, who.model, "in_band", 200, code)
                if item.event == "end":
                    assert data["finish_reason"] == "length", data
                    return Outcome(who.key, who.model, "completed")
            return Outcome(who.key, who.model, "unexpected", detail="stream ended without an end")

    async def sample(self, until: float) -> None:
        """Every second: the server's RSS, and how many requests it is running."""
        started = time.monotonic()
        while time.monotonic() < until:
            self.rss.append((time.monotonic() - started, self.gateway.rss_bytes()))
            s = await scrape(self.gateway.url)
            self.in_flight.append(int(s.value("llmserve_requests_in_flight")))
            await asyncio.sleep(1.0)


def _sent() -> aiohttp.TraceConfig:
    """Sets the ``sent`` event a request passes in ``trace_request_ctx`` once its body is out."""

    async def on_chunk_sent(_: Any, context: Any, __: Any) -> None:
        if context.trace_request_ctx:
            context.trace_request_ctx["sent"].set()

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_chunk_sent)
    return trace


def _body(route: str, model: str, stream: bool, max_tokens: int) -> tuple[str, dict[str, Any]]:
    if route == "generate":
        return "/generate", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens}
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": PROMPT}]
        return "/v1/chat/completions", body
    body["prompt"] = PROMPT
    return "/v1/completions", body


# The server's names for what the clients saw.
STATUS_OF_CODE = {
    "queue_full": "queue_full",
    "queue_tokens_full": "queue_full",
    "queue_timeout": "deadline",
}


def expected_counts(
    outcomes: list[Outcome],
) -> tuple[Counter[tuple[str, str, str]], Counter[tuple[str, str]]]:
    """From the clients' outcomes: requests_total by (model, key, status) and rejections_total
    by (reason, key), as the server should have counted them."""
    requests: Counter[tuple[str, str, str]] = Counter()
    rejections: Counter[tuple[str, str]] = Counter()
    for o in outcomes:
        if o.kind == "completed":
            requests[(o.model, o.key, "ok")] += 1
        elif o.kind == "aborted":
            requests[(o.model, o.key, "disconnect")] += 1  # a client leaving is no refusal
        elif o.kind == "in_band":
            requests[(o.model, o.key, STATUS_OF_CODE[o.code or ""])] += 1
        elif o.status == 401:
            rejections[("auth", "unauthenticated")] += 1
        elif o.status == 429:
            rejections[("rate_limit", o.key)] += 1
        else:
            status = STATUS_OF_CODE[o.code or ""]
            requests[(o.model, o.key, status)] += 1  # reached the pipeline, refused by the queue
            rejections[(status, o.key)] += 1
    return requests, rejections


def server_counts(
    s: Scrape,
) -> tuple[Counter[tuple[str, str, str]], Counter[tuple[str, str]]]:
    requests: Counter[tuple[str, str, str]] = Counter()
    rejections: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in s.samples.items():
        label = dict(labels)
        if name == "llmserve_requests_total" and value:
            requests[(label["model"], label["key"], label["status"])] += int(value)
        elif name == "llmserve_rejections_total" and value:
            rejections[(label["reason"], label["key"])] += int(value)
    return requests, rejections


async def test_soak_accounts_for_every_request_and_holds_nothing(tmp_path: Path) -> None:
    keys_path = tmp_path / "keys.yaml"
    keys = {"soak-free": add_key(keys_path, "soak-free")}
    for name, limits in LIMITED.items():
        keys[name] = add_key(keys_path, name, **limits)
    keys["unknown"] = "sk-llmserve-" + "x" * 43
    config = tmp_path / "soak.yaml"
    config.write_text(CONFIG.format(keys=keys_path, tps=TOKENS_PER_SECOND))

    async with gateway_process(config) as gateway:
        soak = Soak(gateway, keys)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[_sent()]) as session:
            until = time.monotonic() + SOAK_S
            sampler = asyncio.create_task(soak.sample(until))
            await asyncio.gather(*(soak.client(i, session, until) for i in range(SOAK_CLIENTS)))
            await sampler

        # -- every request accounted for, client side
        kinds = Counter(o.kind for o in soak.outcomes)
        unexpected = [o for o in soak.outcomes if o.kind == "unexpected"]
        assert not unexpected, f"{len(unexpected)} unexplained outcomes, e.g. {unexpected[:5]}"
        refusals = Counter((o.status, o.code) for o in soak.outcomes if o.kind != "completed")
        print(f"\nsoak: {len(soak.outcomes)} requests in {SOAK_S:g} s, {SOAK_CLIENTS} clients:")
        print(f"  {dict(kinds)}\n  refusals and aborts: {dict(refusals)}")
        busy = sorted(soak.in_flight)[len(soak.in_flight) // 2]
        print(f"  requests running on the engines: median {busy}, peak {max(soak.in_flight)}")
        # It was a soak of concurrent streams, not of refusals.
        assert max(soak.in_flight) >= min(100, SOAK_CLIENTS // 3), soak.in_flight
        # Every path of the soak was exercised.
        assert kinds["completed"] and kinds["aborted"] and kinds["in_band"], kinds
        seen = {(o.status, o.code) for o in soak.outcomes if o.kind == "rejected"}
        for wanted in (
            (401, "invalid_api_key"),
            (429, "rate_limit_exceeded"),
            (503, "queue_full"),
            (503, "queue_timeout"),
        ):
            assert wanted in seen, (wanted, seen)
        assert seen <= {
            (401, "invalid_api_key"),
            (429, "rate_limit_exceeded"),
            (503, "queue_full"),
            (503, "queue_timeout"),
        }, seen

        # -- the server agrees, exactly (it records a request just after its last byte)
        want_requests, want_rejections = expected_counts(soak.outcomes)
        got: list[tuple[Counter[tuple[str, str, str]], Counter[tuple[str, str]]]] = []

        async def agree() -> bool:
            got.append(server_counts(await scrape(gateway.url)))
            return got[-1] == (want_requests, want_rejections)

        with contextlib.suppress(AssertionError):  # out of time: the diffs below say how
            await eventually(agree, 15.0, "the server's counts agree", 0.2)
        got_requests, got_rejections = got[-1]
        diff_requests = {
            k: (got_requests[k], want_requests[k])
            for k in set(got_requests) | set(want_requests)
            if got_requests[k] != want_requests[k]
        }
        diff_rejections = {
            k: (got_rejections[k], want_rejections[k])
            for k in set(got_rejections) | set(want_rejections)
            if got_rejections[k] != want_rejections[k]
        }
        assert not diff_requests, f"requests_total (server, client): {diff_requests}"
        assert not diff_rejections, f"rejections_total (server, client): {diff_rejections}"

        # -- nothing held
        s = await scrape(gateway.url)
        for gauge in (
            "llmserve_requests_in_flight",
            "llmserve_queue_requests",
            "llmserve_queue_tokens",
        ):
            assert s.value(gauge) == 0, (gauge, s.value(gauge))

        # -- memory
        final_rss = gateway.rss_bytes()
        baseline = next(rss for t, rss in soak.rss if t >= WARMUP_S)
        peak = max(rss for _, rss in soak.rss)
        mib = 2**20
        print(
            f"  RSS: {baseline / mib:.1f} MiB after {WARMUP_S:g} s warm-up, peak "
            f"{peak / mib:.1f} MiB, {final_rss / mib:.1f} MiB at the end "
            f"(bound: +{RSS_GROWTH_BOUND / mib:.0f} MiB; "
            f"{(final_rss - baseline) / len(soak.outcomes):+.0f} bytes per request)"
        )
        assert final_rss - baseline < RSS_GROWTH_BOUND, [
            (round(t), rss // mib) for t, rss in soak.rss
        ]

        # -- the concurrency-limited key has exactly its slots back: 6 at once, not a 7th
        await assert_concurrency_slots_free(gateway.url, keys["soak-conc"], 6)

        # -- still serving, and nothing went to the error log
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            assert (await client.get("/ready")).status_code == 200
    log = gateway.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]


async def assert_concurrency_slots_free(url: str, key: str, slots: int) -> None:
    """``slots`` streams of this key run at once, and one more meanwhile is refused."""
    body = {"model": "soak", "prompt": PROMPT, "max_tokens": 40, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(key)) as client:
        running: list[int] = []
        all_running, probed = asyncio.Event(), asyncio.Event()

        async def hold() -> int:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                running.append(response.status_code)
                if len(running) == slots:
                    all_running.set()
                if response.status_code == 200:
                    await probed.wait()  # holds its slot until the extra request was answered
                return response.status_code  # then hangs up: the slot is released

        holders = [asyncio.create_task(hold()) for _ in range(slots)]
        await asyncio.wait_for(all_running.wait(), 10)
        extra = await client.post("/v1/completions", json={**body, "stream": False})
        probed.set()
        codes = await asyncio.gather(*holders)
    assert codes == [200] * slots, f"a slot was still held after the soak: {codes}"
    assert extra.status_code == 429, extra.text
    assert_openai_error(extra, message_contains="concurrent requests")
