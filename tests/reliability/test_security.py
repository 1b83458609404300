"""Security over real sockets: every route that is not explicitly public needs a key, whatever
the path encoding, Host header or method; no key material in any response, log line, /metrics
output or exported trace; CORS closed unless origins are configured; the response headers a
security scan expects on every answer (errors, streams and redirects too) and no banner; the
Host header never reflected; an upstream's key never relayed in its error messages; Starlette
past its known CVEs.
"""

from __future__ import annotations

import base64
import gzip
import importlib.metadata
import re
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from packaging.requirements import Requirement
from packaging.version import Version
from pydantic import SecretStr
from starlette.routing import Route

from llmserve.app import create_app
from llmserve.auth.keys import KEY_PREFIX, hash_key, new_key
from llmserve.config import (
    AdmissionConfig,
    AuthConfig,
    CorsConfig,
    Limits,
    Settings,
    UpstreamModel,
)
from llmserve.registry import ModelRegistry
from tests.auth.helpers import add_key, bearer
from tests.conftest import RunningServer, serve, simulated_models
from tests.reliability.helpers import (
    RawAnswer,
    assert_openai_error,
    raw_exchange,
    request_head,
    security_header_problems,
    simulated_config,
)
from tests.support.eventually import until
from tests.support.fake_upstream import FakeUpstream, error
from tests.support.gateway import gateway_process

REPO = Path(__file__).resolve().parents[2]
PUBLIC = ("/health", "/ready", "/metrics")
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "sim", "prompt": "hi", "max_tokens": 2}


def models() -> list[Any]:
    return simulated_models(
        5000, 0.0, slow_admission=AdmissionConfig(max_in_flight=1, max_waiting_requests=0)
    )


def secured_settings(keys_path: Path | None, **extra: Any) -> Settings:
    auth = (
        AuthConfig(enabled=True, keys_file=keys_path, reload_interval_s=0.1)
        if keys_path is not None
        else AuthConfig(enabled=False)
    )
    return Settings(models=models(), auth=auth, **extra)


@dataclass
class Keys:
    path: Path
    full: str
    sim_only: str
    one_per_minute: str


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    path = tmp_path / "keys.yaml"
    return Keys(
        path,
        add_key(path, "full"),
        add_key(path, "sim-only", models=("sim",)),
        add_key(path, "one-per-minute", rpm=1),
    )


@pytest.fixture
async def auth_server(keys: Keys) -> AsyncIterator[RunningServer]:
    async with serve(secured_settings(keys.path)) as running:
        yield running


def app_routes(settings: Settings) -> list[tuple[str, frozenset[str]]]:
    """(path, methods) of every HTTP route the app serves, as the app itself lists them."""
    app = create_app(settings, ModelRegistry.from_config(settings.models, settings.cache_dir))
    routes = []
    for route in app.routes:
        if isinstance(route, Route):
            routes.append((route.path, frozenset(route.methods or {"GET"})))
    return routes


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


# --- who needs a key ---------------------------------------------------------------------------


def test_only_the_probes_are_public_by_default() -> None:
    """The public set is explicit and small: the three probes, each a GET route that exists."""
    assert Settings().auth.public_paths == PUBLIC
    served = {path for path, methods in app_routes(secured_settings(None)) if "GET" in methods}
    assert set(PUBLIC) <= served


ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE")
UNKNOWN_PATHS = (
    "/",
    "/v1",
    "/v1/",
    "/v2/chat/completions",
    "/v1/embeddings",
    "/v1/models/sim",
    "/admin",
    "/.env",
    "/.git/config",
    "/healthz",
    "/metrics2",
    "/internal/keys",
    "/keys.yaml",
    "/server-status",
    "/v1/chat/completions/../../metrics",
)


def assert_401(answer: RawAnswer, where: str) -> None:
    assert answer.status == 401, f"{where}: {answer.status} {answer.data[:300]!r}"
    assert answer.headers.get("www-authenticate") == "Bearer", where
    if not where.startswith("HEAD"):
        assert_openai_error(
            401,
            answer.headers,
            answer.body,
            401,
            code="invalid_api_key",
            error_type="authentication_error",
            where=where,
        )


async def test_every_route_and_method_needs_a_key_and_unknown_paths_are_401(
    auth_server: RunningServer, keys: Keys
) -> None:
    """Every route the app lists (docs and OpenAPI included) except the probes, under every
    method: 401 without a key, with an unknown key, and with the key anywhere but the
    Authorization header. Paths that do not exist are 401 too, not 404, so a caller without a
    key learns nothing about which routes exist."""
    routes = app_routes(auth_server.settings)
    protected = [(concrete(path), methods) for path, methods in routes if path not in PUBLIC]
    assert {"/v1/chat/completions", "/v1/completions", "/generate", "/v1/models"} <= {
        p for p, _ in protected
    }
    assert {"/openapi.json", "/docs", "/redoc"} <= {p for p, _ in protected}
    unknown_key = new_key()
    for path, methods in protected:
        for method in sorted(methods | set(ALL_METHODS)):
            for how, headers, target in [
                ("no key", {}, path),
                ("unknown key", bearer(unknown_key), path),
                ("key in the query", {}, f"{path}?api_key={keys.full}"),
                ("key as X-API-Key", {"X-API-Key": keys.full}, path),
                ("key without scheme", {"Authorization": keys.full}, path),
                (
                    "key as Basic",
                    {"Authorization": "Basic " + base64.b64encode(keys.full.encode()).decode()},
                    path,
                ),
            ]:
                answer = await raw_exchange(auth_server.url, request_head(method, target, headers))
                assert_401(answer, f"{method} {path} ({how})")
    for path in UNKNOWN_PATHS:
        for method in ("GET", "POST"):
            answer = await raw_exchange(auth_server.url, request_head(method, path))
            assert_401(answer, f"{method} {path}")
    # With a key the same unknown path is a plain 404: the 401 above was auth, not routing.
    answer = await raw_exchange(auth_server.url, request_head("GET", "/admin", bearer(keys.full)))
    assert answer.status == 404, answer


def path_variants(path: str) -> list[str]:
    """Spellings of a protected path that a proxy, a router or a normaliser might treat
    differently from the auth check."""
    inner = path[1:]
    return [
        path.upper(),
        path + "/",
        "/" + path,
        path.replace("/", "//"),
        "/" + inner.replace("/", "%2F"),
        "/" + inner.replace("/", "%2f"),
        "/" + "".join(f"%{byte:02x}" for byte in inner.encode()),
        "/health/../" + inner,
        "/health/%2e%2e/" + inner,
        "/health%2F..%2F" + inner.replace("/", "%2F"),
        "/metrics/..%2f" + inner,
        "/ready/./../" + inner,
        "/./" + inner,
        "/%2e/" + inner,
        path + "/.",
        path + ";",
        path + ";/health",
        path + "%00",
        path + "%20",
        path + "%09",
        path + "?/health",
        path + "#/health",
        "/health\\..\\" + inner.replace("/", "\\"),
        "/health%5c..%5c" + inner.replace("/", "%5c"),
        "http://localhost" + path,
        "http://health" + path,
        "//health" + path,
    ]


# Dot segments that resolve to a public path: the server does not normalise, so these are not
# the public routes, and (not public) need a key like any other path.
DOT_TO_PUBLIC = ("/v1/../metrics", "/v1/models/../../health", "/docs/../ready", "/x/%2e%2e/metrics")

HOSTS = (
    "localhost",
    "127.0.0.1",
    "evil.example",
    "health",
    "localhost:80",
    "127.0.0.1:1/health",
    "",
    "[::1]",
    "h" * 4000,
)
PROXY_HEADERS: tuple[dict[str, str], ...] = (
    {"X-Forwarded-Host": "localhost"},
    {"X-Original-URL": "/health"},
    {"X-Rewrite-URL": "/metrics"},
    {"X-Forwarded-Prefix": "/health"},
    {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"},
    {"Forwarded": "for=127.0.0.1;host=health;proto=https"},
    {"X-HTTP-Method-Override": "GET"},
)


async def test_no_path_encoding_host_header_or_proxy_header_bypasses_auth(
    auth_server: RunningServer,
) -> None:
    """Each protected route (and an unknown one) under ~27 spellings, 9 Host headers (and none),
    and the proxy headers some frameworks trust: always 401, or 400 where the HTTP parser
    refuses the request line. Never the route's content, a redirect, a 404 or a 405."""
    protected = [
        concrete(path) for path, _ in app_routes(auth_server.settings) if path not in PUBLIC
    ] + ["/no/such/route"]
    problems: list[str] = []
    statuses: list[int | None] = []

    def judge(answer: RawAnswer, where: str) -> None:
        statuses.append(answer.status)
        if answer.status == 401:
            return
        if answer.status == 400 and answer.closed:
            return  # the parser refused the request line
        problems.append(f"{where}: {answer.status} {answer.data[:120]!r}")

    for path in protected:
        method = (
            "POST" if path in ("/v1/chat/completions", "/v1/completions", "/generate") else "GET"
        )
        for target in path_variants(path):
            head = request_head(method, target)
            judge(await raw_exchange(auth_server.url, head), f"{method} {target}")
        for host in HOSTS:
            head = request_head(method, path, {"Host": host})
            judge(await raw_exchange(auth_server.url, head), f"{method} {path} Host: {host[:20]}")
        no_host = f"{method} {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
        judge(await raw_exchange(auth_server.url, no_host), f"{method} {path} (no Host)")
        for headers in PROXY_HEADERS:
            head = request_head(method, path, headers)
            judge(await raw_exchange(auth_server.url, head), f"{method} {path} {headers}")
    for target in DOT_TO_PUBLIC:
        judge(await raw_exchange(auth_server.url, request_head("GET", target)), f"GET {target}")
    # Most spellings reach the app (and its auth check), not just the parser's refusal.
    assert statuses.count(401) > 300, statuses
    assert not problems, "auth bypassed or not applied:\n" + "\n".join(problems)


# --- no key material anywhere ------------------------------------------------------------------


def key_material(secret: str) -> list[bytes]:
    """What of a key must never be shown: the key, its random part, any 12 characters of that
    part in a row (a truncated or masked key), and its stored SHA-256 hash."""
    token = secret.removeprefix(KEY_PREFIX)
    pieces = [secret, token, hash_key(secret).removeprefix("sha256:")]
    pieces += [token[i : i + 12] for i in range(len(token) - 11)]
    return [piece.encode() for piece in pieces]


def leaks(blobs: dict[str, bytes], secrets: dict[str, str]) -> list[str]:
    """One line per (secret, place) where any of its material shows, with the context."""
    found = []
    for secret_name, secret in secrets.items():
        pieces = key_material(secret)
        for where, blob in blobs.items():
            hits = [piece for piece in pieces if piece in blob]
            if hits:
                at = blob.find(hits[0])
                context = blob[max(0, at - 60) : at + len(hits[0]) + 20]
                found.append(f"{secret_name} key in {where}: ...{context!r}...")
    return found


@dataclass
class Collector:
    """An OTLP/HTTP collector on loopback."""

    traces: list[bytes] = field(default_factory=list)
    metrics: list[bytes] = field(default_factory=list)


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    seen = Collector()

    async def otlp(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        (seen.traces if request.path == "/v1/traces" else seen.metrics).append(body)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", otlp)
    app.router.add_post("/v1/metrics", otlp)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield seen, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_no_key_material_in_responses_logs_metrics_or_traces(
    tmp_path: Path, collector: tuple[Collector, str]
) -> None:
    """llmserve as a process (debug logs, JSON, stderr captured; spans exported over OTLP to a
    collector here; an upstream model with its own API key). Keys are used rightly and wrongly
    (valid, unknown, revoked, over their limit, for a model they may not use, in the query
    string, as X-API-Key, as Basic). Then no response body or header, no log line, no /metrics
    output and no exported span or metric holds any key, any 12 characters of one in a row,
    or a key's hash. Each place is checked for being non-empty first."""
    seen, collector_url = collector
    keys_path = tmp_path / "keys.yaml"
    full = add_key(keys_path, "full")
    limited = add_key(keys_path, "limited", models=("sim",), rpm=2)
    revoked = add_key(keys_path, "revoked", revoked=True)
    unknown = new_key()
    upstream_key = "sk-upstream-" + new_key().removeprefix(KEY_PREFIX)
    secrets = {
        "full": full,
        "limited": limited,
        "revoked": revoked,
        "unknown": unknown,
        "upstream": upstream_key,
    }
    refuses = error(400, "this upstream refuses everything", type="invalid_request_error")
    upstream = FakeUpstream(refuses)
    config = simulated_config(
        auth=f"{{enabled: true, keys_file: '{keys_path}', reload_interval_s: 0.2}}",
        log_level="debug",
        extra=f"observability: {{otlp_endpoint: '{collector_url}', log_format: json}}\n",
        more_models=(
            f"  - {{engine: openai, name: remote, url: '{upstream.url}',"
            f" api_key: '{upstream_key}', max_model_len: 256}}\n"
        ),
    )
    gateway = gateway_process(
        tmp_path / "llmserve.yaml", config, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}
    )
    blobs: dict[str, bytes] = {}
    try:
        await upstream.start()
        await gateway.start(ready="/health")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            calls: list[tuple[str, str, str, Any, dict[str, str]]] = [
                ("full", "POST", "/v1/chat/completions", CHAT, bearer(full)),
                ("full", "POST", "/v1/chat/completions", {**CHAT, "stream": True}, bearer(full)),
                ("full", "POST", "/v1/completions", COMPLETION, bearer(full)),
                ("full", "POST", "/generate", {"prompt": "hi", "max_tokens": 2}, bearer(full)),
                (
                    "full",
                    "POST",
                    "/v1/completions",
                    {**COMPLETION, "model": "remote"},
                    bearer(full),
                ),
                ("full", "POST", "/v1/completions", {**COMPLETION, "model": "nope"}, bearer(full)),
                ("full", "POST", "/v1/completions", {"model": "sim"}, bearer(full)),
                (
                    "full",
                    "POST",
                    "/v1/completions",
                    {**COMPLETION, "max_tokens": 999},
                    bearer(full),
                ),
                ("full", "GET", "/v1/models", None, bearer(full)),
                ("full", "GET", "/openapi.json", None, bearer(full)),
                ("full", "GET", "/docs", None, bearer(full)),
                ("full", "GET", "/missing", None, bearer(full)),
                ("limited", "POST", "/v1/completions", COMPLETION, bearer(limited)),
                ("limited", "POST", "/v1/completions", COMPLETION, bearer(limited)),
                ("limited", "POST", "/v1/completions", COMPLETION, bearer(limited)),  # 429
                (
                    "limited",
                    "POST",
                    "/v1/completions",
                    {**COMPLETION, "model": "remote"},
                    bearer(limited),
                ),  # 403
                ("revoked", "POST", "/v1/completions", COMPLETION, bearer(revoked)),
                ("unknown", "POST", "/v1/chat/completions", CHAT, bearer(unknown)),
                ("query", "GET", f"/v1/models?api_key={full}", None, {}),
                ("x-api-key", "GET", "/v1/models", None, {"X-API-Key": full}),
                (
                    "basic",
                    "GET",
                    "/v1/models",
                    None,
                    {"Authorization": "Basic " + base64.b64encode(f"u:{full}".encode()).decode()},
                ),
                ("no scheme", "GET", "/v1/models", None, {"Authorization": full}),
                ("unknown", "GET", "/metrics", None, bearer(unknown)),
            ]
            statuses = set()
            for number, (who, method, url, body, headers) in enumerate(calls):
                response = await client.request(method, url, json=body, headers=headers)
                statuses.add(response.status_code)
                blobs[f"response {number} ({who} {method} {url[:30]}) body"] = response.content
                blobs[f"response {number} ({who} {method} {url[:30]}) headers"] = repr(
                    response.headers.multi_items()
                ).encode()
            metrics = await client.get("/metrics")
            blobs["/metrics"] = metrics.content
            assert b'key="full"' in metrics.content  # names are labels; keys are not
        assert {200, 400, 401, 403, 404, 429} <= statuses, statuses
    finally:
        await gateway.stop()
        await upstream.stop()
    log = gateway.log.read_bytes()
    blobs["server log"] = log
    assert b'"message": "access"' in log and b'"key": "full"' in log, log[-2000:]
    assert seen.traces, "no span was exported"
    blobs["exported spans"] = b"".join(seen.traces)
    blobs["exported metrics"] = b"".join(seen.metrics)
    assert b"full" in blobs["exported spans"]  # the key's name is a span attribute
    # The upstream key was sent where it belongs (to the upstream), and nowhere else.
    assert upstream.authorizations == [f"Bearer {upstream_key}"]
    found = leaks(blobs, secrets)
    assert not found, "key material leaked:\n" + "\n".join(found)


async def test_an_upstream_error_naming_its_key_does_not_reach_the_client() -> None:
    """No key material from the configuration reaches a client, whatever the upstream says.
    An upstream that names the key it was given in its error message (OpenAI's own API answers
    a bad key with "Incorrect API key provided: sk-...") has that key redacted before the
    message is relayed, streamed or not, chat or completions; the key is still sent to the
    upstream itself.

    By hand: configure an ``engine: openai`` model whose upstream answers
    400 ``{"error": {"message": "bad key <the Authorization it got>"}}``; a completion for that
    model shows ``[redacted]`` in ``error.message``, not the key.
    """
    upstream_key = "sk-upstream-" + new_key().removeprefix(KEY_PREFIX)

    # It names the key it is given (checked below to be this one).
    fake = FakeUpstream(error(400, f"Incorrect API key provided: {upstream_key}"))
    await fake.start()
    settings = Settings(
        models=[
            UpstreamModel(
                engine="openai", name="remote", url=fake.url, api_key=SecretStr(upstream_key)
            )
        ],
        auth=AuthConfig(enabled=False),
    )
    blobs = {}
    try:
        async with (
            serve(settings) as running,
            httpx.AsyncClient(base_url=running.url, timeout=10) as client,
        ):
            for stream in (False, True):
                for path, body in [
                    ("/v1/completions", {"model": "remote", "prompt": "hi", "max_tokens": 2}),
                    ("/v1/chat/completions", {**CHAT, "model": "remote"}),
                ]:
                    response = await client.post(path, json={**body, "stream": stream})
                    assert response.status_code >= 400 or stream, response.text
                    blobs[f"{path} stream={stream}"] = response.content
    finally:
        await fake.stop()
    asked = fake.authorizations
    assert len(asked) == 4 and set(asked) == {f"Bearer {upstream_key}"}, asked
    found = leaks(blobs, {"upstream": upstream_key})
    assert not found, "the upstream key reached the client:\n" + "\n".join(found)


# --- CORS --------------------------------------------------------------------------------------

ORIGIN = "https://evil.example"


def cors_headers(answer: RawAnswer) -> dict[str, str]:
    return {k: v for k, v in answer.headers.items() if k.startswith("access-control-")}


@pytest.mark.parametrize("auth", [True, False])
async def test_cors_is_closed_by_default(keys: Keys, auth: bool) -> None:
    """No configured origins: a preflight from any origin, to any route, gets no
    Access-Control-* header (so a browser page elsewhere cannot call the API), and neither does
    a simple request carrying an Origin."""
    settings = secured_settings(keys.path if auth else None)
    assert settings.cors.allow_origins == ()
    async with serve(settings) as running:
        paths = [concrete(path) for path, _ in app_routes(settings)]
        problems = []
        for path in paths:
            preflight = request_head(
                "OPTIONS",
                path,
                {
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            answer = await raw_exchange(running.url, preflight)
            if cors_headers(answer) or answer.status is None or answer.status < 400:
                problems.append(f"preflight {path}: {answer.status} {cors_headers(answer)}")
            for headers in ({"Origin": ORIGIN}, {"Origin": ORIGIN, **bearer(keys.full)}):
                answer = await raw_exchange(running.url, request_head("GET", path, headers))
                if cors_headers(answer):
                    problems.append(f"GET {path}: {cors_headers(answer)}")
        assert not problems, "\n".join(problems)


async def test_cors_opens_only_to_the_configured_origins(keys: Keys) -> None:
    allowed = "https://app.example"
    settings = secured_settings(keys.path, cors=CorsConfig(allow_origins=(allowed,)))
    async with serve(settings) as running:
        for origin, opened in ((allowed, True), (ORIGIN, False), ("null", False)):
            preflight = request_head(
                "OPTIONS",
                "/v1/chat/completions",
                {
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            answer = await raw_exchange(running.url, preflight)
            got = cors_headers(answer)
            if opened:
                assert answer.status == 200, answer
                assert got.get("access-control-allow-origin") == allowed, got
                assert "POST" in got.get("access-control-allow-methods", ""), got
                assert "authorization" in got.get("access-control-allow-headers", "").lower()
            else:
                assert "access-control-allow-origin" not in got, (origin, got)
            assert got.get("access-control-allow-credentials") != "true", got
            simple = await raw_exchange(
                running.url,
                request_head("GET", "/v1/models", {"Origin": origin, **bearer(keys.full)}),
            )
            assert simple.status == 200, simple
            assert (cors_headers(simple).get("access-control-allow-origin") == allowed) is opened
            # A preflight carries no key; the request after it still needs one.
            keyless = await raw_exchange(
                running.url, request_head("GET", "/v1/models", {"Origin": origin})
            )
            assert keyless.status == 401, keyless


# --- security headers --------------------------------------------------------------------------


async def test_security_headers_on_every_response_of_the_app(keys: Keys) -> None:
    """Every answer, 2xx to 5xx, JSON, SSE, HTML and Prometheus text, refusals by auth, body
    limit, rate limit and queue included, carries X-Content-Type-Options: nosniff,
    Cache-Control: no-store, X-Frame-Options: DENY and Referrer-Policy: no-referrer, and no
    Server or X-Powered-By banner. Streams too: the middleware's ``no-store`` replaces the
    ``no-cache`` the SSE response sets.

    By hand: ``curl -sN -D- localhost:8000/generate -d '{"prompt":"hi","max_tokens":2}'``
    → ``cache-control: no-store``.
    """
    settings = secured_settings(keys.path, limits=Limits(max_body_bytes=4096))
    seen: list[tuple[str, httpx.Headers | dict[str, str]]] = []
    async with (
        serve(settings) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as anonymous,
        httpx.AsyncClient(base_url=running.url, timeout=10, headers=bearer(keys.full)) as client,
    ):

        async def record(what: str, response: httpx.Response, status: int | None) -> None:
            if status is not None:
                assert response.status_code == status, (what, response.status_code, response.text)
            seen.append((f"{what} ({response.status_code})", response.headers))

        for path in PUBLIC:

            async def answered(path: str = path) -> httpx.Response | None:
                response = await anonymous.get(path)  # /ready: 503 until the engines loaded
                return response if response.status_code == 200 else None

            response = await until(answered, 3.0, f"GET {path} answered 200", 0.02)
            await record(f"GET {path}", response, 200)
        await record("GET /v1/models", await client.get("/v1/models"), 200)
        await record("GET /openapi.json", await client.get("/openapi.json"), 200)
        await record("GET /docs", await client.get("/docs"), 200)
        await record("GET /redoc", await client.get("/redoc"), 200)
        await record("chat", await client.post("/v1/chat/completions", json=CHAT), 200)
        for path, body in [
            ("/v1/chat/completions", {**CHAT, "stream": True}),
            ("/v1/completions", {**COMPLETION, "stream": True}),
            ("/generate", {"prompt": "hi", "max_tokens": 2}),
        ]:
            async with client.stream("POST", path, json=body) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                await record(f"stream {path}", stream, 200)
                await stream.aread()
        await record("bad JSON", await client.post("/v1/completions", content=b"{"), 400)
        too_long = {**COMPLETION, "max_tokens": 300}
        await record("context", await client.post("/v1/completions", json=too_long), 400)
        await record("no key", await anonymous.post("/v1/completions", json=COMPLETION), 401)
        sim_only = bearer(keys.sim_only)
        slow = {**COMPLETION, "model": "slow"}
        await record("403", await client.post("/v1/completions", json=slow, headers=sim_only), 403)
        unknown = {**COMPLETION, "model": "nope"}
        await record("unknown model", await client.post("/v1/completions", json=unknown), 404)
        await record("unknown path", await client.get("/nope"), 404)
        await record("wrong method", await client.get("/v1/completions"), 405)
        await record("HEAD", await anonymous.head("/health"), None)
        big = {**COMPLETION, "prompt": "x" * 5000}
        await record("413", await client.post("/v1/completions", json=big), 413)

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 1000

        await record("413 chunked", await client.post("/v1/completions", content=chunked()), 413)
        limited = bearer(keys.one_per_minute)
        await client.post("/v1/completions", json=COMPLETION, headers=limited)
        rate = await client.post("/v1/completions", json=COMPLETION, headers=limited)
        await record("429", rate, 429)
        # "slow" admits one request and queues none: a second one while the first runs is 503.
        running_stream = client.stream(
            "POST", "/v1/completions", json={**slow, "max_tokens": 50, "stream": True}
        )
        async with running_stream as first:
            assert first.status_code == 200
            await record("503", await client.post("/v1/completions", json=slow), 503)
        redirect = await client.get("/v1/models/", follow_redirects=False)
        seen.append((f"trailing slash ({redirect.status_code})", redirect.headers))
    problems = [p for what, headers in seen for p in security_header_problems(headers, what)]
    assert not problems, "\n".join(problems)
    # API answers load nothing and may not be framed; only the interactive docs pages (which
    # load Swagger UI / ReDoc) go without a Content-Security-Policy.
    for what, headers in seen:
        csp = headers.get("content-security-policy")
        if what.startswith(("GET /docs", "GET /redoc")):
            assert csp is None, (what, csp)
        else:
            assert csp == "default-src 'none'; frame-ancestors 'none'", (what, csp)


async def test_security_headers_on_responses_the_http_parser_writes(
    auth_server: RunningServer,
) -> None:
    """A request the HTTP parser refuses never reaches the app or its middleware, yet its 400
    carries the same security headers (written by the protocol itself, http_protocol.py).

    By hand: ``printf 'GET /a b HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | nc 127.0.0.1 8000``."""
    answer = await raw_exchange(auth_server.url, b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 400, answer
    problems = security_header_problems(answer.headers, "parser 400")
    assert not problems, "\n".join(problems)


async def test_the_served_process_sends_no_banner(tmp_path: Path) -> None:
    """``llmserve serve`` itself (not the tests' server): no Server (or X-Powered-By) header on
    app answers, errors, or the parser's own 400."""
    gateway = gateway_process(tmp_path / "llmserve.yaml", simulated_config())
    await gateway.start(ready="/health")
    try:
        answers = {
            "health": await raw_exchange(gateway.url, request_head("GET", "/health")),
            "404": await raw_exchange(gateway.url, request_head("GET", "/nope")),
            "400": await raw_exchange(
                gateway.url, request_head("POST", "/v1/completions", {"Content-Length": "0"})
            ),
            "parser 400": await raw_exchange(gateway.url, b"GET /a b HTTP/1.1\r\n\r\n"),
        }
    finally:
        await gateway.stop()
    for what, answer in answers.items():
        assert answer.status is not None, what
        for banner in ("server", "x-powered-by"):
            assert banner not in answer.headers, (what, answer.headers)


# --- the Host header ---------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [True, False])
async def test_the_host_header_is_never_reflected(keys: Keys, auth: bool) -> None:
    """Nothing a client sends as Host (or X-Forwarded-Host) comes back in a response: no
    trailing-slash redirect builds a Location from it (the app runs with
    ``redirect_slashes=False``, so ``/v1/models/`` and ``/health/`` are plain 404s), which
    would be a header-injection / cache-poisoning finding in any scan.

    By hand: ``curl -si -H 'Host: evil.example' localhost:8000/health/`` → 404, no Location.
    """
    settings = secured_settings(keys.path if auth else None)
    problems = []
    async with serve(settings) as running:
        for path in ("/health/", "/ready/", "/metrics/", "/v1/models/", "/docs/", "/v1/models"):
            for headers in (
                {"Host": "evil.example"},
                {"Host": "localhost", "X-Forwarded-Host": "evil.example"},
                {"Host": "evil.example", "X-Forwarded-Proto": "https"},
            ):
                answer = await raw_exchange(
                    running.url, request_head("GET", path, {**headers, **bearer(keys.full)})
                )
                if b"evil.example" in answer.data:
                    location = answer.headers.get("location")
                    problems.append(f"GET {path} {headers}: {answer.status} location={location}")
    assert not problems, "the Host header was reflected:\n" + "\n".join(problems)


# --- dependencies ------------------------------------------------------------------------------

# (package, first fixed version, why)
KNOWN_FIXES = [
    ("starlette", "0.47.2", "CVE-2024-47874 and CVE-2025-54121 (multipart DoS / blocking)"),
    ("h11", "0.16.0", "CVE-2025-43859 (request smuggling through chunked trailers)"),
]


@pytest.mark.parametrize(("package", "fixed", "why"), KNOWN_FIXES)
def test_installed_dependencies_are_past_their_known_cves(
    package: str, fixed: str, why: str
) -> None:
    installed = Version(importlib.metadata.version(package))
    assert installed >= Version(fixed), f"{package} {installed} predates the fix for {why}"


def test_pyproject_pins_starlette_past_its_cves() -> None:
    """The pin is stated where installs read it, not only true of this venv."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [Requirement(r) for r in project["dependencies"]]
    starlette = [r for r in pins if r.name == "starlette"]
    assert starlette, "starlette is not pinned in [project] dependencies"
    for version in ("0.47.1", "0.40.0", "0.27.0"):
        assert not starlette[0].specifier.contains(version), f"{starlette[0]} admits {version}"
    assert starlette[0].specifier.contains("0.47.2")
